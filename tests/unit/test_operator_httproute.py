"""ModelDeployment -> Gateway API HTTPRoute: the Standard-mode split kubeloop applies, weight by weight.

Upstream facts checked in the sources (KServe v0.20.0, gateway-api v1.7.0):

kserve ``pkg/controller/v1beta1/inferenceservice/components/predictor.go`` (reconcileCanaryDeployments): each
  ``spec.canary[]`` entry gets a Deployment and a Service ``constants.PredictorServiceName(isvc, predictor.name)``
  = ``<isvc>-<name>-predictor``, the stable's is ``<isvc>-predictor``; ``status.canaryStatuses[] {name, ready,
  trafficPercent}``, ready = the canary Deployment has an available replica. No weighted route is written
  (``reconcilers/ingress/httproute_reconciler.go`` routes only to the stable).
kserve ``pkg/controller/v1beta1/inferenceservice/reconcilers/service/service_reconciler.go`` (createDefaultSvc):
  the Service's first port is ``constants.CommonDefaultHttpPort`` = 80, whatever the container port.
kserve ``config/configmap/inferenceservice.yaml``: KServe's own hosts are ``{{ .Name }}-{{ .Namespace }}.{{
  .IngressDomain }}``.
gateway-api ``apis/v1/httproute_types.go``: ``spec.parentRefs[] {group, kind, namespace, name}``,
  ``spec.hostnames[]``, ``spec.rules[].backendRefs[] {kind, name, port, weight}`` (weight 0-1,000,000; the share of
  a backend is its weight over the sum).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_operator_inferenceservice import deployment

from operators import httproute
from operators.settings import Settings

SETTINGS = Settings()  # Gateway kserve/kserve-ingress-gateway, domain example.com


def backends(route: dict[str, Any]) -> list[tuple[str, int, int]]:
    (rule,) = route["spec"]["rules"]
    return [(ref["name"], ref["port"], ref["weight"]) for ref in rule["backendRefs"]]


def test_stable_only_route_on_the_configured_gateway() -> None:
    route = httproute.desired_httproute(deployment(), SETTINGS)
    assert route is not None
    assert (route["apiVersion"], route["kind"]) == ("gateway.networking.k8s.io/v1", "HTTPRoute")
    meta = route["metadata"]
    assert (meta["name"], meta["namespace"]) == ("arrests", "ml")
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ModelDeployment",
        "arrests",
        "md-uid",
        True,
    )
    assert meta["labels"]["kubeloop.dev/modeldeployment"] == "arrests"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubeloop-operator"
    spec = route["spec"]
    (parent,) = spec["parentRefs"]
    assert parent == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "kserve-ingress-gateway",
        "namespace": "kserve",
    }
    assert spec["hostnames"] == ["arrests.ml.example.com"]
    # never KServe's own host for the same InferenceService (<isvc>-<namespace>.<ingress domain>)
    assert "arrests-ml.example.com" not in spec["hostnames"]
    (rule,) = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert [ref["kind"] for ref in rule["backendRefs"]] == ["Service"]
    assert backends(route) == [("arrests-predictor", 80, 100)]
    assert httproute.url(deployment(), SETTINGS) == "http://arrests.ml.example.com"


@pytest.mark.parametrize("percent", [10, 25, 50, 100])
def test_canary_weights_at_each_step(percent: int) -> None:
    md = deployment(canary={"version": 2, "trafficPercent": percent})
    route = httproute.desired_httproute(md, SETTINGS)
    assert route is not None
    assert backends(route) == [("arrests-predictor", 80, 100 - percent), ("arrests-v2-predictor", 80, percent)]
    condition = httproute.traffic_condition(md, SETTINGS)
    assert condition is not None
    assert (condition["type"], condition["status"], condition["reason"]) == ("TrafficSplit", "True", "HTTPRoute")
    assert f"v1 {100 - percent}%, v2 {percent}%" in condition["message"]


def test_canary_gets_weight_only_once_kserve_reports_it_ready() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 25})
    assert not httproute.canary_ready(md, None)
    assert not httproute.canary_ready(md, {"status": {}})
    not_yet = {"status": {"canaryStatuses": [{"name": "v2", "ready": False, "trafficPercent": 25}]}}
    ready = {"status": {"canaryStatuses": [{"name": "v2", "ready": True, "trafficPercent": 25}]}}
    other = {"status": {"canaryStatuses": [{"name": "v3", "ready": True, "trafficPercent": 25}]}}
    assert not httproute.canary_ready(md, not_yet)
    assert not httproute.canary_ready(md, other)
    assert httproute.canary_ready(md, ready)
    route = httproute.desired_httproute(md, SETTINGS, canary_live=False)
    assert route is not None
    assert backends(route) == [("arrests-predictor", 80, 100)]
    condition = httproute.traffic_condition(md, SETTINGS, canary_live=False)
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "CanaryNotReady")
    assert "v1 75%, v2 25%" in condition["message"]


def test_promoted_and_rolled_back_route_only_to_the_stable() -> None:
    promoted = deployment(version=2)  # spec.version = the candidate, spec.canary removed
    route = httproute.desired_httproute(promoted, SETTINGS)
    assert route is not None
    assert backends(route) == [("arrests-predictor", 80, 100)]
    rolled_back = deployment()  # spec.canary removed, the stable unchanged
    route = httproute.desired_httproute(rolled_back, SETTINGS)
    assert route is not None
    assert backends(route) == [("arrests-predictor", 80, 100)]
    condition = httproute.traffic_condition(promoted, SETTINGS)
    assert condition is not None
    assert (condition["status"], condition["message"]) == (
        "True",
        "HTTPRoute arrests on Gateway kserve/kserve-ingress-gateway: v2 100%",
    )


def test_a_gateway_in_the_deployments_namespace_and_another_domain() -> None:
    settings = Settings(gateway="edge", gateway_domain="models.internal")
    route = httproute.desired_httproute(deployment(), settings)
    assert route is not None
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}]
    assert route["spec"]["hostnames"] == ["arrests.ml.models.internal"]


def test_no_gateway_no_route_and_a_canary_is_said_to_get_no_traffic() -> None:
    settings = Settings(gateway="")
    md = deployment(canary={"version": 2, "trafficPercent": 10})
    assert httproute.desired_httproute(md, settings) is None
    assert not httproute.routed(md, settings)
    condition = httproute.traffic_condition(md, settings)
    assert condition is not None
    assert (condition["type"], condition["status"], condition["reason"]) == ("TrafficSplit", "False", "NoGateway")
    assert "canary v2 runs but gets no traffic" in condition["message"]
    assert "gateway.name" in condition["message"]
    stable_only = httproute.traffic_condition(deployment(), settings)
    assert stable_only is not None
    assert (stable_only["status"], stable_only["reason"]) == ("True", "KServeRoute")


def test_knative_has_no_route_and_no_condition() -> None:
    md = deployment(deploymentMode="Knative", canary={"version": 2, "trafficPercent": 10})
    assert httproute.desired_httproute(md, SETTINGS) is None
    assert not httproute.routed(md, SETTINGS)
    assert httproute.traffic_condition(md, SETTINGS) is None


def test_gateway_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELOOP_GATEWAY", "infra/public")
    monkeypatch.setenv("KUBELOOP_GATEWAY_DOMAIN", "ml.example.org")
    settings = Settings.from_env()
    assert settings.gateway_ref == ("infra", "public")
    assert settings.gateway_domain == "ml.example.org"
    monkeypatch.setenv("KUBELOOP_GATEWAY", "public")
    assert Settings.from_env().gateway_ref == (None, "public")
    monkeypatch.setenv("KUBELOOP_GATEWAY", "")
    assert Settings.from_env().gateway_ref is None
    for bad in ("a/b/c", "infra/", "Public"):
        monkeypatch.setenv("KUBELOOP_GATEWAY", bad)
        with pytest.raises(ValueError, match="KUBELOOP_GATEWAY"):
            Settings.from_env()
    monkeypatch.setenv("KUBELOOP_GATEWAY", "infra/public")
    monkeypatch.setenv("KUBELOOP_GATEWAY_DOMAIN", "")
    with pytest.raises(ValueError, match="KUBELOOP_GATEWAY_DOMAIN"):
        Settings.from_env()
