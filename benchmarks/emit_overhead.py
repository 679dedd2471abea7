"""Engine-side telemetry cost per scheduler step, and sidecar decode throughput, in one run.

(a) schedscope: a realistic decode step's events (BatchLaunched + BatchDone with DecodeStats,
    ~32 rids) built and handed to the real Emitter, with a real `schedscope sidecar` process
    receiving on the socket. Measured in a PACED loop (sleep ~1 ms between steps, standing in
    for the GPU; DESIGN §3): a send after an idle gap costs far more than back to back.
(b) in-process, as SGLang does it: one OTel SDK span with the same ~10 attributes
    (TracerProvider + BatchSpanProcessor + in-memory exporter) plus the 6 prometheus_client
    updates per step, with `.labels(...)` on every call. Same paced loop.
(c) sidecar decode + validate throughput on one core, in events/s (and through the whole
    processing path: Ingest.accept -> EngineRegistry -> Sidecar, no handler).

Also sweeps the emitter's flush interval, so its default is chosen from measurements.

    python benchmarks/emit_overhead.py [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from schedscope.engine.emitter import Emitter
from schedscope.telemetry import schema as s
from schedscope.telemetry.engines import EngineRegistry
from schedscope.telemetry.ingest import Ingest
from schedscope.telemetry.sidecar import Sidecar

N_RIDS = 32
PACE_S = 0.001
ptime = time.perf_counter_ns


# -- shared step state (what a scheduler already holds when it logs a decode batch) ----------


class StepState:
    def __init__(self) -> None:
        self.rids = [uuid.uuid4().hex for _ in range(N_RIDS)]
        self.forward_iter = 0
        self.running = N_RIDS
        self.num_tokens = 12_345
        self.gen_throughput = 1234.5
        self.token_usage = 0.42
        self.queued = 3

    def advance(self) -> None:
        self.forward_iter += 1
        self.num_tokens += N_RIDS


def paced(step, steps: int, warmup: int = 100) -> list[int]:
    """Run ``step()`` after a ~1 ms sleep each time; return the measured ns per call."""
    out: list[int] = []
    for i in range(steps + warmup):
        time.sleep(PACE_S)
        t0 = ptime()
        step()
        dt = ptime() - t0
        if i >= warmup:
            out.append(dt)
    return out


def describe(samples: list[int]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {
        "mean_ns": statistics.fmean(samples),
        "p50_ns": statistics.median(samples),
        "p99_ns": q[98],
        "steps": len(samples),
    }


# -- (a) schedscope emitter ------------------------------------------------------------------


def start_sidecar(endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "schedscope", "sidecar", "--endpoint", endpoint, "--no-summary"],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"sidecar did not start: {line}{proc.stderr.read()}")
    return proc


def stop_sidecar(proc: subprocess.Popen) -> str:
    proc.send_signal(2)
    _, err = proc.communicate(timeout=10)
    return err.strip().splitlines()[-1] if err.strip() else ""


def bench_emitter(endpoint: str, flush_interval_s: float, steps: int) -> dict:
    st = StepState()
    em = Emitter(s.EngineInfo(model="bench"), endpoint, flush_interval_s=flush_interval_s)
    deadline = time.monotonic() + 5
    while not em.poll_connection() and time.monotonic() < deadline:
        time.sleep(0.01)
    now = time.monotonic_ns
    emit = em.emit

    def step() -> None:
        # Everything the engine does for telemetry in one decode step.
        st.advance()
        t = now()
        emit(s.BatchLaunched(t, st.forward_iter, s.MODE_DECODE, st.rids, N_RIDS))
        emit(
            s.BatchDone(
                t,
                st.forward_iter,
                s.MODE_DECODE,
                None,
                s.DecodeStats(
                    st.running,
                    st.num_tokens,
                    N_RIDS,
                    st.gen_throughput,
                    st.token_usage,
                    st.queued,
                    0.0,
                    True,
                ),
            )
        )
        em.end_step()

    res = describe(paced(step, steps))
    res.update(
        flush_interval_s=flush_interval_s,
        sent_messages=em.sent_messages,
        dropped_messages=em.dropped_messages,
    )
    em.close()
    return res


# -- (b) in-process OTel span + prometheus_client, as SGLang does it -------------------------


def bench_inprocess(steps: int) -> dict:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")

    reg = CollectorRegistry()
    names = ["model_name", "engine_type", "tp_rank", "pp_rank"]
    running = Gauge("sglang:num_running_reqs", "", names, registry=reg)
    used = Gauge("sglang:num_used_tokens", "", names, registry=reg)
    usage = Gauge("sglang:token_usage", "", names, registry=reg)
    thr = Gauge("sglang:gen_throughput", "", names, registry=reg)
    queue = Gauge("sglang:num_queue_reqs", "", names, registry=reg)
    gen = Counter("sglang:generation_tokens", "", names, registry=reg)
    labels = {"model_name": "bench", "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}
    st = StepState()

    def step() -> None:
        st.advance()
        span = tracer.start_span("decode")
        span.set_attributes(
            {
                "forward_iter": st.forward_iter,
                "batch.mode": "decode",
                "batch.size": N_RIDS,
                "num_running_reqs": st.running,
                "num_tokens": st.num_tokens,
                "generated_tokens": N_RIDS,
                "gen_throughput": st.gen_throughput,
                "token_usage": st.token_usage,
                "num_queue_reqs": st.queued,
                "cuda_graph": True,
            }
        )
        span.end()
        running.labels(**labels).set(st.running)
        used.labels(**labels).set(st.num_tokens)
        usage.labels(**labels).set(st.token_usage)
        thr.labels(**labels).set(st.gen_throughput)
        queue.labels(**labels).set(st.queued)
        gen.labels(**labels).inc(N_RIDS)

    res = describe(paced(step, steps))
    provider.shutdown()
    _ = Histogram  # SGLang also observes histograms per request, not per step: not counted
    return res


# -- (c) sidecar decode throughput -----------------------------------------------------------


def make_frames(n_frames: int, steps_per_frame: int) -> list[bytes]:
    st = StepState()
    frames = []
    for seq in range(n_frames):
        events: list[s.Event] = []
        for _ in range(steps_per_frame):
            st.advance()
            t = time.monotonic_ns()
            events.append(s.BatchLaunched(t, st.forward_iter, s.MODE_DECODE, st.rids, N_RIDS))
            events.append(
                s.BatchDone(
                    t,
                    st.forward_iter,
                    s.MODE_DECODE,
                    None,
                    s.DecodeStats(N_RIDS, st.num_tokens, N_RIDS, 1234.5, 0.4, 3, 0.0, True),
                )
            )
        frames.append(s.encode_envelope("bench", seq, events))
    return frames


def bench_decode(repeats: int = 5) -> dict:
    frames = make_frames(2000, 10)  # 10 steps per frame, as the default flush interval gives
    n_events = 2000 * 20
    best = float("inf")
    for _ in range(repeats):
        t0 = ptime()
        for f in frames:
            s.decode_envelope(f)
        best = min(best, ptime() - t0)
    decode_eps = n_events / (best / 1e9)

    # The whole processing path minus the socket: accept (decode, counters, queue) on the
    # receiving side, then registry + per-type counts on the processing side.
    best_full = float("inf")
    for _ in range(repeats):
        ingest = Ingest("inproc://unused", queue_size=len(frames) + 1)
        sc = Sidecar(ingest, registry=EngineRegistry())
        t0 = ptime()
        for f in frames:
            ingest.accept(f)
        sc.process(timeout=0, max_frames=len(frames) + 1)
        best_full = min(best_full, ptime() - t0)
        assert sc.stats.events == n_events
        ingest.stop()
    return {
        "events": n_events,
        "frame_bytes": len(frames[0]),
        "decode_events_per_s": decode_eps,
        "pipeline_events_per_s": n_events / (best_full / 1e9),
    }


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="paced steps per measurement")
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.0, 0.002, 0.005, 0.01, 0.02])
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()

    endpoint = f"ipc://{tempfile.gettempdir()}/schedscope-bench-{os.getpid()}.sock"
    sidecar = start_sidecar(endpoint)
    try:
        default_flush = Emitter.__init__.__kwdefaults__["flush_interval_s"]
        sweep = {f: bench_emitter(endpoint, f, args.steps // 2) for f in args.sweep}
        ours = bench_emitter(endpoint, default_flush, args.steps)
    finally:
        sidecar_report = stop_sidecar(sidecar)
    theirs = bench_inprocess(args.steps)
    decode = bench_decode()

    ratio = theirs["mean_ns"] / ours["mean_ns"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} vCPUs")
    print(f"paced loop: sleep {PACE_S * 1e3:.0f} ms between steps, {args.steps} steps\n")
    print(f"{'per decode step (paced)':<52}{'mean ns':>10}{'p50 ns':>10}{'p99 ns':>10}")
    for f, r in sweep.items():
        name = f"  schedscope emitter, flush every {f * 1e3:g} ms"
        print(f"{name:<52}{r['mean_ns']:>10.0f}{r['p50_ns']:>10.0f}{r['p99_ns']:>10.0f}")
    name = f"(a) schedscope emitter, default ({default_flush * 1e3:g} ms)"
    print(f"{name:<52}{ours['mean_ns']:>10.0f}{ours['p50_ns']:>10.0f}{ours['p99_ns']:>10.0f}")
    name = "(b) OTel SDK span + 6 prometheus .labels() updates"
    print(f"{name:<52}{theirs['mean_ns']:>10.0f}{theirs['p50_ns']:>10.0f}{theirs['p99_ns']:>10.0f}")
    verdict = "meets" if ratio >= 20 else "MISSES"
    print(f"\nratio (b)/(a), means: {ratio:.1f}x  ({verdict} the >= 20x target)")
    print(
        f"(c) sidecar decode+validate: {decode['decode_events_per_s']:,.0f} events/s; "
        f"accept+registry+sidecar: {decode['pipeline_events_per_s']:,.0f} events/s "
        f"(one core; target >= 200,000)"
    )
    print(f"sidecar at exit: {sidecar_report}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "pace_s": PACE_S,
                    "n_rids": N_RIDS,
                    "emitter": ours,
                    "emitter_flush_sweep": list(sweep.values()),
                    "inprocess_otel_prometheus": theirs,
                    "ratio": ratio,
                    "sidecar_decode": decode,
                    "sidecar_report": sidecar_report,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
