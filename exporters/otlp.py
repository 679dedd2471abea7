"""OTLP traces and metrics (gRPC or HTTP/protobuf) with the official exporters, plus files.

The telemetry layer makes spans through a ``TracerProvider`` and metrics through a
``MeterProvider``; this module builds both from an ``ExportConfig``:

    provider = build_tracer_provider(config, resource)        # spans -> OTLP / files / Perfetto
    histograms = OtlpHistogramBridge(resource)                # the pipeline binds its store
    meters = build_meter_provider(config, resource, extra_readers=[...], histograms=histograms)

Configuration: explicit ``ExportConfig`` fields win; a field left ``None`` falls back to the
standard OTel variables (``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]{ENDPOINT,PROTOCOL,HEADERS}``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_METRIC_EXPORT_INTERVAL``/``_TIMEOUT``,
``OTEL_BSP_*``, ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER=none``), then to our defaults.
Variables this module does not resolve itself (TLS files, compression, ``..._TIMEOUT``,
``..._INSECURE``) are read by the official exporters as usual.

Never blocking: spans go through a BatchSpanProcessor (bounded queue; ``on_end`` only appends),
metrics through a PeriodicExportingMetricReader thread. The SDK retries transient errors with
backoff until the export timeout. Every outcome is counted in ``ExportStats`` (spans exported /
failed / dropped at the queue, metric exports success / failure) and the SDK's repeated
failure logs are rate-limited to one per interval.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.util.re import parse_env_headers

from schedscope.exporters.stats import (
    EXPORT_STATS,
    ExportStats,
    RateLimitedLogger,
    install_log_rate_limit,
    register_otel_instruments,
)

if TYPE_CHECKING:
    from schedscope.telemetry.otel_histograms import OtlpHistogramBridge

logger = logging.getLogger(__name__)

PROTOCOL_GRPC = "grpc"
PROTOCOL_HTTP = "http/protobuf"

# Defaults for a sidecar that sees hundreds of batch spans per second: a deeper queue than the
# SDK's 2048, shorter delay than its 5 s so traces show up while a person watches.
DEFAULT_BSP_MAX_QUEUE_SIZE = 8192
DEFAULT_BSP_SCHEDULE_DELAY_MS = 1000.0
DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE = 1024
DEFAULT_BSP_EXPORT_TIMEOUT_MS = 10_000.0
DEFAULT_METRIC_EXPORT_INTERVAL_MS = 10_000.0
DEFAULT_METRIC_EXPORT_TIMEOUT_MS = 10_000.0
DEFAULT_SERVICE_NAME = "schedscope-sidecar"
# The OpenTelemetry Python SDK ships no OTLP/HTTP JSON exporter; refuse it in one clear line
# rather than sending protobuf to a receiver that expects JSON (or sending nothing).
HTTP_JSON_UNSUPPORTED = (
    "OTLP protocol 'http/json' is not supported (the OpenTelemetry Python SDK has no "
    "http/json exporter): use 'grpc' or 'http/protobuf'"
)


@dataclass
class ExportConfig:
    """Where spans and metrics go. ``None`` means: the standard env variable, then a default."""

    endpoint: str | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT (base; /v1/... added for HTTP)
    traces_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is)
    metrics_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (used as is)
    protocol: str | None = None  # "grpc" | "http/protobuf"; OTEL_EXPORTER_OTLP_PROTOCOL
    traces_protocol: str | None = None
    metrics_protocol: str | None = None
    headers: Mapping[str, str] | None = None  # OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]HEADERS
    timeout_s: float | None = None  # per export, SDK retries included (SDK default 10 s)
    insecure: bool | None = None  # gRPC without TLS (an http:// endpoint implies it)
    service_name: str | None = None  # OTEL_SERVICE_NAME
    resource_attributes: Mapping[str, Any] = field(default_factory=dict)
    metric_export_interval_ms: float | None = None  # OTEL_METRIC_EXPORT_INTERVAL
    metric_export_timeout_ms: float | None = None  # OTEL_METRIC_EXPORT_TIMEOUT
    bsp_schedule_delay_ms: float | None = None  # OTEL_BSP_SCHEDULE_DELAY
    bsp_max_queue_size: int | None = None  # OTEL_BSP_MAX_QUEUE_SIZE
    bsp_max_export_batch_size: int | None = None  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    bsp_export_timeout_ms: float | None = None  # OTEL_BSP_EXPORT_TIMEOUT
    # OTLP JSON lines (traces.jsonl, metrics.jsonl) in this folder when no endpoint is set,
    # or always with files_always=True.
    file_dir: str | os.PathLike[str] | None = None
    files_always: bool = False
    file_max_bytes: int = 256 * 1024 * 1024
    perfetto_path: str | os.PathLike[str] | None = None  # Chrome trace JSON of the scheduler
    perfetto_max_events: int = 1_000_000
    log_interval_s: float = 30.0  # one failure log per (logger, message) per interval
    export_health_metrics: bool = True  # exporter counters through OTLP too
    stats: ExportStats = field(default=EXPORT_STATS, repr=False)
    env: Mapping[str, str] | None = field(default=None, repr=False)  # None: os.environ

    # -- resolution: explicit field, then env, then default --------------------------------

    def _env(self, name: str) -> str | None:
        value = (self.env if self.env is not None else os.environ).get(name)
        return value.strip() if value and value.strip() else None

    def _endpoint_for(self, signal: str) -> str | None:
        explicit = self.traces_endpoint if signal == "traces" else self.metrics_endpoint
        if explicit:
            return explicit
        protocol = self.protocol_for(signal)
        if self.endpoint:
            return _with_signal_path(self.endpoint, signal, protocol)
        env_signal = self._env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        if env_signal:
            return env_signal
        env_base = self._env("OTEL_EXPORTER_OTLP_ENDPOINT")
        if env_base:
            return _with_signal_path(env_base, signal, protocol)
        return None

    def signal_off(self, signal: str) -> bool:
        """``OTEL_SDK_DISABLED=true`` or ``OTEL_{TRACES,METRICS}_EXPORTER=none`` (the spec's
        meaning: no exporter for that signal, our OTLP JSON file included)."""
        if (self._env("OTEL_SDK_DISABLED") or "").lower() == "true":
            return True
        chosen = (self._env(f"OTEL_{signal.upper()}_EXPORTER") or "").lower()
        return [x.strip() for x in chosen.split(",")] == ["none"]

    def _explicit_endpoint(self, signal: str) -> bool:
        return bool(
            (self.traces_endpoint if signal == "traces" else self.metrics_endpoint) or self.endpoint
        )

    def traces_endpoint_resolved(self) -> str | None:
        if self.signal_off("traces") and not self._explicit_endpoint("traces"):
            return None
        return self._endpoint_for("traces")

    def metrics_endpoint_resolved(self) -> str | None:
        if self.signal_off("metrics") and not self._explicit_endpoint("metrics"):
            return None
        return self._endpoint_for("metrics")

    def protocol_for(self, signal: str) -> str:
        explicit = self.traces_protocol if signal == "traces" else self.metrics_protocol
        raw = (
            explicit
            or self.protocol
            or self._env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or self._env("OTEL_EXPORTER_OTLP_PROTOCOL")
        )
        if raw is None:  # infer from the well-known ports (Jaeger/Tempo: 4317 gRPC, 4318 HTTP)
            ep = (
                (self.traces_endpoint if signal == "traces" else self.metrics_endpoint)
                or self.endpoint
                or self._env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
                or self._env("OTEL_EXPORTER_OTLP_ENDPOINT")
            )
            return PROTOCOL_HTTP if ep and _port_of(ep) == 4318 else PROTOCOL_GRPC
        raw = raw.lower()
        if raw == PROTOCOL_GRPC:
            return PROTOCOL_GRPC
        if raw in (PROTOCOL_HTTP, "http"):
            return PROTOCOL_HTTP
        if raw == "http/json":
            raise ValueError(HTTP_JSON_UNSUPPORTED)
        raise ValueError(f"unknown OTLP protocol {raw!r}: use 'grpc' or 'http/protobuf'")

    def headers_for(self, signal: str) -> dict[str, str] | None:
        if self.headers is not None:
            return dict(self.headers)
        raw = self._env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS") or self._env(
            "OTEL_EXPORTER_OTLP_HEADERS"
        )
        return parse_env_headers(raw, liberal=True) if raw else None

    def _number(self, explicit: float | None, env_name: str, default: float) -> float:
        if explicit is not None:
            return explicit
        raw = self._env(env_name)
        if raw is not None:
            try:
                return float(raw)
            except ValueError:
                logger.warning("ignoring %s=%r (not a number)", env_name, raw)
        return default

    def bsp_settings(self) -> dict[str, float]:
        queue = int(
            self._number(
                self.bsp_max_queue_size, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_BSP_MAX_QUEUE_SIZE
            )
        )
        batch = int(
            self._number(
                self.bsp_max_export_batch_size,
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE,
            )
        )
        return {
            "max_queue_size": queue,
            "schedule_delay_millis": self._number(
                self.bsp_schedule_delay_ms, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_BSP_SCHEDULE_DELAY_MS
            ),
            # The SDK refuses a batch larger than the queue; a small queue alone is valid config.
            "max_export_batch_size": min(batch, queue),
            "export_timeout_millis": self._number(
                self.bsp_export_timeout_ms, "OTEL_BSP_EXPORT_TIMEOUT", DEFAULT_BSP_EXPORT_TIMEOUT_MS
            ),
        }

    def metric_interval_ms(self) -> float:
        return self._number(
            self.metric_export_interval_ms,
            "OTEL_METRIC_EXPORT_INTERVAL",
            DEFAULT_METRIC_EXPORT_INTERVAL_MS,
        )

    def metric_timeout_ms(self) -> float:
        return self._number(
            self.metric_export_timeout_ms,
            "OTEL_METRIC_EXPORT_TIMEOUT",
            DEFAULT_METRIC_EXPORT_TIMEOUT_MS,
        )


def _port_of(endpoint: str) -> int | None:
    try:
        return urlparse(endpoint if "://" in endpoint else f"//{endpoint}").port
    except ValueError:
        return None


def _with_signal_path(base: str, signal: str, protocol: str) -> str:
    """The OTLP/HTTP rule: a base endpoint gets ``/v1/traces`` or ``/v1/metrics`` appended."""
    if protocol != PROTOCOL_HTTP:
        return base
    return base.rstrip("/") + f"/v1/{signal}"


def build_resource(config: ExportConfig | None = None) -> Resource:
    """Resource from OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME, explicit values winning."""
    config = config or ExportConfig()
    attrs: dict[str, Any] = dict(config.resource_attributes)
    if config.service_name:
        attrs["service.name"] = config.service_name
    resource = Resource.create(attrs)
    if resource.attributes.get("service.name", "").startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


# ---------------------------------------------------------------------------------------------
# Counting wrappers
# ---------------------------------------------------------------------------------------------


class CountingSpanExporter(SpanExporter):
    """Wraps any SpanExporter: counts exported / failed spans, never raises, logs calmly."""

    def __init__(
        self,
        inner: SpanExporter,
        name: str,
        stats: ExportStats = EXPORT_STATS,
        log_interval_s: float = 30.0,
    ) -> None:
        self.inner = inner
        self.name = name
        self.stats = stats
        self._log = RateLimitedLogger(logger, log_interval_s, stats)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the batch worker thread
            self._log.warn("exc", "span exporter %s raised: %r", self.name, exc)
            result = SpanExportResult.FAILURE
        ok = result == SpanExportResult.SUCCESS
        self.stats.add("spans", self.name, "exported" if ok else "failed", len(spans))
        if not ok:
            self._log.warn(
                "fail", "span export to %s failed (%d spans); counting", self.name, len(spans)
            )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans its full queue drops.

    NOTE: the SDK drops the oldest span when its queue is full and only logs it; the queue is
    internal, so we look at its length (and fall back to not counting if the SDK changes).
    """

    def __init__(
        self,
        exporter: SpanExporter,
        name: str,
        stats: ExportStats = EXPORT_STATS,
        **bsp_settings: Any,
    ) -> None:
        super().__init__(exporter, **bsp_settings)
        self.name = name
        self.stats = stats
        self.max_queue_size = int(bsp_settings.get("max_queue_size") or 2048)

    def queue_length(self) -> int:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        return len(queue) if queue is not None else 0

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            bp = getattr(self, "_batch_processor", None)
            if bp is not None and (
                getattr(bp, "_shutdown", False) or self.queue_length() >= self.max_queue_size
            ):
                self.stats.add("spans", self.name, "dropped")
        super().on_end(span)


class CountingMetricExporter(MetricExporter):
    """Wraps any MetricExporter: counts export calls and data points by outcome."""

    def __init__(
        self,
        inner: MetricExporter,
        name: str,
        stats: ExportStats = EXPORT_STATS,
        log_interval_s: float = 30.0,
    ) -> None:
        # Keep the inner exporter's temporality/aggregation preferences (the reader asks us).
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self.inner = inner
        self.name = name
        self.stats = stats
        self._log = RateLimitedLogger(logger, log_interval_s, stats)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        points = _count_points(metrics_data)
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self._log.warn("exc", "metric exporter %s raised: %r", self.name, exc)
            result = MetricExportResult.FAILURE
        ok = result == MetricExportResult.SUCCESS
        self.stats.add("metric_exports", self.name, "success" if ok else "failure")
        self.stats.add("metric_points", self.name, "exported" if ok else "failed", points)
        if not ok:
            self._log.warn("fail", "metric export to %s failed; counting", self.name)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _count_points(metrics_data: MetricsData) -> int:
    n = 0
    for rm in metrics_data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                n += len(getattr(metric.data, "data_points", ()))
    return n


# ---------------------------------------------------------------------------------------------
# Official OTLP exporters
# ---------------------------------------------------------------------------------------------


def make_otlp_span_exporter(config: ExportConfig) -> SpanExporter | None:
    endpoint = config.traces_endpoint_resolved()
    if endpoint is None:
        return None
    protocol = config.protocol_for("traces")
    headers = config.headers_for("traces")
    if protocol == PROTOCOL_GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(
            endpoint=endpoint, insecure=config.insecure, headers=headers, timeout=config.timeout_s
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=endpoint, headers=headers, timeout=config.timeout_s)


def make_otlp_metric_exporter(config: ExportConfig) -> MetricExporter | None:
    endpoint = config.metrics_endpoint_resolved()
    if endpoint is None:
        return None
    protocol = config.protocol_for("metrics")
    headers = config.headers_for("metrics")
    if protocol == PROTOCOL_GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(
            endpoint=endpoint, insecure=config.insecure, headers=headers, timeout=config.timeout_s
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=endpoint, headers=headers, timeout=config.timeout_s)


def _exporter_name(kind: str, config: ExportConfig, signal: str) -> str:
    return f"{kind}_{'grpc' if config.protocol_for(signal) == PROTOCOL_GRPC else 'http'}"


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


def build_span_processors(
    config: ExportConfig, extra_exporters: Iterable[tuple[str, SpanExporter]] = ()
) -> list[CountingBatchSpanProcessor]:
    """One counting BatchSpanProcessor per configured span exporter."""
    install_log_rate_limit(config.log_interval_s, config.stats)
    bsp = config.bsp_settings()
    exporters: list[tuple[str, SpanExporter]] = []
    otlp = make_otlp_span_exporter(config)
    if otlp is not None:
        exporters.append((_exporter_name("otlp", config, "traces"), otlp))
    if (
        config.file_dir is not None
        and (otlp is None or config.files_always)
        and not config.signal_off("traces")
    ):
        from schedscope.exporters.otlp_file import OtlpJsonFileSpanExporter

        path = Path(config.file_dir) / "traces.jsonl"
        exporters.append(
            ("otlp_file", OtlpJsonFileSpanExporter(path, config.file_max_bytes, stats=config.stats))
        )
    if config.perfetto_path is not None:
        from schedscope.exporters.perfetto import PerfettoSpanExporter

        exporters.append(
            (
                "perfetto",
                PerfettoSpanExporter(
                    config.perfetto_path, max_events=config.perfetto_max_events, stats=config.stats
                ),
            )
        )
    exporters.extend(extra_exporters)
    processors = []
    for name, exporter in exporters:
        counted = (
            exporter
            if name in ("otlp_file",)  # counts itself
            else CountingSpanExporter(exporter, name, config.stats, config.log_interval_s)
        )
        processors.append(CountingBatchSpanProcessor(counted, name, config.stats, **bsp))
    return processors


def build_tracer_provider(
    config: ExportConfig | None = None,
    resource: Resource | None = None,
    extra_exporters: Iterable[tuple[str, SpanExporter]] = (),
) -> TracerProvider:
    """A TracerProvider exporting to every configured destination. Not set as global."""
    config = config or ExportConfig()
    provider = TracerProvider(resource=resource or build_resource(config), shutdown_on_exit=False)
    for processor in build_span_processors(config, extra_exporters):
        provider.add_span_processor(processor)
    return provider


def build_metric_readers(
    config: ExportConfig, histograms: OtlpHistogramBridge | None = None
) -> list[MetricReader]:
    """A periodic reader per configured metric exporter. With ``histograms``, each exporter is
    wrapped so every export also carries the metric store's histograms (outermost, so the
    counts include their points)."""
    install_log_rate_limit(config.log_interval_s, config.stats)
    exporters: list[MetricExporter] = []
    otlp = make_otlp_metric_exporter(config)
    if otlp is not None:
        name = _exporter_name("otlp", config, "metrics")
        exporters.append(CountingMetricExporter(otlp, name, config.stats, config.log_interval_s))
    if (
        config.file_dir is not None
        and (otlp is None or config.files_always)
        and not config.signal_off("metrics")
    ):
        from schedscope.exporters.otlp_file import OtlpJsonFileMetricExporter

        path = Path(config.file_dir) / "metrics.jsonl"
        exporters.append(
            OtlpJsonFileMetricExporter(path, config.file_max_bytes, stats=config.stats)
        )
    interval, timeout = config.metric_interval_ms(), config.metric_timeout_ms()
    return [
        PeriodicExportingMetricReader(
            histograms.wrap(e) if histograms is not None else e, interval, timeout
        )
        for e in exporters
    ]


def build_meter_provider(
    config: ExportConfig | None = None,
    resource: Resource | None = None,
    extra_readers: Sequence[MetricReader] = (),
    views: Sequence[Any] = (),
    histograms: OtlpHistogramBridge | None = None,
) -> MeterProvider:
    """A MeterProvider with the configured periodic OTLP/file readers plus ``extra_readers``.
    Give the pipeline the same ``histograms`` bridge: OTLP histograms come only through it."""
    config = config or ExportConfig()
    provider = MeterProvider(
        metric_readers=[*build_metric_readers(config, histograms), *extra_readers],
        resource=resource or build_resource(config),
        views=list(views),
        shutdown_on_exit=False,
    )
    if config.export_health_metrics:
        register_otel_instruments(provider.get_meter("schedscope.exporters"), config.stats)
    return provider
