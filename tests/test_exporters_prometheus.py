"""/metrics: OpenMetrics with exemplars when the scraper asks, plain text otherwise."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from schedscope.exporters.prometheus import MetricsPortInUseError, serve_metrics
from schedscope.exporters.stats import ExportStats, ExportStatsCollector

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def test_metrics_served_as_openmetrics_with_exemplars_and_export_health() -> None:
    registry = CollectorRegistry()
    ttft = Histogram(
        "sglang:time_to_first_token_seconds",
        "TTFT",
        ["model_name"],
        buckets=(0.01, 0.1, 1.0),
        registry=registry,
    )
    ttft.labels("tiny").observe(0.05, exemplar={"trace_id": TRACE_ID})
    Gauge("sglang:gen_throughput", "tok/s", ["model_name"], registry=registry).labels("tiny").set(0)
    stats = ExportStats()
    stats.add("spans", "otlp_grpc", "dropped", 3)
    registry.register(ExportStatsCollector(stats))

    with serve_metrics(registry, port=0) as server:
        assert server.addr == "127.0.0.1"  # loopback by default
        ctype, body = scrape(server.url, OPENMETRICS)
        assert ctype.startswith("application/openmetrics-text")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        buckets = [
            s
            for s in families["sglang:time_to_first_token_seconds"].samples
            if s.name.endswith("_bucket")
        ]
        exemplars = [s.exemplar for s in buckets if s.exemplar is not None]
        assert all(
            s.name.startswith("sglang:") for s in buckets
        )  # the name SGLang's dashboards query
        assert (
            exemplars
            and exemplars[0].labels == {"trace_id": TRACE_ID}
            and exemplars[0].value == 0.05
        )
        drops = families["schedscope_export_spans"].samples
        assert any(
            s.labels == {"exporter": "otlp_grpc", "outcome": "dropped"} and s.value == 3
            for s in drops
        )

        ctype, body = scrape(server.url)  # no Accept: the classic text format
        assert ctype.startswith("text/plain")
        assert 'sglang:gen_throughput{model_name="tiny"} 0.0' in body

        with pytest.raises(MetricsPortInUseError, match="already in use"):
            serve_metrics(registry, port=server.port)
        url = server.url
    with pytest.raises(urllib.error.URLError):  # closed cleanly: the port is released
        scrape(url)
    serve_metrics(registry, port=server.port).close()
