"""operators.shadow_analysis.tick: the shadow judged window by window on (fake) Prometheus signals, against the
in-memory API; report only without spec.shadow.analysis, promoted to a canary or rejected with it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubeloop.analysis import VersionSignals
from kubeloop.analysis.signals import Outcomes, PairedSignals
from operators import shadow_analysis
from tests.support.fake_kube import FakeKube

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LATENCY = [(0.01, 90.0), (0.05, 100.0), (float("inf"), 100.0)]
PREDICTIONS = [(0.5, 60.0), (float("inf"), 100.0)]
MIRRORING = {"type": "Shadow", "status": "True", "reason": "RequestMirror", "message": ""}
ANALYSIS = {"interval": "10s", "windows": 2, "maxFailedWindows": 2, "canary": {"steps": [20, 100], "interval": "5s"}}


class Signals:
    """Each version's requests in a window; the shadow (v3) fails `errors` of its own."""

    def __init__(self, requests: float = 100.0, errors: float = 0.0) -> None:
        self.requests, self.errors = requests, errors

    def version_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> VersionSignals:
        requests = self.requests if version == 3 else 100.0
        errors = self.errors if version == 3 else 0.0
        return VersionSignals(version, requests, errors, list(LATENCY), list(PREDICTIONS), False)

    def paired_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> PairedSignals:
        return PairedSignals()  # a cluster: the Gateway discards the shadow's answers

    def outcomes(self, model: str, version: int, namespace: str = "") -> Outcomes:
        return Outcomes()


class Cluster(FakeKube):
    def __init__(self, analysis: dict[str, Any] | None = ANALYSIS, **spec: Any) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str]] = []
        shadow = {"version": 3, "percent": 50} | ({"analysis": analysis} if analysis else {})
        self.put({
            "apiVersion": "kubeloop.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "arrests", "namespace": "ns"},
            "spec": {"model": "arrests", "version": 1, "shadow": shadow, **spec},
        })  # fmt: skip
        self.find("ModelDeployment", "arrests", "ns")["status"] = {"conditions": [MIRRORING]}
        for version, stage in ((1, "Production"), (3, "Candidate")):
            meta = {"name": f"arrests-v{version}", "namespace": "ns"}
            self.put({"apiVersion": "kubeloop.dev/v1alpha1", "kind": "ModelVersion", "metadata": meta,
                      "spec": {"stage": stage}})  # fmt: skip

    @property
    def md(self) -> dict[str, Any]:
        return self.find("ModelDeployment", "arrests", "ns")  # type: ignore[return-value]

    def tick(self, source: Signals | None, seconds: float) -> str | None:
        emit = lambda body, type_, reason, message: self.events.append((type_, reason, message))  # noqa: E731
        return shadow_analysis.tick(self.md, self, emit, source, now=T0 + timedelta(seconds=seconds))

    def actions(self) -> list[str]:
        return [entry["action"] for entry in self.md["status"].get("history") or []]


def test_a_passing_shadow_becomes_the_canary_after_its_windows() -> None:
    kube, source = Cluster(), Signals()
    assert kube.tick(source, 0) == "shadowStart"
    assert kube.md["status"]["shadow"] == {"version": 3, "mirrored": 0, "passedWindows": 0, "failedWindows": 0,
                                           "lastChecked": "2026-01-01T00:00:00Z"}  # fmt: skip
    started = kube.md["status"]["history"][-1]
    assert started["reason"].startswith("v3 receives 50% of v1's requests, mirrored; judged every 10s: 2 passing")
    assert kube.events[-1][:2] == ("Normal", "ShadowStarted")
    assert kube.tick(source, 5) is None  # within the window
    assert kube.tick(source, 10) == "shadowHold"
    report = kube.md["status"]["shadow"]
    assert (report["mirrored"], report["passedWindows"], report["errorRate"]) == (100, 1, 0.0)
    assert report["lastChecked"] == "2026-01-01T00:00:10Z"
    assert {c["name"]: c["status"] for c in report["checks"]}["agreement"] == "skip"  # no paired answers
    assert kube.tick(source, 20) == "shadowPromote"
    spec = kube.md["spec"]
    assert "shadow" not in spec
    assert spec["canary"]["version"] == 3 and spec["canary"]["trafficPercent"] == 20
    assert spec["canary"]["analysis"]["steps"] == [20, 100] and spec["canary"]["analysis"]["interval"] == "5s"
    assert spec["canary"]["analysis"]["checks"]["maxPredictionShift"] == 1.0  # judged on labels, as a retrained one
    assert kube.actions() == ["shadowStart", "shadowHold", "shadowPromote"]
    promoted = kube.md["status"]["history"][-1]
    assert promoted["candidate"] == 3 and promoted["stable"] == 1 and promoted["time"] == "2026-01-01T00:00:20Z"
    assert "v3 becomes the canary at 20%" in promoted["reason"]
    assert kube.events[-1][:2] == ("Normal", "ShadowPromoted")


def test_a_failing_shadow_is_rejected_and_its_version_marked() -> None:
    kube, source = Cluster(), Signals(errors=30.0)
    kube.tick(source, 0)
    assert kube.tick(source, 10) == "shadowHold"
    assert kube.events[-1][:2] == ("Warning", "ShadowHolding")
    assert kube.tick(source, 20) == "shadowReject"
    assert "shadow" not in kube.md["spec"] and "canary" not in kube.md["spec"]
    reason = kube.md["status"]["history"][-1]["reason"]
    assert "error rate" in reason and reason.endswith("rejecting v3")
    mv = kube.find("ModelVersion", "arrests-v3", "ns")["spec"]
    assert mv["stage"] == "Rejected" and mv["stageReason"] == reason
    assert kube.md["status"]["shadow"]["failedWindows"] == 2
    assert kube.events[-1][:2] == ("Warning", "ShadowRejected")
    # the spec stopped naming it before it was marked: the reconcile never sees a Rejected shadow in the spec
    spec_patch = next(i for i, p in enumerate(kube.patches) if p[0] == "ModelDeployment" and "spec" in p[3])
    stage_patch = next(i for i, p in enumerate(kube.patches) if p[0] == "ModelVersion")
    assert spec_patch < stage_patch


def test_without_analysis_the_shadow_is_reported_and_never_acted_on() -> None:
    kube, source = Cluster(analysis=None), Signals(errors=30.0)
    assert kube.tick(source, 0) == "shadowStart"
    assert "never promoted (no spec.shadow.analysis)" in kube.md["status"]["history"][-1]["reason"]
    for seconds in (30, 60, 90):  # every window reported, none decided on
        assert kube.tick(source, seconds) is None
    report = kube.md["status"]["shadow"]
    assert report["errorRate"] == 0.3 and report["failedWindows"] == 3 and report["lastChecked"].endswith("01:30Z")
    assert kube.actions() == ["shadowStart"] and kube.md["spec"]["shadow"]["version"] == 3
    assert kube.find("ModelVersion", "arrests-v3", "ns")["spec"]["stage"] == "Candidate"


def test_a_window_without_mirrored_requests_holds_and_the_report_is_replaced() -> None:
    kube = Cluster()
    kube.tick(Signals(), 0)
    kube.tick(Signals(), 10)
    assert kube.md["status"]["shadow"]["errorRate"] == 0.0
    assert kube.tick(Signals(requests=0.0), 20) == "shadowHold"  # the shadow's pods not ready yet, say
    report = kube.md["status"]["shadow"]
    assert report["mirrored"] == 0 and report["passedWindows"] == 1 and "errorRate" not in report
    assert "only 0 mirrored requests" in kube.md["status"]["history"][-1]["reason"]


def test_a_passing_shadow_waits_while_a_canary_is_analysed() -> None:
    kube, source = Cluster(canary={"version": 2, "trafficPercent": 10}), Signals()
    kube.tick(source, 0)
    kube.tick(source, 10)
    assert kube.tick(source, 20) == "shadowHold"
    assert "v2 is being analysed as the canary: v3 waits for it" in kube.md["status"]["history"][-1]["reason"]
    assert kube.md["spec"]["canary"]["version"] == 2 and kube.md["spec"]["shadow"]["version"] == 3
    del kube.md["spec"]["canary"]  # promoted or rolled back meanwhile
    assert kube.tick(source, 30) == "shadowPromote"
    assert kube.md["spec"]["canary"]["version"] == 3


def test_nothing_is_judged_unless_the_route_mirrors_to_the_shadow() -> None:
    kube = Cluster()
    kube.md["status"]["conditions"] = [MIRRORING | {"status": "False", "reason": "NotInKnativeMode"}]
    assert kube.tick(Signals(), 0) is None and kube.patches == []
    kube.md["status"]["conditions"] = [MIRRORING, {"type": "VersionAdmitted", "status": "True",
                                                   "reason": "RejectedAllowed"}]  # fmt: skip
    assert kube.tick(Signals(), 0) is None and kube.patches == []


def test_without_prometheus_it_says_so_once_a_window() -> None:
    kube = Cluster()
    kube.tick(None, 0)
    assert kube.tick(None, 10) is None and kube.tick(None, 15) is None
    assert [e[1] for e in kube.events] == ["ShadowStarted", "NoPrometheus"]
    assert kube.md["status"]["shadow"]["lastChecked"] == "2026-01-01T00:00:10Z"
