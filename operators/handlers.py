"""The kopf handlers: small, level-triggered, idempotent.

- TrainingJob create/update/resume -> apply its children (ConfigMap, ServiceAccount, RayJob, Role, RoleBinding).
- RayJob events -> mirror the RayJob's status into its TrainingJob; once it ends, register the ModelVersion the
  run reported; a search's summary (tuning.yaml) into status.tuning, also every few seconds while it runs.
- BatchPrediction create/update/resume -> resolve the model version (spec.version or the Production one), then
  apply the same children as a TrainingJob's; RayJob events, and every few seconds while it runs, mirror the RayJob
  and the run's report (rows done, rejected, output, drift) into its status.
- ModelDeployment create/update/resume -> resolve its ModelVersions, apply the versions ConfigMap, the
  InferenceService and (Standard mode, a Gateway configured) the HTTPRoute that splits stable and canary traffic;
  a spec naming a Rejected version without spec.allowRejected is refused (condition VersionAdmitted False, a
  Warning Event) and nothing of it applied.
- InferenceService events -> mirror URL, readiness and conditions into the ModelDeployment.
- Every few seconds per ModelDeployment: its drift flag mirrored, retraining on sustained drift (operators.retrain),
  the canary analysis (operators.canary), on Prometheus signals.

Every handler computes the desired children with the pure functions of operators.rayjob / operators.batchjob (both
through operators.rayrun) / operators.inferenceservice and writes them with operators.kube.apply, which writes
nothing when the cluster already matches. Children carry a controller owner reference: deleting a parent deletes
them (garbage collection); nothing outside Kubernetes is created, so no finalizer of ours is needed (kopf keeps its
own on a resource while one of its timers runs for it). What happened is posted as Kubernetes Events on the parent.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from kubeloop.api import GROUP, VERSION, BatchPrediction, ModelDeployment, ModelVersion, Resource, TrainingJob
from kubeloop.api.load import parse_resource
from kubeloop.errors import SpecError
from operators import batchjob, canary, common, httproute, metrics, rayrun, retrain
from operators import inferenceservice as isvc
from operators import rayjob as rj
from operators.kube import Action, ApiError, Conflict, Kind, Kube, RestKube, apply, kind_of
from operators.settings import Settings, configure_kopf, current

log = logging.getLogger("operators")

TRAININGJOB = kind_of("kubeloop.dev/v1alpha1", "TrainingJob")
MODELVERSION = kind_of("kubeloop.dev/v1alpha1", "ModelVersion")
MODELDEPLOYMENT = kind_of("kubeloop.dev/v1alpha1", "ModelDeployment")
BATCHPREDICTION = kind_of("kubeloop.dev/v1alpha1", "BatchPrediction")
RAYJOB = kind_of(rayrun.RAYJOB_API_VERSION, "RayJob")
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


_RUNS = ("TrainingJob", "BatchPrediction")  # kinds with a phase (the others say ready)


def _invalid(body: Mapping[str, Any], patch: kopf.Patch, error: SpecError) -> None:
    message = str(error)
    run = body.get("kind") in _RUNS
    patch.status["phase" if run else "ready"] = "Failed" if run else False
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
    run = rj.training_run(tj)
    job = _submit(body, run, rayrun.desired_rayjob(run, _settings()), reason)
    patch.status["rayJobName"] = run.name
    status = plain(body.get("status") or {})
    _submitted_status(patch, tj, job, status, lambda kept: rj.trainingjob_status(tj, job, kept))


def _submit(
    body: Mapping[str, Any],
    run: rayrun.Run,
    desired_job: dict[str, Any],
    reason: str | None,
    submitted: bool | None = None,
) -> dict[str, Any]:
    """Apply a run's children; the RayJob as it is. The RayJob is created once and never changed after submission,
    nor is the document the run reads: a spec that asks for another run than the one submitted gets a Warning.

    ``submitted``: whether the RayJob exists (None: not known; a resource handled for the first time then creates its
    children without reading each first, and converges as on resume if one exists, after an attempt that stopped
    mid-way)."""
    done = None
    if submitted is None and reason == kopf.Reason.CREATE:
        try:
            done = _apply_children(body, _run_children(run, desired_job, submitted=False), create_first=True)
        except ApiError as error:
            if error.status != 409:
                raise
    if done is None:
        if submitted is None:
            submitted = kube().get(RAYJOB, run.namespace, run.name) is not None
        done = _apply_children(body, _run_children(run, desired_job, submitted))
    action, job = done["RayJob"]
    if action is not Action.CREATED and not rayrun.submitted_unchanged(done["ConfigMap"][1], run):
        emit(
            body,
            "Warning",
            "SpecChangedAfterSubmission",
            f"RayJob {run.name} runs the spec it was submitted with; delete and re-create the {run.owner.kind} "
            "to run the new one",
        )
    return job


def _run_children(
    run: rayrun.Run, desired_job: dict[str, Any], submitted: bool
) -> list[tuple[dict[str, Any], str, bool]]:
    """(desired, mode, create_only) of a run's children, in order: the RayJob right after what its pods need to
    start (the spec ConfigMap, the ServiceAccount), the Role and RoleBinding after it: the run needs them only to
    publish what it reports, and creating them costs the apiserver's RBAC escalation check (about 0.1 s each),
    which would otherwise delay the start of every run."""
    return [
        (rayrun.desired_configmap(run), "merge", submitted),  # once submitted, the document the run read stays
        (rayrun.desired_service_account(run), "merge", False),
        (desired_job, "replace", True),
        (rayrun.desired_role(run), "merge", False),
        (rayrun.desired_role_binding(run), "merge", False),
    ]


def _submitted_status(
    patch: kopf.Patch,
    resource: Resource,
    job: Mapping[str, Any],
    status: dict[str, Any],
    mirrored: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> None:
    """The status a reconcile writes beside the run's children (``mirrored(conditions)``: the status from the RayJob,
    merged into those conditions)."""
    conditions = status.get("conditions") or []
    valid = [c for c in conditions if c.get("type") != "Valid"]
    if not job.get("status"):
        # KubeRay has not acted on it yet (the RayJob event handlers leave such a RayJob alone): say here, in kopf's
        # status patch, that it was submitted, rather than in a second write when the RayJob's watch event arrives
        for key, value in mirrored(valid).items():
            patch.status[key] = value
    elif len(valid) < len(conditions):  # it was invalid, and is valid now
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = valid
    elif not status.get("phase"):
        patch.status["phase"] = "Pending"
    if rayrun.generation(resource) is not None:
        patch.status["observedGeneration"] = rayrun.generation(resource)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={common.LABEL_TRAININGJOB: kopf.PRESENT})
def on_rayjob_event(body: Mapping[str, Any], type: str | None, **_: Any) -> None:
    if type == "DELETED" or not body.get("status"):  # no status: reconcile_trainingjob said it was submitted
        return
    sync_trainingjob_status(plain(body))


def _run_owner(job: Mapping[str, Any], kind: Kind, label: str) -> tuple[dict[str, Any], Resource] | None:
    """The resource (body and parsed) whose run a RayJob is: its controller, or the one its label names; None when
    it is gone, was re-created since (another uid), or no longer parses."""
    meta = job.get("metadata") or {}
    owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") == kind.kind), None)
    name = owner["name"] if owner else (meta.get("labels") or {}).get(label)
    body = kube().get(kind, meta.get("namespace"), name) if name else None
    if body is None or (owner and (body.get("metadata") or {}).get("uid") != owner.get("uid")):
        return None
    try:
        return body, _parse(body)
    except SpecError:
        return None


def _run_reports(run: rayrun.Run) -> dict[str, str]:
    """What the run published so far: the data of its ConfigMap, less the document it reads."""
    configmap = kube().get(CONFIGMAP, run.namespace, run.configmap_name) or {}
    return {key: value for key, value in (configmap.get("data") or {}).items() if key != run.spec_key}


def sync_trainingjob_status(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mirror one RayJob into its TrainingJob's status; register the ModelVersion once the job has ended; a
    search's summary into status.tuning whenever the run has published one.

    Returns the status patch written (None when the status already said so, or the TrainingJob is gone).
    """
    found = _run_owner(job, TRAININGJOB, common.LABEL_TRAININGJOB)
    if found is None:
        return None
    body, tj = found
    assert isinstance(tj, TrainingJob)
    old = body.get("status") or {}
    new = rj.trainingjob_status(tj, job, old.get("conditions"))
    ended = new["phase"] in ("Succeeded", "Failed")
    register = ended and not old.get("modelVersion")
    reports = _run_reports(rj.training_run(tj)) if register or tj.spec.tuning is not None else {}
    if tj.spec.tuning is not None and reports.get(rj.TUNING_KEY):
        try:
            new["tuning"] = rj.tuning_status(reports[rj.TUNING_KEY])
        except rj.ResultError as error:
            if old.get("phase") != new["phase"]:  # said once per phase, not on every look
                emit(body, "Warning", "InvalidResult", str(error))
    if register:
        new.update(_register(tj, body, new.get("conditions") or [], reports.get(rj.RESULT_KEY)))
    if old.get("phase") != new["phase"]:
        emit(body, "Warning" if new["phase"] == "Failed" else "Normal", new["phase"], new.get("message", ""))
    if _unchanged(old, new):
        return None
    kube().patch(TRAININGJOB, tj.metadata.namespace, tj.metadata.name, {"status": new}, subresource="status")
    return new


@kopf.timer(
    GROUP,
    VERSION,
    "trainingjobs",
    interval=current().progress_seconds,
    when=lambda spec, status, **_: bool(spec.get("tuning")) and status.get("phase") == "Running",
)
def watch_search(body: Mapping[str, Any], **_: Any) -> None:
    """A running search's trials, as the run publishes them (no RayJob event says so)."""
    _look_at_run(body)


def _look_at_run(body: Mapping[str, Any]) -> None:
    meta = body.get("metadata") or {}
    job = kube().get(RAYJOB, meta.get("namespace"), (body.get("status") or {}).get("rayJobName") or meta.get("name"))
    if job is None or not job.get("status"):
        return
    sync = sync_trainingjob_status if body.get("kind") == "TrainingJob" else sync_batchprediction_status
    sync(job)


def _unchanged(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    for key, value in new.items():
        if key == "conditions":
            if common.strip_times(old.get(key)) != common.strip_times(value):
                return False
        elif old.get(key) != value:
            return False
    return True


def _register(
    tj: TrainingJob, body: Mapping[str, Any], conditions: list[dict[str, Any]], result: str | None
) -> dict[str, Any]:
    """Create the ModelVersion the run reported in its ConfigMap; the status fields (and condition) it gives."""
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
                    out["conditions"] = common.merge_conditions(conditions, [cond], rayrun.generation(tj))
                    return out
            out.update(rj.metrics_status(created or manifest))
            cond = common.condition("ModelRegistered", True, "Registered", f"ModelVersion {mv_name}")
    out["conditions"] = common.merge_conditions(conditions, [cond], rayrun.generation(tj))
    return out


# --- BatchPrediction -> RayJob --------------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "batchpredictions")
@kopf.on.create(GROUP, VERSION, "batchpredictions")
@kopf.on.update(GROUP, VERSION, "batchpredictions")
@_timed("BatchPrediction")
def reconcile_batchprediction(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Resolve the version to score with, then apply the run's children, as for a TrainingJob. A BatchPrediction is
    one run: once its RayJob exists, a spec change gets a Warning and changes nothing; before (no version found,
    say), the changed spec is the one submitted."""
    try:
        bp = _parse(body)
    except SpecError as error:
        _invalid(body, patch, error)
    assert isinstance(bp, BatchPrediction)
    settings = _settings()
    status = plain(body.get("status") or {})
    existing = kube().get(RAYJOB, bp.metadata.namespace, bp.metadata.name)
    version, problem = _batch_version(bp, existing)
    if version is None:
        patch.status["phase"] = "Failed"
        patch.status["message"] = problem
        patch.status["conditions"] = common.merge_conditions(
            status.get("conditions"),
            [common.condition("Valid", False, "ModelVersionNotFound", problem)],
            rayrun.generation(bp),
        )
        emit(body, "Warning", "ModelVersionNotFound", problem)
        raise kopf.PermanentError(problem)
    run = batchjob.batch_run(bp, version, settings)
    job = _submit(body, run, batchjob.desired_rayjob(bp, version, settings), None, submitted=existing is not None)
    patch.status["rayJobName"] = run.name
    if existing is None or not status.get("modelVersion"):  # once running, the run's report says it
        patch.status["modelVersion"] = ModelVersion.resource_name(bp.spec.model, version)
    _submitted_status(patch, bp, job, status, lambda kept: batchjob.batchprediction_status(bp, job, None, kept))


def _batch_version(bp: BatchPrediction, existing: Mapping[str, Any] | None) -> tuple[int | None, str]:
    """The version the run scores with (once submitted, the one it was given), or None and why there is none."""
    namespace = bp.metadata.namespace
    if bp.spec.version is not None:
        name = ModelVersion.resource_name(bp.spec.model, bp.spec.version)
        if existing is None and kube().get(MODELVERSION, namespace, name) is None:
            return None, batchjob.missing_version_problem(bp, bp.spec.version)
        return bp.spec.version, ""
    if existing is not None and batchjob.submitted_version(existing) is not None:
        return batchjob.submitted_version(existing), ""
    version = batchjob.production_version(bp, kube().list(MODELVERSION, namespace))
    return (version, "") if version is not None else (None, batchjob.version_problem(bp))


@kopf.on.event("ray.io", "v1", "rayjobs", labels={batchjob.LABEL_BATCHPREDICTION: kopf.PRESENT})
def on_batch_rayjob_event(body: Mapping[str, Any], type: str | None, **_: Any) -> None:
    if type == "DELETED" or not body.get("status"):  # no status: reconcile_batchprediction said it was submitted
        return
    sync_batchprediction_status(plain(body))


@kopf.timer(
    GROUP,
    VERSION,
    "batchpredictions",
    interval=current().progress_seconds,
    when=lambda status, **_: status.get("phase") == "Running",
)
def watch_batchprediction(body: Mapping[str, Any], **_: Any) -> None:
    """The rows scored so far, as the run publishes them (no RayJob event says so)."""
    _look_at_run(body)


def sync_batchprediction_status(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mirror one RayJob and what its run reported into the BatchPrediction's status; an Event when it starts,
    finishes (rows scored and rejected) or fails (why).

    Returns the status patch written (None when the status already said so, or the BatchPrediction is gone).
    """
    found = _run_owner(job, BATCHPREDICTION, batchjob.LABEL_BATCHPREDICTION)
    if found is None:
        return None
    body, bp = found
    assert isinstance(bp, BatchPrediction)
    old = body.get("status") or {}
    configmap = kube().get(CONFIGMAP, bp.metadata.namespace, rayrun.configmap_name(bp)) or {}
    report = (configmap.get("data") or {}).get(batchjob.RESULT_KEY)
    new = batchjob.batchprediction_status(bp, job, report, old.get("conditions"))
    if old.get("phase") != new["phase"]:
        if new["phase"] == "Running":
            emit(body, "Normal", "Started", f"RayJob {new['rayJobName']} is scoring {bp.spec.input}")
        elif new["phase"] == "Succeeded":
            emit(body, "Normal", "Finished", batchjob.progress(new))
        elif new["phase"] == "Failed":
            emit(body, "Warning", "Failed", new.get("message", ""))
    if _unchanged(old, new):
        return None
    kube().patch(BATCHPREDICTION, bp.metadata.namespace, bp.metadata.name, {"status": new}, subresource="status")
    return new


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
