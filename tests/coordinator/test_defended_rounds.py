"""Defended rounds in the coordinator's loop: reference update, trust scores, probation, rewards by
value, the publication guard, and the audit re-running all of it from chain + store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.audit import audit_model
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts
from coordinator.ledger import selection_seed
from coordinator.reference import RootData, reference_model
from crowdfl.backmodel import initial_back_weights
from crowdfl.envelope import seal
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundManifest
from tests.coordinator.world import FRONT, KEYS, make_world, task_parts
from tests.helpers import update_receipt

POOL = 3 * 1_000_000


@pytest.fixture
def contracts() -> CrowdContracts:
    return CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))


def _root(spec, n: int = 256, seed: int = 0) -> RootData:  # type: ignore[no-untyped-def]
    """A learnable root dataset: the class is which quarter of the feature sum a sample falls in."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, spec.feature_dim)).astype(np.float32)
    y = np.digitize(x[:, :2].sum(axis=1), [0.5, 1.0, 1.5]).astype(np.int64)
    return RootData(x, y)


def _envelope(w, spec, round_: int, customer: str, base: str, weights, seq: int, samples: int = 10) -> bytes:  # type: ignore[no-untyped-def]
    # the device's signed receipt for its samples, as every update must carry (crowdfl/receipts.py)
    receipt = update_receipt(KEYS[customer], spec.task_id, round_, w.edge.node_id, samples, epsilon=spec.epsilon)
    mu = ModelUpdate(spec.task_id, round_, customer, base, tuple(np.asarray(x, np.float32) for x in weights), samples, "ab" * 32, 0.1, receipt)
    return seal(CODEC.encode(mu), w.edge, seq)


def _run(w, spec, root: RootData, rounds: int, attackers: set[str], riders: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
    seq = 0
    manifests = []
    for r in range(1, rounds + 1):
        rs = w.coord.open_round(spec.task_id, r)
        base = [np.asarray(x, np.float32) for x in CODEC.decode(w.store.get(rs.global_model_hash), ModelWeights).weights]
        ref = reference_model(base, root, spec, selection_seed(spec.task_id, r) % 2**31, samples=len(root.labels))
        rng = np.random.default_rng(r)
        for node in rs.selected:
            seq += 1
            step = [rf - b for rf, b in zip(ref, base)]
            if node in attackers:  # inner-product manipulation against the (clean) direction
                weights = [b - 4.0 * s for b, s in zip(base, step)]
            elif node in riders:
                weights = [b.copy() for b in base]
            else:
                weights = [b + s * rng.uniform(0.5, 1.5) + rng.normal(0, 0.3 * float(np.abs(s).mean()) + 1e-6, b.shape) for b, s in zip(base, step)]
            samples = spec.samples_per_round if node in attackers | riders else 40  # the most one batch may claim
            got = w.coord.receive_update(_envelope(w, spec, r, node, rs.global_model_hash, weights, seq, samples))
            assert got.status == "received", got
        manifests.append(w.coord.close_round(spec.task_id, r).manifest_hash)
        w.coord.anchor_pending()
    return manifests


def test_defended_rounds_exclude_attackers_pay_useful_work_and_replay(contracts: CrowdContracts, tmp_path: Path, db_url: str) -> None:
    w = make_world(contracts, db_url, tmp_path, devices=10)
    spec, initial = task_parts(rounds=3, aggregation="multi_krum", local_epochs=2)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=POOL)
    root = _root(spec)
    w.coord.roots[spec.task_id] = root
    attackers = {d.node_id for d in w.devices[:3]}  # 30 %
    riders = {w.devices[3].node_id}
    manifests = _run(w, spec, root, 3, attackers, riders)

    m1 = CODEC.decode(w.store.get(manifests[0]), RoundManifest)
    params = json.loads(m1.rule_params)
    assert m1.rule == "coordinate_median" and params["defence"]["rule"] == "coordinate_median"  # the default
    assert w.store.has(params["reference"])  # the reference is stored: anyone can re-run the defences
    assert params["standing"] == [0.6] * 10  # everyone a newcomer on probation in round 1
    history = w.coord.reputation_history(spec.task_id)
    for node in attackers | riders:
        # harmful attackers and free riders: below the 0.3 floor after two rounds, out of round 3
        assert history[node][1]["reputation"] < 0.3
        assert not history[node][-1]["selected"] or history[node][-1]["round"] < 3
    honest = [d.node_id for d in w.devices[4:]]
    # scores are relative to the round's cohort, so an honest update below the median one earns a
    # little less: every honest customer stays well above the floor, and on average rises
    final = [history[h][-1]["reputation"] for h in honest]
    assert min(final) > 0.5 and float(np.mean(final)) > 0.6
    paid = {c["customer"]: int(c["reward_wei"]) for c in w.coord.rewards(spec.task_id)["customers"]}
    assert sum(paid.get(n, 0) for n in attackers | riders) == 0
    assert sum(paid.values()) == POOL  # claiming the most samples buys nothing without useful work

    rounds = w.coord.rounds(spec.task_id)
    report = audit_model(contracts, w.store, rounds[-1]["model_hash"])
    assert report.ok, "\n".join(report.lines())


def test_guard_keeps_the_previous_model_and_says_why(contracts: CrowdContracts, tmp_path: Path, db_url: str) -> None:
    w = make_world(contracts, db_url, tmp_path, devices=5)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=1000)
    root = _root(spec)
    w.coord.roots[spec.task_id] = root
    start = CODEC.decode(w.store.get(spec.initial_model_hash), ModelWeights).weights
    # a validation set on which only the previous model is any good: every candidate is "clearly worse"
    w.coord.evaluators[spec.task_id] = lambda weights: 0.8 if all(np.array_equal(a, b) for a, b in zip(weights, start)) else 0.3
    (manifest_hash,) = _run(w, spec, root, 1, set(), set())
    m = CODEC.decode(w.store.get(manifest_hash), RoundManifest)
    g = json.loads(m.rule_params)["guard"]
    assert g["publish"] is False and "previous model is kept" in g["reason"]
    assert g["candidate_accuracy"] == 0.3 and g["previous_accuracy"] == 0.8
    model = CODEC.decode(w.store.get(m.model_hash), ModelWeights)
    assert all(np.array_equal(a, b) for a, b in zip(model.weights, initial_back_weights(spec, 1)))
    assert m.accepted == () and all(r.endswith(":guard_refused") for r in m.rejected)
    report = audit_model(contracts, w.store, m.model_hash)
    assert report.ok, "\n".join(report.lines())
    # rewards still follow the measured value of the customers' work
    paid = {c["customer"]: int(c["reward_wei"]) for c in w.coord.rewards(spec.task_id)["customers"]}
    assert sum(paid.values()) == 1000
