"""OTLP JSON lines files: the embedded default when no OTLP endpoint is configured.

Format: what the OTel Collector's ``file`` exporter writes — one ``ExportTraceServiceRequest``
(or ``ExportMetricsServiceRequest``) per line, as OTLP/JSON: the official opentelemetry-proto
encoders build the message, ``google.protobuf.json_format`` turns it into JSON with lowerCamel
field names and enums as integers, and trace/span ids are written as hex strings (OTLP/JSON
spec; protobuf's generic JSON mapping would write base64). ``read_otlp_json_lines`` parses
such a file back into proto messages (hex ids converted back before ``json_format.ParseDict``).

Size bound: when a file would grow past ``max_bytes`` it is rotated to ``<path>.1`` (one backup
kept, the older one is replaced), so a long run uses at most ~2 × max_bytes per file.
Writes happen on the SDK's export thread (batch span processor / periodic metric reader),
never on the pipeline thread.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from schedscope.exporters.stats import EXPORT_STATS, ExportStats, RateLimitedLogger

_log = RateLimitedLogger(logging.getLogger(__name__))

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId"})


def _convert_ids(obj: Any, to_hex: bool) -> Any:
    """Walk a json_format dict, converting id fields between base64 (protobuf) and hex (OTLP)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _ID_KEYS and isinstance(v, str):
                out[k] = (
                    base64.b64decode(v).hex()
                    if to_hex
                    else base64.b64encode(bytes.fromhex(v)).decode()
                )
            else:
                out[k] = _convert_ids(v, to_hex)
        return out
    if isinstance(obj, list):
        return [_convert_ids(v, to_hex) for v in obj]
    return obj


def message_to_otlp_json(msg: Message) -> str:
    d = json_format.MessageToDict(msg, use_integers_for_enums=True)
    return json.dumps(_convert_ids(d, to_hex=True), separators=(",", ":"))


def otlp_json_to_message(line: str, message: Message) -> Message:
    json_format.ParseDict(_convert_ids(json.loads(line), to_hex=False), message)
    return message


def read_otlp_json_lines(path: str | os.PathLike[str]) -> Iterator[Message]:
    """Yield ExportTraceServiceRequest / ExportMetricsServiceRequest messages, one per line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            head = line[:40]
            msg: Message = (
                ExportMetricsServiceRequest()
                if head.startswith('{"resourceMetrics"')
                else ExportTraceServiceRequest()
            )
            yield otlp_json_to_message(line, msg)


class _JsonLinesFile:
    """Append-only lines with size rotation; one lock per file."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open on purpose
        self._size = self._f.tell()

    def write_line(self, line: str) -> None:
        data = line + "\n"
        with self._lock:
            if self._f.closed:
                raise ValueError("file closed")
            if self._size and self._size + len(data) > self.max_bytes:
                self._f.close()
                os.replace(self.path, str(self.path) + ".1")
                self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._size = 0
            self._f.write(data)
            self._f.flush()
            self._size += len(data)

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()


class OtlpJsonFileSpanExporter(SpanExporter):
    """SpanExporter writing one ExportTraceServiceRequest JSON line per export call."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        name: str = "otlp_file",
        stats: ExportStats = EXPORT_STATS,
    ) -> None:
        self._file = _JsonLinesFile(path, max_bytes)
        self.path = self._file.path
        self.name = name
        self.stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self._file.write_line(message_to_otlp_json(encode_spans(spans)))
        except Exception as exc:  # disk full, closed: count, log calmly, never raise
            self.stats.add("spans", self.name, "failed", len(spans))
            self.stats.add("lines", self.name, "failed")
            _log.warn(f"{self.path}", "OTLP JSON file %s: write failed: %s", self.path, exc)
            return SpanExportResult.FAILURE
        self.stats.add("spans", self.name, "exported", len(spans))
        self.stats.add("lines", self.name, "written")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every line is flushed when written


class OtlpJsonFileMetricExporter(MetricExporter):
    """MetricExporter writing one ExportMetricsServiceRequest JSON line per collection."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        name: str = "otlp_file",
        stats: ExportStats = EXPORT_STATS,
        preferred_temporality: dict[type, Any] | None = None,
    ) -> None:
        super().__init__(preferred_temporality=preferred_temporality)
        self._file = _JsonLinesFile(path, max_bytes)
        self.path = self._file.path
        self.name = name
        self.stats = stats

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            self._file.write_line(message_to_otlp_json(encode_metrics(metrics_data)))
        except Exception as exc:
            self.stats.add("metric_exports", self.name, "failure")
            self.stats.add("lines", self.name, "failed")
            _log.warn(f"{self.path}", "OTLP JSON file %s: write failed: %s", self.path, exc)
            return MetricExportResult.FAILURE
        self.stats.add("metric_exports", self.name, "success")
        self.stats.add("lines", self.name, "written")
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._file.close()
