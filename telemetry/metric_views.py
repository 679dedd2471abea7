"""The two views of the metric store: a prometheus_client Collector (for a dedicated
CollectorRegistry, served on /metrics by the exporters) and OTel instruments on a MeterProvider
(exported over OTLP by whatever MetricReader the provider has). Both are built from the metrics
table; neither keeps values of its own except OTel histograms (see metric_store.py)."""

from __future__ import annotations

from collections.abc import Iterator

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
                            buckets.append((le, acc, Exemplar(ex[0], ex[1])))
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


def attach_otel(store: MetricStore, meter_provider: MeterProvider) -> None:
    """Create the OTel instruments: observable gauges/counters reading the store, histograms
    recorded by the store's HistSeries.observe (explicit buckets = the table's)."""
    meter = meter_provider.get_meter(METER_NAME)
    for fam in store.families.values():
        d = fam.definition
        if d.otlp_name is None:
            continue
        if d.kind == HISTOGRAM:
            fam.otel_hist = meter.create_histogram(
                d.otlp_name,
                unit=d.unit,
                description=d.help,
                explicit_bucket_boundaries_advisory=[float(b) for b in d.buckets or ()],
            )
            for labels, s in fam.series.items():
                assert isinstance(s, HistSeries)
                s.otel_hist = fam.otel_hist
                s.otel_attrs = dict(zip(d.label_names, labels, strict=True))
        elif d.kind == GAUGE:
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
