"""Prometheus text exposition (format 0.0.4), written by hand, for all three roles.

Twenty lines of formatting do not justify a dependency (and its global default registry). Each
role keeps its counters in its own stats objects (the agent's ``AgentStats``, the edge's
``IngestStats``/``EdgeStats``, the coordinator's database) and a scrape renders a snapshot of them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` upper bounds, plus +Inf)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(buckets) or len(set(buckets)) != len(buckets):
            raise ValueError("histogram buckets must be strictly increasing")
        self.buckets = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            else:
                self._counts[-1] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        """([(le, cumulative count)...] including +Inf, count, sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), counts):
            running += n
            cumulative.append((bound, running))
        return cumulative, running, total


@dataclass(frozen=True)
class Sample:
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    items = [f'{k}="{_escape(v)}"' for k, v in labels]
    return "{" + ",".join(items) + "}" if items else ""


class Exposition:
    """Collects metric families and renders them; one instance per scrape."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def _family(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {_escape(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def counter(self, name: str, help_text: str, value: float | Mapping[tuple[tuple[str, str], ...], float]) -> None:
        """``name`` must end in ``_total``; a mapping gives one sample per label set."""
        self._family(name, "counter", help_text)
        self._samples(name, value)

    def gauge(self, name: str, help_text: str, value: float | Mapping[tuple[tuple[str, str], ...], float]) -> None:
        self._family(name, "gauge", help_text)
        self._samples(name, value)

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self._family(name, "histogram", help_text)
        buckets, count, total = hist.snapshot()
        for bound, n in buckets:
            self._lines.append(f'{name}_bucket{{le="{_number(bound) if math.isinf(bound) else repr(bound)}"}} {n}')
        self._lines.append(f"{name}_sum {_number(total)}")
        self._lines.append(f"{name}_count {count}")

    def _samples(self, name: str, value: float | Mapping[tuple[tuple[str, str], ...], float]) -> None:
        if isinstance(value, Mapping):
            for labels, v in sorted(value.items()):
                self._lines.append(f"{name}{_labels(labels)} {_number(v)}")
        else:
            self._lines.append(f"{name} {_number(value)}")

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"
