"""Robust aggregation rules: pure functions over the customers' model updates.

A model (and an update) is a sequence of arrays, one per layer tensor. Each rule stacks the n
updates into one n x P matrix (P = total parameter count, in the updates' own float dtype) so that
the arithmetic is vectorised, and hands back the same list-of-arrays layout.

Output contract (the coordinator's audit re-runs a rule and compares `weights_digest`s):

* every output layer has the dtype of that layer in the input (float32 in, float32 out);
* the robust rules' arithmetic is float64 (the input is widened exactly); the float64 result is
  then cast to the layer dtype, rounding to nearest (ties to even). FedAvg accumulates in each
  layer's own dtype, in place and in index order (see `fedavg`: the speed of Flower's float32
  FedAvg without its temporaries, its rounding fixed by the order). -0.0 is normalised to +0.0;
* no BLAS call lies on the path of an output value: weighted means add the rows one at a time in
  ascending update index, and medians / trimmed means read sorted columns, so the weights are
  bit-for-bit the same on any IEEE-754 machine running the same numpy release. FedAvg and
  Multi-Krum add in index order, so feed the updates in a fixed order (e.g. by customer id);
  the median and the trimmed mean are bit-exactly permutation invariant;
* Multi-Krum's selection is the one place where BLAS is used (the Gram matrix). Its scores are
  rounded to 24 significant bits before ranking and ties go to the lower index, so kernel-level
  rounding differences between machines cannot reorder updates except at a rounding boundary.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "AggregationResult",
    "AggregationRule",
    "aggregate",
    "coordinate_median",
    "fedavg",
    "krum",
    "multi_krum",
    "trimmed_mean",
    "weights_digest",
]

Weights = Sequence[npt.ArrayLike]
"""One model: one array per layer tensor."""

# Columns handled at once by the blocked loops: keeps the float64 / transposed working copies at
# n x 4096 (32 MiB for n = 1,000) instead of a second full n x P matrix.
_BLOCK = 4096
# Wider blocks for the Gram matrix: BLAS runs nearer its peak; n x 8192 float64 is 64 MiB.
_GRAM_BLOCK = 8192
# Significant bits kept in Krum scores before ranking (see the module docstring).
_SCORE_BITS = 24
# Largest sample count that float64 holds exactly.
_MAX_SAMPLES = 2**53
# Above this magnitude squared distances could overflow float64, so Krum rescales first.
_RESCALE_ABOVE = 2.0**400


class AggregationRule(enum.StrEnum):
    """Names accepted by `aggregate`; the value is what `AggregationResult.rule` records."""

    FEDAVG = "fedavg"
    KRUM = "krum"
    MULTI_KRUM = "multi_krum"
    COORDINATE_MEDIAN = "coordinate_median"
    TRIMMED_MEAN = "trimmed_mean"

    @property
    def selects_updates(self) -> bool:
        """True when `kept` says which updates survived (rather than simply all of them)."""
        return self in (AggregationRule.KRUM, AggregationRule.MULTI_KRUM)


@dataclass(frozen=True, eq=False)
class AggregationResult:
    """Outcome of one aggregation; `params` are the effective ones, defaults resolved.

    `aggregate(result.rule, updates, num_samples, **result.params)` reproduces the result.
    The arrays are read-only so that what was hashed cannot change afterwards.
    """

    weights: list[np.ndarray]
    kept: tuple[int, ...]
    scores: np.ndarray | None
    rule: str
    params: dict[str, Any]

    def digest(self) -> str:
        """SHA-256 of the output weights, as `weights_digest`."""
        return weights_digest(self.weights)


@dataclass(frozen=True)
class _Layout:
    """Where each layer lives in a flattened row."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]
    offsets: tuple[int, ...]  # len(shapes) + 1 entries; offsets[-1] is P


# --------------------------------------------------------------------------- public rules


def fedavg(updates: Sequence[Weights], num_samples: Sequence[int]) -> AggregationResult:
    """Sample-weighted mean of all updates (McMahan et al. 2017).

    Each layer is accumulated in its own dtype (float32 for the models crowdfl trains):
    ``acc += x_i * w_i`` with ``w_i = n_i / sum(n)`` worked out in float64 and rounded once to
    the layer dtype, the updates added one whole layer at a time in ascending index order, in
    place (no temporaries). Every step is an elementwise IEEE-754 operation in a fixed order, so
    the result is bit-for-bit reproducible (what the audit's replay needs) and as fast as the
    memory allows; the error is that of Flower's float32 FedAvg (a few ulps per update added).
    Weights below 1 keep the running sum within the inputs' range; if a layer still overflows
    its dtype while every input is finite, that layer is recomputed in float64 (deterministically,
    so the replay takes the same branch).
    """
    layout = _check_layout(updates)
    counts = _check_samples(num_samples, len(updates))
    total = math.fsum(counts)
    share = counts / total  # float64, each rounded once
    weights: list[np.ndarray] = []
    for j, (shape, dtype) in enumerate(zip(layout.shapes, layout.dtypes)):
        w = share.astype(dtype)
        acc = np.zeros(math.prod(shape), dtype=dtype)
        term = np.empty_like(acc)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite input is named below
            for i, update in enumerate(updates):
                np.multiply(np.asarray(update[j]).reshape(-1), w[i], out=term)
                np.add(acc, term, out=acc)
        if not np.isfinite(acc).all():
            acc = _fedavg_layer_float64(updates, j, counts, total).astype(dtype)
        acc += 0.0  # -0.0 -> +0.0, so equal values hash equal
        layer = acc.reshape(shape)
        layer.flags.writeable = False
        weights.append(layer)
    kept = tuple(range(len(updates)))
    return AggregationResult(weights, kept, None, AggregationRule.FEDAVG.value, {})


def _fedavg_layer_float64(updates: Sequence[Weights], j: int, counts: np.ndarray, total: float) -> np.ndarray:
    """One layer's weighted mean with float64 sums of exact products: the fallback when the
    layer's own dtype overflowed. Raises ValueError for non-finite input or a float64 overflow."""
    size = math.prod(np.asarray(updates[0][j]).shape)
    acc = np.zeros(size, dtype=np.float64)
    term = np.empty(size, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, update in enumerate(updates):
            term[...] = np.asarray(update[j]).reshape(-1)  # exact widening
            term *= counts[i]
            acc += term
    if not np.isfinite(acc).all():
        _raise_first_non_finite(updates)  # NaN/Inf in an update poisons the sum: say which one
        raise ValueError("fedavg overflowed float64: the updates are too large")
    acc /= total
    return acc


def multi_krum(
    updates: Sequence[Weights],
    num_samples: Sequence[int],
    f: int,
    m: int | None = None,
) -> AggregationResult:
    """Multi-Krum (Blanchard et al. 2017) tolerating up to `f` Byzantine updates.

    Each update's score is the sum of its squared distances to its n - f - 2 nearest other
    updates; the m lowest scores (default m = n - f; ties to the lower index) are averaged,
    weighted by samples. Needs n > 2f + 2 (else ValueError: Krum's guarantee does not hold and
    n - f - 2 neighbours may not exist, so there is no silent fallback).
    `scores` holds every update's score as ranked: float64, rounded to 24 significant bits.
    """
    matrix, layout = _stack(updates)
    n = matrix.shape[0]
    counts = _check_samples(num_samples, n)
    f = _check_int("f", f, 0)
    if n <= 2 * f + 2:
        raise ValueError(f"multi_krum needs n > 2f + 2 updates; got n={n}, f={f}")
    m = n - f if m is None else _check_int("m", m, 1)
    if m > n - f:
        raise ValueError(f"m must be at most n - f = {n - f}; got m={m}")
    ranked, scores = _krum_scores(matrix, f)
    order = np.argsort(ranked, kind="stable")  # stable: equal scores keep index order
    kept = tuple(sorted(int(i) for i in order[:m]))
    flat = _weighted_mean(matrix, counts, kept)
    rule = AggregationRule.KRUM if m == 1 else AggregationRule.MULTI_KRUM
    params: dict[str, Any] = {"f": f} if m == 1 else {"f": f, "m": m}
    return _result(flat, layout, kept, scores, rule, params)


def krum(updates: Sequence[Weights], num_samples: Sequence[int], f: int) -> AggregationResult:
    """Krum: the single update with the lowest Multi-Krum score (i.e. `multi_krum` with m=1)."""
    return multi_krum(updates, num_samples, f, m=1)


def coordinate_median(updates: Sequence[Weights]) -> AggregationResult:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values for even n.

    Unweighted on purpose: sample counts are self-reported and would let an attacker buy weight.
    """
    matrix, layout = _stack(updates)
    n = matrix.shape[0]
    flat = _median(matrix)
    return _result(flat, layout, tuple(range(n)), None, AggregationRule.COORDINATE_MEDIAN, {})


def trimmed_mean(updates: Sequence[Weights], beta: float) -> AggregationResult:
    """Coordinate-wise mean after dropping the floor(beta * n) lowest and highest values.

    Same cut as Flower's FedTrimmedAvg and scipy's trim_mean; 0 <= beta < 0.5. Unweighted, as the
    median.
    """
    matrix, layout = _stack(updates)
    n = matrix.shape[0]
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be a number in [0, 0.5); got {beta!r}")
    cut = int(beta * n)
    count = n - 2 * cut

    def middle_mean(sorted_cols: np.ndarray) -> np.ndarray:
        # Sum in sorted order: the result does not depend on how the updates were ordered.
        total: np.ndarray = sorted_cols[:, cut : n - cut].sum(axis=1, dtype=np.float64)
        return total / count

    flat = _reduce_sorted_columns(matrix, middle_mean)
    params = {"beta": float(beta)}
    return _result(flat, layout, tuple(range(n)), None, AggregationRule.TRIMMED_MEAN, params)


def aggregate(
    rule: str | AggregationRule,
    updates: Sequence[Weights],
    num_samples: Sequence[int],
    **params: Any,
) -> AggregationResult:
    """Run one rule by name: fedavg(), krum(f), multi_krum(f, m=None), coordinate_median(),
    trimmed_mean(beta).

    `num_samples` is validated for every rule (it is part of what the audit replays) even where
    the rule ignores it.
    """
    try:
        chosen = AggregationRule(rule)
    except ValueError:
        names = ", ".join(r.value for r in AggregationRule)
        raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {names}") from None
    expected = {
        AggregationRule.FEDAVG: (set(), set()),
        AggregationRule.KRUM: ({"f"}, set()),
        AggregationRule.MULTI_KRUM: ({"f"}, {"m"}),
        AggregationRule.COORDINATE_MEDIAN: (set(), set()),
        AggregationRule.TRIMMED_MEAN: ({"beta"}, set()),
    }[chosen]
    required, optional = expected
    missing = required - params.keys()
    unknown = params.keys() - required - optional
    if missing or unknown:
        raise ValueError(
            f"{chosen.value} takes parameters {sorted(required)} (optional {sorted(optional)}); "
            f"missing {sorted(missing)}, unexpected {sorted(unknown)}"
        )
    if chosen is AggregationRule.FEDAVG:
        return fedavg(updates, num_samples)
    if chosen is AggregationRule.KRUM:
        return krum(updates, num_samples, params["f"])
    if chosen is AggregationRule.MULTI_KRUM:
        return multi_krum(updates, num_samples, params["f"], params.get("m"))
    _check_samples(num_samples, len(updates))
    if chosen is AggregationRule.COORDINATE_MEDIAN:
        return coordinate_median(updates)
    return trimmed_mean(updates, params["beta"])


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """Hex SHA-256 over each layer's dtype, shape and little-endian C-order bytes."""
    h = hashlib.sha256()
    for layer in weights:
        arr = np.asarray(layer)
        canonical = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        h.update(f"{canonical.dtype.str}{canonical.shape};".encode())
        h.update(canonical.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- validation


def _check_layout(updates: Sequence[Weights]) -> _Layout:
    """`_stack`'s shape and dtype checks, without copying the updates."""
    if len(updates) == 0:
        raise ValueError("no updates to aggregate")
    first = [np.asarray(layer) for layer in updates[0]]
    if not first:
        raise ValueError("update 0 has no layers")
    shapes = tuple(layer.shape for layer in first)
    dtypes = tuple(layer.dtype for layer in first)
    for j, dtype in enumerate(dtypes):
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"update 0 layer {j}: dtype {dtype} is not a float dtype")
    sizes = [math.prod(shape) for shape in shapes]
    offsets = tuple(int(x) for x in np.cumsum([0, *sizes]))
    if offsets[-1] == 0:
        raise ValueError("the model has no parameters")
    for i, update in enumerate(updates):
        layers = first if i == 0 else [np.asarray(layer) for layer in update]
        if len(layers) != len(shapes):
            raise ValueError(f"update {i} has {len(layers)} layers; update 0 has {len(shapes)}")
        for j, layer in enumerate(layers):
            if layer.shape != shapes[j] or layer.dtype != dtypes[j]:
                raise ValueError(
                    f"update {i} layer {j} is {layer.dtype}{list(layer.shape)}; "
                    f"update 0 has {dtypes[j]}{list(shapes[j])}"
                )
    return _Layout(shapes, dtypes, offsets)


def _raise_first_non_finite(updates: Sequence[Weights]) -> None:
    for i, update in enumerate(updates):
        for j, layer in enumerate(update):
            if not np.isfinite(np.asarray(layer)).all():
                raise ValueError(f"update {i} layer {j} contains NaN or Inf")


def _stack(updates: Sequence[Weights]) -> tuple[np.ndarray, _Layout]:
    """Validate the updates and copy them into one n x P matrix of their common float dtype."""
    layout = _check_layout(updates)
    offsets = layout.offsets
    matrix = np.empty((len(updates), offsets[-1]), dtype=np.result_type(*layout.dtypes))
    for i, update in enumerate(updates):
        for j, layer in enumerate(update):
            matrix[i, offsets[j] : offsets[j + 1]] = np.asarray(layer).reshape(-1)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        j = next(
            j
            for j in range(len(layout.shapes))
            if not np.isfinite(matrix[i, offsets[j] : offsets[j + 1]]).all()
        )
        raise ValueError(f"update {i} layer {j} contains NaN or Inf")
    return matrix, layout


def _check_samples(num_samples: Sequence[int], n: int) -> np.ndarray:
    if len(num_samples) != n:
        raise ValueError(f"{len(num_samples)} sample counts for {n} updates")
    for i, count in enumerate(num_samples):
        if isinstance(count, bool) or not isinstance(count, Integral):
            raise ValueError(f"update {i}: sample count {count!r} is not an integer")
        if not 0 < count <= _MAX_SAMPLES:
            raise ValueError(f"update {i}: sample count {count} is not in [1, 2**53]")
    return np.array([int(c) for c in num_samples], dtype=np.float64)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- arithmetic


def _weighted_mean(matrix: np.ndarray, counts: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """sum(count_i * row_i) / sum(count_i) over `rows`, added in the given (ascending) order.

    A row at a time rather than one matrix-vector product: BLAS may reorder the additions
    (blocking, FMA, threads), which would break bit-for-bit replay on another machine.
    """
    acc = np.zeros(matrix.shape[1], dtype=np.float64)
    term = np.empty_like(acc)
    with np.errstate(over="ignore"):  # overflow is reported by _result
        for i in rows:
            np.multiply(matrix[i], counts[i], out=term, dtype=np.float64)
            acc += term
    acc /= math.fsum(counts[list(rows)])
    return acc


def _reduce_sorted_columns(
    matrix: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply `reduce` to (block of columns) x n arrays whose rows are sorted; float64 out."""
    n_params = matrix.shape[1]
    out = np.empty(n_params, dtype=np.float64)
    for start in range(0, n_params, _BLOCK):
        stop = min(start + _BLOCK, n_params)
        # Sorting a C-ordered transposed copy is far faster than partitioning along axis 0.
        # (An explicit copy: ascontiguousarray returns a view when there is a single column.)
        block = matrix[:, start:stop].T.copy(order="C")
        block.sort(axis=1)
        out[start:stop] = reduce(block)
    return out


def _median(matrix: np.ndarray) -> np.ndarray:
    n = matrix.shape[0]
    lo, hi = (n - 1) // 2, n // 2

    def middle(sorted_cols: np.ndarray) -> np.ndarray:
        low = sorted_cols[:, lo].astype(np.float64)
        if lo == hi:
            return low
        high = sorted_cols[:, hi].astype(np.float64)
        with np.errstate(over="ignore"):
            mid = (low + high) / 2.0  # one rounding (the sum); halving is exact
        # Only float64 input near the top of its range gets here; halve first instead.
        return np.where(np.isfinite(mid), mid, low / 2.0 + high / 2.0)

    return _reduce_sorted_columns(matrix, middle)


def _krum_scores(matrix: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of squared distances to the n - f - 2 nearest other rows, per row (float64).

    Returns (scores to rank by, scores to report): the same up to a power-of-two factor that
    keeps float64 updates beyond 2^400 from overflowing (the reported ones may then be inf).

    Distances come from the Gram matrix, |a-b|^2 = |a|^2 + |b|^2 - 2<a,b>, computed over column
    blocks in float64 after subtracting the coordinate-wise median. Centring matters: for raw
    model weights |a|^2 can be ~1e8 times |a-b|^2 and the identity would cancel away every
    significant digit (in float32 the error would exceed the distances themselves). The median,
    unlike the mean, is not dragged off by far-away attackers. Working memory is n^2 float64
    for the Gram matrix plus one n x _GRAM_BLOCK float64 block, not a float64 copy of the updates.
    """
    n, n_params = matrix.shape
    center = _median(matrix)
    scale = 1.0
    if matrix.dtype.itemsize >= 8:  # float32 squares cannot overflow float64 sums
        peak = float(np.max(np.abs(matrix)))
        if peak > _RESCALE_ABOVE:
            scale = math.ldexp(1.0, -math.frexp(2.0 * peak)[1])  # a power of two: exact
    gram = np.zeros((n, n), dtype=np.float64)
    block = np.empty((n, _GRAM_BLOCK), dtype=np.float64)
    for start in range(0, n_params, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, n_params)
        cols = block[:, : stop - start]
        np.subtract(matrix[:, start:stop], center[start:stop], out=cols, dtype=np.float64)
        if scale != 1.0:
            cols *= scale
        gram += cols @ cols.T
    sq = np.diag(gram).copy()
    dist = sq[:, None] + sq[None, :]
    dist -= 2.0 * gram
    np.maximum(dist, 0.0, out=dist)  # rounding can leave tiny negatives for near-equal rows
    np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
    dist.sort(axis=1)
    ranked = _round_significant(dist[:, : n - f - 2].sum(axis=1), _SCORE_BITS)
    with np.errstate(over="ignore"):
        scores = ranked / scale / scale  # exact unless it overflows
    scores.flags.writeable = False
    return ranked, scores


def _round_significant(values: np.ndarray, bits: int) -> np.ndarray:
    """Round to `bits` significant bits, half to even; exact operations only."""
    mantissa, exponent = np.frexp(values)
    step = float(2**bits)
    rounded: np.ndarray = np.ldexp(np.round(mantissa * step) / step, exponent)
    return rounded


def _result(
    flat: np.ndarray,
    layout: _Layout,
    kept: tuple[int, ...],
    scores: np.ndarray | None,
    rule: AggregationRule,
    params: dict[str, Any],
) -> AggregationResult:
    if not np.isfinite(flat).all():
        raise ValueError(f"{rule.value} overflowed float64: the updates are too large")
    weights: list[np.ndarray] = []
    for j, shape in enumerate(layout.shapes):
        part = flat[layout.offsets[j] : layout.offsets[j + 1]]
        layer = part.astype(layout.dtypes[j])  # the single rounding, to nearest even
        layer += 0.0  # -0.0 -> +0.0, so equal values hash equal
        layer = layer.reshape(shape)
        layer.flags.writeable = False
        weights.append(layer)
    return AggregationResult(weights, kept, scores, rule.value, params)
