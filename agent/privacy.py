"""Local differential privacy for released features (pure: no I/O).

Each feature vector is first normalised by ``crowdfl.task.prepare_features``: divided by the
task's per-feature scale, box-clipped to [0, 1] and L1-clipped to ``clip_l1``. Two such vectors x
and x' of any two samples differ in L1 norm by at most

    sensitivity = min(2 * clip_l1, feature_dim)

(2·C for two points of an L1 ball of radius C; d for two points of the unit box). Laplace noise
of scale sensitivity / epsilon per coordinate would make the released vector epsilon-differentially
private (Dwork et al. 2006) -- in exact arithmetic. Sampled on floats, it is not: the set of
floating-point values x + noise can reach depends on x, and an observer can tell inputs apart from
the low bits of the output (Mironov 2012, "On significance of the least significant bits for
differential privacy"). So the agent adds no float noise. It snaps each coordinate to a grid of
step ``GRID`` = 2^-12 (an integer q = round(x / GRID)), adds an integer drawn from the discrete
Laplace distribution P(z) ∝ exp(-|z| epsilon / Δ) with the exact sampler of Canonne, Kamath &
Steinke 2020 ("The discrete Gaussian for differential privacy", Algorithm 2: rational
arithmetic only, no floats; run for a whole release at once with numpy on uint64 words,
``discrete_laplace_batch``), using the operating system's CSPRNG (``os.urandom``), and
releases GRID · (q + z), a float that is a function of integers only. Snapping moves each
coordinate by at most GRID / 2, so two snapped vectors differ in L1 by at most
Δ = ceil(sensitivity / GRID) + d grid steps: the integer mechanism is epsilon-DP for that Δ, and
the release is post-processing (``grid_sensitivity``). The price is d · GRID = 0.2 % more noise for
d = 8.

Each hour of a household's usage log is accounted for in ``agent.accountant``.

Labels can be protected separately with k-ary randomised response (``label_epsilon > 0``); with
``label_epsilon == 0`` they are released as is and the guarantee covers the features only.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from crowdfl.errors import PrivacyError
from crowdfl.messages import TaskSpec
from crowdfl.task import laplace_scale, prepare_features, sensitivity  # noqa: F401 (re-exported)


HOURS_PER_DAY = 24

# The owner's default caps (agent.config.PrivacySettings): any one hour, and any one UTC day, of a
# household's usage carries at most this epsilon over every release of every task. The default task
# (coordinator.task_model.TaskDesign: 24-hour windows every 25 hours, epsilon 4, labels in clear)
# spends 4 on each hour and at most 8 on a day (two windows can touch one day).
DEFAULT_MAX_EPSILON_PER_HOUR = 8.0
DEFAULT_MAX_EPSILON_PER_DAY = 8.0


@dataclass(frozen=True)
class HourCaps:
    """The owner's caps on the budget spent on one hour and on one (UTC calendar) day of the usage
    log, over every released window and label of every task. 0 means no cap (still accounted)."""

    per_hour: float = 0.0
    per_day: float = 0.0

    def __post_init__(self) -> None:
        for name, v in (("per_hour", self.per_hour), ("per_day", self.per_day)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} cap must be a finite number >= 0 (0: no cap), got {v}")


@dataclass(frozen=True)
class Spend:
    """Epsilon spent per unix hour and per unix day (hour // 24) of the usage log."""

    hours: dict[int, float]
    days: dict[int, float]

    def plus(self, other: Spend) -> Spend:
        return Spend(_add(self.hours, other.hours), _add(self.days, other.days))


def _add(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out


def sample_spend(sample_id: int, spec: TaskSpec) -> Spend:
    """What releasing one sample spends: its features depend on the ``window_hours`` hours before
    the id (the window's end, see ``crowdfl.task``), its label on the ``horizon_hours`` after it.

    Per hour: epsilon on each window hour, label_epsilon on each horizon hour (sequential
    composition). Per day: the sample's epsilon once for each day its window touches, its
    label_epsilon once for each day its horizon touches -- a day's usage is one input to each of
    those two mechanisms, however many of its hours they read.
    """
    end = int(sample_id)
    window = range(end - spec.window_hours, end)
    hours = dict.fromkeys(window, float(spec.epsilon))
    days = dict.fromkeys({t // HOURS_PER_DAY for t in window}, float(spec.epsilon))
    if spec.label_epsilon > 0:
        horizon = range(end, end + spec.horizon_hours)
        hours = _add(hours, dict.fromkeys(horizon, float(spec.label_epsilon)))
        days = _add(days, dict.fromkeys({t // HOURS_PER_DAY for t in horizon}, float(spec.label_epsilon)))
    return Spend(hours, days)


def release_spend(sample_ids: Iterable[int], spec: TaskSpec) -> Spend:
    total = Spend({}, {})
    for sid in sample_ids:
        total = total.plus(sample_spend(int(sid), spec))
    return total


def over_caps(spent: Spend, extra: Spend, caps: HourCaps) -> str | None:
    """Why adding ``extra`` to ``spent`` would exceed the caps, or None if it fits."""
    tol = 1e-9
    if caps.per_hour > 0:
        for h, e in extra.hours.items():
            if spent.hours.get(h, 0.0) + e > caps.per_hour + tol:
                return f"hour {h} would carry epsilon {spent.hours.get(h, 0.0) + e:g} (cap {caps.per_hour:g} per hour)"
    if caps.per_day > 0:
        for d, e in extra.days.items():
            if spent.days.get(d, 0.0) + e > caps.per_day + tol:
                return f"day {d} would carry epsilon {spent.days.get(d, 0.0) + e:g} (cap {caps.per_day:g} per day)"
    return None


def select_within_caps(candidates: Sequence[int], spec: TaskSpec, spent: Spend, caps: HourCaps, limit: int) -> list[int]:
    """Greedily, in the given order, the candidates whose release keeps every hour and day within
    the caps (given what is already spent and what the earlier picks spend)."""
    chosen: list[int] = []
    acc = spent
    for sid in candidates:
        if len(chosen) >= limit:
            break
        extra = sample_spend(int(sid), spec)
        if over_caps(acc, extra, caps) is None:
            chosen.append(int(sid))
            acc = acc.plus(extra)
    return chosen


def releasable(sample_ids: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """The sample ids on the task's stride: windows ending on multiples of ``window_stride_hours``
    (aligned to the clock, so rounds never overlap each other's windows when stride >= window)."""
    stride = int(spec.window_stride_hours)
    return sample_ids[(sample_ids.astype(np.int64) % stride) == 0]


@dataclass(frozen=True)
class PrivacyPolicy:
    """The device owner's limits, from the agent's config."""

    max_epsilon: float = 8.0  # largest per-sample epsilon (features + labels) the owner accepts
    require_label_privacy: bool = False
    # per hour and per day of the usage log, across every release; HourCaps() would switch them off
    caps: HourCaps = HourCaps(DEFAULT_MAX_EPSILON_PER_HOUR, DEFAULT_MAX_EPSILON_PER_DAY)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(f"max_epsilon must be a positive finite number, got {self.max_epsilon}")

    def check(self, spec: TaskSpec) -> None:
        if not np.isfinite(spec.epsilon) or spec.epsilon <= 0:
            raise PrivacyError("bad_epsilon", f"task {spec.task_id[:12]} asks for epsilon {spec.epsilon}")
        if spec.epsilon > self.max_epsilon:
            raise PrivacyError(
                "epsilon_too_large",
                f"task {spec.task_id[:12]} asks for epsilon {spec.epsilon:g} per sample; this device allows "
                f"at most {self.max_epsilon:g} (privacy.max_epsilon in the agent config)",
            )
        if spec.clip_l1 <= 0 or not np.isfinite(spec.clip_l1):
            raise PrivacyError("bad_clip", f"clip_l1 must be positive, got {spec.clip_l1}")
        if not np.isfinite(spec.label_epsilon) or spec.label_epsilon < 0:
            raise PrivacyError("bad_epsilon", f"task {spec.task_id[:12]} asks for label epsilon {spec.label_epsilon}")
        if self.require_label_privacy and spec.label_epsilon == 0:
            raise PrivacyError("labels_in_clear", "this device requires label privacy and the task sends labels as is")
        if self.caps.per_hour > 0 and max(spec.epsilon, spec.label_epsilon) > self.caps.per_hour:
            raise PrivacyError(
                "epsilon_too_large",
                f"task {spec.task_id[:12]} spends {max(spec.epsilon, spec.label_epsilon):g} on an hour with a single sample; "
                f"this device allows {self.caps.per_hour:g} per hour (privacy.max_epsilon_per_hour)",
            )
        if self.caps.per_day > 0:
            one = max(max(sample_spend(e, spec).days.values()) for e in range(HOURS_PER_DAY, 2 * HOURS_PER_DAY))
            if one > self.caps.per_day + 1e-9:
                raise PrivacyError(
                    "epsilon_too_large",
                    f"task {spec.task_id[:12]} spends {one:g} on a day with a single sample; "
                    f"this device allows {self.caps.per_day:g} per day (privacy.max_epsilon_per_day)",
                )
        if spec.window_stride_hours < 1:
            raise PrivacyError("bad_stride", f"window stride must be >= 1 hour, got {spec.window_stride_hours}")
        if spec.epsilon + spec.label_epsilon > self.max_epsilon:
            raise PrivacyError(
                "epsilon_too_large",
                f"features ({spec.epsilon:g}) and labels ({spec.label_epsilon:g}) together exceed this device's "
                f"{self.max_epsilon:g} per sample",
            )


GRID = 2.0**-12  # features in [0, 1] become integers 0..4096


def grid_sensitivity(clip_l1: float, feature_dim: int) -> int:
    """L1 sensitivity, in grid steps, of two prepared vectors after snapping to the grid."""
    return int(math.ceil(sensitivity(clip_l1, feature_dim) / GRID)) + int(feature_dim)


def noise_scale(epsilon: float, clip_l1: float, feature_dim: int) -> float:
    """The scale of the released noise in feature units (GRID x the discrete Laplace scale)."""
    return GRID * grid_sensitivity(clip_l1, feature_dim) / float(epsilon)


class OsRandom(random.Random):
    """The OS CSPRNG (``os.urandom``, as ``secrets`` uses), read 4 KiB at a time: the exact
    sampler asks for a few small random integers per draw, and a system call for each would
    make a release of 768 values take a noticeable time on a Pi."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        super().__init__()

    def seed(self, *args: object, **kwargs: object) -> None:  # nothing to seed: the OS is the source
        return None

    def getstate(self) -> tuple[object, ...]:
        raise NotImplementedError("the OS random source has no state to save")

    def setstate(self, state: object) -> None:
        raise NotImplementedError("the OS random source has no state to restore")

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        n = (k + 7) // 8
        if self._pos + n > len(self._buf):
            self._buf = os.urandom(max(4096, n))
            self._pos = 0
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return int.from_bytes(chunk, "little") >> (8 * n - k)

    def random(self) -> float:
        return self.getrandbits(53) * 2.0**-53


def _bernoulli_exp(n: int, d: int, rng: random.Random) -> bool:
    """True with probability exp(-n/d) for 0 <= n/d <= 1, integers only (CKS 2020, Algorithm 1)."""
    k = 1
    while rng.randrange(d * k) < n:  # Bernoulli(n / (d k))
        k += 1
    return k % 2 == 1


def discrete_laplace(scale: Fraction, rng: random.Random) -> int:
    """An integer z with P(z) ∝ exp(-|z| / scale), exactly (CKS 2020, Algorithm 2).

    The geometric part: with 1/scale = s/t, draw u uniform in [0, t) accepted with probability
    exp(-u/t), and v ~ Geometric(1 - exp(-1)); then (v t + u) // s has P(k) ∝ exp(-k s/t).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    x = 1 / Fraction(scale)
    s, t = x.numerator, x.denominator
    while True:
        while True:
            u = rng.randrange(t)
            if _bernoulli_exp(u, t, rng):
                break
        v = 0
        while _bernoulli_exp(1, 1, rng):
            v += 1
        magnitude = (v * t + u) // s
        negative = rng.randrange(2) == 1
        if negative and magnitude == 0:
            continue  # zero would otherwise be counted twice
        return -magnitude if negative else magnitude


WordSource = Callable[[int], np.ndarray]  # n -> n independent uniform uint64 words


def os_words(n: int) -> np.ndarray:
    """n uniform 64-bit words from the OS CSPRNG (``os.urandom``)."""
    return np.frombuffer(os.urandom(8 * n), dtype="<u8").astype(np.uint64)


_VECTOR_LIMIT = 1 << 40  # s and t below this: d * k stays far inside uint64 for any k < 2**23
_K_SCALAR = 64  # a Bernoulli-exp chain this long (probability < 1/63!) continues in Python ints


def _uniform_below(m: np.ndarray, words: WordSource) -> np.ndarray:
    """Exactly uniform integers in [0, m) per element (uint64 m >= 1), by rejection: a word w is
    kept when w // m < floor(2^64 / m), so every residue w % m is equally likely."""
    m = m.astype(np.uint64)
    last = (np.uint64(0) - m) // m  # floor(2^64 / m) - 1 = floor((2^64 - m) / m): no overflow, even for m = 1
    out = np.empty(m.shape, np.uint64)
    todo = np.arange(m.size)
    while todo.size:
        w = words(todo.size)
        ok = (w // m[todo]) <= last[todo]
        out[todo[ok]] = w[ok] % m[todo[ok]]
        todo = todo[~ok]
    return out


def _bernoulli_exp_batch(n: np.ndarray, d: int, words: WordSource) -> np.ndarray:
    """True with probability exp(-n/d) per element, 0 <= n <= d (CKS 2020, Algorithm 1, batched:
    each element runs its own chain k = 1, 2, ... while uniform[0, d k) < n; true if k ends odd)."""
    n = n.astype(np.uint64)
    k = np.ones(n.shape, np.uint64)
    active = np.arange(n.size)
    while active.size:
        u = _uniform_below(np.uint64(d) * k[active], words)
        go = u < n[active]
        k[active[go]] += np.uint64(1)
        active = active[go]
        long = active[k[active] >= _K_SCALAR]
        if long.size:  # continue these chains exactly in Python ints (never seen in practice)
            for i in long.tolist():
                kk = int(k[i])
                while int(_uniform_below(np.array([d * kk], np.uint64), words)[0]) < int(n[i]):
                    kk += 1
                k[i] = kk
            active = active[k[active] < _K_SCALAR]
    return (k % np.uint64(2)) == np.uint64(1)


def discrete_laplace_batch(scale: Fraction, size: int, words: WordSource = os_words) -> np.ndarray:
    """``size`` independent draws of `discrete_laplace` (the same exact algorithm, CKS 2020
    Algorithm 2, on integers only), run for all values at once with numpy on uniform 64-bit words
    (the OS CSPRNG by default): a release of 1,024 values takes a few numpy passes instead of
    thousands of Python-level random calls. Falls back to the scalar sampler when the scale's
    fraction is too long for uint64 arithmetic."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    x = 1 / Fraction(scale)
    s, t = x.numerator, x.denominator
    if s >= _VECTOR_LIMIT or t >= _VECTOR_LIMIT:
        src = OsRandom() if words is os_words else _WordsRandom(words)
        return np.fromiter((discrete_laplace(Fraction(scale), src) for _ in range(size)), np.int64, count=size)
    # Each candidate below is an independent run of the algorithm; a run that rejects is simply not
    # used. Candidates are drawn in batches larger than what is missing and the accepted ones taken
    # in index order (a choice that does not look at the values), so most releases need one pass.
    parts: list[np.ndarray] = []
    have = 0
    while have < size:
        m = int((size - have) * 1.7) + 16
        u = _uniform_below(np.full(m, t, np.uint64), words)
        u = u[_bernoulli_exp_batch(u, t, words)]
        v = np.zeros(u.size, np.uint64)  # Geometric(1 - exp(-1)): successes before a failure
        alive = np.arange(u.size)
        while alive.size:
            b = _bernoulli_exp_batch(np.ones(alive.size, np.uint64), 1, words)
            v[alive[b]] += np.uint64(1)
            alive = alive[b]
        magnitude = ((v * np.uint64(t) + u) // np.uint64(s)).astype(np.int64)
        negative = (words(u.size) & np.uint64(1)) == np.uint64(1)
        ok = ~(negative & (magnitude == 0))  # zero would otherwise be counted twice
        z = np.where(negative, -magnitude, magnitude)[ok][: size - have]
        parts.append(z)
        have += z.size
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class _WordsRandom(random.Random):
    """A `random.Random` on a word source (the scalar fallback of `discrete_laplace_batch`)."""

    def __init__(self, words: WordSource) -> None:
        self._words = words
        super().__init__()

    def seed(self, *args: object, **kwargs: object) -> None:
        return None

    def getrandbits(self, k: int) -> int:
        n = (k + 63) // 64
        value = 0
        for w in self._words(n).tolist():
            value = (value << 64) | int(w)
        return value >> (64 * n - k)

    def random(self) -> float:
        return self.getrandbits(53) * 2.0**-53


def simulated_discrete_laplace(scale: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """The same distribution, vectorised, from a seeded numpy Generator: the difference of two
    geometric variables. For simulations and benchmarks only; a device uses `discrete_laplace`."""
    p = -math.expm1(-1.0 / scale)  # P(success) of the geometric on {1, 2, ...}
    return (rng.geometric(p, size) - rng.geometric(p, size)).astype(np.int64)


def privatise_features(
    features: np.ndarray, spec: TaskSpec, rng: np.random.Generator | random.Random | None = None
) -> np.ndarray:
    """Normalise, clip, snap to the grid and add discrete Laplace noise: what leaves the device.

    The noise comes from the OS CSPRNG unless ``rng`` is given (a device passes nothing): the exact
    sampler batched with numpy (`discrete_laplace_batch`). A ``random.Random`` runs the same exact
    sampler one value at a time from that source (tests), a numpy Generator the vectorised
    simulation of the same distribution (benchmarks that release millions of values).
    """
    x = prepare_features(features, spec.feature_scale, spec.clip_l1)
    if math.isinf(spec.epsilon) and spec.epsilon > 0:
        return x  # no noise: the benchmarks' noiseless reference (PrivacyPolicy refuses it on a device)
    if not (math.isfinite(spec.epsilon) and spec.epsilon > 0):
        raise PrivacyError("bad_epsilon", f"cannot release with epsilon {spec.epsilon}")
    q = np.rint(x.astype(np.float64) / GRID).astype(np.int64)
    scale = Fraction(grid_sensitivity(spec.clip_l1, x.shape[1])) / Fraction(spec.epsilon)
    if isinstance(rng, np.random.Generator):
        z = simulated_discrete_laplace(float(scale), q.size, rng)
    elif rng is None:  # a device: the exact sampler, batched, on the OS CSPRNG
        z = discrete_laplace_batch(scale, q.size)
    else:
        z = np.fromiter((discrete_laplace(scale, rng) for _ in range(q.size)), dtype=np.int64, count=q.size)
    return ((q + z.reshape(q.shape)).astype(np.float64) * GRID).astype(np.float32)


def randomised_response(labels: np.ndarray, num_classes: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """k-ary randomised response: keep the label with probability e^eps / (e^eps + k - 1)."""
    if epsilon <= 0:
        return labels.copy()
    keep = np.exp(epsilon) / (np.exp(epsilon) + num_classes - 1)
    other = rng.integers(0, num_classes - 1, size=labels.shape)
    other = other + (other >= labels)  # uniform over the k - 1 other classes
    flip = rng.random(labels.shape) >= keep
    return np.where(flip, other, labels).astype(labels.dtype)
