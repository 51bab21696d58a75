"""Customer reputation: score each round's updates, decay the history, select, split rewards.

Pure functions, no I/O. Reputations are floats in [0, 1] keyed by customer id; ids must be
mutually orderable (e.g. all `str`), because every tie is broken by id so that the audit can
replay a round exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
import numpy.typing as npt

from coordinator.aggregation import AggregationResult, AggregationRule

__all__ = [
    "CustomerId",
    "ReputationConfig",
    "TrustReputationConfig",
    "contribution_rewards",
    "standing",
    "trust_round_scores",
    "update_trust_reputations",
    "closeness",
    "distances_to",
    "round_scores",
    "score_round",
    "select",
    "split_rewards",
    "update_reputations",
]

CustomerId = str


@dataclass(frozen=True)
class ReputationConfig:
    """Knobs of the reputation system; the defaults are a starting point, not tuned values.

    decay: weight of the past in `r_new = decay * r_old + (1 - decay) * score`. 0.8 halves an old
        round's influence about every three rounds, so a customer that turns malicious loses its
        standing quickly (prior 0.5 to below 0.3 in three rejected rounds).
    prior: reputation a newcomer starts from: neither trusted nor distrusted.
    floor: reputation below which a known customer is no longer selected.
    newcomer_share: share of each round's slots reserved for customers without history, so that
        the established ones cannot lock newcomers out.
    kept_weight: weight of Multi-Krum's keep/reject verdict in a round score; the rest is the
        closeness to the robust aggregate. Ignored for rules that select nobody.
    tolerance: distance, in median distances, up to which an update counts as fully close;
        beyond, closeness falls as (tolerance / ratio) ** 2.
    """

    decay: float = 0.8
    prior: float = 0.5
    floor: float = 0.3
    newcomer_share: float = 0.2
    kept_weight: float = 0.5
    tolerance: float = 2.0

    def __post_init__(self) -> None:
        for name in ("prior", "floor", "newcomer_share", "kept_weight"):
            _check_unit(name, getattr(self, name))
        _check_unit("decay", self.decay)
        if self.decay == 1.0:
            raise ValueError("decay must be < 1, or reputations never change")
        if not (_is_real(self.tolerance) and math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"tolerance must be a positive number; got {self.tolerance!r}")

    def newcomer_slots(self, k: int) -> int:
        """Slots out of k reserved for newcomers: newcomer_share of them, rounded up."""
        return min(k, math.ceil(round(self.newcomer_share * k, 9)))


# --------------------------------------------------------------------------- round scores


def distances_to(
    updates: Sequence[Sequence[npt.ArrayLike]], reference: Sequence[npt.ArrayLike]
) -> np.ndarray:
    """Euclidean distance of each update to `reference` (same layer layout), in float64."""
    ref = [np.asarray(layer, dtype=np.float64) for layer in reference]
    out = np.empty(len(updates), dtype=np.float64)
    for i, update in enumerate(updates):
        layers = [np.asarray(layer) for layer in update]
        if len(layers) != len(ref) or any(
            a.shape != b.shape for a, b in zip(layers, ref, strict=True)
        ):
            raise ValueError(f"update {i} does not have the reference's layer shapes")
        squared = math.fsum(
            float(np.sum(np.square(layer.astype(np.float64) - r)))
            for layer, r in zip(layers, ref, strict=True)
        )
        out[i] = math.sqrt(squared)
    if not np.isfinite(out).all():
        raise ValueError(f"update {int(np.argmin(np.isfinite(out)))} has a non-finite distance")
    return out


def closeness(distances: npt.ArrayLike, tolerance: float) -> np.ndarray:
    """Map distances to [0, 1]: 1 up to `tolerance` median distances, then (tolerance/ratio)^2.

    Normalising by the median makes the score independent of the model's scale and of how
    noisy this round's honest updates are. When more than half the distances are 0 the scale
    falls back to the smallest positive distance (and to 1 when all are 0).
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("distances must be a non-empty 1-D array")
    if not (np.isfinite(d).all() and (d >= 0).all()):
        raise ValueError("distances must be finite and non-negative")
    scale = float(np.median(d))
    if scale == 0.0:
        positive = d[d > 0]
        scale = float(positive.min()) if positive.size else 1.0
    ratio = d / scale
    with np.errstate(divide="ignore"):
        close = np.where(ratio > tolerance, np.square(tolerance / ratio), 1.0)
    return np.clip(close, 0.0, 1.0)


def round_scores(
    distances: npt.ArrayLike, kept: Sequence[bool] | None, config: ReputationConfig
) -> np.ndarray:
    """Per-update score in [0, 1]: closeness, blended with the keep/reject verdict if given."""
    close = closeness(distances, config.tolerance)
    if kept is None:
        return close
    mask = np.asarray(kept, dtype=bool)
    if mask.shape != close.shape:
        raise ValueError(f"{mask.size} keep flags for {close.size} distances")
    return config.kept_weight * mask + (1.0 - config.kept_weight) * close


def score_round(
    customer_ids: Sequence[CustomerId],
    updates: Sequence[Sequence[npt.ArrayLike]],
    result: AggregationResult,
    config: ReputationConfig,
) -> dict[CustomerId, float]:
    """Score each customer's update against this round's robust aggregate.

    `customer_ids[i]` submitted `updates[i]`, in the order given to the aggregation.
    """
    if len(customer_ids) != len(updates):
        raise ValueError(f"{len(customer_ids)} customer ids for {len(updates)} updates")
    if len(set(customer_ids)) != len(customer_ids):
        raise ValueError("customer ids are not unique")
    distances = distances_to(updates, result.weights)
    kept: list[bool] | None = None
    if AggregationRule(result.rule).selects_updates:
        survivors = set(result.kept)
        kept = [i in survivors for i in range(len(updates))]
    scores = round_scores(distances, kept, config)
    return {cid: float(s) for cid, s in zip(customer_ids, scores, strict=True)}


# --------------------------------------------------------------------------- history


def update_reputations(
    reputations: Mapping[CustomerId, float],
    scores: Mapping[CustomerId, float],
    config: ReputationConfig,
) -> dict[CustomerId, float]:
    """Fold one round's scores in; newcomers start at the prior, absentees keep their value."""
    updated = dict(reputations)
    for cid in sorted(scores):
        score = scores[cid]
        _check_unit(f"score of {cid!r}", score)
        old = reputations.get(cid, config.prior)
        updated[cid] = config.decay * old + (1.0 - config.decay) * score
    return {cid: updated[cid] for cid in sorted(updated)}


def select(
    reputations: Mapping[CustomerId, float],
    candidates: Sequence[CustomerId],
    k: int,
    floor: float,
    newcomer_slots: int,
    rng: np.random.Generator,
) -> tuple[CustomerId, ...]:
    """Pick up to k of the candidates for the next round; returned sorted by id.

    Newcomers (candidates without a reputation) get up to `newcomer_slots` slots, drawn
    uniformly. The other slots go to known candidates whose reputation is >= floor, drawn
    without replacement with probability proportional to reputation (Efraimidis-Spirakis keys).
    Drawing rather than taking the top k lets middling customers be seen again and recover, and
    keeps the choice unpredictable to an attacker. Slots nobody eligible can fill go to the other
    group; fewer than k come back only when there are not enough eligible candidates.
    Deterministic for a given rng state (candidates are ordered by id before any draw).
    """
    k = _check_count("k", k)
    newcomer_slots = _check_count("newcomer_slots", newcomer_slots)
    _check_unit("floor", floor)
    if len(set(candidates)) != len(candidates):
        raise ValueError("candidates are not unique")
    newcomers = sorted(c for c in candidates if c not in reputations)
    veterans = sorted(c for c in candidates if c in reputations and reputations[c] >= floor)
    for cid in veterans:
        _check_unit(f"reputation of {cid!r}", reputations[cid])
    n_new = min(newcomer_slots, len(newcomers), k)
    n_old = min(k - n_new, len(veterans))
    n_new = min(k - n_old, len(newcomers))
    chosen: list[CustomerId] = []
    if n_new:
        picked = rng.choice(len(newcomers), size=n_new, replace=False)
        chosen += [newcomers[int(i)] for i in picked]
    if n_old:
        weights = np.array([reputations[c] for c in veterans], dtype=np.float64)
        u = rng.random(len(veterans))
        with np.errstate(divide="ignore"):
            keys = np.where(weights > 0, np.log(u) / weights, -np.inf)  # log of u ** (1 / w)
        order = np.argsort(-keys, kind="stable")
        chosen += [veterans[int(i)] for i in order[:n_old]]
    return tuple(sorted(chosen))


def split_rewards(
    pool: int,
    reputations: Mapping[CustomerId, float],
    contributions: Mapping[CustomerId, int],
) -> dict[CustomerId, int]:
    """Split an integer pool (wei) in proportion to reputation x contribution (sample count).

    Exact: the shares sum to `pool`. Quotas are computed with rationals (a float reputation is
    taken at its exact binary value), floored, and the leftover units go one each to the largest
    remainders, ties to the smaller id. Every contributor gets an entry, possibly 0.
    Raises ValueError when the pool is positive but nobody has a positive weight.
    """
    if isinstance(pool, bool) or not isinstance(pool, Integral) or pool < 0:
        raise ValueError(f"pool must be a non-negative integer; got {pool!r}")
    ids = sorted(contributions)
    weights: dict[CustomerId, Fraction] = {}
    for cid in ids:
        samples = _check_count(f"contribution of {cid!r}", contributions[cid])
        if cid not in reputations:
            raise ValueError(f"no reputation for customer {cid!r}")
        rep = reputations[cid]
        if not (_is_real(rep) and math.isfinite(rep) and rep >= 0):
            raise ValueError(f"reputation of {cid!r} must be finite and >= 0; got {rep!r}")
        weights[cid] = Fraction(rep) * samples
    total = sum(weights.values(), Fraction(0))
    if total == 0:
        if pool == 0:
            return {cid: 0 for cid in ids}
        raise ValueError("no contributor has a positive reputation-weighted contribution")
    quotas = {cid: Fraction(int(pool)) * w / total for cid, w in weights.items()}
    shares = {cid: math.floor(q) for cid, q in quotas.items()}
    leftover = int(pool) - sum(shares.values())
    by_remainder = sorted(ids, key=lambda cid: (-(quotas[cid] - shares[cid]), cid))
    for cid in by_remainder[:leftover]:
        shares[cid] += 1
    return shares


# --------------------------------------------------------------------------- trust-based reputation


@dataclass(frozen=True)
class TrustReputationConfig:
    """Reputation earned from the trust signal of ``coordinator.defence`` (not from closeness to an
    aggregate the attackers can move): earned slowly, lost fast, newcomers on probation.

    prior: a newcomer's reputation; below 1, so it counts (``standing``) and earns at most
        ``prior`` of a proven customer until it has shown useful updates.
    floor: below it a known customer is not selected.
    gain: r += gain * (score - r) when the score is at or above the reputation (slow: about five
        good rounds from the prior to 0.85).
    loss: r += loss * (score - r) when the score is below (faster than the gain: two worthless
        rounds take a newcomer below the floor, 0.6 -> 0.39 -> 0.25; one leaves it on probation,
        since an honest customer's update can point away from the reference in a round of unlucky
        noise). With the cohort-relative score, 0.3 left a sign flipper that scored 0.1 once at
        0.32, just above the floor (bench/quality/robustness.py, seed 0); 0.35 flags it.
    jump: a score more than ``jump`` below the reputation is a sudden change of behaviour (the
        sleeper who attacks after earning trust): the reputation falls back to the prior before
        the loss applies, so earned trust does not shelter an attack.
    spread: a round's cosines to the reference are scored against the round's own cohort, by a
        robust z-score (median and 1.4826 x median absolute deviation: Hampel, JASA 1974;
        Rousseeuw & Croux, JASA 1993): score = clip(1 + z / spread, 0, 1). An update at least as
        aligned as the median one scores 1; one ``spread`` robust deviations below scores 0. A
        round's alignment shrinks as the model converges (honest cosines from about 0.3 in the
        first round to about 0.05 later, bench/quality/robustness.py), so a fixed mapping either
        forgives a reversed update early or punishes honest noise late; the cohort's own spread
        does neither. Fewer than half the updates cannot move a median or a MAD far.
    min_spread: floor of the robust deviation, so that a round of near-identical cosines does
        not turn a rounding difference into a zero score.
    """

    prior: float = 0.6
    floor: float = 0.3
    gain: float = 0.2
    loss: float = 0.35
    jump: float = 0.5
    spread: float = 1.5
    min_spread: float = 0.02

    def __post_init__(self) -> None:
        for name in ("prior", "floor", "gain", "loss", "jump", "min_spread"):
            _check_unit(name, getattr(self, name))
        if self.gain == 0.0 or self.loss == 0.0 or self.min_spread == 0.0:
            raise ValueError("gain, loss and min_spread must be positive")
        if not (_is_real(self.spread) and math.isfinite(self.spread) and self.spread > 0):
            raise ValueError(f"spread must be a positive number; got {self.spread!r}")


def trust_round_scores(
    customer_ids: Sequence[CustomerId],
    cosines: npt.ArrayLike,
    penalties: npt.ArrayLike,
    config: TrustReputationConfig,
) -> dict[CustomerId, float]:
    """Score each update in [0, 1] from its cosine to the server's reference update, relative to
    the round's cohort (see ``TrustReputationConfig.spread``).

    ``cosines`` are ``DefendedResult.cosine``; ``penalties`` the product of the similarity and
    clipping penalties (``similarity_penalty * clip_scale``): a duplicate, a member of a group of
    near-copies or an oversized update scores little whatever its direction. A zero update
    (cosine 0 by definition) scores 0. The same score pays the round's rewards
    (``contribution_rewards``), so an update that looks worse than the ordinary honest one earns
    less, and one far below it nothing.
    """
    c = np.asarray(cosines, dtype=np.float64)
    p = np.asarray(penalties, dtype=np.float64)
    if c.shape != (len(customer_ids),) or p.shape != c.shape:
        raise ValueError(f"{c.size} cosines and {p.size} penalties for {len(customer_ids)} customers")
    if len(set(customer_ids)) != len(customer_ids):
        raise ValueError("customer ids are not unique")
    if not (np.isfinite(c).all() and (np.abs(c) <= 1).all() and np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("cosines must be in [-1, 1] and penalties in [0, 1]")
    if c.size == 0:
        return {}
    median = float(np.median(c))
    deviation = max(1.4826 * float(np.median(np.abs(c - median))), config.min_spread)
    z = (c - median) / deviation
    scores = np.clip(1.0 + z / config.spread, 0.0, 1.0) * p
    scores[c == 0.0] = 0.0  # a zero update (free rider) is worth nothing
    scores = np.round(scores, 12)  # replayable: the last bits of a BLAS cosine do not reach the ledger
    return {cid: float(s) for cid, s in zip(customer_ids, scores, strict=True)}


def update_trust_reputations(
    reputations: Mapping[CustomerId, float], scores: Mapping[CustomerId, float], config: TrustReputationConfig
) -> dict[CustomerId, float]:
    """Fold one round's scores in: slow up, fast down, a sudden drop from the prior."""
    updated = dict(reputations)
    for cid in sorted(scores):
        score = scores[cid]
        _check_unit(f"score of {cid!r}", score)
        old = reputations.get(cid, config.prior)
        if score < old - config.jump:
            old = min(old, config.prior)  # a sudden change: earned trust does not shelter it
        rate = config.gain if score >= old else config.loss
        updated[cid] = min(1.0, max(0.0, old + rate * (score - old)))
    return {cid: updated[cid] for cid in sorted(updated)}


def standing(reputations: Mapping[CustomerId, float], customer_ids: Sequence[CustomerId], config: TrustReputationConfig) -> list[float]:
    """Probation factor of each customer's update in [0, 1]: its reputation (the prior for a
    newcomer), so a fresh identity weighs at most ``prior`` of a proven customer."""
    return [float(min(1.0, max(0.0, reputations.get(cid, config.prior)))) for cid in customer_ids]


def contribution_rewards(
    pool: int,
    values: Mapping[CustomerId, float],
    standings: Mapping[CustomerId, float],
    samples: Mapping[CustomerId, int],
) -> dict[CustomerId, int]:
    """Pay for useful work: shares of ``pool`` proportional to value x standing x sample count.

    ``values`` are the round's measured values in [0, 1] (the coordinator pays by the trust score
    of ``trust_round_scores``: 0 for a zero, reversed, duplicated, grouped or random update, and for
    one far less aligned with the reference than the round's honest cohort), ``samples`` the
    device-signed sample counts (an update's count must match its device's receipt). Splitting an identity gains nothing:
    the halves' sample counts add up to the whole, each half starts on probation, and two halves
    that send the same update are down-weighted as too similar. When nobody did useful work the
    pool is not paid (every share 0) and stays for later rounds.
    """
    ids = sorted(samples)
    weights = {}
    for cid in ids:
        if cid not in values or cid not in standings:
            raise ValueError(f"no value or standing for customer {cid!r}")
        _check_unit(f"value of {cid!r}", values[cid])
        _check_unit(f"standing of {cid!r}", standings[cid])
        weights[cid] = float(values[cid]) * float(standings[cid])
    if not any(w > 0 for w in weights.values()):
        _check_count("pool", pool)
        return {cid: 0 for cid in ids}
    return split_rewards(pool, weights, {cid: samples[cid] for cid in ids})


# --------------------------------------------------------------------------- checks


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_unit(name: str, value: float) -> None:
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)
