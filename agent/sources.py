"""Where usage reports come from, behind one interface.

``SimulatedSource`` plays a generated household (tests, demos, bench); ``JsonLinesImport`` reads a
file exported from another logger. Every report from outside is validated; bad lines are logged
with their line number and skipped, never stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from crowdfl.household import HouseholdProfile, PlugReport, plug_reports, timeline_usage

from .usage_log import validate_report

log = logging.getLogger(__name__)


class UsageSource(Protocol):
    def poll(self, now: float) -> list[PlugReport]:
        """Reports that became available up to ``now`` (unix seconds)."""
        ...


@dataclass
class SimulatedSource:
    """A generated household whose plugs report every ``interval_s`` seconds.

    It plays one fixed timeline of the household (``seed``), so polling often or rarely gives the
    same history.
    """

    profile: HouseholdProfile
    start: datetime
    interval_s: int
    seed: int
    _emitted_until: float = 0.0
    _offset_kwh: dict[str, float] | None = None

    def backfill(self, days: int) -> list[PlugReport]:
        """``days`` of history starting at ``start`` (a new agent's first import)."""
        end = self.start + timedelta(days=days)
        return self.poll(end.timestamp())

    def poll(self, now: float) -> list[PlugReport]:
        begin = max(self.start.timestamp(), self._emitted_until)
        intervals = int((now - begin) // self.interval_s)
        if intervals <= 0:
            return []
        first = datetime.fromtimestamp(begin, tz=self.start.tzinfo)
        matrix = timeline_usage(self.profile, self.seed, first, intervals, self.interval_s)
        reports = plug_reports(self.profile, matrix, first, self.interval_s)
        # keep every plug's meter cumulative across polls
        offsets = self._offset_kwh or {}
        if offsets:
            reports = [
                PlugReport(r.device_id, r.kind, r.ts, r.power_w, r.energy_total_kwh + offsets.get(r.device_id, 0.0), r.on)
                for r in reports
            ]
        last: dict[str, float] = {}
        for r in reports:
            last[r.device_id] = r.energy_total_kwh
        self._offset_kwh = {**offsets, **last}
        self._emitted_until = begin + intervals * self.interval_s
        return reports


def read_json_lines(path: Path, kinds: Sequence[str]) -> Iterator[PlugReport]:
    """Reports from a JSON-lines file: one object per line with the PlugReport fields."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("line is not a JSON object")
                report = PlugReport(
                    device_id=str(obj["device_id"]),
                    kind=str(obj["kind"]),
                    ts=float(obj["ts"]),
                    power_w=float(obj["power_w"]),
                    energy_total_kwh=float(obj["energy_total_kwh"]),
                    on=bool(obj.get("on", obj["power_w"] > 0)),
                )
                validate_report(report, kinds)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s:%d: skipped report: %s", path, lineno, exc)
                continue
            yield report
