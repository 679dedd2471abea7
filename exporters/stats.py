"""Exporter health: counters of what every exporter sent, failed or dropped, and calm logs.

Each exporter counts into one ``ExportStats`` (the module-level ``EXPORT_STATS`` unless given
another, e.g. by a test). The counts are exposed at scrape time by ``ExportStatsCollector``
(prometheus_client) and, for OTLP, by ``register_otel_instruments`` (observable counters), so
the telemetry layer exports exporter health next to everything else:

    schedscope_export_spans_total{exporter, outcome}            exported / failed / dropped
    schedscope_export_metric_exports_total{exporter, outcome}   success / failure
    schedscope_export_metric_points_total{exporter, outcome}    exported / failed
    schedscope_export_kv_batches_total{exporter, outcome}       sent / dropped / replayed / ...
    schedscope_export_kv_events_total{exporter, outcome}
    schedscope_export_trace_events_total{exporter, outcome}     Perfetto: recorded / dropped
    schedscope_export_lines_total{exporter, outcome}            OTLP JSON files: written / failed
    schedscope_export_log_suppressed_total{logger}              rate-limited log records

A dead backend makes the SDK log on every attempt; ``RateLimitFilter`` lets one record per
(logger, message) through per interval and counts the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

KINDS_HELP: dict[str, str] = {
    "spans": "Spans handled by an exporter, by outcome (exported, failed, dropped).",
    "metric_exports": "Metric export calls, by outcome (success, failure).",
    "metric_points": "Metric data points handled by an exporter, by outcome.",
    "kv_batches": "KV event batches handled by a KV relay/ingest, by outcome.",
    "kv_events": "KV events handled by a KV relay/ingest, by outcome.",
    "trace_events": "Perfetto trace events, by outcome (recorded, dropped).",
    "lines": "OTLP JSON lines written to files, by outcome (written, failed).",
}


class ExportStats:
    """Thread-safe counters keyed by (kind, exporter, outcome). Cheap: one dict update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}
        self._suppressed: dict[str, int] = {}

    def add(self, kind: str, exporter: str, outcome: str, n: int = 1) -> None:
        key = (kind, exporter, outcome)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def get(self, kind: str, exporter: str, outcome: str) -> int:
        with self._lock:
            return self._counts.get((kind, exporter, outcome), 0)

    def total(self, kind: str, outcome: str) -> int:
        """Sum over exporters (handy in tests and summaries)."""
        with self._lock:
            return sum(v for (k, _, o), v in self._counts.items() if k == kind and o == outcome)

    def add_suppressed(self, logger: str) -> None:
        with self._lock:
            self._suppressed[logger] = self._suppressed.get(logger, 0) + 1

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._counts)

    def suppressed(self) -> dict[str, int]:
        with self._lock:
            return dict(self._suppressed)


EXPORT_STATS = ExportStats()


class ExportStatsCollector(Collector):
    """prometheus_client Collector: ``registry.register(ExportStatsCollector(stats))``."""

    def __init__(
        self, stats: ExportStats = EXPORT_STATS, prefix: str = "schedscope_export"
    ) -> None:
        self.stats = stats
        self.prefix = prefix

    def collect(self) -> Iterator[CounterMetricFamily]:
        families: dict[str, CounterMetricFamily] = {}
        for kind, help_text in KINDS_HELP.items():
            families[kind] = CounterMetricFamily(
                f"{self.prefix}_{kind}", help_text, labels=["exporter", "outcome"]
            )
        for (kind, exporter, outcome), value in sorted(self.stats.snapshot().items()):
            fam = families.get(kind)
            if fam is None:  # a kind without help text still shows up
                fam = families[kind] = CounterMetricFamily(
                    f"{self.prefix}_{kind}", f"Exporter {kind}.", labels=["exporter", "outcome"]
                )
            fam.add_metric([exporter, outcome], value)
        yield from families.values()
        sup = CounterMetricFamily(
            f"{self.prefix}_log_suppressed",
            "Exporter log records suppressed by the rate limiter.",
            labels=["logger"],
        )
        for name, value in sorted(self.stats.suppressed().items()):
            sup.add_metric([name], value)
        yield sup

    def describe(self) -> Iterable[Any]:
        return []  # no describe: values are read only at scrape time


def register_otel_instruments(meter: Any, stats: ExportStats = EXPORT_STATS) -> None:
    """Expose the same counters through an OTel meter (observable counters, read on collect)."""
    from opentelemetry.metrics import CallbackOptions, Observation

    def make_callback(kind: str):
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for (k, exporter, outcome), value in stats.snapshot().items():
                if k == kind:
                    yield Observation(value, {"exporter": exporter, "outcome": outcome})

        return callback

    for kind, help_text in KINDS_HELP.items():
        meter.create_observable_counter(
            f"schedscope.export.{kind}", callbacks=[make_callback(kind)], description=help_text
        )


# ---------------------------------------------------------------------------------------------
# Rate-limited logging
# ---------------------------------------------------------------------------------------------


class RateLimitFilter(logging.Filter):
    """Let one record per (logger, message template) through per ``interval_s``; count the rest."""

    def __init__(self, interval_s: float = 30.0, stats: ExportStats = EXPORT_STATS) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.stats = stats
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self.stats.add_suppressed(record.name)
                return False
            if len(self._last) > 1000:  # bounded: forget everything, the worst is one extra log
                self._last.clear()
            self._last[key] = now
        return True


# Loggers of the OTel SDK and exporters that repeat on every attempt while a backend is down.
SDK_NOISY_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.sdk._shared_internal",  # BatchSpanProcessor "Queue full, dropping"
    "opentelemetry.sdk.metrics._internal.export",  # "Exception while exporting metrics"
)

_installed: dict[str, RateLimitFilter] = {}
_install_lock = threading.Lock()


def install_log_rate_limit(interval_s: float = 30.0, stats: ExportStats = EXPORT_STATS) -> None:
    """Idempotent: attach one RateLimitFilter to each noisy logger (interval updated on re-call)."""
    with _install_lock:
        for name in SDK_NOISY_LOGGERS:
            f = _installed.get(name)
            if f is None:
                f = _installed[name] = RateLimitFilter(interval_s, stats)
                logging.getLogger(name).addFilter(f)
            f.interval_s = interval_s
            f.stats = stats


class RateLimitedLogger:
    """``warn(key, msg, *args)`` logs at most once per interval per key; counts suppressed."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 30.0, stats: ExportStats = EXPORT_STATS
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.stats = stats
        self._last: dict[str, float] = {}

    def warn(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self.stats.add_suppressed(self.logger.name)
            return
        self._last[key] = now
        self.logger.warning(msg, *args)
