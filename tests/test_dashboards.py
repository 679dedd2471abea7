"""The Grafana dashboard and the Prometheus rules without a live Prometheus: generated files
are current, the dashboard has what Grafana's import screen needs, every metric it queries is
in the metrics table, and ``promtool`` accepts the rules and proves each alert fires when it
should and stays quiet when it should not.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from schedscope.dashboards import DASHBOARDS_DIR
from schedscope.dashboards.alerting import rule_groups
from schedscope.dashboards.build import DASHBOARD_FILE, RULES_FILE, main, stale_files
from schedscope.dashboards.grafana import DATASOURCE, GRID_WIDTH
from schedscope.dashboards.names import M, definition
from schedscope.dashboards.promql import (
    dashboard_expressions,
    metric_names,
    parse_label_values,
    rule_expressions,
)
from schedscope.dashboards.rules import Alert

from .conftest import require_binary

DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


# --- generated files ---------------------------------------------------------------------


def test_generated_files_are_current() -> None:
    stale = stale_files()
    assert not stale, f"regenerate with `python -m schedscope.dashboards.build`: {stale}"
    assert main(["--check"]) == 0


def test_files_ship_as_package_data() -> None:
    assert DASHBOARD_FILE.parent == DASHBOARDS_DIR == RULES_FILE.parent
    assert DASHBOARD_FILE.suffix == ".json" and RULES_FILE.suffix == ".yml"


# --- what Grafana's import screen needs ---------------------------------------------------


def test_import_inputs_and_requires() -> None:
    (inp,) = DASHBOARD["__inputs"]
    assert inp["type"] == "datasource" and inp["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in DASHBOARD["__requires"]}
    used = {("panel", p["type"]) for p in DASHBOARD["panels"] if p["type"] != "row"}
    assert used <= required
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required
    assert DASHBOARD["schemaVersion"] >= 39
    assert DASHBOARD["id"] is None  # import assigns one
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", DASHBOARD["uid"])


def test_datasource_variable_defaults_to_the_import_input() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == "${" + DASHBOARD["__inputs"][0]["name"] + "}"
    for name in ("model_name", "instance", "engine_id", "dp_rank"):
        var = variables[name]
        assert var["datasource"] == DATASOURCE and var["includeAll"] and var["allValue"] == ".*"
        parse_label_values(var["definition"])


def test_every_query_uses_the_datasource_variable() -> None:
    for panel in DASHBOARD["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE
    for ann in DASHBOARD["annotations"]["list"]:
        if "expr" in ann:
            assert ann["datasource"] == DATASOURCE


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in DASHBOARD["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= GRID_WIDTH
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_required_panels_are_there() -> None:
    titles = " | ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for needle in (
        "generation throughput",
        "running and queued",
        "token usage",
        "cache hit rate",
        "time to first token",
        "inter-token latency",
        "end-to-end request latency",
        "heatmap",
        "forward iterations",
        "idle fraction",
        "kv blocks stored / removed",
        "lost and dropped",
        "bad frames",
        "forward_iter anomalies",
        "memory checks",
    ):
        assert needle in titles, needle
    heatmaps = [p for p in DASHBOARD["panels"] if p["type"] == "heatmap"]
    assert len(heatmaps) == 3 and all(p["targets"][0]["format"] == "heatmap" for p in heatmaps)
    exemplar_panels = {
        p["title"] for p in DASHBOARD["panels"] for t in p.get("targets", []) if t.get("exemplar")
    }
    assert {
        "Time to first token",
        "Inter-token latency",
        "End-to-end request latency",
    } <= exemplar_panels


def test_pause_spans_are_annotated_on_the_throughput_panel() -> None:
    anns = {a["name"]: a for a in DASHBOARD["annotations"]["list"]}
    pause = anns["Pause spans"]
    assert pause["enable"] and M.paused in pause["expr"]
    (panel,) = [p for p in DASHBOARD["panels"] if p["title"].startswith("Generation throughput (")]
    exprs = [t["expr"] for t in panel["targets"]]
    assert any(M.gen_throughput in e for e in exprs)
    assert any(M.paused in e for e in exprs)  # shaded on the panel itself too


# --- metric names: one source of truth ---------------------------------------------------


def test_every_queried_metric_is_in_the_metrics_table() -> None:
    exprs = [*dashboard_expressions(DASHBOARD), *rule_expressions(rule_groups())]
    for e in exprs:
        names = metric_names(e.expr)
        assert names or e.kind == "variable", e
        for name in names:
            definition(name)  # KeyError names the culprit


def test_label_matchers_only_use_labels_the_metric_has() -> None:
    """A matcher on a label a series lacks still matches "All" (.*), but hides the series as
    soon as a value is picked: so filter sidecar-wide metrics on instance only."""
    from schedscope.dashboards.names import labels_of

    sel = re.compile(r"((?:sglang|schedscope)[:_][\w:]*)\{([^}]*)\}")
    for e in dashboard_expressions(DASHBOARD):
        for metric, matchers in sel.findall(e.expr):
            used = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert used <= labels_of(metric) | {"instance"}, (e.where, metric, used)


# --- the rules -----------------------------------------------------------------------------


def test_alerts_have_severity_summary_description_runbook() -> None:
    alerts = [r for g in rule_groups() for r in g.rules if isinstance(r, Alert)]
    names = {a.alert for a in alerts}
    assert {
        "SchedscopeThroughputStalled",
        "SchedscopeTelemetryLosingEvents",
        "SchedscopeMemoryLeakDetected",
        "SchedscopeKvRelayLagging",
        "SchedscopeEngineHeartbeatMissing",
        "SchedscopeQueueGrowingWhileIdleCapable",
    } <= names
    for a in alerts:
        assert a.severity in ("warning", "critical")
        assert re.fullmatch(r"\d+[smh]", a.for_)
        assert a.summary and a.description and a.runbook


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    out = subprocess.run(
        [promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    n = sum(len(g.rules) for g in rule_groups())
    assert f"SUCCESS: {n} rules found" in out.stdout


# --- promtool unit tests: each alert fires on its condition, and not on its lookalike -------

ENGINE = {"instance": "sidecar:9464", "model_name": "tiny", "engine_id": "e1"}


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    lbl = ", ".join(f'{k}="{v}"' for k, v in {**ENGINE, **labels}.items())
    return {"series": f"{metric}{{{lbl}}}", "values": values}


def _sidecar_series(metric: str, values: str, **labels: str) -> dict[str, str]:
    """A sidecar-wide series: no engine labels, only the scrape's instance."""
    lbl = ", ".join(f'{k}="{v}"' for k, v in {"instance": ENGINE["instance"], **labels}.items())
    return {"series": f"{metric}{{{lbl}}}", "values": values}


def _expand(template: str, labels: dict[str, str], value: float) -> str:
    """Prometheus' alert templating, for the only forms the rules use."""
    out = template.replace("{{ $value | humanize }}", f"{value:.4g}")
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), out)


def _expect(alert: str, labels: dict[str, str], value: float) -> dict[str, Any]:
    (rule,) = [
        r for g in rule_groups() for r in g.rules if isinstance(r, Alert) and r.alert == alert
    ]
    return {
        "exp_labels": {"severity": rule.severity, **labels},
        "exp_annotations": {
            "summary": _expand(rule.summary, labels, value),
            "description": _expand(rule.description, labels, value),
            "runbook": _expand(rule.runbook, labels, value),
        },
    }


def _healthy_engine(**overrides: str) -> list[dict[str, str]]:
    base = {
        M.num_running_reqs: "2x40",
        M.num_queue_reqs: "0x40",
        M.token_usage: "0.3x40",
        M.paused: "0x40",
        M.events: "0+100x40",
        M.forward_iterations: "0+50x40",
    }
    base.update(overrides)
    return [
        _series(m, v, mode="decode") if m == M.forward_iterations else _series(m, v)
        for m, v in base.items()
    ]


def _unit_tests() -> list[dict[str, Any]]:
    def case(
        name: str, series: list[dict[str, str]], alert: str, at: str, exp: list[Any]
    ) -> dict[str, Any]:
        return {
            "name": name,
            "interval": "15s",
            "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": exp}],
        }

    stalled = {M.forward_iterations: "100x40"}
    sidecar = {"instance": ENGINE["instance"]}
    return [
        case(
            "healthy engine: no stall", _healthy_engine(), "SchedscopeThroughputStalled", "8m", []
        ),
        case(
            "work but no batches: stalled",
            _healthy_engine(**stalled),
            "SchedscopeThroughputStalled",
            "5m",
            [_expect("SchedscopeThroughputStalled", ENGINE, 1)],
        ),
        case(
            "no batches while paused: not a stall",
            _healthy_engine(**stalled, **{M.paused: "1x40"}),
            "SchedscopeThroughputStalled",
            "8m",
            [],
        ),
        case(
            "seq gaps: losing events",
            [*_healthy_engine(), _series(M.lost_messages, "0 0 0 5x37")],
            "SchedscopeTelemetryLosingEvents",
            "2m",
            [_expect("SchedscopeTelemetryLosingEvents", ENGINE, 5)],
        ),
        case(
            "sidecar queue drops: losing events",
            [
                *_healthy_engine(),
                _sidecar_series(M.sidecar_queue_dropped_events, "0 0 0 7x37"),
            ],
            "SchedscopeTelemetryLosingEvents",
            "2m",
            [_expect("SchedscopeTelemetryLosingEvents", sidecar, 7)],
        ),
        case(
            "bad frames",
            [_sidecar_series(M.ingest_bad_frames, "0 0 2x38", kind="malformed")],
            "SchedscopeBadFrames",
            "1m",
            [_expect("SchedscopeBadFrames", sidecar, 2)],
        ),
        case(
            "memory check found a leak",
            [
                *_healthy_engine(),
                _series(M.memory_checks, "0 0 1x38", result="leak"),
            ],
            "SchedscopeMemoryLeakDetected",
            "1m",
            [_expect("SchedscopeMemoryLeakDetected", ENGINE, 1)],
        ),
        case(
            "a new engine's first scrape already counts a leak",
            [*_healthy_engine(), _series(M.memory_checks, "1x40", result="leak")],
            "SchedscopeMemoryLeakDetected",
            "2m",
            [_expect("SchedscopeMemoryLeakDetected", ENGINE, 1)],
        ),
        case(
            "memory checks ok: no leak",
            [
                *_healthy_engine(),
                _series(M.memory_checks, "0+1x40", result="ok"),
                _series(M.memory_leaked_slots, "0x40"),
            ],
            "SchedscopeMemoryLeakDetected",
            "5m",
            [],
        ),
        case(
            "kv relay drops batches",
            [
                _sidecar_series(
                    M.export_kv_batches, "0 0 0+3x38", exporter="kv_relay", outcome="dropped"
                )
            ],
            "SchedscopeKvRelayLagging",
            "3m",
            [_expect("SchedscopeKvRelayLagging", {**sidecar, "exporter": "kv_relay"}, 0)],
        ),
        case(
            "kv relay more than 1 s behind",
            [_sidecar_series(M.kv_relay_lag, "0.01x5 3x34", exporter="kv_relay")],
            "SchedscopeKvRelayLagging",
            "4m",
            [_expect("SchedscopeKvRelayLagging", {**sidecar, "exporter": "kv_relay"}, 3)],
        ),
        case(
            "kv relay a few ms behind: no alert",
            [_sidecar_series(M.kv_relay_lag, "0.02x39", exporter="kv_relay")],
            "SchedscopeKvRelayLagging",
            "4m",
            [],
        ),
        case(
            "engine silent: heartbeat missing",
            _healthy_engine(**{M.events: "0+100x8 900x31"}),
            "SchedscopeEngineHeartbeatMissing",
            "6m",
            [_expect("SchedscopeEngineHeartbeatMissing", ENGINE, 0)],
        ),
        case(
            "engine shut down cleanly (gauges zeroed) and silent: no alert",
            _healthy_engine(
                **{
                    M.events: "0+100x8 900x31",
                    M.num_running_reqs: "2x8 0x31",
                    M.idle: "0x40",
                }
            ),
            "SchedscopeEngineHeartbeatMissing",
            "6m",
            [],
        ),
        case(
            "idle engine gone silent (crash without Shutdown): alert",
            _healthy_engine(
                **{
                    M.events: "0+100x8 900x31",
                    M.num_running_reqs: "0x40",
                    M.idle: "1x40",
                }
            ),
            "SchedscopeEngineHeartbeatMissing",
            "6m",
            [_expect("SchedscopeEngineHeartbeatMissing", ENGINE, 0)],
        ),
        case(
            "engine heartbeats: no alert",
            _healthy_engine(),
            "SchedscopeEngineHeartbeatMissing",
            "6m",
            [],
        ),
        case(
            "queue grows with free KV: alert",
            _healthy_engine(**{M.num_queue_reqs: "0+1x40"}),
            "SchedscopeQueueGrowingWhileIdleCapable",
            "8m",
            [_expect("SchedscopeQueueGrowingWhileIdleCapable", ENGINE, 1)],
        ),
        case(
            "queue grows with KV full: saturation, not this alert",
            _healthy_engine(**{M.num_queue_reqs: "0+1x40", M.token_usage: "0.95x40"}),
            "SchedscopeQueueGrowingWhileIdleCapable",
            "8m",
            [],
        ),
    ]


def test_promtool_unit_tests_for_every_alert(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    tests = _unit_tests()
    covered = {
        c["alert_rule_test"][0]["alertname"] for c in tests if c["alert_rule_test"][0]["exp_alerts"]
    }
    alerts = {r.alert for g in rule_groups() for r in g.rules if isinstance(r, Alert)}
    assert covered == alerts, f"alerts without a firing unit test: {alerts - covered}"
    spec = {"rule_files": [str(RULES_FILE)], "evaluation_interval": "15s", "tests": tests}
    path = tmp_path / "rules_test.yml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    out = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
