"""The schedscope Grafana dashboard, as code.

Every query filters on the dashboard variables through ``q(metric)``, which adds only the
matchers for labels the metric carries (a sidecar-wide counter such as bad frames has no
model_name, so filtering it by model would hide it).
"""

from __future__ import annotations

from typing import Any

from schedscope.dashboards import grafana as g
from schedscope.dashboards.names import M, labels_of, optional

UID = "schedscope-overview"
TITLE = "schedscope / LLM scheduler"
INPUT_PROMETHEUS = "DS_PROMETHEUS"

# Dashboard variable -> label it filters. Order = order in the variable bar.
VARIABLES: dict[str, str] = {
    "model_name": "model_name",
    "instance": "instance",
    "engine_id": "engine_id",
    "dp_rank": "dp_rank",
}


def q(metric: str, extra: str = "") -> str:
    """``metric{<variable matchers>, extra}`` for the labels ``metric`` actually has."""
    labels = labels_of(metric) | {"instance"}  # Prometheus adds instance to every series
    matchers = [f'{label}=~"${var}"' for var, label in VARIABLES.items() if label in labels]
    if extra:
        matchers.append(extra)
    return f"{metric}{{{', '.join(matchers)}}}"


RI = "$__rate_interval"
LEAK = 'result="leak"'
BY_ENGINE = "by (engine_id)"


def rate(metric: str, by: str = BY_ENGINE, extra: str = "") -> str:
    return f"sum {by} (rate({q(metric, extra)}[{RI}]))"


def quantile_targets(hist: str) -> list[dict[str, Any]]:
    """p50/p90/p99 and the mean of a histogram; exemplars on (they link to the trace)."""
    bucket = f"{hist}_bucket"
    targets = [
        g.target(
            f"histogram_quantile({p}, sum by (le) (rate({q(bucket)}[{RI}])))",
            f"p{int(p * 100)}",
            exemplar=p == 0.99,
        )
        for p in (0.5, 0.9, 0.99)
    ]
    targets.append(
        g.target(
            f"sum(rate({q(hist + '_sum')}[{RI}])) / (sum(rate({q(hist + '_count')}[{RI}])) > 0)",
            "mean",
        )
    )
    return targets


def heat(hist: str, title: str, description: str) -> g.Panel:
    return g.heatmap(
        title,
        f"sum by (le) (increase({q(hist + '_bucket')}[{RI}]))",
        description=description,
    )


def _overview() -> list[g.Panel]:
    leaks = q(M.memory_checks, LEAK)  # a new engine's counter may be born at 1: count it
    return [
        g.row("Overview"),
        g.stat(
            "Generation throughput",
            f"sum({q(M.gen_throughput)})",
            unit="tokens/s",
            description="Sum of sglang:gen_throughput over the selected engines (0 while paused).",
        ),
        g.stat("Running requests", f"sum({q(M.num_running_reqs)})"),
        g.stat(
            "Queued requests",
            f"sum({q(M.num_queue_reqs)})",
            thresholds=[(None, "green"), (1, "yellow"), (50, "red")],
        ),
        g.stat(
            "KV token usage",
            f"max({q(M.token_usage)})",
            unit="percentunit",
            decimals=1,
            thresholds=[(None, "green"), (0.9, "orange"), (0.98, "red")],
        ),
        g.stat(
            "Paused engines",
            f"sum({q(M.paused)})",
            description="Engines inside a pause span (pause_generation).",
            thresholds=[(None, "green"), (1, "blue")],
        ),
        g.stat(
            "Memory-check failures (range)",
            f"sum(({leaks} unless {leaks} offset $__range) or increase({leaks}[$__range]))"
            " or vector(0)",
            description="Idle-time memory checks that found leaked KV slots or request-table entries.",
            thresholds=[(None, "green"), (1, "red")],
            decimals=0,
        ),
    ]


def _throughput() -> list[g.Panel]:
    paused_overlay = g.series_override(
        "paused",
        {
            "custom.axisPlacement": "right",
            "custom.drawStyle": "line",
            "custom.lineInterpolation": "stepAfter",
            "custom.fillOpacity": 25,
            "unit": "bool_yes_no",
            "max": 1,
            "color": {"mode": "fixed", "fixedColor": "blue"},
        },
    )
    paused_overlay["matcher"] = {"id": "byRegexp", "options": "^paused.*"}
    return [
        g.row("Throughput"),
        g.timeseries(
            "Generation throughput (pauses shaded)",
            [
                g.target(f"sum {BY_ENGINE} ({q(M.gen_throughput)})", "{{engine_id}}"),
                g.target(f"max {BY_ENGINE} ({q(M.paused)})", "paused {{engine_id}}"),
            ],
            unit="tokens/s",
            description=(
                "sglang:gen_throughput per engine. Pause spans are shaded (right axis) and shown "
                "as annotations: a drop to 0 inside a pause is the pause, not an outage."
            ),
            overrides=[paused_overlay],
        ),
        g.timeseries(
            "Token throughput (counters)",
            [
                g.target(rate(M.generation_tokens), "generated {{engine_id}}"),
                g.target(rate(M.prompt_tokens), "prompt {{engine_id}}"),
            ],
            unit="tokens/s",
            description="Windowed rates of the prompt/generation token counters (finished requests).",
        ),
        g.timeseries(
            "Forward iterations / s",
            [
                g.target(
                    rate(M.forward_iterations, "by (engine_id, mode)"), "{{mode}} {{engine_id}}"
                )
            ],
            unit="ops",
            description="Batches completed per second, by batch mode (prefill / decode / mixed).",
            stack=True,
        ),
        g.timeseries(
            "Idle fraction",
            [g.target(rate(M.idle_seconds), "{{engine_id}}")],
            unit="percentunit",
            max_value=1,
            description=(
                "Share of wall time the engine was fully idle (no running batch, no waiting "
                "request, nothing staged): rate of sglang:scheduler_idle_seconds_total."
            ),
        ),
    ]


def _scheduler() -> list[g.Panel]:
    return [
        g.row("Scheduler state"),
        g.timeseries(
            "Running and queued requests",
            [
                g.target(f"sum {BY_ENGINE} ({q(M.num_running_reqs)})", "running {{engine_id}}"),
                g.target(f"sum {BY_ENGINE} ({q(M.num_queue_reqs)})", "queued {{engine_id}}"),
            ],
            width=6,
        ),
        g.timeseries(
            "KV token usage",
            [g.target(f"max {BY_ENGINE} ({q(M.token_usage)})", "{{engine_id}}")],
            unit="percentunit",
            max_value=1,
            width=6,
        ),
        g.timeseries(
            "Prefix cache hit rate",
            [g.target(f"avg {BY_ENGINE} ({q(M.cache_hit_rate)})", "{{engine_id}}")],
            unit="percentunit",
            max_value=1,
            width=6,
            description="sglang:cache_hit_rate as of the last prefill batch.",
        ),
        g.timeseries(
            "Finished requests / s by reason",
            [g.target(rate(M.requests_by_reason, "by (finish_reason)"), "{{finish_reason}}")],
            unit="reqps",
            width=6,
            stack=True,
        ),
    ]


def _latency() -> list[g.Panel]:
    specs = [
        (M.ttft, "Time to first token"),
        (M.itl, "Inter-token latency"),
        (M.e2e, "End-to-end request latency"),
    ]
    panels: list[g.Panel] = [g.row("Latency")]
    for hist, title in specs:
        panels.append(
            g.timeseries(
                title,
                quantile_targets(hist),
                unit="s",
                width=8,
                description=f"{hist}: p50/p90/p99 and mean. Exemplars link to the request trace.",
            )
        )
    for hist, title in specs:
        panels.append(heat(hist, f"{title} heatmap", f"Bucket counts of {hist} per interval."))
    return panels


def _kv() -> list[g.Panel]:
    panels = [
        g.row("KV cache events"),
        g.timeseries(
            "KV blocks stored / removed per second",
            [
                g.target(rate(M.kv_blocks_stored), "stored {{engine_id}}"),
                g.target(rate(M.kv_blocks_removed), "removed {{engine_id}}"),
            ],
            unit="ops",
            width=8,
            description="BlockStored / BlockRemoved hashes in the engine's KV events.",
        ),
        g.timeseries(
            "KV cached blocks",
            [g.target(f"sum {BY_ENGINE} ({q(M.kv_cached_blocks)})", "{{engine_id}}")],
            width=8,
            description="Blocks the engine's prefix cache holds, per its KV events.",
        ),
        g.timeseries(
            "KV batches to consumers, by flush trigger",
            [g.target(rate(M.kv_batches, "by (trigger)"), "{{trigger}}")],
            unit="ops",
            width=8,
            stack=True,
            description=(
                "KV batches handed to the relay and files. idle / pause: flushed at once when "
                "an idle or pause span opened; count / window: normal coalescing."
            ),
        ),
    ]
    lag = optional("kv_relay_lag")
    panels.append(
        g.timeseries(
            "KV relay: batches by outcome",
            [
                g.target(
                    rate(M.export_kv_batches, "by (exporter, outcome)"), "{{exporter}} {{outcome}}"
                )
            ],
            unit="ops",
            width=24 if lag is None else 12,
            description=(
                "What the KV-event relay did with the batches (sent to subscribers, dropped by its "
                "bounded queue, replayed on request). Drops mean routers fall behind."
            ),
        )
    )
    if lag is not None:
        panels.append(
            g.timeseries(
                "KV relay lag",
                [g.target(f"max by (instance, exporter) ({q(lag)})", "{{instance}} {{exporter}}")],
                unit="s",
                width=12,
                description=(
                    "How far the KV-event relay to routers trails the engine: the age of the "
                    "oldest batch still queued, else the last batch's delay. Milliseconds normally."
                ),
            )
        )
    return panels


def _health() -> list[g.Panel]:
    return [
        g.row("Telemetry health"),
        g.timeseries(
            "Lost and dropped",
            [
                g.target(rate(M.lost_messages), "lost messages {{engine_id}}"),
                g.target(rate(M.engine_dropped_events), "dropped by emitter {{engine_id}}"),
                g.target(
                    rate(M.sidecar_queue_dropped_events, "by (instance)"),
                    "dropped by sidecar queue",
                ),
                g.target(rate(M.ingest_rejected_events, "by (instance)"), "rejected events"),
            ],
            unit="ops",
            width=8,
            description="Seq gaps seen by the sidecar and events dropped on the way (never silent).",
        ),
        g.timeseries(
            "Bad frames",
            [g.target(rate(M.ingest_bad_frames, "by (kind)"), "{{kind}}")],
            unit="ops",
            width=8,
            description="Frames ingest could not use: malformed, oversized, other schema version.",
        ),
        g.timeseries(
            "forward_iter anomalies",
            [g.target(rate(M.forward_iter_anomalies, "by (engine_id, kind)"), "{{kind}}")],
            unit="ops",
            width=8,
            description="Duplicate, backwards or unexplained-gap forward_iter values (seed 002).",
        ),
        g.timeseries(
            "Memory checks",
            [
                g.target(
                    f"sum by (engine_id, result) (increase({q(M.memory_checks)}[{RI}]))",
                    "{{result}} {{engine_id}}",
                ),
                g.target(
                    f"max {BY_ENGINE} ({q(M.memory_leaked_slots)})", "leaked slots {{engine_id}}"
                ),
            ],
            draw="bars",
            width=8,
            description=(
                "Idle-time memory checks by result; leaked slots = pool - free - cached - in use."
            ),
        ),
        g.timeseries(
            "Spans ended by the sidecar",
            [
                g.target(rate(M.spans_force_ended, "by (span, reason)"), "{{span}} {{reason}}"),
                g.target(rate(M.requests_evicted), "requests evicted {{engine_id}}"),
            ],
            unit="ops",
            width=8,
            description="Open spans closed by timeout / restart / shutdown, and evicted requests.",
        ),
        g.timeseries(
            "Exporters: spans and metric exports by outcome",
            [
                g.target(
                    rate(M.export_spans, "by (exporter, outcome)"), "spans {{exporter}} {{outcome}}"
                ),
                g.target(
                    rate(M.export_metric_exports, "by (exporter, outcome)"),
                    "metric exports {{exporter}} {{outcome}}",
                ),
            ],
            unit="ops",
            width=8,
            description="OTLP / file exporters: exported vs failed vs dropped (a backend down shows here).",
        ),
    ]


def _variables() -> list[dict[str, Any]]:
    variables = [g.datasource_variable(INPUT_PROMETHEUS)]
    anchor = M.num_running_reqs
    filters: list[str] = []
    for var, label in VARIABLES.items():
        selector = f"{anchor}{{{', '.join(filters)}}}" if filters else anchor
        variables.append(
            g.query_variable(var, label.replace("_", " "), f"label_values({selector}, {label})")
        )
        filters.append(f'{label}=~"${var}"')
    return variables


def _annotations() -> list[dict[str, Any]]:
    engine_sel = ", ".join(f'{lbl}=~"${var}"' for var, lbl in VARIABLES.items() if lbl != "dp_rank")
    return [
        g.builtin_annotation(),
        g.prometheus_annotation(
            "Pause spans",
            f"max by (engine_id, instance) ({M.paused}{{{engine_sel}}}) > 0",
            color="blue",
            title="paused",
            text="engine {{engine_id}} paused (pause_generation)",
        ),
        g.prometheus_annotation(
            "Idle spans",
            f"max by (engine_id, instance) ({M.idle}{{{engine_sel}}}) > 0",
            color="green",
            title="idle",
            text="engine {{engine_id}} fully idle",
            enable=False,
        ),
    ]


def requires() -> list[dict[str, str]]:
    return [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        {"type": "panel", "id": "heatmap", "name": "Heatmap", "version": ""},
        {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
        {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
    ]


def build_dashboard() -> dict[str, Any]:
    layout = g.Layout()
    for section in (_overview, _throughput, _scheduler, _latency, _kv, _health):
        layout.add(*section())
    return {
        "__inputs": [
            {
                "name": INPUT_PROMETHEUS,
                "label": "Prometheus",
                "description": "The Prometheus that scrapes the schedscope sidecar's /metrics.",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__elements": {},
        "__requires": requires(),
        "annotations": {"list": _annotations()},
        "description": (
            "What the GPU scheduler does, step by step: throughput with pause spans, queues, "
            "KV cache, latency with exemplars, idle time, and the telemetry's own health. "
            "Metric names are SGLang's where the meaning matches."
        ),
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": layout.panels,
        "refresh": "10s",
        "schemaVersion": g.SCHEMA_VERSION,
        "tags": ["schedscope", "sglang", "llm-serving"],
        "templating": {"list": _variables()},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }
