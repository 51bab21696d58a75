"""Defences that bound every update's influence: pure functions, re-run by the audit.

A round's updates are first turned into *deltas* from the round's global model, then:

1. **Trust against a server-side reference** (FLTrust, Cao et al., NDSS 2021). The coordinator
   trains the same head, from the same global model, on the manufacturer's own clean households
   (``coordinator.reference``); an update's trust is ReLU(cos(delta, reference delta)). An update
   pointing away from what clean data asks for (sign flip, inner-product manipulation, Xie et al.
   UAI 2020; colluding reversal; label flip) gets 0, and so does a zero update (free rider).
2. **Norm bounding around a robust centre** (centered clipping, Karimireddy, He & Jaggi, ICML 2021;
   norm bounding, Sun et al. 2019). Each delta is clipped to ``clip_factor`` times the median
   delta norm of the round (a statistic fewer than half the updates cannot move far), so no single
   update can drag the model further than an ordinary honest one. An update that had to be clipped
   also loses score in proportion (a x10 update keeps a tenth of its score at most).
3. **Similarity down-weighting** (FoolsGold, Fung, Yoon & Beschastnikh, RAID 2020). Coordinated
   Sybils and "a little is enough" attackers (Baruch et al., NeurIPS 2019) send identical or nearly
   identical deltas; honest customers, with their own households and the devices' Laplace noise,
   never do. An update whose most similar other update has cosine above ``similarity_threshold``
   loses weight linearly to 0 at cosine 1. A *group* of near-copies (attackers who add their own
   noise to one shared poisoned update, "a little is enough" with jitter) is caught by the mean
   cosine to each update's ``group_size`` most similar others: honest updates, each carrying its
   own household's estimation noise and its devices' Laplace noise, have few close neighbours;
   members of a coordinated group have several. Above ``group_threshold`` the weight falls
   linearly to 0 at ``group_full``, and only when it is also ``group_margin`` above the round's
   median (a task whose honest updates are all alike raises the bar with its median; on the household task at epsilon 4 the honest maximum was
   0.72 and jittered ALIE groups 0.72-0.84, bench/quality/robustness.py; a task with other noise
   needs these re-chosen on its own validation run).
4. **Probation**: the caller passes each update's standing (its reputation mapped to [0, 1],
   ``coordinator.reputation.standing``), which multiplies its weight: a fresh identity counts at most
   half of a proven one.

The aggregate is the global model plus the weight-averaged clipped deltas ("trust_mean", the
FLTrust combination), or any rule of ``coordinator.aggregation`` run on the admitted (weight > 0),
clipped updates. A 5. defence, the publication guard (``guard``), refuses a round whose model is
clearly worse than the previous one on the manufacturer's validation homes (Zeno-style validation,
Xie et al. ICML 2019); the service records the decision in the round's manifest.

Determinism: float64 arithmetic on the flattened deltas, the weighted sum row by row in
index order, inner products from one Gram matrix whose cosines and norms are rounded to 12 significant digits before any threshold, so the audit's replay
on any IEEE-754 machine gives the same weights and the same digest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .aggregation import AggregationResult, AggregationRule, _weighted_mean, aggregate

__all__ = [
    "DefenceConfig",
    "DefendedResult",
    "GuardDecision",
    "TRUST_MEAN",
    "defend",
    "guard",
]

TRUST_MEAN = "trust_mean"
"""The FLTrust combination: global + sum(w_i clipped_delta_i) / sum(w_i)."""

_DIGITS = 12  # significant digits kept in cosines and norms before thresholds (see module docstring)


@dataclass(frozen=True)
class DefenceConfig:
    """Knobs of the defences; recorded (``to_json``) in every round's manifest."""

    # The rule run on the admitted, clipped updates: TRUST_MEAN (FLTrust's weighted mean) or any
    # AggregationRule. The coordinate median was chosen on the manufacturer's validation homes
    # (bench/quality/robustness.py: 0.535 vs 0.533 for the trust-weighted mean, averaged over
    # every attack at 30 % and the control; a tie within noise, docs/robustness.md).
    rule: str = "coordinate_median"
    clip_factor: float = 2.0  # bound on a delta's norm, in median delta norms of the round
    similarity_threshold: float = 0.95  # cosine above which two updates are "too similar"
    group_size: int = 3  # neighbours whose mean cosine measures membership of a coordinated group
    group_threshold: float = 0.7  # mean cosine to the group_size nearest above which weight falls
    group_full: float = 0.78  # ... to 0 at this mean cosine
    group_margin: float = 0.1  # and only above the round's median group similarity + this margin
    min_weight: float = 0.0  # updates with weight <= this are not admitted
    guard_tolerance: float = 0.05  # refuse a model this much less accurate on validation than the last

    def __post_init__(self) -> None:
        if self.rule != TRUST_MEAN:
            AggregationRule(self.rule)  # ValueError naming the rules
        for name in ("clip_factor",):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number; got {v!r}")
        for name in ("similarity_threshold", "min_weight", "guard_tolerance", "group_threshold", "group_margin"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"{name} must be a number in [0, 1); got {v!r}")
        if not (isinstance(self.group_full, (int, float)) and self.group_threshold < self.group_full <= 1.0):
            raise ValueError(f"group_full must be in (group_threshold, 1]; got {self.group_full!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer; got {self.group_size!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DefenceConfig:
        return cls(**data)


@dataclass(frozen=True, eq=False)
class DefendedResult:
    """What ``defend`` decided, per update in input order, and the aggregate."""

    aggregate: AggregationResult
    cosine: np.ndarray  # cosine of each delta to the reference delta (0 for a zero delta)
    trust: np.ndarray  # FLTrust ReLU-cosine to the reference
    similarity: np.ndarray  # cosine to the most similar other update
    group_similarity: np.ndarray  # mean cosine to the group_size most similar other updates
    norm_ratio: np.ndarray  # delta norm / median delta norm
    clip_scale: np.ndarray  # factor applied to each delta (1 = untouched)
    similarity_penalty: np.ndarray  # 1 for an independent update, 0 for a duplicate
    value: np.ndarray  # trust x similarity penalty x clip penalty: the measured value, in [0, 1]
    weight: np.ndarray  # value x standing: the update's share of the aggregate (before normalising)
    admitted: tuple[int, ...]

    def summary(self) -> dict[str, Any]:
        """Per-update figures as plain lists (for the manifest / ledger)."""
        def r(a: np.ndarray) -> list[float]:
            return [float(f"{float(x):.{_DIGITS}g}") for x in a]

        return {
            "cosine": r(self.cosine), "trust": r(self.trust), "similarity": r(self.similarity),
            "group_similarity": r(self.group_similarity), "norm_ratio": r(self.norm_ratio),
            "value": r(self.value), "weight": r(self.weight), "admitted": list(self.admitted),
        }


def _round(x: np.ndarray) -> np.ndarray:
    """Round to _DIGITS significant digits: a BLAS kernel's last-bit differences then vanish
    (except exactly at a rounding boundary), so thresholds and weights replay on any machine."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        exp = np.where(x != 0, np.floor(np.log10(np.abs(np.where(x != 0, x, 1.0)))), 0.0)
    factor = 10.0 ** (_DIGITS - 1 - exp)
    return np.round(x * factor) / factor


def _flatten(weights: Sequence[npt.ArrayLike]) -> np.ndarray:
    return np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in weights])


def _gram(rows: np.ndarray) -> np.ndarray:
    """Inner products of every pair of rows (float64; BLAS, so rounded by the caller)."""
    return rows @ rows.T


def _cosines(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def defend(
    base: Sequence[npt.ArrayLike],
    updates: Sequence[Sequence[npt.ArrayLike]],
    num_samples: Sequence[int],
    reference: Sequence[npt.ArrayLike],
    standing: Sequence[float],
    config: DefenceConfig,
    rule_params: dict[str, Any] | None = None,
) -> DefendedResult:
    """Aggregate ``updates`` (full models, trained from ``base``) with every defence on.

    ``reference`` is the server's own model trained from ``base`` on clean data; ``standing[i]``
    in [0, 1] is update i's probation factor. Updates are taken in the given order (the
    coordinator's hash order). When no update is admitted the result is ``base`` unchanged.
    """
    n = len(updates)
    if n == 0:
        raise ValueError("no updates to aggregate")
    if len(standing) != n or len(num_samples) != n:
        raise ValueError(f"{len(standing)} standings and {len(num_samples)} sample counts for {n} updates")
    for i, s in enumerate(standing):
        if not (isinstance(s, (int, float)) and 0.0 <= s <= 1.0):
            raise ValueError(f"standing of update {i} must be in [0, 1]; got {s!r}")
    layers = [np.asarray(w) for w in base]
    # validates shapes, dtypes and finiteness of every update (and of base, as row n)
    aggregate(AggregationRule.FEDAVG, [*updates, layers, list(reference)], [1] * (n + 2))
    g = _flatten(layers)
    ref = _flatten(reference) - g
    deltas = np.stack([_flatten(u) - g for u in updates])
    rows = np.vstack([deltas, ref[None, :]])
    gram = _gram(rows)
    cos = _round(_cosines(gram))
    norms = _round(np.sqrt(np.maximum(np.diag(gram)[:n], 0.0)))
    cosine = cos[:n, n].copy()
    trust = np.maximum(cosine, 0.0)
    sim = np.zeros(n)
    group = np.zeros(n)
    if n > 1:
        pair = cos[:n, :n].copy()
        np.fill_diagonal(pair, -1.0)
        sim = pair.max(axis=1)
        m = min(config.group_size, n - 1)
        # FoolsGold's pardoning (Fung et al. 2020, Alg. 1): a similarity to an update that is
        # itself more similar to others is scaled by v_i / v_j, so an honest update that happens
        # to lie near a coordinated group is not taken for one of its members
        v = np.maximum(sim, 1e-12)
        pardon = np.where(v[None, :] > v[:, None], v[:, None] / v[None, :], 1.0)
        pardoned = _round(np.where(pair > 0, pair * pardon, pair))
        np.fill_diagonal(pardoned, -1.0)
        nearest = np.sort(pardoned, axis=1)[:, ::-1][:, :m]  # each row's m largest, largest first
        group = _round(np.array([math.fsum(row) for row in nearest]) / m)
        sim[norms == 0.0] = 0.0  # zero deltas already have trust 0; their "similarity" means nothing
        group[norms == 0.0] = 0.0
    t = config.similarity_threshold
    sim_penalty = np.clip((1.0 - sim) / (1.0 - t), 0.0, 1.0)
    # relative to the round as well: where honest updates are alike (little noise, much data) the
    # cohort's median is high and only a group well above it is penalised
    live = group[norms > 0.0]
    low = max(config.group_threshold, (float(np.median(live)) if live.size else 0.0) + config.group_margin)
    high = low + (config.group_full - config.group_threshold)
    group_penalty = np.clip((high - group) / (high - low), 0.0, 1.0)
    sim_penalty = _round(np.minimum(sim_penalty, group_penalty))

    positive = norms[norms > 0]
    median = float(np.median(positive)) if positive.size else 0.0
    bound = config.clip_factor * median
    ratio = _round(norms / median) if median > 0 else np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)
    scale = _round(scale)

    value = _round(trust * sim_penalty * scale)
    weight = _round(value * np.asarray(standing, dtype=np.float64))
    admitted = tuple(i for i in range(n) if weight[i] > config.min_weight)
    clipped = deltas * scale[:, None]
    params_out = {"defence": config.to_json()}
    if not admitted:
        flat = g.copy()
        result = _rebuild(flat, layers, (), TRUST_MEAN if config.rule == TRUST_MEAN else config.rule, params_out)
    elif config.rule == TRUST_MEAN:
        step = _weighted_mean(clipped, weight, admitted)
        result = _rebuild(g + step, layers, admitted, TRUST_MEAN, params_out)
    else:
        models = [_unflatten(g + clipped[i], layers) for i in admitted]
        params = dict(rule_params or {})
        if AggregationRule(config.rule) in (AggregationRule.KRUM, AggregationRule.MULTI_KRUM):
            # Krum's f is sized on the admitted set; too few for Krum falls back to the median
            f = min(int(params.get("f", 0)), max(0, (len(models) - 3) // 2))
            params = {"f": f}
            rule = config.rule if len(models) >= 3 else AggregationRule.COORDINATE_MEDIAN.value
            if rule != config.rule:
                params = {}
        else:
            rule = config.rule
        inner = aggregate(rule, models, [int(num_samples[i]) for i in admitted], **params)
        kept = tuple(admitted[k] for k in inner.kept)
        result = _rebuild(_flatten(inner.weights), layers, kept, inner.rule, {**inner.params, **params_out})
    return DefendedResult(result, cosine, trust, sim, group, ratio, scale, sim_penalty, value, weight, admitted)


def _unflatten(flat: np.ndarray, layers: Sequence[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for layer in layers:
        stop = start + layer.size
        out.append(flat[start:stop].reshape(layer.shape).astype(layer.dtype))
        start = stop
    return out


def _rebuild(flat: np.ndarray, layers: Sequence[np.ndarray], kept: tuple[int, ...], rule: str, params: dict[str, Any]) -> AggregationResult:
    weights = [w + 0.0 for w in _unflatten(flat, layers)]  # + 0.0 turns -0.0 into +0.0
    for w in weights:
        w.flags.writeable = False
    return AggregationResult(weights, kept, None, rule, params)


@dataclass(frozen=True)
class GuardDecision:
    """Whether a round's candidate model is published; recorded in the manifest."""

    publish: bool
    candidate_accuracy: float
    previous_accuracy: float
    tolerance: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "publish": self.publish, "candidate_accuracy": self.candidate_accuracy,
            "previous_accuracy": self.previous_accuracy, "tolerance": self.tolerance, "reason": self.reason,
        }


def guard(candidate_accuracy: float, previous_accuracy: float, tolerance: float) -> GuardDecision:
    """Publish unless the candidate is more than ``tolerance`` below the previous model on the
    manufacturer's validation homes (Zeno-style validation: Xie, Koyejo & Gupta, ICML 2019).

    A round's noise moves validation accuracy by a point or two; ``tolerance`` is set above that
    (chosen in bench/quality/robustness.py), so only a clearly damaged model is refused.
    """
    if not (0.0 <= tolerance < 1.0):
        raise ValueError(f"tolerance must be in [0, 1); got {tolerance!r}")
    if math.isnan(candidate_accuracy) or math.isnan(previous_accuracy):
        return GuardDecision(True, candidate_accuracy, previous_accuracy, tolerance, "no validation data")
    if candidate_accuracy < previous_accuracy - tolerance:
        return GuardDecision(
            False, candidate_accuracy, previous_accuracy, tolerance,
            f"validation accuracy {candidate_accuracy:.4f} is more than {tolerance} below the previous model's "
            f"{previous_accuracy:.4f}: the previous model is kept",
        )
    return GuardDecision(True, candidate_accuracy, previous_accuracy, tolerance, "ok")


def config_json(config: DefenceConfig) -> str:
    return json.dumps(config.to_json(), sort_keys=True, separators=(",", ":"))
