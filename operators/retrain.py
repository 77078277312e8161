"""Drift and retraining in the cluster: the retrain policy of kubeloop.analysis on the drift detector's flag and the
stable version's live performance on labels, read from Prometheus.

The ModelDeployment timer (operators.deployment_handlers) calls `tick` before the canary analysis:

- the drift flag of the stable version is mirrored into status.drift (written when the state changes);
- with spec.retrain.enabled, the trigger spec.retrain.on names (drift; performance: the live metric of
  spec.retrain.performance worse than its threshold on enough labelled rows; both: either) is timed in
  status.retrain.triggeredSince (a `RetrainTriggered` Event when it starts), and when `decide_retrain` says so a
  TrainingJob is created: a copy of spec.retrain.trainingJob on fresh data (the dataset is re-read: digest cleared,
  and no baseline check, since data that moved away from Production's is the reason to retrain), owned by the
  deployment;
- once that TrainingJob has ended: a ModelVersion that passed its gate becomes spec.canary with spec.retrain.analysis
  (operators.canary rolls it out from there); a failed run or a version that failed its gate is recorded, and the
  next retraining waits for minInterval as usual.

Every decision goes to status.history and a Kubernetes Event. The state lives in status, so a restart resumes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kubeloop.analysis import RetrainState, SignalSource, decide_retrain, underperforming
from kubeloop.analysis.signals import SignalError
from kubeloop.api import API_VERSION, ModelDeployment, ModelVersion, TrainingJob
from kubeloop.api.load import parse_resource
from kubeloop.api.trainingjob import NAME_MAX_LENGTH, name_is_valid
from kubeloop.errors import SpecError
from kubeloop.kube import ApiError, Kube, kind_of
from operators import common

log = logging.getLogger("operators.retrain")

MODELDEPLOYMENT = kind_of(API_VERSION, "ModelDeployment")
MODELVERSION = kind_of(API_VERSION, "ModelVersion")
TRAININGJOB = kind_of(API_VERSION, "TrainingJob")
LABEL_RETRAIN_OF = "kubeloop.dev/retrain-of"
HISTORY_LIMIT = 50
SIGNAL_WINDOW_S = 60.0

Emit = Callable[[Mapping[str, Any], str, str, str], None]


def tick(
    body: Mapping[str, Any], kube: Kube, emit: Emit, source: SignalSource | None, now: datetime | None = None
) -> str | None:
    """One look at a deployment's drift and retraining. Returns the action when it changed spec or history
    ("retrain", "canary", "retrainFailed"), else None (the canary analysis may run in the same tick)."""
    now = now or datetime.now(UTC)
    md = ModelDeployment.model_validate(dict(body))
    namespace, name = md.metadata.namespace, md.metadata.name
    status = dict(body.get("status") or {})
    retrain = dict(status.get("retrain") or {})
    history = list(status.get("history") or [])
    policy = md.spec.retrain

    def write(status_patch: dict[str, Any], entry: dict[str, Any] | None = None, spec: dict | None = None) -> None:
        if entry is not None:
            entry = {"time": common.iso(now), **entry}
            status_patch["history"] = [*history, entry][-HISTORY_LIMIT:]
        kube.patch(MODELDEPLOYMENT, namespace, name, {"status": status_patch}, subresource="status")
        if spec:
            kube.patch(MODELDEPLOYMENT, namespace, name, {"spec": spec})

    if policy.enabled and retrain.get("trainingJob"):
        return _follow(body, md, retrain["trainingJob"], kube, emit, write)
    if source is None:
        return None
    try:
        signals = source.version_signals(md.spec.model, md.spec.version, SIGNAL_WINDOW_S, namespace)
    except SignalError as error:
        log.warning("drift of %s/%s unreadable: %s", namespace, name, error)
        return None
    drifting = signals.drift

    patch: dict[str, Any] = {}
    state = "Unknown" if drifting is None else "Drift" if drifting else "NoDrift"
    if (status.get("drift") or {}).get("state") != state:
        patch["drift"] = {"state": state, "lastChecked": common.iso(now)}
        message = f"drift detector on v{md.spec.version}: {state}"
        reason = {"Drift": "DriftDetected", "NoDrift": "NoDrift", "Unknown": "DriftUnknown"}[state]
        emit(body, "Warning" if drifting else "Normal", reason, message)
    if not policy.enabled:
        if patch:
            write(patch)
        return None

    before = RetrainState(
        common.parse_time(retrain.get("triggeredSince")), common.parse_time(retrain.get("lastStarted"))
    )
    performance = underperforming(policy, signals.live) if policy.on != "drift" else None
    canary_active = md.spec.canary is not None
    decision = decide_retrain(policy, before, bool(drifting), now, canary_active=canary_active, performance=performance)
    if decision.state.triggered_since != before.triggered_since:
        since = decision.state.triggered_since
        patch["retrain"] = {"triggeredSince": common.iso(since) if since else None}
        if before.triggered_since is None:
            emit(body, "Warning", "RetrainTriggered", f"v{md.spec.version}: {decision.reason}")
    if not decision.start:
        if patch:
            write(patch)
        return None

    job_name, problem = _create_job(kube, md, now)
    started = {"triggeredSince": None, "lastStarted": common.iso(now)}
    if problem:
        entry = {"action": "retrainFailed", "reason": f"{decision.reason}, but {problem}", "stable": md.spec.version}
        write({**patch, "retrain": {**started, "reason": problem}}, entry)
        emit(body, "Warning", "RetrainFailed", entry["reason"])
        return "retrainFailed"
    reason = f"{decision.reason}: TrainingJob {job_name} (a copy of {policy.training_job} on fresh data)"
    write({**patch, "retrain": {**started, "trainingJob": job_name, "reason": reason}},
          {"action": "retrain", "reason": reason, "stable": md.spec.version})  # fmt: skip
    emit(body, "Normal", "Retraining", reason)
    log.info("retrain %s/%s: %s", namespace, name, reason)
    return "retrain"


def retrain_job_name(template: str, now: datetime) -> str:
    """``<template>-rYYYYmmddHHMMSS``, always a valid TrainingJob name (DNS-1035, at most 47 characters, see
    kubeloop.api.trainingjob). A template that does not fit (or is not a valid name) is cut and tagged with a
    digest of its whole name, so two templates that share a long prefix still get different names."""
    suffix = now.strftime("-r%Y%m%d%H%M%S")
    room = NAME_MAX_LENGTH - len(suffix)
    if len(template) <= room and name_is_valid(template):
        return template + suffix
    digest = "-" + hashlib.sha256(template.encode()).hexdigest()[:8]
    head = re.sub(r"[^a-z0-9-]", "-", template.lower()).lstrip("-0123456789")
    return (head[: room - len(digest)].rstrip("-") or "retrain") + digest + suffix


def _create_job(kube: Kube, md: ModelDeployment, now: datetime) -> tuple[str, str | None]:
    """Create the retraining TrainingJob; (its name, None) or (name, why it could not be)."""
    template_name = md.spec.retrain.training_job or ""
    namespace = md.metadata.namespace
    name = retrain_job_name(template_name, now)
    body = kube.get(TRAININGJOB, namespace, template_name)
    if body is None:
        return name, f"TrainingJob {namespace}/{template_name} (spec.retrain.trainingJob) does not exist"
    try:
        template = parse_resource({k: v for k, v in body.items() if k != "status"}, "spec.retrain.trainingJob")
    except SpecError as error:
        return name, str(error)
    assert isinstance(template, TrainingJob)
    if template.spec.model.name != md.spec.model:
        return name, (
            f"TrainingJob {template_name} trains model {template.spec.model.name}, not {md.spec.model}: "
            "point spec.retrain.trainingJob at a job of this model"
        )
    spec = copy.deepcopy(dict(body["spec"]))  # as the user wrote it, defaults left to the apiserver
    spec["dataset"] = {k: v for k, v in spec["dataset"].items() if k != "digest"} | {"baseline": "none"}
    manifest = {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": common.metadata(
            md, name, "retraining", {common.LABEL_MODELDEPLOYMENT: md.metadata.name, LABEL_RETRAIN_OF: template_name}
        ),
        "spec": spec,
    }
    try:
        kube.create(TRAININGJOB, namespace, manifest)
    except ApiError as error:
        if error.status != 409:  # 409: this tick's job exists already (a restart between create and status write)
            return name, f"creating TrainingJob {name} failed: {error}"
    return name, None


def _follow(
    body: Mapping[str, Any], md: ModelDeployment, job_name: str, kube: Kube, emit: Emit,
    write: Callable[..., None],
) -> str | None:  # fmt: skip
    """The retraining in flight: once it has ended, hand its version to a canary or record why not."""
    namespace = md.metadata.namespace
    job = kube.get(TRAININGJOB, namespace, job_name)
    job_status = (job or {}).get("status") or {}
    phase = job_status.get("phase")
    if job is not None and phase not in ("Succeeded", "Failed"):
        return None
    if md.spec.canary is not None:  # someone started a canary by hand meanwhile: it goes first
        return None
    done = {"retrain": {"trainingJob": None}}
    mv_name = job_status.get("modelVersion")
    if job is None or phase == "Failed" or not mv_name:
        why = (
            f"TrainingJob {job_name} was deleted"
            if job is None
            else f"TrainingJob {job_name} {phase}: {job_status.get('message') or 'no ModelVersion registered'}"
        )
        write(done, {"action": "retrainFailed", "reason": why, "stable": md.spec.version})
        emit(body, "Warning", "RetrainFailed", why)
        return "retrainFailed"
    mv_body = kube.get(MODELVERSION, namespace, mv_name)
    try:
        mv = parse_resource({k: v for k, v in mv_body.items() if k != "status"}, "retraining") if mv_body else None
    except SpecError as error:
        mv, problem = None, str(error)
    else:
        problem = f"{mv_name} is not a ModelVersion of {md.spec.model}"
    if not isinstance(mv, ModelVersion) or mv.spec.model != md.spec.model:
        why = f"TrainingJob {job_name} registered {mv_name}, but {problem}"
    elif mv.spec.stage == "Rejected" or (mv.spec.gate is not None and not mv.spec.gate.passed):
        reasons = "; ".join(mv.spec.gate.reasons) if mv.spec.gate else mv.spec.stage_reason or "rejected"
        why = f"v{mv.spec.version} from TrainingJob {job_name} failed its gate: {reasons}"
    else:
        analysis = md.spec.retrain.analysis
        reason = (
            f"v{mv.spec.version} from TrainingJob {job_name} passed its gate: canary at {analysis.steps[0]}% "
            f"against v{md.spec.version}"
        )
        canary = {
            "version": mv.spec.version,
            "trafficPercent": analysis.steps[0],
            "analysis": analysis.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        write(done, None, {"canary": canary})
        emit(body, "Normal", "RetrainedVersionReady", reason)
        log.info("retrain %s/%s: %s", namespace, md.metadata.name, reason)
        return "canary"
    write(done, {"action": "retrainFailed", "reason": why, "stable": md.spec.version})
    emit(body, "Warning", "RetrainFailed", why)
    return "retrainFailed"
