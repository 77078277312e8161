"""The kopf handlers of ModelDeployments.

- ModelDeployment create/update/resume -> resolve its ModelVersions, apply the versions ConfigMap, the
  InferenceService and (Standard mode, a Gateway configured) the HTTPRoute that splits stable and canary traffic
  and mirrors requests to the shadow, whose own InferenceService is applied too (or stopped once it is gone);
  a spec naming a Rejected version without spec.allowRejected is refused (condition VersionAdmitted False, a
  Warning Event) and nothing of it applied.
- InferenceService events -> mirror URL, readiness and conditions into the ModelDeployment.
- Every few seconds per ModelDeployment, on Prometheus signals: each served version's outcomes on ground truth
  (operators.outcomes), its drift flag mirrored and retraining on a sustained trigger (operators.retrain), the
  canary analysis (operators.canary), the shadow analysis (operators.shadow_analysis).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from kubeloop.api import GROUP, VERSION, ModelDeployment, ModelVersion, Resource
from kubeloop.errors import SpecError
from kubeloop.kube import ApiError
from operators import canary, common, handlers, httproute, outcomes, retrain, shadow, shadow_analysis
from operators import inferenceservice as isvc
from operators.settings import current

log = logging.getLogger("operators")


# --- ModelDeployment -> InferenceService ----------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "modeldeployments")
@kopf.on.create(GROUP, VERSION, "modeldeployments")
@kopf.on.update(GROUP, VERSION, "modeldeployments")
@handlers.timed("ModelDeployment")
def reconcile_modeldeployment(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Resolve the ModelVersions, then apply the versions ConfigMap, the InferenceService and the HTTPRoute."""
    md = handlers.parse_valid(body, patch, ModelDeployment)
    settings = handlers.settings()
    status = handlers.plain(body.get("status") or {})
    if any(c.get("type") == "Valid" for c in status.get("conditions") or []):  # it was invalid, and is valid now
        status["conditions"] = [c for c in status["conditions"] if c.get("type") != "Valid"]
        patch.status["conditions"] = status["conditions"]
    versions, problems = resolve_versions(md)
    if problems:
        reason, message = problems
        patch.status["ready"] = False
        patch.status["conditions"] = common.merge_conditions(
            status.get("conditions"), [common.condition("Ready", False, reason, message)], _generation(md)
        )
        handlers.emit(body, "Warning", reason, message)
        raise kopf.TemporaryError(message, delay=settings.retry_delay)
    existing = handlers.kube().get(handlers.INFERENCESERVICE, md.metadata.namespace, isvc.isvc_name(md))
    admission = isvc.admission(md, versions)
    status["conditions"] = common.merge_conditions(status.get("conditions"), [admission], _generation(md))
    if admission["status"] == "False":
        _refuse(body, patch, md, status, existing is None, admission["message"])
    if admission["reason"] == "RejectedAllowed":
        handlers.emit(body, "Warning", "RejectedVersionServed", admission["message"])
    with_canary = not (
        md.spec.canary is not None and md.spec.deployment_mode == "Knative" and not isvc.stable_rolled_out(existing)
    )
    for version, mv in versions.items():
        if not mv.spec.artifact_uri.startswith(("file://", "/")):
            handlers.emit(
                body,
                "Warning",
                "ArtifactNotOnVolume",
                f"v{version}: artifactUri {mv.spec.artifact_uri} is not a file:// path on the kubeloop volume; "
                "the serving image loads artifacts from KUBELOOP_HOME",
            )
    canary_live = httproute.canary_ready(md, existing)
    route = httproute.desired_httproute(md, settings, canary_live)
    children = [
        isvc.desired_versions_configmap(md, versions),
        isvc.desired_inferenceservice(md, versions, settings, with_canary),
    ]
    done = handlers.apply_children(body, [(child, False) for child in children + ([route] if route else [])])
    _, obj = done["InferenceService"]
    _serve_shadow(body, md, versions)
    new = isvc.modeldeployment_status(md, obj, status, with_canary, httproute.url(md, settings) if route else None)
    traffic = httproute.traffic_condition(md, settings, canary_live)
    if traffic is not None:
        new["conditions"] = common.merge_conditions(new["conditions"], [traffic], _generation(md))
        if traffic["reason"] == "NoGateway":
            handlers.emit(body, "Warning", "CanaryWithoutTraffic", traffic["message"])
    mirror = shadow.condition(md, settings)
    if mirror is not None:
        new["conditions"] = common.merge_conditions(new["conditions"], [mirror], _generation(md))
    else:
        new["conditions"] = [c for c in new["conditions"] if c.get("type") != shadow.CONDITION]
    for key, value in new.items():
        patch.status[key] = value
    if not with_canary:
        raise kopf.TemporaryError(
            f"canary v{md.spec.canary.version} waits for KServe to roll out v{md.spec.version}",  # type: ignore[union-attr]
            delay=settings.retry_delay,
        )
    if route and md.spec.canary is not None and not canary_live:
        message = f"canary v{md.spec.canary.version} gets its traffic once KServe reports it ready"
        raise kopf.TemporaryError(message, delay=settings.retry_delay)


def _serve_shadow(body: Mapping[str, Any], md: ModelDeployment, versions: Mapping[int, ModelVersion]) -> None:
    """Apply the shadow's InferenceService when the HTTPRoute mirrors to it; else say why a shadow is not served,
    and stop the one a former shadow left (operators.shadow)."""
    settings, kube = handlers.settings(), handlers.kube()
    if httproute.mirrored(md, settings):
        handlers.apply_children(body, [(shadow.desired_inferenceservice(md, versions, settings), False)])
        return
    refusal = shadow.condition(md, settings)
    if refusal is not None:
        handlers.emit(body, "Warning", "ShadowNotServed", refusal["message"])
    name = isvc.shadow_isvc_name(md)
    stop = shadow.stop_patch(md, settings, kube.get(handlers.INFERENCESERVICE, md.metadata.namespace, name))
    if stop is not None:
        kube.patch(handlers.INFERENCESERVICE, md.metadata.namespace, name, stop)
        handlers.emit(body, "Normal", "ShadowStopped", f"InferenceService {name} stopped: no shadow to mirror to")


def _refuse(
    body: Mapping[str, Any],
    patch: kopf.Patch,
    md: ModelDeployment,
    status: dict[str, Any],
    unserved: bool,
    message: str,
) -> None:
    """Apply nothing of a spec that names a Rejected version: say why on the ModelDeployment, until its spec changes.

    ``unserved``: no InferenceService exists, so nothing serves (else it serves the last spec admitted, and its
    readiness stays what KServe reports)."""
    conditions = status["conditions"]
    if unserved:
        patch.status["ready"] = False
        ready = common.condition("Ready", False, "VersionRejected", "nothing is served: " + message)
        conditions = common.merge_conditions(conditions, [ready], _generation(md))
    patch.status["conditions"] = conditions
    handlers.emit(body, "Warning", "VersionRejected", message)
    raise kopf.PermanentError(message)


def _generation(resource: Resource) -> int | None:
    generation = (resource.metadata.model_extra or {}).get("generation")
    return int(generation) if generation is not None else None


def resolve_versions(md: ModelDeployment) -> tuple[dict[int, ModelVersion], tuple[str, str] | None]:
    """The ModelVersions a deployment names, or (reason, message) saying why it cannot be served yet (a Rejected
    one is returned: whether it may be served is operators.inferenceservice.admission's call)."""
    versions: dict[int, ModelVersion] = {}
    missing: list[str] = []
    for version in isvc.wanted_versions(md):
        name = ModelVersion.resource_name(md.spec.model, version)
        body = handlers.kube().get(handlers.MODELVERSION, md.metadata.namespace, name)
        if body is None:
            missing.append(name)
            continue
        try:
            mv = handlers.parse(body)
        except SpecError as error:
            return {}, ("ModelVersionInvalid", str(error))
        assert isinstance(mv, ModelVersion)
        if mv.spec.model != md.spec.model or mv.spec.version != version:
            return {}, ("ModelVersionMismatch", f"ModelVersion {name} is {mv.spec.model} v{mv.spec.version}")
        versions[version] = mv
    if missing:
        return {}, ("ModelVersionNotFound", f"no ModelVersion {', '.join(missing)} in {md.metadata.namespace}")
    return versions, None


@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels={common.LABEL_MODELDEPLOYMENT: kopf.PRESENT})
def on_inferenceservice_event(body: Mapping[str, Any], type: str | None, **_: Any) -> None:
    if type == "DELETED":
        return
    sync_modeldeployment_status(handlers.plain(body))


def sync_modeldeployment_status(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mirror an InferenceService's URL, readiness and conditions into its ModelDeployment.

    The status patch carries the resourceVersion it was computed from: the reconcile writes the same conditions
    list (VersionAdmitted, say), and a merge patch replaces the whole list, so a stale one is refused (409) and
    computed again from what the reconcile wrote."""
    for attempt in range(1, _STATUS_ATTEMPTS + 1):
        try:
            return _sync_modeldeployment_status(obj)
        except ApiError as error:
            if error.status != 409 or attempt == _STATUS_ATTEMPTS:
                raise
    return None


_STATUS_ATTEMPTS = 5


def _sync_modeldeployment_status(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    meta = obj.get("metadata") or {}
    owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "ModelDeployment"), None)
    if owner is None:
        return None
    body = handlers.kube().get(handlers.MODELDEPLOYMENT, meta.get("namespace"), owner["name"])
    if body is None or (body.get("metadata") or {}).get("uid") != owner.get("uid"):
        return None
    try:
        md = handlers.parse(body)
    except SpecError:
        return None
    assert isinstance(md, ModelDeployment)
    if meta.get("name") != isvc.isvc_name(md):  # the shadow's: it answers no user, the deployment's status is not its
        return None
    old = body.get("status") or {}
    with_canary = "kubeloop.dev/canary-waiting" not in (meta.get("annotations") or {})
    new = isvc.modeldeployment_status(md, obj, old, with_canary, _route_url(md, body))
    if old.get("ready") is not True and new.get("ready") is True:
        handlers.emit(body, "Normal", "Ready", f"InferenceService {meta.get('name')} is ready at {new.get('url')}")
    if handlers.unchanged(old, new):
        return None
    read = {"resourceVersion": body["metadata"]["resourceVersion"]}  # the apiserver's precondition on the write
    patch = {"metadata": read, "status": new}
    handlers.kube().patch(
        handlers.MODELDEPLOYMENT, md.metadata.namespace, md.metadata.name, patch, subresource="status"
    )
    return new


def _route_url(md: ModelDeployment, body: Mapping[str, Any]) -> str | None:
    """The URL of the deployment's HTTPRoute, when it has one and the route is there."""
    settings = handlers.settings()
    if not httproute.routed(md, settings):
        return None
    route = handlers.kube().get(handlers.HTTPROUTE, md.metadata.namespace, httproute.route_name(md))
    if route is None or common.controller_uid(route) != (body.get("metadata") or {}).get("uid"):
        return None
    return httproute.url(md, settings)


# --- drift, retraining and canary analysis, on Prometheus signals (operators.retrain, operators.canary) --------------


@kopf.timer(GROUP, VERSION, "modeldeployments", interval=current().analysis_tick_seconds, idle=0)
def watch_modeldeployment(body: Mapping[str, Any], **_: Any) -> None:
    """Outcomes (they touch no history); then drift and retraining; the canary analysis only when retrain changed
    neither spec nor history this tick, the shadow's only when neither did (they all write status.history from the
    same body, so one writer per tick keeps every entry)."""
    deployment, source, kube = handlers.plain(body), canary.prometheus_source(handlers.settings()), handlers.kube()
    outcomes.tick(deployment, kube, source)
    if retrain.tick(deployment, kube, handlers.emit, source) is not None:
        return
    spec = deployment["spec"]
    if (spec.get("canary") or {}).get("analysis") and canary.tick(deployment, kube, handlers.emit, source):
        return
    if spec.get("shadow"):
        shadow_analysis.tick(deployment, kube, handlers.emit, source)
