"""Training samples from the usage log: windows of hourly energy per device kind."""

from __future__ import annotations

import math

import numpy as np

from crowdfl.messages import TaskSpec
from crowdfl.task import Samples, task_samples

from .usage_log import UsageLog


def samples_from_log(usage_log: UsageLog, spec: TaskSpec) -> Samples:
    """All complete samples the log supports (whole hours between its first and last report)."""
    span = usage_log.span()
    if span is None:
        return task_samples(spec, np.zeros((0, len(spec.device_kinds))), 0)
    first_hour = math.floor(span[0] / 3600) + 1  # the first hour may be partial: skip it
    last_hour = math.floor(span[1] / 3600)  # exclusive: the hour still being logged
    hours = max(0, last_hour - first_hour)
    hourly = usage_log.hourly(spec.device_kinds, first_hour, hours)
    return task_samples(spec, hourly, first_hour)
