"""Prometheus text exposition (format 0.0.4) for all three roles, through prometheus-client.

No global registry and no module-level metric objects: each role keeps its counters in its own
stats objects (the agent's ``AgentStats``, the edge's ``IngestStats``/``EdgeStats``, the
coordinator's database), and a scrape turns a snapshot of them into metric families of a custom
collector in a registry made for that scrape. prometheus-client is pure Python, so the agent's
import closure stays small.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

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


class _Families:
    """A custom collector over one scrape's families; registered in a private registry only."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _label_names(value: Mapping[tuple[tuple[str, str], ...], float]) -> list[str]:
    names = {tuple(k for k, _ in labels) for labels in value}
    if len(names) > 1:
        raise ValueError(f"one metric family needs one set of label names, got {sorted(names)}")
    return list(next(iter(names), ()))


class Exposition:
    """Collects metric families (prometheus-client's) and renders them; one instance per scrape."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def counter(self, name: str, help_text: str, value: float | Mapping[tuple[tuple[str, str], ...], float]) -> None:
        """``name`` must end in ``_total``; a mapping gives one sample per label set."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self._add(CounterMetricFamily, name, help_text, value)

    def gauge(self, name: str, help_text: str, value: float | Mapping[tuple[tuple[str, str], ...], float]) -> None:
        self._add(GaugeMetricFamily, name, help_text, value)

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        buckets, _count, total = hist.snapshot()
        self._families.append(HistogramMetricFamily(
            name, help_text, buckets=[("+Inf" if math.isinf(b) else repr(b), n) for b, n in buckets], sum_value=total))

    def _add(self, kind: Any, name: str, help_text: str, value: float | Mapping[tuple[tuple[str, str], ...], float]) -> None:
        if isinstance(value, Mapping):
            family = kind(name, help_text, labels=_label_names(value))
            for labels, v in sorted(value.items()):
                family.add_metric([lv for _, lv in labels], float(v))
        else:
            family = kind(name, help_text, value=float(value))
        self._families.append(family)

    def render(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self._families))  # type: ignore[arg-type]
        return generate_latest(registry).decode()
