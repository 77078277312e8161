"""spec.shadow in the cluster: the shadow InferenceService, the HTTPRoute's RequestMirror filter, the Shadow
condition, the refusal in Knative mode, the shadow stopped once it is gone (pure functions, then the handlers
against the in-memory API).

Upstream facts checked in the sources: gateway-api v1.7.0 ``config/crd/standard/gateway.networking.k8s.io_httproutes
.yaml``: ``rules[].filters[] {type: RequestMirror, requestMirror: {backendRef: {kind, name, port}, percent |
fraction}}`` (percent 0-100; neither: every request mirrored; a Service backendRef needs a port). KServe v0.20.0
``pkg/constants/constants.go`` StopAnnotationKey ``serving.kserve.io/stop``; with it "true" the predictor's
Deployment, Service and HPA reconcilers delete them (``reconcilers/deployment``, ``service``, ``hpa``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_operator_deployment_handlers import condition, put_versions, run_md
from test_operator_inferenceservice import deployment, version
from test_operator_shadow_analysis import MIRRORING, Signals

from operators import canary, deployment_handlers, httproute, shadow
from operators import inferenceservice as isvc
from operators.settings import Settings
from tests.support.fake_kube import FakeKube
from tests.support.handlerkit import installed_fake, sample

SETTINGS = Settings()
VERSIONS = {1: version(1), 3: version(3)}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    yield from installed_fake(monkeypatch)


def arg(container: dict[str, Any], flag: str) -> str:
    return container["args"][container["args"].index(flag) + 1]


def test_the_shadow_inferenceservice_is_the_stable_predictor_serving_the_shadow_version() -> None:
    md = deployment(shadow={"version": 3}, autoscaling={"minReplicas": 2, "maxReplicas": 4})
    stable = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)["spec"]["predictor"]
    obj = shadow.desired_inferenceservice(md, VERSIONS, SETTINGS)
    assert obj["metadata"]["name"] == "arrests-shadow" and obj["metadata"]["ownerReferences"][0]["uid"] == "md-uid"
    assert obj["metadata"]["labels"]["kubeloop.dev/role"] == "shadow"
    assert obj["metadata"]["annotations"] == {
        "serving.kserve.io/deploymentMode": "Standard", "serving.kserve.io/enable-prometheus-scraping": "false",
        "serving.kserve.io/autoscalerClass": "hpa", "kubeloop.dev/shadow-version": "3",
        "serving.kserve.io/stop": "false",
    }  # fmt: skip
    predictor = obj["spec"]["predictor"]
    assert list(obj["spec"]) == ["predictor"]  # no canary entry: it answers nobody
    for key in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "logger", "volumes"):
        assert predictor[key] == stable[key], key
    server, sidecar = predictor["containers"]
    assert arg(server, "--model-version") == "/etc/kubeloop/versions/v3.yaml"
    assert arg(server, "--inference-service") == "arrests-shadow"
    assert server["resources"] == stable["containers"][0]["resources"]
    assert sidecar["name"] == "drift-detector" and arg(sidecar, "--default-version") == "3"
    assert predictor["labels"]["kubeloop.dev/version"] == "3"


def test_the_route_mirrors_the_shadow_percent_to_its_predictor_service() -> None:
    (rule,) = httproute.desired_httproute(deployment(shadow={"version": 3}), SETTINGS)["spec"]["rules"]
    assert rule["filters"] == [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"kind": "Service", "name": "arrests-shadow-predictor", "port": 80}}}]  # fmt: skip
    (rule,) = httproute.desired_httproute(deployment(shadow={"version": 3, "percent": 30}), SETTINGS)["spec"]["rules"]
    assert rule["filters"][0]["requestMirror"]["percent"] == 30
    assert [ref["name"] for ref in rule["backendRefs"]] == ["arrests-predictor"]  # the shadow answers nobody
    (rule,) = httproute.desired_httproute(deployment(), SETTINGS)["spec"]["rules"]
    assert "filters" not in rule


def test_the_shadow_condition_says_what_mirrors_or_why_nothing_does() -> None:
    assert shadow.condition(deployment(), SETTINGS) is None
    mirror = shadow.condition(deployment(shadow={"version": 3, "percent": 30}), SETTINGS)
    assert (mirror["status"], mirror["reason"]) == ("True", "RequestMirror")
    assert mirror["message"] == (
        "HTTPRoute arrests mirrors 30% of requests to v3 (InferenceService arrests-shadow); its answers are discarded"
    )
    knative = shadow.condition(deployment(shadow={"version": 3}, deploymentMode="Knative"), SETTINGS)
    assert (knative["status"], knative["reason"]) == ("False", "NotInKnativeMode")
    assert "needs deploymentMode Standard" in knative["message"]
    no_gateway = shadow.condition(deployment(shadow={"version": 3}), Settings(gateway=""))
    assert (no_gateway["status"], no_gateway["reason"]) == ("False", "NoGateway")


def stop_annotation(fake: FakeKube) -> str:
    return fake.find("InferenceService", "arrests-shadow")["metadata"]["annotations"]["serving.kserve.io/stop"]


def test_reconcile_serves_the_shadow_and_stops_it_once_it_is_gone(fake: FakeKube) -> None:
    put_versions(fake, 1, 3)
    md, error = run_md(fake, fake.put(sample("modeldeployment", shadow={"version": 3, "percent": 25})))
    assert error is None
    assert condition(md, "Shadow")[:2] == ("True", "RequestMirror")
    obj = fake.find("InferenceService", "arrests-shadow")
    assert obj["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    assert set(fake.find("ConfigMap", "arrests-model-versions")["data"]) == {"v1.yaml", "v3.yaml"}
    (rule,) = fake.find("HTTPRoute", "arrests")["spec"]["rules"]
    assert rule["filters"][0]["requestMirror"]["percent"] == 25
    assert ("Normal", "Created", "InferenceService arrests-shadow created") in fake.events
    # KServe's events on the shadow's InferenceService are not the deployment's status
    obj["status"] = {"url": "http://arrests-shadow-ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}
    assert deployment_handlers.sync_modeldeployment_status(obj) is None

    del md["spec"]["shadow"]  # promoted, rejected, or removed by hand
    md, error = run_md(fake, md)
    assert error is None
    assert "filters" not in fake.find("HTTPRoute", "arrests")["spec"]["rules"][0]
    assert stop_annotation(fake) == "true"
    assert ("Normal", "ShadowStopped", "InferenceService arrests-shadow stopped: no shadow to mirror to") in fake.events
    assert "Shadow" not in [c["type"] for c in md["status"]["conditions"]]
    fake.writes.clear()
    run_md(fake, md)
    assert [w for w in fake.writes if w[0] != "patch/status"] == []  # stopped once

    md["spec"]["shadow"] = {"version": 3}  # a new shadow starts it again
    run_md(fake, md)
    assert stop_annotation(fake) == "false"


def test_a_shadow_in_knative_mode_is_refused_and_nothing_of_it_is_created(fake: FakeKube) -> None:
    put_versions(fake, 1, 3)
    md = fake.put(sample("modeldeployment", shadow={"version": 3}, deploymentMode="Knative"))
    md, error = run_md(fake, md)
    assert error is None  # the stable is served as asked
    status, reason, message = condition(md, "Shadow")
    assert (status, reason) == ("False", "NotInKnativeMode")
    assert ("Warning", "ShadowNotServed", message) in fake.events
    assert [o["metadata"]["name"] for o in fake.of_kind("InferenceService")] == ["arrests"]
    assert fake.of_kind("HTTPRoute") == []


def test_a_rejected_shadow_version_is_refused_like_a_canary(fake: FakeKube) -> None:
    put_versions(fake, 1, 3)
    fake.find("ModelVersion", "arrests-v3")["spec"].update(stage="Rejected", stageReason="rolled back: error rate")
    md, _ = run_md(fake, fake.put(sample("modeldeployment", shadow={"version": 3})))
    status, reason, message = condition(md, "VersionAdmitted")
    assert (status, reason) == ("False", "VersionRejected")
    assert message.startswith("spec.shadow.version: arrests:3 is Rejected (rolled back: error rate): ")
    assert fake.of_kind("InferenceService") == []


def test_the_timer_judges_the_shadow_only_in_a_tick_no_other_writer_of_history_acted(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(canary, "prometheus_source", lambda settings: Signals())
    put_versions(fake, 1, 2, 3)
    fake.put(sample("modeldeployment", canary={"version": 2, "analysis": {"interval": "1h"}}, shadow={"version": 3}))
    fake.find("ModelDeployment", "arrests")["status"] = {"conditions": [MIRRORING]}

    def history() -> list[str]:
        return [e["action"] for e in fake.find("ModelDeployment", "arrests")["status"].get("history") or []]

    deployment_handlers.watch_modeldeployment(body=fake.find("ModelDeployment", "arrests"))
    assert history() == ["start"]  # the canary's start: the shadow waits for the next tick
    deployment_handlers.watch_modeldeployment(body=fake.find("ModelDeployment", "arrests"))
    assert history() == ["start", "shadowStart"]  # the canary's interval has not ended: the shadow's turn
