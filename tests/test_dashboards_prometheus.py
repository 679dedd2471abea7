"""End to end against a real Prometheus: the dashboard's and the rules' PromQL, evaluated on
what a live sidecar exports while an engine serves a workload with a pause and an idle period.

Debian's ``prometheus`` and ``promtool`` run on loopback with a throwaway config and TSDB.
Without the binaries the tests skip, except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from schedscope.dashboards.alerting import rule_groups
from schedscope.dashboards.build import RULES_FILE, build_dashboard
from schedscope.dashboards.names import M
from schedscope.dashboards.promql import (
    dashboard_expressions,
    grafana_regex,
    metric_names,
    parse_label_values,
    rule_expressions,
    substitute,
)
from schedscope.dashboards.sglang_queries import SGLANG_QUERIES

from .conftest import free_tcp_port as free_port
from .conftest import require_binary

pytestmark = pytest.mark.slow

SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval floor: 4 x the scrape interval


# ---------------------------------------------------------------------------------------------
# Harness: a real Prometheus on loopback
# ---------------------------------------------------------------------------------------------


class PromQLError(AssertionError):
    pass


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: bad query, body says why
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} ({params})")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1) -> list[Any]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_prometheus(workdir: Path, targets: list[str], rule_files: list[Path]) -> Prometheus:
    binary = require_binary("prometheus")
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": "schedscope", "static_configs": [{"targets": targets}]},
        ],
    }
    cfg = workdir / "prometheus.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = workdir / "prometheus.log"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",  # so the scrape asks for OpenMetrics
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return prom
        except OSError:
            time.sleep(0.1)
    prom.stop()
    raise RuntimeError(f"prometheus not ready in 20 s: {log.read_text()[-2000:]}")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# The run: the reference engine serving a workload (busy, paused, busy, idle) into a sidecar
# whose /metrics Prometheus scrapes every second; a second, scripted engine injects faults.
# ---------------------------------------------------------------------------------------------

MODEL = "tiny"
CLIENTS = 4
PHASE_S = {"busy": 4.0, "paused": 3.5, "resumed": 4.0, "idle": 3.5}


@dataclass
class Run:
    prom: Prometheus
    metrics_url: str
    engine_url: str
    start: float
    end: float
    pause: tuple[float, float]  # wall seconds the pause span was open
    idle: tuple[float, float]  # all clients done .. end: the engine is fully idle
    requests_done: int = 0
    values: dict[str, str] = field(default_factory=dict)  # dashboard variables -> values

    def grafana_values(self) -> dict[str, str]:
        """What Grafana substitutes: "All" (.*) for the filters, and the time variables."""
        span = f"{math.ceil(self.end - self.start) + 5}s"
        return {
            "__rate_interval": RATE_INTERVAL,
            "__range": span,
            **{name: ".*" for name in ("model_name", "instance", "engine_id", "dp_rank")},
        }


@dataclass
class Process:
    """A schedscope command in its own process, and the URL that says it is up."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_url: str

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not up in {timeout} s: {self.log.read_text()[-2000:]}"
                )
            time.sleep(0.1)


@contextlib.contextmanager
def schedscope(
    name: str, args: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[Process]:
    """``schedscope <args>`` started (not waited for: the engine imports torch for seconds,
    everything else starts meanwhile); terminated on exit."""
    cmd = [sys.executable, "-m", "schedscope", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env={**os.environ, **(env or {})}
    )
    try:
        yield Process(name, proc, log, ready_url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sidecar_command(endpoint: str, metrics_port: int, out_dir: Path) -> list[str]:
    """The sidecar as a user runs it: raw events in, /metrics out, KV relay on."""
    return [
        "sidecar",
        *("--endpoint", endpoint, "--prometheus-port", str(metrics_port)),
        *("--kv-relay-endpoint", f"tcp://127.0.0.1:{free_port()}"),
        *("--otlp-json", "--out-dir", str(out_dir), "--no-summary"),  # exporters at work
    ]


def engine_command(endpoint: str, port: int) -> list[str]:
    return [
        *("engine", "serve", "--port", str(port), "--model", MODEL),
        *("--device", "cpu", "--endpoint", endpoint),
    ]


def clients(url: str, stop: threading.Event, done: list[int]) -> list[threading.Thread]:
    """CLIENTS closed-loop clients; prompts share a prefix so the prefix cache gets hits."""

    def loop(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = 0
            while not stop.is_set():
                body = {
                    "text": f"You are a helpful assistant. Question {i}-{n}: why is the sky blue?",
                    "sampling_params": {"max_new_tokens": 32, "ignore_eos": True},
                }
                r = http.post(f"{url}/generate", json=body)
                r.raise_for_status()
                done.append(1)
                n += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


FAULTY_ENGINE = "faulty-engine"


def inject_faults(endpoint: str) -> None:
    """A second engine on the same socket, scripted to trip the health panels and alerts: a
    duplicate forward_iter, a lost message (seq gap), a leaking memory check, a batch cut
    short by shutdown, and one frame that is not msgpack at all."""
    import zmq

    from schedscope.telemetry.schema import (
        BatchDone,
        BatchLaunched,
        DecodeStats,
        EngineHello,
        EngineInfo,
        MemoryCheck,
        Shutdown,
        encode_envelope,
    )

    info = EngineInfo(model=MODEL, hostname="faulty-host", pid=1)
    stats = DecodeStats(1, 8, 1, 100.0, 0.1, 0)

    def ts() -> int:
        return time.monotonic_ns()

    script: list[list[Any] | None] = [
        [EngineHello(ts(), time.time_ns(), info)],
        [BatchLaunched(ts(), 1, "decode", ["r1"], 1)],
        [BatchDone(ts(), 1, "decode", decode=stats)],
        [BatchDone(ts(), 1, "decode", decode=stats)],  # duplicate forward_iter
        None,  # this seq is never sent: a lost message
        [MemoryCheck(ts(), False, 100, 10, 0, 80, 0, "leak injected by the test")],
        [BatchLaunched(ts(), 2, "decode", ["r1"], 1)],
        [Shutdown(ts(), "test over")],  # ends the open batch span
    ]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(endpoint)
    try:
        for seq, events in enumerate(script):
            if events is not None:
                sock.send(encode_envelope(FAULTY_ENGINE, seq, events))
        sock.send(b"\xc1 not msgpack")  # 0xc1 is never valid msgpack
    finally:
        sock.close(linger=2000)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prom-e2e")
    endpoint = f"ipc:///tmp/ss-dash-{uuid.uuid4().hex[:10]}.sock"
    with contextlib.ExitStack() as stack:
        stack.callback(Path(endpoint.removeprefix("ipc://")).unlink, missing_ok=True)
        metrics_port, engine_port = free_port(), free_port()
        target = f"127.0.0.1:{metrics_port}"
        engine = stack.enter_context(
            schedscope(
                "engine",
                engine_command(endpoint, engine_port),
                f"http://127.0.0.1:{engine_port}/v1/models",
                workdir / "engine.log",
            )
        )
        sidecar = stack.enter_context(
            schedscope(
                "sidecar",
                sidecar_command(endpoint, metrics_port, workdir / "sidecar-out"),
                f"http://{target}/metrics",
                workdir / "sidecar.log",
                # OTLP metrics every second (the standard variable), so exporters show up.
                {"OTEL_METRIC_EXPORT_INTERVAL": "1000"},
            )
        )
        prom = start_prometheus(workdir, [target], [RULES_FILE])
        stack.callback(prom.stop)
        sidecar.wait_ready()
        engine.wait_ready()
        engine_url = f"http://127.0.0.1:{engine_port}"
        # A shorter gen_throughput window than SGLang's 40 decode batches (an operator's
        # --decode-log-interval), so a slow start still reports throughput in the busy phase.
        httpx.post(
            f"{engine_url}/set_internal_state", json={"decode_log_interval": 8}, timeout=10
        ).raise_for_status()
        wait_until(
            lambda: any(t["health"] == "up" for t in prom.api("targets")["activeTargets"]),
            15,
            "the first scrape of the sidecar",
        )
        start = time.time()
        stop, done = threading.Event(), []
        stack.callback(stop.set)  # clients stop even when the run fails half way
        threads = clients(engine_url, stop, done)
        time.sleep(PHASE_S["busy"] / 2)
        inject_faults(endpoint)
        time.sleep(PHASE_S["busy"] / 2)
        httpx.post(f"{engine_url}/pause_generation", json={"mode": "in_place"}, timeout=10)
        pause_start = time.time()
        time.sleep(PHASE_S["paused"])
        pause_end = time.time()
        httpx.post(f"{engine_url}/continue_generation", timeout=10)
        time.sleep(PHASE_S["resumed"])
        stop.set()
        for t in threads:
            t.join(30)
        idle_start = time.time()
        time.sleep(PHASE_S["idle"])
        end = time.time()
        time.sleep(SCRAPE_INTERVAL_S + 1)  # the last scrape and rule evaluation land
        yield Run(
            prom,
            f"http://{target}/metrics",
            engine_url,
            start,
            end,
            (pause_start, pause_end),
            (idle_start, end),
            len(done),
        )


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _finite(series: list[dict[str, Any]]) -> list[float]:
    out = []
    for s in series:
        for _, v in s.get("values", []) or ([s["value"]] if "value" in s else []):
            f = float(v)
            if math.isfinite(f):
                out.append(f)
    return out


def _label_values(run: Run, definition: str, values: dict[str, str]) -> list[str]:
    selector, label = parse_label_values(substitute(definition, values))
    params: dict[str, Any] = {"start": run.start, "end": run.end}
    if selector:
        params["match[]"] = selector
    # GET: the label-values endpoint takes no form body.
    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{run.prom.url}/api/v1/label/{label}/values?{query}") as r:
        return json.load(r)["data"]


def test_every_dashboard_query_returns_data(run: Run) -> None:
    dashboard = build_dashboard()
    values = run.grafana_values()
    problems: list[str] = []
    checked = 0
    for e in dashboard_expressions(dashboard):
        if e.kind == "variable":
            continue
        try:
            result = run.prom.query_range(substitute(e.expr, values), run.start, run.end)
        except PromQLError as exc:
            problems.append(f"{e.where}: {exc}")
            continue
        checked += 1
        if not _finite(result):
            problems.append(f"{e.where}: no data for {e.expr}")
    assert not problems, "\n".join(problems)
    assert checked >= 40


def test_dashboard_queries_with_every_value_picked(run: Run) -> None:
    """The variables filled as a user picking every listed value would (each variable's query
    sees the ones before it), formatted the way Grafana writes a multi-value regex."""
    dashboard = build_dashboard()
    values = run.grafana_values()
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = grafana_regex(_label_values(run, var["definition"], values))
    assert "|" in values["engine_id"] and "\\." in values["instance"]
    problems = []
    for e in dashboard_expressions(dashboard):
        if e.kind != "variable":
            expr = substitute(e.expr, values)
            if not _finite(run.prom.query_range(expr, run.start, run.end)):
                problems.append(f"{e.where}: no data for {expr}")
    assert not problems, "\n".join(problems)


def test_dashboard_variables_list_the_real_engine(run: Run) -> None:
    dashboard = build_dashboard()
    values = run.grafana_values()
    found = {
        v["name"]: _label_values(run, v["definition"], values)
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    }
    assert found["model_name"] == [MODEL]
    assert len(found["instance"]) == 1
    assert FAULTY_ENGINE in found["engine_id"] and len(found["engine_id"]) == 2
    assert found["dp_rank"] == []  # no data parallelism: no dp_rank label, "All" matches


def test_pause_shows_as_zero_gen_throughput(run: Run) -> None:
    t0, t1 = run.pause
    expr = f'{M.gen_throughput}{{engine_id!="{FAULTY_ENGINE}"}}'
    before = _finite(run.prom.query_range(expr, run.start + 1, t0 - 0.2))
    during = _finite(run.prom.query_range(expr, t0 + 1.5, t1 - 0.2))
    after = _finite(run.prom.query_range(expr, t1 + 1, run.idle[0]))
    assert max(before) > 0, "no generation throughput before the pause"
    assert during and set(during) == {0.0}, f"gen_throughput during the pause: {during}"
    assert max(after) > 0, "throughput did not come back after continue_generation"
    # The dashboard's pause annotation covers exactly a stretch where throughput reads 0.
    paused = run.prom.query_range(
        f'{M.paused}{{engine_id!="{FAULTY_ENGINE}"}} > 0', run.start, run.end
    )
    stamps = [float(t) for s in paused for t, _ in s["values"]]
    assert stamps and min(stamps) >= t0 - 1 and max(stamps) <= t1 + 2


def test_idle_period_shows(run: Run) -> None:
    t0, t1 = run.idle
    idle = _finite(run.prom.query_range(f'{M.idle}{{engine_id!="{FAULTY_ENGINE}"}}', t0 + 2, t1))
    assert idle and set(idle) == {1.0}
    # The idle-seconds counter grows while the idle span is still open (credited up to the
    # engine's latest heartbeat), not only when it closes: the idle-fraction panel is live.
    grown = _finite(
        run.prom.query_range(
            f'{M.idle_seconds}{{engine_id!="{FAULTY_ENGINE}"}}', t1 - 0.5, t1 - 0.5
        )
    )
    before = _finite(
        run.prom.query_range(f'{M.idle_seconds}{{engine_id!="{FAULTY_ENGINE}"}}', t0, t0)
    )
    assert grown and before and max(grown) - max(before) >= 1.0


def test_every_rule_is_loaded_healthy_and_reads_live_series(run: Run) -> None:
    loaded = {r["name"]: r for g in run.prom.api("rules")["groups"] for r in g["rules"]}
    expected = list(rule_expressions(rule_groups()))
    assert len(loaded) == len(expected)
    problems = []
    for e in expected:
        name = e.where.split()[-1]
        rule = loaded[name]
        if rule["health"] != "ok" or rule.get("lastError"):
            problems.append(f"{e.where}: {rule['health']} {rule.get('lastError')}")
        try:
            run.prom.query(e.expr, at=run.end)
        except PromQLError as exc:
            problems.append(f"{e.where}: {exc}")
        for metric in metric_names(e.expr):
            if not run.prom.query(f'count({{__name__=~"{metric}(_bucket)?"}})', at=run.end):
                problems.append(f"{e.where}: no live series of {metric}")
        if e.kind == "recording" and not run.prom.query(name, at=run.end):
            problems.append(f"{e.where}: recorded nothing")
    assert not problems, "\n".join(problems)


def test_injected_faults_trip_their_alerts(run: Run) -> None:
    alerts = run.prom.api("alerts")["alerts"]
    state = {
        (a["labels"]["alertname"], a["labels"].get("engine_id", "")): a["state"] for a in alerts
    }
    assert state.get(("SchedscopeMemoryLeakDetected", FAULTY_ENGINE)) == "firing"
    assert state.get(("SchedscopeBadFrames", "")) == "firing"
    assert state.get(("SchedscopeTelemetryLosingEvents", FAULTY_ENGINE)) in ("pending", "firing")
    # Silent after a clean Shutdown is not a missing heartbeat.
    assert ("SchedscopeEngineHeartbeatMissing", FAULTY_ENGINE) not in state
    # The healthy engine trips nothing: no stall while paused, heartbeats arrive.
    real = [a for a in alerts if a["labels"].get("engine_id") not in (None, FAULTY_ENGINE)]
    assert not real, real


def test_exemplars_reach_prometheus(run: Run) -> None:
    data = run.prom.api(
        "query_exemplars",
        query=f"{M.ttft}_bucket",
        start=run.start,
        end=run.end,
    )
    exemplars = [ex for s in data for ex in s["exemplars"]]
    assert exemplars and all(len(ex["labels"]["trace_id"]) == 32 for ex in exemplars)


def test_promtool_check_metrics_is_clean(run: Run) -> None:
    promtool = require_binary("promtool")
    with urllib.request.urlopen(run.metrics_url, timeout=5) as r:  # classic text format
        text = r.read()
    assert M.gen_throughput.encode() in text
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    lint = (out.stdout + out.stderr).decode().splitlines()
    colon = [line for line in lint if line.endswith("metric names should not contain ':'")]
    others = [line for line in lint if line not in colon]
    assert not others, "\n".join(others)
    # The one lint SGLang compatibility forces: SGLang's own names contain ':' (its /metrics
    # fails the same way), and its dashboards query them by those names.
    own = [line for line in colon if not line.startswith("sglang:")]
    if own:
        pytest.xfail(
            f"metrics table: schedscope's own names use ':' ({own[0].split()[0]}, ... "
            f"{len(own)} names), which promtool's lint reserves for recording rules; "
            "`schedscope_` would be clean"
        )
    assert out.returncode == (3 if colon else 0)


def sglang_compatibility(run: Run) -> list[tuple[str, str, str, bool]]:
    """(dashboard, panel, expr, returns data) for SGLang's own dashboard queries."""
    values = {**run.grafana_values(), "model_name": MODEL, "instance": ".*"}
    rows = []
    for q in SGLANG_QUERIES:
        expr = substitute(q.expr, values)
        if expr.startswith("label_values("):
            ok = bool(_label_values(run, expr, values))
        else:
            ok = bool(_finite(run.prom.query_range(expr, run.start, run.end)))
        rows.append((q.dashboard, q.panel, q.expr, ok))
    return rows


def test_sglang_dashboard_queries_work_unchanged(run: Run) -> None:
    rows = sglang_compatibility(run)
    broken = [r for r in rows if not r[3]]
    assert not broken, broken
