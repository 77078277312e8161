"""The sample ModelDeployment on real pods: the operator's InferenceService is admitted by KServe's webhook, the
predictor pod runs kubeloop's model server with the drift sidecar (and KServe's payload logger agent), and v1 and
v2 requests from another pod get predictions that reach the sidecar."""

from __future__ import annotations

import json
import time
from typing import Any

from kubernetes import client

from operators.inferenceservice import SIDECAR_CONTAINER
from operators.settings import Settings
from tests.e2e.test_training import WORKER_CPU
from tests.support.clusterkit import wait_for
from tests.support.operatorkit import create, inferenceservice, kubeloop_obj, sample
from tests.support.serving_requests import GOOD, v1, v2_body

PROBE = """
import json, sys, urllib.request
base, v1, v2, status = sys.argv[1:5]
def post(path, body):
    request = urllib.request.Request(base + path, json.dumps(json.loads(body)).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)
out = {"v1": post("/v1/models/arrests:predict", v1), "v2": post("/v2/models/arrests/infer", v2)}
with urllib.request.urlopen(status, timeout=10) as answer:
    out["sidecar"] = json.load(answer)
print(json.dumps(out))
"""


def _train(api: client.CustomObjectsApi, namespace: str) -> str:
    doc = sample("trainingjob")
    doc["spec"]["workers"]["cpu"] = WORKER_CPU
    create(api, namespace, doc)

    def finished() -> dict[str, Any] | None:
        status = (kubeloop_obj(api, "trainingjobs", namespace, doc["metadata"]["name"]) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(finished, 900, "the TrainingJob Succeeded or Failed", 5)
    assert status["phase"] == "Succeeded", status
    return status["modelVersion"]


def test_the_sample_modeldeployment_serves_v1_and_v2_with_its_drift_sidecar(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, chart_values: dict[str, Any]
) -> None:
    _train(api, namespace)
    started = time.monotonic()
    create(api, namespace, sample("modeldeployment"))
    isvc = wait_for(lambda: inferenceservice(api, namespace, "arrests"), 120, "the InferenceService (admitted)")
    assert isvc["spec"]["predictor"]["containers"][0]["name"] == "kserve-container"

    def predictor_ready() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector="serving.kserve.io/inferenceservice=arrests").items
        ready = [p for p in pods if p.status.container_statuses and all(c.ready for c in p.status.container_statuses)]
        return ready[0] if ready else None

    pod = wait_for(predictor_ready, 900, "the predictor pod Running with every container ready", 2)
    serving_ready = time.monotonic() - started
    names = {c.name for c in pod.spec.containers}
    assert {"kserve-container", SIDECAR_CONTAINER} <= names, names

    settings = Settings()
    service = f"http://arrests-predictor.{namespace}.svc.cluster.local"
    status = f"http://{pod.status.pod_ip}:{settings.sidecar_metrics_port}/status"
    image = f"{chart_values['image']['repository']}:{chart_values['image']['tag']}"
    body_v1, body_v2 = json.dumps(v1()), json.dumps(v2_body([GOOD, GOOD]))
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="client"),
        spec=client.V1PodSpec(restart_policy="Never", containers=[client.V1Container(
            name="client", image=image, command=["python", "-c", PROBE, service, body_v1, body_v2, status],
        )]),
    ))  # fmt: skip
    phase = wait_for(
        lambda: (p := core.read_namespaced_pod("client", namespace).status.phase) in ("Succeeded", "Failed") and p,
        300, "the client pod to finish", 1,
    )  # fmt: skip
    # raw bytes: the client parses a log that is one JSON document into a dict and returns its repr
    log = core.read_namespaced_pod_log("client", namespace, _preload_content=False).data.decode()
    assert phase == "Succeeded", log
    out = json.loads(log.strip().splitlines()[-1])
    assert len(out["v1"]["predictions"]) == 1, out["v1"]
    assert out["v2"]["outputs"][0]["shape"][0] == 2, out["v2"]
    received = out["sidecar"]["events"]["received"]
    assert received >= 2, out["sidecar"]  # the agent logged requests and responses to the sidecar
    print(
        f"\ne2e serving: predictor ready {serving_ready:.0f} s after the ModelDeployment; v1 {out['v1']}, "
        f"v2 outputs {[o['name'] for o in out['v2']['outputs']]}, sidecar received {received} events"
    )
