"""operators.retrain.tick: drift mirrored, retraining started (on drift, on live performance, or either), handed to a
canary or recorded as failed.

Against an in-memory API server (merge-patch semantics) and a signal source whose drift flag and live metrics the
test sets; the real apiserver and Prometheus run in tests/cluster/test_closed_loop.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from kubeloop.analysis import VersionSignals
from kubeloop.api import TrainingJob, parse_resource
from kubeloop.api.trainingjob import name_is_valid
from operators import retrain
from tests.support.fake_kube import FakeKube

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Cluster(FakeKube):
    def __init__(self, *objects: dict[str, Any]) -> None:
        super().__init__()
        for obj in objects:
            self.put(obj)

    @property
    def created(self) -> list[dict[str, Any]]:
        """The TrainingJobs the retrain policy created (the template was put, not created)."""
        return [self.find("TrainingJob", name, "ns") for op, kind, name in self.writes if op == "create"]


class Drift:
    """The stable version's drift flag and live metrics (kubeloop_live_metric, `rows` included)."""

    def __init__(self, flag: bool | None, live: dict[str, float] | None = None) -> None:
        self.flag, self.live = flag, dict(live or {})

    def version_signals(self, model, version, window_s, namespace=""):
        return VersionSignals(version, drift=self.flag, live=dict(self.live))


def deployment(**retrain_spec: Any) -> dict[str, Any]:
    policy = {"enabled": True, "sustainedFor": "60s", "minInterval": "1h", "trainingJob": "arrests-mlp"}
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "arrests", "namespace": "ns"},
        "spec": {"model": "arrests", "version": 1, "retrain": policy | retrain_spec},
    }


def template(model: str = "arrests") -> dict[str, Any]:
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "arrests-mlp", "namespace": "ns"},
        "spec": {
            "model": {"name": model},
            "dataset": {"uri": "s3://bucket/arrests.csv", "digest": "sha256:" + "a" * 64, "label": "released",
                        "positiveClass": "Yes"},
        },
    }  # fmt: skip


def tick(kube: Cluster, source: Drift | None, seconds: float, events: list | None = None) -> str | None:
    body = kube.get(retrain.MODELDEPLOYMENT, "ns", "arrests")
    emit = (lambda b, t, r, m: events.append((t, r, m))) if events is not None else (lambda *a: None)
    return retrain.tick(body, kube, emit, source, now=T0 + timedelta(seconds=seconds))


def status(kube: Cluster) -> dict[str, Any]:
    return kube.find("ModelDeployment", "arrests", "ns").get("status") or {}


def test_drift_must_last_sustained_for_then_one_copy_on_fresh_data_is_started() -> None:
    kube, source, events = Cluster(deployment(), template()), Drift(True), []
    assert tick(kube, source, 0, events) is None
    assert status(kube)["drift"]["state"] == "Drift" and status(kube)["retrain"]["triggeredSince"]
    assert tick(kube, source, 30) is None and not kube.created
    assert tick(kube, source, 61, events) == "retrain"
    (job,) = kube.created
    assert job["spec"]["dataset"] == {"uri": "s3://bucket/arrests.csv", "label": "released", "positiveClass": "Yes",
                                      "baseline": "none"}  # fmt: skip
    assert (
        job["metadata"]["ownerReferences"][0]["uid"] == kube.find("ModelDeployment", "arrests", "ns")["metadata"]["uid"]
    )
    assert status(kube)["retrain"]["trainingJob"] == job["metadata"]["name"]
    assert status(kube)["history"][-1]["action"] == "retrain"
    assert [e[1] for e in events] == ["DriftDetected", "RetrainTriggered", "Retraining"]
    assert events[1][2] == "v1: drift for 0s of the 60s required"
    for seconds in (62, 120, 4000):  # while it trains, nothing new starts
        assert tick(kube, source, seconds) is None
    assert len(kube.created) == 1


def test_retrain_names_are_trainingjob_names_kuberay_accepts() -> None:
    """<template>-rYYYYmmddHHMMSS within 47 characters (DNS-1035, KubeRay's RayJob rule) for any template, cut
    and tagged with a digest of its whole name when it does not fit, so templates sharing a prefix stay apart."""
    now = datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC)
    assert retrain.retrain_job_name("arrests-mlp", now) == "arrests-mlp-r20261231235958"
    assert retrain.retrain_job_name("a" * 31, now) == "a" * 31 + "-r20261231235958"  # exactly 47: kept whole
    templates = ["a" * n for n in range(1, 48)] + ["x" * 40 + "-" * 6 + "y", "arrests-" + "m" * 39]
    templates += ["1abc", "arrests.mlp", "Arrests_MLP", "---", ""]  # not TrainingJob names: still a valid result
    names = [retrain.retrain_job_name(template, now) for template in templates]
    for template, name in zip(templates, names, strict=True):
        assert name_is_valid(name) and len(name) <= 47, (template, name)
        assert name.endswith("-r20261231235958")
    assert len(set(names)) == len(templates)
    long_a, long_b = "arrests-mlp-" + "x" * 30 + "-one", "arrests-mlp-" + "x" * 30 + "-two"
    a, b = retrain.retrain_job_name(long_a, now), retrain.retrain_job_name(long_b, now)
    assert a != b and a.startswith("arrests-mlp-xxx") and b.startswith("arrests-mlp-xxx")


def test_the_retraining_copy_of_the_longest_template_is_a_valid_trainingjob() -> None:
    long_name = "arrests-" + "m" * 39  # 47 characters: the longest TrainingJob name
    job = template()
    job["metadata"]["name"] = long_name
    kube, source = Cluster(deployment(trainingJob=long_name), job), Drift(True)
    tick(kube, source, 0)
    assert tick(kube, source, 61) == "retrain"
    (created,) = kube.created
    assert len(created["metadata"]["name"]) == 47
    assert isinstance(parse_resource(created), TrainingJob)  # the name rule included
    assert created["metadata"]["labels"][retrain.LABEL_RETRAIN_OF] == long_name


def test_drift_that_stops_resets_the_clock() -> None:
    kube, source = Cluster(deployment(), template()), Drift(True)
    tick(kube, source, 0)
    source.flag = False
    tick(kube, source, 30)
    assert status(kube)["drift"]["state"] == "NoDrift" and "triggeredSince" not in status(kube)["retrain"]
    source.flag = True
    tick(kube, source, 40)
    assert tick(kube, source, 61) is None and not kube.created  # 21 s of drift, not 60


def test_a_missing_template_is_reported_and_not_retried_before_min_interval() -> None:
    kube, source, events = Cluster(deployment()), Drift(True), []
    tick(kube, source, 0)
    assert tick(kube, source, 60, events) == "retrainFailed"
    assert (
        "TrainingJob ns/arrests-mlp (spec.retrain.trainingJob) does not exist" in status(kube)["history"][-1]["reason"]
    )
    assert events[-1][:2] == ("Warning", "RetrainFailed")
    assert tick(kube, source, 120) is None  # drift still sustained, but the last attempt was a minute ago
    kube.put(template())
    assert tick(kube, source, 3500) is None  # an hour after the first attempt: not yet
    assert tick(kube, source, 3700) == "retrain"


def test_a_template_of_another_model_is_refused() -> None:
    kube, source = Cluster(deployment(), template(model="other")), Drift(True)
    tick(kube, source, 0)
    assert tick(kube, source, 60) == "retrainFailed"
    assert "trains model other, not arrests" in status(kube)["history"][-1]["reason"]


def _trained(kube: Cluster, gate_passed: bool) -> None:
    tick(kube, Drift(True), 0)
    tick(kube, Drift(True), 60)
    name = status(kube)["retrain"]["trainingJob"]
    kube.find("TrainingJob", name, "ns")["status"] = {"phase": "Succeeded", "modelVersion": "arrests-v2"}
    gate = {"passed": gate_passed, "reasons": [] if gate_passed else ["rocAuc 0.61 < 0.65"]}
    mv = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
    mv["metadata"] |= {"name": "arrests-v2", "namespace": "ns"}
    mv["spec"] |= {"version": 2, "stage": "Candidate", "gate": gate}
    kube.put(mv)


def test_a_version_that_passed_its_gate_becomes_the_canary() -> None:
    kube = Cluster(deployment(analysis={"steps": [20, 100], "interval": "10s"}), template())
    _trained(kube, gate_passed=True)
    assert tick(kube, None, 70) == "canary"  # no Prometheus needed to follow a run
    md = kube.find("ModelDeployment", "arrests", "ns")
    assert md["spec"]["canary"] == {
        "version": 2, "trafficPercent": 20,
        "analysis": {"steps": [20, 100], "interval": "10s", "maxFailedChecks": 2,
                     "checks": {"maxErrorRate": 0.01, "maxP99LatencyRatio": 1.5, "maxPredictionShift": 1.0,
                                "failOnDrift": True,
                                "labelled": {"enabled": True, "minLabels": 50, "maxLossIncrease": 0.0,
                                             "significance": 0.05}}},
    }  # fmt: skip
    assert "trainingJob" not in status(kube)["retrain"]


def test_a_version_that_failed_its_gate_is_not_rolled_out() -> None:
    kube = Cluster(deployment(), template())
    _trained(kube, gate_passed=False)
    assert tick(kube, None, 70) == "retrainFailed"
    assert "canary" not in kube.find("ModelDeployment", "arrests", "ns")["spec"]
    assert "v2 from TrainingJob" in status(kube)["history"][-1]["reason"]
    assert "rocAuc 0.61 < 0.65" in status(kube)["history"][-1]["reason"]


# --- spec.retrain.on: performance, both -----------------------------------------------------------------------------

PERFORMANCE = {"metric": "rocAuc", "threshold": 0.7, "minLabels": 100}
POOR = {"rows": 500.0, "rocAuc": 0.61, "accuracy": 0.7}


def test_live_performance_below_the_threshold_for_sustained_for_retrains_and_says_why() -> None:
    kube, events = Cluster(deployment(on="performance", performance=PERFORMANCE), template()), []
    source = Drift(False, POOR)
    assert tick(kube, source, 0, events) is None
    assert status(kube)["retrain"]["triggeredSince"] == "2026-01-01T00:00:00Z"
    why = "live rocAuc 0.610 on 500 labelled rows is worse than 0.7"
    assert ("Warning", "RetrainTriggered", f"v1: {why} for 0s of the 60s required") in events
    assert tick(kube, source, 61, events) == "retrain"
    entry = status(kube)["history"][-1]
    assert entry["action"] == "retrain" and entry["reason"].startswith(f"{why} sustained for 61s (>= 60s): retraining")
    assert events[-1][1] == "Retraining" and why in events[-1][2]


def test_on_performance_ignores_drift_and_too_few_labels() -> None:
    kube = Cluster(deployment(on="performance", performance=PERFORMANCE), template())
    source = Drift(True, {"rows": 99.0, "rocAuc": 0.5})  # drifting, and too few labelled rows to trust the metric
    assert tick(kube, source, 0) is None
    assert status(kube)["drift"]["state"] == "Drift" and "retrain" not in status(kube)
    assert tick(kube, source, 100) is None and not kube.created
    source.live = {"rows": 400.0, "rocAuc": 0.9}  # enough labels, and good enough
    assert tick(kube, source, 200) is None and not kube.created


def test_on_drift_ignores_performance() -> None:
    kube = Cluster(deployment(performance=PERFORMANCE), template())
    source = Drift(False, POOR)
    assert tick(kube, source, 0) is None
    assert tick(kube, source, 100) is None and not kube.created


def test_on_both_either_trigger_keeps_the_clock_running() -> None:
    kube, events = Cluster(deployment(on="both", performance=PERFORMANCE), template()), []
    source = Drift(True)
    tick(kube, source, 0, events)
    source.flag, source.live = False, dict(POOR)  # drift stops as performance falls: one unbroken trigger
    assert tick(kube, source, 30, events) is None
    assert status(kube)["retrain"]["triggeredSince"] == "2026-01-01T00:00:00Z"
    assert tick(kube, source, 61, events) == "retrain"
    assert "live rocAuc 0.610" in status(kube)["history"][-1]["reason"]
    assert [e[1] for e in events].count("RetrainTriggered") == 1
