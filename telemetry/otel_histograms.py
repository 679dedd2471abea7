"""OTLP histograms built from the metric store at collection time, not recorded per observation.

NOTE: why not OTel Histogram instruments. A synchronous ``Histogram.record`` costs ~15 µs (the
SDK cleans and hashes the attributes on every call); four per request capped the sidecar at
~120k events/s with OTLP on. The SDK (1.45) has no observable histogram and no hook for a reader
to add metrics of its own. So the store's ``HistSeries`` keep what a cumulative OTLP point
needs (start time, bucket counts, sum, min/max, exemplars), the hot path does one bisect and an
increment, and this bridge turns them into ``Metric``s whenever a reader collects and merges
them into what that reader exports. /metrics and OTLP therefore show the very same histogram.

    histograms = OtlpHistogramBridge(resource)          # before the providers
    readers = build_metric_readers(config, histograms)  # every exporter wrapped
    meters = MeterProvider(metric_readers=readers, resource=resource)
    pipeline = TelemetryPipeline(tp, meters, registry, otel_histograms=histograms)  # binds store

Tests read through ``HistogramInMemoryReader(histograms)`` (an InMemoryMetricReader).

Temporality: always cumulative (the store only accumulates), whatever the exporter prefers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from schedscope.telemetry.metric_store import HistExemplar, HistSeries, MetricStore
from schedscope.telemetry.metric_views import METER_NAME
from schedscope.telemetry.metrics_table import HISTOGRAM, MetricDef

logger = logging.getLogger(__name__)


class OtlpHistogramBridge:
    """Adds the store's histograms to every MetricsData it is given (``inject``).

    Created before the pipeline (the sidecar builds its providers first); the pipeline binds its
    store. Until then, and for families without an OTLP name, it adds nothing. Bounded: one
    point per histogram series the store holds (the pipeline bounds engines). Never breaks an
    export: on any error the data goes out without the histograms (counted, logged once).
    """

    def __init__(self, resource: Resource | None = None, scope_name: str = METER_NAME) -> None:
        self.store: MetricStore | None = None
        # Used only when the SDK collected nothing at all; otherwise the SDK's resource is kept.
        self.resource = resource if resource is not None else Resource.create()
        self.scope = InstrumentationScope(scope_name)
        self.failures = 0

    def bind(self, store: MetricStore) -> None:
        self.store = store

    def metrics(self, now_ns: int | None = None) -> list[Metric]:
        """One cumulative Histogram metric per family with an OTLP name and observations."""
        store = self.store
        if store is None:
            return []
        now = time.time_ns() if now_ns is None else now_ns
        out = []
        for fam in list(store.families.values()):
            d = fam.definition
            if d.kind != HISTOGRAM or d.otlp_name is None:
                continue
            points = []
            for labels, series in list(fam.series.items()):
                assert isinstance(series, HistSeries)
                point = _point(d, labels, series, now)
                if point is not None:
                    points.append(point)
            if points:
                data = Histogram(points, AggregationTemporality.CUMULATIVE)
                out.append(Metric(d.otlp_name, d.help, d.unit, data))
        return out

    def inject(self, data: MetricsData | None) -> MetricsData | None:
        """``data`` with the histograms merged in; ``data`` as given if building them fails."""
        try:
            extra = self.metrics()
            return merge_metrics(data, extra, self.scope, self.resource) if extra else data
        except Exception:
            self.failures += 1
            if self.failures == 1:
                logger.warning("OTLP histograms left out of a metrics export", exc_info=True)
            return data

    def wrap(self, exporter: MetricExporter) -> HistogramInjectingExporter:
        return HistogramInjectingExporter(exporter, self)


def _point(
    d: MetricDef, labels: tuple[str, ...], s: HistSeries, now_ns: int
) -> HistogramDataPoint | None:
    counts = list(s.counts)  # copied first: a racing observe may put sum ahead, never tear
    count = sum(counts)
    if count == 0:  # as the SDK's own histograms: no point before the first observation
        return None
    return HistogramDataPoint(
        attributes=dict(zip(d.label_names, labels, strict=True)),
        start_time_unix_nano=s.start_ns,
        time_unix_nano=now_ns,
        count=count,
        sum=s.sum,
        bucket_counts=counts,
        explicit_bounds=s.bounds,
        min=s.min,
        max=s.max,
        exemplars=[_exemplar(ex) for ex in list(s.exemplars) if ex is not None],
    )


def _exemplar(ex: HistExemplar) -> Exemplar:
    span_context, value, wall_ns = ex
    return Exemplar({}, value, wall_ns, span_context.span_id, span_context.trace_id)


def merge_metrics(
    data: MetricsData | None,
    extra: list[Metric],
    scope: InstrumentationScope,
    resource: Resource,
) -> MetricsData:
    """``data`` plus ``extra`` in the first resource's ScopeMetrics named like ``scope`` (made
    if missing; a ResourceMetrics with ``resource`` too when there is none). New objects: the
    SDK's point types are frozen."""
    if data is None or not data.resource_metrics:
        sm = ScopeMetrics(scope, extra, scope.schema_url)
        return MetricsData([ResourceMetrics(resource, [sm], resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == scope.name:
            scopes[i] = ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(scope, extra, scope.schema_url))
    return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


class HistogramInjectingExporter(MetricExporter):
    """Wraps a MetricExporter: every export carries the store's histograms."""

    def __init__(self, inner: MetricExporter, bridge: OtlpHistogramBridge) -> None:
        # Keep the inner exporter's temporality/aggregation preferences (the reader asks us).
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self.inner = inner
        self.bridge = bridge

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        data = self.bridge.inject(metrics_data) or metrics_data
        return self.inner.export(data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class HistogramInMemoryReader(InMemoryMetricReader):
    """InMemoryMetricReader whose ``get_metrics_data()`` includes the store's histograms."""

    def __init__(self, bridge: OtlpHistogramBridge, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bridge = bridge

    def get_metrics_data(self) -> MetricsData | None:
        return self.bridge.inject(super().get_metrics_data())


__all__ = [
    "HistogramInMemoryReader",
    "HistogramInjectingExporter",
    "OtlpHistogramBridge",
    "merge_metrics",
]
