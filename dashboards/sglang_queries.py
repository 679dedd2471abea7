"""The PromQL of SGLang's own Grafana dashboards (examples/monitoring in sgl-project/sglang),
as read in /work/shared/METRICS-FACTS.md §6.1. The end-to-end test evaluates each against a
live Prometheus scraping schedscope, to back the README's compatibility table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SglangQuery:
    dashboard: str  # sglang-dashboard.json / training-capture-dashboard.json
    panel: str
    expr: str


def _quantiles(metric: str) -> list[str]:
    return [
        f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket[$__rate_interval])))"
        for p in (0.99, 0.9, 0.5)
    ] + [f"avg(rate({metric}_sum[$__rate_interval]) / rate({metric}_count[$__rate_interval]))"]


_MAIN = "sglang-dashboard.json"
_TRAINING = "training-capture-dashboard.json"

SGLANG_QUERIES: tuple[SglangQuery, ...] = (
    *(
        SglangQuery(_MAIN, "End-to-End Request Latency", e)
        for e in _quantiles("sglang:e2e_request_latency_seconds")
    ),
    SglangQuery(
        _MAIN,
        "End-to-End Request Latency(s) Heatmap",
        'sum(increase(sglang:e2e_request_latency_seconds_bucket{model_name=~"$model_name"}'
        "[$__rate_interval])) by (le)",
    ),
    *(
        SglangQuery(_MAIN, "Time-To-First-Token Latency", e)
        for e in _quantiles("sglang:time_to_first_token_seconds")
    ),
    SglangQuery(
        _MAIN,
        "Time-To-First-Token Seconds Heatmap",
        'sum by(le) (increase(sglang:time_to_first_token_seconds_bucket{model_name=~"$model_name"}'
        "[$__rate_interval]))",
    ),
    SglangQuery(_MAIN, "Num Running Requests", "sglang:num_running_reqs"),
    SglangQuery(_MAIN, "Token Generation Throughput (Tokens / S)", "sglang:gen_throughput"),
    SglangQuery(_MAIN, "Cache Hit Rate", "sglang:cache_hit_rate"),
    SglangQuery(_MAIN, "Number Queued Requests", "sglang:num_queue_reqs"),
    SglangQuery(_MAIN, "variable $instance", "label_values(instance)"),
    SglangQuery(_MAIN, "variable $model_name", "label_values(model_name)"),
    SglangQuery(
        _TRAINING,
        "Serving p99 TTFT and Inter-token Latency",
        "histogram_quantile(0.99, sum by (le,instance,is_streaming) (rate("
        'sglang:time_to_first_token_seconds_bucket{model_name=~"$model_name",'
        'instance=~"$instance"}[$__rate_interval])))',
    ),
    SglangQuery(
        _TRAINING,
        "Serving p99 TTFT and Inter-token Latency",
        "histogram_quantile(0.99, sum by (le,instance) (rate("
        'sglang:inter_token_latency_seconds_bucket{model_name=~"$model_name",'
        'instance=~"$instance"}[$__rate_interval])))',
    ),
)
