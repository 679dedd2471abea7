"""One store of metric values, built from the metrics table; the Prometheus and OTel views
(``metric_views.py``) both read it, so /metrics and OTLP always show the same numbers.

Why a store of plain Python values instead of prometheus_client metric objects: the hot path
(≥ 200k events/s on one core) then costs an attribute write per update (no lock, no
``.labels()``), and the OTel side needs no synchronous instrument call (an OTel SDK
``record``/``add`` with six attributes costs ~15 µs): its gauges and counters are observable
and read the store when a reader collects, and its histograms are built from the store's
HistSeries at collection time (``otel_histograms.py``; the SDK has no observable histogram).

Threading: only the processing thread writes; scrapes and OTel readers only read. Every read
is of a single float or a copied list, atomic under the GIL; a scrape racing an observe can
see a histogram's sum one observation ahead of its buckets, never a torn value.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace

from schedscope.telemetry.metrics_table import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    METRICS,
    MetricDef,
)

LabelValues = tuple[str, ...]
HistExemplar = tuple[trace.SpanContext, float, int]  # span context, value, wall time (ns)


class Series:
    """A gauge's or counter's value for one label set."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class HistSeries:
    """A histogram for one label set: non-cumulative bucket counts (+Inf last), sum, min/max,
    the latest exemplar per bucket and the series' start time, i.e. everything a cumulative
    OTLP histogram point needs besides the bounds. ``observe(v, n)`` adds n observations of v
    (weighted, for SGLang's per-chunk inter-token latency)."""

    __slots__ = ("bounds", "counts", "exemplars", "max", "min", "start_ns", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.start_ns = time.time_ns()  # OTLP start_time_unix_nano: counts since then
        # (span context, value, wall ns) per bucket; ids are formatted at scrape time.
        self.exemplars: list[HistExemplar | None] = [None] * (len(bounds) + 1)

    def observe(
        self,
        value: float,
        n: int = 1,
        span_context: trace.SpanContext | None = None,
    ) -> None:
        i = bisect_left(self.bounds, value)  # Prometheus buckets are `le`: v <= bound
        self.counts[i] += n
        self.sum += value * n
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if span_context is not None:
            self.exemplars[i] = (span_context, value, time.time_ns())


class Family:
    """All series of one metric."""

    __slots__ = ("definition", "provider", "series")

    def __init__(self, definition: MetricDef) -> None:
        self.definition = definition
        self.series: dict[LabelValues, Series | HistSeries] = {}
        # Sidecar-wide metrics derived at collection time (ingest counters).
        self.provider: Callable[[], Iterable[tuple[LabelValues, float]]] | None = None

    def get(self, labels: LabelValues) -> Series | HistSeries:
        s = self.series.get(labels)
        if s is None:
            d = self.definition
            if d.kind == HISTOGRAM:
                assert d.buckets is not None
                s = HistSeries(tuple(float(b) for b in d.buckets))
            else:
                s = Series()
            self.series[labels] = s
        return s

    def values(self) -> list[tuple[LabelValues, float]]:
        """(labels, value) of a gauge/counter family, the provider's included."""
        out = [(k, s.value) for k, s in list(self.series.items())]  # type: ignore[union-attr]
        if self.provider is not None:
            out.extend(self.provider())
        return out


class MetricStore:
    def __init__(self, definitions: Iterable[MetricDef] = METRICS) -> None:
        self.families: dict[str, Family] = {d.key: Family(d) for d in definitions}

    def family(self, key: str) -> Family:
        return self.families[key]

    def relabel(self, old: LabelValues, new: LabelValues) -> None:
        """Move every series of one engine from its old base labels to new ones (the engine's
        identity arrived or changed); the series objects stay, so cached handles stay valid."""
        n = len(old)
        for fam in self.families.values():
            if not fam.definition.per_engine:
                continue
            for key in [k for k in fam.series if k[:n] == old]:
                fam.series[new + key[n:]] = fam.series.pop(key)

    def remove_engine(self, base: LabelValues) -> None:
        n = len(base)
        for fam in self.families.values():
            if fam.definition.per_engine:
                for key in [k for k in fam.series if k[:n] == base]:
                    del fam.series[key]


class Labelled:
    """Series of one metric with one extra label, for one engine (children cached)."""

    __slots__ = ("_base", "_cache", "_family")

    def __init__(self, family: Family, base: LabelValues) -> None:
        self._family = family
        self._base = base
        self._cache: dict[Any, Series | HistSeries] = {}

    def __call__(self, *values: str) -> Any:
        s = self._cache.get(values)
        if s is None:
            s = self._cache[values] = self._family.get(self._base + values)
        return s


class EngineMetrics:
    """One engine's handles into the store: ``m.gen_throughput.value = x``,
    ``m.requests_by_reason("stop").value += 1``, ``m.ttft.observe(s, 1, ctx)``."""

    def __init__(self, store: MetricStore, base: LabelValues) -> None:
        self.store = store
        self.base = base
        self.gen_throughput_held = False  # see zero_gen_throughput_on_pause
        for key, fam in store.families.items():
            d = fam.definition
            if not d.per_engine:
                continue
            handle = Labelled(fam, base) if d.labels else fam.get(base)
            setattr(self, key, handle)

    def relabel(self, base: LabelValues) -> None:
        if base != self.base:
            self.store.relabel(self.base, base)
            self.base = base
            for key in self.store.families:
                handle = getattr(self, key, None)
                if isinstance(handle, Labelled):
                    handle._base = base

    def zero_gauges(self) -> None:
        """The engine is gone (shutdown/restart): no stale 'running' or throughput left."""
        for key, fam in self.store.families.items():
            if fam.definition.per_engine and fam.definition.kind == GAUGE:
                h = getattr(self, key)
                if isinstance(h, Series):
                    h.value = 0.0


def zero_gen_throughput_on_pause(m: EngineMetrics) -> None:
    """Seed 000 (SGLang PR #24003): the moment a pause span opens, gen_throughput is 0.

    The store is what /metrics and OTLP read, so 0 is visible at the next scrape/collection,
    with no rate limiter in between. It stays 0 while the pause lasts (decode stats arriving
    from batches still in flight are ignored for it) and comes back with the first decode batch
    after the pause closes (``set_gen_throughput_from_decode``).
    """
    m.gen_throughput.value = 0.0
    m.gen_throughput_held = True


def set_gen_throughput_from_decode(m: EngineMetrics, value: float) -> None:
    """A decode batch's gen_throughput, unless a pause holds it at 0."""
    if not m.gen_throughput_held:
        m.gen_throughput.value = value


def release_gen_throughput_after_pause(m: EngineMetrics) -> None:
    """The pause span closed: the next decode batch sets gen_throughput again."""
    m.gen_throughput_held = False


__all__ = [
    "COUNTER",
    "GAUGE",
    "HISTOGRAM",
    "EngineMetrics",
    "Family",
    "HistSeries",
    "MetricStore",
    "Series",
    "release_gen_throughput_after_pause",
    "set_gen_throughput_from_decode",
    "zero_gen_throughput_on_pause",
]
