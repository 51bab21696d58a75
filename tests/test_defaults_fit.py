"""The owner's default privacy caps (agent) and the manufacturer's default task (coordinator) fit
each other. It imports both roles, so it lives here rather than in tests/agent, which also runs on
the agent-only interpreters (Python 3.10, where the coordinator refuses to import)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.privacy import HourCaps, PrivacyPolicy, Spend, release_spend, releasable, select_within_caps
from tests.helpers import make_spec

H0 = 490_000 * 24  # a unix hour at midnight UTC


def test_the_default_task_and_the_default_caps_fit_each_other() -> None:
    """The owner's defaults cap every hour and every day, and the default task stays within them:
    its windows do not overlap, so each hour carries epsilon, and at most two touch one day."""
    from agent.config import PrivacySettings
    from coordinator.task_model import TaskDesign
    from crowdfl.task import task_spend_bound

    cfg = PrivacySettings()
    assert cfg.max_epsilon_per_hour > 0 and cfg.max_epsilon_per_day > 0  # caps are on
    assert PrivacyPolicy().caps == HourCaps(cfg.max_epsilon_per_hour, cfg.max_epsilon_per_day)
    d = TaskDesign()
    assert d.window_stride_hours >= d.window_hours
    spec = make_spec(epsilon=d.epsilon, label_epsilon=d.label_epsilon, window_hours=d.window_hours,
                     horizon_hours=d.horizon_hours, window_stride_hours=d.window_stride_hours)
    per_hour, per_day = task_spend_bound(spec)
    assert (per_hour, per_day) == pytest.approx((d.epsilon, 2 * d.epsilon))
    ends = releasable(np.arange(H0, H0 + 24 * 25, dtype=np.uint64), spec) % 24
    assert sorted(set(ends.tolist())) == list(range(24))  # windows end at every hour of the day in turn
    assert per_hour <= cfg.max_epsilon_per_hour and per_day <= cfg.max_epsilon_per_day
    PrivacyPolicy().check(spec)  # the default device accepts the default task
    # and releasing every window of it never hits a cap: the budget, not the caps, is the limit
    ids = releasable(np.arange(H0, H0 + 24 * 60, dtype=np.uint64), spec)
    assert select_within_caps(ids.tolist(), spec, Spend({}, {}), PrivacyPolicy().caps, len(ids)) == ids.tolist()
    # while a task sliding its windows by an hour is held to two windows per hour by the same caps
    sliding = make_spec(epsilon=d.epsilon, window_hours=24)
    all_ids = np.arange(H0 + 24, H0 + 24 * 21, dtype=np.uint64)
    chosen = select_within_caps(all_ids.tolist(), sliding, Spend({}, {}), PrivacyPolicy().caps, len(all_ids))
    total = release_spend(chosen, sliding)
    assert max(total.hours.values()) <= cfg.max_epsilon_per_hour and max(total.days.values()) <= cfg.max_epsilon_per_day
    assert len(chosen) < len(all_ids) / 10
