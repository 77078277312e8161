"""The kopf handlers of the runs the operator starts as RayJobs (operators.rayrun).

- TrainingJob create/update/resume -> apply its children (ConfigMap, ServiceAccount, RayJob, Role, RoleBinding).
- RayJob events -> mirror the RayJob's status into its TrainingJob; once it ends, register the ModelVersion the
  run reported; a search's summary (tuning.yaml) into status.tuning, also every few seconds while it runs.
- BatchPrediction create/update/resume -> resolve the model version (spec.version or the Production one), then
  apply the same children as a TrainingJob's; RayJob events, and every few seconds while it runs, mirror the RayJob
  and the run's report (rows done, rejected, output, drift) into its status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from kubeloop.api import GROUP, VERSION, BatchPrediction, ModelVersion, Resource, TrainingJob
from kubeloop.errors import SpecError
from kubeloop.kube import ApiError, Kind
from operators import batchjob, common, handlers, metrics, rayrun
from operators import rayjob as rj
from operators.children import Action
from operators.settings import current

log = logging.getLogger("operators")


# --- TrainingJob -> RayJob ------------------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "trainingjobs")
@kopf.on.create(GROUP, VERSION, "trainingjobs")
@kopf.on.update(GROUP, VERSION, "trainingjobs")
@handlers.timed("TrainingJob")
def reconcile_trainingjob(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Apply the TrainingJob's children; the RayJob is created once and never changed after submission."""
    tj = handlers.parse_valid(body, patch, TrainingJob)
    run = rj.training_run(tj)
    job = _submit(body, run, rayrun.desired_rayjob(run, handlers.settings()))
    patch.status["rayJobName"] = run.name
    status = handlers.plain(body.get("status") or {})
    _submitted_status(patch, tj, job, status, lambda kept: rj.trainingjob_status(tj, job, kept))


def _submit(
    body: Mapping[str, Any], run: rayrun.Run, desired_job: dict[str, Any], submitted: bool | None = None
) -> dict[str, Any]:
    """Apply a run's children; the RayJob as it is. The RayJob is created once and never changed after submission,
    nor is the document the run reads: a spec that asks for another run than the one submitted gets a Warning.

    ``submitted``: whether the RayJob exists (None: not known, read it)."""
    if submitted is None:
        submitted = handlers.kube().get(handlers.RAYJOB, run.namespace, run.name) is not None
    done = handlers.apply_children(body, _run_children(run, desired_job, submitted))
    action, job = done["RayJob"]
    if action is not Action.CREATED and not rayrun.submitted_unchanged(done["ConfigMap"][1], run):
        handlers.emit(
            body,
            "Warning",
            "SpecChangedAfterSubmission",
            f"RayJob {run.name} runs the spec it was submitted with; delete and re-create the {run.owner.kind} "
            "to run the new one",
        )
    return job


def _run_children(run: rayrun.Run, desired_job: dict[str, Any], submitted: bool) -> list[tuple[dict[str, Any], bool]]:
    """(desired, create_only) of a run's children, in order: the RayJob right after what its pods need to
    start (the spec ConfigMap, the ServiceAccount), the Role and RoleBinding after it: the run needs them only to
    publish what it reports, and creating them costs the apiserver's RBAC escalation check (about 0.1 s each),
    which would otherwise delay the start of every run."""
    return [
        (rayrun.desired_configmap(run), submitted),  # once submitted, the document the run read stays
        (rayrun.desired_service_account(run), False),
        (desired_job, True),
        (rayrun.desired_role(run), False),
        (rayrun.desired_role_binding(run), False),
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
    sync_trainingjob_status(handlers.plain(body))


def _run_owner(job: Mapping[str, Any], kind: Kind, label: str) -> tuple[dict[str, Any], Resource] | None:
    """The resource (body and parsed) whose run a RayJob is: its controller, or the one its label names; None when
    it is gone, was re-created since (another uid), or no longer parses."""
    meta = job.get("metadata") or {}
    owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") == kind.kind), None)
    name = owner["name"] if owner else (meta.get("labels") or {}).get(label)
    body = handlers.kube().get(kind, meta.get("namespace"), name) if name else None
    if body is None or (owner and (body.get("metadata") or {}).get("uid") != owner.get("uid")):
        return None
    try:
        return body, handlers.parse(body)
    except SpecError:
        return None


def _run_reports(run: rayrun.Run) -> dict[str, str]:
    """What the run published so far: the data of its ConfigMap, less the document it reads."""
    configmap = handlers.kube().get(handlers.CONFIGMAP, run.namespace, run.configmap_name) or {}
    return {key: value for key, value in (configmap.get("data") or {}).items() if key != run.spec_key}


def sync_trainingjob_status(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mirror one RayJob into its TrainingJob's status; register the ModelVersion once the job has ended; a
    search's summary into status.tuning whenever the run has published one.

    Returns the status patch written (None when the status already said so, or the TrainingJob is gone).
    """
    found = _run_owner(job, handlers.TRAININGJOB, common.LABEL_TRAININGJOB)
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
                handlers.emit(body, "Warning", "InvalidResult", str(error))
    if register:
        new.update(_register(tj, body, new.get("conditions") or [], reports.get(rj.RESULT_KEY)))
    if old.get("phase") != new["phase"]:
        handlers.emit(body, "Warning" if new["phase"] == "Failed" else "Normal", new["phase"], new.get("message", ""))
    if handlers.unchanged(old, new):
        return None
    handlers.kube().patch(
        handlers.TRAININGJOB, tj.metadata.namespace, tj.metadata.name, {"status": new}, subresource="status"
    )
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
    job = handlers.kube().get(
        handlers.RAYJOB, meta.get("namespace"), (body.get("status") or {}).get("rayJobName") or meta.get("name")
    )
    if job is None or not job.get("status"):
        return
    sync = sync_trainingjob_status if body.get("kind") == "TrainingJob" else sync_batchprediction_status
    sync(job)


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
            handlers.emit(body, "Warning", "InvalidResult", str(error))
            cond = common.condition("ModelRegistered", False, "InvalidResult", str(error))
        else:
            mv_name = manifest["metadata"]["name"]
            try:
                created = handlers.kube().create(handlers.MODELVERSION, tj.metadata.namespace, manifest)
                handlers.emit(body, "Normal", "Registered", f"ModelVersion {mv_name} ({manifest['spec']['stage']})")
                metrics.child("ModelVersion", "created")
            except ApiError as error:
                if error.status != 409:
                    raise
                created = handlers.kube().get(handlers.MODELVERSION, tj.metadata.namespace, mv_name) or {}
                labels = (created.get("metadata") or {}).get("labels") or {}
                if labels.get(common.LABEL_TRAININGJOB) != tj.metadata.name:
                    message = f"ModelVersion {mv_name} exists and was registered by another run"
                    handlers.emit(body, "Warning", "VersionExists", message)
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
@handlers.timed("BatchPrediction")
def reconcile_batchprediction(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Resolve the version to score with, then apply the run's children, as for a TrainingJob. A BatchPrediction is
    one run: once its RayJob exists, a spec change gets a Warning and changes nothing; before (no version found,
    say), the changed spec is the one submitted."""
    bp = handlers.parse_valid(body, patch, BatchPrediction)
    settings = handlers.settings()
    status = handlers.plain(body.get("status") or {})
    existing = handlers.kube().get(handlers.RAYJOB, bp.metadata.namespace, bp.metadata.name)
    version, problem = _batch_version(bp, existing)
    if version is None:
        patch.status["phase"] = "Failed"
        patch.status["message"] = problem
        patch.status["conditions"] = common.merge_conditions(
            status.get("conditions"),
            [common.condition("Valid", False, "ModelVersionNotFound", problem)],
            rayrun.generation(bp),
        )
        handlers.emit(body, "Warning", "ModelVersionNotFound", problem)
        raise kopf.PermanentError(problem)
    run = batchjob.batch_run(bp, version, settings)
    job = _submit(body, run, batchjob.desired_rayjob(bp, version, settings), submitted=existing is not None)
    patch.status["rayJobName"] = run.name
    if existing is None or not status.get("modelVersion"):  # once running, the run's report says it
        patch.status["modelVersion"] = ModelVersion.resource_name(bp.spec.model, version)
    _submitted_status(patch, bp, job, status, lambda kept: batchjob.batchprediction_status(bp, job, None, kept))


def _batch_version(bp: BatchPrediction, existing: Mapping[str, Any] | None) -> tuple[int | None, str]:
    """The version the run scores with (once submitted, the one it was given), or None and why there is none."""
    namespace = bp.metadata.namespace
    if bp.spec.version is not None:
        name = ModelVersion.resource_name(bp.spec.model, bp.spec.version)
        if existing is None and handlers.kube().get(handlers.MODELVERSION, namespace, name) is None:
            return None, batchjob.missing_version_problem(bp, bp.spec.version)
        return bp.spec.version, ""
    if existing is not None and batchjob.submitted_version(existing) is not None:
        return batchjob.submitted_version(existing), ""
    version = batchjob.production_version(bp, handlers.kube().list(handlers.MODELVERSION, namespace))
    return (version, "") if version is not None else (None, batchjob.version_problem(bp))


@kopf.on.event("ray.io", "v1", "rayjobs", labels={batchjob.LABEL_BATCHPREDICTION: kopf.PRESENT})
def on_batch_rayjob_event(body: Mapping[str, Any], type: str | None, **_: Any) -> None:
    if type == "DELETED" or not body.get("status"):  # no status: reconcile_batchprediction said it was submitted
        return
    sync_batchprediction_status(handlers.plain(body))


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
    found = _run_owner(job, handlers.BATCHPREDICTION, batchjob.LABEL_BATCHPREDICTION)
    if found is None:
        return None
    body, bp = found
    assert isinstance(bp, BatchPrediction)
    old = body.get("status") or {}
    configmap = handlers.kube().get(handlers.CONFIGMAP, bp.metadata.namespace, rayrun.configmap_name(bp)) or {}
    report = (configmap.get("data") or {}).get(batchjob.RESULT_KEY)
    new = batchjob.batchprediction_status(bp, job, report, old.get("conditions"))
    if old.get("phase") != new["phase"]:
        if new["phase"] == "Running":
            handlers.emit(body, "Normal", "Started", f"RayJob {new['rayJobName']} is scoring {bp.spec.input}")
        elif new["phase"] == "Succeeded":
            handlers.emit(body, "Normal", "Finished", batchjob.progress(new))
        elif new["phase"] == "Failed":
            handlers.emit(body, "Warning", "Failed", new.get("message", ""))
    if handlers.unchanged(old, new):
        return None
    handlers.kube().patch(
        handlers.BATCHPREDICTION, bp.metadata.namespace, bp.metadata.name, {"status": new}, subresource="status"
    )
    return new
