"""Metric names and labels for the dashboard and the rules, read from the one metrics table
(telemetry/metrics_table.py) and the exporters' health counters (exporters/stats.py).

``M.<key>`` is the Prometheus name of the table row ``<key>`` (``M.gen_throughput`` ->
``sglang:gen_throughput``), so a renamed metric renames every panel and rule with it, and a
removed one fails the build instead of leaving a silent empty panel.
"""

from __future__ import annotations

from types import SimpleNamespace

from schedscope.exporters.stats import KINDS_HELP
from schedscope.telemetry.metrics_table import COUNTER, ENGINE_LABELS, GAUGE, METRICS, MetricDef

# Exporter health counters (exporters/stats.py): sidecar-wide, labelled exporter and outcome.
EXPORT_METRICS: tuple[MetricDef, ...] = tuple(
    MetricDef(
        key=f"export_{kind}",
        prom_name=f"schedscope_export_{kind}_total",
        otlp_name=None,
        kind=COUNTER,
        unit="1",
        help=help_text,
        labels=("exporter", "outcome"),
        per_engine=False,
    )
    for kind, help_text in KINDS_HELP.items()
)

# The KV relay's own gauges (exporters/kv_relay.py KvRelayCollector), labelled by exporter.
RELAY_METRICS: tuple[MetricDef, ...] = (
    MetricDef(
        key="kv_relay_lag",
        prom_name="schedscope_kv_relay_lag_seconds",
        otlp_name=None,
        kind=GAUGE,
        unit="s",
        help="Seconds the KV-event relay trails the engine.",
        labels=("exporter",),
        per_engine=False,
    ),
    MetricDef(
        key="kv_relay_queued",
        prom_name="schedscope_kv_relay_queued_batches",
        otlp_name=None,
        kind=GAUGE,
        unit="{batch}",
        help="KV batches waiting in the relay's bounded queue.",
        labels=("exporter",),
        per_engine=False,
    ),
)

_ALL = METRICS + EXPORT_METRICS + RELAY_METRICS
M = SimpleNamespace(**{m.key: m.prom_name for m in _ALL})

_BY_PROM_NAME: dict[str, MetricDef] = {m.prom_name: m for m in _ALL}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def definition(prom_name: str) -> MetricDef:
    """The table row of an exposed series name (histogram suffixes allowed)."""
    if prom_name in _BY_PROM_NAME:
        return _BY_PROM_NAME[prom_name]
    for suffix in _HISTOGRAM_SUFFIXES:
        base = prom_name.removesuffix(suffix)
        if base != prom_name and base in _BY_PROM_NAME:
            return _BY_PROM_NAME[base]
    raise KeyError(f"{prom_name!r} is not in telemetry/metrics_table.py")


def labels_of(prom_name: str) -> frozenset[str]:
    """Labels the series of ``prom_name`` carry (without the ``instance``/``job`` of the scrape)."""
    m = definition(prom_name)
    extra = {"le"} if prom_name.endswith("_bucket") else set()
    return frozenset(m.label_names) | extra


def optional(key: str) -> str | None:
    """The name of a metric that may not exist yet (the dashboard leaves its panel out)."""
    return getattr(M, key, None)


__all__ = ["ENGINE_LABELS", "M", "definition", "labels_of", "optional"]
