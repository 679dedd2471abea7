"""End-to-end latencies of the seeds' semantics through a real `schedscope sidecar` process
(DESIGN §9): pause → gen_throughput 0 on /metrics (target < 100 ms) and idle → pending KV
batches out of the KV relay (target < 50 ms).

Each trial starts when the engine-side loop emits the event and calls ``flush()`` (what the
engine does on pause and idle) and ends when the outside world sees the effect: a /metrics
scrape with gen_throughput 0 for that engine, or the relay's subscriber receiving the batch.

    python benchmarks/latency.py [--trials 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import zmq
from harness import (
    SidecarProc,
    StepLoop,
    free_port,
    ipc_endpoint,
    metric_value,
    prom,
    wait_for,
)

from schedscope.engine.emitter import Emitter
from schedscope.telemetry import schema as s


def _summary(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {
        "trials": len(ordered),
        "p50_ms": statistics.median(ordered),
        "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max_ms": ordered[-1],
    }


def pause_to_zero(proc: SidecarProc, em: Emitter, trials: int) -> dict:
    loop = StepLoop(em)

    def gen_throughput() -> float:
        return metric_value(proc.scrape(), prom("gen_throughput"), engine_id=em.engine_id)

    samples: list[float] = []
    for _ in range(trials):
        # Decoding: wait until /metrics shows a non-zero gen_throughput.
        for _ in range(2000):
            loop.step()
            time.sleep(0.001)
            if loop.steps % 20 == 0 and gen_throughput() > 0:
                break
        t0 = time.perf_counter()
        em.emit(s.Paused(time.monotonic_ns(), s.PAUSE_IN_PLACE, "benchmark"))
        em.flush()  # the engine flushes pause at once (seed 000)
        wait_for(lambda: gen_throughput() == 0, timeout=10, interval=0.002)
        samples.append((time.perf_counter() - t0) * 1e3)
        em.emit(s.Resumed(time.monotonic_ns()))
    return _summary(samples)


def idle_to_kv_out(em: Emitter, pub_port: int, trials: int) -> dict:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.MAXMSGSIZE, 1 << 22)
    sub.connect(f"tcp://127.0.0.1:{pub_port}")
    # PUB/SUB joins late: publish probes until one arrives.
    probe = 1 << 40
    while True:
        probe += 1
        em.emit(s.KvEvents(time.monotonic_ns(), None, [s.BlockStored([probe], None, [1], 16)]))
        em.emit(s.IdleBegin(time.monotonic_ns()))
        em.emit(s.IdleEnd(time.monotonic_ns()))
        em.flush()
        if sub.poll(200):
            break
    while sub.poll(100):  # drain the probes
        sub.recv_multipart()

    samples: list[float] = []
    loop = StepLoop(em)
    for trial in range(trials):
        for _ in range(20):  # a few busy steps, then KV events and the engine goes idle
            loop.step()
            time.sleep(0.001)
        marker = 10_000_000 + trial
        t0 = time.perf_counter()
        now = time.monotonic_ns()
        stored = [s.BlockStored([marker * 10 + i], None, [i], 16) for i in range(3)]
        em.emit(s.KvEvents(now, loop.forward_iter, stored))
        em.emit(s.IdleBegin(now))
        em.flush()
        seen = False
        while not seen and sub.poll(5000):
            _topic, _seq, payload = sub.recv_multipart()
            events = msgspec.msgpack.decode(payload)[1]
            seen = any(marker * 10 in (ev.get("block_hashes") or ()) for ev in events)
        samples.append((time.perf_counter() - t0) * 1e3 if seen else float("inf"))
        em.emit(s.IdleEnd(time.monotonic_ns()))
    sub.close(0)
    return _summary(samples)


def run(trials: int, out_dir: Path) -> dict:
    endpoint = ipc_endpoint("lat")
    pub_port = free_port()
    proc = SidecarProc(
        endpoint, out_dir, "--no-perfetto", "--kv-relay-endpoint", f"tcp://127.0.0.1:{pub_port}"
    ).start()
    em = Emitter(s.EngineInfo(model="latency"), endpoint)
    wait_for(em.poll_connection, timeout=10)
    try:
        pause = pause_to_zero(proc, em, trials)
        idle = idle_to_kv_out(em, pub_port, trials)
    finally:
        em.close()
        proc.stop()
    return {"pause_to_gen_throughput_zero": pause, "idle_to_kv_batches_out": idle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args.trials, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
