"""OTLP export to real receivers (gRPC servicer and HTTP/protobuf server from opentelemetry-proto).

Scenario: the sidecar's spans (request with phases, batch spans with forward_iter and links,
pause, idle) and a metric reach the receiver with their ids, attributes and links; with the
receiver down the pipeline keeps going, the queue stays bounded and failures and drops are
counted; once the receiver is back, export resumes.
"""

from __future__ import annotations

import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.trace import Link

from schedscope.exporters.otlp import ExportConfig, build_meter_provider, build_tracer_provider
from schedscope.exporters.stats import ExportStats

from .conftest import free_tcp_port as free_port
from .conftest import wait_until


class Received:
    """What a receiver got, decoded into the official proto messages."""

    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def spans(self) -> list:
        with self.lock:
            return [
                s
                for req in self.traces
                for rs in req.resource_spans
                for ss in rs.scope_spans
                for s in ss.spans
            ]

    def metric_names(self) -> set[str]:
        with self.lock:
            return {
                m.name
                for req in self.metrics
                for rm in req.resource_metrics
                for sm in rm.scope_metrics
                for m in sm.metrics
            }


class GrpcReceiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    def __init__(self, port: int) -> None:
        self.port = port
        self.got = Received()
        self.server: grpc.Server | None = None

    def Export(self, request, context):
        with self.got.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.got.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.got.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def start(self) -> GrpcReceiver:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()


class HttpReceiver:
    """POST /v1/traces and /v1/metrics with protobuf bodies, as Jaeger/Tempo accept them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got = Received()
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == "application/x-protobuf"
                if self.path == "/v1/traces":
                    msg = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    with got.lock:
                        got.traces.append(msg)
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    msg = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    with got.lock:
                        got.metrics.append(msg)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HttpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def emit_scenario(tracer: trace.Tracer) -> dict[str, int]:
    """Spans shaped like the telemetry layer's: request + phases, batches with links, pause, idle."""
    ids: dict[str, int] = {}
    req = tracer.start_span(
        "request", attributes={"gen_ai.request.model": "tiny", "schedscope.rid": "r1"}
    )
    ctx = trace.set_span_in_context(req)
    ids["request"] = req.get_span_context().span_id
    ids["trace"] = req.get_span_context().trace_id
    batch_ctxs = []
    for fi, mode in ((7, "prefill"), (8, "decode")):
        b = tracer.start_span(
            mode,
            attributes={
                "schedscope.forward_iter": fi,
                "schedscope.engine_id": "e0",
                "schedscope.running_reqs": 1,
            },
        )
        batch_ctxs.append(b.get_span_context())
        ids[mode] = b.get_span_context().span_id
        b.end()
    phase = tracer.start_span("decode_phase", context=ctx, links=[Link(c) for c in batch_ctxs])
    ids["phase"] = phase.get_span_context().span_id
    phase.end()
    req.end()
    tracer.start_span("pause", attributes={"schedscope.pause.mode": "in_place"}).end()
    tracer.start_span("idle").end()
    return ids


def check_spans(spans: list, ids: dict[str, int]) -> None:
    by_name = {s.name: s for s in spans}
    assert {"request", "prefill", "decode", "decode_phase", "pause", "idle"} <= set(by_name)
    attrs = {kv.key: kv.value for kv in by_name["decode"].attributes}
    assert attrs["schedscope.forward_iter"].int_value == 8
    assert attrs["schedscope.engine_id"].string_value == "e0"
    phase = by_name["decode_phase"]
    assert int.from_bytes(phase.parent_span_id, "big") == ids["request"]
    assert int.from_bytes(phase.trace_id, "big") == ids["trace"]
    assert {int.from_bytes(link.span_id, "big") for link in phase.links} == {
        ids["prefill"],
        ids["decode"],
    }
    assert int.from_bytes(by_name["request"].span_id, "big") == ids["request"]
    assert by_name["request"].parent_span_id == b""


def fast_config(protocol: str, port: int, stats: ExportStats, **kw) -> ExportConfig:
    return ExportConfig(
        endpoint=f"http://127.0.0.1:{port}",
        protocol=protocol,
        timeout_s=0.5,
        bsp_schedule_delay_ms=50,
        bsp_max_queue_size=kw.pop("queue", 256),
        bsp_max_export_batch_size=kw.pop("batch", 64),
        metric_export_interval_ms=60_000,  # flushed by hand
        service_name="schedscope-test",
        stats=stats,
        env={},
        **kw,
    )


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_and_metrics_reach_a_real_receiver(protocol: str) -> None:
    port = free_port()
    receiver = (GrpcReceiver(port) if protocol == "grpc" else HttpReceiver(port)).start()
    stats = ExportStats()
    config = fast_config(protocol, port, stats)
    tp = build_tracer_provider(config)
    mp = build_meter_provider(config)
    try:
        ids = emit_scenario(tp.get_tracer("schedscope.test"))
        mp.get_meter("schedscope.test").create_counter("sglang.prompt_tokens").add(
            5, {"engine_id": "e0"}
        )
        assert tp.force_flush(10_000)
        assert mp.force_flush(10_000)
        check_spans(receiver.got.spans(), ids)
        assert "sglang.prompt_tokens" in receiver.got.metric_names()
        assert "schedscope.export.spans" in receiver.got.metric_names()  # exporter health via OTLP
        res = receiver.got.traces[0].resource_spans[0].resource
        assert {kv.key: kv.value.string_value for kv in res.attributes}[
            "service.name"
        ] == "schedscope-test"
        name = "otlp_grpc" if protocol == "grpc" else "otlp_http"
        assert stats.get("spans", name, "exported") == 6
        assert stats.get("metric_exports", name, "success") >= 1
    finally:
        tp.shutdown()
        mp.shutdown()
        receiver.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_down_is_counted_bounded_and_export_resumes(protocol: str) -> None:
    port = free_port()  # nothing listens yet
    stats = ExportStats()
    config = fast_config(protocol, port, stats, queue=64, batch=16)
    tp = build_tracer_provider(config)
    mp = build_meter_provider(config)
    tracer = tp.get_tracer("schedscope.test")
    name = "otlp_grpc" if protocol == "grpc" else "otlp_http"
    (processor,) = tp._active_span_processor._span_processors
    receiver = None
    try:
        # The pipeline thread never waits: 2000 spans end while every export fails.
        for i in range(2000):
            tracer.start_span("decode", attributes={"schedscope.forward_iter": i}).end()
            assert processor.queue_length() <= 64  # bounded
        mp.get_meter("t").create_counter("c").add(1)
        mp.force_flush(5_000)
        assert wait_until(lambda: stats.get("spans", name, "failed") > 0)
        assert stats.get("spans", name, "dropped") > 0
        assert stats.get("metric_exports", name, "failure") >= 1
        assert stats.get("spans", name, "exported") == 0

        receiver = (GrpcReceiver(port) if protocol == "grpc" else HttpReceiver(port)).start()
        ids = emit_scenario(tracer)
        assert wait_until(lambda: any(s.name == "decode_phase" for s in receiver.got.spans()))
        # Old spans still queued go out too; look at this scenario's decode span.
        spans = [
            s
            for s in receiver.got.spans()
            if s.name != "decode" or int.from_bytes(s.span_id, "big") == ids["decode"]
        ]
        check_spans(spans, ids)
        assert stats.get("spans", name, "exported") > 0
        mp.force_flush(5_000)
        assert stats.get("metric_exports", name, "success") >= 1
        assert "c" in receiver.got.metric_names()
    finally:
        tp.shutdown()
        mp.shutdown()
        if receiver is not None:
            receiver.stop()


def test_env_variables_configure_and_explicit_arguments_win() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://tempo:4318",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://mimir:4318/otlp/v1/metrics",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-scope-orgid=team%20a,authorization=Bearer t",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "1500",
    }
    cfg = ExportConfig(env=env)
    assert cfg.protocol_for("traces") == "http/protobuf"  # inferred from :4318
    assert cfg.traces_endpoint_resolved() == "http://tempo:4318/v1/traces"
    assert cfg.metrics_endpoint_resolved() == "http://mimir:4318/otlp/v1/metrics"
    assert cfg.headers_for("traces") == {"x-scope-orgid": "team a", "authorization": "Bearer t"}
    assert cfg.bsp_settings()["schedule_delay_millis"] == 200
    assert cfg.bsp_settings()["max_queue_size"] == 100
    assert cfg.metric_interval_ms() == 1500

    cfg = ExportConfig(
        env=env, endpoint="http://jaeger:4317", protocol="grpc", bsp_max_queue_size=7
    )
    assert cfg.traces_endpoint_resolved() == "http://jaeger:4317"
    assert cfg.protocol_for("traces") == "grpc"
    assert cfg.bsp_settings()["max_queue_size"] == 7

    assert ExportConfig(env={}).traces_endpoint_resolved() is None
    assert (
        ExportConfig(env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).protocol_for("metrics") == "grpc"
    )
    with pytest.raises(ValueError, match="unknown OTLP protocol"):
        ExportConfig(env={}, protocol="thrift").protocol_for("traces")
