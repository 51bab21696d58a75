"""Reputation in the round loop: scores, decay, selection with a floor and newcomer slots,
reputation-weighted rewards, the chain mirror (setScores, credit) and the audit of all of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.audit import audit_model
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts
from coordinator.ledger import LedgerPolicy, selection_seed
from coordinator.reputation import ReputationConfig
from crowdfl.identity import Identity
from tests.coordinator.world import FRONT, make_world, task_parts, update_env

POOL = 4 * 1_000_003  # not a multiple of the rounds' shares' weights: rounding must still be exact


@pytest.fixture
def contracts() -> CrowdContracts:
    return CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))


def test_an_attacker_loses_reputation_rewards_and_its_place(contracts: CrowdContracts, tmp_path: Path, db_url: str) -> None:
    w = make_world(contracts, db_url, tmp_path, devices=6)
    spec, initial = task_parts(rounds=4, aggregation="multi_krum")
    w.coord.publish_task(spec, FRONT, initial, reward_wei=POOL)
    tid = bytes.fromhex(spec.task_id)
    attacker = w.devices[0]
    newcomer = Identity.generate()
    seq = 0
    selections: list[list[str]] = []
    for r in range(1, 5):
        rs = w.coord.open_round(spec.task_id, r)
        selections.append(list(rs.selected))
        for node in rs.selected:
            seq += 1
            scale = 3.0 if node == attacker.node_id else 0.02
            got = w.coord.receive_update(update_env(w.edge, spec, r, node, rs.global_model_hash, scale, seq))
            assert got.status == "received", got
        w.coord.close_round(spec.task_id, r)
        w.coord.anchor_pending()
        if r == 1:  # joins after round 1: a newcomer slot takes it into round 2
            pay = contracts.client.new_account().address
            w.coord.register([(newcomer.public, "device", w.edge.node_id, pay)])
            w.payouts[newcomer.node_id] = pay
    assert newcomer.node_id not in selections[0] and newcomer.node_id in selections[1]
    # prior 0.5, decay 0.8, score ~0 every round: 0.4, 0.32, 0.256 -> below the 0.3 floor for round 4
    assert attacker.node_id in selections[2] and attacker.node_id not in selections[3]
    history = w.coord.reputation_history(spec.task_id)
    att = [h["reputation"] for h in history[attacker.node_id]]
    assert att[:3] == pytest.approx([0.4, 0.32, 0.256], abs=0.01)
    # honest customers climb from the prior (Multi-Krum may drop one of them once n - f < honest)
    honest = [history[d.node_id][-1]["reputation"] for d in w.devices[1:]]
    assert min(honest) > 0.6 and att[-1] < 0.3
    # rewards: the attacker (never kept by Multi-Krum) got nothing; everything paid sums to the pool
    paid = {c["customer"]: int(c["reward_wei"]) for c in w.coord.rewards(spec.task_id)["customers"]}
    assert paid.get(attacker.node_id, 0) == 0
    assert sum(paid.values()) == POOL
    # each customer claims its settled rewards with a proof, once per round
    for r in range(1, 5):
        for node in w.payouts:
            leaf = w.coord.claim_proof(spec.task_id, r, node)
            if leaf is not None:
                contracts.claim(tid, r, bytes.fromhex(node), leaf["reputation_milli"], int(leaf["amount_wei"]), [bytes.fromhex(p) for p in leaf["proof"]])
    for node, pay in w.payouts.items():
        assert contracts.client.balance(pay) == paid.get(node, 0)
    # the chain mirrors the latest reputation of everyone scored
    last = w.coord.reputations(spec.task_id, 4)
    assert contracts.reputation_of(bytes.fromhex(w.devices[1].node_id)) == round(last[w.devices[1].node_id] * 1000) / 1000
    assert contracts.reputation_of(bytes.fromhex(attacker.node_id)) == round(w.coord.reputations(spec.task_id, 3)[attacker.node_id] * 1000) / 1000
    assert sorted(contracts.settled_rounds(tid)) == [1, 2, 3, 4]
    assert contracts.task(tid).pool_wei == 0
    # nothing is sent twice
    assert w.coord.anchor_pending() == []
    assert sorted(contracts.settled_rounds(tid)) == [1, 2, 3, 4]
    rounds = w.coord.rounds(spec.task_id)
    assert all(r["status"] == "anchored" and r["settled"] and r["credit_tx"] for r in rounds)

    report = audit_model(contracts, w.store, rounds[-1]["model_hash"])
    assert report.ok, "\n".join(report.lines())
    assert [r.selected for r in report.rounds] == [len(s) for s in selections]
    assert any(u.score is not None and u.score < 0.2 for u in report.rounds[0].updates)
    assert "settled on chain (tx" in "\n".join(report.lines())


def test_audit_catches_a_forged_ledger(contracts: CrowdContracts, tmp_path: Path) -> None:
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=4)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    rs = w.coord.open_round(spec.task_id, 1)
    for i, node in enumerate(rs.selected):
        w.coord.receive_update(update_env(w.edge, spec, 1, node, rs.global_model_hash, 0.05, i + 1))
    summary = w.coord.close_round(spec.task_id, 1)
    w.coord.anchor_pending()
    assert audit_model(contracts, w.store, summary.model_hash).ok
    ledger_hash = w.coord.rounds(spec.task_id)[0]["ledger_hash"]
    # rewrite the stored ledger in place (the address no longer matches): reported as altered
    path = w.store.path(ledger_hash)
    path.write_bytes(path.read_bytes().replace(b'"rewards":{', b'"rewards":{"00":"1",'))
    report = audit_model(contracts, w.store, summary.model_hash)
    assert not report.ok and any("ledger" in p for r in report.rounds for p in r.problems)


def test_selection_caps_the_round_and_is_reproducible(contracts: CrowdContracts, tmp_path: Path) -> None:
    policy = LedgerPolicy(ReputationConfig(newcomer_share=0.25), max_participants=4)
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=10, policy=policy)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial)
    rs = w.coord.open_round(spec.task_id, 1)
    assert len(rs.selected) == 4 and set(rs.selected) <= {d.node_id for d in w.devices}
    assert list(rs.selected) == w.coord.select(spec.task_id, 1)  # public seed: anyone redoes the draw
    assert selection_seed(spec.task_id, 1) != selection_seed(spec.task_id, 2)
    # an update from a customer that was not drawn is refused with the reason
    outsider = next(d for d in w.devices if d.node_id not in rs.selected)
    got = w.coord.receive_update(update_env(w.edge, spec, 1, outsider.node_id, rs.global_model_hash, 0.05, 1))
    assert (got.http_status, got.detail) == (422, "not_selected")
