"""Floods against a real `schedscope sidecar` process (issue 10, DESIGN §9 "bounded memory").

- ``event_flood``: N raw events emitted as fast as the engine-side loop can go (decode steps:
  BatchLaunched + BatchDone, with a KvLoad and a KvEvents every few steps). Reports the emit
  rate, how long the sidecar takes to account for every event, its peak RSS, whether /metrics
  answered throughout, and the accounting: processed + counted drops == emitted.
- ``inflight_flood``: N requests queued (ReqQueued) and never finished. Reports the peak RSS
  and the evictions the per-engine bound (AssemblerConfig.max_requests) counted.

    python benchmarks/flood.py [--events 1000000] [--requests 100000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from harness import SidecarProc, ipc_endpoint, metric_value, prom, rss_mib, wait_for

from schedscope.engine.emitter import Emitter
from schedscope.telemetry import schema as s

ENGINE_TYPES = ("BatchLaunched", "BatchDone", "KvLoad", "KvEvents", "ReqQueued")


class Sampler:
    """Samples the sidecar's RSS and scrapes /metrics on a thread while the flood runs."""

    def __init__(self, proc: SidecarProc, interval_s: float = 0.1) -> None:
        self.proc = proc
        self.interval_s = interval_s
        self.peak_rss_mib = proc.rss_mib()
        self.start_rss_mib = self.peak_rss_mib
        self.scrapes_ok = 0
        self.scrapes_failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            try:
                self.peak_rss_mib = max(self.peak_rss_mib, rss_mib(self.proc.pid))
            except (OSError, RuntimeError):
                return
            n += 1
            if n % 5 == 0:  # /metrics every 0.5 s: must keep answering under the flood
                try:
                    self.proc.scrape(timeout=10)
                    self.scrapes_ok += 1
                except OSError:
                    self.scrapes_failed += 1


def _engine_events_processed(text: str, engine_id: str) -> float:
    return metric_value(text, prom("events"), engine_id=engine_id)


# Frames the sidecar buffers between receiving and processing. The CLI default (10,000 frames
# of up to 1,024 events) would let a flood hold ~10M decoded events in memory; this bound keeps
# it to ~256k events, and the rest is dropped and counted.
FLOOD_QUEUE_FRAMES = 256


def event_flood(
    n_events: int,
    out_dir: Path,
    queue_frames: int = FLOOD_QUEUE_FRAMES,
    drain_timeout_s: float = 600.0,
) -> dict:
    endpoint = ipc_endpoint("flood")
    args = ("--no-perfetto", "--queue-size", str(queue_frames))
    proc = SidecarProc(endpoint, out_dir, *args).start()
    em = Emitter(s.EngineInfo(model="flood"), endpoint)
    wait_for(em.poll_connection, timeout=10)
    rids = [f"r{i}" for i in range(32)]
    emitted = 0
    try:
        with Sampler(proc) as sampler:
            t0 = time.perf_counter()
            fi = 0
            now = time.monotonic_ns
            emit = em.emit
            stats = s.DecodeStats(32, 4096, 32, 1234.5, 0.4, 3)
            while emitted < n_events:
                fi += 1
                t = now()
                emit(s.BatchLaunched(t, fi, s.MODE_DECODE, rids, 32))
                emit(s.BatchDone(t, fi, s.MODE_DECODE, None, stats))
                emitted += 2
                if fi % 8 == 0:
                    emit(s.KvLoad(t, 32, 256, 1000, 4096, 3, 0.25, 0.5))
                    emit(s.KvEvents(t, fi, [s.BlockStored([fi], fi - 1, [1, 2], 16)]))
                    emitted += 2
                em.end_step()
            emit_s = time.perf_counter() - t0
            em.flush()
            sent_at = time.perf_counter()

            def accounted() -> bool:
                text = proc.scrape()
                processed = _engine_events_processed(text, em.engine_id)
                q = metric_value(text, prom("sidecar_queue_dropped_events"))
                return processed + q + em.dropped_events >= emitted

            wait_for(accounted, timeout=drain_timeout_s, interval=0.2)
            drain_s = time.perf_counter() - sent_at
        text = proc.scrape()
        processed = _engine_events_processed(text, em.engine_id)
        queue_dropped = metric_value(text, prom("sidecar_queue_dropped_events"))
    finally:
        em.close()
        state = proc.stop(timeout=drain_timeout_s)
    return {
        "events": emitted,
        "queue_frames": queue_frames,
        "emit_s": emit_s,
        "emit_events_per_s": emitted / emit_s,
        "drain_after_emit_s": drain_s,
        "sidecar_events_per_s": emitted / (emit_s + drain_s),
        "processed_events": processed,
        "emitter_dropped_events": em.dropped_events,
        "sidecar_queue_dropped_events": queue_dropped,
        "unaccounted_events": emitted - processed - em.dropped_events - queue_dropped,
        "start_rss_mib": sampler.start_rss_mib,
        "peak_rss_mib": sampler.peak_rss_mib,
        "metrics_scrapes_ok": sampler.scrapes_ok,
        "metrics_scrapes_failed": sampler.scrapes_failed,
        "sidecar_state": {
            k: state.get(k) for k in ("frames", "events", "handler_errors", "queue_dropped_frames")
        },
        "sidecar_exit_code": proc.proc.returncode if proc.proc else None,
    }


def inflight_flood(n_requests: int, out_dir: Path, drain_timeout_s: float = 600.0) -> dict:
    endpoint = ipc_endpoint("inflight")
    proc = SidecarProc(endpoint, out_dir, "--no-perfetto").start()
    em = Emitter(s.EngineInfo(model="inflight"), endpoint)
    wait_for(em.poll_connection, timeout=10)
    try:
        with Sampler(proc) as sampler:
            t0 = time.perf_counter()
            for i in range(n_requests):
                em.emit(s.ReqQueued(time.monotonic_ns(), f"req-{i}", 128))
                if i % 512 == 0:
                    em.end_step()
            em.flush()

            def accounted() -> bool:
                text = proc.scrape()
                q = metric_value(text, prom("sidecar_queue_dropped_events"))
                done = _engine_events_processed(text, em.engine_id)
                return done + q + em.dropped_events >= n_requests

            wait_for(accounted, timeout=drain_timeout_s, interval=0.2)
            elapsed = time.perf_counter() - t0
        text = proc.scrape()
        evicted = metric_value(text, prom("requests_evicted"), engine_id=em.engine_id)
        running = _engine_events_processed(text, em.engine_id)
    finally:
        em.close()
        proc.stop(timeout=drain_timeout_s)
    return {
        "requests": n_requests,
        "elapsed_s": elapsed,
        "processed_events": running,
        "requests_evicted": evicted,
        "emitter_dropped_events": em.dropped_events,
        "start_rss_mib": sampler.start_rss_mib,
        "peak_rss_mib": sampler.peak_rss_mib,
        "metrics_scrapes_ok": sampler.scrapes_ok,
        "metrics_scrapes_failed": sampler.scrapes_failed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = {
            "event_flood": event_flood(args.events, Path(tmp) / "events"),
            "inflight_flood": inflight_flood(args.requests, Path(tmp) / "inflight"),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
