"""Reference engine: telemetry on vs off, side by side in one run.

Three identical engines in this process: "on" emits through a real Emitter to a real Ingest
socket drained by another process; "off" and "control" have a NullEmitter. They run the same
workload in lock-step, one scheduler step each in rotating order, so drift (neighbours on
shared cores, frequency changes) hits all alike. Reports tokens/s (over the time spent inside
steps), the mean decode step time of each, the on/off ratio, and the control/off ratio: an A/A
comparison of two identical engines, i.e. this machine's noise floor for the on/off figure.

    python benchmarks/engine_overhead.py [--repeats 20] [--requests 16] [--new-tokens 96]
        [--model tiny] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def receiver(endpoint: str, ready, stop) -> None:  # another process: the sidecar's ingest
    from schedscope.telemetry.ingest import Ingest

    with Ingest(endpoint) as ingest:
        ready.set()
        while not stop.is_set():
            ingest.get(timeout=0.1)
            ingest.drain()


def run_pair(engines: dict, prompts: list[str], sampling, flip: bool) -> dict[str, tuple]:
    """Run the same workload on every engine in lock-step, rotating which one steps first (so
    no engine always sits in the same position), each step microseconds apart: drift cancels.

    Returns per engine: generated tokens, summed step seconds, and every pure-decode step time.
    """
    for engine in engines.values():
        for p in prompts:
            engine.submit(p, sampling, keep_result=False)
        engine._drain_inbox()
    names = list(engines)
    busy = {n: 0.0 for n in names}
    decode_steps: dict[str, list[float]] = {n: [] for n in names}
    i = 0
    while any(engines[n].scheduler.has_work() for n in names):
        k = (i + int(flip)) % len(names)
        order = names[k:] + names[:k]
        i += 1
        for n in order:
            s = engines[n].scheduler
            if not s.has_work():
                continue
            decode = not s.waiting and s.chunked_req is None and bool(s.running)
            t = time.perf_counter()
            s.step()
            dt = time.perf_counter() - t
            busy[n] += dt
            if decode:
                decode_steps[n].append(dt)
    tokens = len(prompts) * sampling.max_new_tokens
    return {n: (tokens, busy[n], decode_steps[n]) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from schedscope.engine.config import EngineConfig
    from schedscope.engine.emitter import Emitter, NullEmitter
    from schedscope.engine.engine import Engine, engine_info
    from schedscope.engine.sampling import SamplingParams

    endpoint = f"ipc://{tempfile.gettempdir()}/ss-bench-{uuid.uuid4().hex[:8]}.sock"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(endpoint, ready, stop), daemon=True)
    proc.start()
    ready.wait(30)

    cfg = EngineConfig(
        model=args.model,
        device=args.device,
        enable_overlap=args.overlap,
        max_running_requests=max(args.requests, 1),
        max_total_tokens=args.requests * (args.new_tokens + 64) + 256,
        page_size=16,
    )
    emitter = Emitter(engine_info(cfg), endpoint)
    engines = {
        "on": Engine(cfg, emitter=emitter),
        "off": Engine(cfg, emitter=NullEmitter()),
        "control": Engine(cfg, emitter=NullEmitter()),
    }
    time.sleep(0.3)  # let the PUSH socket connect
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = [f"request {i}: " + "tell me about schedulers " * 3 for i in range(args.requests)]
    run_pair(engines, prompts, sampling, flip=False)  # warm-up; both caches end up equal

    tps: dict[str, list[float]] = {n: [] for n in engines}
    step_ms: dict[str, list[float]] = {n: [] for n in engines}
    for r in range(args.repeats):
        for name, (tokens, busy, steps) in run_pair(engines, prompts, sampling, r % 2 == 1).items():
            tps[name].append(tokens / busy)
            step_ms[name].append(statistics.fmean(steps) * 1e3)

    emitter.flush()
    stop.set()
    proc.join(5)
    for engine in engines.values():
        engine.close()

    step_ratio = statistics.fmean(step_ms["on"]) / statistics.fmean(step_ms["off"])
    tps_ratio = statistics.fmean(tps["on"]) / statistics.fmean(tps["off"])
    pair_ratios = [a / b for a, b in zip(step_ms["on"], step_ms["off"], strict=True)]
    control_ratio = statistics.fmean(step_ms["control"]) / statistics.fmean(step_ms["off"])
    out = {
        "device": args.device,
        "model": args.model,
        "machine": f"{platform.machine()} {mp.cpu_count()} cpu",
        "overlap": args.overlap,
        "repeats": args.repeats,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "tokens_per_s": {k: statistics.fmean(v) for k, v in tps.items()},
        "decode_step_ms": {k: statistics.fmean(v) for k, v in step_ms.items()},
        "decode_step_ratio_on_off": step_ratio,
        "decode_step_ratio_median_pair": statistics.median(pair_ratios),
        "decode_step_ratio_control_off": control_ratio,
        "tokens_per_s_ratio_on_off": tps_ratio,
        "emitter": {
            "sent_messages": emitter.sent_messages,
            "sent_events": emitter.sent_events,
            "dropped_messages": emitter.dropped_messages,
        },
    }
    print(
        f"reference engine, {args.model} on {args.device} ({out['machine']}), "
        f"{args.requests} requests x {args.new_tokens} tokens, {args.repeats} repeats"
    )
    print(f"{'telemetry':<10} {'tokens/s':>10} {'decode step ms':>15}")
    for k in ("off", "control", "on"):
        print(f"{k:<10} {out['tokens_per_s'][k]:>10.1f} {out['decode_step_ms'][k]:>15.3f}")
    print(
        f"on/off decode step time: {step_ratio:.4f} (median of pairs "
        f"{out['decode_step_ratio_median_pair']:.4f}), tokens/s: {tps_ratio:.4f}; "
        f"A/A control/off: {control_ratio:.4f} (the noise floor); "
        f"emitter sent {emitter.sent_events} events in {emitter.sent_messages} messages, "
        f"dropped {emitter.dropped_messages}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
