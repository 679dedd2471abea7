"""`schedscope demo`: the whole split, on one machine, in under a minute.

1. starts `schedscope sidecar` in its own process (the real split: the engine never waits for
   it), serving /metrics and writing everything into --out-dir;
2. runs the reference engine in this process (tiny model on CPU; CUDA when present), its
   emitter pointed at the sidecar;
3. drives a workload of concurrent requests sharing prompt prefixes (radix-cache hits); once
   a third of them are done it pauses the engine (retract) and resumes it; when all are done
   it lets the engine go fully idle and flushes the cache;
4. stops the engine and the sidecar (which flushes its files), then prints a summary whose
   numbers are read back from those files.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schedscope.cli.common import console, load_settings, make_out_dir, on_stop_signals
from schedscope.cli.engine_checks import check_device, check_model, require_engine
from schedscope.cli.options import config_flag, flag, with_defaults
from schedscope.cli.settings import CliError, Settings

PAUSE_S = 0.5  # how long the demo keeps the engine paused
IDLE_S = 0.6  # how long it lets the engine sit fully idle before flushing the cache
SIDECAR_START_TIMEOUT_S = 30.0


def register(app: typer.Typer) -> None:
    app.command("demo")(with_defaults("demo", demo))


def demo(
    duration: Optional[float] = flag("duration"),
    requests: Optional[int] = flag("requests"),
    concurrency: Optional[int] = flag("concurrency"),
    max_new_tokens: Optional[int] = flag("max_new_tokens"),
    model: Optional[str] = flag("model"),
    device: Optional[str] = flag("device"),
    seed: Optional[int] = flag("seed"),
    out_dir: Optional[Path] = flag("out_dir"),
    prometheus_host: Optional[str] = flag("prometheus_host"),
    prometheus_port: Optional[str] = flag("prometheus_port"),
    otlp_endpoint: Optional[str] = flag("otlp_endpoint"),
    otlp_protocol: Optional[str] = flag("otlp_protocol"),
    service_name: Optional[str] = flag("service_name"),
    otlp_json: Optional[bool] = flag("otlp_json"),
    perfetto: Optional[bool] = flag("perfetto"),
    snapshot: Optional[bool] = flag("snapshot"),
    record: Optional[bool] = flag("record"),
    record_max_bytes: Optional[str] = flag("record_max_bytes"),
    kv_relay_endpoint: Optional[str] = flag("kv_relay_endpoint"),
    kv_relay_replay_endpoint: Optional[str] = flag("kv_relay_replay_endpoint"),
    kv_relay_topic: Optional[str] = flag("kv_relay_topic"),
    kv_relay_buffer_steps: Optional[int] = flag("kv_relay_buffer_steps"),
    kv_relay_hash_style: Optional[str] = flag("kv_relay_hash_style"),
    kv_relay_config: Optional[str] = flag("kv_relay_config"),
    log_level: Optional[str] = flag("log_level"),
    config: Optional[Path] = config_flag(),
) -> None:
    """Run engine + sidecar + a workload; write a timeline, OTLP files, metrics, a recording."""
    s = load_settings("demo", locals(), config)
    # Everything checked before the sidecar process starts: a bad value is one line.
    require_engine("schedscope demo")
    check_model("schedscope demo", s.model)
    check_device("schedscope demo", s.device)
    out = make_out_dir(s.out_dir.resolve(), "demo")
    # ipc paths must stay short (sun_path): /tmp, not the output folder.
    endpoint = f"ipc://{tempfile.gettempdir()}/schedscope-demo-{os.getpid()}.sock"
    sidecar = _SidecarProcess(s, endpoint, out)
    sidecar.start()
    stop = threading.Event()
    restore = on_stop_signals(stop.set)
    try:
        console.print(f"sidecar pid {sidecar.proc.pid} listening on {endpoint}")
        if sidecar.metrics_url:
            console.print(f"/metrics while it runs: [bold]{sidecar.metrics_url}[/bold]")
        if s.otlp_endpoint:
            console.print(f"exporting OTLP to {s.otlp_endpoint}")
        # Importing torch and building the model takes seconds: say so, not a silent wait.
        console.print("starting the engine (importing torch, building the model)...")
        workload = _Workload(s, endpoint, stop).run()
    finally:
        code = sidecar.stop()
        restore()
    if code != 0:
        raise CliError(f"the sidecar exited with status {code}", code=1)

    from schedscope.cli.demo_report import SUMMARY_FILE, build_summary

    summary = build_summary(out, workload)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _print_summary(summary)
    if stop.is_set():
        raise typer.Exit(130)


# ---------------------------------------------------------------------------------------------
# The sidecar, in its own process
# ---------------------------------------------------------------------------------------------


class _SidecarProcess:
    def __init__(self, s: Settings, endpoint: str, out: Path) -> None:
        self.settings = s
        self.endpoint = endpoint
        self.out = out
        self.proc: subprocess.Popen[str]
        self.metrics_url: str | None = None

    def argv(self) -> list[str]:
        """Every output option the demo resolved, passed explicitly: the child does exactly
        what this run decided, whatever its environment or config file say."""
        v = self.settings.values
        port = v["prometheus_port"]
        args = [
            sys.executable, "-m", "schedscope", "sidecar",
            "--endpoint", self.endpoint,
            "--out-dir", str(self.out),
            "--prometheus-host", v["prometheus_host"],
            "--prometheus-port", "off" if port is None else str(port),
            "--otlp-json" if v["otlp_json"] is not False else "--no-otlp-json",
            "--perfetto" if v["perfetto"] else "--no-perfetto",
            "--snapshot" if v["snapshot"] else "--no-snapshot",
            "--record" if v["record"] else "--no-record",
            "--record-max-bytes", str(v["record_max_bytes"]),
            "--log-level", v["log_level"],
            "--no-summary",
        ]  # fmt: skip
        for key in ("otlp_endpoint", "otlp_protocol", "service_name", "kv_relay_endpoint",
                    "kv_relay_replay_endpoint", "kv_relay_topic", "kv_relay_buffer_steps",
                    "kv_relay_hash_style", "kv_relay_config"):  # fmt: skip
            value = v.get(key)
            if value is not None and (key != "kv_relay_topic" or value):
                text = json.dumps(value) if isinstance(value, dict) else str(value)
                args += ["--" + key.replace("_", "-"), text]
        return args

    def _check_port_free(self) -> None:
        """Fail fast, before spawning anything, when the /metrics port is taken (the sidecar
        would say the same a few seconds later)."""
        v = self.settings.values
        port = v["prometheus_port"]
        if not port:
            return
        with socket.socket(socket.AF_INET6 if ":" in v["prometheus_host"] else socket.AF_INET) as s:
            try:
                s.bind((v["prometheus_host"], port))
            except OSError as exc:
                reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise CliError(
                    f"--prometheus-port {port} on {v['prometheus_host']}: {reason}; "
                    "pick another port or 0 for a free one"
                ) from None

    def start(self) -> None:
        from schedscope.cli.sidecar_app import STATE_FILE

        self._check_port_free()
        state_path = self.out / STATE_FILE
        state_path.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "SCHEDSCOPE_CONFIG"}
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + SIDECAR_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else "").strip().splitlines()
                # The child already said what was wrong in one line: pass it on as ours.
                line = err[-1] if err else f"exited with status {self.proc.returncode}"
                raise CliError(line.removeprefix("error: "))
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = None
            if state and state.get("running") and state.get("pid") == self.proc.pid:
                self.metrics_url = state.get("metrics_url")
                return
            time.sleep(0.05)
        self.proc.kill()
        raise CliError("the sidecar did not start within 30 s", code=1)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM: the sidecar drains, ends its spans and writes its files, then exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        if self.proc.returncode != 0 and err.strip():
            console.print(err.strip().splitlines()[-1], markup=False)
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# The engine and the workload, in this process
# ---------------------------------------------------------------------------------------------

# Shared prefixes (think system prompts): requests with the same one hit the radix cache.
_PREFIXES = [
    "You are a scheduler that explains its batches. Context: prefill then decode. ",
    "You are a helpful assistant for GPU serving questions. Be brief and precise. ",
    "Summarise the following KV cache report for an operator on call tonight. ",
    "Translate the following scheduler log line into plain English, please. ",
]


class _Workload:
    def __init__(self, s: Settings, endpoint: str, stop: threading.Event) -> None:
        self.s = s
        self.endpoint = endpoint
        self.stop = stop
        self.lock = threading.Lock()
        self.done = 0
        self.output_tokens = 0
        self.retracted_seen = 0
        self.phase = "starting"
        self.slots = threading.Semaphore(s.concurrency)
        self.finished = threading.Event()
        self.events: list[dict[str, Any]] = []  # what the demo did, when (for the summary)

    def _mark(self, what: str, **extra: Any) -> None:
        self.phase = what
        self.events.append({"t": round(time.monotonic() - self.t0, 3), "what": what, **extra})

    def run(self) -> dict[str, Any]:
        from schedscope.engine.config import EngineConfig
        from schedscope.engine.control import ControlledEngine
        from schedscope.engine.runner import EngineRunner

        s = self.s
        cfg = EngineConfig(model=s.model, device=s.device, seed=s.seed)
        self.t0 = time.monotonic()
        engine = ControlledEngine.create(cfg, endpoint=self.endpoint)
        runner = EngineRunner(engine).start()
        self.runner = runner
        device = str(engine.device)
        columns = (
            TextColumn("[bold]{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("requests · {task.fields[tokens]} tokens"),
            TimeElapsedColumn(),
        )
        try:
            with Progress(*columns, console=console, transient=False) as progress:
                task = progress.add_task("running", total=s.requests, tokens=0)

                def refresh() -> None:
                    progress.update(
                        task, completed=self.done, tokens=self.output_tokens,
                        description=self.phase,
                    )  # fmt: skip

                started = time.monotonic()
                self._submit_all(refresh)
                workload_s = time.monotonic() - started
                self._idle_and_flush(refresh)
                refresh()
        finally:
            runner.stop()  # the engine says Shutdown to the sidecar on its way out
        return {
            "requests_submitted": self.submitted,
            "requests_completed_by_client": self.done,
            "output_tokens_by_client": self.output_tokens,
            "workload_seconds": round(workload_s, 3),
            "model": s.model,
            "device": device,
            "concurrency": s.concurrency,
            "max_new_tokens": s.max_new_tokens,
            "timeline": self.events,
        }

    def _submit_all(self, refresh) -> None:
        from schedscope.engine.runner import GenerateInput
        from schedscope.engine.sampling import SamplingParams

        s = self.s
        deadline = self.t0 + s.duration
        tok = self.runner.tokenizer
        self.submitted = 0
        paused_once = False
        self._mark("running")
        for i in range(s.requests):
            while not self.slots.acquire(timeout=0.01):
                refresh()
                if not paused_once:
                    paused_once = self._maybe_pause(refresh)
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
            else:
                prompt = (
                    _PREFIXES[i % len(_PREFIXES)] + f"Request {i}: what happened at step {i * 7}?"
                )
                params = SamplingParams(max_new_tokens=s.max_new_tokens, ignore_eos=True)
                inp = GenerateInput(f"demo-{i}", tok.encode(prompt), params)
                self.runner.submit(inp, self._on_update)
                self.submitted += 1
                continue
            break  # stopped or out of time: no more submissions
        # Wait for what is in flight (the pause may still be due if requests are few).
        while self.done < self.submitted and not self.stop.is_set():
            if not paused_once:
                paused_once = self._maybe_pause(refresh)
            refresh()
            time.sleep(0.01)
            if time.monotonic() > deadline + 30:
                break
        if not paused_once and not self.stop.is_set():
            # Too few requests to catch one decoding: still show a pause span.
            self._pause(refresh, only_while_decoding=False)

    def _on_update(self, u) -> None:  # scheduler thread
        if not u.finished:
            return
        with self.lock:
            self.done += 1
            self.output_tokens += len(u.output_ids)
        self.slots.release()

    def _maybe_pause(self, refresh) -> bool:
        """Pause (retract) once a third of the requests are done, while others still run."""
        if self.done < max(1, self.s.requests // 3) or self.done >= self.submitted:
            return False

        return self._pause(refresh, only_while_decoding=True)

    def _pause(self, refresh, only_while_decoding: bool) -> bool:
        def pause_if_decoding(e) -> int | None:
            # On the scheduler thread: pause while requests run, so that retract retracts.
            running = len(e.scheduler.running)
            if running or not only_while_decoding:
                e.pause_generation("retract", reason="schedscope demo")
                return running
            return None

        retracted = self.runner.call_sync(pause_if_decoding)
        if retracted is None:
            return False
        self._mark("paused (retract)", running_requests=retracted)
        refresh()
        time.sleep(PAUSE_S)  # gen_throughput reads 0 on /metrics now
        self.runner.call_sync(lambda e: e.continue_generation())
        self._mark("running")
        return True

    def _idle_and_flush(self, refresh) -> None:
        from schedscope.engine.control_errors import ControlError

        self._mark("idle")
        refresh()
        time.sleep(IDLE_S)  # fully idle: the engine opens an idle span, KV batches go out
        self._mark("flushing cache")
        refresh()
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.runner.call_sync(lambda e: e.flush_cache())
                self._mark("cache flushed")
                break
            except ControlError as exc:  # not fully idle yet (an offload in flight...)
                if time.monotonic() > deadline:
                    self._mark("cache flush refused", reason=str(exc))
                    break
                time.sleep(0.05)
        time.sleep(0.3)  # idle again after the flush; let the sidecar see it


# ---------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------


def _print_summary(summary: dict[str, Any]) -> None:
    w = summary["workload"]
    t = Table(title="schedscope demo", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("from")
    rows = [
        ("requests finished", summary["requests_finished"], "metrics.prom"),
        ("  retracted by the pause", summary["requests_retracted"], "metrics.prom"),
        ("generated tokens", summary["generation_tokens"], "metrics.prom"),
        ("tokens/s", summary["tokens_per_s"], f"over {w['workload_seconds']} s"),
        ("batches (spans)", summary["batches"], "traces.jsonl"),
        ("request spans", summary["request_spans"], "traces.jsonl"),
        ("pause spans", summary["pause_spans"], "traces.jsonl"),
        ("idle spans", summary["idle_spans"], "traces.jsonl"),
        ("KV events", summary["kv_events"], "metrics.prom"),
        ("KV batches", summary["kv_batches"], "metrics.prom"),
        ("raw events", summary["raw_events"], "sidecar.json"),
        ("lost messages (seq gaps)", summary["lost_messages"], "sidecar.json"),
        ("dropped by the engine", summary["engine_dropped_messages"], "sidecar.json"),
        ("dropped by the sidecar", summary["sidecar_dropped_frames"], "sidecar.json"),
        ("dropped/failed by exporters", summary["exporter_dropped_or_failed"], "sidecar.json"),
    ]
    for what, value, source in rows:
        t.add_row(what, "-" if value is None else str(value), source)
    console.print(t)
    console.print(f"model {w['model']} on {w['device']}, concurrency {w['concurrency']}")
    console.print("[bold]files[/bold] (open the timeline in https://ui.perfetto.dev):")
    for name, path in summary["files"].items():
        if Path(path).exists():
            console.print(f"  {name:<17} {path}", markup=False)
