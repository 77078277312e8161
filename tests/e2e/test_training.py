"""The sample TrainingJob on real pods: KubeRay starts a Ray head and worker pods from kubeloop's training image,
Ray Train runs DDP over gloo in them, and the run registers its ModelVersion."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

from kubernetes import client

from tests.e2e.workloads import finished_training, trainingjob
from tests.support.clusterkit import wait_for
from tests.support.operatorkit import create, kubeloop_obj, rayjob


def test_the_sample_trainingjob_trains_on_ray_pods_and_registers_its_modelversion(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    doc = trainingjob()
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

    status = finished_training(api, namespace, name)
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


def test_a_worker_pod_deleted_mid_training_resumes_from_its_checkpoint(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    # 300 epochs of ~0.5 s each (a checkpoint each) leave time to delete a worker pod inside the run; the driver's
    # progress lines reach the submitter Job's log, which is where this test reads them
    epochs = 300
    doc = trainingjob("arrests-resume", epochs=epochs)
    name = doc["metadata"]["name"]
    create(api, namespace, doc)
    cluster_name = wait_for(
        lambda: ((rayjob(api, namespace, name) or {}).get("status") or {}).get("rayClusterName"),
        120, "KubeRay to create the RayJob's RayCluster",
    )  # fmt: skip

    def driver_log() -> str:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        logs = []
        for pod in pods:
            try:
                logs.append(core.read_namespaced_pod_log(pod.metadata.name, namespace))
            except client.ApiException:
                continue
        return "\n".join(logs)

    wait_for(lambda: f"train.epoch epoch=10/{epochs}" in driver_log(), 600, "10 epochs trained", 2)
    victim = core.list_namespaced_pod(
        namespace, label_selector=f"ray.io/cluster={cluster_name},ray.io/node-type=worker"
    ).items[0]
    core.delete_namespaced_pod(victim.metadata.name, namespace, grace_period_seconds=0)
    killed_after = max(int(e) for e in re.findall(rf"train\.epoch epoch=(\d+)/{epochs}", driver_log()))

    status = finished_training(api, namespace, name)
    log = driver_log()  # the submitter Job stays with its RayJob when the finished RayCluster goes
    assert status["phase"] == "Succeeded", status
    starts = [int(n) for n in re.findall(r"train\.workers .*resumed_from_epoch=(\d+)", log)]
    assert len(starts) == 2 and starts[0] == 0, f"one restart of the worker group expected, saw {starts}"
    # not from scratch: from the last checkpoint before Ray noticed the pod gone (epochs go on for the seconds that
    # takes, so it can be past the epoch this test saw when it deleted the pod)
    assert starts[1] >= killed_after - 1, (starts, killed_after)
    executed = Counter(int(e) for e in re.findall(rf"train\.epoch epoch=(\d+)/{epochs}", log))
    assert sorted(executed) == list(range(1, epochs + 1))
    assert sum(count - 1 for count in executed.values()) <= 1, {e: c for e, c in executed.items() if c > 1}
    print(
        f"\ne2e resume: worker pod {victim.metadata.name} deleted after epoch {killed_after}, the group resumed "
        f"from epoch {starts[1]}, {epochs} epochs, Succeeded"
    )
