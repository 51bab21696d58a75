"""Aggregation rules: hand-computed cases, properties, malformed input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.aggregation import (
    AggregationResult,
    AggregationRule,
    aggregate,
    coordinate_median,
    fedavg,
    krum,
    multi_krum,
    trimmed_mean,
    weights_digest,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def scalars(*values: float) -> list[list[np.ndarray]]:
    """One single-parameter model per value."""
    return [[f32(v)] for v in values]


# --------------------------------------------------------------------------- hand-computed


def test_fedavg_weights_by_samples() -> None:
    updates = [[f32(1, 2), f32(0)], [f32(3, 6), f32(4)]]
    result = fedavg(updates, [1, 3])
    # (1*1 + 3*3) / 4 = 2.5, (2*1 + 6*3) / 4 = 5, (0*1 + 4*3) / 4 = 3
    np.testing.assert_array_equal(result.weights[0], f32(2.5, 5.0))
    np.testing.assert_array_equal(result.weights[1], f32(3.0))
    assert result.kept == (0, 1)
    assert result.scores is None
    assert result.rule == "fedavg"


def test_coordinate_median_odd_and_even() -> None:
    three = [[f32(1, 10)], [f32(2, -5)], [f32(9, 0)]]
    np.testing.assert_array_equal(coordinate_median(three).weights[0], f32(2, 0))
    four = [*three, [f32(4, 3)]]
    # sorted columns: 1 2 4 9 -> (2+4)/2 = 3;  -5 0 3 10 -> (0+3)/2 = 1.5
    np.testing.assert_array_equal(coordinate_median(four).weights[0], f32(3, 1.5))


def test_trimmed_mean_cuts_floor_beta_n_from_each_end() -> None:
    updates = [[f32(v, w)] for v, w in [(1, -50), (2, 0), (3, 1), (4, 2), (100, 3)]]
    # beta 0.2, n 5: cut 1 each end -> mean(2,3,4) = 3; mean(0,1,2) = 1
    result = trimmed_mean(updates, 0.2)
    np.testing.assert_array_equal(result.weights[0], f32(3, 1))
    assert result.params == {"beta": 0.2}
    # beta 0.1, n 5: int(0.5) = 0 cut -> plain mean: 110/5 = 22; -44/5 = -8.8
    np.testing.assert_array_equal(trimmed_mean(updates, 0.1).weights[0], f32(22, -8.8))


def test_multi_krum_scalar_case() -> None:
    updates = scalars(0, 1, 2, 3, 10)
    # f = 1: n - f - 2 = 2 nearest; squared distances give scores
    # 0: 1+4=5, 1: 1+1=2, 2: 1+1=2, 3: 1+4=5, 10: 49+64=113
    result = multi_krum(updates, [1, 2, 3, 4, 100], f=1)
    np.testing.assert_array_equal(result.scores, [5, 2, 2, 5, 113])
    assert result.kept == (0, 1, 2, 3)  # default m = n - f = 4
    # (0*1 + 1*2 + 2*3 + 3*4) / (1+2+3+4) = 20/10
    np.testing.assert_array_equal(result.weights[0], f32(2.0))
    assert result.rule == "multi_krum" and result.params == {"f": 1, "m": 4}


def test_multi_krum_breaks_ties_by_index() -> None:
    updates = scalars(0, 1, 2, 3, 10)
    samples = [1] * 5
    assert multi_krum(updates, samples, f=1, m=2).kept == (1, 2)
    # 0 and 3 tie at 5 for the third place: the lower index wins
    assert multi_krum(updates, samples, f=1, m=3).kept == (0, 1, 2)
    single = krum(updates, samples, f=1)  # 1 and 2 tie at 2
    assert single.kept == (1,) and single.rule == "krum" and single.params == {"f": 1}
    np.testing.assert_array_equal(single.weights[0], f32(1.0))


def test_multi_krum_two_layers() -> None:
    points = [(0, 0), (1, 0), (0, 1), (1, 1), (5, 5)]
    updates = [[f32(x), f32(y)] for x, y in points]
    # squared distances: 0-1 1, 0-2 1, 0-3 2, 1-2 2, 1-3 1, 2-3 1, 0-4 50, 1-4 41, 2-4 41, 3-4 32
    # two nearest: 2, 2, 2, 2 and 32 + 41 = 73 for (5, 5)
    result = multi_krum(updates, [1] * 5, f=1)
    np.testing.assert_array_equal(result.scores, [2, 2, 2, 2, 73])
    assert result.kept == (0, 1, 2, 3)
    np.testing.assert_array_equal(result.weights[0], f32(0.5))
    np.testing.assert_array_equal(result.weights[1], f32(0.5))


def test_aggregate_dispatches_and_replays() -> None:
    updates = scalars(0, 1, 2, 3, 10)
    samples = [1, 2, 3, 4, 5]
    cases: list[tuple[str, dict[str, Any]]] = [
        ("fedavg", {}),
        (AggregationRule.KRUM, {"f": 1}),
        ("multi_krum", {"f": 1}),
        ("multi_krum", {"f": 1, "m": 2}),
        ("coordinate_median", {}),
        ("trimmed_mean", {"beta": 0.2}),
    ]
    for rule, params in cases:
        result = aggregate(rule, updates, samples, **params)
        assert isinstance(result, AggregationResult)
        assert result.rule == AggregationRule(rule).value or result.rule == "krum"
        again = aggregate(result.rule, updates, samples, **result.params)
        assert again.digest() == result.digest()
        assert again.kept == result.kept


def test_output_dtype_follows_each_layer() -> None:
    updates: list[list[np.ndarray]] = [
        [np.array([1.0, 2.0], np.float32), np.array([[1.0]], np.float64)],
        [np.array([2.0, 3.0], np.float32), np.array([[4.0]], np.float64)],
    ]
    result = fedavg(updates, [1, 1])
    assert [w.dtype for w in result.weights] == [np.float32, np.float64]
    assert [w.shape for w in result.weights] == [(2,), (1, 1)]
    assert not result.weights[0].flags.writeable


def test_fedavg_accumulates_in_the_layer_dtype_in_index_order() -> None:
    # float32 layer: w = n_i / sum(n) rounded to float32, then acc += x_i * w_i, update by update
    rows = [f32(2.0**24, 3.0), f32(1.0, -7.5), f32(1.0, 0.25)]
    result = fedavg([[r] for r in rows], [5, 1, 2])
    w = (np.array([5.0, 1.0, 2.0]) / 8.0).astype(np.float32)
    expected = np.zeros(2, np.float32)
    for x, wi in zip(rows, w):
        expected = expected + x * wi
    assert result.weights[0].tobytes() == expected.tobytes()
    np.testing.assert_allclose(result.weights[0], [(5 * 2.0**24 + 3) / 8, (15 - 7.5 + 0.5) / 8], rtol=1e-6)


def test_fedavg_falls_back_to_float64_when_float32_overflows() -> None:
    big = np.finfo(np.float32).max
    result = fedavg([[f32(big, 1.0)], [f32(big, 3.0)]], [1, 1])
    assert result.weights[0][0] == np.float32(big) and result.weights[0][1] == np.float32(2.0)


def test_negative_zero_is_normalised() -> None:
    result = coordinate_median([[f32(-0.0)], [f32(-0.0)], [f32(0.0)]])
    assert not np.signbit(result.weights[0][0])


def test_digest_depends_on_values_dtype_and_shape() -> None:
    a = [np.zeros(2, np.float32)]
    assert weights_digest(a) == weights_digest([np.zeros(2, np.float32)])
    assert weights_digest(a) != weights_digest([np.zeros(2, np.float64)])
    assert weights_digest(a) != weights_digest([np.zeros((1, 2), np.float32)])
    assert weights_digest(a) != weights_digest([f32(0, 1e-30)])
    big_endian = np.zeros(2, np.dtype(">f4"))
    assert weights_digest(a) == weights_digest([big_endian])


def test_rules_leave_the_inputs_alone() -> None:
    # One column is the case where a transposed view is already contiguous.
    for width in (1, 3):
        updates = [[np.full(width, v, np.float32)] for v in (3.0, -1.0, 7.0, 0.0, 2.0)]
        before = [u[0].copy() for u in updates]
        cases: list[tuple[str, dict[str, Any]]] = [
            ("fedavg", {}),
            ("multi_krum", {"f": 1}),
            ("coordinate_median", {}),
            ("trimmed_mean", {"beta": 0.2}),
        ]
        for rule, params in cases:
            aggregate(rule, updates, [1] * 5, **params)
            for u, b in zip(updates, before, strict=True):
                np.testing.assert_array_equal(u[0], b)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("updates", "samples", "message"),
    [
        ([], [], "no updates"),
        ([[]], [1], "no layers"),
        ([[f32()]], [1], "no parameters"),
        ([[f32(1)], [f32(1, 2)]], [1, 1], "update 1 layer 0"),
        ([[f32(1)], [f32(1), f32(2)]], [1, 1], "update 1 has 2 layers"),
        ([[f32(1)], [np.array([1.0])]], [1, 1], "update 1 layer 0"),
        ([[np.array([1, 2])]], [1], "not a float dtype"),
        ([[f32(1)], [f32(1)], [f32(np.nan)]], [1, 1, 1], "update 2 layer 0 contains NaN or Inf"),
        ([[f32(1)], [f32(1), f32(np.inf)]], [1, 1], "update 1 has 2 layers"),
        ([[f32(1), f32(2)], [f32(1), f32(-np.inf)]], [1, 1], "update 1 layer 1 contains NaN"),
        ([[f32(1)], [f32(1)]], [1], "1 sample counts for 2 updates"),
        ([[f32(1)], [f32(1)]], [1, 0], "update 1: sample count 0"),
        ([[f32(1)], [f32(1)]], [1, -3], "update 1: sample count -3"),
        ([[f32(1)], [f32(1)]], [1, 2.5], "not an integer"),
        ([[f32(1)], [f32(1)]], [True, 1], "not an integer"),
    ],
)
def test_fedavg_rejects_malformed_input(
    updates: list[list[np.ndarray]], samples: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fedavg(updates, samples)


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        multi_krum(scalars(0, 1, 2, 3), [1] * 4, f=1)
    with pytest.raises(ValueError, match="at most n - f = 4"):
        multi_krum(scalars(0, 1, 2, 3, 4), [1] * 5, f=1, m=5)
    with pytest.raises(ValueError, match="m must be an integer >= 1"):
        multi_krum(scalars(0, 1, 2, 3, 4), [1] * 5, f=1, m=0)
    with pytest.raises(ValueError, match="f must be"):
        multi_krum(scalars(0, 1, 2, 3, 4), [1] * 5, f=-1)


def test_non_finite_rejected_by_every_rule() -> None:
    updates = scalars(0, 1, 2, 3, 4)
    updates[3] = [f32(np.nan)]
    calls: list[Callable[[], AggregationResult]] = [
        lambda: multi_krum(updates, [1] * 5, f=1),
        lambda: coordinate_median(updates),
        lambda: trimmed_mean(updates, 0.2),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="update 3 layer 0 contains NaN"):
            call()


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan"), "0.1"])
def test_trimmed_mean_rejects_bad_beta(beta: object) -> None:
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(scalars(1, 2, 3), beta)  # type: ignore[arg-type]


def test_aggregate_rejects_unknown_rule_and_params() -> None:
    updates = scalars(0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown aggregation rule 'mean'"):
        aggregate("mean", updates, [1] * 5)
    with pytest.raises(ValueError, match="missing \\['f'\\]"):
        aggregate("multi_krum", updates, [1] * 5)
    with pytest.raises(ValueError, match="unexpected \\['beta'\\]"):
        aggregate("fedavg", updates, [1] * 5, beta=0.1)
    with pytest.raises(ValueError, match="sample count 0"):
        aggregate("coordinate_median", updates, [1, 1, 1, 1, 0])


def test_overflow_is_reported() -> None:
    huge = np.finfo(np.float64).max
    # fedavg adds x_i * (n_i / sum n): the running sum stays within the inputs' range
    assert fedavg([[np.array([huge])], [np.array([huge])]], [1, 1]).weights[0][0] == huge
    # the median of two huge values is still representable
    result = coordinate_median([[np.array([huge])], [np.array([huge])]])
    assert result.weights[0][0] == huge


def test_krum_with_huge_float64_updates() -> None:
    updates = [[np.array([v * 1e300])] for v in (100.0, 0.0, 1.0, 2.0, 3.0)]
    result = multi_krum(updates, [1] * 5, f=1)
    assert result.kept == (1, 2, 3, 4)  # ranked on rescaled scores, which stay finite
    assert result.scores is not None and np.isinf(result.scores).all()  # 1e600 overflows
    np.testing.assert_allclose(result.weights[0], [1.5e300])


# --------------------------------------------------------------------------- properties


def models(n_min: int = 1, n_max: int = 9) -> st.SearchStrategy[tuple[np.ndarray, int]]:
    """(n x p float32 matrix of modest finite values, split point for two layers)."""
    values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    return st.tuples(st.integers(n_min, n_max), st.integers(1, 6)).flatmap(
        lambda shape: st.tuples(
            hnp.arrays(np.float32, shape, elements=values), st.integers(0, shape[1])
        )
    )


def as_updates(matrix: np.ndarray, split: int) -> list[list[np.ndarray]]:
    return [[row[:split].copy(), row[split:].reshape(1, -1).copy()] for row in matrix]


def flat(result: AggregationResult) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in result.weights])


counts = st.lists(st.integers(1, 1000), min_size=9, max_size=9)


@settings(max_examples=60, deadline=None)
@given(models(), st.randoms(use_true_random=False), counts)
def test_permutation_invariance(
    data: tuple[np.ndarray, int], random: object, samples: list[int]
) -> None:
    matrix, split = data
    n = matrix.shape[0]
    perm = list(range(n))
    random.shuffle(perm)  # type: ignore[attr-defined]
    updates, shuffled = as_updates(matrix, split), as_updates(matrix[perm], split)
    samples = samples[:n]
    shuffled_samples = [samples[i] for i in perm]
    # order statistics are summed in sorted order: bit-exact
    for rule in (coordinate_median, lambda u: trimmed_mean(u, 0.25)):
        assert rule(updates).digest() == rule(shuffled).digest()
    # weighted sums depend on the order of the additions: equal up to rounding
    np.testing.assert_allclose(
        flat(fedavg(updates, samples)),
        flat(fedavg(shuffled, shuffled_samples)),
        rtol=1e-5,
        atol=1e-3,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2).flatmap(
        lambda f: st.tuples(
            st.just(f),
            hnp.arrays(
                np.float32,
                st.tuples(st.integers(2 * f + 3, 2 * f + 7), st.integers(1, 4)),
                elements=st.integers(-20, 20).map(float),
            ),
        )
    ),
    st.randoms(use_true_random=False),
)
def test_krum_scores_are_permutation_equivariant(
    data: tuple[int, np.ndarray], random: object
) -> None:
    # Small integers keep every distance exact, so scores must match exactly.
    f, matrix = data
    n = matrix.shape[0]
    perm = list(range(n))
    random.shuffle(perm)  # type: ignore[attr-defined]
    base = multi_krum(as_updates(matrix, 1), [1] * n, f)
    moved = multi_krum(as_updates(matrix[perm], 1), [1] * n, f)
    assert base.scores is not None and moved.scores is not None
    np.testing.assert_array_equal(moved.scores, base.scores[perm])
    ranked = np.sort(base.scores)
    m = n - f
    if m == n or ranked[m - 1] < ranked[m]:  # no tie at the cut: same set, same mean
        assert sorted(perm[i] for i in moved.kept) == list(base.kept)
        np.testing.assert_allclose(flat(moved), flat(base), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 8),
        elements=st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32),
    ),
    st.lists(st.integers(1, 10**9), min_size=1, max_size=8),
)
def test_fedavg_of_identical_updates_is_that_update(row: np.ndarray, samples: list[int]) -> None:
    updates = [[row.copy()] for _ in samples]
    out = fedavg(updates, samples).weights[0]
    # float32 accumulation: within a few ulps per update added (Flower's arithmetic, fixed order)
    np.testing.assert_allclose(out, row, rtol=(len(samples) + 2) * 2.0**-23, atol=1e-37)


@settings(max_examples=60, deadline=None)
@given(models(), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_median_and_trimmed_mean_stay_within_range(
    data: tuple[np.ndarray, int], beta: float
) -> None:
    matrix, split = data
    updates = as_updates(matrix, split)
    low, high = matrix.min(axis=0), matrix.max(axis=0)
    for result in (coordinate_median(updates), trimmed_mean(updates, beta)):
        out = flat(result)
        assert (low <= out).all() and (out <= high).all()
    if matrix.shape[0] % 2:
        median = flat(coordinate_median(updates))
        assert ((matrix == median).any(axis=0)).all()


@settings(max_examples=40, deadline=None)
@given(models())
def test_trimmed_mean_without_trim_is_the_mean(data: tuple[np.ndarray, int]) -> None:
    matrix, split = data
    out = flat(trimmed_mean(as_updates(matrix, split), 0.0))
    np.testing.assert_allclose(out, matrix.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 3).flatmap(
        lambda f: st.tuples(
            st.just(f),
            hnp.arrays(
                np.float32,
                st.tuples(st.integers(f + 3, f + 8), st.just(3)),
                elements=st.floats(-1, 1, width=32),
            ),
        )
    ),
    st.sampled_from(["spread", "colluding"]),
    st.data(),
)
def test_krum_ignores_f_far_away_outliers(
    data: tuple[int, np.ndarray], attack: str, draw: st.DataObject
) -> None:
    f, honest = data
    n = honest.shape[0] + f
    assume(n > 2 * f + 2)
    if attack == "spread":
        outliers = 1e4 * (np.arange(1, f + 1, dtype=np.float32)[:, None] + np.eye(f, 3))
    else:  # all outliers at (almost) one point, so they vouch for each other
        outliers = np.full((f, 3), 1e4, dtype=np.float32) + np.arange(f)[:, None] * 1e-3
    slots = draw.draw(st.permutations(range(n)))
    matrix = np.empty((n, 3), dtype=np.float32)
    honest_idx = sorted(slots[: honest.shape[0]])
    matrix[honest_idx] = honest
    matrix[sorted(slots[honest.shape[0] :])] = outliers.astype(np.float32)
    samples = draw.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n))
    result = multi_krum(as_updates(matrix, 1), samples, f)
    assert result.kept == tuple(honest_idx)
    out = flat(result)
    assert (honest.min(axis=0) <= out).all() and (out <= honest.max(axis=0)).all()


def test_fedavg_is_bit_for_bit_the_documented_loop() -> None:
    """The audit's replay needs fedavg to equal, bit for bit, the documented order of operations:
    per layer, in the layer's dtype, acc += x_i * w_i for i = 0, 1, 2, ... (w_i = n_i / sum n)."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 33):
        updates = [
            [rng.standard_normal((7, 3)).astype(np.float32) * 10.0 ** rng.integers(-3, 4), rng.standard_normal(5)]
            for _ in range(n)
        ]
        samples = [int(x) for x in rng.integers(1, 10_000, n)]
        share = np.array(samples, dtype=np.float64) / math.fsum(samples)
        out = fedavg(updates, samples)
        for j in range(2):
            dtype = updates[0][j].dtype
            acc = np.zeros(updates[0][j].shape, dtype)
            for i in range(n):
                acc = acc + updates[i][j] * share.astype(dtype)[i]
            a = out.weights[j]
            assert a.dtype == dtype and a.tobytes() == (acc + 0.0).tobytes()
            np.testing.assert_allclose(a, sum(u[j].astype(np.float64) * s for u, s in zip(updates, share)), rtol=1e-4, atol=1e-6)
