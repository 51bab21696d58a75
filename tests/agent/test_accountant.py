"""The per-hour privacy accountant: pure spend arithmetic, its SQLite ledger, and the agent's refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.privacy import (
    HOURS_PER_DAY, HourCaps, PrivacyPolicy, Spend, over_caps, release_spend, releasable, sample_spend, select_within_caps,
)
from agent.state import AgentState
from crowdfl.errors import PrivacyError
from tests.helpers import make_spec

H0 = 490_000 * 24  # a unix hour at midnight UTC


def test_one_sample_spends_epsilon_on_each_window_hour_and_label_epsilon_on_each_horizon_hour() -> None:
    spec = make_spec(epsilon=2.0, label_epsilon=1.0, window_hours=24, horizon_hours=6)
    s = sample_spend(H0 + 30, spec)
    assert s.hours == {h: 2.0 for h in range(H0 + 6, H0 + 30)} | {h: 1.0 for h in range(H0 + 30, H0 + 36)}
    # the window touches days 0 and 1, the horizon day 1: each mechanism counted once per day
    d0 = H0 // HOURS_PER_DAY
    assert s.days == {d0: 2.0, d0 + 1: 3.0}
    clear = sample_spend(H0 + 30, make_spec(epsilon=2.0, label_epsilon=0.0))
    assert set(clear.hours) == set(range(H0 + 6, H0 + 30))  # labels in clear are not a DP spend


def test_sliding_windows_multiply_an_hours_budget_and_the_stride_removes_it() -> None:
    spec = make_spec(epsilon=4.0, window_hours=24)
    ids = np.arange(H0 + 24, H0 + 24 * 8, dtype=np.uint64)
    sliding = release_spend(ids.tolist(), spec)
    assert max(sliding.hours.values()) == pytest.approx(24 * 4.0)  # every hour in 24 windows
    strided = make_spec(epsilon=4.0, window_hours=24, window_stride_hours=24)
    kept = releasable(ids, strided)
    assert len(kept) == 7 and (kept % 24 == 0).all()
    spend = release_spend(kept.tolist(), strided)
    assert max(spend.hours.values()) == pytest.approx(4.0)  # non-overlapping: each hour carries epsilon once
    assert max(spend.days.values()) == pytest.approx(4.0)  # and, aligned to midnight, each day too


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(H0, H0 + 24 * 20), min_size=1, max_size=60, unique=True), st.floats(1.0, 30.0), st.floats(1.0, 90.0))
def test_greedy_selection_never_exceeds_the_caps(ids: list[int], per_hour: float, per_day: float) -> None:
    spec = make_spec(epsilon=1.0, label_epsilon=0.5, window_hours=12, horizon_hours=3)
    caps = HourCaps(per_hour, per_day)
    already = Spend({H0 + 5: per_hour / 2}, {H0 // 24: per_day / 3})
    chosen = select_within_caps(ids, spec, already, caps, limit=40)
    total = already.plus(release_spend(chosen, spec))
    assert max(total.hours.values()) <= per_hour + 1e-9
    assert max(total.days.values()) <= per_day + 1e-9
    # greedy is maximal: every candidate left out (below the limit) would break a cap
    if len(chosen) < 40:
        for sid in set(ids) - set(chosen):
            assert over_caps(total, sample_spend(sid, spec), caps) is not None


def test_the_ledger_accumulates_and_refuses_atomically(tmp_path: Path) -> None:
    spec = make_spec(epsilon=3.0, window_hours=4, horizon_hours=1)
    caps = HourCaps(per_hour=6.0)
    st_ = AgentState(tmp_path / "s.sqlite")
    try:
        st_.release("t", 1, [H0 + 4], 3.0, "x", lambda s: b"a", spend=release_spend([H0 + 4], spec), caps=caps)
        st_.release("t", 1, [H0 + 5], 3.0, "x", lambda s: b"b", spend=release_spend([H0 + 5], spec), caps=caps)
        assert st_.spent_epsilon() == pytest.approx(6.0)  # hours H0+1..H0+3 are in both windows
        before = (st_.budget(), st_.pending(), st_.hour_budget())
        with pytest.raises(PrivacyError, match="cap 6 per hour"):
            st_.release("t", 2, [H0 + 6], 3.0, "x", lambda s: b"c", spend=release_spend([H0 + 6], spec), caps=caps)
        assert (st_.budget(), st_.pending(), st_.hour_budget()) == before  # nothing of the refused release stays
        assert len(st_.unreleased(np.array([H0 + 6], np.uint64))) == 1
        st_.release("t", 2, [H0 + 8], 3.0, "x", lambda s: b"d", spend=release_spend([H0 + 8], spec), caps=caps)  # disjoint window
        report = st_.hour_budget()
        assert report.max_epsilon_per_hour == pytest.approx(6.0) and report.hours_accounted == 8
        assert report.busiest_hour == H0 + 1
    finally:
        st_.close()
    reopened = AgentState(tmp_path / "s.sqlite")  # the ledger is durable
    try:
        assert reopened.spent(range(H0, H0 + 9), [H0 // 24]).hours[H0 + 2] == pytest.approx(6.0)
        assert reopened.spent_epsilon() == pytest.approx(6.0)
    finally:
        reopened.close()


def test_policy_refuses_a_task_whose_single_sample_exceeds_the_hour_cap() -> None:
    with pytest.raises(PrivacyError, match="per hour"):
        PrivacyPolicy(8.0, caps=HourCaps(per_hour=2.0)).check(make_spec(epsilon=4.0))
    PrivacyPolicy(8.0, caps=HourCaps(per_hour=4.0)).check(make_spec(epsilon=4.0))
    # a sample whose window and label horizon share a day spends both on it: refused by the day cap
    with pytest.raises(PrivacyError, match="per day"):
        PrivacyPolicy(8.0, caps=HourCaps(per_hour=4.0, per_day=5.0)).check(make_spec(epsilon=3.0, label_epsilon=3.0))
    PrivacyPolicy(8.0, caps=HourCaps(per_hour=4.0, per_day=6.0)).check(make_spec(epsilon=3.0, label_epsilon=3.0))
    with pytest.raises(ValueError):
        HourCaps(per_hour=-1.0)


@pytest.mark.parametrize("window,stride,horizon,label_eps", [(24, 1, 6, 0.0), (24, 24, 6, 0.0), (24, 24, 6, 1.0), (24, 6, 6, 0.5), (12, 8, 3, 0.0), (24, 48, 6, 2.0)])
def test_the_task_bound_is_what_the_ledger_charges_for_releasing_every_window(window: int, stride: int, horizon: int, label_eps: float) -> None:
    """crowdfl.task.task_spend_bound (what the customer page states per task) equals the largest
    spend the agent's own accounting reaches when a device releases every window on the stride."""
    from crowdfl.task import task_spend_bound

    spec = make_spec(epsilon=4.0, label_epsilon=label_eps, window_hours=window, horizon_hours=horizon, window_stride_hours=stride)
    ids = releasable(np.arange(H0, H0 + 24 * 30, dtype=np.uint64), spec)
    spend = release_spend(ids.tolist(), spec)
    # hours and days far from the ends of the range see every window that can reach them
    inner_h = [e for h, e in spend.hours.items() if H0 + 24 * 5 <= h < H0 + 24 * 25]
    inner_d = [e for d, e in spend.days.items() if H0 // 24 + 5 <= d < H0 // 24 + 25]
    assert task_spend_bound(spec) == pytest.approx((max(inner_h), max(inner_d)))

