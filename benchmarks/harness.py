"""Real-process harness shared by the fault tests (tests/test_reliability_*.py) and the
benchmark suite (benchmarks/run_all.py): a `schedscope sidecar` subprocess, its /metrics, its
RSS, a tiny OTLP/HTTP receiver, and an engine-like emitter loop.

Nothing here asserts on time: callers poll for state and bound resources.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from schedscope.telemetry import schema as s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ipc_endpoint(tag: str = "rel") -> str:
    # sun_path is 108 bytes: keep it short, in /tmp.
    return f"ipc:///tmp/ss-{tag}-{uuid.uuid4().hex[:10]}.sock"


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.01):
    """Poll until ``predicate()`` is truthy; return its last value. The timeout bounds a hang
    only; callers assert on the state, never on how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def rss_mib(pid: int) -> float:
    """Resident set size from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- the sidecar as an operator runs it --------------------------------------------------------


class SidecarProc:
    """`schedscope sidecar` (the full app: telemetry, /metrics, exporters) in a subprocess."""

    def __init__(
        self,
        endpoint: str,
        out_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.out_dir = Path(out_dir)
        self.extra = list(extra)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_lines: list[str] = []
        self.metrics_url: str | None = None

    def start(self, timeout: float = 30.0) -> SidecarProc:
        cmd = [
            sys.executable, "-m", "schedscope", "sidecar",
            "--endpoint", self.endpoint, "--no-summary",
            "--prometheus-port", "0", "--out-dir", str(self.out_dir), *self.extra,
        ]  # fmt: skip
        self.stderr_lines = []
        self.metrics_url = None
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env
        )
        # A reader thread so a chatty sidecar never blocks on a full stderr pipe.
        threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True).start()
        wait_for(lambda: self.metrics_url or self.proc.poll() is not None, timeout)
        if not self.metrics_url:
            self.kill()
            raise RuntimeError("sidecar did not start:\n" + "".join(self.stderr_lines))
        return self

    def _read_stderr(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr_lines.append(line)
            if line.startswith("/metrics on "):
                self.metrics_url = line.split()[-1]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGINT (clean stop); returns the final sidecar.json."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout)
        return self.state()

    def state(self) -> dict:
        return json.loads((self.out_dir / "sidecar.json").read_text())

    def scrape(self, timeout: float = 10.0) -> str:
        assert self.metrics_url is not None
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return metric_value(self.scrape(), name, **labels)


def prom(key: str) -> str:
    """A metric's Prometheus name, from the one metrics table (names may be renamed there)."""
    from schedscope.telemetry.metrics_table import metric_names

    return metric_names(key)[0]


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(sample.labels), sample.value)
        for fam in text_string_to_metric_families(text)
        for sample in fam.samples
        if sample.name == name
    ]


# -- a tiny OTLP/HTTP receiver that can be stopped, slowed or made to fail ---------------------


class OtlpHttpReceiver:
    """Decodes ExportTraceServiceRequest bodies (gzip or not) and counts spans, in total and by
    name. ``delay_s`` makes it slow; ``stop()`` makes the port refuse connections (backend
    down); ``start()`` brings it back."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.spans = 0
        self.span_names: Counter[str] = Counter()
        self.metric_requests = 0
        self.delay_s = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpHttpReceiver:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                if self.path.endswith("/v1/traces"):
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    with receiver._lock:
                        for rs in req.resource_spans:
                            for ss in rs.scope_spans:
                                receiver.spans += len(ss.spans)
                                receiver.span_names.update(sp.name for sp in ss.spans)
                else:
                    with receiver._lock:
                        receiver.metric_requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- an engine-like loop --------------------------------------------------------------------


class StepLoop:
    """What a scheduler emits per decode step, driven step by step. Records the wall time of
    every step's telemetry work (emit + end_step), which must never block."""

    def __init__(self, emitter, n_rids: int = 8) -> None:
        self.em = emitter
        self.rids = [uuid.uuid4().hex[:12] for _ in range(n_rids)]
        self.forward_iter = 0
        self.max_step_s = 0.0
        self.steps = 0

    def step(self, extra: list[s.Event] = ()) -> None:
        t0 = time.perf_counter()
        self.forward_iter += 1
        now = time.monotonic_ns()
        em = self.em
        em.emit(s.BatchLaunched(now, self.forward_iter, s.MODE_DECODE, self.rids, len(self.rids)))
        for ev in extra:
            em.emit(ev)
        em.emit(
            s.BatchDone(
                now,
                self.forward_iter,
                s.MODE_DECODE,
                None,
                s.DecodeStats(len(self.rids), 1000, len(self.rids), 321.0, 0.3, 0),
            )
        )
        em.end_step()
        self.max_step_s = max(self.max_step_s, time.perf_counter() - t0)
        self.steps += 1
