"""operators.canary.tick: the operator's side of the analysis, against a fake API server and fake signals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubeloop.analysis import VersionSignals
from operators import canary
from tests.support.fake_kube import FakeKube

T0 = datetime(2025, 1, 1, tzinfo=UTC)
PRED = [(0.5, 80.0), (float("inf"), 100.0)]
LAT = [(0.01, 90.0), (0.05, 100.0), (float("inf"), 100.0)]


class Cluster(FakeKube):
    """The deployment `ns/arrests` and its versions, as the canary analysis reads and patches them."""

    events: list[tuple[str, str, str]]

    @property
    def body(self) -> dict[str, Any]:
        found = self.find("ModelDeployment", "arrests", "ns")
        assert found is not None
        return found

    def version_spec(self, version: int) -> dict[str, Any]:
        found = self.find("ModelVersion", f"arrests-v{version}", "ns")
        assert found is not None
        return found["spec"]


class FakeSource:
    def __init__(self, errors: float = 0.0, classes: dict[int, dict[str, float]] | None = None) -> None:
        self.errors, self.classes = errors, classes or {}

    def tick(self) -> None:
        pass

    def version_signals(self, model, version, window_s, namespace=""):
        errors = self.errors if version == 2 else 0.0
        return VersionSignals(version, 100.0, errors, list(LAT), list(PRED), False, self.classes.get(version, {}))


def deployment() -> dict[str, Any]:
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "arrests", "namespace": "ns"},
        "spec": {
            "model": "arrests",
            "version": 1,
            "canary": {"version": 2, "trafficPercent": 5, "analysis": {"steps": [10, 50, 100], "interval": "10s"}},
        },
    }


def run(kube: Cluster, source: FakeSource, ticks: int) -> list[str | None]:
    events: list[tuple[str, str, str]] = []
    actions = []
    for n in range(ticks):
        actions.append(canary.tick(kube.body, kube, lambda b, t, r, m: events.append((t, r, m)), source,
                                   now=T0 + timedelta(seconds=10 * n)))  # fmt: skip
        if "canary" not in kube.body["spec"]:
            break
    kube.events = events
    return actions


def with_versions() -> Cluster:
    kube = Cluster()
    kube.put(deployment())
    for v in (1, 2):
        stage = "Production" if v == 1 else "Candidate"
        meta = {"name": f"arrests-v{v}", "namespace": "ns"}
        kube.put(
            {"apiVersion": "kubeloop.dev/v1alpha1", "kind": "ModelVersion", "metadata": meta, "spec": {"stage": stage}}
        )
    return kube


def test_the_operator_walks_the_steps_and_promotes() -> None:
    kube = with_versions()
    actions = run(kube, FakeSource(), 10)
    assert actions == ["start", "advance", "advance", "promote"]
    spec_patches = [p[3]["spec"] for p in kube.patches if p[0] == "ModelDeployment" and "spec" in p[3]]
    percents = [s["canary"]["trafficPercent"] for s in spec_patches if s.get("canary")]
    assert percents == [10, 50, 100]
    assert kube.body["spec"]["version"] == 2 and "canary" not in kube.body["spec"]
    assert kube.body["status"]["canaryPhase"] == "Promoted"
    assert [h["action"] for h in kube.body["status"]["history"]] == ["start", "advance", "advance", "promote"]
    assert kube.version_spec(2)["stage"] == "Production"
    assert kube.version_spec(1)["stage"] == "Archived"
    assert [e[1] for e in kube.events] == ["CanaryStarted", "CanaryAdvanced", "CanaryAdvanced", "CanaryPromoted"]


def test_failing_metrics_roll_back_and_reject_without_deleting() -> None:
    kube = with_versions()
    actions = run(kube, FakeSource(errors=30), 10)
    assert actions == ["start", "hold", "rollback"]
    assert kube.body["spec"]["version"] == 1 and "canary" not in kube.body["spec"]  # 100% back on v1
    assert kube.body["status"]["canaryPhase"] == "RolledBack"
    mv = kube.version_spec(2)
    assert mv["stage"] == "Rejected" and "error rate" in mv["stageReason"]
    assert kube.events[-1][:2] == ("Warning", "CanaryRolledBack")


def test_a_multiclass_canary_predicting_another_class_mix_is_rejected_saying_so() -> None:
    mix = FakeSource(classes={1: {"a": 50.0, "b": 50.0}, 2: {"a": 90.0, "b": 10.0}})  # same confidence histogram
    kube = with_versions()
    assert run(kube, mix, 10) == ["start", "hold", "rollback"]
    checks = kube.body["status"]["history"][-1]["checks"]
    assert [c["name"] for c in checks if c["status"] == "fail"] == ["predictionShift"]
    reason = kube.version_spec(2)["stageReason"]
    assert "predicted-class share gap 0.400 (class 'a': 90.0% of the candidate's predictions" in reason


def test_nothing_happens_before_the_interval_or_without_prometheus() -> None:
    kube = with_versions()
    assert canary.tick(kube.body, kube, lambda *a: None, FakeSource(), now=T0) == "start"
    assert canary.tick(kube.body, kube, lambda *a: None, FakeSource(), now=T0 + timedelta(seconds=5)) is None
    events = []
    assert canary.tick(kube.body, kube, lambda *a: events.append(a), None, now=T0 + timedelta(seconds=11)) is None
    assert events[0][2] == "NoPrometheus"


def test_no_interval_is_judged_while_the_route_holds_the_canary_back() -> None:
    """KServe has not reported the canary ready, so the route sends it nothing: waiting is not a failed check, and
    the first interval judged starts when the canary gets its share."""
    kube = with_versions()
    assert canary.tick(kube.body, kube, lambda *a: None, FakeSource(errors=30), now=T0) == "start"
    kube.body["status"]["conditions"] = [{"type": "TrafficSplit", "status": "False", "reason": "CanaryNotReady"}]
    for seconds in (10, 20, 30):
        assert (
            canary.tick(kube.body, kube, lambda *a: None, FakeSource(errors=30), now=T0 + timedelta(seconds=seconds))
            is None
        )
    assert kube.body["status"]["canaryAnalysis"]["failedChecks"] == 0
    assert kube.body["status"]["canaryAnalysis"]["lastChecked"] == "2025-01-01T00:00:30Z"
    kube.body["status"]["conditions"] = [{"type": "TrafficSplit", "status": "True", "reason": "HTTPRoute"}]
    assert canary.tick(kube.body, kube, lambda *a: None, FakeSource(), now=T0 + timedelta(seconds=35)) is None
    assert canary.tick(kube.body, kube, lambda *a: None, FakeSource(), now=T0 + timedelta(seconds=40)) == "advance"
