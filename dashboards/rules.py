"""Prometheus rule groups as plain data, and the YAML text of a rules file.

The YAML is written by hand (a rules file needs only maps, lists and strings) so the package
does not depend on a YAML library: strings go out as JSON strings, which are valid YAML
double-quoted scalars, and PromQL expressions as literal blocks so they read as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    runbook: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    name: str
    rules: list[Recording | Alert]
    interval: str | None = None


def _scalar(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _block(value: str, indent: str) -> str:
    """A literal block scalar (``|-``): PromQL and runbooks keep their line breaks."""
    lines = value.strip("\n").splitlines()
    return "|-\n" + "\n".join(f"{indent}{line}" if line else "" for line in lines)


def _value(value: str, indent: str) -> str:
    return _block(value, indent) if "\n" in value else _scalar(value)


def rules_yaml(groups: list[Group], header: str = "") -> str:
    out: list[str] = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    out.append("groups:")
    for group in groups:
        out.append(f"  - name: {_scalar(group.name)}")
        if group.interval:
            out.append(f"    interval: {group.interval}")
        out.append("    rules:")
        for rule in group.rules:
            if isinstance(rule, Recording):
                out.append(f"      - record: {rule.record}")
                out.append(f"        expr: {_value(rule.expr, ' ' * 10)}")
                continue
            out.append(f"      - alert: {rule.alert}")
            out.append(f"        expr: {_value(rule.expr, ' ' * 10)}")
            out.append(f"        for: {rule.for_}")
            out.append("        labels:")
            for key, val in {"severity": rule.severity, **rule.labels}.items():
                out.append(f"          {key}: {_scalar(val)}")
            out.append("        annotations:")
            out.append(f"          summary: {_scalar(rule.summary)}")
            out.append(f"          description: {_value(rule.description, ' ' * 12)}")
            out.append(f"          runbook: {_value(rule.runbook, ' ' * 12)}")
    return "\n".join(out) + "\n"


def all_expressions(groups: list[Group]) -> list[tuple[str, str]]:
    """(rule name, expr) for every rule: what the tests evaluate against Prometheus."""
    return [
        (r.record if isinstance(r, Recording) else r.alert, r.expr) for g in groups for r in g.rules
    ]
