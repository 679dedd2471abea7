"""File exporters: the Perfetto timeline matches the spans; OTLP JSON lines parse back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link

from schedscope.exporters.otlp import ExportConfig, build_meter_provider, build_tracer_provider
from schedscope.exporters.otlp_file import read_otlp_json_lines
from schedscope.exporters.perfetto import PerfettoSpanExporter
from schedscope.exporters.stats import ExportStats

T0 = 1_700_000_000_000_000_000  # ns


def span(tracer: trace.Tracer, name: str, start_ms: float, end_ms: float, **kw) -> trace.Span:
    s = tracer.start_span(name, start_time=T0 + int(start_ms * 1e6), **kw)
    s.end(end_time=T0 + int(end_ms * 1e6))
    return s


def scheduler_timeline(tracer: trace.Tracer) -> None:
    """Engine e0: prefill #1, decode #2 overlapping #3 (overlap scheduling), pause, idle, a request."""
    eng = {"schedscope.engine_id": "e0"}
    req = tracer.start_span(
        "request", start_time=T0, attributes={"gen_ai.request.model": "tiny", **eng}
    )
    b1 = span(
        tracer,
        "prefill",
        0,
        10,
        attributes={
            "schedscope.forward_iter": 1,
            "schedscope.running_reqs": 1,
            "schedscope.token_usage": 0.1,
            **eng,
        },
    )
    span(
        tracer,
        "decode",
        10,
        20,
        attributes={
            "schedscope.forward_iter": 2,
            "schedscope.gen_throughput": 100.0,
            "schedscope.running_reqs": 1,
            **eng,
        },
    )
    span(
        tracer,
        "decode",
        15,
        25,
        attributes={"schedscope.forward_iter": 3, "schedscope.gen_throughput": 120.0, **eng},
    )
    span(
        tracer,
        "queue",
        0,
        1,
        context=trace.set_span_in_context(req),
        links=[Link(b1.get_span_context())],
        attributes=eng,
    )
    req.end(end_time=T0 + 25_000_000)
    span(tracer, "pause", 30, 40, attributes={"schedscope.pause.mode": "in_place", **eng})
    span(tracer, "idle", 40, 50, attributes=eng)
    span(tracer, "cache_flush", 50, 51, attributes=eng)
    span(
        tracer,
        "decode",
        0,
        5,
        attributes={"schedscope.forward_iter": 9, "schedscope.engine_id": "e1"},
    )


def test_perfetto_file_is_trace_event_json_matching_the_spans(tmp_path: Path) -> None:
    stats = ExportStats()
    exporter = PerfettoSpanExporter(tmp_path / "sched.json", stats=stats)
    provider = TracerProvider(resource=Resource.create({}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    scheduler_timeline(provider.get_tracer("t"))
    provider.shutdown()  # writes the file

    doc = json.loads((tmp_path / "sched.json").read_text())
    events = doc["traceEvents"]
    procs = {
        e["args"]["name"]: e["pid"]
        for e in events
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    assert set(procs) == {"e0", "e1"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"
    }
    slices = [e for e in events if e["ph"] == "X"]
    for e in slices:
        assert {"name", "ts", "dur", "pid", "tid"} <= set(e)
    batch = {e["name"]: e for e in slices if e["cat"] == "batch"}
    assert set(batch) == {"prefill #1", "decode #2", "decode #3", "decode #9"}
    assert doc["otherData"]["origin_unix_ns"] == T0
    assert batch["decode #2"]["ts"] == 10_000 and batch["decode #2"]["dur"] == 10_000
    assert batch["decode #9"]["pid"] == procs["e1"]
    # Overlapping batches are on different lanes, so slices on one thread never overlap.
    assert batch["decode #2"]["tid"] != batch["decode #3"]["tid"]
    assert threads[(procs["e0"], batch["decode #3"]["tid"])].startswith("scheduler overlap")
    state = {e["name"]: e for e in slices if e["cat"] in ("pause", "idle")}
    assert (
        set(state) == {"pause", "idle"} and threads[(procs["e0"], state["pause"]["tid"])] == "state"
    )
    assert [e["name"] for e in slices if e["cat"] == "admin"] == ["cache_flush"]
    # The request is an async slice with its phase nested on the same id.
    asyncs = [e for e in events if e["ph"] in ("b", "e")]
    assert {(e["name"], e["ph"]) for e in asyncs} == {
        ("request", "b"),
        ("request", "e"),
        ("queue", "b"),
        ("queue", "e"),
    }
    assert len({e["id"] for e in asyncs}) == 1
    # Counters from batch attributes; the pause zeroes gen_throughput at its start.
    gen = [
        (e["ts"], e["args"]["value"])
        for e in events
        if e["ph"] == "C" and e["name"] == "gen_throughput"
    ]
    assert gen == [(20_000, 100.0), (25_000, 120.0), (30_000, 0)]
    assert any(e["ph"] == "C" and e["name"] == "token_usage" for e in events)
    assert any(e["ph"] == "C" and e["name"] == "running_reqs" for e in events)
    assert stats.get("trace_events", "perfetto", "recorded") == 9


def test_perfetto_is_bounded(tmp_path: Path) -> None:
    stats = ExportStats()
    exporter = PerfettoSpanExporter(tmp_path / "p.json", max_events=3, stats=stats)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    scheduler_timeline(provider.get_tracer("t"))
    provider.shutdown()
    doc = json.loads((tmp_path / "p.json").read_text())
    assert len([e for e in doc["traceEvents"] if e["ph"] in ("X", "b")]) == 3
    assert stats.get("trace_events", "perfetto", "dropped") == 6
    assert doc["otherData"]["dropped_spans"] == 6


def test_otlp_json_lines_are_the_default_without_endpoint_and_parse_back(tmp_path: Path) -> None:
    stats = ExportStats()
    config = ExportConfig(
        file_dir=tmp_path,
        perfetto_path=tmp_path / "sched.json",
        env={},
        stats=stats,
        bsp_schedule_delay_ms=50,
        metric_export_interval_ms=60_000,
    )
    tp = build_tracer_provider(config)
    mp = build_meter_provider(config)
    tracer = tp.get_tracer("t")
    with tracer.start_as_current_span(
        "request", attributes={"gen_ai.request.model": "tiny"}
    ) as parent:
        tracer.start_span("decode", attributes={"schedscope.forward_iter": 4}).end()
    mp.get_meter("t").create_histogram("sglang.e2e_request_latency", unit="s").record(0.5)
    tp.shutdown()
    mp.shutdown()

    lines = (tmp_path / "traces.jsonl").read_text().splitlines()
    raw = json.loads(lines[0])
    span0 = raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(span0["traceId"]) == 32 and int(span0["traceId"], 16)  # hex ids, as OTLP/JSON says
    assert isinstance(span0["kind"], int)  # enums as integers
    msgs = list(read_otlp_json_lines(tmp_path / "traces.jsonl"))
    assert all(isinstance(m, ExportTraceServiceRequest) for m in msgs)
    spans = {
        s.name: s
        for m in msgs
        for rs in m.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }
    assert spans["decode"].parent_span_id == parent.get_span_context().span_id.to_bytes(8, "big")
    assert spans["request"].trace_id == parent.get_span_context().trace_id.to_bytes(16, "big")
    assert spans["decode"].attributes[0].value.int_value == 4
    # Round trip through json_format is lossless.
    again = json_format.Parse(json_format.MessageToJson(msgs[0]), ExportTraceServiceRequest())
    assert again == msgs[0]

    (metrics,) = list(read_otlp_json_lines(tmp_path / "metrics.jsonl"))
    assert isinstance(metrics, ExportMetricsServiceRequest)
    names = {
        m.name for rm in metrics.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert "sglang.e2e_request_latency" in names
    assert stats.get("lines", "otlp_file", "written") == len(lines) + 1
    assert (tmp_path / "sched.json").exists()  # Perfetto written on shutdown


def test_perfetto_json_stays_valid_with_nan_and_infinity(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = PerfettoSpanExporter(tmp_path / "nan.json", stats=ExportStats())
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("admin") as span:
        span.set_attribute("x.nan", float("nan"))
        span.set_attribute("x.inf", [1.0, float("inf")])
    exporter.write()
    text = (tmp_path / "nan.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    args = next(e["args"] for e in doc["traceEvents"] if e.get("name") == "admin")
    assert args["x.nan"] is None and args["x.inf"] == [1.0, None]
