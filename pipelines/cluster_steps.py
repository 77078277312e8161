"""The cluster side of the train and deploy steps: a TrainingJob resource waited for, a ModelDeployment patched,
through kubeloop's Kubernetes client (kubeloop.kube), as field manager ``kubeloop-pipelines``.

The step's pod talks to the API server with the run's service account (set when the run is created: KFP v2 has no
per-task service account), which needs: trainingjobs create/get and modeldeployments get/patch in its namespace.
The TrainingJob operator turns the resource into a KubeRay RayJob with the workers and GPUs its spec asks for;
the RayJob registers the ModelVersion in the registry on the `kubeloop-home` volume that the steps mount too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubeloop.api import TrainingJob
from kubeloop.api.common import API_VERSION
from kubeloop.api.modeldeployment import ModelDeployment
from kubeloop.api.modelversion import ModelVersion
from kubeloop.api.trainingjob import NAME_MAX_LENGTH
from kubeloop.errors import KubeloopError
from kubeloop.kube import ApiError, Kube, RestKube, kind_of
from kubeloop.log import event
from kubeloop.registry import Registry

log = logging.getLogger("kubeloop.pipelines")

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TRAINING_TIMEOUT_S = 24 * 3600
POLL_S = 10.0


MANAGED_BY = "kubeloop-pipelines"
TRAININGJOB = kind_of(API_VERSION, TrainingJob.KIND)
MODELDEPLOYMENT = kind_of(API_VERSION, ModelDeployment.KIND)


def client() -> Kube:
    """In-cluster (a pipeline pod) or from the kubeconfig."""
    return RestKube.from_environment(MANAGED_BY)


def pod_namespace() -> str:
    return NAMESPACE_FILE.read_text().strip() if NAMESPACE_FILE.is_file() else "default"


def trainingjob_name(job: TrainingJob) -> str:
    """Named after its spec (which pins the dataset digest): a retried step finds and waits for the same job. Cut to
    fit a TrainingJob name (at most NAME_MAX_LENGTH: the RayJob takes it)."""
    spec = json.dumps(job.spec.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True)
    suffix = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return f"{job.metadata.name[: NAME_MAX_LENGTH - len(suffix) - 1].rstrip('-')}-{suffix}"


def run_trainingjob(
    job: TrainingJob,
    *,
    kube: Kube | None = None,
    namespace: str | None = None,
    timeout_s: float = TRAINING_TIMEOUT_S,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Create the TrainingJob (or adopt the one this spec already made) and wait for Succeeded; returns it."""
    kube = kube or client()
    namespace = namespace or pod_namespace()
    name = trainingjob_name(job)
    manifest = job.to_manifest()
    manifest["metadata"] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, "kubeloop.dev/model": job.spec.model.name},
    }
    manifest.pop("status", None)
    try:
        kube.create(TRAININGJOB, namespace, manifest)
        event(log, "trainingjob.created", trainingjob=f"{namespace}/{name}")
    except ApiError as error:
        if error.status != 409:
            raise KubeloopError(
                f"cannot create TrainingJob {namespace}/{name}: {error.status} {error.reason}"
            ) from None
        event(log, "trainingjob.adopted", trainingjob=f"{namespace}/{name}", reason="exists (same spec)")
    deadline = clock() + timeout_s
    last_phase = None
    while True:
        current = kube.get(TRAININGJOB, namespace, name)
        if current is None:
            raise KubeloopError(f"TrainingJob {namespace}/{name} was deleted while the step waited: run the step again")
        status = current.get("status") or {}
        phase = status.get("phase")
        if phase != last_phase:
            message = status.get("message")
            event(log, "trainingjob.phase", trainingjob=f"{namespace}/{name}", phase=phase or "-", message=message)
            last_phase = phase
        if phase == "Succeeded":
            if not status.get("modelVersion"):
                raise KubeloopError(f"TrainingJob {namespace}/{name} succeeded without status.modelVersion")
            return current
        if phase == "Failed":
            raise KubeloopError(
                f"TrainingJob {namespace}/{name} failed: {status.get('message') or 'no message'} "
                "(delete it to train this spec again)"
            )
        if clock() >= deadline:
            raise KubeloopError(f"TrainingJob {namespace}/{name} not finished after {timeout_s:.0f}s (phase {phase})")
        sleep(poll_s)


def registered_version(trainingjob: dict[str, Any], registry: Registry | None = None) -> ModelVersion:
    """The ModelVersion a finished TrainingJob registered (status.modelVersion, e.g. arrests-v3)."""
    from pipelines.steps import parse_version_name

    model, version = parse_version_name(trainingjob["status"]["modelVersion"])
    return (registry or Registry()).get(model, version)


def set_canary(
    deployment: str,
    model: str,
    version: int,
    traffic_percent: int,
    *,
    kube: Kube | None = None,
    namespace: str | None = None,
) -> str:
    """Patch ModelDeployment NAME (or NAMESPACE/NAME): spec.canary = the new version; returns NAMESPACE/NAME."""
    from pipelines.steps import with_canary

    kube = kube or client()
    given, _, name = deployment.rpartition("/")
    namespace = given or namespace or pod_namespace()
    found = kube.get(MODELDEPLOYMENT, namespace, name)
    if found is None:
        raise KubeloopError(f"no ModelDeployment {namespace}/{name}: create it first, or name another")
    current = ModelDeployment.model_validate(found)
    updated = with_canary(current, model, version, traffic_percent)  # validates: model, stable version, canary
    patch = {"spec": {"canary": updated.spec.canary.model_dump(mode="json", by_alias=True, exclude_none=True)}}
    kube.patch(MODELDEPLOYMENT, namespace, name, patch)
    event(log, "deploy.canary", deployment=f"{namespace}/{name}", version=version, traffic_percent=traffic_percent)
    return f"{namespace}/{name}"
