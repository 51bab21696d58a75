"""Fixtures for contract tests: a fresh embedded (eth-tester) chain per test, and the real
PoA chains of tests/support/poa_chain.py for test_poa_chain.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from coordinator.chain import ChainClient, ChainConfig, connect
from coordinator.contracts import CrowdContracts, Role
from tests.support.poa_chain import clique_chain, clique_two_sealers, dev_chain  # noqa: F401  (PoA fixtures)

ONE_ETHER = 10**18


@pytest.fixture
def client() -> ChainClient:
    return connect(ChainConfig(kind="embedded"))


@pytest.fixture
def crowd(client: ChainClient) -> CrowdContracts:
    return CrowdContracts.deploy(client)


@pytest.fixture
def stranger(client: ChainClient, crowd: CrowdContracts) -> CrowdContracts:
    """The same contracts seen through a funded key that is not the owner."""
    account = client.new_account()
    client.send_value(account.address, ONE_ETHER)
    return CrowdContracts.at(client.as_signer(account), crowd.addresses)


def new_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def make_task(crowd: CrowdContracts) -> Callable[..., bytes]:
    def make(rounds: int = 3, reward_wei: int = 0, epsilon: float = 2.0) -> bytes:
        task_id = new_key()
        crowd.create_task(task_id, new_key(), rounds, epsilon, int(time.time()) + 3600, reward_wei)
        return task_id

    return make


@pytest.fixture
def enrolled(crowd: CrowdContracts, client: ChainClient) -> dict[str, list[bytes]]:
    """Two edges and four devices, each device with its own payout account."""
    edges = [new_key() for _ in range(2)]
    devices = [new_key() for _ in range(4)]
    entries = [(k, Role.EDGE, None) for k in edges] + [(k, Role.DEVICE, client.new_account().address) for k in devices]
    crowd.register_many(entries)
    return {"edges": edges, "devices": devices}
