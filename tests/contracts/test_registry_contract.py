"""Registry: deployment, enrolment, removal and owner-only writes."""

from __future__ import annotations

import os

import pytest

from coordinator.chain import ChainClient, ChainError
from coordinator.contracts import CrowdContracts, Role


def new_key() -> bytes:
    return os.urandom(32)


def test_deploy_wires_contracts(client: ChainClient, crowd: CrowdContracts) -> None:
    assert set(crowd.addresses) == {"Registry", "CrowdTasks"}
    assert client.call(crowd.registry.functions.owner()) == client.address
    assert client.call(crowd.tasks.functions.owner()) == client.address
    assert client.call(crowd.tasks.functions.registry()) == crowd.addresses["Registry"]
    assert all(r.gas_used > 0 for r in crowd.deploy_receipts.values())
    again = CrowdContracts.at(client, crowd.addresses)
    assert again.addresses == crowd.addresses


def test_at_rejects_bad_addresses(client: ChainClient, crowd: CrowdContracts) -> None:
    with pytest.raises(ValueError, match="must be an address"):
        CrowdContracts.at(client, {"Registry": "nope", "CrowdTasks": crowd.addresses["CrowdTasks"]})
    with pytest.raises(ChainError, match="no contract code"):
        CrowdContracts.at(client, {"Registry": crowd.addresses["Registry"], "CrowdTasks": client.address})
    swapped = {"Registry": crowd.addresses["CrowdTasks"], "CrowdTasks": crowd.addresses["CrowdTasks"]}
    with pytest.raises(ChainError, match="uses registry"):
        CrowdContracts.at(client, swapped)


def test_register_many_and_remove(client: ChainClient, crowd: CrowdContracts) -> None:
    payout = client.new_account().address
    devices = [new_key() for _ in range(10)]
    edge = new_key()
    crowd.register_many([(k, Role.DEVICE, payout) for k in devices] + [(edge, Role.EDGE, None)])

    assert all(crowd.is_active(k, Role.DEVICE) for k in devices)
    assert not crowd.is_active(devices[0], Role.EDGE)
    assert crowd.is_active(edge, Role.EDGE)
    assert crowd.payout_of(devices[3]) == payout
    assert crowd.payout_of(edge) is None
    assert not crowd.is_active(new_key(), Role.DEVICE)

    crowd.remove(devices[0])
    assert not crowd.is_active(devices[0], Role.DEVICE)
    assert crowd.is_active(devices[1], Role.DEVICE)
    with pytest.raises(ChainError, match="not registered") as err:
        crowd.remove(devices[0])
    assert err.value.reverted

    # A removed key can be enrolled again (e.g. after a repair), a live one cannot twice.
    crowd.register(devices[0], Role.DEVICE, payout)
    assert crowd.is_active(devices[0], Role.DEVICE)
    with pytest.raises(ChainError, match="already registered"):
        crowd.register(devices[1], Role.DEVICE, payout)


def test_register_events(client: ChainClient, crowd: CrowdContracts) -> None:
    key = new_key()
    crowd.register(key, Role.EDGE, None)
    crowd.remove(key)
    registered = client.logs(crowd.registry.events.Registered(), {"key": key})
    removed = client.logs(crowd.registry.events.Removed(), {"key": key})
    assert [e["args"]["role"] for e in registered] == [int(Role.EDGE)]
    assert len(removed) == 1


def test_only_owner_registers(crowd: CrowdContracts, stranger: CrowdContracts) -> None:
    key = new_key()
    with pytest.raises(ChainError, match="not owner") as err:
        stranger.register_many([(key, Role.DEVICE, None)])
    assert err.value.reverted
    crowd.register(key, Role.DEVICE, None)
    with pytest.raises(ChainError, match="not owner"):
        stranger.remove(key)
    assert stranger.is_active(key, Role.DEVICE)  # reads are open to anyone


def test_bad_input_is_refused_before_sending(crowd: CrowdContracts) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crowd.register(b"short", Role.DEVICE, None)
    with pytest.raises(ValueError):
        crowd.register(new_key(), 3, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="address"):
        crowd.register(new_key(), Role.DEVICE, "0x1234")
    with pytest.raises(ValueError, match="no entries"):
        crowd.register_many([])
    with pytest.raises(ChainError, match="zero key"):
        crowd.register(b"\x00" * 32, Role.DEVICE, None)
