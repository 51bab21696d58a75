"""Reputation: round scores, decay, selection, reward split."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import aggregate
from coordinator.reputation import (
    ReputationConfig,
    closeness,
    distances_to,
    round_scores,
    score_round,
    select,
    split_rewards,
    update_reputations,
)

# --------------------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    config = ReputationConfig()
    assert (config.decay, config.prior, config.floor) == (0.8, 0.5, 0.3)
    assert config.newcomer_slots(10) == 2
    assert config.newcomer_slots(7) == 2  # 1.4 rounded up
    assert config.newcomer_slots(0) == 0
    assert ReputationConfig(newcomer_share=0.1).newcomer_slots(30) == 3  # not 4 from 3.0000000004
    bad: dict[str, float]
    for bad in (
        {"decay": 1.0},
        {"decay": -0.1},
        {"prior": 1.5},
        {"floor": float("nan")},
        {"newcomer_share": 2.0},
        {"kept_weight": -1.0},
        {"tolerance": 0.0},
        {"tolerance": float("inf")},
    ):
        with pytest.raises(ValueError):
            ReputationConfig(**bad)


# --------------------------------------------------------------------------- round scores


def test_closeness_normalises_by_the_median_distance() -> None:
    # median 2.5 -> ratios 0.4 0.8 1.2 4; tolerance 2 -> 1 1 1 (2/4)^2
    np.testing.assert_allclose(closeness([1, 2, 3, 10], 2.0), [1, 1, 1, 0.25])
    # doubling every distance changes nothing
    np.testing.assert_allclose(closeness([2, 4, 6, 20], 2.0), [1, 1, 1, 0.25])


def test_closeness_when_most_distances_are_zero() -> None:
    # median 0 -> scale = smallest positive distance 2 -> ratios 0 0 0 1 2; tolerance 1
    np.testing.assert_allclose(closeness([0, 0, 0, 2, 4], 1.0), [1, 1, 1, 1, 0.25])
    np.testing.assert_allclose(closeness([0, 0], 1.0), [1, 1])


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [float("nan")], [[1.0]]])
def test_closeness_rejects_bad_distances(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        closeness(bad, 2.0)


def test_round_scores_blend_verdict_and_closeness() -> None:
    config = ReputationConfig(kept_weight=0.5, tolerance=2.0)
    scores = round_scores([1, 2, 3, 10], [True, True, True, False], config)
    # 0.5 * kept + 0.5 * closeness(1, 1, 1, 0.25)
    np.testing.assert_allclose(scores, [1, 1, 1, 0.125])
    np.testing.assert_allclose(round_scores([1, 2, 3, 10], None, config), [1, 1, 1, 0.25])
    with pytest.raises(ValueError, match="3 keep flags for 4"):
        round_scores([1, 2, 3, 10], [True, True, True], config)


def test_distances_to_reference() -> None:
    updates = [[np.array([3.0, 0.0], np.float32), np.array([4.0])], [np.zeros(2), np.zeros(1)]]
    reference = [np.zeros(2), np.zeros(1)]
    np.testing.assert_allclose(distances_to(updates, reference), [5.0, 0.0])
    with pytest.raises(ValueError, match="update 0"):
        distances_to([[np.zeros(3), np.zeros(1)]], reference)


def test_score_round_uses_the_krum_verdict() -> None:
    updates = [[np.array([v], np.float32)] for v in (0.0, 1.0, 2.0, 3.0, 10.0)]
    ids = ["a", "b", "c", "d", "evil"]
    config = ReputationConfig()
    krum = aggregate("multi_krum", updates, [1] * 5, f=1)  # keeps a-d, mean 1.5
    scores = score_round(ids, updates, krum, config)
    # distances 1.5 .5 .5 1.5 8.5, median 1.5 -> ratios 1 1/3 1/3 1 17/3; evil rejected:
    # 0.5 * 0 + 0.5 * (2 / (17/3))^2 = 0.5 * 36/289
    assert scores == pytest.approx({"a": 1, "b": 1, "c": 1, "d": 1, "evil": 18 / 289})
    median = aggregate("coordinate_median", updates, [1] * 5)  # 2; verdict not used
    # distances 2 1 0 1 8, median 1 -> ratios 2 1 0 1 8 -> evil (2/8)^2
    assert score_round(ids, updates, median, config)["evil"] == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="not unique"):
        score_round(["a"] * 5, updates, krum, config)
    with pytest.raises(ValueError, match="4 customer ids for 5"):
        score_round(ids[:4], updates, krum, config)


# --------------------------------------------------------------------------- history


def test_update_reputations_decays_and_starts_newcomers_at_prior() -> None:
    config = ReputationConfig(decay=0.8, prior=0.5)
    new = update_reputations({"a": 1.0, "c": 0.4}, {"a": 0.0, "b": 1.0}, config)
    # a: 0.8*1 + 0.2*0 = 0.8; b: 0.8*0.5 + 0.2*1 = 0.6; c absent: unchanged
    assert new == pytest.approx({"a": 0.8, "b": 0.6, "c": 0.4})
    assert list(new) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="score of 'a'"):
        update_reputations({}, {"a": 1.5}, config)


def test_always_rejected_attacker_falls_below_floor_within_three_rounds() -> None:
    config = ReputationConfig()
    rng = np.random.default_rng(7)
    honest = [f"h{i}" for i in range(9)]
    ids = [*honest, "attacker"]
    reputations: dict[str, float] = {}
    history = []
    for _ in range(6):
        updates = [[rng.normal(0.0, 0.1, 20).astype(np.float32)] for _ in honest]
        updates.append([rng.normal(5.0, 0.1, 20).astype(np.float32)])
        result = aggregate("multi_krum", updates, [100] * 10, f=2)
        assert 9 not in result.kept
        scores = score_round(ids, updates, result, config)
        reputations = update_reputations(reputations, scores, config)
        history.append(reputations["attacker"])
    # 0.5 -> ~0.40 -> ~0.32 -> ~0.26
    assert history[2] < config.floor
    assert all(b < a for a, b in itertools.pairwise(history))
    assert min(reputations[h] for h in honest) > config.floor
    for seed in range(20):
        picked = select(reputations, ids, 10, config.floor, 0, np.random.default_rng(seed))
        assert "attacker" not in picked and len(picked) == 9


# --------------------------------------------------------------------------- selection


def test_select_reserves_newcomer_slots_and_applies_the_floor() -> None:
    reputations = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "low": 0.1}
    candidates = ["a", "b", "c", "d", "low", "n1", "n2", "n3"]
    picked = select(reputations, candidates, 4, 0.3, 2, np.random.default_rng(0))
    assert len(picked) == 4 and list(picked) == sorted(picked)
    assert sum(p.startswith("n") for p in picked) == 2
    assert "low" not in picked
    # newcomers are not held to the floor, and unfilled veteran slots go to them
    picked = select({"low": 0.1}, ["low", "n1", "n2"], 3, 0.3, 1, np.random.default_rng(0))
    assert picked == ("n1", "n2")
    # unused newcomer slots go to veterans
    picked = select(reputations, ["a", "b", "c", "n1"], 3, 0.3, 2, np.random.default_rng(0))
    assert "n1" in picked and len(picked) == 3
    # only candidates count
    assert select(reputations, [], 3, 0.3, 1, np.random.default_rng(0)) == ()
    assert select(reputations, ["a"], 0, 0.3, 1, np.random.default_rng(0)) == ()


def test_select_is_deterministic_for_a_seed() -> None:
    reputations = {f"c{i:02d}": (i + 1) / 40 for i in range(40)}
    candidates = [*reversed(reputations), "new1", "new2", "new3"]
    runs = {select(reputations, candidates, 8, 0.3, 2, np.random.default_rng(42)) for _ in range(3)}
    assert len(runs) == 1
    # candidate order does not matter either
    shuffled = sorted(candidates)
    assert select(reputations, shuffled, 8, 0.3, 2, np.random.default_rng(42)) in runs


def test_select_draws_in_proportion_to_reputation() -> None:
    rng = np.random.default_rng(1)
    counts = Counter(
        select({"hi": 0.9, "lo": 0.3}, ["hi", "lo"], 1, 0.3, 0, rng)[0] for _ in range(4000)
    )
    assert counts["hi"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_select_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not unique"):
        select({}, ["a", "a"], 1, 0.3, 0, rng)
    with pytest.raises(ValueError, match="k must be"):
        select({}, ["a"], -1, 0.3, 0, rng)
    with pytest.raises(ValueError, match="floor"):
        select({}, ["a"], 1, 1.3, 0, rng)
    with pytest.raises(ValueError, match="reputation of 'a'"):
        select({"a": 2.0}, ["a"], 1, 0.3, 0, rng)


# --------------------------------------------------------------------------- rewards


def test_split_rewards_exact_quotas() -> None:
    shares = split_rewards(100, {"a": 1.0, "b": 0.5, "c": 0.5}, {"a": 1, "b": 1, "c": 1})
    assert shares == {"a": 50, "b": 25, "c": 25}


def test_split_rewards_largest_remainder() -> None:
    # quotas 7/3 = 2.33 and 14/3 = 4.67: floors 2 + 4, the leftover unit goes to b
    assert split_rewards(7, {"a": 1.0, "b": 1.0}, {"a": 1, "b": 2}) == {"a": 2, "b": 5}
    # three equal remainders of 1/3: the smallest id gets the unit
    assert split_rewards(10, {"c": 1.0, "b": 1.0, "a": 1.0}, {"c": 1, "b": 1, "a": 1}) == {
        "a": 4,
        "b": 3,
        "c": 3,
    }
    # reputation and samples multiply: weights 0.5*300 = 150, 1.0*50 = 50 -> 3/4, 1/4
    assert split_rewards(10**18, {"a": 0.5, "b": 1.0}, {"a": 300, "b": 50}) == {
        "a": 750_000_000_000_000_000,
        "b": 250_000_000_000_000_000,
    }


def test_split_rewards_edge_cases() -> None:
    assert split_rewards(0, {"a": 0.0}, {"a": 5}) == {"a": 0}
    assert split_rewards(9, {"a": 0.0, "b": 0.2}, {"a": 5, "b": 1}) == {"a": 0, "b": 9}
    with pytest.raises(ValueError, match="no contributor"):
        split_rewards(9, {"a": 0.0}, {"a": 5})
    with pytest.raises(ValueError, match="no reputation for customer 'b'"):
        split_rewards(9, {"a": 0.5}, {"a": 5, "b": 1})
    with pytest.raises(ValueError, match="pool"):
        split_rewards(-1, {"a": 0.5}, {"a": 5})
    with pytest.raises(ValueError, match="pool"):
        split_rewards(1.5, {"a": 0.5}, {"a": 5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contribution of 'a'"):
        split_rewards(9, {"a": 0.5}, {"a": -5})
    with pytest.raises(ValueError, match="reputation of 'a'"):
        split_rewards(9, {"a": float("nan")}, {"a": 5})


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**27),
    st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=3),
        st.tuples(st.floats(0, 1), st.integers(0, 10**6)),
        min_size=1,
        max_size=12,
    ),
)
def test_rewards_sum_exactly_to_the_pool(pool: int, table: dict[str, tuple[float, int]]) -> None:
    reputations = {cid: rep for cid, (rep, _) in table.items()}
    contributions = {cid: samples for cid, (_, samples) in table.items()}
    weights = {cid: rep * samples for cid, (rep, samples) in table.items()}
    if pool > 0 and not any(w > 0 for w in weights.values()):
        with pytest.raises(ValueError):
            split_rewards(pool, reputations, contributions)
        return
    shares = split_rewards(pool, reputations, contributions)
    assert sum(shares.values()) == pool
    assert set(shares) == set(table)
    assert all(s >= 0 for s in shares.values())
    assert all(shares[cid] == 0 for cid, w in weights.items() if w == 0)
    # nobody is more than one unit away from the exact proportional quota
    total = sum(weights.values())
    if total > 0:
        for cid, w in weights.items():
            assert abs(shares[cid] - pool * w / total) <= 1 + pool * 1e-9
    # deterministic, whatever the insertion order
    again = split_rewards(
        pool, dict(reversed(reputations.items())), dict(reversed(contributions.items()))
    )
    assert again == shares
