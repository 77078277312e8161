"""TrainingJob -> KubeRay RayJob (ray.io/v1), and the RayJob's status back into the TrainingJob.

Pure functions: a TrainingJob (read from the cluster, with its uid) in, the desired children out (built by
operators.rayrun, as every kubeloop run is; here: what a TrainingJob's run is, and what it reports).

How the spec reaches the run: the operator writes the TrainingJob (apiVersion, kind, metadata name/namespace,
spec) as ``trainingjob.yaml`` into a ConfigMap ``<name>-trainingjob`` owned by the TrainingJob and mounts it at
``/etc/kubeloop`` in the Ray head pod; the RayJob's entrypoint is ``kubeloop run -f /etc/kubeloop/trainingjob.yaml``
— the command a user runs on a laptop, so the same parser and the same code path run in both places. (A ConfigMap
rather than ``runtimeEnvYAML``: the entrypoint reads a file either way, the ConfigMap shows what ran with
``kubectl get cm``, and it has no size limit short of 1 MiB.)

How the result comes back: the run registers its ModelVersion in KUBELOOP_HOME (a PersistentVolumeClaim in
the cluster, see Settings.storage_pvc) as it does locally, then — because ``KUBELOOP_RESULT_CONFIGMAP`` is set
in the head pod — adds the ModelVersion manifest as the key ``modelversion.yaml`` of that same ConfigMap. The
head pod runs as a ServiceAccount ``<name>-training`` bound to a Role that may only get and patch that one
ConfigMap (``resourceNames``). When the RayJob ends, the operator reads the key, checks it (it must parse as a
ModelVersion of this TrainingJob's model, naming this TrainingJob in its lineage; a run cannot make itself
Production) and creates the ``ModelVersion`` resource. The operator stays the only writer of kubeloop.dev
resources; user code in the training pods can write one ConfigMap key and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from kubeloop.api import ModelVersion, TrainingJob
from kubeloop.api.load import parse_resource
from kubeloop.api.trainingjob import TuningStatus
from kubeloop.errors import SpecError
from operators import common, rayrun
from operators.settings import Settings, current

SPEC_KEY = "trainingjob.yaml"
RESULT_KEY = "modelversion.yaml"
TUNING_KEY = "tuning.yaml"
COMPONENT = "training"


def training_run(tj: TrainingJob) -> rayrun.Run:
    """The TrainingJob as a kubeloop run: one worker pod per Ray Train worker, ``parallelism`` times over for a
    search (each trial trains with spec.workers, ``parallelism`` trials at once)."""
    workers = tj.spec.workers
    trials_at_once = tj.spec.tuning.parallelism if tj.spec.tuning is not None else 1
    return rayrun.Run(
        owner=tj,
        component=COMPONENT,
        labels={common.LABEL_TRAININGJOB: tj.metadata.name, common.LABEL_MODEL: tj.spec.model.name},
        spec_key=SPEC_KEY,
        document=rayrun.resource_document(tj),
        head_env={"KUBELOOP_TRAININGJOB": tj.metadata.name, "KUBELOOP_RESULT_KEY": RESULT_KEY},
        head_ray_cpus=0,  # the head runs the driver only: no Ray Train worker is placed on it
        worker_replicas=workers.replicas * trials_at_once,
        worker_cpu=workers.cpu,
        worker_memory=workers.memory,
        # Each worker pod offers Ray exactly what one Ray Train worker reserves (kubeloop.training.job asks for
        # workers.ray_cpus() and workers.gpu), so every pod holds one worker and no worker lands on the head.
        worker_ray_cpus=workers.ray_cpus(),
        worker_gpu=workers.gpu,
    )


def configmap_name(tj: TrainingJob) -> str:
    return training_run(tj).configmap_name


def desired_configmap(tj: TrainingJob) -> dict[str, Any]:
    return rayrun.desired_configmap(training_run(tj))


def desired_service_account(tj: TrainingJob) -> dict[str, Any]:
    return rayrun.desired_service_account(training_run(tj))


def desired_role(tj: TrainingJob) -> dict[str, Any]:
    return rayrun.desired_role(training_run(tj))


def desired_role_binding(tj: TrainingJob) -> dict[str, Any]:
    return rayrun.desired_role_binding(training_run(tj))


def desired_rayjob(tj: TrainingJob, settings: Settings | None = None) -> dict[str, Any]:
    """The RayJob that runs ``kubeloop run -f`` of this TrainingJob on a Ray cluster of its own."""
    return rayrun.desired_rayjob(training_run(tj), settings or current())


# --- status: RayJob -> TrainingJob -----------------------------------------------------------------------------


def trainingjob_status(
    tj: TrainingJob, rayjob: Mapping[str, Any], old_conditions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The TrainingJob status fields mirrored from its RayJob (a merge patch for the status subresource)."""
    return rayrun.run_status(tj, rayjob, old_conditions)


# --- the run's result -> ModelVersion ---------------------------------------------------------------------------


class ResultError(SpecError):
    """What the run reported is not a ModelVersion this TrainingJob may register."""


def registered_modelversion(tj: TrainingJob, result: str) -> dict[str, Any]:
    """The ModelVersion resource to create from the manifest the run reported, after checking it.

    The run may only register a version of its own model, naming itself in the lineage, as a Candidate (or
    Rejected, when the gate failed); the stage history starts with the run's entry. Labels and the
    namespace are the operator's. No owner reference: a registry entry outlives the job that trained it.
    """
    try:
        doc = yaml.safe_load(result)
    except yaml.YAMLError as error:
        raise ResultError(f"{RESULT_KEY} is not YAML: {error}") from None
    try:
        record = parse_resource(doc, RESULT_KEY)
    except SpecError as error:
        raise ResultError(str(error)) from None
    if not isinstance(record, ModelVersion):
        raise ResultError(f"{RESULT_KEY}: expected a ModelVersion, got {record.kind}")
    spec = record.spec
    if spec.model != tj.spec.model.name:
        raise ResultError(f"{RESULT_KEY}: spec.model is {spec.model!r}, the TrainingJob trains {tj.spec.model.name!r}")
    own = f"{tj.metadata.namespace}/{tj.metadata.name}"
    if spec.lineage.training_job != own:
        raise ResultError(f"{RESULT_KEY}: spec.lineage.trainingJob is {spec.lineage.training_job!r}, not {own!r}")
    if spec.stage not in ("Candidate", "Rejected"):
        raise ResultError(f"{RESULT_KEY}: a training run registers Candidate or Rejected versions, not {spec.stage}")
    manifest = record.to_manifest()
    name = ModelVersion.resource_name(spec.model, spec.version)
    manifest["metadata"] = {
        "name": name,
        "namespace": tj.metadata.namespace,
        "labels": {
            **common.labels(tj, "registry"),
            common.LABEL_MODEL: spec.model,
            common.LABEL_VERSION: str(spec.version),
            common.LABEL_TRAININGJOB: tj.metadata.name,
        },
    }
    return manifest


def metrics_status(modelversion: Mapping[str, Any]) -> dict[str, Any]:
    """TrainingJob status fields from the registered ModelVersion: its name, the task's metrics, epochs, and the
    training data's validation report."""
    spec = modelversion.get("spec") or {}
    overall = (spec.get("metrics") or {}).get("overall") or {}
    # every number the task filled (binary: rocAuc, …; multiclass: f1, …; regression: rmse, r2, …)
    metrics = {key: float(value) for key, value in overall.items() if key != "rows" and isinstance(value, int | float)}
    out: dict[str, Any] = {"modelVersion": (modelversion.get("metadata") or {}).get("name"), "metrics": metrics}
    per_epoch = (spec.get("metrics") or {}).get("perEpoch")
    if per_epoch:
        out["epochsCompleted"] = len(per_epoch)
    if spec.get("validation"):
        out["validation"] = spec["validation"]
    return out


def tuning_status(result: str) -> dict[str, Any]:
    """``status.tuning`` from the search summary the run published under ``tuning.yaml`` (a TuningStatus)."""
    try:
        summary = TuningStatus.model_validate(yaml.safe_load(result))
    except (yaml.YAMLError, ValidationError) as error:
        raise ResultError(f"{TUNING_KEY}: not a search summary (TuningStatus): {error}") from None
    return summary.model_dump(mode="json", by_alias=True, exclude_none=True)
