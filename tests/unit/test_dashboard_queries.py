"""The Grafana dashboards: well-formed, valid PromQL (promtool), the chart's ConfigMap generated from them, and the
training dashboard's metrics exported by the operator.

How the chart ships them (behind dashboards.enabled, with the Grafana sidecar label) is tests/unit/test_chart.py; the
check against the serving and drift processes' /metrics is tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from kubeloop import chart, generated
from tests.support import dashboards, tools

REPO = Path(__file__).resolve().parents[2]
BOARDS = dashboards.load()


def test_there_are_serving_drift_and_training_dashboards() -> None:
    assert sorted(BOARDS) == ["kubeloop-drift.json", "kubeloop-serving.json", "kubeloop-training.json"]
    assert len({board["uid"] for board in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_is_well_formed(name: str) -> None:
    board = BOARDS[name]
    assert board["title"].startswith("kubeloop / ") and "kubeloop" in board["tags"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(dashboards.panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert panel["title"] and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            used = set(dashboards._VARIABLE.findall(target["expr"])) - {"$__rate_interval", "$__range"}
            assert {u.strip("${}") for u in used} <= set(variables), (panel["title"], used)


def test_metric_names_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, version) (rate(request_predict_seconds_bucket{model_name=~"a|b"}[5m])'
        ' * on (instance) group_left (version) group by (instance, version) (kubeloop_requests_total{code!~"2.."})))'
        " / ignoring (version) group_left sum(kubeloop_x:rate5m offset 1h) > bool 1e-3 and time() - 5"
    )
    assert dashboards.metric_names(expr) == {
        "request_predict_seconds_bucket",
        "kubeloop_requests_total",
        "kubeloop_x:rate5m",
    }
    assert dashboards.metric_names('sum(rate(foo_total{a="sum(bar)"}[$__rate_interval]))') == {"foo_total"}
    assert dashboards.label_values_metrics('label_values(kubeloop_requests_total{namespace=~"$namespace"}, model)') == {
        "kubeloop_requests_total"
    }
    assert dashboards.label_values_metrics("label_values(namespace)") == set()


def test_exported_names_include_families_without_samples() -> None:
    text = (
        "# TYPE kubeloop_requests_total counter\n"
        "# TYPE kubeloop_operator_reconcile_seconds histogram\n"
        "# TYPE kubeloop_drift_events_dropped counter\n"
        "# TYPE kubeloop_cache_entries gauge\n"
        'python_info{version="3.11"} 1\n'
    )
    assert dashboards.exported_names(text) == {
        "kubeloop_requests_total",
        "kubeloop_operator_reconcile_seconds_bucket",
        "kubeloop_operator_reconcile_seconds_sum",
        "kubeloop_operator_reconcile_seconds_count",
        "kubeloop_drift_events_dropped",
        "kubeloop_drift_events_dropped_total",
        "kubeloop_cache_entries",
        "python_info",
    }


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables substituted) as a recording rule."""
    rules = [
        {"record": f"dashboard:{name.removesuffix('.json').replace('-', '_')}:{i}", "expr": dashboards.substitute(expr)}
        for name, board in BOARDS.items()
        for i, expr in enumerate(dashboards.queries(board))
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run([tools.promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_training_dashboard_uses_what_the_operator_exports() -> None:
    from operators import metrics

    metrics.reconciled("TrainingJob", "ok", 0.02)
    metrics.child("RayJob", "created")
    exported = dashboards.exported_names(metrics.render())
    assert dashboards.dashboard_metrics(BOARDS["kubeloop-training.json"]) <= exported


def test_chart_template_is_generated_from_the_dashboards() -> None:
    assert generated.stale(dashboards.REPO, chart.dashboards_files(dashboards.REPO)) == []


def test_prediction_panels_fit_every_task() -> None:
    """The prediction histogram holds P(positive), the predicted class's probability or a regression model's value:
    no panel on it shows a probability unit or caps its axis at 1. Each of the serving and drift dashboards shows the
    predicted-class shares, from the counter a multiclass model server exports (and the sidecar's twin)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import ServingMetrics

    histograms = ("kubeloop_prediction_", "kubeloop_drift_prediction_")
    for name in ("kubeloop-serving.json", "kubeloop-drift.json"):
        on_histogram, on_classes = [], []
        for panel in dashboards.panels(BOARDS[name]):
            names = set().union(*(dashboards.metric_names(t["expr"]) for t in panel.get("targets", [])))
            if any(n.startswith(histograms) for n in names):
                on_histogram.append(panel)
            if names & {"kubeloop_predicted_class_total", "kubeloop_drift_predicted_class_total"}:
                on_classes.append(panel["title"])
        assert on_histogram and on_classes, name
        for panel in on_histogram:
            defaults = panel["fieldConfig"]["defaults"]
            units = {defaults.get("unit"), panel.get("options", {}).get("yAxis", {}).get("unit")}
            assert "percentunit" not in units and "max" not in defaults, (name, panel["title"])
        assert all("multiclass" in title for title in on_classes), on_classes
    registry = CollectorRegistry()
    ServingMetrics("penguins", 1, [], registry=registry, task="multiclass", classes=("Adelie", "Gentoo"))
    served = dashboards.dashboard_metrics(BOARDS["kubeloop-serving.json"])
    assert "kubeloop_predicted_class_total" in served & dashboards.exported_names(generate_latest(registry).decode())
