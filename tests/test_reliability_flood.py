"""Floods (issue 10), scaled down from the benchmark's sizes (benchmarks/flood.py: 1M events,
100k in-flight requests): bounded memory, every event processed or counted as dropped, no
crash, /metrics keeps answering."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import generate_latest

from schedscope.telemetry import schema as s
from schedscope.telemetry.assembler import AssemblerConfig
from schedscope.telemetry.engines import EngineRegistry
from schedscope.telemetry.ingest import Ingest
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.sidecar import Sidecar

from .reliability_support import metric_value, prom

# The emitter's own hello/heartbeat/stats events show up on both sides of the accounting.
OWN_EVENTS_SLACK = 200


def test_100k_event_flood_into_a_real_sidecar_is_bounded_and_fully_accounted(
    tmp_path: Path,
) -> None:
    from flood import event_flood  # benchmarks/ (on sys.path through reliability_support)

    r = event_flood(100_000, tmp_path, queue_frames=16, drain_timeout_s=120)
    # No crash, and a clean exit.
    assert r["sidecar_exit_code"] == 0
    assert r["sidecar_state"]["handler_errors"] == 0
    # Far more than the 16-frame queue holds arrived at once: drops happened and were counted.
    assert r["sidecar_queue_dropped_events"] + r["emitter_dropped_events"] > 0
    assert r["sidecar_state"]["queue_dropped_frames"] > 0
    # Every event was processed or counted as dropped.
    assert abs(r["unaccounted_events"]) <= OWN_EVENTS_SLACK, r
    # /metrics answered under the flood, every time it was asked.
    assert r["metrics_scrapes_failed"] == 0
    # Memory bounded by the queue, not by the flood (generous margin for a shared machine).
    assert r["peak_rss_mib"] - r["start_rss_mib"] < 400, r


def test_in_flight_requests_beyond_the_bound_are_evicted_and_counted() -> None:
    """Requests queued and never finished: the per-engine bound holds, the oldest are ended
    (error status, counted) and /metrics still renders."""
    bound, n = 2_000, 10_000
    tel = in_memory_pipeline(config=AssemblerConfig(max_requests=bound))
    ingest = Ingest("inproc://unused", queue_size=100)
    sidecar = Sidecar(ingest, tel.pipeline, registry=EngineRegistry())
    tel.pipeline.watch_ingest(ingest.counters)
    info = s.EngineInfo(model="inflight")
    hello = s.EngineHello(time.monotonic_ns(), time.time_ns(), info)
    seq = 0
    ingest.accept(s.encode_envelope("flood", seq, [hello]))
    for start in range(0, n, 500):
        seq += 1
        t = time.monotonic_ns()
        events = [s.ReqQueued(t, f"req-{i}", 64) for i in range(start, start + 500)]
        ingest.accept(s.encode_envelope("flood", seq, events))
        sidecar.process(timeout=0)
    asm = tel.pipeline.engines["flood"]
    assert len(asm.reqs) == bound  # bounded state
    assert asm.m.requests_evicted.value == n - bound  # every eviction counted
    ended = [sp for sp in tel.spans.get_finished_spans() if sp.name.startswith("text_completion")]
    assert len(ended) == n - bound  # evicted requests' spans ended (with error status)
    assert all(sp.status.description and "evicted" in sp.status.description for sp in ended)
    text = generate_latest(tel.registry).decode()
    assert metric_value(text, prom("requests_evicted"), engine_id="flood") == n - bound
    ingest.stop()
