"""Seed 000 and DESIGN §5: gen_throughput zeroed on pause spans; KV batches flushed on idle."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from schedscope.telemetry.assembler import AssemblerConfig
from schedscope.telemetry.kv_batcher import KvBatchingConfig
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.schema import (
    MEDIUM_CPU,
    PAUSE_MODES,
    BatchDone,
    BatchLaunched,
    BlockRemoved,
    BlockStored,
    DecodeStats,
    Heartbeat,
    IdleBegin,
    IdleEnd,
    KvEvents,
    Paused,
    ReqQueued,
    Resumed,
)
from schedscope.telemetry.scripted import ScriptedEngine

LABELS = (
    'dp_rank="",engine_id="engine-a",engine_type="unified",model_name="test-model",'
    'pp_rank="0",tp_rank="0"'
)


def prom_gen_throughput(t) -> float:
    line = f"sglang:gen_throughput{{{LABELS}}} "
    for row in generate_latest(t.registry).decode().splitlines():
        if row.startswith(line):
            return float(row[len(line) :])
    raise AssertionError("gen_throughput not exposed")


def otlp_value(t, name: str) -> float:
    for rm in t.metric_reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    (point,) = m.data.data_points
                    return point.value
    raise AssertionError(f"{name} not collected")


def decode_step(e: ScriptedEngine, fi: int, ms: float, throughput: float) -> None:
    e.send(BatchLaunched(e.ts(ms), fi, "decode", ["r1"], 1))
    e.send(BatchDone(e.ts(ms + 1), fi, "decode", decode=DecodeStats(1, 50, 1, throughput, 0.2, 0)))


@pytest.mark.parametrize("mode", PAUSE_MODES)
def test_pause_during_decode_zeroes_gen_throughput_until_next_decode(mode):
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(ReqQueued(e.ts(1), "r1", 8))
    decode_step(e, 1, 2, 1234.5)
    assert prom_gen_throughput(t) == 1234.5
    assert otlp_value(t, "sglang.gen_throughput") == 1234.5

    e.send(Paused(e.ts(10), mode, "weights update"))
    # right after Paused is processed: 0 on /metrics and in OTLP, paused gauge up
    assert prom_gen_throughput(t) == 0.0
    assert otlp_value(t, "sglang.gen_throughput") == 0.0
    assert otlp_value(t, "schedscope.paused") == 1.0

    # a batch still in flight finishing while paused does not bring the old value back
    e.send(BatchLaunched(e.ts(10.5), 2, "decode", ["r1"], 1))
    e.send(BatchDone(e.ts(11), 2, "decode", decode=DecodeStats(1, 51, 1, 999.0, 0.2, 0)))
    assert prom_gen_throughput(t) == 0.0
    e.send(Resumed(e.ts(20)))
    assert prom_gen_throughput(t) == 0.0  # until the first decode batch after the pause
    assert otlp_value(t, "schedscope.paused") == 0.0
    decode_step(e, 3, 21, 777.0)
    assert prom_gen_throughput(t) == 777.0
    assert otlp_value(t, "sglang.gen_throughput") == 777.0

    (pause,) = [s for s in t.spans.get_finished_spans() if s.name == "pause"]
    assert pause.attributes["schedscope.pause.mode"] == mode
    assert pause.attributes["schedscope.pause.reason"] == "weights update"
    assert (pause.start_time, pause.end_time) == (e.wall(10), e.wall(20))
    assert (
        t.pipeline.store.family("pauses")
        .series[("test-model", "unified", "0", "0", "", "engine-a", mode)]
        .value
        == 1
    )


def test_pause_zeroes_without_tracing_too():
    t = in_memory_pipeline(tracing=False)
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    decode_step(e, 1, 1, 50.0)
    e.send(Paused(e.ts(5), "retract"))
    assert prom_gen_throughput(t) == 0.0
    assert t.spans.get_finished_spans() == ()


def kv(e, ms, fi, *hashes):
    return KvEvents(e.ts(ms), fi, [BlockStored([h], None, [h], 1) for h in hashes])


def test_idle_flushes_pending_kv_exactly_when_idle_span_opens():
    t = in_memory_pipeline(config=AssemblerConfig(kv=KvBatchingConfig(32, 20_000_000)))
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(kv(e, 1, 1, 1, 2, 3))
    e.send(KvEvents(e.ts(2), 2, [BlockRemoved([2])]))
    t.pipeline.tick(e.wall(1) + 19_000_000)  # the window has not passed: nothing out yet
    assert t.kv.batches == []
    e.send(IdleBegin(e.ts(3)))
    (batch,) = t.kv.batches  # out at the moment the idle span opens, before any tick
    assert [type(ev).__name__ for ev in batch.events] == [
        "BlockStored", "BlockStored", "BlockStored", "BlockRemoved",
    ]  # fmt: skip
    assert (batch.first_forward_iter, batch.last_forward_iter) == (1, 2)
    t.pipeline.tick(e.wall(100))
    e.send(IdleEnd(e.ts(50)))
    assert len(t.kv.batches) == 1  # nothing duplicated
    (idle,) = [s for s in t.spans.get_finished_spans() if s.name == "idle"]
    assert (idle.start_time, idle.end_time) == (e.wall(3), e.wall(50))
    store = t.pipeline.store
    base = ("test-model", "unified", "0", "0", "", "engine-a")
    assert store.family("kv_cached_blocks").series[base].value == 2
    assert store.family("idle_seconds").series[base].value == pytest.approx(0.047)
    assert store.family("kv_batches").series[(*base, "idle")].value == 1


def test_pause_flushes_kv_and_window_and_count_flush_without_loss():
    t = in_memory_pipeline(config=AssemblerConfig(kv=KvBatchingConfig(4, 20_000_000)))
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(kv(e, 1, 1, 1, 2, 3, 4, 5))  # >= 4: out by count at once
    assert [len(b.events) for b in t.kv.batches] == [5]
    e.send(kv(e, 2, 2, 6))
    t.pipeline.tick(e.wall(2) + 19_999_999)
    assert len(t.kv.batches) == 1
    t.pipeline.tick(e.wall(2) + 20_000_000)  # window elapsed
    assert [len(b.events) for b in t.kv.batches] == [5, 1]
    e.send(kv(e, 30, 3, 7, 8))
    e.send(Paused(e.ts(31), "in_place"))
    assert [len(b.events) for b in t.kv.batches] == [5, 1, 2]
    hashes = [ev.block_hashes[0] for b in t.kv.batches for ev in b.events]
    assert hashes == [1, 2, 3, 4, 5, 6, 7, 8]


def test_broken_sink_is_counted_and_others_still_get_batches():
    class Broken:
        name = "broken"

        def publish(self, batch):
            raise RuntimeError("down")

        def close(self):
            pass

    t = in_memory_pipeline()
    t.pipeline.add_kv_sink(Broken())
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(kv(e, 1, 1, 1))
    e.send(IdleBegin(e.ts(2)))
    assert len(t.kv.batches) == 1
    base = ("test-model", "unified", "0", "0", "", "engine-a")
    assert t.pipeline.store.family("kv_sink_errors").series[(*base, "broken")].value == 1


def test_cpu_tier_blocks_do_not_count_as_device_cache_occupancy():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(kv(e, 1, 1, 1, 2, 3))  # three GPU pages
    # The engine offloads page 3 to the CPU tier, then evicts it from the GPU.
    e.send(KvEvents(e.ts(2), 2, [BlockStored([3], 2, [3], 1, medium=MEDIUM_CPU)]))
    e.send(KvEvents(e.ts(3), 2, [BlockRemoved([3])]))
    e.send(KvEvents(e.ts(4), 3, [BlockRemoved([3], medium=MEDIUM_CPU)]))
    store = t.pipeline.store
    base = ("test-model", "unified", "0", "0", "", "engine-a")
    assert store.family("kv_cached_blocks").series[base].value == 2
    # Stored/removed counters cover every medium.
    assert store.family("kv_blocks_stored").series[base].value == 4
    assert store.family("kv_blocks_removed").series[base].value == 2


def test_idle_seconds_grow_while_the_idle_span_is_open():
    t = in_memory_pipeline()
    e = ScriptedEngine(t.pipeline.handle)
    e.hello()
    e.send(IdleBegin(e.ts(10)))
    store = t.pipeline.store
    base = ("test-model", "unified", "0", "0", "", "engine-a")

    def heartbeat(ms: float) -> None:
        e.send(Heartbeat(e.ts(ms), e.wall(ms), e.info))

    heartbeat(510)
    t.pipeline.tick(e.wall(600))  # credited up to the engine's last word, not the sidecar's now
    assert store.family("idle_seconds").series[base].value == pytest.approx(0.5)
    heartbeat(1010)
    t.pipeline.tick(e.wall(1100))
    assert store.family("idle_seconds").series[base].value == pytest.approx(1.0)
    e.send(IdleEnd(e.ts(1210)))  # the rest is credited once, not twice
    assert store.family("idle_seconds").series[base].value == pytest.approx(1.2)
