"""Request spans (phases, links to batch spans, traceparent) and latency histograms."""

from __future__ import annotations

from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.openmetrics.exposition import ALLOWUTF8
from prometheus_client.openmetrics.exposition import generate_latest as om_latest

from schedscope.telemetry.assembler import AssemblerConfig
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.schema import (
    BatchDone,
    BatchLaunched,
    DecodeStats,
    IdleBegin,
    PrefillStats,
    ReqAborted,
    ReqFinished,
    ReqFirstToken,
    ReqQueued,
    ReqRetracted,
    Shutdown,
)
from schedscope.telemetry.scripted import ScriptedEngine

BASE = ("test-model", "unified", "0", "0", "", "engine-a")
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN:016x}-01"


def hist(t, key):
    return t.pipeline.store.family(key).series[BASE]


def run_two_requests(t, e: ScriptedEngine, decode_steps: int = 12) -> None:
    """r1 (with traceparent) and r2 prefilled together at 10 ms, decoded every 5 ms."""
    e.hello()
    e.send(ReqQueued(e.ts(1), "r1", 100, 16, traceparent=TRACEPARENT))
    e.send(ReqQueued(e.ts(4), "r2", 50))
    e.send(BatchLaunched(e.ts(10), 1, "prefill", ["r1", "r2"], 150))
    e.send(
        BatchDone(e.ts(30), 1, "prefill", prefill=PrefillStats(2, 150, 0, 2, 0, 0.1)),
        ReqFirstToken(e.ts(30), "r1", cached_tokens=20),
        ReqFirstToken(e.ts(30), "r2"),
    )
    for k in range(decode_steps):
        fi, start = 2 + k, 30 + 5 * k
        e.send(BatchLaunched(e.ts(start + 1), fi, "decode", ["r1", "r2"], 2))
        e.send(
            BatchDone(e.ts(start + 5), fi, "decode", decode=DecodeStats(2, 200, 2, 400.0, 0.2, 0))
        )
    end = 30 + 5 * decode_steps
    e.send(ReqFinished(e.ts(end), "r1", 100, decode_steps + 1, 20, "stop"))
    e.send(ReqAborted(e.ts(end + 1), "r2", decode_steps + 1, "client gone"))


def test_request_span_phases_genai_attributes_and_traceparent():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    run_two_requests(t, e)
    spans = t.spans.get_finished_spans()
    r1 = next(s for s in spans if s.attributes.get("schedscope.rid") == "r1")
    assert r1.name == "text_completion test-model"
    assert r1.kind == SpanKind.SERVER
    assert r1.context.trace_id == TRACE_ID and r1.parent.span_id == PARENT_SPAN
    assert (r1.start_time, r1.end_time) == (e.wall(1), e.wall(90))
    a = r1.attributes
    assert a["gen_ai.request.model"] == "test-model"
    assert a["gen_ai.usage.input_tokens"] == 100
    assert a["gen_ai.usage.output_tokens"] == 13
    assert a["gen_ai.usage.cache_read.input_tokens"] == 20
    assert a["gen_ai.request.max_tokens"] == 16
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    phases = {s.name: s for s in spans if s.parent and s.parent.span_id == r1.context.span_id}
    assert {n: (p.start_time, p.end_time) for n, p in phases.items()} == {
        "queued": (e.wall(1), e.wall(10)),
        "prefill": (e.wall(10), e.wall(30)),
        "decode": (e.wall(30), e.wall(90)),
    }
    r2 = next(s for s in spans if s.attributes.get("schedscope.rid") == "r2")
    assert r2.context.trace_id != TRACE_ID and r2.parent is None
    assert tuple(r2.attributes["gen_ai.response.finish_reasons"]) == ("abort",)
    assert r2.status.status_code == StatusCode.UNSET


def test_request_links_first_and_last_batches_bounded():
    t = in_memory_pipeline(config=AssemblerConfig(batch_links=3))
    e = ScriptedEngine(t.pipeline.handle)
    run_two_requests(t, e, decode_steps=12)  # 13 batches: forward_iters 1..13
    spans = t.spans.get_finished_spans()
    by_span_id = {s.context.span_id: s for s in spans if s.name.startswith("batch ")}
    r1 = next(s for s in spans if s.attributes.get("schedscope.rid") == "r1")
    linked = [
        by_span_id[link.context.span_id].attributes["schedscope.forward_iter"] for link in r1.links
    ]
    assert linked == [1, 2, 3, 11, 12, 13]
    assert [link.attributes["schedscope.link"] for link in r1.links] == ["first"] * 3 + ["last"] * 3
    assert r1.attributes["schedscope.batches"] == 13


def test_ttft_itl_tpot_e2e_queue_histograms_match_event_times():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    run_two_requests(t, e, decode_steps=12)
    ttft = hist(t, "ttft")
    assert sum(ttft.counts) == 2 and abs(ttft.sum - (0.029 + 0.026)) < 1e-9
    itl = hist(t, "itl")
    # first decode: 5 ms after the first token (30 -> 35); then every 5 ms: 24 samples of 5 ms
    assert sum(itl.counts) == 24 and abs(itl.sum - 24 * 0.005) < 1e-9
    assert itl.counts[itl.bounds.index(0.006)] == 24  # 0.004 < 0.005 <= 0.006
    queue = hist(t, "queue_time")
    assert sum(queue.counts) == 2 and abs(queue.sum - (0.009 + 0.006)) < 1e-9
    e2e = hist(t, "e2e")  # aborted requests are not in the latency histogram
    assert sum(e2e.counts) == 1 and abs(e2e.sum - 0.089) < 1e-9
    tpot = hist(t, "tpot")
    assert sum(tpot.counts) == 1 and abs(tpot.sum - 0.060 / 12) < 1e-9
    store = t.pipeline.store
    assert store.family("num_requests").series[BASE].value == 2
    assert store.family("requests_by_reason").series[(*BASE, "stop")].value == 1
    assert store.family("requests_by_reason").series[(*BASE, "abort")].value == 1
    assert store.family("generation_tokens").series[BASE].value == 26
    # exemplars point at the request's trace, in the OpenMetrics exposition
    text = om_latest(t.registry, escaping=ALLOWUTF8).decode()  # keeps `:` (as /metrics does)
    ttft_line = next(
        x
        for x in text.splitlines()
        if x.startswith("sglang:time_to_first_token_seconds_bucket") and "#" in x
    )
    assert "trace_id=" in ttft_line and "span_id=" in ttft_line


def test_otlp_histograms_use_genai_names_and_table_buckets():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    run_two_requests(t, e)
    got = {}
    for rm in t.metric_reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                got[m.name] = m.data.data_points
    (ttft,) = got["gen_ai.server.time_to_first_token"]
    assert ttft.count == 2 and abs(ttft.sum - 0.055) < 1e-9
    assert tuple(ttft.explicit_bounds)[:3] == (0.1, 0.2, 0.4)
    assert ttft.exemplars  # recorded with the request span's context
    (e2e,) = got["gen_ai.server.request.duration"]
    assert e2e.count == 1
    (reqs,) = got["sglang.num_requests"]
    assert reqs.value == 2 and reqs.attributes["engine_id"] == "engine-a"


def test_retraction_requeues_and_shutdown_ends_open_requests_with_error():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(ReqQueued(e.ts(1), "r1", 10))
    e.send(BatchLaunched(e.ts(2), 1, "prefill", ["r1"], 10))
    e.send(ReqRetracted(e.ts(3), "r1"))
    e.send(BatchLaunched(e.ts(4), 2, "prefill", ["r1"], 10))
    e.send(Shutdown(e.ts(6)))
    spans = t.spans.get_finished_spans()
    req = next(s for s in spans if s.name.startswith("text_completion"))
    assert req.status.status_code == StatusCode.ERROR and req.end_time == e.wall(6)
    assert [ev.name for ev in req.events] == ["retracted"]
    phases = [s.name for s in spans if s.parent and s.parent.span_id == req.context.span_id]
    assert phases == ["queued", "prefill", "queued", "prefill"]
    assert sum(hist(t, "queue_time").counts) == 1  # first launch only
    assert (
        t.pipeline.store.family("spans_force_ended").series[(*BASE, "request", "shutdown")].value
        == 1
    )


def test_in_flight_requests_are_bounded_and_idle_closes_leftovers():
    t = in_memory_pipeline(config=AssemblerConfig(max_requests=2))
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    for i in range(3):
        e.send(ReqQueued(e.ts(1 + i), f"r{i}", 10))
    store = t.pipeline.store
    assert store.family("requests_evicted").series[BASE].value == 1
    evicted = [s for s in t.spans.get_finished_spans() if s.name.startswith("text_completion")]
    assert [s.attributes["schedscope.rid"] for s in evicted] == ["r0"]
    assert evicted[0].status.status_code == StatusCode.ERROR
    e.send(IdleBegin(e.ts(10)))  # fully idle: nothing can still be running or waiting
    assert len(t.pipeline.engines["engine-a"].reqs) == 0
    assert store.family("spans_force_ended").series[(*BASE, "request", "idle")].value == 2
