"""Serve a prometheus_client ``CollectorRegistry`` on /metrics.

Content negotiation: OpenMetrics (``application/openmetrics-text``, which carries exemplars —
trace ids on the latency histograms, so Grafana can jump from a panel to the trace) when the
scraper asks for it (Prometheus does when exemplar storage is on), the classic text format
otherwise; gzip when accepted. Loopback by default; ``port=0`` picks a free port (read it
back from ``server.port``).

NOTE: prometheus_client 0.26's OpenMetrics writer, with its default "underscores" escaping,
keeps ``sglang:foo`` in the TYPE line but writes the samples as ``sglang_foo_bucket`` (it checks
sample names against the *label* name charset, which has no ':'), so every ``sglang:`` metric
comes out broken: parsers reject its exemplars and Prometheus would store the wrong name. Our
names are all valid legacy names (colons are legal in metric names), for which "allow-utf-8"
escaping writes them unchanged; so this server always uses it, instead of ``start_http_server``.
"""

from __future__ import annotations

import errno
import gzip
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.openmetrics import exposition as openmetrics

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 9464  # the port OTel's Prometheus exporters use by default


class MetricsPortInUseError(OSError):
    """The /metrics port is taken: say which and what to do."""


def render_metrics(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """(body, content type) for a scrape with this Accept header."""
    if "application/openmetrics-text" in accept:
        return (
            openmetrics.generate_latest(registry, escaping=openmetrics.ALLOWUTF8),
            openmetrics.CONTENT_TYPE_LATEST,
        )
    return text_format.generate_latest(registry), text_format.CONTENT_TYPE_LATEST


def make_metrics_app(registry: CollectorRegistry):
    """A WSGI app serving ``registry`` on /metrics (and /), 404 elsewhere."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: scrape /metrics\n"]
        body, ctype = render_metrics(registry, environ.get("HTTP_ACCEPT", ""))
        headers = [("Content-Type", ctype)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: no access log
        pass


@dataclass
class MetricsServer:
    """A running /metrics server. ``close()`` stops it and releases the port (idempotent)."""

    addr: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # stops serve_forever
        server.server_close()  # releases the port
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Issue 18: idle connections held one thread and fd each, forever, until the process ran out
# of fds. A connection must send its request within the timeout, and past the bound new
# connections are closed at once (counted) instead of getting a thread.
DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 64


def serve_metrics(
    registry: CollectorRegistry,
    port: int = DEFAULT_PORT,
    addr: str = DEFAULT_ADDR,
    *,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> MetricsServer:
    """Start serving ``registry`` on http://addr:port/metrics in a daemon thread."""
    if not read_timeout_s > 0 or max_connections < 1:
        raise ValueError("read_timeout_s must be > 0 and max_connections >= 1")
    slots = threading.BoundedSemaphore(max_connections)

    class Handler(_QuietHandler):
        timeout = read_timeout_s  # socket timeout for every read and write

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        refused_connections = 0

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                type(self).refused_connections += 1
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                slots.release()
                raise

        def handle_error(self, request: Any, client_address: Any) -> None:
            exc = sys.exc_info()[1]
            if isinstance(exc, OSError):  # a timed-out or vanished client: not an error here
                return
            super().handle_error(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    try:
        server = make_server(addr, port, make_metrics_app(registry), Server, handler_class=Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsPortInUseError(
                exc.errno,
                f"cannot serve /metrics on {addr}:{port}: the port is already in use "
                f"(another sidecar or exporter?); choose another port",
            ) from exc
        raise
    thread = threading.Thread(target=server.serve_forever, name="schedscope-metrics", daemon=True)
    thread.start()
    return MetricsServer(addr, server.server_port, server, thread)
