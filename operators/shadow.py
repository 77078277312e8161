"""ModelDeployment spec.shadow -> the shadow InferenceService and the mirror on the HTTPRoute (Standard mode).

A shadow version receives a copy of live requests and never answers a user: the Gateway mirrors
``spec.shadow.percent`` of the requests the HTTPRoute (operators.httproute) matches to the shadow's predictor
Service with a ``RequestMirror`` filter, and discards its answers.

- The shadow runs in its own InferenceService ``<md>-shadow`` (owned by the ModelDeployment), its predictor shaped
  like the stable one (the same resources and autoscaling, with its drift sidecar) serving
  ``spec.shadow.version``; KServe names its Service ``<md>-shadow-predictor``. A separate InferenceService, not a
  ``spec.canary[]`` entry: KServe sizes a canary entry from its traffic share with fixed replicas, while a shadow
  takes ``percent`` of all the traffic and scales like the stable.
- The mirror filter goes on the one rule of the HTTPRoute; ``percent`` is set below 100 (the Gateway API's
  HTTPRequestMirrorFilter mirrors everything without it).
- Once spec.shadow is gone (promoted to a canary, rejected, removed by hand) the mirror goes with the next reconcile
  and the shadow InferenceService is stopped (KServe's ``serving.kserve.io/stop: "true"``: its Deployment, Service
  and HPA are deleted, the object is kept: the operator deletes nothing). A later shadow starts it again.
- Knative mode has no HTTPRoute to mirror on (Knative splits traffic itself and has no mirror): a shadow there is
  refused, condition ``Shadow`` False reason ``NotInKnativeMode`` and a Warning Event, and nothing of it is created;
  likewise without a Gateway (reason ``NoGateway``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubeloop.api import ModelDeployment, ModelVersion
from operators import common, httproute
from operators import inferenceservice as isvc
from operators.settings import Settings

CONDITION = "Shadow"
ANNOTATION_STOP = "serving.kserve.io/stop"  # KServe: "true" deletes the InferenceService's workloads, keeps it
ANNOTATION_SHADOW_VERSION = "kubeloop.dev/shadow-version"


def desired_inferenceservice(
    md: ModelDeployment, versions: Mapping[int, ModelVersion], settings: Settings
) -> dict[str, Any]:
    """The shadow's InferenceService (spec.shadow set, Standard mode)."""
    shadow = md.spec.shadow
    assert shadow is not None
    name = isvc.shadow_isvc_name(md)
    predictor = isvc.predictor_spec(md, shadow.version, versions[shadow.version], "default", settings, name)
    predictor.update(isvc.autoscaling(md))
    annotations = {
        isvc.ANNOTATION_MODE: md.spec.deployment_mode,
        isvc.ANNOTATION_SCRAPE: "false",
        isvc.ANNOTATION_AUTOSCALER: "hpa",
        ANNOTATION_SHADOW_VERSION: str(shadow.version),
        ANNOTATION_STOP: "false",  # set by a patch when the shadow ends; the apply of a new shadow starts it again
    }
    labels = {**isvc.child_labels(md), common.LABEL_ROLE: "shadow"}
    return {
        "apiVersion": isvc.ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": common.metadata(md, name, isvc.COMPONENT, labels, annotations),
        "spec": {"predictor": predictor},
    }


def condition(md: ModelDeployment, settings: Settings) -> dict[str, Any] | None:
    """The ``Shadow`` condition: what mirrors traffic to the shadow, or why nothing does; None without spec.shadow."""
    shadow = md.spec.shadow
    if shadow is None:
        return None
    if md.spec.deployment_mode != "Standard":
        return common.condition(
            CONDITION, False, "NotInKnativeMode",
            f"shadow v{shadow.version} is not served: a shadow needs deploymentMode Standard, whose HTTPRoute "
            "mirrors requests (Knative has no request mirror); re-create the ModelDeployment in Standard mode",
        )  # fmt: skip
    if not httproute.routed(md, settings):
        return common.condition(
            CONDITION, False, "NoGateway",
            f"shadow v{shadow.version} is not served: mirroring needs kubeloop's HTTPRoute, and no Gateway is "
            "configured (operator setting KUBELOOP_GATEWAY, chart value gateway.name)",
        )  # fmt: skip
    return common.condition(
        CONDITION, True, "RequestMirror",
        f"HTTPRoute {httproute.route_name(md)} mirrors {shadow.percent}% of requests to v{shadow.version} "
        f"(InferenceService {isvc.shadow_isvc_name(md)}); its answers are discarded",
    )  # fmt: skip


def stop_patch(md: ModelDeployment, settings: Settings, existing: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The merge patch that stops the deployment's shadow InferenceService once no shadow is mirrored to (None:
    nothing to stop: none, not ours, wanted, or stopped already)."""
    if existing is None or httproute.mirrored(md, settings):
        return None
    if common.controller_uid(existing) != (md.metadata.model_extra or {}).get("uid"):
        return None
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    if annotations.get(ANNOTATION_STOP) == "true":
        return None
    return {"metadata": {"annotations": {ANNOTATION_STOP: "true"}}}
