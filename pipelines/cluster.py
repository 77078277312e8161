"""How the steps run in a cluster: kfp-kubernetes settings (volume, secrets, GPU scheduling) and environment.

Every step mounts the `kubeloop-home` PersistentVolumeClaim (the snapshot store and the registry, shared with the
TrainingJob's RayJob) at KUBELOOP_HOME. The ingest step gets object-store credentials from the optional
`kubeloop-storage` Secret. The GPU steps (train, evaluate) take node selectors and tolerations from pipeline
parameters. The service account is the run's (KFP v2 sets it per run, not per task).

kfp.local ignores all of this: it applies neither the platform config nor the container environment.
"""

from __future__ import annotations

from typing import Any

from kubeloop.errors import KubeloopError
from pipelines.components import TRAINING_IMAGE
from pipelines.steps import IMAGE_ENV

try:
    from kfp import kubernetes as kfp_kubernetes
except ImportError:  # the compiled pipelines need it; local runs do not
    kfp_kubernetes = None

# kfp-kubernetes is released in step with kfp: the `kubernetes` extra pins the matching version
KFP_KUBERNETES_REQUIREMENT = "kfp[kubernetes]>=2.16,<2.18"
HOME_PVC = "kubeloop-home"
HOME_MOUNT = "/var/lib/kubeloop"
STORAGE_SECRET = "kubeloop-storage"
# fsspec's s3:// (and S3-compatible stores): Secret key -> environment variable of the step
STORAGE_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
}


class MissingDependency(KubeloopError):
    pass


def require_kfp_kubernetes() -> None:
    if kfp_kubernetes is None:
        raise MissingDependency(
            "kfp-kubernetes is not installed (import kfp.kubernetes failed): compiling the pipelines needs it to set "
            f"each step's volume, secrets and GPU scheduling. Install {KFP_KUBERNETES_REQUIREMENT!r} "
            "(kubeloop's `pipelines` extra)."
        )


def configure(
    task: Any,
    *,
    home_pvc: Any,
    reads_data: bool = False,
    gpu_node_selector: Any = None,
    gpu_tolerations: Any = None,
) -> Any:
    task.set_env_variable("KUBELOOP_HOME", HOME_MOUNT)
    task.set_env_variable(IMAGE_ENV, TRAINING_IMAGE)
    if kfp_kubernetes is None:
        return task
    kfp_kubernetes.mount_pvc(task, pvc_name=home_pvc, mount_path=HOME_MOUNT)
    if reads_data:
        kfp_kubernetes.use_secret_as_env(task, STORAGE_SECRET, STORAGE_SECRET_KEYS, optional=True)
    if gpu_node_selector is not None:
        kfp_kubernetes.add_node_selector_json(task, gpu_node_selector)
    if gpu_tolerations is not None:
        kfp_kubernetes.add_toleration_json(task, gpu_tolerations)
    return task
