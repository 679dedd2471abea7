"""The two views of the metric store: a prometheus_client Collector (for a dedicated
CollectorRegistry, served on /metrics by the exporters) and OTel observable instruments on a
MeterProvider (exported over OTLP by whatever MetricReader the provider has). Both are built
from the metrics table and keep no values of their own. OTLP histograms are not instruments:
the SDK has no observable histogram, so ``otel_histograms.py`` builds them from the store when
a reader collects and merges them into what it exports."""

from __future__ import annotations

from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from schedscope.telemetry.metric_store import Family, HistSeries, MetricStore
from schedscope.telemetry.metrics_table import COUNTER, GAUGE, HISTOGRAM

METER_NAME = "schedscope.telemetry"


class PrometheusView(Collector):
    """Yields every family of the store at scrape time."""

    def __init__(self, store: MetricStore) -> None:
        self.store = store
        self._les: dict[str, list[str]] = {}

    def describe(self) -> Iterator[Metric]:
        # Lets the registry refuse a clash with another collector's names at register time.
        for fam in self.store.families.values():
            yield self._empty(fam)

    def collect(self) -> Iterator[Metric]:
        for fam in self.store.families.values():
            d = fam.definition
            mf = self._empty(fam)
            if d.kind == HISTOGRAM:
                les = self._les.get(d.key)
                if les is None:
                    les = self._les[d.key] = [floatToGoString(b) for b in d.buckets or ()]
                    les.append("+Inf")
                for labels, s in list(fam.series.items()):
                    assert isinstance(s, HistSeries)
                    counts = list(s.counts)
                    exemplars = list(s.exemplars)
                    buckets = []
                    acc = 0
                    for le, c, ex in zip(les, counts, exemplars, strict=True):
                        acc += c
                        if ex is None:
                            buckets.append((le, acc))
                        else:
                            buckets.append((le, acc, _prom_exemplar(*ex)))
                    mf.add_metric(list(labels), buckets, s.sum)  # type: ignore[attr-defined]
            else:
                for labels, value in fam.values():
                    mf.add_metric(list(labels), value)  # type: ignore[attr-defined]
            yield mf

    @staticmethod
    def _empty(fam: Family) -> Metric:
        d = fam.definition
        labels = list(d.label_names)
        if d.kind == GAUGE:
            return GaugeMetricFamily(d.prom_name, d.help, labels=labels)
        if d.kind == COUNTER:  # CounterMetricFamily adds `_total` back on exposition
            return CounterMetricFamily(d.prom_name, d.help, labels=labels)
        return HistogramMetricFamily(d.prom_name, d.help, labels=labels)


def _prom_exemplar(span_context: trace.SpanContext, value: float, _wall_ns: int) -> Exemplar:
    return Exemplar(
        {
            "trace_id": trace.format_trace_id(span_context.trace_id),
            "span_id": trace.format_span_id(span_context.span_id),
        },
        value,
    )


def attach_otel(store: MetricStore, meter_provider: MeterProvider) -> None:
    """Create the OTel observable gauges/counters reading the store. Histograms are not
    instruments: ``otel_histograms.OtlpHistogramBridge`` adds them at collection time."""
    meter = meter_provider.get_meter(METER_NAME)
    for fam in store.families.values():
        d = fam.definition
        if d.otlp_name is None or d.kind == HISTOGRAM:
            continue
        if d.kind == GAUGE:
            meter.create_observable_gauge(
                d.otlp_name, callbacks=[_callback(fam)], unit=d.unit, description=d.help
            )
        else:
            meter.create_observable_counter(
                d.otlp_name, callbacks=[_callback(fam)], unit=d.unit, description=d.help
            )


def _callback(fam: Family):
    names = fam.definition.label_names
    attrs_cache: dict[tuple[str, ...], dict[str, str]] = {}

    def observe(_options: CallbackOptions) -> list[Observation]:
        out = []
        for labels, value in fam.values():
            attrs = attrs_cache.get(labels)
            if attrs is None:
                attrs = attrs_cache[labels] = dict(zip(names, labels, strict=True))
            out.append(Observation(value, attrs))
        return out

    return observe
