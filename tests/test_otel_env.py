"""The standard OTEL_* variables drive the sidecar as the OTLP exporter spec says.

A real OTLP/HTTP receiver (protobuf bodies decoded with opentelemetry-proto) records what
arrives, with its path and headers: per-signal endpoints alone export that signal only,
per-signal variables win over the generic ones, flags win over both; OTEL_SDK_DISABLED and
OTEL_*_EXPORTER=none turn export (and our OTLP JSON files) off; http/json is one clear line;
OTEL_EXPORTER_PROMETHEUS_HOST/PORT are defaults for the /metrics server.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from schedscope.cli import sidecar_app
from schedscope.cli.common import load_settings
from schedscope.cli.settings import CliError

from .conftest import free_tcp_port

OTEL_VARS_PREFIXES = ("OTEL_", "SCHEDSCOPE_")


class Receiver:
    """POST /v1/traces and /v1/metrics (or any path ending so); keeps (path, headers, msg)."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.lock = threading.Lock()
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path.endswith("/v1/traces") or self.path.endswith("/traces-only"):
                    msg: Any = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    reply: Any = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path.endswith("/v1/metrics") or self.path.endswith("/metrics-only"):
                    msg = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                with recv.lock:
                    recv.posts.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()}, msg)
                    )
                data = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def of(self, kind: str) -> list[tuple[str, dict[str, str], Any]]:
        cls = (
            trace_service_pb2.ExportTraceServiceRequest
            if kind == "traces"
            else metrics_service_pb2.ExportMetricsServiceRequest
        )
        with self.lock:
            return [p for p in self.posts if isinstance(p[2], cls)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith(OTEL_VARS_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    a, b = Receiver(), Receiver()
    yield a, b
    a.stop()
    b.stop()


def run_sidecar(tmp_path: Path, ipc_endpoint: str, **flags: Any) -> sidecar_app.SidecarApp:
    """Build the sidecar from the real settings (env = os.environ), make one span and one
    metric export, flush both providers synchronously, close."""
    all_flags = {"endpoint": ipc_endpoint, "out_dir": str(tmp_path), "prometheus_port": "off"}
    all_flags.update(flags)
    app = sidecar_app.build_sidecar_app(load_settings("sidecar", all_flags, None))
    try:
        app.tracer_provider.get_tracer("test").start_span("probe").end()
        assert app.tracer_provider.force_flush(10_000)
        app.meter_provider.force_flush(10_000)
    finally:
        app.close()
    return app


def span_names(posts: list) -> set[str]:
    return {
        s.name
        for _, _, req in posts
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }


def test_traces_endpoint_alone_exports_traces_and_no_metrics(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, receivers: Any
) -> None:
    a, _ = receivers
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{a.url}/traces-only")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    run_sidecar(tmp_path, ipc_endpoint)
    assert "probe" in span_names(a.of("traces"))
    assert {p for p, _, _ in a.of("traces")} == {"/traces-only"}  # used as is, no /v1 added
    assert a.of("metrics") == []
    # Something receives the data, so the embedded JSON-file default is off.
    assert not (tmp_path / "traces.jsonl").exists()


def test_metrics_endpoint_alone_exports_metrics_and_no_traces(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, receivers: Any
) -> None:
    a, _ = receivers
    clean_env.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"{a.url}/metrics-only")
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    run_sidecar(tmp_path, ipc_endpoint)
    assert a.of("metrics"), "no metric export reached the receiver"
    assert a.of("traces") == []


def test_per_signal_variables_win_over_generic_ones(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, receivers: Any
) -> None:
    generic, traces = receivers
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", generic.url)
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # overridden per signal below
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    clean_env.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{traces.url}/v1/traces")
    clean_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=generic,x-common=1")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=traces")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    run_sidecar(tmp_path, ipc_endpoint)
    assert generic.of("traces") == [] and traces.of("metrics") == []
    assert "probe" in span_names(traces.of("traces"))
    _, t_headers, _ = traces.of("traces")[0]
    assert t_headers["x-tenant"] == "traces" and "x-common" not in t_headers
    assert t_headers.get("content-encoding") == "gzip"
    m_posts = generic.of("metrics")
    assert m_posts and {p for p, _, _ in m_posts} == {"/v1/metrics"}
    assert m_posts[0][1]["x-tenant"] == "generic"
    assert "content-encoding" not in m_posts[0][1]


def test_the_flag_wins_over_every_endpoint_variable(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, receivers: Any
) -> None:
    flag, env = receivers
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", env.url)
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{env.url}/v1/traces")
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    run_sidecar(tmp_path, ipc_endpoint, otlp_endpoint=flag.url, otlp_protocol="http/protobuf")
    assert env.posts == []
    assert "probe" in span_names(flag.of("traces")) and flag.of("metrics")


def test_sdk_disabled_turns_otlp_export_off(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, receivers: Any
) -> None:
    a, _ = receivers
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", a.url)
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    run_sidecar(tmp_path, ipc_endpoint)
    assert a.posts == []
    assert not (tmp_path / "traces.jsonl").exists()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_traces_exporter_none_writes_no_traces_file_but_metrics(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    run_sidecar(tmp_path, ipc_endpoint)
    assert not (tmp_path / "traces.jsonl").exists()
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0


def test_metrics_exporter_none_keeps_traces(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, receivers: Any
) -> None:
    a, _ = receivers
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", a.url)
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    clean_env.setenv("OTEL_METRICS_EXPORTER", "none")
    run_sidecar(tmp_path, ipc_endpoint)
    assert a.of("metrics") == [] and "probe" in span_names(a.of("traces"))


@pytest.mark.parametrize(
    "var", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_http_json_is_one_clear_line(
    tmp_path: Path, ipc_endpoint: str, clean_env: pytest.MonkeyPatch, var: str
) -> None:
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    clean_env.setenv(var, "http/json")
    with pytest.raises(CliError) as err:
        sidecar_app.build_sidecar_app(
            load_settings("sidecar", {"endpoint": ipc_endpoint, "out_dir": str(tmp_path)}, None)
        ).close()
    text = str(err.value)
    assert "http/json" in text and "not supported" in text and "\n" not in text


def test_prometheus_host_port_variables_are_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "0.0.0.0")
    clean_env.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "9555")
    s = load_settings("sidecar", {}, None)
    assert (s.prometheus_host, s.prometheus_port) == ("0.0.0.0", 9555)
    clean_env.setenv("SCHEDSCOPE_PROMETHEUS_PORT", "9556")
    s = load_settings("sidecar", {"prometheus_host": "127.0.0.1"}, None)
    assert (s.prometheus_host, s.prometheus_port) == ("127.0.0.1", 9556)
    s = load_settings("sidecar", {"prometheus_port": "9557"}, None)
    assert s.prometheus_port == 9557
