"""Where usage reports come from, behind one sensor-reader interface (``UsageSource``).

``SimulatedSource`` plays a generated household (tests, demos, bench); ``PlugMqttSource`` listens
to the home's smart plugs (Tasmota, Shelly Gen1 and Gen2+) on the home's MQTT broker;
``read_json_lines`` reads a file exported from another logger. Every report from outside is
validated (``agent.usage_log.validate_report``); bad input is logged with its reason, counted and
skipped, never stored, and never stops the good input around it.

Plug telemetry formats (timestamps are the agent's receive time: Tasmota's ``Time`` is local time
without a zone by default and Shelly Gen1 sends none):

* Tasmota ``tele/<topic>/SENSOR``: ``{"Time": ..., "ENERGY": {"Total": kWh, "Power": W, ...}}``
  (``Power`` is a list on multi-channel meters); ``stat/<topic>/POWER``: ``ON`` / ``OFF``.
* Shelly Gen1 ``shellies/<id>/relay/<n>/power``: W as text; ``.../relay/<n>/energy``: the meter in
  watt-minutes as text (it restarts at 0 after a reboot: the usage log ignores a meter that goes
  back); ``shellies/<id>/relay/<n>``: ``on`` / ``off`` / ``overpower``.
* Shelly Gen2+ ``<prefix>/status/switch:<n>``: ``{"id": n, "output": bool, "apower": W,
  "aenergy": {"total": Wh, ...}, ...}``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crowdfl.errors import CrowdflError
from crowdfl.devices import DEVICE_KINDS, ON_THRESHOLD_W, PlugReport
from crowdfl.mqtt import MqttLink, MqttSettings

from .config import PlugSettings
from .usage_log import validate_report

if TYPE_CHECKING:  # the generator is loaded only by a device configured with a simulated source
    from crowdfl.household import HouseholdProfile

log = logging.getLogger(__name__)

MAX_PLUG_PAYLOAD = 16 * 1024  # a plug's telemetry is a few hundred bytes
POWER_MAX_AGE_S = 600.0  # a Shelly Gen1 power reading older than this is not paired with a meter reading


class UsageSource(Protocol):
    """A sensor reader. ``open`` once, ``poll`` often (from one thread), ``close`` at the end."""

    def open(self) -> None: ...

    def poll(self, now: float) -> list[PlugReport]:
        """Reports that became available up to ``now`` (unix seconds)."""
        ...

    def close(self) -> None: ...


class PlugInputError(CrowdflError):
    """A smart-plug message that is corrupt or unexpected; it is counted, logged and skipped."""


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

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to release."""

    def backfill(self, days: int) -> list[PlugReport]:
        """``days`` of history starting at ``start`` (a new agent's first import)."""
        end = self.start + timedelta(days=days)
        return self.poll(end.timestamp())

    def poll(self, now: float) -> list[PlugReport]:
        begin = max(self.start.timestamp(), self._emitted_until)
        intervals = int((now - begin) // self.interval_s)
        if intervals <= 0:
            return []
        from crowdfl.household import plug_reports, timeline_usage

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


def _report_from_fields(obj: Mapping[str, Any], kinds: Sequence[str]) -> PlugReport:
    on = obj.get("on")
    power = float(obj["power_w"])
    report = PlugReport(
        device_id=str(obj["device_id"]),
        kind=str(obj["kind"]),
        ts=float(obj["ts"]),
        power_w=power,
        energy_total_kwh=float(obj["energy_total_kwh"]),
        on=power > 0 if on in (None, "") else str(on).lower() in ("1", "true", "on", "yes"),
    )
    validate_report(report, kinds)
    return report


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
                report = _report_from_fields(obj, kinds)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s:%d: skipped report: %s", path, lineno, exc)
                continue
            yield report


CSV_COLUMNS = ("device_id", "kind", "ts", "power_w", "energy_total_kwh")


def read_csv(path: Path, kinds: Sequence[str]) -> Iterator[PlugReport]:
    """Reports from a CSV file with a header naming at least ``CSV_COLUMNS`` (``on`` optional)."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CrowdflError("bad_csv", f"{path}: the header lacks column(s) {', '.join(missing)}")
        for row in reader:
            try:
                report = _report_from_fields(row, kinds)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s:%d: skipped report: %s", path, reader.line_num, exc)
                continue
            yield report


def read_reports_file(path: Path, kinds: Sequence[str]) -> Iterator[PlugReport]:
    """A usage export, by its suffix: ``.csv``, else JSON lines."""
    return read_csv(path, kinds) if Path(path).suffix.lower() == ".csv" else read_json_lines(path, kinds)


# -- smart plugs over the home's MQTT ------------------------------------------------------------


def _json_object(payload: bytes) -> dict[str, Any]:
    def _no_constants(name: str) -> float:
        raise ValueError(f"{name} is not a number")

    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise PlugInputError("not_utf8", "payload is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise PlugInputError("bad_json", f"payload is not JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise PlugInputError("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlugInputError("bad_value", f"{what} must be a number, got {str(value)[:40]!r}")
    try:
        v = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        raise PlugInputError("bad_value", f"{what} is out of range") from None
    if not math.isfinite(v) or v < 0:
        raise PlugInputError("bad_value", f"{what} must be finite and non-negative, got {v}")
    return v


def _text_number(payload: bytes, what: str) -> float:
    try:
        text = payload.decode("ascii").strip()
        v = float(text)
    except (UnicodeDecodeError, ValueError):
        raise PlugInputError("bad_value", f"{what} must be a number as text, got {payload[:40]!r}") from None
    return _number(v, what)


def _text_state(payload: bytes, on: tuple[str, ...], off: tuple[str, ...]) -> bool:
    text = payload.decode("ascii", "replace").strip().lower()
    if text in on:
        return True
    if text in off:
        return False
    raise PlugInputError("bad_state", f"unexpected relay state {payload[:40]!r}")


@dataclass
class _PlugState:
    power_w: float | None = None
    power_at: float = 0.0
    meter_kwh: float | None = None


class PlugDecoder:
    """Raw plug telemetry -> validated ``PlugReport`` (pure: no I/O, the caller passes the clock).

    Messages that only carry a power reading or an ON state update the plug's state and give no
    report; a meter reading gives one; an OFF state gives one at the last meter reading with zero
    power (the end of a use is then on record even if the next telemetry is late).
    """

    def __init__(self, plugs: Sequence[PlugSettings], kinds: Sequence[str] = DEVICE_KINDS) -> None:
        self.kinds = tuple(kinds)
        self._routes: dict[str, tuple[PlugSettings, str]] = {}
        for p in plugs:
            for topic, what in self._plug_topics(p):
                if topic in self._routes:
                    raise ValueError(f"MQTT topic {topic} belongs to two plugs")
                self._routes[topic] = (p, what)
        self._state: dict[str, _PlugState] = {p.log_id: _PlugState() for p in plugs}

    @staticmethod
    def _plug_topics(p: PlugSettings) -> list[tuple[str, str]]:
        if p.firmware == "tasmota":
            return [(f"tele/{p.topic}/SENSOR", "tasmota_sensor"), (f"stat/{p.topic}/POWER", "tasmota_power")]
        if p.firmware == "shelly_gen1":
            base = f"shellies/{p.topic}/relay/{p.channel}"
            return [(f"{base}/power", "gen1_power"), (f"{base}/energy", "gen1_energy"), (base, "gen1_relay")]
        return [(f"{p.topic}/status/switch:{p.channel}", "gen2_status")]

    def topics(self) -> list[str]:
        return sorted(self._routes)

    def decode(self, topic: str, payload: bytes, now: float) -> PlugReport | None:
        """A validated report, or None for a message that only updates state; raises PlugInputError."""
        route = self._routes.get(topic)
        if route is None:
            raise PlugInputError("unexpected_topic", f"no plug is configured for topic {topic[:120]!r}")
        if len(payload) > MAX_PLUG_PAYLOAD:
            raise PlugInputError("oversized", f"{len(payload)} bytes (limit {MAX_PLUG_PAYLOAD})")
        plug, what = route
        st = self._state[plug.log_id]
        if what == "tasmota_sensor":
            energy = _json_object(payload).get("ENERGY")
            if not isinstance(energy, dict):
                raise PlugInputError("no_energy", "SENSOR message without an ENERGY object")
            if "Total" not in energy:
                raise PlugInputError("no_energy", "ENERGY without Total")
            total = _number(energy["Total"], "ENERGY.Total")
            raw_power = energy.get("Power", 0.0)
            if isinstance(raw_power, list):  # multi-channel meters report one value per channel
                power = sum(_number(v, "ENERGY.Power[]") for v in raw_power)
            else:
                power = _number(raw_power, "ENERGY.Power")
            return self._report(plug, st, now, power, total)
        if what == "gen2_status":
            obj = _json_object(payload)
            if "id" in obj and obj["id"] != plug.channel:
                raise PlugInputError("bad_value", f"switch id {str(obj['id'])[:20]} on the topic of switch {plug.channel}")
            output = obj.get("output")
            if output is not None and not isinstance(output, bool):
                raise PlugInputError("bad_value", "output must be true or false")
            aenergy = obj.get("aenergy")
            if aenergy is None:
                if output is False:
                    return self._off(plug, st, now)
                raise PlugInputError("no_energy", "switch status without aenergy")
            if not isinstance(aenergy, dict) or "total" not in aenergy:
                raise PlugInputError("no_energy", "aenergy without total")
            total = _number(aenergy["total"], "aenergy.total") / 1000.0  # Wh -> kWh
            power = _number(obj.get("apower", 0.0), "apower")
            return self._report(plug, st, now, power, total)
        if what == "gen1_power":
            st.power_w, st.power_at = _text_number(payload, "relay power"), now
            return None
        if what == "gen1_energy":
            total = _text_number(payload, "relay energy") / 60_000.0  # watt-minutes -> kWh
            fresh = st.power_w is not None and now - st.power_at <= POWER_MAX_AGE_S
            return self._report(plug, st, now, st.power_w if fresh and st.power_w is not None else 0.0, total)
        if what == "gen1_relay":
            on = _text_state(payload, ("on",), ("off", "overpower"))
            return None if on else self._off(plug, st, now)
        on = _text_state(payload, ("on",), ("off",))  # tasmota_power
        return None if on else self._off(plug, st, now)

    def _off(self, plug: PlugSettings, st: _PlugState, now: float) -> PlugReport | None:
        st.power_w, st.power_at = 0.0, now
        if st.meter_kwh is None:
            return None  # no meter reading yet: nothing to anchor the report to
        return self._report(plug, st, now, 0.0, st.meter_kwh)

    def _report(self, plug: PlugSettings, st: _PlugState, now: float, power: float, total: float) -> PlugReport:
        report = PlugReport(plug.log_id, plug.kind, float(now), float(power), float(total), power > ON_THRESHOLD_W)
        try:
            validate_report(report, self.kinds)
        except ValueError as exc:
            raise PlugInputError("invalid_report", str(exc)) from None
        st.meter_kwh = total
        return report


@dataclass
class PlugStats:
    received: int = 0
    reports: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class PlugMqttSource:
    """Smart-plug telemetry from the home's MQTT broker, decoded as it arrives.

    A pump thread takes messages off paho's queue at once, so a report's timestamp is its arrival
    time however rarely the agent polls; ``poll`` hands over what was decoded since the last call.
    """

    LOG_FIRST = 20  # per reason; after that every 1000th, so a broken plug cannot flood the journal

    def __init__(self, settings: MqttSettings, plugs: Sequence[PlugSettings], client_id: str, kinds: Sequence[str] = DEVICE_KINDS) -> None:
        if not plugs:
            raise ValueError("PlugMqttSource needs at least one [[plugs]] entry")
        self.decoder = PlugDecoder(plugs, kinds)
        self.link = MqttLink(settings, client_id, self.decoder.topics())
        self.stats = PlugStats()
        self._lock = threading.Lock()
        self._ready: list[PlugReport] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        self.link.start()
        self._thread = threading.Thread(target=self._pump, name="plug-mqtt", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(msg.topic, msg.payload, time.time())
            except Exception:  # a bug must not silence the plugs: log it and take the next message
                self.stats.skipped["internal_error"] += 1
                log.exception("plug message on %s could not be handled", msg.topic[:120])

    def handle(self, topic: str, payload: bytes, now: float) -> PlugReport | None:
        """Decode one message; a bad one is logged with its reason, counted and skipped."""
        self.stats.received += 1
        try:
            report = self.decoder.decode(topic, payload, now)
        except PlugInputError as exc:
            n = self.stats.skipped[exc.code] = self.stats.skipped[exc.code] + 1
            if n <= self.LOG_FIRST or n % 1000 == 0:
                log.warning("skipped plug message on %s: %s (%d skipped for this reason)", topic[:120], exc, n)
            return None
        if report is not None:
            self.stats.reports += 1
            with self._lock:
                self._ready.append(report)
        return report

    def poll(self, now: float) -> list[PlugReport]:
        with self._lock:
            out, self._ready = self._ready, []
        return out

    def close(self) -> None:
        """Stop receiving, then decode what paho already queued, so ``poll`` still returns it."""
        self.link.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        while True:
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                break
            self.handle(msg.topic, msg.payload, time.time())
