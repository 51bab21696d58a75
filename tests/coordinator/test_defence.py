"""The defences of coordinator/defence.py and the trust reputation / rewards of reputation.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from coordinator.aggregation import weights_digest
from coordinator.defence import TRUST_MEAN, DefenceConfig, defend, guard
from coordinator.reputation import (
    TrustReputationConfig,
    contribution_rewards,
    standing,
    trust_round_scores,
    update_trust_reputations,
)

SHAPES = [(8, 4), (4,), (4, 3), (3,)]


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]


def _world(seed: int = 0, honest: int = 14) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    """A base model, a reference (base + direction) and honest updates noisy around the direction."""
    rng = np.random.default_rng(seed)
    base = _model(rng)
    direction = [rng.normal(0, 0.1, s) for s in SHAPES]
    reference = [(b + d).astype(np.float32) for b, d in zip(base, direction)]
    ups = [[(b + d + rng.normal(0, 0.1, s)).astype(np.float32) for b, d, s in zip(base, direction, SHAPES)] for _ in range(honest)]
    return base, reference, ups


def _delta(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([(x.astype(np.float64) - y).ravel() for x, y in zip(a, b)])


@pytest.mark.parametrize("rule", [TRUST_MEAN, "coordinate_median"])
def test_inner_product_manipulation_gets_no_weight(rule: str) -> None:
    base, ref, honest = _world()
    mean = [np.mean([u[j] - base[j] for u in honest], axis=0) for j in range(4)]
    ipm = [(b - 4.0 * m).astype(np.float32) for b, m in zip(base, mean)]
    ups = honest + [ipm] * 6  # 30 % attackers
    d = defend(base, ups, [100] * 20, ref, [1.0] * 20, DefenceConfig(rule=rule))
    assert (d.trust[14:] == 0).all() and (d.weight[14:] == 0).all()
    assert set(d.admitted) <= set(range(14))
    clean = defend(base, honest, [100] * 14, ref, [1.0] * 14, DefenceConfig(rule=rule))
    assert weights_digest(d.aggregate.weights) == weights_digest(clean.aggregate.weights)
    step = _delta(d.aggregate.weights, base)
    assert float(step @ _delta(ref, base)) > 0  # the model still moves towards the clean reference


def test_norm_is_bounded_by_the_median() -> None:
    base, ref, honest = _world()
    big = [(b + 100.0 * (u - b)).astype(np.float32) for b, u in zip(base, honest[0])]
    d = defend(base, [big, *honest[1:]], [1] * 14, ref, [1.0] * 14, DefenceConfig(clip_factor=2.0))
    assert d.norm_ratio[0] > 50 and d.clip_scale[0] < 0.05
    assert d.value[0] <= 0.05  # an oversized update also loses value in proportion
    norms = [np.linalg.norm(_delta(u, base)) for u in honest[1:]]
    assert np.linalg.norm(_delta(d.aggregate.weights, base)) <= 2.0 * np.median([np.linalg.norm(_delta(big, base)), *norms])


def test_identical_updates_are_down_weighted_not_independent_ones() -> None:
    base, ref, honest = _world()
    sybil = [(b + 0.5 * (r - b)).astype(np.float32) for b, r in zip(base, ref)]  # well aligned, but copied
    ups = honest + [sybil, [w.copy() for w in sybil], [w.copy() for w in sybil]]
    d = defend(base, ups, [1] * 17, ref, [1.0] * 17, DefenceConfig())
    assert (d.similarity[14:] == 1.0).all() and (d.weight[14:] == 0).all()
    assert (d.similarity_penalty[:14] == 1.0).all() and (d.weight[:14] > 0).all()


def test_free_rider_zero_update_is_worth_nothing() -> None:
    base, ref, honest = _world()
    d = defend(base, [*honest, [w.copy() for w in base]], [1] * 14 + [10**6], ref, [1.0] * 15, DefenceConfig())
    assert d.value[14] == 0 and d.weight[14] == 0 and 14 not in d.admitted


def test_probation_scales_weight_and_nothing_admitted_keeps_base() -> None:
    base, ref, honest = _world()
    d = defend(base, honest[:2], [1, 1], ref, [1.0, 0.5], DefenceConfig(rule=TRUST_MEAN))
    assert d.weight[1] == pytest.approx(0.5 * d.value[1], rel=1e-9)
    none = defend(base, honest[:2], [1, 1], ref, [0.0, 0.0], DefenceConfig())
    assert none.admitted == () and weights_digest(none.aggregate.weights) == weights_digest(base)


def test_deterministic_and_other_rules() -> None:
    base, ref, honest = _world(3)
    cfg = DefenceConfig(rule=TRUST_MEAN)
    a = defend(base, honest, [5] * 14, ref, [0.7] * 14, cfg)
    b = defend(base, [[w.copy() for w in u] for u in honest], [5] * 14, ref, [0.7] * 14, cfg)
    assert a.aggregate.digest() == b.aggregate.digest() and a.aggregate.rule == TRUST_MEAN
    assert a.aggregate.params["defence"] == cfg.to_json()
    assert DefenceConfig().rule == "coordinate_median"  # the default chosen on validation
    for rule, params in (("coordinate_median", {}), ("multi_krum", {"f": 3}), ("trimmed_mean", {"beta": 0.2})):
        r = defend(base, honest, [5] * 14, ref, [1.0] * 14, DefenceConfig(rule=rule), params)
        assert r.aggregate.rule in (rule, "multi_krum") and all(w.dtype == np.float32 for w in r.aggregate.weights)


def test_input_validation() -> None:
    base, ref, honest = _world()
    with pytest.raises(ValueError, match="standing"):
        defend(base, honest[:2], [1, 1], ref, [1.0, 1.5], DefenceConfig())
    with pytest.raises(ValueError, match="sample counts"):
        defend(base, honest[:2], [1], ref, [1.0, 1.0], DefenceConfig())
    bad = [w.copy() for w in honest[0]]
    bad[0][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        defend(base, [bad], [1], ref, [1.0], DefenceConfig())
    with pytest.raises(ValueError):
        DefenceConfig(rule="nope")
    with pytest.raises(ValueError):
        DefenceConfig(similarity_threshold=1.0)


def test_guard_refuses_a_clearly_worse_model_only() -> None:
    assert guard(0.60, 0.62, 0.05).publish
    refused = guard(0.40, 0.62, 0.05)
    assert not refused.publish and "previous model is kept" in refused.reason
    assert guard(float("nan"), 0.6, 0.05).publish


# --------------------------------------------------------------------------- reputation and rewards


def test_scores_from_the_trust_signal_relative_to_the_cohort() -> None:
    cfg = TrustReputationConfig()
    cos = np.array([0.1, 0.12, 0.08, 0.1, -0.1, 0.0, 0.1, 0.11, 0.09])
    pen = np.array([1, 1, 1, 1, 1, 1, 0.0, 1, 1])  # c6 is a duplicate
    s = trust_round_scores([f"c{i}" for i in range(9)], cos, pen, cfg)
    assert s["c1"] == 1.0 and s["c0"] == 1.0  # at or above the cohort's median
    # median 0.1, robust deviation max(1.4826 * 0.01, 0.02) = 0.02: 0.08 is one deviation below
    assert s["c2"] == pytest.approx(1 - 1 / cfg.spread)
    assert s["c4"] == 0.0  # reversed
    assert s["c5"] == 0.0  # a zero update
    assert s["c6"] == 0.0  # duplicate
    # late in a task every cosine is small: the same relative position scores the same
    late = trust_round_scores([f"c{i}" for i in range(9)], cos / 4, pen, replace(cfg, min_spread=0.005))
    assert late["c2"] == pytest.approx(s["c2"]) and late["c4"] == 0.0
    with pytest.raises(ValueError):
        TrustReputationConfig(spread=0.0)


def test_a_jittered_group_is_down_weighted_an_honest_neighbour_is_pardoned() -> None:
    """'A little is enough' with each attacker's own noise (Baruch et al. 2019): no two updates are
    duplicates, but each member has several close neighbours; honest updates do not."""
    base, ref, honest = _world(honest=14)
    rng = np.random.default_rng(5)
    centre = [np.mean([u[j] for u in honest], axis=0) for j in range(4)]
    spread = [np.std([u[j] for u in honest], axis=0) for j in range(4)]
    group = [[(c - 1.0 * sd + 0.6 * sd * rng.standard_normal(sd.shape)).astype(np.float32) for c, sd in zip(centre, spread)] for _ in range(6)]
    d = defend(base, honest + group, [1] * 20, ref, [1.0] * 20, DefenceConfig())
    assert (d.similarity[14:] < DefenceConfig().similarity_threshold).all()  # not duplicates
    assert (d.group_similarity[14:] >= DefenceConfig().group_full).all() and (d.weight[14:] == 0).all()
    assert (d.similarity_penalty[:14] > 0).all()


def test_reputation_earned_slowly_lost_fast_sudden_change_noticed() -> None:
    cfg = TrustReputationConfig()
    reps: dict[str, float] = {}
    for rnd in range(1, 4):
        reps = update_trust_reputations(reps, {"attacker": 0.0, "honest": 1.0}, cfg)
        if rnd == 2:
            assert reps["attacker"] < cfg.floor  # harmful: below the floor within 2 rounds
    assert reps["honest"] < 0.8  # earned slowly: three perfect rounds from the prior
    for _ in range(10):
        reps = update_trust_reputations(reps, {"sleeper": 1.0}, cfg)
    assert reps["sleeper"] > 0.95
    reps = update_trust_reputations(reps, {"sleeper": 0.0}, cfg)
    assert reps["sleeper"] <= cfg.prior * (1 - cfg.loss) + 1e-12  # earned trust does not shelter the switch
    reps = update_trust_reputations(reps, {"sleeper": 0.0}, cfg)
    assert reps["sleeper"] < cfg.floor
    # one unlucky honest round keeps a newcomer selectable
    assert update_trust_reputations({}, {"new": 0.0}, cfg)["new"] >= cfg.floor
    assert standing({}, ["new"], cfg) == [cfg.prior]


def test_rewards_pay_for_value_and_splitting_gains_nothing() -> None:
    cfg = TrustReputationConfig()
    pool = 10**6
    values = {"honest": 0.9, "other": 0.8, "rider": 0.0}
    stands = {"honest": 1.0, "other": 1.0, "rider": 1.0}
    samples = {"honest": 500, "other": 500, "rider": 768}
    pay = contribution_rewards(pool, values, stands, samples)
    assert pay["rider"] == 0 and sum(pay.values()) == pool
    # the same customer split into two identities: each half has half the samples, starts on probation
    split_values = {"honest_a": 0.9, "honest_b": 0.9, "other": 0.8}
    split_stand = {"honest_a": cfg.prior, "honest_b": cfg.prior, "other": 1.0}
    split = contribution_rewards(pool, split_values, split_stand, {"honest_a": 250, "honest_b": 250, "other": 500})
    assert split["honest_a"] + split["honest_b"] <= pay["honest"]
    # nobody useful: nothing is paid, the pool stays
    assert contribution_rewards(pool, {"a": 0.0}, {"a": 1.0}, {"a": 10}) == {"a": 0}


def test_alike_honest_updates_are_not_taken_for_a_group() -> None:
    """Little noise, much data: every honest update is close to every other. The group penalty is
    relative to the round's median, so nobody loses weight for agreeing with everyone."""
    rng = np.random.default_rng(2)
    base = _model(rng)
    direction = [rng.normal(0, 0.1, s) for s in SHAPES]
    ref = [(b + d).astype(np.float32) for b, d in zip(base, direction)]
    honest = [[(b + d * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, s)).astype(np.float32) for b, d, s in zip(base, direction, SHAPES)] for _ in range(10)]
    d = defend(base, honest, [1] * 10, ref, [1.0] * 10, DefenceConfig())
    assert (d.group_similarity > DefenceConfig().group_full).all()  # alike by the absolute threshold
    assert (d.similarity_penalty == 1.0).all() and len(d.admitted) == 10
