"""How the operator writes a child (operators.children: an owner check, then server-side apply), against the
in-memory API; admission, settings and metrics."""

from __future__ import annotations

from typing import Any

import pytest

from kubeloop.kube import kind_of
from operators import admission, children, metrics
from operators import inferenceservice as isvc
from operators.settings import Settings
from tests.support.fake_kube import FakeKube
from tests.support.handlerkit import sample

# --- apply, admission, settings, metrics ----------------------------------------------------------------------------


def configmap(uid: str, data: dict[str, str], name: str = "c") -> dict[str, Any]:
    owner = {"apiVersion": "kubeloop.dev/v1alpha1", "kind": "TrainingJob", "name": "t", "uid": uid, "controller": True}
    meta = {"name": name, "namespace": "ml", "ownerReferences": [owner]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def test_apply_converges_drops_what_kubeloop_no_longer_sets_and_keeps_other_writers_fields() -> None:
    kube = FakeKube()
    assert children.apply(kube, configmap("u1", {"a": "1", "b": "2"}))[0] is children.Action.CREATED
    kube.patch(kind_of("v1", "ConfigMap"), "ml", "c", {"data": {"report": "r"}})  # the run publishes
    action, obj = children.apply(kube, configmap("u1", {"a": "1"}))
    assert action is children.Action.UPDATED
    assert obj["data"] == {"a": "1", "report": "r"}
    version = obj["metadata"]["resourceVersion"]
    action, obj = children.apply(kube, configmap("u1", {"a": "1"}))
    assert (action, obj["metadata"]["resourceVersion"]) == (children.Action.UNCHANGED, version)
    assert children.apply(kube, configmap("u1", {"a": "2"}), create_only=True)[0] is children.Action.UNCHANGED
    assert kube.find("ConfigMap", "c")["data"] == {"a": "1", "report": "r"}


def test_apply_refuses_an_object_another_controller_or_none_owns() -> None:
    kube = FakeKube()
    kube.put(configmap("u2", {"a": "x"}))
    with pytest.raises(children.Conflict, match="controller uid u2"):
        children.apply(kube, configmap("u1", {"a": "1"}))
    unowned = configmap("u1", {"a": "x"}, name="d")
    unowned["metadata"]["ownerReferences"] = []
    kube.put(unowned)
    with pytest.raises(children.Conflict, match="controller uid none"):
        children.apply(kube, configmap("u1", {"a": "1"}, name="d"))
    assert kube.writes == [] and kube.find("ConfigMap", "c")["data"] == {"a": "x"}


def test_admission_problems_name_the_field() -> None:
    ok = sample("modeldeployment")
    assert admission.problems(ok) is None
    bad = sample("modeldeployment", canary={"version": 2, "analysis": {"steps": [10, 10]}})
    message = admission.problems(bad)
    assert message is not None and "spec.canary.analysis.steps" in message
    assert admission.missing_versions(ok, lambda ns, name: False) == ["arrests-v1"]
    assert admission.missing_versions(ok, lambda ns, name: True) == []


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELOOP_SERVING_IMAGE", "registry.local/serving:dev")
    monkeypatch.setenv("KUBELOOP_GPU_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("KUBELOOP_GPU_TOLERATION", "false")
    monkeypatch.setenv("KUBELOOP_SIDECAR_PORT", "9000")
    monkeypatch.setenv("KUBELOOP_STORAGE_PVC", "")
    settings = Settings.from_env()
    assert settings.serving_image == "registry.local/serving:dev"
    assert settings.gpu_node_selector == {"pool": "gpu"}
    assert settings.gpu_toleration is False
    assert settings.sidecar_port == 9000
    assert settings.storage_pvc == ""
    monkeypatch.setenv("KUBELOOP_SIDECAR_PORT", "nine")
    with pytest.raises(ValueError, match="KUBELOOP_SIDECAR_PORT"):
        Settings.from_env()


def test_metrics_exposition() -> None:
    metrics.reconciled("TrainingJob", "ok", 0.02)
    metrics.child("RayJob", "created")
    text = metrics.render()
    assert 'kubeloop_operator_reconcile_total{kind="TrainingJob",result="ok"}' in text
    assert 'kubeloop_operator_children_total{kind="RayJob",action="created"}' in text
    assert 'kubeloop_operator_reconcile_seconds_bucket{kind="TrainingJob",le="0.025"}' in text
    assert isvc.COMPONENT == "inference"


def test_the_canary_analysis_reads_the_predicted_class_query_the_settings_give(monkeypatch: pytest.MonkeyPatch) -> None:
    from operators.canary import prometheus_source

    monkeypatch.setenv("KUBELOOP_PROMETHEUS_URL", "http://prometheus:9090")
    source = prometheus_source(Settings.from_env())
    assert 'namespace="$namespace"' in source.queries.predicted_classes  # one namespace's series by default
    monkeypatch.setenv("KUBELOOP_QUERY_PREDICTED_CLASSES", 'my_classes_total{model="$model",version="$version"}')
    source = prometheus_source(Settings.from_env())
    assert source.queries.predicted_classes == 'my_classes_total{model="$model",version="$version"}'
