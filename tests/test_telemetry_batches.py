"""Batch spans keyed by forward_iter (seed 002): overlap order, anomalies, crash handling."""

from __future__ import annotations

from opentelemetry.trace import StatusCode

from schedscope.telemetry.assembler import AssemblerConfig
from schedscope.telemetry.engines import EngineRegistry
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.schema import (
    BatchDone,
    BatchLaunched,
    DecodeStats,
    EngineHello,
    PrefillStats,
    Shutdown,
)
from schedscope.telemetry.scripted import ScriptedEngine

BASE = ("test-model", "unified", "0", "0", "", "engine-a")


def dstats(gen=1):
    return DecodeStats(2, 100, gen, 80.0, 0.3, 0)


def anomalies(t) -> dict[str, float]:
    fam = t.pipeline.store.family("forward_iter_anomalies")
    return {k[-1]: s.value for k, s in fam.series.items() if s.value}


def counter(t, key, *extra):
    return t.pipeline.store.family(key).series[BASE + extra].value


def batch_spans(t):
    return [s for s in t.spans.get_finished_spans() if s.name.startswith("batch ")]


def test_overlap_interleaving_gives_exact_forward_iters_and_no_anomaly():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    # overlap: launch N+1 before N is done; results are processed one step behind
    e.send(BatchLaunched(e.ts(1), 1, "prefill", ["a", "b"], 64))
    e.send(BatchLaunched(e.ts(2), 2, "decode", ["a", "b"], 2))
    e.send(BatchDone(e.ts(3), 1, "prefill", prefill=PrefillStats(2, 60, 4, 2, 0, 0.1)))
    for n in range(3, 8):
        e.send(BatchLaunched(e.ts(n + 0.5), n, "decode", ["a", "b"], 2))
        e.send(BatchDone(e.ts(n + 1), n - 1, "decode", decode=dstats(2)))
    e.send(BatchDone(e.ts(9), 7, "decode", decode=dstats(2)))
    spans = batch_spans(t)
    assert sorted(s.attributes["schedscope.forward_iter"] for s in spans) == list(range(1, 8))
    first = next(s for s in spans if s.attributes["schedscope.forward_iter"] == 1)
    assert first.name == "batch prefill"
    assert (first.start_time, first.end_time) == (e.wall(1), e.wall(3))
    assert first.attributes["schedscope.prefill.cached_tokens"] == 4
    assert all(s.status.status_code == StatusCode.UNSET for s in spans)
    assert anomalies(t) == {}
    assert counter(t, "forward_iterations", "decode") == 6
    assert counter(t, "realtime_tokens", "decode") == 12
    assert counter(t, "cache_hit_rate") == 4 / 64


def test_duplicates_gaps_backwards_and_unmatched_done_are_counted_not_double_counted():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(BatchLaunched(e.ts(1), 1, "decode", [], 1))
    e.send(BatchDone(e.ts(2), 1, "decode", decode=dstats()))
    e.send(BatchDone(e.ts(2), 1, "decode", decode=dstats()))  # duplicate done
    e.send(BatchLaunched(e.ts(3), 1, "decode", [], 1))  # duplicate launch
    e.send(BatchLaunched(e.ts(4), 4, "decode", [], 1))  # gap: 2, 3 skipped, nothing lost
    e.send(BatchDone(e.ts(5), 4, "decode", decode=dstats()))
    e.send(BatchLaunched(e.ts(6), 3, "decode", [], 1))  # backwards
    e.send(BatchDone(e.ts(7), 3, "decode", decode=dstats()))
    e.send(BatchDone(e.ts(8), 9, "decode", decode=dstats()))  # never launched
    assert anomalies(t) == {"duplicate": 2, "gap": 1, "backwards": 1, "done_without_launch": 1}
    assert counter(t, "forward_iterations", "decode") == 4  # 1, 4, 3, 9: once each
    assert len(batch_spans(t)) == 3


def test_gap_explained_by_lost_messages_is_not_an_anomaly():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(BatchLaunched(e.ts(1), 1, "decode", [], 1))
    e.send(BatchDone(e.ts(2), 1, "decode", decode=dstats()))
    e.lose(2)  # the messages carrying iters 2 and 3
    e.send(BatchLaunched(e.ts(5), 4, "decode", [], 1))
    assert anomalies(t) == {}
    assert counter(t, "lost_messages") == 2


def test_shutdown_mid_batch_ends_open_span_with_error():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(BatchLaunched(e.ts(1), 1, "decode", [], 1))
    e.send(Shutdown(e.ts(5), "sigterm"))
    (span,) = batch_spans(t)
    assert span.status.status_code == StatusCode.ERROR
    assert "shutdown" in span.status.description
    assert span.end_time == e.wall(5)
    assert counter(t, "spans_force_ended", "batch", "shutdown") == 1
    assert counter(t, "num_running_reqs") == 0


def test_restart_mid_batch_ends_open_span_with_error_and_counts_restart():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(BatchLaunched(e.ts(1), 7, "prefill", [], 10))
    # same engine_id counting from seq 0 again: a new instance
    e.seq = 0
    e.send(EngineHello(e.ts(100), e.wall(100), e.info))
    (span,) = batch_spans(t)
    assert span.status.status_code == StatusCode.ERROR
    assert "restart" in span.status.description
    assert counter(t, "engine_restarts") == 1
    # the new instance's forward_iter starts over without a "backwards" anomaly
    e.send(BatchLaunched(e.ts(101), 1, "decode", [], 1))
    assert anomalies(t) == {}


def test_restart_under_new_engine_id_closes_the_old_instance():
    t = in_memory_pipeline()
    # registry that takes any same-identity newcomer as a restart (no 3 s staleness wait)
    a = ScriptedEngine(
        t.pipeline.handle, engine_id="old", registry=EngineRegistry(restart_stale_s=0)
    )
    a.hello()
    a.send(BatchLaunched(a.ts(1), 1, "decode", [], 1))
    b = ScriptedEngine(t.pipeline.handle, engine_id="new", registry=a.registry)
    b.hello(50)
    (span,) = batch_spans(t)
    assert span.status.status_code == StatusCode.ERROR
    assert set(t.pipeline.engines) == {"new"}


def test_batch_done_that_never_comes_times_out_with_error():
    t = in_memory_pipeline(config=AssemblerConfig(batch_timeout_ns=5_000_000_000))
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(BatchLaunched(e.ts(1), 1, "decode", [], 1))
    e.send(BatchLaunched(e.ts(2), 2, "decode", [], 1))
    e.send(BatchDone(e.ts(3), 2, "decode", decode=dstats()))
    t.pipeline.tick(e.wall(1) + 4_999_999_999)
    assert len(batch_spans(t)) == 1
    t.pipeline.tick(e.wall(1) + 5_000_000_000)
    timed_out = [s for s in batch_spans(t) if s.status.status_code == StatusCode.ERROR]
    assert [s.attributes["schedscope.forward_iter"] for s in timed_out] == [1]
    assert counter(t, "spans_force_ended", "batch", "timeout") == 1
    e.send(BatchDone(e.ts(6000), 1, "decode", decode=dstats()))  # too late: a duplicate
    assert anomalies(t) == {"duplicate": 1}
