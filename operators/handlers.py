"""The kopf handlers: small, level-triggered, idempotent.

- TrainingJob create/update/resume -> apply its children (ConfigMap, ServiceAccount, RayJob, Role, RoleBinding).
- RayJob events -> mirror the RayJob's status into its TrainingJob; once it ends, register the ModelVersion the
  run reported.
- ModelDeployment create/update/resume -> resolve its ModelVersions, apply the versions ConfigMap, the
  InferenceService and (Standard mode, a Gateway configured) the HTTPRoute that splits stable and canary traffic;
  a spec naming a Rejected version without spec.allowRejected is refused (condition VersionAdmitted False, a
  Warning Event) and nothing of it applied.
- InferenceService events -> mirror URL, readiness and conditions into the ModelDeployment.
- Every few seconds per ModelDeployment: its drift flag mirrored, retraining on sustained drift (operators.retrain),
  the canary analysis (operators.canary), on Prometheus signals.

Every handler computes the desired children with the pure functions of operators.rayjob / operators.inferenceservice
and writes them with operators.kube.apply, which writes nothing when the cluster already matches. Children carry a
controller owner reference: deleting a parent deletes them (garbage collection); no finalizers are needed, since
nothing outside Kubernetes is created. What happened is posted as Kubernetes Events on the parent.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from kubeloop.api import GROUP, VERSION, ModelDeployment, ModelVersion, Resource, TrainingJob
from kubeloop.api.load import parse_resource
from kubeloop.errors import SpecError
from operators import canary, common, httproute, metrics, retrain
from operators import inferenceservice as isvc
from operators import rayjob as rj
from operators.kube import Action, ApiError, Conflict, Kube, RestKube, apply, kind_of
from operators.settings import Settings, configure_kopf, current

log = logging.getLogger("operators")

TRAININGJOB = kind_of("kubeloop.dev/v1alpha1", "TrainingJob")
MODELVERSION = kind_of("kubeloop.dev/v1alpha1", "ModelVersion")
MODELDEPLOYMENT = kind_of("kubeloop.dev/v1alpha1", "ModelDeployment")
CONFIGMAP = kind_of("v1", "ConfigMap")
INFERENCESERVICE = kind_of("serving.kserve.io/v1beta1", "InferenceService")
HTTPROUTE = kind_of(httproute.API_VERSION, "HTTPRoute")

# --- injectable collaborators (unit tests replace them) ----------------------------------------------------------

_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = RestKube.from_environment(connections=_settings().workers)
    return _kube


def set_kube(client: Kube | None) -> None:
    global _kube
    _kube = client


def _post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(dict(body), type=type_, reason=reason, message=message[:1024])  # type: ignore[arg-type]
    except LookupError:  # outside a running operator (a script, a test): no event queue
        log.info("event %s %s %s", type_, reason, message)


emit: Callable[[Mapping[str, Any], str, str, str], None] = _post_event


def _settings() -> Settings:
    return current()


# --- helpers ------------------------------------------------------------------------------------------------------


def plain(obj: Any) -> Any:
    """kopf's read-only views (Body, Spec, Status, …) as plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(value) for value in obj]
    return obj


def _parse(body: Mapping[str, Any]) -> Resource:
    doc = plain(body)
    doc.pop("status", None)  # the status is the operator's; a stale or foreign field must not block a reconcile
    return parse_resource(
        doc, f"{doc.get('kind')} {doc.get('metadata', {}).get('namespace')}/{doc.get('metadata', {}).get('name')}"
    )


def _invalid(body: Mapping[str, Any], patch: kopf.Patch, error: SpecError) -> None:
    message = str(error)
    patch.status["phase" if body.get("kind") == "TrainingJob" else "ready"] = (
        "Failed" if body.get("kind") == "TrainingJob" else False
    )
    old = (body.get("status") or {}).get("conditions")
    patch.status["conditions"] = common.merge_conditions(
        plain(old), [common.condition("Valid", False, "InvalidSpec", message)]
    )
    emit(body, "Warning", "InvalidSpec", message)
    raise kopf.PermanentError(message)


def _apply_children(
    owner: Mapping[str, Any], children: list[tuple[dict[str, Any], str, bool]], create_first: bool = False
) -> dict[str, tuple[Action, dict[str, Any]]]:
    """Apply (desired, mode, create_only) children in order; post one Event per action, naming its children.

    ``create_first``: create each child without reading it first; the ``ApiError`` 409 of one that exists
    propagates (see operators.kube.apply).
    """
    done: dict[str, tuple[Action, dict[str, Any]]] = {}
    try:
        for desired, mode, create_only in children:
            try:
                action, obj = apply(kube(), desired, mode=mode, create_only=create_only, create_first=create_first)
            except Conflict as error:
                emit(owner, "Warning", "NameConflict", str(error))
                raise kopf.TemporaryError(str(error), delay=_settings().retry_delay * 4) from None
            except ApiError as error:
                if error.status == 409 and not create_first:
                    # another writer (KServe's controller, on its InferenceService) changed it since it was read
                    raise kopf.TemporaryError(
                        f"{desired['kind']} {desired['metadata']['name']} changed while being updated: applying again",
                        delay=1,
                    ) from None
                if error.status != 404:
                    raise
                message = _not_served(desired, error)
                emit(owner, "Warning", "KindNotServed", message)
                raise kopf.TemporaryError(message, delay=_settings().retry_delay * 4) from None
            if action is not Action.UNCHANGED:
                metrics.child(desired["kind"], action.value)
            done[desired["kind"]] = (action, obj)
    finally:
        _report(owner, done)
    return done


_PROVIDERS = {
    "RayJob": "install the KubeRay operator (platform/up.sh)",
    "InferenceService": "install KServe (platform/up.sh)",
    "HTTPRoute": "install the Gateway API CRDs (platform/up.sh installs them with Envoy Gateway), or run the "
    'operator without a Gateway (chart value gateway.name: ""; a canary then gets no traffic)',
}


def _not_served(desired: Mapping[str, Any], error: ApiError) -> str:
    """What a 404 on writing a child means (its kind is not installed in the cluster), and what to do."""
    meta = desired["metadata"]
    return (
        f"{desired['kind']} {meta.get('namespace')}/{meta['name']}: the apiserver does not serve "
        f"{desired['apiVersion']} {desired['kind']} ({error.message}); "
        f"{_PROVIDERS.get(desired['kind'], 'install its CRD')}"
    )


def _report(owner: Mapping[str, Any], done: Mapping[str, tuple[Action, Mapping[str, Any]]]) -> None:
    """One Event per action taken ("ConfigMap a, RayJob b created"): an Event is a write, as costly as a child."""
    for action in (Action.CREATED, Action.UPDATED):
        names = [f"{kind} {obj['metadata']['name']}" for kind, (did, obj) in done.items() if did is action]
        if names:
            emit(owner, "Normal", action.value.capitalize(), f"{', '.join(names)} {action.value}")


def _timed(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            result = "ok"
            try:
                return fn(*args, **kwargs)
            except kopf.TemporaryError:
                result = "retry"
                raise
            except kopf.PermanentError:
                result = "invalid"
                raise
            except Exception:
                result = "error"
                raise
            finally:
                metrics.reconciled(kind, result, time.monotonic() - started)

        return run

    return wrap


# --- startup ------------------------------------------------------------------------------------------------------


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    ours = _settings()
    configure_kopf(settings, ours)
    if ours.metrics_port:
        metrics.serve(ours.metrics_port)
    log.info(
        "kubeloop operator starting: training=%s serving=%s drift=%s storage_pvc=%s webhook=%s",
        ours.training_image,
        ours.serving_image,
        ours.drift_image,
        ours.storage_pvc or "-",
        ours.webhook_enabled,
    )


# --- TrainingJob -> RayJob ------------------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "trainingjobs")
@kopf.on.create(GROUP, VERSION, "trainingjobs")
@kopf.on.update(GROUP, VERSION, "trainingjobs")
@_timed("TrainingJob")
def reconcile_trainingjob(body: Mapping[str, Any], patch: kopf.Patch, reason: str | None = None, **_: Any) -> None:
    """Apply the TrainingJob's children; the RayJob is created once and never changed after submission."""
    try:
        tj = _parse(body)
    except SpecError as error:
        _invalid(body, patch, error)
    assert isinstance(tj, TrainingJob)
    settings = _settings()
    desired_job = rj.desired_rayjob(tj, settings)
    done = None
    if reason == kopf.Reason.CREATE:
        # handled for the first time: its children most likely do not exist yet, so create them without reading
        # each first; if one exists (an earlier attempt stopped mid-way), converge below as on resume
        try:
            done = _apply_children(body, _trainingjob_children(tj, desired_job, submitted=False), create_first=True)
        except ApiError as error:
            if error.status != 409:
                raise
    if done is None:
        existing = kube().get(kind_of(rj.RAYJOB_API_VERSION, "RayJob"), tj.metadata.namespace, rj.rayjob_name(tj))
        done = _apply_children(body, _trainingjob_children(tj, desired_job, submitted=existing is not None))
    action, job = done["RayJob"]
    if action is not Action.CREATED and not _same_spec(job.get("spec") or {}, desired_job["spec"]):
        emit(
            body,
            "Warning",
            "SpecChangedAfterSubmission",
            f"RayJob {rj.rayjob_name(tj)} runs the spec it was submitted with; delete and re-create the "
            "TrainingJob to train with the new one",
        )
    status = plain(body.get("status") or {})
    patch.status["rayJobName"] = rj.rayjob_name(tj)
    conditions = status.get("conditions") or []
    valid = [c for c in conditions if c.get("type") != "Valid"]
    if not job.get("status"):
        # KubeRay has not acted on it yet (on_rayjob_event leaves such a RayJob alone): say here, in kopf's status
        # patch, that it was submitted, rather than in a second write when the RayJob's watch event arrives
        for key, value in rj.trainingjob_status(tj, job, valid).items():
            patch.status[key] = value
    elif len(valid) < len(conditions):  # it was invalid, and is valid now
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = valid
    elif not status.get("phase"):
        patch.status["phase"] = "Pending"
    if rj.tj_generation(tj) is not None:
        patch.status["observedGeneration"] = rj.tj_generation(tj)


def _trainingjob_children(
    tj: TrainingJob, desired_job: dict[str, Any], submitted: bool
) -> list[tuple[dict[str, Any], str, bool]]:
    """(desired, mode, create_only) of the TrainingJob's children, in order: the RayJob right after what its pods
    need to start (the spec ConfigMap, the ServiceAccount), the Role and RoleBinding after it: the run needs them
    only to publish its result at the end, and creating them costs the apiserver's RBAC escalation check (about
    0.1 s each), which would otherwise delay the start of every training run."""
    return [
        (rj.desired_configmap(tj), "merge", submitted),  # once submitted, the spec the run read stays as it was
        (rj.desired_service_account(tj), "merge", False),
        (desired_job, "replace", True),
        (rj.desired_role(tj), "merge", False),
        (rj.desired_role_binding(tj), "merge", False),
    ]


def _same_spec(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    from operators.kube import contains

    keys = ("entrypoint", "backoffLimit", "rayClusterSpec")
    return all(contains(existing.get(key), desired.get(key)) for key in keys)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={common.LABEL_TRAININGJOB: kopf.PRESENT})
def on_rayjob_event(body: Mapping[str, Any], type: str | None, **_: Any) -> None:
    if type == "DELETED" or not body.get("status"):  # no status: reconcile_trainingjob said it was submitted
        return
    sync_trainingjob_status(plain(body))


def sync_trainingjob_status(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mirror one RayJob into its TrainingJob's status; register the ModelVersion once the job has ended.

    Returns the status patch written (None when the status already said so, or the TrainingJob is gone).
    """
    meta = job.get("metadata") or {}
    namespace = meta.get("namespace")
    owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "TrainingJob"), None)
    name = owner["name"] if owner else (meta.get("labels") or {}).get(common.LABEL_TRAININGJOB)
    body = kube().get(TRAININGJOB, namespace, name) if name else None
    if body is None or (owner and (body.get("metadata") or {}).get("uid") != owner.get("uid")):
        return None
    try:
        tj = _parse(body)
    except SpecError:
        return None
    assert isinstance(tj, TrainingJob)
    old = body.get("status") or {}
    new = rj.trainingjob_status(tj, job, old.get("conditions"))
    if new["phase"] in ("Succeeded", "Failed") and not old.get("modelVersion"):
        new.update(_register(tj, body, new.get("conditions") or []))
    if old.get("phase") != new["phase"]:
        emit(body, "Warning" if new["phase"] == "Failed" else "Normal", new["phase"], new.get("message", ""))
    if _unchanged(old, new):
        return None
    kube().patch(TRAININGJOB, namespace, name, {"status": new}, subresource="status")
    return new


def _unchanged(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    for key, value in new.items():
        if key == "conditions":
            if common.strip_times(old.get(key)) != common.strip_times(value):
                return False
        elif old.get(key) != value:
            return False
    return True


def _register(tj: TrainingJob, body: Mapping[str, Any], conditions: list[dict[str, Any]]) -> dict[str, Any]:
    """Create the ModelVersion the run reported in its ConfigMap; the status fields (and condition) it gives."""
    configmap = kube().get(CONFIGMAP, tj.metadata.namespace, rj.configmap_name(tj)) or {}
    result = (configmap.get("data") or {}).get(rj.RESULT_KEY)
    out: dict[str, Any] = {}
    if not result:
        cond = common.condition(
            "ModelRegistered", False, "NoResult",
            f"the run wrote no {rj.RESULT_KEY} into ConfigMap {rj.configmap_name(tj)}",
        )  # fmt: skip
    else:
        try:
            manifest = rj.registered_modelversion(tj, result)
        except rj.ResultError as error:
            emit(body, "Warning", "InvalidResult", str(error))
            cond = common.condition("ModelRegistered", False, "InvalidResult", str(error))
        else:
            mv_name = manifest["metadata"]["name"]
            try:
                created = kube().create(MODELVERSION, tj.metadata.namespace, manifest)
                emit(body, "Normal", "Registered", f"ModelVersion {mv_name} ({manifest['spec']['stage']})")
                metrics.child("ModelVersion", "created")
            except ApiError as error:
                if error.status != 409:
                    raise
                created = kube().get(MODELVERSION, tj.metadata.namespace, mv_name) or {}
                labels = (created.get("metadata") or {}).get("labels") or {}
                if labels.get(common.LABEL_TRAININGJOB) != tj.metadata.name:
                    message = f"ModelVersion {mv_name} exists and was registered by another run"
                    emit(body, "Warning", "VersionExists", message)
                    cond = common.condition("ModelRegistered", False, "VersionExists", message)
                    out["conditions"] = common.merge_conditions(conditions, [cond], rj.tj_generation(tj))
                    return out
            out.update(rj.metrics_status(created or manifest))
            cond = common.condition("ModelRegistered", True, "Registered", f"ModelVersion {mv_name}")
    out["conditions"] = common.merge_conditions(conditions, [cond], rj.tj_generation(tj))
    return out


# --- ModelDeployment -> InferenceService ----------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "modeldeployments")
@kopf.on.create(GROUP, VERSION, "modeldeployments")
@kopf.on.update(GROUP, VERSION, "modeldeployments")
@_timed("ModelDeployment")
def reconcile_modeldeployment(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Resolve the ModelVersions, then apply the versions ConfigMap, the InferenceService and the HTTPRoute."""
    try:
        md = _parse(body)
    except SpecError as error:
        _invalid(body, patch, error)
    assert isinstance(md, ModelDeployment)
    settings = _settings()
    status = plain(body.get("status") or {})
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
        emit(body, "Warning", reason, message)
        raise kopf.TemporaryError(message, delay=settings.retry_delay)
    existing = kube().get(INFERENCESERVICE, md.metadata.namespace, isvc.isvc_name(md))
    admission = isvc.admission(md, versions)
    status["conditions"] = common.merge_conditions(status.get("conditions"), [admission], _generation(md))
    if admission["status"] == "False":
        _refuse(body, patch, md, status, existing is None, admission["message"])
    if admission["reason"] == "RejectedAllowed":
        emit(body, "Warning", "RejectedVersionServed", admission["message"])
    with_canary = not (
        md.spec.canary is not None and md.spec.deployment_mode == "Knative" and not isvc.stable_rolled_out(existing)
    )
    for version, mv in versions.items():
        if not mv.spec.artifact_uri.startswith(("file://", "/")):
            emit(
                body,
                "Warning",
                "ArtifactNotOnVolume",
                f"v{version}: artifactUri {mv.spec.artifact_uri} is not a file:// path on the kubeloop volume; "
                "the serving image loads artifacts from KUBELOOP_HOME",
            )
    canary_live = httproute.canary_ready(md, existing)
    route = httproute.desired_httproute(md, settings, canary_live)
    children = [
        (isvc.desired_versions_configmap(md, versions), "replace", False),
        (isvc.desired_inferenceservice(md, versions, settings, with_canary), "replace", False),
    ]
    done = _apply_children(body, children + ([(route, "replace", False)] if route else []))
    _, obj = done["InferenceService"]
    new = isvc.modeldeployment_status(md, obj, status, with_canary, httproute.url(md, settings) if route else None)
    traffic = httproute.traffic_condition(md, settings, canary_live)
    if traffic is not None:
        new["conditions"] = common.merge_conditions(new["conditions"], [traffic], _generation(md))
        if traffic["reason"] == "NoGateway":
            emit(body, "Warning", "CanaryWithoutTraffic", traffic["message"])
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
    emit(body, "Warning", "VersionRejected", message)
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
        body = kube().get(MODELVERSION, md.metadata.namespace, name)
        if body is None:
            missing.append(name)
            continue
        try:
            mv = _parse(body)
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
    sync_modeldeployment_status(plain(body))


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
    body = kube().get(MODELDEPLOYMENT, meta.get("namespace"), owner["name"])
    if body is None or (body.get("metadata") or {}).get("uid") != owner.get("uid"):
        return None
    try:
        md = _parse(body)
    except SpecError:
        return None
    assert isinstance(md, ModelDeployment)
    old = body.get("status") or {}
    with_canary = "kubeloop.dev/canary-waiting" not in (meta.get("annotations") or {})
    new = isvc.modeldeployment_status(md, obj, old, with_canary, _route_url(md, body))
    if old.get("ready") is not True and new.get("ready") is True:
        emit(body, "Normal", "Ready", f"InferenceService {meta.get('name')} is ready at {new.get('url')}")
    if _unchanged(old, new):
        return None
    read = {"resourceVersion": body["metadata"]["resourceVersion"]}  # the apiserver's precondition on the write
    patch = {"metadata": read, "status": new}
    kube().patch(MODELDEPLOYMENT, md.metadata.namespace, md.metadata.name, patch, subresource="status")
    return new


def _route_url(md: ModelDeployment, body: Mapping[str, Any]) -> str | None:
    """The URL of the deployment's HTTPRoute, when it has one and the route is there."""
    settings = _settings()
    if not httproute.routed(md, settings):
        return None
    route = kube().get(HTTPROUTE, md.metadata.namespace, httproute.route_name(md))
    if route is None or not common.is_owned_by(route, (body.get("metadata") or {}).get("uid", "")):
        return None
    return httproute.url(md, settings)


# --- drift, retraining and canary analysis, on Prometheus signals (operators.retrain, operators.canary) --------------


@kopf.timer(GROUP, VERSION, "modeldeployments", interval=current().analysis_tick_seconds, idle=0)
def watch_modeldeployment(body: Mapping[str, Any], **_: Any) -> None:
    """Drift and retraining first; the canary analysis only when retrain changed neither spec nor history this tick
    (both write status.history from the same body, so one writer per tick keeps every entry)."""
    deployment, source = plain(body), canary.prometheus_source(_settings())
    if retrain.tick(deployment, kube(), emit, source) is None and (deployment["spec"].get("canary") or {}).get(
        "analysis"
    ):
        canary.tick(deployment, kube(), emit, source)
