"""operators.outcomes.tick: status.outcomes per served version (stable, canary, shadow) from the signals, rounded,
written only when it changed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kubeloop.analysis.signals import Outcomes, PrometheusSource, Queries, SignalError
from kubeloop.api.modeldeployment import ModelDeploymentStatus
from operators import canary, outcomes
from operators.settings import Settings
from tests.support.fake_kube import FakeKube

ESTIMATE = {"value": 0.81234, "low": 0.79, "high": 0.83}


class Source:
    def __init__(self) -> None:
        self.by_version: dict[int, Outcomes] = {}
        self.down = False

    def outcomes(self, model: str, version: int, namespace: str = "") -> Outcomes:
        if self.down:
            raise SignalError("Prometheus at http://prometheus:9090: connection refused")
        assert (model, namespace) == ("arrests", "ns")
        return self.by_version.get(version, Outcomes())


def cluster(**spec: Any) -> FakeKube:
    kube = FakeKube()
    kube.put({
        "apiVersion": "kubeloop.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "arrests", "namespace": "ns"},
        "spec": {"model": "arrests", "version": 1, **spec},
    })  # fmt: skip
    return kube


def tick(kube: FakeKube, source: Source | None) -> bool:
    return outcomes.tick(kube.find("ModelDeployment", "arrests", "ns"), kube, source)


def test_each_served_version_gets_its_live_metrics_and_estimates() -> None:
    kube = cluster(canary={"version": 2, "trafficPercent": 10}, shadow={"version": 3})
    source = Source()
    source.by_version = {
        1: Outcomes({"rows": 412.0, "rocAuc": 0.81234567, "accuracy": 0.75}, {"rocAuc": ESTIMATE}),
        2: Outcomes({"rows": 37.0, "rocAuc": 0.7}),
        3: Outcomes({}, {"accuracy": {"value": 0.7, "low": 0.6, "high": 0.8}}),  # no labels yet: the estimate
    }
    assert tick(kube, source)
    written = kube.find("ModelDeployment", "arrests", "ns")["status"]["outcomes"]
    assert written == [
        {"version": 1, "labelled": 412, "live": {"rocAuc": 0.812, "accuracy": 0.75},
         "estimated": {"rocAuc": {"value": 0.812, "low": 0.79, "high": 0.83}}},
        {"version": 2, "labelled": 37, "live": {"rocAuc": 0.7}, "estimated": {}},
        {"version": 3, "labelled": 0, "live": {}, "estimated": {"accuracy": {"value": 0.7, "low": 0.6, "high": 0.8}}},
    ]  # fmt: skip
    ModelDeploymentStatus.model_validate({"outcomes": written})  # what the API (and the CRD) declare


def test_outcomes_are_written_only_when_they_change_at_three_decimals() -> None:
    kube, source = cluster(), Source()
    source.by_version[1] = Outcomes({"rows": 100.0, "rocAuc": 0.81234})
    assert tick(kube, source)
    source.by_version[1] = Outcomes({"rows": 100.0, "rocAuc": 0.81209})  # 0.812 still
    kube.writes.clear()
    assert not tick(kube, source) and kube.writes == []
    source.by_version[1] = Outcomes({"rows": 101.0, "rocAuc": 0.8})
    assert tick(kube, source)
    assert kube.find("ModelDeployment", "arrests", "ns")["status"]["outcomes"][0]["labelled"] == 101


def test_nothing_is_written_without_signals() -> None:
    kube, source = cluster(), Source()
    assert not tick(kube, source)  # no version has outcomes yet
    assert not tick(kube, None)  # no Prometheus configured
    source.down = True
    assert not tick(kube, source)  # Prometheus unreachable: logged, the last outcomes stay
    assert kube.writes == []


def test_the_operator_reads_the_cluster_series_where_its_settings_name_none() -> None:
    """Ground truth and estimates per namespace (the model servers' and sidecars' series); no paired series (a
    Gateway's mirror discards the shadow's answers); a query the settings name replaces its default only."""
    source = canary.prometheus_source(Settings(prometheus_url="http://prometheus:9090", query_drift="my_drift"))
    assert isinstance(source, PrometheusSource)
    assert source.queries == replace(Queries.cluster(), drift="my_drift")
    where = '{namespace="$namespace",model="$model",version="$version"}'
    assert source.queries.estimated == f"kubeloop_estimated_metric{where}"
    assert source.queries.labelled == f"kubeloop_labelled_rows_total{where}"
    assert source.queries.shadow_pairs == ""
