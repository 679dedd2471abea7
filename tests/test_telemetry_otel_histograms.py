"""OTLP histograms are built from the metric store at collection time: after a scripted request
sequence, OTLP (in-memory reader, and a real periodic exporter writing OTLP JSON lines) shows
exactly the Prometheus view's buckets, sum, count, bounds, attributes and exemplar trace ids."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from schedscope.exporters.otlp import ExportConfig, build_meter_provider, build_tracer_provider
from schedscope.exporters.otlp_file import read_otlp_json_lines
from schedscope.exporters.stats import ExportStats
from schedscope.telemetry.metric_store import MetricStore
from schedscope.telemetry.metric_views import METER_NAME
from schedscope.telemetry.metrics_table import ENGINE_LABELS, metric_names
from schedscope.telemetry.otel_histograms import HistogramInMemoryReader, OtlpHistogramBridge
from schedscope.telemetry.pipeline import TelemetryPipeline, in_memory_pipeline
from schedscope.telemetry.schema import (
    BatchDone,
    BatchLaunched,
    DecodeStats,
    EngineInfo,
    PrefillStats,
    ReqFinished,
    ReqFirstToken,
    ReqQueued,
)
from schedscope.telemetry.scripted import ScriptedEngine

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTLP_HISTOGRAMS = {
    "gen_ai.server.time_to_first_token",
    "gen_ai.server.time_per_output_token",
    "gen_ai.server.request.duration",
    "sglang.queue_time",
    "sglang.inter_token_latency",
}

# (otlp name, attributes) -> the histogram as both views must show it
Key = tuple[str, frozenset]


def serve_requests(e: ScriptedEngine, n: int, t0: float = 0.0) -> None:
    """n requests prefilled together, decoded for a varying number of steps, then finished."""
    e.send(
        *[
            ReqQueued(e.ts(t0 + i), f"r{i}", 100, 32, traceparent=TRACEPARENT if i == 0 else None)
            for i in range(n)
        ]
    )
    rids = [f"r{i}" for i in range(n)]
    e.send(BatchLaunched(e.ts(t0 + 20), 1, "prefill", rids, 100 * n))
    e.send(
        BatchDone(e.ts(t0 + 150), 1, "prefill", prefill=PrefillStats(n, 100 * n, 0, n, 0, 0.1)),
        *[ReqFirstToken(e.ts(t0 + 150), rid) for rid in rids],
    )
    for k in range(n):  # request k finishes after k + 2 decode steps of 40 ms
        fi, start = 2 + k, t0 + 150 + 40 * k
        running = rids[k:]
        e.send(BatchLaunched(e.ts(start + 1), fi, "decode", running, len(running)))
        e.send(
            BatchDone(
                e.ts(start + 40),
                fi,
                "decode",
                decode=DecodeStats(len(running), 100, len(running), 50.0, 0.2, 0),
            ),
            ReqFinished(e.ts(start + 40 + 300 * k), rids[k], 100, k + 2, 0, "stop"),
        )


def run_scenario(handle) -> None:
    a = ScriptedEngine(handle)
    a.hello()
    serve_requests(a, 5)
    b = ScriptedEngine(handle, engine_id="engine-b", info=EngineInfo(model="other", dp_rank=1))
    b.hello()
    serve_requests(b, 3, t0=7.0)


def prometheus_histograms(registry: CollectorRegistry) -> dict[Key, dict]:
    """The Prometheus view's histograms with an OTLP name and observations, non-cumulative."""
    out: dict[Key, dict] = {}
    for mf in registry.collect():
        if mf.type != "histogram":
            continue
        otlp_name = metric_names(mf.name)[1]
        if otlp_name is None:
            continue
        series: dict[frozenset, dict] = {}
        for s in mf.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            h = series.setdefault(
                frozenset(labels.items()), {"bounds": [], "cum": [], "trace_ids": {}}
            )
            if s.name.endswith("_bucket"):
                if s.exemplar is not None:
                    h["trace_ids"][len(h["cum"])] = s.exemplar.labels["trace_id"]
                h["cum"].append(int(s.value))
                if s.labels["le"] != "+Inf":
                    h["bounds"].append(float(s.labels["le"]))
            elif s.name.endswith("_sum"):
                h["sum"] = s.value
            elif s.name.endswith("_count"):
                h["count"] = int(s.value)
        for attrs, h in series.items():
            cum = h.pop("cum")
            h["counts"] = [c - p for c, p in zip(cum, [0, *cum[:-1]], strict=True)]
            h["bounds"] = tuple(h["bounds"])
            if h["count"]:  # OTLP, like the SDK, has no point before the first observation
                out[(otlp_name, attrs)] = h
    return out


def sdk_histograms(data: MetricsData) -> dict[Key, dict]:
    out: dict[Key, dict] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if not isinstance(m.data, Histogram):
                    continue
                assert sm.scope.name == METER_NAME
                for p in m.data.data_points:
                    out[(m.name, frozenset(p.attributes.items()))] = {
                        "bounds": tuple(p.explicit_bounds),
                        "counts": list(p.bucket_counts),
                        "sum": p.sum,
                        "count": p.count,
                        "trace_ids": _trace_ids(p.bucket_counts, p.explicit_bounds, p.exemplars),
                    }
    return out


def proto_histograms(request) -> dict[Key, dict]:
    out: dict[Key, dict] = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if not m.HasField("histogram"):
                    continue
                for p in m.histogram.data_points:
                    attrs = frozenset((kv.key, kv.value.string_value) for kv in p.attributes)
                    out[(m.name, attrs)] = {
                        "bounds": tuple(p.explicit_bounds),
                        "counts": list(p.bucket_counts),
                        "sum": p.sum,
                        "count": p.count,
                        "trace_ids": {
                            _bucket(p.explicit_bounds, ex.as_double): ex.trace_id.hex()
                            for ex in p.exemplars
                        },
                    }
    return out


def _bucket(bounds, value: float) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def _trace_ids(counts, bounds, exemplars) -> dict[int, str]:
    return {_bucket(bounds, ex.value): trace.format_trace_id(ex.trace_id) for ex in exemplars}


def assert_same(otlp: dict[Key, dict], prom: dict[Key, dict]) -> None:
    assert {name for name, _ in prom} == OTLP_HISTOGRAMS
    assert otlp.keys() == prom.keys()
    for key, want in prom.items():
        got = otlp[key]
        assert got["bounds"] == want["bounds"], key
        assert got["counts"] == want["counts"], key
        assert got["count"] == want["count"] == sum(want["counts"]), key
        assert math.isclose(got["sum"], want["sum"], rel_tol=1e-12), key
        assert got["trace_ids"] == want["trace_ids"], key
    # the scripted traceparent's trace is an exemplar on both sides
    assert any("0af7651916cd43dd8448eb211c80319c" in h["trace_ids"].values() for h in otlp.values())
    engines = {dict(attrs)["engine_id"] for _, attrs in otlp}
    assert engines == {"engine-a", "engine-b"}
    assert all(set(dict(attrs)) == set(ENGINE_LABELS) for _, attrs in otlp)


def test_in_memory_reader_shows_the_prometheus_histograms():
    t = in_memory_pipeline()
    run_scenario(t.pipeline.handle)
    data = t.metric_reader.get_metrics_data()
    assert_same(sdk_histograms(data), prometheus_histograms(t.registry))
    ttft = next(
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "gen_ai.server.time_to_first_token"
        for p in m.data.data_points
        if p.attributes["engine_id"] == "engine-a"
    )
    # min/max and the series' start time, as an OTLP cumulative point needs them
    assert (ttft.min, ttft.max) == pytest.approx((0.146, 0.150))
    assert ttft.start_time_unix_nano <= ttft.time_unix_nano
    assert ttft.attributes["dp_rank"] == "" and ttft.attributes["model_name"] == "test-model"


def test_periodic_otlp_file_exporter_shows_the_prometheus_histograms(tmp_path: Path):
    stats = ExportStats()
    config = ExportConfig(
        file_dir=tmp_path,
        env={},
        stats=stats,
        service_name="hist-test",
        metric_export_interval_ms=60_000,  # flushed by hand
    )
    histograms = OtlpHistogramBridge()
    tp = build_tracer_provider(config)
    mp = build_meter_provider(config, histograms=histograms)
    p = TelemetryPipeline(tp, mp, CollectorRegistry(), otel_histograms=histograms)
    try:
        run_scenario(p.handle)
        assert mp.force_flush(10_000)
        prom = prometheus_histograms(p.registry)
    finally:
        p.close()
        tp.shutdown()
        mp.shutdown()
    first = next(read_otlp_json_lines(tmp_path / "metrics.jsonl"))  # the force_flush export
    assert_same(proto_histograms(first), prom)
    (rm,) = first.resource_metrics
    attrs = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    assert attrs["service.name"] == "hist-test"
    assert stats.get("metric_exports", "otlp_file", "success") >= 1


class ListExporter(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exports: list[MetricsData] = []

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


def test_weighted_observations_count_n_and_track_min_max():
    store = MetricStore()
    bridge = OtlpHistogramBridge()
    bridge.bind(store)
    labels = ("m", "unified", "0", "0", "", "e0")
    span = trace.SpanContext(0xABC, 0xDEF, is_remote=False)
    store.family("tpot").get(labels).observe(0.003, 4, span)  # 4 tokens at 3 ms each
    store.family("tpot").get(labels).observe(0.05, 1)
    (metric,) = bridge.metrics()
    (point,) = metric.data.data_points
    assert metric.name == "gen_ai.server.time_per_output_token" and metric.unit == "s"
    assert point.count == 5 and point.sum == pytest.approx(4 * 0.003 + 0.05)
    assert point.bucket_counts[0] == 0 and point.bucket_counts[1] == 4  # 0.002 < 3 ms <= 0.004
    assert (point.min, point.max) == (0.003, 0.05)
    (ex,) = point.exemplars
    assert (ex.trace_id, ex.span_id, ex.value) == (0xABC, 0xDEF, 0.003)


def test_histograms_come_with_a_resource_when_the_sdk_collected_nothing():
    store = MetricStore()
    bridge = OtlpHistogramBridge(Resource.create({"service.name": "lonely"}))
    bridge.bind(store)
    reader = HistogramInMemoryReader(bridge)
    MeterProvider(metric_readers=[reader])  # no instrument at all: the SDK has no data
    assert reader.get_metrics_data() is None  # nothing observed yet: nothing to add
    store.family("e2e").get(("m", "unified", "0", "0", "", "e0")).observe(1.5)
    data = reader.get_metrics_data()
    (rm,) = data.resource_metrics
    assert rm.resource.attributes["service.name"] == "lonely"
    (sm,) = rm.scope_metrics
    assert sm.scope.name == METER_NAME
    assert [m.name for m in sm.metrics] == ["gen_ai.server.request.duration"]


def test_a_failing_injection_never_breaks_an_export(caplog):
    store = MetricStore()
    bridge = OtlpHistogramBridge()
    bridge.bind(store)
    store.family("ttft").get(("m", "unified", "0", "0", "", "e0")).observe(0.2)
    inner = ListExporter()
    mp = MeterProvider(metric_readers=[PeriodicExportingMetricReader(bridge.wrap(inner), 60_000)])
    mp.get_meter("t").create_counter("c").add(1)

    def broken(now_ns=None):
        raise RuntimeError("boom")

    bridge.metrics = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        assert mp.force_flush(5_000)
        assert mp.force_flush(5_000)
    assert bridge.failures == 2
    assert len([r for r in caplog.records if "OTLP histograms" in r.getMessage()]) == 1
    assert len(inner.exports) == 2  # went out without the histograms
    names = {
        m.name
        for rm in inner.exports[0].resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert names == {"c"}
    del bridge.metrics  # working again: the next export has them
    mp.force_flush(5_000)
    names = {
        m.name
        for rm in inner.exports[-1].resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert names == {"c", "gen_ai.server.time_to_first_token"}
    mp.shutdown()


def test_plain_reader_without_the_bridge_has_no_histograms_and_nothing_is_recorded():
    reader = InMemoryMetricReader()
    p = TelemetryPipeline(None, MeterProvider(metric_readers=[reader]), CollectorRegistry())
    run_scenario(p.handle)
    data = reader.get_metrics_data()
    kinds = {
        type(m.data).__name__
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "Histogram" not in kinds  # no SDK histogram instruments any more
