"""TrainingJob -> KubeRay RayJob (ray.io/v1), and the RayJob's status back into the TrainingJob.

Pure functions: a TrainingJob (read from the cluster, with its uid) in, the desired children out.

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

from kubeloop.api import ModelVersion, TrainingJob
from kubeloop.api.load import parse_resource
from kubeloop.errors import SpecError
from operators import common
from operators.settings import Settings, current

RAYJOB_API_VERSION = "ray.io/v1"
SPEC_KEY = "trainingjob.yaml"
RESULT_KEY = "modelversion.yaml"
SPEC_MOUNT = "/etc/kubeloop"
ENTRYPOINT = f"kubeloop run -f {SPEC_MOUNT}/{SPEC_KEY}"
COMPONENT = "training"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the same YAML, a fraction of the CPU
RAY_PORTS = [
    {"containerPort": 6379, "name": "gcs-server", "protocol": "TCP"},
    {"containerPort": 8265, "name": "dashboard", "protocol": "TCP"},
    {"containerPort": 10001, "name": "client", "protocol": "TCP"},
]


def rayjob_name(tj: TrainingJob) -> str:
    return tj.metadata.name


def configmap_name(tj: TrainingJob) -> str:
    return f"{tj.metadata.name}-trainingjob"


def service_account_name(tj: TrainingJob) -> str:
    return f"{tj.metadata.name}-training"


def _child_labels(tj: TrainingJob) -> dict[str, str]:
    return {common.LABEL_TRAININGJOB: tj.metadata.name, common.LABEL_MODEL: tj.spec.model.name}


def _meta(tj: TrainingJob, name: str) -> dict[str, Any]:
    return common.metadata(tj, name, COMPONENT, _child_labels(tj))


def trainingjob_document(tj: TrainingJob) -> str:
    """The YAML the entrypoint reads: the TrainingJob as the user wrote it (spec with defaults), no status."""
    doc = {
        "apiVersion": tj.api_version,
        "kind": tj.kind,
        "metadata": {"name": tj.metadata.name, "namespace": tj.metadata.namespace},
        "spec": tj.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return yaml.dump(doc, Dumper=_DUMPER, sort_keys=False)


def desired_configmap(tj: TrainingJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(tj, configmap_name(tj)),
        "data": {SPEC_KEY: trainingjob_document(tj)},
    }


def desired_service_account(tj: TrainingJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(tj, service_account_name(tj)),
        "automountServiceAccountToken": False,  # mounted only where needed: the head pod
    }


def desired_role(tj: TrainingJob) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(tj, service_account_name(tj)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [configmap_name(tj)],
                "verbs": ["get", "patch"],
            }
        ],
    }


def desired_role_binding(tj: TrainingJob) -> dict[str, Any]:
    name = service_account_name(tj)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(tj, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": tj.metadata.namespace}],
    }


def _home_volume(settings: Settings) -> dict[str, Any]:
    if settings.storage_pvc:
        return {"name": "kubeloop-home", "persistentVolumeClaim": {"claimName": settings.storage_pvc}}
    return {"name": "kubeloop-home", "emptyDir": {}}


def _env(tj: TrainingJob, settings: Settings, head: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBELOOP_HOME", "value": settings.home_mount_path},
        {"name": "HOME", "value": "/tmp"},
    ]
    if head:
        env += [
            {"name": "KUBELOOP_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "KUBELOOP_TRAININGJOB", "value": tj.metadata.name},
            {"name": "KUBELOOP_RESULT_CONFIGMAP", "value": configmap_name(tj)},
            {"name": "KUBELOOP_RESULT_KEY", "value": RESULT_KEY},
        ]
    return env


def _pod_template(tj: TrainingJob, settings: Settings, head: bool) -> dict[str, Any]:
    workers = tj.spec.workers
    gpus = 0 if head else workers.gpu
    mounts = [
        {"name": "kubeloop-home", "mountPath": settings.home_mount_path},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes = [_home_volume(settings), {"name": "tmp", "emptyDir": {}}]
    if head:
        mounts.insert(0, {"name": "trainingjob", "mountPath": SPEC_MOUNT, "readOnly": True})
        volumes.insert(
            0,
            {
                "name": "trainingjob",
                "configMap": {"name": configmap_name(tj), "items": [{"key": SPEC_KEY, "path": SPEC_KEY}]},
            },
        )
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": settings.training_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": _env(tj, settings, head),
        "resources": (
            common.resources(settings.ray_head_cpu, settings.ray_head_memory)
            if head
            else common.resources(workers.cpu, workers.memory, gpus)
        ),
        "volumeMounts": mounts,
        "securityContext": common.container_security_context(read_only_root=False),
    }
    if head:
        container["ports"] = RAY_PORTS
    spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(tj),
        "automountServiceAccountToken": head,  # the head reports the result; workers need no API access
        "securityContext": common.pod_security_context(settings.user_id),
        "containers": [container],
        "volumes": volumes,
        **common.gpu_scheduling(gpus, settings.gpu_node_selector, settings.gpu_toleration),
    }
    role = "head" if head else "worker"
    return {"metadata": {"labels": {**_child_labels(tj), "kubeloop.dev/ray-node": role}}, "spec": spec}


def _submitter_template(tj: TrainingJob, settings: Settings) -> dict[str, Any]:
    """KubeRay's K8sJobMode submitter pod, with the restricted security context (KubeRay sets the command)."""
    return {
        "metadata": {"labels": {**_child_labels(tj), "kubeloop.dev/ray-node": "submitter"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": common.pod_security_context(settings.user_id),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": settings.training_image,
                    "imagePullPolicy": settings.image_pull_policy,
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "200Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    "securityContext": common.container_security_context(read_only_root=True),
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def desired_rayjob(tj: TrainingJob, settings: Settings | None = None) -> dict[str, Any]:
    """The RayJob that runs ``kubeloop run -f`` of this TrainingJob on a Ray cluster of its own."""
    settings = settings or current()
    workers = tj.spec.workers
    # Each worker pod offers Ray exactly what one Ray Train worker reserves (kubeloop.training.job asks for
    # workers.ray_cpus() and workers.gpu), so every pod holds one worker and no worker lands on the head.
    worker_params: dict[str, str] = {"num-cpus": str(workers.ray_cpus())}
    if workers.gpu > 0:
        worker_params["num-gpus"] = str(workers.gpu)
    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        # One retry layer: spec.maxFailures is Ray Train's (worker-group restarts from the latest checkpoint in
        # this Ray cluster). A RayJob retry would start a whole new RayCluster and multiply the attempts.
        "backoffLimit": 0,
        "metadata": {"kubeloop.dev/trainingjob": f"{tj.metadata.namespace}/{tj.metadata.name}"},
        "rayClusterSpec": {
            "headGroupSpec": {
                # the head runs the driver only: no Ray Train worker is placed on it
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": _pod_template(tj, settings, head=True),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": workers.replicas,
                    "minReplicas": workers.replicas,
                    "maxReplicas": workers.replicas,
                    "rayStartParams": worker_params,
                    "template": _pod_template(tj, settings, head=False),
                }
            ],
        },
        "submitterPodTemplate": _submitter_template(tj, settings),
    }
    if settings.ray_version:
        spec["rayClusterSpec"]["rayVersion"] = settings.ray_version
    if settings.ray_ttl_seconds > 0:
        spec["ttlSecondsAfterFinished"] = settings.ray_ttl_seconds
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayJob",
        "metadata": _meta(tj, rayjob_name(tj)),
        "spec": spec,
    }


# --- status: RayJob -> TrainingJob -----------------------------------------------------------------------------

PENDING_DEPLOYMENT = {"", "Initializing", "Waiting", "Suspending", "Suspended", "New"}
TERMINAL_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}


def phase_of(rayjob_status: Mapping[str, Any]) -> str:
    """TrainingJob phase from a RayJob status (jobStatus wins when it is terminal or running)."""
    job = rayjob_status.get("jobStatus") or ""
    deployment = rayjob_status.get("jobDeploymentStatus") or ""
    if job == "SUCCEEDED" and deployment in ("Complete", "Running", ""):
        return "Succeeded"
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job != "SUCCEEDED"):
        return "Failed"
    if job in ("FAILED", "STOPPED") and deployment != "Retrying":
        return "Failed"
    if job == "RUNNING" or deployment in ("Running", "Retrying"):
        return "Running"
    return "Pending"


def trainingjob_status(
    tj: TrainingJob, rayjob: Mapping[str, Any], old_conditions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The TrainingJob status fields mirrored from its RayJob (a merge patch for the status subresource)."""
    rs: Mapping[str, Any] = rayjob.get("status") or {}
    phase = phase_of(rs)
    job, deployment = rs.get("jobStatus") or "", rs.get("jobDeploymentStatus") or ""
    reason = rs.get("reason") or ""
    message = rs.get("message") or ""
    name = (rayjob.get("metadata") or {}).get("name", rayjob_name(tj))
    detail = f"RayJob {name}: jobDeploymentStatus={deployment or 'New'} jobStatus={job or 'New'}"
    conditions = [
        common.condition("Submitted", True, "RayJobCreated", f"RayJob {name} created"),
        common.condition(
            "Running",
            phase == "Running",
            {"Running": "RayJobRunning", "Pending": "RayJobPending"}.get(phase, "RayJobFinished"),
            detail,
        ),
        common.condition(
            "Complete", phase == "Succeeded", "RayJobSucceeded" if phase == "Succeeded" else phase, detail
        ),
        common.condition(
            "Failed",
            phase == "Failed",
            (reason or "RayJobFailed") if phase == "Failed" else "NotFailed",
            message if phase == "Failed" else "",
        ),
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "rayJobName": name,
        "jobStatus": job or None,
        "jobDeploymentStatus": deployment or None,
        "dashboardURL": rs.get("dashboardURL") or None,
        "message": message or detail,
        "startTime": rs.get("startTime"),
        "completionTime": rs.get("endTime") if phase in ("Succeeded", "Failed") else None,
        "conditions": common.merge_conditions(old_conditions, conditions, tj_generation(tj)),
    }
    return {k: v for k, v in status.items() if v is not None}


def tj_generation(tj: TrainingJob) -> int | None:
    generation = (tj.metadata.model_extra or {}).get("generation")
    return int(generation) if generation is not None else None


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
