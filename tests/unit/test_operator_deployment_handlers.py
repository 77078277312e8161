"""The ModelDeployment handlers against the in-memory API (tests/support/fake_kube.py): the InferenceService and
HTTPRoute converged by server-side apply (what kubeloop no longer sets goes), Rejected versions refused, KServe's
status mirrored."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
import yaml

from kubeloop.kube import ApiError, Kind
from operators import canary as canary_analysis
from operators import deployment_handlers, handlers
from operators.settings import Settings
from tests.support.fake_kube import FakeKube
from tests.support.handlerkit import REPO, apply_patch, installed_fake, sample


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    yield from installed_fake(monkeypatch)


def run_md(fake: FakeKube, body: dict[str, Any]) -> tuple[dict[str, Any], Exception | None]:
    patch = kopf.Patch()
    error = None
    try:
        deployment_handlers.reconcile_modeldeployment(body=body, patch=patch)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        error = exc
    return apply_patch(fake, body, patch), error


# --- ModelDeployment ----------------------------------------------------------------------------------------------


def put_versions(fake: FakeKube, *numbers: int) -> None:
    for n in numbers:
        doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
        doc["metadata"].update(name=f"arrests-v{n}", namespace="ml")
        doc["spec"]["version"] = n
        doc["spec"]["artifactUri"] = f"file:///var/lib/kubeloop/registry/arrests/v{n}/artifact"
        fake.put(doc)


def test_modeldeployment_reconcile_converges(fake: FakeKube) -> None:
    put_versions(fake, 1)
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert error is None
    assert [w[1] for w in fake.writes if w[0] == "create"] == ["ConfigMap", "InferenceService", "HTTPRoute"]
    for kind in ("InferenceService", "HTTPRoute"):
        assert fake.find(kind, "arrests")["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]
    assert md["status"]["url"] == "http://arrests.ml.example.com"
    created = "ConfigMap arrests-model-versions, InferenceService arrests, HTTPRoute arrests created"
    assert ("Normal", "Created", created) in fake.events
    fake.writes.clear()
    run_md(fake, md)
    assert [w for w in fake.writes if w[0] != "patch/status"] == []


def test_modeldeployment_waits_for_its_modelversion(fake: FakeKube) -> None:
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError)
    assert md["status"]["ready"] is False
    ready = md["status"]["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "ModelVersionNotFound")
    assert "arrests-v1" in ready["message"]
    assert fake.of_kind("InferenceService") == []
    put_versions(fake, 1)
    md, error = run_md(fake, md)
    assert error is None
    assert len(fake.of_kind("InferenceService")) == 1


def reject(fake: FakeKube, version: int, reason: str) -> None:
    fake.find("ModelVersion", f"arrests-v{version}")["spec"].update(stage="Rejected", stageReason=reason)


def condition(md: dict[str, Any], type_: str) -> tuple[str, str, str]:
    (cond,) = [c for c in md["status"]["conditions"] if c["type"] == type_]
    return cond["status"], cond["reason"], cond["message"]


def test_a_rejected_version_is_refused_until_the_spec_allows_it(fake: FakeKube) -> None:
    put_versions(fake, 1)
    reject(fake, 1, "rocAuc 0.61 is below the threshold 0.7")
    md, error = run_md(fake, fake.put(sample("modeldeployment")))
    message = (
        "spec.version: arrests:1 is Rejected (rocAuc 0.61 is below the threshold 0.7): serve a Candidate or "
        "Production version, or set spec.allowRejected: true to serve it anyway for debugging"
    )
    assert isinstance(error, kopf.PermanentError) and str(error) == message  # nothing to retry: the spec must change
    assert condition(md, "VersionAdmitted") == ("False", "VersionRejected", message)
    assert condition(md, "Ready") == ("False", "VersionRejected", "nothing is served: " + message)
    assert md["status"]["ready"] is False
    assert fake.events == [("Warning", "VersionRejected", message)]
    assert fake.writes == [("patch/status", "ModelDeployment", "arrests")]  # no child written

    fake.events.clear()
    md["spec"]["allowRejected"] = True
    md, error = run_md(fake, md)
    assert error is None
    assert len(fake.of_kind("InferenceService")) == 1
    served = "spec.version: arrests:1 is Rejected (rocAuc 0.61 is below the threshold 0.7): served because "
    served += "spec.allowRejected is true (debugging)"
    assert condition(md, "VersionAdmitted") == ("True", "RejectedAllowed", served)
    assert ("Warning", "RejectedVersionServed", served) in fake.events
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]


def test_a_rejected_canary_leaves_the_stable_serving_as_it_was(fake: FakeKube) -> None:
    put_versions(fake, 1, 2, 3)
    md, error = run_md(fake, fake.put(sample("modeldeployment")))
    assert error is None and condition(md, "VersionAdmitted") == ("True", "Admitted", "arrests:1 Production")
    served = copy.deepcopy(fake.find("InferenceService", "arrests"))
    served["status"] = {"url": "http://arrests-ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}
    fake.find("InferenceService", "arrests")["status"] = served["status"]
    deployment_handlers.sync_modeldeployment_status(served)
    md = fake.find("ModelDeployment", "arrests")
    reject(fake, 2, "rolled back: error rate 9.0% > 1.0%")
    fake.writes.clear()
    canary = {"version": 2, "trafficPercent": 10, "analysis": {"steps": [10, 50, 100]}}
    md["spec"]["canary"] = canary
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.PermanentError)
    status, reason, message = condition(md, "VersionAdmitted")
    assert (status, reason) == ("False", "VersionRejected")
    assert message.startswith("spec.canary.version: arrests:2 is Rejected (rolled back: error rate 9.0% > 1.0%): ")
    assert fake.writes == [("patch/status", "ModelDeployment", "arrests")]  # the InferenceService is left as it was
    assert condition(md, "Ready")[0] == "True" and md["status"]["ready"] is True  # v1 still serves
    # KServe's events keep being mirrored, without claiming the refused split
    deployment_handlers.sync_modeldeployment_status(fake.find("InferenceService", "arrests"))
    md = fake.find("ModelDeployment", "arrests")
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]
    assert md["status"]["canaryPhase"] == "None"
    # and the canary analysis judges nothing
    fake.writes.clear()
    assert canary_analysis.tick(md, fake, lambda *event: fake.events.append(event[1:]), None) is None
    assert fake.writes == []

    md["spec"]["canary"] = canary | {"version": 3}  # the spec fixed: it proceeds
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError) and "once KServe reports it ready" in str(error)
    assert condition(md, "VersionAdmitted") == ("True", "Admitted", "arrests:1 Production, arrests:3 Production")
    assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["predictor"]["name"] == "v3"
    assert [t["version"] for t in md["status"]["traffic"]] == [1, 3]


def test_canary_then_promotion_removes_the_canary(fake: FakeKube) -> None:
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment", canary={"version": 2, "trafficPercent": 10}))
    md, _ = run_md(fake, md)
    assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["trafficPercent"] == 10
    md["spec"]["version"] = 2
    del md["spec"]["canary"]
    md, error = run_md(fake, md)
    assert error is None
    spec = fake.find("InferenceService", "arrests")["spec"]
    assert "canary" not in spec  # replaced, not merged: the canary entry is gone
    server = spec["predictor"]["containers"][0]
    assert server["args"][server["args"].index("--model-version") + 1] == "/etc/kubeloop/versions/v2.yaml"
    assert set(fake.find("ConfigMap", "arrests-model-versions")["data"]) == {"v2.yaml"}
    assert md["status"]["canaryPhase"] == "None"


def backends(fake: FakeKube) -> list[tuple[str, int]]:
    (rule,) = fake.find("HTTPRoute", "arrests")["spec"]["rules"]
    return [(ref["name"], ref["weight"]) for ref in rule["backendRefs"]]


def traffic_condition(md: dict[str, Any]) -> tuple[str, str]:
    (cond,) = [c for c in md["status"]["conditions"] if c["type"] == "TrafficSplit"]
    return cond["status"], cond["reason"]


def test_the_httproute_follows_the_canary_through_steps_promotion_and_rollback(fake: FakeKube) -> None:
    put_versions(fake, 1, 2, 3)
    md = fake.put(sample("modeldeployment", canary={"version": 2, "trafficPercent": 10}))
    md, error = run_md(fake, md)
    # KServe has not reported the canary ready: the stable keeps all traffic, and the reconcile comes back
    assert isinstance(error, kopf.TemporaryError) and "ready" in str(error)
    assert backends(fake) == [("arrests-predictor", 100)]
    assert traffic_condition(md) == ("False", "CanaryNotReady")
    assert [t["percent"] for t in md["status"]["traffic"]] == [90, 10]  # the split asked for
    obj = fake.find("InferenceService", "arrests")
    obj["status"] = {"canaryStatuses": [{"name": "v2", "ready": True, "trafficPercent": 10}]}
    md, error = run_md(fake, md)
    assert error is None
    assert backends(fake) == [("arrests-predictor", 90), ("arrests-v2-predictor", 10)]
    assert traffic_condition(md) == ("True", "HTTPRoute")
    for percent in (25, 50, 100):  # what operators.canary writes at each step
        md["spec"]["canary"]["trafficPercent"] = percent
        md, error = run_md(fake, md)
        assert error is None
        assert backends(fake) == [("arrests-predictor", 100 - percent), ("arrests-v2-predictor", percent)]
        assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["trafficPercent"] == percent
    md["spec"]["version"] = 2  # promoted
    del md["spec"]["canary"]
    md, error = run_md(fake, md)
    assert error is None
    assert backends(fake) == [("arrests-predictor", 100)]
    md["spec"]["canary"] = {"version": 3, "trafficPercent": 10}
    fake.find("InferenceService", "arrests")["status"] = {
        "canaryStatuses": [{"name": "v3", "ready": True, "trafficPercent": 10}]
    }
    md, error = run_md(fake, md)
    assert backends(fake) == [("arrests-predictor", 90), ("arrests-v3-predictor", 10)]
    del md["spec"]["canary"]  # rolled back
    md, error = run_md(fake, md)
    assert error is None
    assert backends(fake) == [("arrests-predictor", 100)]
    assert traffic_condition(md) == ("True", "HTTPRoute")
    assert len(fake.of_kind("HTTPRoute")) == 1


def test_without_a_gateway_a_canary_is_said_to_get_no_traffic(fake: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "settings", lambda: Settings(gateway=""))
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment", canary={"version": 2, "trafficPercent": 10}))
    md, error = run_md(fake, md)
    assert error is None
    assert fake.of_kind("HTTPRoute") == []
    assert traffic_condition(md) == ("False", "NoGateway")
    (warning,) = [e for e in fake.events if e[0] == "Warning"]
    assert warning[1] == "CanaryWithoutTraffic" and "gets no traffic" in warning[2]
    obj = fake.find("InferenceService", "arrests")
    obj["status"] = {"url": "http://arrests-ml.example.com"}
    deployment_handlers.sync_modeldeployment_status(obj)
    assert fake.find("ModelDeployment", "arrests")["status"]["url"] == "http://arrests-ml.example.com"


def test_knative_gets_no_httproute(fake: FakeKube) -> None:
    put_versions(fake, 1)
    md, error = run_md(fake, fake.put(sample("modeldeployment", deploymentMode="Knative")))
    assert error is None
    assert fake.of_kind("HTTPRoute") == []
    assert "TrafficSplit" not in {c["type"] for c in md["status"]["conditions"]}


def test_a_cluster_without_the_httproute_kind_is_told_what_to_install(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply = fake.apply

    def no_httproutes(kind: Kind, namespace: str | None, body: Any) -> dict[str, Any]:
        if kind.kind == "HTTPRoute":
            raise ApiError(404, "Not Found", {"message": "the server could not find the requested resource"})
        return apply(kind, namespace, body)

    monkeypatch.setattr(fake, "apply", no_httproutes)
    put_versions(fake, 1)
    _, error = run_md(fake, fake.put(sample("modeldeployment")))
    assert isinstance(error, kopf.TemporaryError)
    assert "gateway.networking.k8s.io/v1 HTTPRoute" in str(error) and "Gateway API CRDs" in str(error)
    assert sorted(e[1] for e in fake.events) == ["Created", "KindNotServed"]  # ConfigMap, InferenceService went in
    assert len(fake.of_kind("InferenceService")) == 1


def test_knative_canary_creates_the_stable_first(fake: FakeKube) -> None:
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment", deploymentMode="Knative", canary={"version": 2, "trafficPercent": 20}))
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError)
    obj = fake.find("InferenceService", "arrests")
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]
    obj["status"] = {"components": {"predictor": {"latestRolledoutRevision": "arrests-predictor-00001"}}}
    md, error = run_md(fake, md)
    assert error is None
    assert fake.find("InferenceService", "arrests")["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert [t["percent"] for t in md["status"]["traffic"]] == [80, 20]


def test_invalid_canary_steps_are_rejected_with_the_field(fake: FakeKube) -> None:
    put_versions(fake, 1, 2)
    canary = {"version": 2, "trafficPercent": 10, "analysis": {"steps": [50, 10]}}
    md = fake.put(sample("modeldeployment", canary=canary))
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.PermanentError)
    assert "steps" in str(error)
    assert md["status"]["conditions"][0]["reason"] == "InvalidSpec"
    assert fake.of_kind("InferenceService") == []


def test_a_fixed_spec_clears_the_invalid_condition(fake: FakeKube) -> None:
    put_versions(fake, 1)
    md = fake.put(sample("modeldeployment", canary={"version": 1, "trafficPercent": 5}))  # canary == stable
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.PermanentError)
    del md["spec"]["canary"]
    md, error = run_md(fake, md)
    assert error is None
    assert "Valid" not in {c["type"] for c in md["status"]["conditions"]}
    assert len(fake.of_kind("InferenceService")) == 1


def test_inferenceservice_status_is_mirrored(fake: FakeKube) -> None:
    put_versions(fake, 1)
    run_md(fake, fake.put(sample("modeldeployment")))
    obj = fake.find("InferenceService", "arrests")
    obj["status"] = {"url": "http://arrests-ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}
    new = deployment_handlers.sync_modeldeployment_status(obj)
    assert new is not None
    status = fake.find("ModelDeployment", "arrests")["status"]
    assert status["ready"] is True
    assert status["url"] == "http://arrests.ml.example.com"  # kubeloop's HTTPRoute, not KServe's own host
    assert status["drift"] == {"state": "Unknown"}
    fake.writes.clear()
    assert deployment_handlers.sync_modeldeployment_status(obj) is None
    assert fake.writes == []


def test_a_child_another_writer_changes_between_read_and_apply_is_applied_at_once(fake: FakeKube) -> None:
    """KServe's controller writes its InferenceService too: server-side apply sends no resourceVersion, so a write
    of KServe's between the operator's read and its apply neither fails the apply nor is undone by it."""
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert error is None
    md["spec"]["canary"] = {"version": 2, "trafficPercent": 10}
    read, kserve_writes = fake.get, itertools.count()

    def racing_get(kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = read(kind, namespace, name)
        if kind.kind == "InferenceService" and obj is not None:  # KServe updates it right after each read
            touched = {"metadata": {"annotations": {"serving.kserve.io/touched": str(next(kserve_writes))}}}
            fake.patch(kind, namespace, name, touched)
        return obj

    fake.get = racing_get
    _, error = run_md(fake, md)
    fake.get = read
    assert error is None or "canary v2 gets its traffic" in str(error)
    served = fake.find("InferenceService", "arrests")
    assert served["spec"]["canary"][0]["trafficPercent"] == 10
    assert "serving.kserve.io/touched" in served["metadata"]["annotations"]


def test_the_status_mirror_never_overwrites_a_condition_the_reconcile_wrote_meanwhile(fake: FakeKube) -> None:
    """The InferenceService's events and the reconcile both write status.conditions (a list a merge patch
    replaces whole): the mirror's patch carries the resourceVersion it read, so a stale one is refused and
    recomputed, and VersionAdmitted True written meanwhile by the reconcile stays."""
    put_versions(fake, 1)
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert error is None
    key = ("modeldeployments", "ml", "arrests")
    stale = [dict(c, status="False", reason="VersionRejected") if c["type"] == "VersionAdmitted" else c
             for c in fake.objects[key]["status"]["conditions"]]  # fmt: skip
    fake.objects[key]["status"]["conditions"] = stale
    read, reconciled = fake.get, []

    def racing_get(kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = read(kind, namespace, name)
        if kind.kind == "ModelDeployment" and not reconciled:  # the reconcile's status write lands right after
            reconciled.append(True)
            fake.patch(kind, namespace, name, {"status": {"conditions": [
                dict(c, status="True", reason="Admitted") if c["type"] == "VersionAdmitted" else c for c in stale
            ]}}, subresource="status")  # fmt: skip
        return obj

    served = fake.find("InferenceService", "arrests")
    served["status"] = {"url": "http://arrests.ml", "conditions": [{"type": "Ready", "status": "True"}]}
    fake.get = racing_get
    assert deployment_handlers.sync_modeldeployment_status(served)["ready"] is True  # KServe's news: something to write
    fake.get = read
    (admitted,) = [c for c in fake.objects[key]["status"]["conditions"] if c["type"] == "VersionAdmitted"]
    assert (admitted["status"], admitted["reason"]) == ("True", "Admitted")
