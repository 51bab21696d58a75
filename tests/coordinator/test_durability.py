"""Durability in one process (fast): a chain that is down delays every chain write (registry, task,
anchor, scores, rewards) without losing it; a crash after a transaction but before the database
recorded it is adopted from the chain, never sent twice; a restarted coordinator (a new instance on
the same database and store) carries on. The same over SQLite and PostgreSQL.

The separate-process crash tests (kill -9) against the real PoA chain are in test_crash_poa.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.chain import ChainConfig, ChainError, connect
from coordinator.contracts import CrowdContracts, Role
from tests.coordinator.world import FRONT, make_coordinator, make_world, task_parts, update_env


class FlakyChain:
    """CrowdContracts whose every call fails while ``down``; ``lose_receipt`` names writes that reach
    the chain but whose answer is lost (the coordinator dies or times out before recording it)."""

    def __init__(self, inner: CrowdContracts) -> None:
        self.inner = inner
        self.down = False
        self.lose_receipt: set[str] = set()
        self.sent: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ChainError(f"{name}: connection refused (chain down)")
            result = attr(*args, **kwargs)
            if name in ("anchor_round", "settle_round", "register_many", "create_task", "remove", "bind_edges"):
                self.sent.append(name)
            if name in self.lose_receipt:
                self.lose_receipt.discard(name)
                raise ChainError(f"{name}: no receipt (timed out)")
            return result

        return call


def test_chain_down_then_up_and_lost_receipts(tmp_path: Path, db_url: str) -> None:
    inner = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    chain = FlakyChain(inner)
    chain.down = True
    w = make_world(chain, db_url, tmp_path, devices=4)  # type: ignore[arg-type]
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=10_000)  # chain down: queued, not lost
    tid = bytes.fromhex(spec.task_id)
    assert chain.sent == [] and not any(p["on_chain"] for p in w.coord.participants())
    assert w.coord.tasks()[0]["on_chain"] is False
    rs = w.coord.open_round(spec.task_id, 1)
    for i, d in enumerate(w.devices):
        assert w.coord.receive_update(update_env(w.edge, spec, 1, d.node_id, rs.global_model_hash, 0.05, i + 1)).status == "received"
    w.coord.close_round(spec.task_id, 1)
    for _ in range(3):
        assert w.coord.anchor_pending() == []
    r1 = w.coord.rounds(spec.task_id)[0]
    assert r1["status"] == "closed" and r1["anchor_attempts"] == 3 and "chain down" in r1["anchor_error"]

    # a restart while the chain is still down changes nothing; then the chain comes back
    coord = make_coordinator(chain, db_url, tmp_path / "store", identity=w.coord.identity)  # type: ignore[arg-type]
    assert coord.anchor_pending() == []
    chain.down = False
    chain.lose_receipt = {"anchor_round", "settle_round"}  # both reach the chain, the answers are lost
    assert coord.anchor_pending() == []  # anchor sent, receipt lost: deferred
    assert [a.round for a in inner.anchors(tid)] == [1]
    adopted = coord.anchor_pending()  # found on chain: adopted, not sent again
    assert [(a.round, a.adopted) for a in adopted] == [(1, True)]
    coord.anchor_pending()  # the settlement was sent but unrecorded: adopted too
    r1 = coord.rounds(spec.task_id)[0]
    assert r1["status"] == "anchored" and r1["settled"] and r1["credit_tx"]
    assert r1["tx_hash"] == "0x" + inner.anchors(tid)[0].tx_hash.hex()
    assert chain.sent.count("anchor_round") == 1 and chain.sent.count("settle_round") == 1
    assert all(inner.is_active(bytes.fromhex(d.node_id), Role.DEVICE) for d in w.devices)
    assert inner.task(tid).pool_wei == 10_000 - 5_000
    assert coord.anchor_pending() == [] and chain.sent.count("anchor_round") == 1


def test_restart_mid_round_keeps_accepted_updates(tmp_path: Path, db_url: str) -> None:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, db_url, tmp_path, devices=4)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial)
    rs = w.coord.open_round(spec.task_id, 1)
    envs = [update_env(w.edge, spec, 1, d.node_id, rs.global_model_hash, 0.05, i + 1) for i, d in enumerate(w.devices)]
    for env in envs[:2]:
        assert w.coord.receive_update(env).status == "received"
    # "restart": a new coordinator on the same state re-opens the same round with the same selection
    again = make_coordinator(contracts, db_url, tmp_path / "store", identity=w.coord.identity)
    again.republish()
    assert again.round_progress(spec.task_id, 1) == (2, 4)
    assert again.receive_update(envs[0]).status == "duplicate"
    for env in envs[2:]:
        assert again.receive_update(env).status == "received"
    summary = again.step(spec.task_id, 3600.0)
    assert summary is not None and summary.accepted == 4
    assert again.rounds(spec.task_id)[0]["status"] == "anchored"


@pytest.mark.parametrize("fail_on", ["register_many", "remove"])
def test_registry_changes_are_queued(tmp_path: Path, fail_on: str) -> None:
    inner = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    chain = FlakyChain(inner)
    w = make_world(chain, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=2)  # type: ignore[arg-type]
    gone = w.devices[0]
    if fail_on == "remove":
        chain.down = True
        assert w.coord.remove(gone.node_id)
        assert inner.is_active(bytes.fromhex(gone.node_id), Role.DEVICE)  # the chain lags
        chain.down = False
        w.coord.anchor_pending()
        assert not inner.is_active(bytes.fromhex(gone.node_id), Role.DEVICE)
    else:
        chain.lose_receipt = {"register_many"}  # registered on chain, the coordinator never learnt it
        from crowdfl.identity import Identity

        late = Identity.generate()
        w.coord.register([(late.public, "device", w.edge.node_id, None)])
        assert not next(p for p in w.coord.participants() if p["node_id"] == late.node_id)["on_chain"]
        assert w.coord.sync_registry() == 1  # "already registered" is checked, not fatal
        assert inner.is_active(bytes.fromhex(late.node_id), Role.DEVICE)
    assert all(p["on_chain"] for p in w.coord.participants())


def test_a_device_removed_after_its_round_still_passes_the_audit(tmp_path: Path) -> None:
    from coordinator.audit import audit_model

    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=4)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    rs = w.coord.open_round(spec.task_id, 1)
    for i, node in enumerate(rs.selected):
        w.coord.receive_update(update_env(w.edge, spec, 1, node, rs.global_model_hash, 0.05, i + 1))
    summary = w.coord.close_round(spec.task_id, 1)
    gone = w.devices[2]
    contracts.remove(bytes.fromhex(gone.node_id))  # removed on chain between the close and the settling
    w.coord.anchor_pending()
    r1 = w.coord.rounds(spec.task_id)[0]
    assert r1["settled"] and r1["credit_tx"]
    tid = bytes.fromhex(spec.task_id)
    settled = contracts.settlement(tid, 1)
    assert settled is not None and settled.customers == 4  # its leaf stays; without a payout it cannot be claimed
    report = audit_model(contracts, w.store, summary.model_hash)
    assert report.ok, report.lines()
