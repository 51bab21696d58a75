"""The learning task on household usage logs, shared by the agent and the servers (numpy only).

A sample is the last ``window_hours`` of hourly energy per device kind, plus four clock channels
(hour of day and day of week as sine/cosine). Its label is the household's consumption class over
the next ``horizon_hours``: the total energy, binned by the task's class edges. A sample's id is
the unix hour at which its window ends, unique per device, so the agent can release each sample
exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .messages import TaskSpec

HOUR_S = 3600


@dataclass(frozen=True)
class Samples:
    """Model inputs built from one household's hourly log."""

    ids: np.ndarray  # uint64 unix hour at the end of each window
    inputs: np.ndarray  # float32 (n, window_hours, kinds + 4)
    labels: np.ndarray  # int8 (n,)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: np.ndarray) -> Samples:
        return Samples(self.ids[idx], self.inputs[idx], self.labels[idx])


def clock_channels(unix_hours: np.ndarray) -> np.ndarray:
    """(n,) unix hours -> (n, 4) float32: sin/cos of hour of day and of day of week."""
    h = unix_hours.astype(np.float64)
    hod = 2 * np.pi * (h % 24) / 24
    # 1970-01-01 was a Thursday: shift so Monday is day 0
    dow = 2 * np.pi * (((h // 24) + 3) % 7) / 7
    return np.stack([np.sin(hod), np.cos(hod), np.sin(dow), np.cos(dow)], axis=1).astype(np.float32)


def consumption_class(total_wh: np.ndarray, edges_wh: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges_wh, total_wh, side="right").astype(np.int8)


def normalise_inputs(hourly_wh: np.ndarray, input_scale: np.ndarray) -> np.ndarray:
    return (np.log1p(np.maximum(hourly_wh, 0.0)) / input_scale).astype(np.float32)


def build_samples(
    hourly_wh: np.ndarray,
    first_hour: int,
    window_hours: int,
    horizon_hours: int,
    edges_wh: np.ndarray,
    input_scale: np.ndarray,
) -> Samples:
    """Every complete (window, horizon) position of an hourly log of shape (hours, kinds)."""
    hourly_wh = np.asarray(hourly_wh, dtype=np.float64)
    if hourly_wh.ndim != 2 or hourly_wh.shape[1] != input_scale.shape[0]:
        raise ValueError(f"hourly log shape {hourly_wh.shape} does not match {input_scale.shape[0]} device kinds")
    hours = hourly_wh.shape[0]
    n = hours - window_hours - horizon_hours + 1
    if n <= 0:
        kinds = input_scale.shape[0]
        return Samples(
            np.zeros(0, np.uint64),
            np.zeros((0, window_hours, kinds + 4), np.float32),
            np.zeros(0, np.int8),
        )
    norm = normalise_inputs(hourly_wh, input_scale)
    clock = clock_channels(first_hour + np.arange(hours))
    full = np.concatenate([norm, clock], axis=1)
    idx = np.arange(n)[:, None] + np.arange(window_hours)[None, :]
    inputs = full[idx]
    totals = np.cumsum(np.concatenate([[0.0], hourly_wh.sum(axis=1)]))
    future = totals[window_hours + horizon_hours : window_hours + horizon_hours + n] - totals[window_hours : window_hours + n]
    labels = consumption_class(future, edges_wh)
    ids = (first_hour + window_hours + np.arange(n)).astype(np.uint64)
    return Samples(ids, inputs, labels)


def task_samples(spec: TaskSpec, hourly_wh: np.ndarray, first_hour: int) -> Samples:
    return build_samples(
        hourly_wh, first_hour, spec.window_hours, spec.horizon_hours, spec.class_edges_wh, spec.input_scale
    )


def prepare_features(features: np.ndarray, feature_scale: np.ndarray, clip_l1: float) -> np.ndarray:
    """The paper's normalisation before the noise: scale, box-clip to [0, 1], then L1-clip.

    Bounding each vector this way is what bounds the Laplace mechanism's sensitivity (see
    ``agent.privacy``). The coordinator applies the same transform to clean held-out features.
    """
    x = np.clip(np.asarray(features, np.float32) / feature_scale, 0.0, 1.0)
    norms = np.abs(x).sum(axis=1, keepdims=True)
    factor = np.minimum(1.0, clip_l1 / np.maximum(norms, 1e-12))
    return (x * factor).astype(np.float32)


def sensitivity(clip_l1: float, feature_dim: int) -> float:
    """L1 sensitivity of a vector after ``prepare_features`` (see ``agent.privacy``)."""
    return float(min(2.0 * clip_l1, float(feature_dim)))


def laplace_scale(epsilon: float, clip_l1: float, feature_dim: int) -> float:
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    return sensitivity(clip_l1, feature_dim) / epsilon


HOURS_PER_DAY = 24
MAX_BOUND_PERIOD_HOURS = 24 * 24 * 7  # longer release patterns get a closed-form upper bound instead


def task_spend_bound(spec: TaskSpec) -> tuple[float, float]:
    """(per hour, per UTC day): the most epsilon one task can put on one hour and on one day of a
    household's usage if its device releases every window on the task's stride.

    The same accounting as the agent's ledger (``agent.privacy.sample_spend``): a released sample
    spends ``epsilon`` on each of the ``window_hours`` hours before its id and ``label_epsilon`` on
    each of the ``horizon_hours`` after it; per day, each of the two once for every day it touches.
    The release pattern repeats every lcm(stride, 24) hours, so the maximum over one period is the
    maximum over all time. Pure; what the coordinator's customer page states for a task. (For a
    pattern longer than ``MAX_BOUND_PERIOD_HOURS``: the closed-form bound of counting every window
    that could touch the hour or day, which is never below the exact figure.)
    """
    import math

    s, w, hz = int(spec.window_stride_hours), int(spec.window_hours), int(spec.horizon_hours)
    if s < 1 or w < 1 or hz < 0:
        raise ValueError(f"bad window/stride/horizon: {w}/{s}/{hz}")
    eps, leps = float(spec.epsilon), float(spec.label_epsilon) if spec.label_epsilon > 0 else 0.0
    period = math.lcm(s, HOURS_PER_DAY)
    if period > MAX_BOUND_PERIOD_HOURS:
        per_hour = eps * math.ceil(w / s) + leps * math.ceil(hz / s)
        per_day = eps * math.ceil((HOURS_PER_DAY - 1 + w) / s) + leps * math.ceil((HOURS_PER_DAY - 1 + hz) / s)
        return float(per_hour), float(per_day)
    hours = np.zeros(period, np.float64)
    days = np.zeros(period // HOURS_PER_DAY, np.float64)
    # every id whose window or horizon reaches into [0, period)
    first = -((hz + s) // s) * s
    for end in range(first, period + w + s, s):
        for lo, hi, e in ((end - w, end, eps), (end, end + hz, leps)):
            if e == 0 or hi <= lo:
                continue
            a, b = max(lo, 0), min(hi, period)
            if a < b:
                hours[a:b] += e
            for day in range(lo // HOURS_PER_DAY, (hi - 1) // HOURS_PER_DAY + 1):
                if 0 <= day < len(days):
                    days[day] += e
    return float(hours.max()), float(days.max())
