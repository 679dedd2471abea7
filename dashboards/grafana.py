"""Small builders for Grafana dashboard JSON (schemaVersion 39, Grafana 10.4+/11).

Plain dicts on purpose: the output is what Grafana's import screen takes, with no library in
between. Every query goes to the dashboard's ``$datasource`` variable, whose default is the
``DS_PROMETHEUS`` input chosen at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 39
GRID_WIDTH = 24

# Every panel and target queries the datasource variable, never a hard-coded uid, so the
# dashboard works with whatever Prometheus the user picks at import or later in the picker.
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}

Panel = dict[str, Any]


def target(
    expr: str,
    legend: str = "__auto",
    *,
    exemplar: bool = False,
    fmt: str = "time_series",
    instant: bool = False,
) -> dict[str, Any]:
    """One Prometheus query of a panel (refId is assigned by the panel builder)."""
    t: dict[str, Any] = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "format": fmt,
    }
    if exemplar:
        t["exemplar"] = True
    return t


def _with_ref_ids(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    width: int = 12,
    height: int = 8,
    min_value: float | None = 0,
    max_value: float | None = None,
    stack: bool = False,
    draw: str = "line",
    overrides: list[dict[str, Any]] | None = None,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": draw,
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_ref_ids(targets),
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (width, height),
    }


def heatmap(
    title: str,
    expr: str,
    *,
    unit: str = "s",
    description: str = "",
    width: int = 8,
    height: int = 8,
) -> Panel:
    """A heatmap of histogram buckets: ``expr`` yields one series per ``le``."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_ref_ids([target(expr, "{{le}}", fmt="heatmap", exemplar=True)]),
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "legend": {"show": True},
        },
        "_size": (width, height),
    }


def stat(
    title: str,
    expr: str,
    *,
    unit: str = "short",
    description: str = "",
    width: int = 4,
    height: int = 4,
    decimals: int | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
    mappings: list[dict[str, Any]] | None = None,
) -> Panel:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": mappings or [],
        "color": {"mode": "thresholds"},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_ref_ids([target(expr, "__auto")]),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        "_size": (width, height),
    }


def row(title: str, *, collapsed: bool = False) -> Panel:
    return {"type": "row", "title": title, "collapsed": collapsed, "panels": [], "_size": (24, 1)}


def series_override(series_name: str, properties: dict[str, Any]) -> dict[str, Any]:
    """Field override for the series whose display name is ``series_name``."""
    return {
        "matcher": {"id": "byName", "options": series_name},
        "properties": [{"id": k, "value": v} for k, v in properties.items()],
    }


@dataclass
class Layout:
    """Places panels left to right, wrapping at 24 columns, and numbers them.

    A row panel always starts on a new line and takes the full width.
    """

    panels: list[Panel] = field(default_factory=list)
    _x: int = 0
    _y: int = 0
    _line_height: int = 0

    def add(self, *panels: Panel) -> Layout:
        for panel in panels:
            width, height = panel.pop("_size")
            if panel["type"] == "row" or self._x + width > GRID_WIDTH:
                self._newline()
            panel["gridPos"] = {"h": height, "w": width, "x": self._x, "y": self._y}
            panel["id"] = len(self.panels) + 1
            self.panels.append(panel)
            self._x += width
            self._line_height = max(self._line_height, height)
            if panel["type"] == "row":
                self._newline()
        return self

    def _newline(self) -> None:
        if self._x:
            self._y += self._line_height
        self._x = 0
        self._line_height = 0


def query_variable(
    name: str,
    label: str,
    query: str,
    *,
    description: str = "",
) -> dict[str, Any]:
    """A multi-select ``label_values`` variable with an "All" that matches absent labels too."""
    return {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-query", "qryType": 1},
        "refresh": 2,  # on time-range change: new engines show up without a reload
        "regex": "",
        "sort": 1,
        "multi": True,
        "includeAll": True,
        # ".*" rather than Grafana's value list, so series without the label (dp_rank is only
        # present with data parallelism) still match when "All" is selected.
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "skipUrlSync": False,
    }


def datasource_variable(input_name: str) -> dict[str, Any]:
    """The Prometheus picker; its default is the datasource chosen on the import screen."""
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Prometheus",
        "query": "prometheus",
        "current": {"selected": False, "text": f"${{{input_name}}}", "value": f"${{{input_name}}}"},
        "options": [],
        "refresh": 1,
        "regex": "",
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "skipUrlSync": False,
    }


def prometheus_annotation(
    name: str,
    expr: str,
    *,
    color: str,
    title: str,
    text: str = "",
    enable: bool = True,
) -> dict[str, Any]:
    """An annotation query: every stretch where ``expr`` has a value becomes one region."""
    return {
        "name": name,
        "datasource": DATASOURCE,
        "enable": enable,
        "hide": False,
        "iconColor": color,
        "expr": expr,
        "step": "5s",
        "titleFormat": title,
        "textFormat": text,
        "tagKeys": "engine_id,instance",
        "useValueForTime": False,
    }


def builtin_annotation() -> dict[str, Any]:
    """Grafana's own "Annotations & Alerts" entry (what the UI adds to every dashboard)."""
    return {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
