"""ModelDeployment -> Gateway API HTTPRoute (gateway.networking.k8s.io/v1): the Standard-mode traffic split.

KServe v0.20 runs each Standard-mode canary (an entry of ``spec.canary[]``) as its own Deployment and Service,
``<isvc>-<predictor name>-predictor`` (kubeloop's: ``<isvc>-v<N>-predictor``) beside the stable's
``<isvc>-predictor``, but routes only to the stable: the split is kubeloop's. One HTTPRoute per ModelDeployment,
named after it and owned by it, attached to the operator's Gateway (``Settings.gateway``), for the host
``<deployment>.<namespace>.<gateway_domain>``; one rule whose backendRefs weigh the stable Service 100-p and the
canary's p (p = ``spec.canary.trafficPercent``), or the stable alone at 100 when there is no canary (promoted,
rolled back, never started). KServe's own route (when its Gateway API ingress is on) has the host
``<isvc>-<namespace>.<ingress domain>``, never one of these (no dot between name and namespace), so the two never
claim the same host.

The canary is weighted in only once KServe reports its Deployment ready (``status.canaryStatuses``): a Gateway
answers 500/503 for the share it sends to a Service without ready endpoints, and the canary analysis would judge
those errors, which no model server saw.

A shadow (``spec.shadow``, operators.shadow) adds a ``RequestMirror`` filter to the rule: ``percent`` of the
requests are copied to the shadow InferenceService's predictor Service ``<md>-shadow-predictor`` and its answers
discarded.

The backends are KServe's raw Services: port 80 (``CommonDefaultHttpPort``), forwarding to the server's port (or to
KServe's logger agent in front of it). Knative mode has no HTTPRoute (Knative splits with
``canaryTrafficPercent``), nor does an operator without a Gateway: a canary then gets no traffic, which the
``TrafficSplit`` condition says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubeloop.api import ModelDeployment
from operators import common
from operators import inferenceservice as isvc
from operators.settings import Settings, current

API_VERSION = "gateway.networking.k8s.io/v1"
SERVICE_PORT = 80  # KServe's raw predictor Services (reconcilers/service: constants.CommonDefaultHttpPort)
CONDITION = "TrafficSplit"
CANARY_NOT_READY = "CanaryNotReady"  # the condition's reason while the route holds the canary's share back


def route_name(md: ModelDeployment) -> str:
    return md.metadata.name


def hostname(md: ModelDeployment, settings: Settings) -> str:
    return f"{md.metadata.name}.{md.metadata.namespace}.{settings.gateway_domain}"


def routed(md: ModelDeployment, settings: Settings) -> bool:
    """Whether kubeloop owns the deployment's traffic split: Standard mode with a Gateway configured."""
    return md.spec.deployment_mode == "Standard" and settings.gateway_ref is not None


def url(md: ModelDeployment, settings: Settings) -> str:
    return f"http://{hostname(md, settings)}"


def stable_service(md: ModelDeployment) -> str:
    return f"{isvc.isvc_name(md)}-predictor"


def canary_service(md: ModelDeployment, version: int) -> str:
    return f"{isvc.isvc_name(md)}-{isvc.canary_predictor_name(version)}-predictor"


def shadow_service(md: ModelDeployment) -> str:
    """KServe's predictor Service of the shadow InferenceService (operators.shadow)."""
    return f"{isvc.shadow_isvc_name(md)}-predictor"


def mirrored(md: ModelDeployment, settings: Settings) -> bool:
    """Whether the deployment's shadow gets mirrored traffic: spec.shadow set, and an HTTPRoute to mirror on."""
    return md.spec.shadow is not None and routed(md, settings)


def mirror_filter(md: ModelDeployment) -> dict[str, Any] | None:
    """The rule's RequestMirror filter to the shadow's predictor Service (None without spec.shadow); ``percent``
    only below 100 (without it the Gateway API mirrors every request)."""
    shadow = md.spec.shadow
    if shadow is None:
        return None
    mirror: dict[str, Any] = {"backendRef": {"kind": "Service", "name": shadow_service(md), "port": SERVICE_PORT}}
    if shadow.percent < 100:
        mirror["percent"] = shadow.percent
    return {"type": "RequestMirror", "requestMirror": mirror}


def canary_ready(md: ModelDeployment, inferenceservice: Mapping[str, Any] | None) -> bool:
    """Whether KServe reports the deployment's canary ready (a Deployment with an available replica)."""
    if md.spec.canary is None or not inferenceservice:
        return False
    name = isvc.canary_predictor_name(md.spec.canary.version)
    for entry in (inferenceservice.get("status") or {}).get("canaryStatuses") or []:
        if entry.get("name") == name:
            return entry.get("ready") is True
    return False


def weights(md: ModelDeployment, canary_live: bool = True) -> list[tuple[int, int]]:
    """(version, weight) per backend: the split asked for, or the stable alone until the canary is live."""
    canary = md.spec.canary
    if canary is None or not canary_live:
        return [(md.spec.version, 100)]
    return [(md.spec.version, 100 - canary.traffic_percent), (canary.version, canary.traffic_percent)]


def desired_httproute(
    md: ModelDeployment, settings: Settings | None = None, canary_live: bool = True
) -> dict[str, Any] | None:
    """The HTTPRoute of a ModelDeployment; None when it has none (Knative mode, no Gateway configured).

    ``canary_live`` False keeps the canary out of the backends (KServe has not reported it ready yet).
    """
    settings = settings or current()
    gateway = settings.gateway_ref
    if gateway is None or md.spec.deployment_mode != "Standard":
        return None
    namespace, name = gateway
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name}
    if namespace is not None:
        parent["namespace"] = namespace
    backends = [
        {
            "kind": "Service",
            "name": stable_service(md) if version == md.spec.version else canary_service(md, version),
            "port": SERVICE_PORT,
            "weight": weight,
        }
        for version, weight in weights(md, canary_live)
    ]
    labels = {common.LABEL_MODELDEPLOYMENT: md.metadata.name, common.LABEL_MODEL: md.spec.model}
    rule: dict[str, Any] = {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": backends}
    mirror = mirror_filter(md)
    if mirror is not None:
        rule["filters"] = [mirror]
    return {
        "apiVersion": API_VERSION,
        "kind": "HTTPRoute",
        "metadata": common.metadata(md, route_name(md), isvc.COMPONENT, labels),
        "spec": {"parentRefs": [parent], "hostnames": [hostname(md, settings)], "rules": [rule]},
    }


def traffic_condition(md: ModelDeployment, settings: Settings, canary_live: bool = True) -> dict[str, Any] | None:
    """The ``TrafficSplit`` condition (Standard mode; None in Knative mode): what splits the traffic, or why not."""
    if md.spec.deployment_mode != "Standard":
        return None
    canary = md.spec.canary
    if not routed(md, settings):
        if canary is None:
            return common.condition(
                CONDITION, True, "KServeRoute",
                f"all traffic to v{md.spec.version} through KServe's own route; no Gateway is configured "
                "(operator setting KUBELOOP_GATEWAY, chart value gateway.name), so a canary would get none",
            )  # fmt: skip
        return common.condition(
            CONDITION, False, "NoGateway",
            f"canary v{canary.version} runs but gets no traffic: no Gateway is configured (operator setting "
            "KUBELOOP_GATEWAY, chart value gateway.name) for kubeloop's weighted HTTPRoute, and KServe routes only "
            f"to the stable v{md.spec.version}",
        )  # fmt: skip
    split = ", ".join(f"v{version} {weight}%" for version, weight in weights(md))
    where = f"HTTPRoute {route_name(md)} on Gateway {settings.gateway}"
    if canary is not None and not canary_live:
        return common.condition(
            CONDITION, False, CANARY_NOT_READY,
            f"{where}: all traffic to v{md.spec.version} until KServe reports canary v{canary.version} ready, "
            f"then {split}",
        )  # fmt: skip
    return common.condition(CONDITION, True, "HTTPRoute", f"{where}: {split}")


def canary_waiting(status: Mapping[str, Any]) -> bool:
    """Whether a ModelDeployment's status says the route still holds its canary's share back (KServe has not
    reported the canary ready): nothing the canary served can be judged yet."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == CONDITION:
            return cond.get("status") == "False" and cond.get("reason") == CANARY_NOT_READY
    return False
