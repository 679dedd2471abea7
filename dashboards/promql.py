"""Pull every PromQL expression out of the dashboard and the rules, ready to evaluate.

Used by the end-to-end tests (and handy for a one-off check against any Prometheus): Grafana's
template variables are replaced the way Grafana would before sending the query.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from schedscope.dashboards.rules import Alert, Group, Recording

# Metric names the project owns (schedscope's own and the SGLang-compatible ones). The
# lookbehind keeps recording-rule names such as ``engine:schedscope_x:rate1m`` out.
METRIC_RE = re.compile(r"(?<![\w:])(?:sglang:|schedscope[:_])[A-Za-z0-9_:]*")
VARIABLE_RE = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True)
class Expression:
    where: str  # "panel 9 'Generation throughput' A", "alert SchedscopeX", ...
    expr: str
    kind: str  # panel | annotation | variable | recording | alert


def dashboard_expressions(dashboard: Mapping[str, Any]) -> Iterator[Expression]:
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            yield Expression(
                f"panel {panel['id']} {panel['title']!r} {t['refId']}", t["expr"], "panel"
            )
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            yield Expression(f"annotation {ann['name']!r}", ann["expr"], "annotation")
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            yield Expression(f"variable ${var['name']}", var["definition"], "variable")


def rule_expressions(groups: list[Group]) -> Iterator[Expression]:
    for group in groups:
        for rule in group.rules:
            if isinstance(rule, Recording):
                yield Expression(f"record {rule.record}", rule.expr, "recording")
            elif isinstance(rule, Alert):
                yield Expression(f"alert {rule.alert}", rule.expr, "alert")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace ``$var`` / ``${var}`` the way Grafana does; unknown variables are an error."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return VARIABLE_RE.sub(repl, expr)


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


LABEL_VALUES_RE = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def parse_label_values(definition: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` -> (selector, label), as Grafana's variable editor."""
    m = LABEL_VALUES_RE.match(definition.strip())
    if not m:
        raise ValueError(f"not a label_values() query: {definition!r}")
    return m.group("selector"), m.group("label")


def grafana_regex(values: list[str]) -> str:
    """A multi-value selection as Grafana's Prometheus data source writes it into ``=~"$var"``:
    regex metacharacters escaped (and the backslash escaped again for the PromQL string), one
    value as is, several as ``(a|b)``, none as the "All" value ``.*``."""
    if not values:
        return ".*"
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
