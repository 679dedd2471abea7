"""Every performance figure of DESIGN §9 in one run, with its target and whether it is met.

    python benchmarks/run_all.py [--quick] --out benchmarks/results

Writes ``results.json`` (every number each benchmark reported) and ``results.md`` (the table
the README shows). The per-figure benchmarks run as they would alone: emit_overhead.py,
engine_overhead.py and sidecar_throughput.py as subprocesses (each with --json), latency.py and
flood.py in this process against a real `schedscope sidecar` process. ``--quick`` scales every
size down (under a minute); the full run takes a few minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import flood  # noqa: E402
import latency  # noqa: E402

NO_GPU = "not measured: no GPU in this session"


@dataclass
class Figure:
    figure: str
    value: str
    target: str
    met: str  # "yes" | "no" | "n/a"
    source: str  # which benchmark measured it


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if "model name" in ln), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or platform.machine()}, {cores} vCPUs, Python {platform.python_version()}"


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def run_script(name: str, args: list[str], out: Path, timeout_s: float) -> dict:
    """Run benchmarks/<name> with --json; return its JSON (or the error)."""
    json_path = out / f"{Path(name).stem}.json"
    cmd = [sys.executable, str(HERE / name), *args, "--json", str(json_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not json_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    data = json.loads(json_path.read_text())
    data["_wall_s"] = time.perf_counter() - t0
    data["_stdout"] = proc.stdout
    return data


def yes(ok: bool) -> str:
    return "yes" if ok else "no"


def guarded(name: str, fn: Callable[[], dict], raw: dict) -> dict | None:
    """Run one benchmark; a failure is recorded, not fatal to the others."""
    print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        raw[name] = fn()
    except Exception as exc:  # report it in the table, keep going
        raw[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"[run_all] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return None if "error" in raw[name] else raw[name]


def collect(quick: bool, out: Path) -> tuple[list[Figure], dict]:
    raw: dict = {}
    figs: list[Figure] = []
    tmp = Path(tempfile.mkdtemp(prefix="schedscope-bench-"))

    # 1. Engine-side cost per step vs in-process OTel span + prometheus_client updates.
    steps = "400" if quick else "2000"
    r = guarded(
        "emit_overhead",
        lambda: run_script("emit_overhead.py", ["--steps", steps, "--sweep"], tmp, 600),
        raw,
    )
    if r:
        ours, theirs = (
            r["emitter"]["mean_ns"] / 1e3,
            r["inprocess_otel_prometheus"]["mean_ns"] / 1e3,
        )
        figs.append(
            Figure(
                "Engine-side cost per decode step, paced loop: in-process OTel span + 6 "
                "prometheus_client updates / schedscope emitter",
                f"{r['ratio']:.1f}× ({theirs:.0f} µs / {ours:.1f} µs)",
                "≥ 20×",
                yes(r["ratio"] >= 20),
                "emit_overhead.py",
            )
        )

    # 2. Reference engine telemetry on vs off (CPU here; GPU needs the device).
    eo_args = (
        ["--repeats", "3", "--requests", "4", "--new-tokens", "16"]
        if quick
        else ["--repeats", "10", "--requests", "8", "--new-tokens", "48"]
    )

    def engine_overhead(device: str, label: str) -> None:
        r = guarded(
            f"engine_overhead_{device}",
            lambda: run_script("engine_overhead.py", [*eo_args, "--device", device], tmp, 600),
            raw,
        )
        if r:
            ratio = r["decode_step_ratio_on_off"]
            figs.append(
                Figure(
                    f"Reference engine decode step time, telemetry on / off ({label}, "
                    f"model {r['model']})",
                    f"{ratio:.4f} (median of pairs {r['decode_step_ratio_median_pair']:.4f}; "
                    "A/A control of two telemetry-off engines "
                    f"{r['decode_step_ratio_control_off']:.4f})",
                    "≤ 1.01",
                    yes(ratio <= 1.01),
                    "engine_overhead.py",
                )
            )

    engine_overhead("cpu", "CPU")
    if gpu_available():
        engine_overhead("cuda", "GPU")
    else:
        figs.append(
            Figure(
                "Reference engine decode step time, telemetry on / off (GPU)",
                NO_GPU,
                "≤ 1.01",
                "n/a",
                "engine_overhead.py",
            )
        )

    # 3. Sidecar throughput on one core: events/s into metrics, spans/s vs the bare SDK.
    st_args = ["--events", "30000", "--repeat", "1"] if quick else ["--events", "300000"]
    r = guarded(
        "sidecar_throughput",
        lambda: run_script("sidecar_throughput.py", [*st_args, "--cpu", "0"], tmp, 600),
        raw,
    )
    if r:
        res = r["results"]
        prom = res["metrics, Prometheus view: handle()"]["events_per_s"]
        both = res["metrics, Prom + OTel: registry + handle()"]["events_per_s"]
        figs.append(
            Figure(
                "Sidecar raw events/s into metrics, one core: Prometheus view",
                f"{prom:,.0f}",
                "≥ 200,000",
                yes(prom >= 200_000),
                "sidecar_throughput.py",
            )
        )
        figs.append(
            Figure(
                "Sidecar raw events/s into metrics, one core: Prometheus + OTel views, registry",
                f"{both:,.0f}",
                "≥ 200,000",
                yes(both >= 200_000),
                "sidecar_throughput.py",
            )
        )
        spans = res["spans + Prometheus view: handle()"]["spans_per_s"]
        bare = res["bare OTel SDK spans"]["spans_per_s"]
        ratio = r["span_rate_ratio_vs_bare_sdk"]
        figs.append(
            Figure(
                "Sidecar spans/s vs the bare OTel SDK creating the same spans, one core",
                f"{spans:,.0f} vs {bare:,.0f} ({ratio:.2f}×)",
                "limited only by the SDK (read: ≥ 0.5×)",
                yes(ratio >= 0.5),
                "sidecar_throughput.py",
            )
        )

    # 4. Seed semantics, end to end through a real sidecar process.
    trials = 10 if quick else 40
    r = guarded("latency", lambda: latency.run(trials, tmp / "latency"), raw)
    if r:
        p, k = r["pause_to_gen_throughput_zero"], r["idle_to_kv_batches_out"]
        figs.append(
            Figure(
                "Pause → gen_throughput 0 on /metrics (real sidecar, HTTP scrape)",
                f"p50 {p['p50_ms']:.1f} ms, p95 {p['p95_ms']:.1f} ms, max {p['max_ms']:.1f} ms",
                "< 100 ms",
                yes(p["p95_ms"] < 100),
                "latency.py",
            )
        )
        figs.append(
            Figure(
                "Idle → pending KV batches out of the KV relay (SUB receives them)",
                f"p50 {k['p50_ms']:.1f} ms, p95 {k['p95_ms']:.1f} ms, max {k['max_ms']:.1f} ms",
                "< 50 ms",
                yes(k["p95_ms"] < 50),
                "latency.py",
            )
        )

    # 5. Floods against a real sidecar process.
    n_events, queue_frames = (200_000, 32) if quick else (1_000_000, flood.FLOOD_QUEUE_FRAMES)
    r = guarded(
        "event_flood",
        lambda: flood.event_flood(n_events, tmp / "flood", queue_frames=queue_frames),
        raw,
    )
    if r:
        accounted = abs(r["unaccounted_events"]) <= 200
        figs.append(
            Figure(
                f"Sidecar RSS under a {n_events:,}-event flood (queue {queue_frames} frames), "
                f"emitted at {r['emit_events_per_s']:,.0f} events/s",
                f"peak {r['peak_rss_mib']:.0f} MiB (start {r['start_rss_mib']:.0f}); "
                f"{r['processed_events']:,.0f} processed, "
                f"{r['sidecar_queue_dropped_events'] + r['emitter_dropped_events']:,.0f} "
                f"dropped+counted, {r['unaccounted_events']:+,.0f} unaccounted; "
                f"/metrics {r['metrics_scrapes_ok']} ok / {r['metrics_scrapes_failed']} failed",
                "bounded, every event processed or counted, /metrics answers",
                yes(accounted and r["metrics_scrapes_failed"] == 0 and r["peak_rss_mib"] < 1024),
                "flood.py",
            )
        )
        figs.append(
            Figure(
                "Sidecar events/s end to end under the flood (spans to OTLP JSON file, metrics)",
                f"{r['sidecar_events_per_s']:,.0f}",
                "(spans: limited by the OTel SDK)",
                "n/a",
                "flood.py",
            )
        )
    n_req = 20_000 if quick else 100_000
    r = guarded("inflight_flood", lambda: flood.inflight_flood(n_req, tmp / "inflight"), raw)
    if r:
        figs.append(
            Figure(
                f"{n_req:,} concurrent in-flight requests (ReqQueued, never finished)",
                f"peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"(~{(r['peak_rss_mib'] - r['start_rss_mib']) * 1024 / n_req:.1f} KiB/request); "
                f"{r['requests_evicted']:,.0f} evicted; /metrics "
                f"{r['metrics_scrapes_ok']} ok / {r['metrics_scrapes_failed']} failed",
                "bounded (max_requests per engine), /metrics answers",
                yes(r["metrics_scrapes_failed"] == 0),
                "flood.py",
            )
        )
    return figs, raw


def markdown(figs: list[Figure], meta: dict) -> str:
    lines = [
        "# schedscope benchmark results",
        "",
        f"Machine: {meta['machine']}. Mode: {meta['mode']}. Run: {meta['date']} "
        f"({meta['wall_s']:.0f} s). Command: `{meta['command']}`.",
        "",
        "| figure | value | target (DESIGN §9) | met | machine |",
        "|---|---|---|---|---|",
    ]
    short = meta["machine_short"]
    for f in figs:
        lines.append(f"| {f.figure} | {f.value} | {f.target} | {f.met} | {short} |")
    errors = meta.get("errors") or {}
    if errors:
        lines += ["", "Benchmarks that failed in this run:", ""]
        lines += [f"- {name}: {err}" for name, err in errors.items()]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    figs, raw = collect(args.quick, args.out)
    for value in raw.values():  # keep results.json readable
        if isinstance(value, dict):
            value.pop("_stdout", None)
    meta = {
        "machine": machine(),
        "machine_short": f"{platform.machine()} {len(os.sched_getaffinity(0))} vCPU",
        "gpu": gpu_available(),
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
        "command": "python benchmarks/run_all.py" + (" --quick" if args.quick else ""),
        "errors": {k: v["error"] for k, v in raw.items() if isinstance(v, dict) and "error" in v},
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "figures": [asdict(f) for f in figs], "raw": raw}, indent=2)
    )
    md = markdown(figs, meta)
    (args.out / "results.md").write_text(md)
    print(md)
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
