"""The durable local log of device-usage reports (SQLite in WAL mode).

Reports are what smart plugs publish: a cumulative energy meter and the current power. The log
keeps them as received (idempotently: one row per device and timestamp) and derives hourly
energy per device kind from the meter deltas. Retention limits keep the SD card from filling.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crowdfl.devices import PlugReport

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,
    power_w REAL NOT NULL,
    energy_total_kwh REAL NOT NULL,
    is_on INTEGER NOT NULL,
    PRIMARY KEY (device_id, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reports_ts ON reports (ts);
"""


MAX_POWER_W = 100_000.0  # no household circuit draws 100 kW; a larger value is a corrupt reading
MAX_METER_KWH = 1e9


@dataclass(frozen=True)
class Retention:
    max_age_days: float = 120.0
    max_rows: int = 2_000_000


# a report from the future (a clock jump on a board without RTC, a bad import) would make the agent
# build windows up to that time and burn those sample ids before the hours happen
MAX_CLOCK_SKEW_S = 3600.0


def validate_report(r: PlugReport, kinds: Sequence[str] | None = None, now: float | None = None) -> None:
    """Raise ValueError naming what is wrong with a report from outside."""
    if not r.device_id or len(r.device_id) > 128:
        raise ValueError("device_id must be 1..128 characters")
    if kinds is not None and r.kind not in kinds:
        raise ValueError(f"unknown device kind {r.kind!r}")
    for name, v in (("ts", r.ts), ("power_w", r.power_w), ("energy_total_kwh", r.energy_total_kwh)):
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if r.power_w < 0 or r.energy_total_kwh < 0:
        raise ValueError("power and energy must be non-negative")
    if r.power_w > MAX_POWER_W or r.energy_total_kwh > MAX_METER_KWH:
        raise ValueError(f"implausible reading: {r.power_w:g} W, meter {r.energy_total_kwh:g} kWh")
    if not 1_000_000_000 < r.ts < 10_000_000_000:
        raise ValueError(f"timestamp {r.ts} is not a plausible unix time")
    limit = (time.time() if now is None else now) + MAX_CLOCK_SKEW_S
    if r.ts > limit:
        raise ValueError(f"timestamp {r.ts:.0f} lies {r.ts - limit + MAX_CLOCK_SKEW_S:.0f} s in the future")


class UsageLog:
    """One SQLite file; safe to use from several threads of one process."""

    def __init__(self, path: Path | str, retention: Retention = Retention()) -> None:
        self.path = str(path)
        self.retention = retention
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, reports: Iterable[PlugReport]) -> int:
        """Insert reports (duplicates are ignored); returns how many rows were new."""
        rows = [
            (r.device_id, r.kind, float(r.ts), float(r.power_w), float(r.energy_total_kwh), int(bool(r.on)))
            for r in reports
        ]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR IGNORE INTO reports VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                # e.g. the disk is full: without this the open transaction would make every later
                # BEGIN fail, and the log would take nothing in even after space came back
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])

    def span(self) -> tuple[float, float] | None:
        with self._lock:
            lo, hi = self._db.execute("SELECT MIN(ts), MAX(ts) FROM reports").fetchone()
        return None if lo is None else (float(lo), float(hi))

    def hourly(self, kinds: Sequence[str], first_hour: int, hours: int) -> np.ndarray:
        """Energy (Wh) per hour and kind over [first_hour, first_hour + hours), from meter deltas.

        A delta between consecutive reports of one device is attributed to the hour in which the
        later report falls. A meter that goes backwards (plug reset) contributes nothing.
        """
        out = np.zeros((hours, len(kinds)), dtype=np.float64)
        index = {k: i for i, k in enumerate(kinds)}
        lo = (first_hour * 3600) - 24 * 3600  # one day earlier so the first delta has its predecessor
        hi = (first_hour + hours) * 3600
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, kind, ts, energy_total_kwh FROM reports WHERE ts > ? AND ts <= ? ORDER BY device_id, ts",
                (lo, hi),
            ).fetchall()
        if not rows:
            return out
        dev = np.array([r[0] for r in rows])
        kind_idx = np.array([index.get(r[1], -1) for r in rows])
        ts = np.array([r[2] for r in rows])
        meter = np.array([r[3] for r in rows])
        same = dev[1:] == dev[:-1]
        delta_wh = np.where(same, np.maximum(meter[1:] - meter[:-1], 0.0) * 1000.0, 0.0)
        hour = np.floor((ts[1:] - 1e-6) / 3600).astype(np.int64) - first_hour
        ok = same & (hour >= 0) & (hour < hours) & (kind_idx[1:] >= 0)
        np.add.at(out, (hour[ok], kind_idx[1:][ok]), delta_wh[ok])
        return out

    def prune(self, now: float | None = None) -> int:
        """Apply the retention limits; returns the number of rows removed."""
        now = time.time() if now is None else now
        cutoff = now - self.retention.max_age_days * 86400
        with self._lock:
            before = self._db.total_changes
            self._db.execute("DELETE FROM reports WHERE ts < ?", (cutoff,))
            n = int(self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])
            if n > self.retention.max_rows:
                excess = n - self.retention.max_rows
                self._db.execute(
                    "DELETE FROM reports WHERE (device_id, ts) IN "
                    "(SELECT device_id, ts FROM reports ORDER BY ts LIMIT ?)",
                    (excess,),
                )
            removed = self._db.total_changes - before
        if removed:
            log.info("usage log retention removed %d old reports", removed)
        return removed
