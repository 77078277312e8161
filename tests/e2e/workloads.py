"""What the e2e tests do to a real cluster more than once: train the sample TrainingJob to a ModelVersion, wait for
an InferenceService's predictor pod, run a client pod and read its log, ask Prometheus through the API server."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client

from tests.support.clusterkit import wait_for
from tests.support.operatorkit import create, kubeloop_obj, sample

# Two cores per node here: the sample's workers ask for 1 CPU each, the head for 1 (chart value ray.head.cpu); the
# e2e sizes them to half a CPU (Ray still counts each worker pod as one CPU) so the head and both workers fit on
# the one node their ReadWriteOnce KUBELOOP_HOME volume is on.
WORKER_CPU = "500m"
GATEWAY = "http://traefik.traefik"  # platform/kind/traefik.yaml's Service: the Gateway's listener
PROMETHEUS = ("monitoring", "prometheus:9090")  # platform/kind/prometheus.yaml's Service


def image(chart_values: dict[str, Any], component: str = "operator") -> str:
    """The installed release's image of a component: operator (python and kubeloop, light), or one of the
    workloads' (training, serving, drift)."""
    values = chart_values["image"] if component == "operator" else chart_values["workloadImages"][component]
    return f"{values['repository']}:{values['tag']}"


def trainingjob(name: str | None = None, cpu: str = WORKER_CPU, **hyperparameters: Any) -> dict[str, Any]:
    """The sample TrainingJob sized for this cluster, renamed and with hyperparameters changed when asked."""
    doc = sample("trainingjob")
    doc["spec"]["workers"]["cpu"] = cpu
    if name:
        doc["metadata"]["name"] = name
    doc["spec"]["hyperparameters"].update(hyperparameters)
    return doc


def finished_training(api: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    """The TrainingJob's status once it Succeeded or Failed (at most 15 minutes: first pulls of the image)."""

    def finished() -> dict[str, Any] | None:
        status = (kubeloop_obj(api, "trainingjobs", namespace, name) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    return wait_for(finished, 900, f"TrainingJob {name} Succeeded or Failed", 5)


def train(api: client.CustomObjectsApi, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Create the TrainingJob and return its ModelVersion once it Succeeded."""
    create(api, namespace, doc)
    status = finished_training(api, namespace, doc["metadata"]["name"])
    assert status["phase"] == "Succeeded", status
    mv = kubeloop_obj(api, "modelversions", namespace, status["modelVersion"])
    assert mv is not None, status
    return mv


def ready_predictor(core: client.CoreV1Api, namespace: str, selector: str, timeout: float = 900) -> Any:
    """The first pod matching the label selector with every container ready."""

    def ready() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        done = [p for p in pods if p.status.container_statuses and all(c.ready for c in p.status.container_statuses)]
        return done[0] if done else None

    return wait_for(ready, timeout, f"a pod of {selector} Running with every container ready", 2)


def start_client(core: client.CoreV1Api, namespace: str, name: str, image: str, script: str, *args: str) -> None:
    """A pod running ``python -c script args...`` from an image of kubeloop's (any holds python)."""
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(restart_policy="Never", containers=[client.V1Container(
            name="client", image=image, command=["python", "-c", script, *args],
        )]),
    ))  # fmt: skip


def client_log(core: client.CoreV1Api, namespace: str, name: str) -> str:
    """The client pod's log so far; empty while its container is not started (the API answers 400 then)."""
    try:
        # raw bytes: the client parses a log that is one JSON document into a dict and returns its repr
        return core.read_namespaced_pod_log(name, namespace, _preload_content=False).data.decode()
    except client.ApiException as error:
        if error.status == 400:
            return ""
        raise


def finished_client(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 300) -> str:
    """The log of a client pod once it Succeeded (the test fails with the log when it Failed)."""
    phase = wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace).status.phase) in ("Succeeded", "Failed") and p,
        timeout, f"the client pod {name} to finish", 1,
    )  # fmt: skip
    log = client_log(core, namespace, name)
    assert phase == "Succeeded", log
    return log


def prometheus(core: client.CoreV1Api, query: str) -> list[dict[str, Any]]:
    """An instant query's result vector, through the API server's proxy to the Prometheus Service."""
    namespace, service = PROMETHEUS
    answer = core.api_client.call_api(
        f"/api/v1/namespaces/{namespace}/services/{service}/proxy/api/v1/query", "GET",
        query_params=[("query", query)], auth_settings=["BearerToken"], _preload_content=False,
    )  # fmt: skip
    body = json.loads(answer[0].data)
    assert body["status"] == "success", body
    return body["data"]["result"]
