"""Serve a prometheus_client ``CollectorRegistry`` on /metrics.

prometheus_client picks the exposition from the scraper's ``Accept`` header: OpenMetrics
(``application/openmetrics-text``, which carries exemplars: trace ids on the latency histograms,
so Grafana can jump from a panel to the trace) when asked — Prometheus asks when exemplar
storage is on — and the classic text format otherwise. Loopback by default; ``port=0`` picks a
free port (read it back from ``server.port``).
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 9464  # the port OTel's Prometheus exporters use by default


class MetricsPortInUseError(OSError):
    """The /metrics port is taken: say which and what to do."""


@dataclass
class MetricsServer:
    """A running /metrics server. ``close()`` stops it (idempotent)."""

    addr: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()  # type: ignore[attr-defined]  # stops serve_forever
        server.server_close()  # type: ignore[attr-defined]  # releases the port
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(
    registry: CollectorRegistry, port: int = DEFAULT_PORT, addr: str = DEFAULT_ADDR
) -> MetricsServer:
    """Start serving ``registry`` on http://addr:port/metrics in a daemon thread."""
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsPortInUseError(
                exc.errno,
                f"cannot serve /metrics on {addr}:{port}: the port is already in use "
                f"(another sidecar or exporter?); choose another port",
            ) from exc
        raise
    return MetricsServer(addr, server.server_port, server, thread)
