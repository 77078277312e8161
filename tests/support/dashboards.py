"""What the tests read from the Grafana dashboards (monitoring/dashboards/*.json): every PromQL query of a dashboard
and the metric names in it, checked against what kubeloop's processes really export (`exported_names` of their
/metrics)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubeloop.chart import load_dashboards

REPO = Path(__file__).resolve().parents[2]


def load() -> dict[str, dict[str, Any]]:
    return load_dashboards(REPO)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)


def queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target."""
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", []) if target.get("expr")]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            out.append(query.get("query", "") if isinstance(query, dict) else str(query))
    return out


GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")
_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?")


def substitute(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's range variables become 5m, the others match anything."""
    for name in GRAFANA_RANGES:
        expr = expr.replace(name, "5m")
    return _VARIABLE.sub(".*", expr)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)[a-zA-Z]*)|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
)
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "atan2", "inf", "nan", "start", "end",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        name = match.group("name")
        if name is None or name.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end() :]):  # a function or an aggregation
            continue
        names.add(name)
    return names


def label_values_metrics(query: str) -> set[str]:
    """The metric of a Grafana `label_values(metric{...}, label)` variable query (none for `label_values(label)`)."""
    match = re.match(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{,]", query)
    if match:
        return {match.group(1)}
    match = re.match(r"\s*query_result\((.*)\)\s*$", query, re.S)
    return metric_names(match.group(1)) if match else set()


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for expr in queries(dashboard):
        names |= metric_names(expr)
    for query in variable_queries(dashboard):
        names |= label_values_metrics(query)
    return names


# ---- what a process exports --------------------------------------------------------------------------------------

SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def exported_names(exposition: str) -> set[str]:
    """Every series name an exposition declares (its # TYPE lines, a labelled family exports no sample before its
    first observation) or holds."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) < 4:
                continue
            family, kind = parts[2], parts[3]
            if kind == "counter":
                names |= {family} if family.endswith("_total") else {family, f"{family}_total"}
            else:
                names |= {family + suffix for suffix in SUFFIXES.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
