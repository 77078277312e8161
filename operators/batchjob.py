"""BatchPrediction -> KubeRay RayJob (built by operators.rayrun), and the RayJob's status and the run's reports back
into the BatchPrediction.

Pure functions: a BatchPrediction (read from the cluster, with its uid) and the model version it scores with in,
the desired children and the status out.

The version is pinned at submission: the operator resolves it (``spec.version``, or the model's Production
ModelVersion resource in the namespace) and writes it as ``spec.version`` into the document the run reads, so the
run scores with that version even if another is promoted while it waits for its pods; the RayJob's job metadata
(``kubeloop.dev/version``, never changed after submission) remembers it.

The ConfigMap ``<name>-batchprediction`` holds the document under ``spec.yaml`` (mounted as
``/etc/kubeloop/batchprediction.yaml``) and what the run publishes under ``batchprediction.yaml``: its progress and
outcome, a BatchPredictionStatus in camelCase (phase, rowsDone, rowsTotal, rowsRejected, outputUri, inputDigest,
drift, modelVersion). The operator copies those fields into the status; the phase is the RayJob's, except that a
run reporting Failed fails the BatchPrediction with its message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from kubeloop.api import BatchPrediction, ModelVersion
from kubeloop.api.batchprediction import BatchPredictionStatus
from kubeloop.api.common import quantity_value
from operators import common, rayrun
from operators.settings import Settings

LABEL_BATCHPREDICTION = "kubeloop.dev/batchprediction"
SPEC_KEY = "spec.yaml"
RESULT_KEY = "batchprediction.yaml"
COMPONENT = "batch"
VERSION_METADATA = "kubeloop.dev/version"  # in the RayJob's spec.metadata: the version the run was given
# what the run reports and the status shows as it reported it
REPORTED = ("rowsDone", "rowsTotal", "rowsRejected", "outputUri", "inputDigest", "drift", "modelVersion")


def batch_run(bp: BatchPrediction, version: int, settings: Settings) -> rayrun.Run:
    """The BatchPrediction as a kubeloop run scoring with ``version``: one worker pod per Ray Data actor
    (``spec.workers.replicas``), and a head that offers Ray its CPUs for Ray Data's read and write tasks (with a
    head of ``num-cpus: 0`` and every worker CPU taken by an actor, they would find no CPU to run on)."""
    workers = bp.spec.workers
    pinned = bp.model_copy(update={"spec": bp.spec.model_copy(update={"version": version})})
    return rayrun.Run(
        owner=bp,
        component=COMPONENT,
        labels={LABEL_BATCHPREDICTION: bp.metadata.name, common.LABEL_MODEL: bp.spec.model},
        spec_key=SPEC_KEY,
        document=rayrun.resource_document(pinned),
        head_env={"KUBELOOP_BATCHPREDICTION": bp.metadata.name},
        head_ray_cpus=whole_cpus(settings.ray_head_cpu),
        worker_replicas=workers.replicas,
        worker_cpu=workers.cpu,
        worker_memory=workers.memory,
        worker_ray_cpus=whole_cpus(workers.cpu),
    )


def whole_cpus(cpu: int | str) -> int:
    """A pod's CPU as Ray counts it (and KubeRay derives num-cpus from a limit): rounded up, at least 1."""
    return max(1, math.ceil(quantity_value(cpu)))


def desired_rayjob(bp: BatchPrediction, version: int, settings: Settings) -> dict[str, Any]:
    return rayrun.desired_rayjob(batch_run(bp, version, settings), settings, {VERSION_METADATA: str(version)})


def submitted_version(rayjob: Mapping[str, Any]) -> int | None:
    """The version a submitted RayJob's run was given (None for a RayJob that does not say)."""
    value = ((rayjob.get("spec") or {}).get("metadata") or {}).get(VERSION_METADATA)
    return int(value) if value and str(value).isdigit() else None


# --- which version: spec.version, or the model's Production version ---------------------------------------------


def production_version(bp: BatchPrediction, modelversions: list[Mapping[str, Any]]) -> int | None:
    """The newest Production version of ``spec.model`` among the namespace's ModelVersion resources."""
    versions = [
        int(spec["version"])
        for mv in modelversions
        if (spec := mv.get("spec") or {}).get("model") == bp.spec.model
        and spec.get("stage") == "Production"
        and isinstance(spec.get("version"), int)
    ]
    return max(versions) if versions else None


def version_problem(bp: BatchPrediction) -> str:
    """What to say when ``spec.model`` has no Production version and ``spec.version`` names none."""
    return (
        f"spec.model {bp.spec.model}: no ModelVersion has stage Production in namespace {bp.metadata.namespace}; "
        "promote one (a ModelDeployment's canary) or name one in spec.version"
    )


def missing_version_problem(bp: BatchPrediction, version: int) -> str:
    name = ModelVersion.resource_name(bp.spec.model, version)
    return (
        f"spec.version {version}: no ModelVersion {name} of spec.model {bp.spec.model} in namespace "
        f"{bp.metadata.namespace}; register it (a TrainingJob), or leave spec.version out for the Production one"
    )


# --- status: RayJob and the run's report -> BatchPrediction -----------------------------------------------------


class ReportError(ValueError):
    """What the run published under batchprediction.yaml is not a BatchPredictionStatus."""


def reported(text: str | None) -> dict[str, Any] | None:
    """The run's report (camelCase fields of BatchPredictionStatus), checked; None when it published none."""
    if not text:
        return None
    try:
        report = BatchPredictionStatus.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as error:
        raise ReportError(f"{RESULT_KEY}: not a BatchPredictionStatus: {error}") from None
    return report.model_dump(mode="json", by_alias=True, exclude_none=True)


STATUS_FIELDS = ("phase", "rayJobName", "message", "startTime", "completionTime", "conditions")


def batchprediction_status(
    bp: BatchPrediction,
    rayjob: Mapping[str, Any],
    report_text: str | None,
    old_conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The status mirrored from the RayJob and the run's report (a merge patch for the status subresource)."""
    run = rayrun.run_status(bp, rayjob, old_conditions)
    status = {key: run[key] for key in STATUS_FIELDS if key in run}
    try:
        report = reported(report_text)
    except ReportError as error:
        cond = common.condition("Reported", False, "InvalidReport", str(error))
        status["conditions"] = common.merge_conditions(status["conditions"], [cond], rayrun.generation(bp))
        return status
    if report is None:
        if status["phase"] == "Succeeded":
            message = f"the run wrote no {RESULT_KEY} into ConfigMap {rayrun.configmap_name(bp)}"
            cond = common.condition("Reported", False, "NoReport", message)
            status["conditions"] = common.merge_conditions(status["conditions"], [cond], rayrun.generation(bp))
        return status
    status.update({key: report[key] for key in REPORTED if key in report})
    conditions = [common.condition("Reported", True, "Reported", progress(status))]
    if status["phase"] != "Failed":
        status["message"] = progress(status)
    if report.get("phase") == "Failed" and status["phase"] != "Failed":
        status["phase"] = "Failed"
        status["message"] = report.get("message") or "the run reported Failed"
        conditions += [
            common.condition("Complete", False, "Failed", status["message"]),
            common.condition("Failed", True, "RunFailed", status["message"]),
        ]
    status["conditions"] = common.merge_conditions(status["conditions"], conditions, rayrun.generation(bp))
    return status


def progress(status: Mapping[str, Any]) -> str:
    """One line on where the scoring is: rows done of total, rejected, output."""
    done, total = status.get("rowsDone"), status.get("rowsTotal")
    line = f"{done if done is not None else '?'} of {total if total is not None else '?'} rows scored"
    if status.get("rowsRejected") is not None:
        line += f", {status['rowsRejected']} rejected"
    if status.get("outputUri"):
        line += f", into {status['outputUri']}"
    drift = status.get("drift") or {}
    if drift.get("state"):
        line += f"; drift: {drift['state']}"
    return line
