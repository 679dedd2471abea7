"""Sidecar throughput on one core: raw events/s through EngineRegistry + TelemetryPipeline into
metrics, and spans/s into an in-memory exporter against the bare OTel SDK's span rate, measured
in the same run.

Event mix (one engine, steady state like SGLang's scheduler): 32 running requests, prompts of
512 tokens (page 16: 32 BlockStored per prefill), 128 output tokens; each step is a
BatchLaunched + BatchDone (decode stats, 32 rids), a KvEvents every 16 steps (a page filled per
request), and requests arrive/finish continuously (ReqQueued, a prefill batch, ReqFirstToken,
ReqFinished). Messages carry ~5 ms of steps, like the emitter's default flush.

    python benchmarks/sidecar_throughput.py [--events 300000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from schedscope.telemetry.engines import EngineRegistry
from schedscope.telemetry.ingest import Received
from schedscope.telemetry.otel_histograms import HistogramInMemoryReader, OtlpHistogramBridge
from schedscope.telemetry.pipeline import TelemetryPipeline
from schedscope.telemetry.schema import (
    BatchDone,
    BatchLaunched,
    BlockStored,
    DecodedFrame,
    DecodeStats,
    EngineHello,
    EngineInfo,
    Event,
    KvEvents,
    PrefillStats,
    ReqFinished,
    ReqFirstToken,
    ReqQueued,
)

RUNNING, PROMPT, OUTPUT, PAGE = 32, 512, 128, 16
STEP_NS = 1_000_000  # 1 ms decode step
STEPS_PER_MESSAGE = 5


def make_frames(n_events: int) -> list[DecodedFrame]:
    """Scripted raw events for one engine, grouped into messages."""
    t = 1_000_000_000_000
    info = EngineInfo(model="bench-model", hostname="bench", pid=1)
    events: list[Event] = [EngineHello(t, time.time_ns(), info)]
    remaining: dict[str, int] = {}
    next_rid = fi = 0
    hash_ = 1
    step = 0
    while len(events) < n_events:
        t += STEP_NS
        step += 1
        # admit new requests (one prefill batch for all newcomers)
        new = []
        while len(remaining) < RUNNING:
            rid = f"req-{next_rid:08d}"
            next_rid += 1
            remaining[rid] = OUTPUT
            new.append(rid)
            events.append(ReqQueued(t, rid, PROMPT, OUTPUT))
        if new:
            fi += 1
            events.append(BatchLaunched(t, fi, "prefill", new, PROMPT * len(new)))
            t += STEP_NS
            stats = PrefillStats(len(new), PROMPT * len(new), 0, RUNNING, 0, 0.4)
            events.append(BatchDone(t, fi, "prefill", prefill=stats))
            kv = []
            for rid in new:
                events.append(ReqFirstToken(t, rid))
                for _ in range(PROMPT // PAGE):
                    kv.append(BlockStored([hash_], hash_ - 1, list(range(PAGE)), PAGE))
                    hash_ += 1
            events.append(KvEvents(t, fi, kv))
        rids = list(remaining)
        fi += 1
        events.append(BatchLaunched(t, fi, "decode", rids, RUNNING))
        t += STEP_NS
        dstats = DecodeStats(RUNNING, RUNNING * 600, RUNNING, 30000.0, 0.45, 0, 0.0, True)
        events.append(BatchDone(t, fi, "decode", decode=dstats))
        if step % PAGE == 0:
            kv = [BlockStored([hash_ + i], None, list(range(PAGE)), PAGE) for i in range(RUNNING)]
            hash_ += RUNNING
            events.append(KvEvents(t, fi, kv))
        for rid in rids:
            remaining[rid] -= 1
            if remaining[rid] <= 0:
                del remaining[rid]
                events.append(ReqFinished(t, rid, PROMPT, OUTPUT, 0, "length"))
    # ~5 decode steps (~14 events) per message, like a 5 ms emitter flush
    per_msg = 14
    return [
        DecodedFrame("bench-engine", seq, events[i : i + per_msg])
        for seq, i in enumerate(range(0, len(events), per_msg))
    ]


def run_pipeline(
    frames: list[DecodedFrame], pipeline: TelemetryPipeline, with_registry: bool = True
) -> float:
    """Seconds to feed every frame: EngineRegistry.observe + pipeline.handle, as the sidecar
    loop does (with_registry), or pipeline.handle alone (observations made beforehand)."""
    registry = EngineRegistry()
    handle = pipeline.handle
    observe = registry.observe
    now = time.time_ns()
    received = [Received(f, now) for f in frames]
    if not with_registry:
        pairs = [(r, observe(r.frame)) for r in received]
        t0 = time.perf_counter()
        for r, obs in pairs:
            handle(r, obs)
    else:
        t0 = time.perf_counter()
        for r in received:
            handle(r, observe(r.frame))
    pipeline.tick(now)
    return time.perf_counter() - t0


def best_of(n: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(n))


def tracer_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    tp = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp


def bare_sdk_spans(n_spans: int) -> float:
    """The OTel SDK alone: spans with explicit times and 8 attributes, ended at once."""
    exporter = InMemorySpanExporter()
    tracer = tracer_provider(exporter).get_tracer("bench")
    t = time.time_ns()
    t0 = time.perf_counter()
    for i in range(n_spans):
        span = tracer.start_span(
            "batch decode",
            start_time=t + i,
            attributes={
                "schedscope.forward_iter": i,
                "schedscope.batch.mode": "decode",
                "schedscope.batch.num_reqs": 32,
                "schedscope.batch.num_tokens": 32,
            },
        )
        span.set_attributes({"a": 1, "b": 2, "c": 0.5, "d": True})
        span.end(end_time=t + i + 1)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per case")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (one core)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})

    frames = make_frames(args.events)
    n_events = sum(len(f.events) for f in frames)
    n_rids = sum(len(e.rids) for f in frames for e in f.events if isinstance(e, BatchLaunched))

    results: dict[str, dict[str, float]] = {}

    def otel_pipeline() -> tuple[TelemetryPipeline, HistogramInMemoryReader]:
        histograms = OtlpHistogramBridge()
        reader = HistogramInMemoryReader(histograms)
        mp = MeterProvider(metric_readers=[reader])
        return TelemetryPipeline(None, mp, CollectorRegistry(), otel_histograms=histograms), reader

    def metrics_case(name: str, with_otel: bool, with_registry: bool) -> None:
        def once() -> float:
            p = (
                otel_pipeline()[0]
                if with_otel
                else TelemetryPipeline(None, None, CollectorRegistry())
            )
            return run_pipeline(frames, p, with_registry)

        secs = best_of(args.repeat, once)
        results[name] = {"seconds": secs, "events_per_s": n_events / secs}

    metrics_case("metrics, Prometheus view: handle()", False, False)
    metrics_case("metrics, Prometheus + OTel views: handle()", True, False)
    metrics_case("metrics, Prom + OTel: registry + handle()", True, True)

    # spans + metrics
    exporter = InMemorySpanExporter()

    def spans_once() -> float:
        exporter.clear()
        # Prometheus view only: the OTel views' cost is shown by the cases above.
        p = TelemetryPipeline(tracer_provider(exporter), None, CollectorRegistry())
        secs = run_pipeline(frames, p)
        p.close()
        return secs

    span_events = min(n_events, 100_000)
    frames_spans = frames[: max(1, span_events // 14)]
    n_events_spans = sum(len(f.events) for f in frames_spans)
    frames, full = frames_spans, frames
    secs = best_of(args.repeat, spans_once)
    n_spans = len(exporter.get_finished_spans())
    frames = full
    results["spans + Prometheus view: handle()"] = {
        "seconds": secs,
        "events_per_s": n_events_spans / secs,
        "spans_per_s": n_spans / secs,
        "spans": n_spans,
    }
    bare = best_of(args.repeat, lambda: bare_sdk_spans(n_spans))
    results["bare OTel SDK spans"] = {"seconds": bare, "spans_per_s": n_spans / bare}

    # scrape cost, with the metrics of the last run
    p = TelemetryPipeline(None, None, CollectorRegistry())
    run_pipeline(frames[:2000], p)
    t0 = time.perf_counter()
    for _ in range(20):
        generate_latest(p.registry)
    scrape_ms = (time.perf_counter() - t0) / 20 * 1e3
    # OTLP collection cost: observable gauges/counters plus the histograms built from the store
    p, reader = otel_pipeline()
    run_pipeline(frames[:2000], p)
    t0 = time.perf_counter()
    for _ in range(20):
        reader.get_metrics_data()
    collect_ms = (time.perf_counter() - t0) / 20 * 1e3

    ratio = results["spans + Prometheus view: handle()"]["spans_per_s"] / (n_spans / bare)
    print(
        f"events: {n_events} ({n_rids} batch rids, {len(frames)} messages), "
        f"python {platform.python_version()}, {platform.machine()}, best of {args.repeat}"
    )
    print(f"{'case':<46} {'events/s':>12} {'spans/s':>10}")
    for name, r in results.items():
        ev = f"{r['events_per_s']:>12,.0f}" if "events_per_s" in r else f"{'':>12}"
        sp = f"{r['spans_per_s']:>10,.0f}" if "spans_per_s" in r else f"{'':>10}"
        print(f"{name:<46} {ev} {sp}")
    print(f"pipeline span rate / bare SDK span rate: {ratio:.2f}")
    print(f"/metrics scrape (generate_latest): {scrape_ms:.2f} ms")
    print(f"OTLP collection (get_metrics_data, histograms included): {collect_ms:.2f} ms")
    if args.json_path:
        out = {
            "events": n_events,
            "rids": n_rids,
            "results": results,
            "span_rate_ratio_vs_bare_sdk": ratio,
            "scrape_ms": scrape_ms,
            "otlp_collect_ms": collect_ms,
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
