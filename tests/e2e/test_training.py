"""The sample TrainingJob on real pods: KubeRay starts a Ray head and worker pods from kubeloop's training image,
Ray Train runs DDP over gloo in them, and the run registers its ModelVersion."""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from tests.support.clusterkit import wait_for
from tests.support.operatorkit import create, kubeloop_obj, rayjob, sample

# Two cores per node here: the sample's workers ask for 1 CPU each, the head for 1 (chart value ray.head.cpu); the
# e2e sizes them to half a CPU (Ray still counts each worker pod as one CPU) so the head and both workers fit on
# the one node their ReadWriteOnce KUBELOOP_HOME volume is on.
WORKER_CPU = "500m"


def test_the_sample_trainingjob_trains_on_ray_pods_and_registers_its_modelversion(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    doc = sample("trainingjob")
    doc["spec"]["workers"]["cpu"] = WORKER_CPU
    started = time.monotonic()
    create(api, namespace, doc)
    name, replicas = doc["metadata"]["name"], doc["spec"]["workers"]["replicas"]
    cluster_name = wait_for(
        lambda: ((rayjob(api, namespace, name) or {}).get("status") or {}).get("rayClusterName"),
        120, "KubeRay to create the RayJob's RayCluster",
    )  # fmt: skip

    seen: dict[str, Any] = {}

    def ray_pods_running() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster_name}").items
        for pod in pods:
            seen[pod.metadata.name] = pod
        running = [p for p in pods if p.status.phase == "Running"]
        return len(running) == 1 + replicas

    wait_for(ray_pods_running, 900, "the Ray head and worker pods Running (first pull of the training image)", 2)
    pods_up = time.monotonic() - started
    kinds = sorted(p.metadata.labels.get("ray.io/node-type", "?") for p in seen.values())
    assert kinds == ["head"] + ["worker"] * replicas, kinds

    def finished() -> dict[str, Any] | None:
        status = (kubeloop_obj(api, "trainingjobs", namespace, name) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(finished, 900, "the TrainingJob Succeeded or Failed", 5)
    assert status["phase"] == "Succeeded", status
    version = status["modelVersion"]
    mv = kubeloop_obj(api, "modelversions", namespace, version)
    assert mv is not None
    assert mv["spec"]["lineage"]["trainingJob"] == f"{namespace}/{name}"
    roc_auc = mv["spec"]["metrics"]["overall"]["rocAuc"]
    assert roc_auc == status["metrics"]["rocAuc"]
    assert roc_auc >= doc["spec"]["gate"]["thresholds"]["rocAuc"]
    print(
        f"\ne2e training: Ray pods Running {pods_up:.0f} s after the TrainingJob, Succeeded after "
        f"{time.monotonic() - started:.0f} s; {version} rocAuc {roc_auc:.3f}, "
        f"pods on {sorted({p.spec.node_name for p in seen.values()})}"
    )
