"""agent.state and agent.usage_log: release once, atomically; spool until acknowledged."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from agent.state import AgentState, SpoolFull
from agent.usage_log import Retention, UsageLog, validate_report
from crowdfl.errors import PrivacyError
from crowdfl.household import PlugReport


def test_each_sample_is_released_once(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s.sqlite")
    ids = np.arange(10, dtype=np.uint64)
    before = time.time_ns() // 1000
    seq = st.release("t", 1, ids[:4], 2.0, "topic", lambda s: b"env%d" % s)
    assert before <= seq <= time.time_ns() // 1000  # a new database counts from the clock (µs)
    assert list(st.unreleased(ids)) == list(range(4, 10))
    with pytest.raises(PrivacyError, match="already_released"):
        st.release("t", 2, ids[3:6], 2.0, "topic", lambda s: b"x")
    # the refused release changed nothing
    assert list(st.unreleased(ids)) == list(range(4, 10))
    assert [p.seq for p in st.pending()] == [seq]
    b = st.budget()
    assert b.samples_released == 4 and b.max_epsilon_per_sample == 2.0 and b.total_epsilon == 8.0


def test_a_failing_seal_rolls_everything_back(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s.sqlite")

    def boom(seq: int) -> bytes:
        raise RuntimeError("power cut")

    first = st.release("t", 1, [0], 1.0, "topic", lambda s: b"first")
    with pytest.raises(RuntimeError):
        st.release("t", 1, [1, 2], 1.0, "topic", boom)
    assert len(st.unreleased(np.array([1, 2], np.uint64))) == 2
    assert [p.seq for p in st.pending()] == [first]
    assert st.release("t", 1, [1, 2], 1.0, "topic", lambda s: b"ok") == first + 1  # the seq was not consumed


def test_state_survives_reopen_and_acks_remove(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    st = AgentState(path)
    one = st.release("t", 1, [1], 1.0, "a", lambda s: b"one")
    two = st.release("t", 1, [2], 1.0, "a", lambda s: b"two")
    assert two == one + 1
    st.close()
    st = AgentState(path)
    assert [p.payload for p in st.pending()] == [b"one", b"two"]
    assert st.acknowledge([one, 99]) == 1
    assert [p.seq for p in st.pending()] == [two]
    assert st.release("t", 1, [3], 1.0, "a", lambda s: b"three") == two + 1  # reopened: counts on, not from the clock


def test_spool_is_bounded(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s.sqlite", max_spool_bytes=10)
    st.release("t", 1, [1], 1.0, "a", lambda s: b"x" * 20)
    with pytest.raises(SpoolFull):
        st.release("t", 1, [2], 1.0, "a", lambda s: b"y")
    assert len(st.unreleased(np.array([2], np.uint64))) == 1


def _reports(device: str, start: float, n: int, wh_per_report: float) -> list[PlugReport]:
    return [PlugReport(device, "fridge", start + 900 * (i + 1), wh_per_report * 4, wh_per_report * (i + 1) / 1000, True) for i in range(n)]


def test_usage_log_hourly_from_meter_deltas(tmp_path: Path) -> None:
    log = UsageLog(tmp_path / "u.sqlite")
    start = 1_790_000_000 - (1_790_000_000 % 3600)
    assert log.append(_reports("plug1", start, 16, 25.0)) == 16
    assert log.append(_reports("plug1", start, 16, 25.0)) == 0  # idempotent
    hourly = log.hourly(("fridge", "tv"), start // 3600, 4)
    # the first report has no predecessor, so hour 0 sees 3 deltas of 25 Wh
    assert hourly[:, 0] == pytest.approx([75.0, 100.0, 100.0, 100.0])
    assert hourly[:, 1].tolist() == [0.0] * 4


def test_usage_log_retention(tmp_path: Path) -> None:
    log = UsageLog(tmp_path / "u.sqlite", Retention(max_age_days=1, max_rows=5))
    start = 1_790_000_000.0
    log.append(_reports("p", start, 10, 1.0))
    removed = log.prune(now=start + 900 * 10)
    assert removed == 5 and log.count() == 5
    log.append(_reports("q", start + 5 * 86400, 2, 1.0))
    assert log.prune(now=start + 5 * 86400 + 3600) == 5  # older than a day


@pytest.mark.parametrize(
    "bad",
    [
        PlugReport("", "fridge", 1.8e9, 1, 1, True),
        PlugReport("d", "toaster", 1.8e9, 1, 1, True),
        PlugReport("d", "fridge", float("nan"), 1, 1, True),
        PlugReport("d", "fridge", 1.8e9, -1, 1, True),
        PlugReport("d", "fridge", 12.0, 1, 1, True),
    ],
)
def test_validate_report_rejects(bad: PlugReport) -> None:
    with pytest.raises(ValueError):
        validate_report(bad, ("fridge",))


def test_reports_from_the_future_are_refused() -> None:
    import time

    now = time.time()
    validate_report(PlugReport("d", "fridge", now + 60, 1, 1, True), ("fridge",))  # small skew is fine
    with pytest.raises(ValueError, match="in the future"):
        validate_report(PlugReport("d", "fridge", now + 86400, 1, 1, True), ("fridge",))


def test_a_lost_state_database_does_not_restart_the_sequence(tmp_path: Path) -> None:
    """Before: a new database counted from 1 again, and the edge refused every envelope as
    seq_reuse (it keeps (device, seq) for ever), so a device with a replaced SD card never got
    another batch through."""
    old = AgentState(tmp_path / "old.sqlite")
    used = [old.release("t", 1, [i], 1.0, "topic", lambda s: b"x%d" % s) for i in range(5)]
    old.close()
    (tmp_path / "old.sqlite").unlink()  # the card is wiped
    new = AgentState(tmp_path / "new.sqlite")
    again = new.release("t", 2, [100], 1.0, "topic", lambda s: b"y")
    assert again > max(used)
    assert new.release("t", 2, [101], 1.0, "topic", lambda s: b"z") == again + 1
