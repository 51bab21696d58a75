"""A dishonest coordinator, each time consistent in every other way, is caught by the audit with
its own reason, from the chain and the store alone.

Every forgery below goes through the coordinator's own code path (stored, hashed, Merkle-rooted,
anchored and settled on chain), so no check on the store's hashes can catch it: only recomputing
what the round should have been does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.audit import AuditReport, audit_model
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts
from coordinator.db import Update
from crowdfl.identity import Identity
from tests.coordinator.world import FRONT, World, make_world, task_parts, update_env
from tests.helpers import update_receipt

INTEGRITY = ("manifest:", "hash", "not in the store", "cannot start")


@pytest.fixture
def contracts() -> CrowdContracts:
    return CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))


def _round(w: World, spec: Any, r: int, skip: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    rs = w.coord.open_round(spec.task_id, r)
    for i, node in enumerate(rs.selected):
        if node not in skip:
            assert w.coord.receive_update(update_env(w.edge, spec, r, node, rs.global_model_hash, 0.05, 100 * r + i)).status == "received"
    summary = w.coord.close_round(spec.task_id, r)
    w.coord.anchor_pending()
    assert w.coord.rounds(spec.task_id)[r - 1]["settled"]
    return summary.model_hash


def _inject(w: World, spec: Any, r: int, edge: Identity, device: Identity, n: int, claimed: int) -> None:
    """Slip an update into the round's database behind the intake's checks (as a dishonest coordinator may)."""
    rs = w.coord.current_round(spec.task_id)
    assert rs is not None
    receipt = update_receipt(device, spec.task_id, r, edge.node_id, claimed, epsilon=spec.epsilon)
    env = update_env(edge, spec, r, device.node_id, rs.base_model_hash, 0.05, 999, n=n, receipt=receipt)
    h = w.store.put(env)
    with w.coord.sessions.begin() as s:
        s.add(Update(task_id=spec.task_id, round=r, customer=device.node_id, edge=edge.node_id, update_hash=h,
                     status="received", num_samples=n, received_at=time.time()))


def _failed_with(report: AuditReport, reason: str) -> list[str]:
    problems = report.problems + [p for f in report.rounds for p in f.problems]
    assert not report.ok
    assert any(reason in p for p in problems), problems
    assert not any(any(x in p for x in INTEGRITY) for p in problems), problems  # nothing a hash check would catch
    return problems


def test_the_honest_run_passes(contracts: CrowdContracts, tmp_path: Path) -> None:
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    _round(w, spec, 1)
    report = audit_model(contracts, w.store, _round(w, spec, 2))
    assert report.ok, report.lines()
    assert sum(1 for ln in report.lines() if "signed batch(es)" in ln) == 8  # per-device contributions


def test_a_wrong_aggregate_under_a_re_signed_manifest(contracts: CrowdContracts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator.rounds as rounds

    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    real = rounds.aggregate

    def skewed(*args: Any, **kw: Any) -> Any:
        result = real(*args, **kw)
        return dataclasses.replace(result, weights=[np.asarray(x) + np.float32(0.01) for x in result.weights])

    monkeypatch.setattr(rounds, "aggregate", skewed)
    model = _round(w, spec, 1)
    monkeypatch.setattr(rounds, "aggregate", real)
    _failed_with(audit_model(contracts, w.store, model), "does not reproduce the anchored model")


def test_a_ledger_that_pays_an_unselected_customer(contracts: CrowdContracts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator.round_engine as round_engine

    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    friend = Identity.generate().node_id
    real = round_engine.round_ledger

    def generous(*args: Any, **kw: Any) -> dict[str, Any]:
        ledger = real(*args, **kw)
        victim = sorted(ledger["rewards"])[0]
        ledger["rewards"] = dict(sorted({**ledger["rewards"], victim: "0", friend: ledger["rewards"][victim]}.items()))
        return ledger

    monkeypatch.setattr(round_engine, "round_ledger", generous)
    model = _round(w, spec, 1)
    problems = _failed_with(audit_model(contracts, w.store, model), "pays customer")
    assert any(friend[:12] in p for p in problems)


def test_a_receipt_claiming_more_samples_than_were_released(contracts: CrowdContracts, tmp_path: Path) -> None:
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=2)  # samples_per_round 64: one round releases at most 64
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    rs = w.coord.open_round(spec.task_id, 1)
    greedy = next(d for d in w.devices if d.node_id == rs.selected[0])
    for i, node in enumerate(rs.selected[1:]):
        w.coord.receive_update(update_env(w.edge, spec, 1, node, rs.global_model_hash, 0.05, i + 1))
    _inject(w, spec, 1, w.edge, greedy, n=100, claimed=100)  # a device-signed receipt for 100 samples in one batch
    summary = w.coord.close_round(spec.task_id, 1)
    w.coord.anchor_pending()
    _failed_with(audit_model(contracts, w.store, summary.model_hash), "receipt_samples")


def test_a_selection_that_skips_a_high_reputation_customer(contracts: CrowdContracts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    _round(w, spec, 1)
    reps = w.coord.reputations(spec.task_id, 1)
    best = max(reps, key=lambda c: reps[c])
    real = w.coord.engine.select  # the engine draws the selection when it opens a round
    monkeypatch.setattr(w.coord.engine, "select", lambda *a, **k: [c for c in real(*a, **k) if c != best])
    model = _round(w, spec, 2)
    _failed_with(audit_model(contracts, w.store, model), "not the ones the reputation draw selects")


def test_an_update_for_a_device_of_another_edge(contracts: CrowdContracts, tmp_path: Path) -> None:
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    rogue = Identity.generate()
    w.coord.register([(rogue.public, "edge", None, None)])
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    rs = w.coord.open_round(spec.task_id, 1)
    victim = next(d for d in w.devices if d.node_id == rs.selected[0])
    for i, node in enumerate(rs.selected[1:]):
        w.coord.receive_update(update_env(w.edge, spec, 1, node, rs.global_model_hash, 0.05, i + 1))
    _inject(w, spec, 1, rogue, victim, n=10, claimed=10)  # the device's receipt, but through the rogue edge
    summary = w.coord.close_round(spec.task_id, 1)
    w.coord.anchor_pending()
    _failed_with(audit_model(contracts, w.store, summary.model_hash), "the chain binds the device to another edge")


def test_an_eligible_list_that_leaves_out_a_registered_customer(contracts: CrowdContracts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    real = w.coord.registry.eligible  # the round engine asks the registry
    dropped = w.devices[0].node_id
    monkeypatch.setattr(w.coord.registry, "eligible", lambda: [c for c in real() if c != dropped])
    model = _round(w, spec, 1)
    problems = _failed_with(audit_model(contracts, w.store, model), "leaves out")
    assert any(dropped[:12] in p for p in problems)
