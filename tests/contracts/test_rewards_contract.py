"""Rewards: credit from the task pool, withdraw once to the payout address, never more than the pool."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from coordinator.chain import ChainClient, ChainError
from coordinator.contracts import CrowdContracts, Role, find_build_dir

ONE_ETHER = 10**18
GWEI = 10**9


def new_key() -> bytes:
    return os.urandom(32)


def _payout_device(client: ChainClient, crowd: CrowdContracts) -> tuple[bytes, ChainClient]:
    """An enrolled device whose payout account holds ether for gas (eth-tester estimates at the block gas limit)."""
    account = client.new_account()
    client.send_value(account.address, ONE_ETHER // 10)
    key = new_key()
    crowd.register(key, Role.DEVICE, account.address)
    return key, client.as_signer(account)


def test_credit_then_withdraw_pays_once(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task(rounds=2, reward_wei=ONE_ETHER)
    (k1, payee1), (k2, payee2) = _payout_device(client, crowd), _payout_device(client, crowd)
    crowd.credit(task_id, 1, {k1: 3 * GWEI * 10**6, k2: 10**15})
    crowd.credit(task_id, 2, {k1: 10**15})
    owed = 3 * GWEI * 10**6 + 10**15
    assert crowd.owed_to(payee1.address) == owed
    assert crowd.task(task_id).pool_wei == ONE_ETHER - owed - 10**15

    before = client.balance(payee1.address)
    receipt = crowd.withdraw(payee1.account)
    gas_cost = receipt.gas_used * client._gas_price()
    assert client.balance(payee1.address) == before + owed - gas_cost
    assert crowd.owed_to(payee1.address) == 0

    with pytest.raises(ChainError, match="nothing owed") as err:
        crowd.withdraw(payee1.account)
    assert err.value.reverted
    # Someone else's withdraw touches only their own balance.
    crowd.withdraw(payee2.account)
    assert crowd.owed_to(payee2.address) == 0
    stranger = client.new_account()
    client.send_value(stranger.address, ONE_ETHER // 10)
    with pytest.raises(ChainError, match="nothing owed"):
        crowd.withdraw(stranger)


def test_credit_cannot_exceed_pool(client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]) -> None:
    task_id = make_task(rounds=3, reward_wei=1000)
    (k1, payee1), (k2, _) = _payout_device(client, crowd), _payout_device(client, crowd)
    with pytest.raises(ChainError, match="exceeds pool") as err:
        crowd.credit(task_id, 1, {k1: 600, k2: 401})
    assert err.value.reverted
    assert crowd.owed_to(payee1.address) == 0
    assert crowd.task(task_id).pool_wei == 1000
    crowd.credit(task_id, 1, {k1: 600, k2: 400})
    assert crowd.task(task_id).pool_wei == 0
    with pytest.raises(ChainError, match="already credited"):
        crowd.credit(task_id, 1, {k1: 0})
    with pytest.raises(ChainError, match="exceeds pool"):
        crowd.credit(task_id, 2, {k1: 1})


def test_credit_needs_enrolled_key_with_payout(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task(rounds=3, reward_wei=1000)
    key, _ = _payout_device(client, crowd)
    no_payout = new_key()
    crowd.register(no_payout, Role.EDGE, None)
    with pytest.raises(ChainError, match="no payout"):
        crowd.credit(task_id, 1, {no_payout: 1})
    crowd.remove(key)
    with pytest.raises(ChainError, match="inactive key"):
        crowd.credit(task_id, 1, {key: 1})


def test_non_owner_cannot_credit(
    client: ChainClient, crowd: CrowdContracts, stranger: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task(reward_wei=1000)
    key, _ = _payout_device(client, crowd)
    with pytest.raises(ChainError, match="not owner"):
        stranger.credit(task_id, 1, {key: 1})


def _reentrant_payout(client: ChainClient, crowd: CrowdContracts, refuse: bool) -> tuple[bytes, str]:
    art = json.loads((find_build_dir() / "ReentrantPayout.json").read_text())
    address, _ = client.deploy(art["abi"], art["bytecode"], crowd.addresses["CrowdTasks"], refuse)
    key = new_key()
    crowd.register(key, Role.DEVICE, address)
    return key, address


def test_reentrant_payout_is_paid_once(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task(reward_wei=10_000)
    key, address = _reentrant_payout(client, crowd, refuse=False)
    crowd.credit(task_id, 1, {key: 7_000})
    art = json.loads((find_build_dir() / "ReentrantPayout.json").read_text())
    attacker = client.contract(address, art["abi"])
    client.transact(attacker.functions.pull())
    assert client.balance(address) == 7_000
    assert client.call(attacker.functions.receivedCalls()) == 1
    assert client.call(attacker.functions.reentered()) is False
    assert client.balance(crowd.addresses["CrowdTasks"]) == 3_000


def test_refusing_payout_keeps_its_balance(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task(reward_wei=10_000)
    key, address = _reentrant_payout(client, crowd, refuse=True)
    crowd.credit(task_id, 1, {key: 5_000})
    art = json.loads((find_build_dir() / "ReentrantPayout.json").read_text())
    attacker = client.contract(address, art["abi"])
    with pytest.raises(ChainError, match="transfer failed"):
        client.transact(attacker.functions.pull())
    assert crowd.owed_to(address) == 5_000  # reverted as a whole: still owed


def test_reclaim_after_last_round(client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]) -> None:
    task_id = make_task(rounds=1, reward_wei=ONE_ETHER)
    with pytest.raises(ChainError, match="task running"):
        crowd.reclaim(task_id)
    crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), 1, 0)
    with pytest.raises(ChainError, match="task running"):  # anchored but not settled: the pool may still be owed
        crowd.reclaim(task_id)
    crowd.settle_round(task_id, 1, new_key(), 0, 0)
    before = client.balance(client.address)
    receipt = crowd.reclaim(task_id)
    assert client.balance(client.address) == before + ONE_ETHER - receipt.gas_used * client._gas_price()
    assert crowd.task(task_id).pool_wei == 0


def test_deadline_must_be_future(crowd: CrowdContracts) -> None:
    with pytest.raises(ChainError, match="deadline passed"):
        crowd.create_task(new_key(), new_key(), 1, 1.0, int(time.time()) - 10)
