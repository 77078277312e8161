"""A kubeloop run as a KubeRay RayJob (ray.io/v1): the one way the operator builds one, for every kind it runs.

A TrainingJob (operators.rayjob) and a BatchPrediction (operators.batchjob) run the same way: the operator writes
the resource document (apiVersion, kind, metadata name/namespace, spec) into a ConfigMap ``<name>-<kind>`` it owns,
mounted as ``/etc/kubeloop/<kind>.yaml`` in the Ray head, and the RayJob's entrypoint is
``kubeloop run -f /etc/kubeloop/<kind>.yaml``, the command a user runs on a laptop. The head runs as a
ServiceAccount bound to a Role that may only get and patch that one ConfigMap: the run publishes what it has to say
there (kubeloop.in_cluster.publish) and the operator turns it into resources and status. ``Run`` holds what differs
between the kinds; everything else is here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kubeloop.api import Resource
from kubeloop.api.common import Quantity
from operators import common
from operators.settings import Settings

RAYJOB_API_VERSION = "ray.io/v1"
SPEC_MOUNT = "/etc/kubeloop"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the same YAML, a fraction of the CPU
RAY_PORTS = [
    {"containerPort": 6379, "name": "gcs-server", "protocol": "TCP"},
    {"containerPort": 8265, "name": "dashboard", "protocol": "TCP"},
    {"containerPort": 10001, "name": "client", "protocol": "TCP"},
]


@dataclass(frozen=True)
class Run:
    """What one kind's run needs that another's does not: its names, labels, document and Ray cluster's size."""

    owner: Resource  # read from the cluster: its uid makes it the children's controller
    component: str  # app.kubernetes.io/component of the children; the ServiceAccount is <name>-<component>
    labels: Mapping[str, str]  # kubeloop.dev/* labels of every child and Ray pod
    spec_key: str  # the ConfigMap key of the document (the run's reports take other keys of the same ConfigMap)
    document: Mapping[str, Any]  # what `kubeloop run -f` reads: the resource without status
    head_env: Mapping[str, str]  # the run's own variables in the head (the result ConfigMap's are added)
    head_ray_cpus: int  # CPUs the head offers Ray: 0 keeps every task and actor on the worker pods
    worker_replicas: int
    worker_cpu: Quantity
    worker_memory: Quantity
    worker_ray_cpus: int  # what each worker pod offers Ray: exactly what one Ray worker of the run reserves
    worker_gpu: int = 0

    @property
    def name(self) -> str:
        return self.owner.metadata.name

    @property
    def namespace(self) -> str:
        return self.owner.metadata.namespace

    @property
    def spec_file(self) -> str:
        return f"{self.owner.kind.lower()}.yaml"

    @property
    def configmap_name(self) -> str:
        return configmap_name(self.owner)

    @property
    def service_account_name(self) -> str:
        return f"{self.name}-{self.component}"

    @property
    def entrypoint(self) -> str:
        return f"kubeloop run -f {SPEC_MOUNT}/{self.spec_file}"


def configmap_name(owner: Resource) -> str:
    """The run's ConfigMap: the document it reads, and what it reports."""
    return f"{owner.metadata.name}-{owner.kind.lower()}"


def resource_document(resource: Resource) -> dict[str, Any]:
    """The document a run reads: the resource as the user wrote it (spec with defaults), no status."""
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": resource.metadata.name, "namespace": resource.metadata.namespace},
        "spec": resource.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def dump(document: Mapping[str, Any]) -> str:
    return yaml.dump(dict(document), Dumper=_DUMPER, sort_keys=False)


def submitted_unchanged(configmap: Mapping[str, Any], run: Run) -> bool:
    """Whether the document in the run's ConfigMap (what the run read) is the one the resource asks for now."""
    text = (configmap.get("data") or {}).get(run.spec_key)
    return text is not None and yaml.safe_load(text) == yaml.safe_load(dump(run.document))


def _meta(run: Run, name: str) -> dict[str, Any]:
    return common.metadata(run.owner, name, run.component, run.labels)


def desired_configmap(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, run.configmap_name),
        "data": {run.spec_key: dump(run.document)},
    }


def desired_service_account(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(run, run.service_account_name),
        "automountServiceAccountToken": False,  # mounted only where needed: the head pod
    }


def desired_role(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(run, run.service_account_name),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [run.configmap_name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def desired_role_binding(run: Run) -> dict[str, Any]:
    name = run.service_account_name
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(run, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": run.namespace}],
    }


def _home_volume(settings: Settings) -> dict[str, Any]:
    if settings.storage_pvc:
        return {"name": "kubeloop-home", "persistentVolumeClaim": {"claimName": settings.storage_pvc}}
    return {"name": "kubeloop-home", "emptyDir": {}}


def _env(run: Run, settings: Settings, head: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBELOOP_HOME", "value": settings.home_mount_path},
        {"name": "HOME", "value": "/tmp"},
    ]
    if head:
        env.append({"name": "KUBELOOP_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
        env += [{"name": name, "value": value} for name, value in run.head_env.items()]
        env.append({"name": "KUBELOOP_RESULT_CONFIGMAP", "value": run.configmap_name})
    return env


def _pod_template(run: Run, settings: Settings, head: bool) -> dict[str, Any]:
    gpus = 0 if head else run.worker_gpu
    mounts = [
        {"name": "kubeloop-home", "mountPath": settings.home_mount_path},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes = [_home_volume(settings), {"name": "tmp", "emptyDir": {}}]
    if head:
        volume = run.owner.kind.lower()
        mounts.insert(0, {"name": volume, "mountPath": SPEC_MOUNT, "readOnly": True})
        volumes.insert(
            0,
            {
                "name": volume,
                "configMap": {"name": run.configmap_name, "items": [{"key": run.spec_key, "path": run.spec_file}]},
            },
        )
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": settings.training_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": _env(run, settings, head),
        "resources": (
            common.resources(settings.ray_head_cpu, settings.ray_head_memory)
            if head
            else common.resources(run.worker_cpu, run.worker_memory, gpus)
        ),
        "volumeMounts": mounts,
        "securityContext": common.container_security_context(read_only_root=False),
    }
    if head:
        container["ports"] = RAY_PORTS
    spec: dict[str, Any] = {
        "serviceAccountName": run.service_account_name,
        "automountServiceAccountToken": head,  # the head reports the result; workers need no API access
        "securityContext": common.pod_security_context(settings.user_id),
        "containers": [container],
        "volumes": volumes,
        **common.gpu_scheduling(gpus, settings.gpu_node_selector, settings.gpu_toleration),
    }
    role = "head" if head else "worker"
    return {"metadata": {"labels": {**run.labels, "kubeloop.dev/ray-node": role}}, "spec": spec}


def _submitter_template(run: Run, settings: Settings) -> dict[str, Any]:
    """KubeRay's K8sJobMode submitter pod, with the restricted security context (KubeRay sets the command)."""
    return {
        "metadata": {"labels": {**run.labels, "kubeloop.dev/ray-node": "submitter"}},
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


def desired_rayjob(run: Run, settings: Settings, job_metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The RayJob that runs ``kubeloop run -f`` of the run's document on a Ray cluster of its own.

    ``job_metadata``: more of the RayJob's ``spec.metadata`` (Ray's job metadata), which nothing changes after
    submission: what the operator must remember of how it submitted the run."""
    worker_params: dict[str, str] = {"num-cpus": str(run.worker_ray_cpus)}
    if run.worker_gpu > 0:
        worker_params["num-gpus"] = str(run.worker_gpu)
    kind = run.owner.kind.lower()
    spec: dict[str, Any] = {
        "entrypoint": run.entrypoint,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        # One retry layer: a run retries inside its Ray cluster (Ray Train's maxFailures, Ray Data's task retries).
        # A RayJob retry would start a whole new RayCluster and multiply the attempts.
        "backoffLimit": 0,
        "metadata": {f"kubeloop.dev/{kind}": f"{run.namespace}/{run.name}", **(job_metadata or {})},
        "rayClusterSpec": {
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": str(run.head_ray_cpus), "dashboard-host": "0.0.0.0"},
                "template": _pod_template(run, settings, head=True),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": run.worker_replicas,
                    "minReplicas": run.worker_replicas,
                    "maxReplicas": run.worker_replicas,
                    "rayStartParams": worker_params,
                    "template": _pod_template(run, settings, head=False),
                }
            ],
        },
        "submitterPodTemplate": _submitter_template(run, settings),
    }
    if settings.ray_version:
        spec["rayClusterSpec"]["rayVersion"] = settings.ray_version
    if settings.ray_ttl_seconds > 0:
        spec["ttlSecondsAfterFinished"] = settings.ray_ttl_seconds
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayJob",
        "metadata": _meta(run, run.name),
        "spec": spec,
    }


# --- status: RayJob -> the run's resource ------------------------------------------------------------------------


def phase_of(rayjob_status: Mapping[str, Any]) -> str:
    """The run's phase from a RayJob status (jobStatus wins when it is terminal or running)."""
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


def generation(resource: Resource) -> int | None:
    value = (resource.metadata.model_extra or {}).get("generation")
    return int(value) if value is not None else None


def run_status(
    resource: Resource, rayjob: Mapping[str, Any], old_conditions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The status fields every run mirrors from its RayJob (a merge patch for the status subresource): phase,
    the RayJob's statuses, times, message, conditions Submitted, Running, Complete, Failed."""
    rs: Mapping[str, Any] = rayjob.get("status") or {}
    phase = phase_of(rs)
    job, deployment = rs.get("jobStatus") or "", rs.get("jobDeploymentStatus") or ""
    reason = rs.get("reason") or ""
    message = rs.get("message") or ""
    name = (rayjob.get("metadata") or {}).get("name", resource.metadata.name)
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
        "conditions": common.merge_conditions(old_conditions, conditions, generation(resource)),
    }
    return {k: v for k, v in status.items() if v is not None}
