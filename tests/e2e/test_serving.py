"""The sample ModelDeployment on real pods: the operator's InferenceService is admitted by KServe's webhook, the
predictor pod runs kubeloop's model server with the drift sidecar (and KServe's payload logger agent), v1 and v2
requests from another pod, through the Gateway (Traefik, the operator's HTTPRoute), get predictions that reach the
sidecar, and Prometheus has the server's and the sidecar's series."""

from __future__ import annotations

import json
import time
from typing import Any

from kubernetes import client

from operators.inferenceservice import SIDECAR_CONTAINER
from operators.settings import Settings
from tests.e2e.workloads import (
    GATEWAY,
    finished_client,
    image,
    prometheus,
    ready_predictor,
    start_client,
    train,
    trainingjob,
)  # fmt: skip
from tests.support.clusterkit import wait_for
from tests.support.operatorkit import create, inferenceservice, sample
from tests.support.serving_requests import GOOD, v1, v2_body

PROBE = """
import json, sys, urllib.request
base, host, v1, v2, status = sys.argv[1:6]
def post(path, body):
    request = urllib.request.Request(base + path, json.dumps(json.loads(body)).encode(),
                                     {"content-type": "application/json", "host": host})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)
out = {"v1": post("/v1/models/arrests:predict", v1), "v2": post("/v2/models/arrests/infer", v2)}
with urllib.request.urlopen(status, timeout=10) as answer:
    out["sidecar"] = json.load(answer)
print(json.dumps(out))
"""


def test_the_sample_modeldeployment_serves_v1_and_v2_through_the_gateway_with_its_drift_sidecar(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, chart_values: dict[str, Any]
) -> None:
    train(api, namespace, trainingjob())
    started = time.monotonic()
    create(api, namespace, sample("modeldeployment"))
    isvc = wait_for(lambda: inferenceservice(api, namespace, "arrests"), 120, "the InferenceService (admitted)")
    assert isvc["spec"]["predictor"]["containers"][0]["name"] == "kserve-container"
    pod = ready_predictor(core, namespace, "serving.kserve.io/inferenceservice=arrests")
    serving_ready = time.monotonic() - started
    names = {c.name for c in pod.spec.containers}
    assert {"kserve-container", SIDECAR_CONTAINER} <= names, names

    settings = Settings()
    host = f"arrests.{namespace}.{settings.gateway_domain}"  # the operator's HTTPRoute (operators/httproute.py)
    status = f"http://{pod.status.pod_ip}:{settings.sidecar_metrics_port}/status"
    body_v1, body_v2 = json.dumps(v1()), json.dumps(v2_body([GOOD, GOOD]))
    start_client(core, namespace, "client", image(chart_values), PROBE, GATEWAY, host, body_v1, body_v2, status)
    out = json.loads(finished_client(core, namespace, "client").strip().splitlines()[-1])
    assert len(out["v1"]["predictions"]) == 1, out["v1"]
    assert out["v2"]["outputs"][0]["shape"][0] == 2 and out["v2"]["model_version"] == "1", out["v2"]
    received = out["sidecar"]["events"]["received"]
    assert received >= 2, out["sidecar"]  # the agent logged requests and responses to the sidecar

    where = f'namespace="{namespace}",model="arrests",version="1"'
    served = wait_for(
        lambda: prometheus(core, f"sum(kubeloop_requests_total{{{where}}})"), 60, "the server's series in Prometheus"
    )
    assert float(served[0]["value"][1]) >= 2, served
    sidecar = wait_for(
        lambda: prometheus(core, f'kubeloop_drift_events_received_total{{namespace="{namespace}"}}'),
        60, "the sidecar's series in Prometheus",
    )  # fmt: skip
    assert {s["metric"]["endpoint"] for s in sidecar} == {"drift-metrics"}, sidecar
    print(
        f"\ne2e serving: predictor ready {serving_ready:.0f} s after the ModelDeployment; through the Gateway v1 "
        f"{out['v1']}, v2 outputs {[o['name'] for o in out['v2']['outputs']]}; sidecar received {received} events; "
        f"Prometheus: {float(served[0]['value'][1]):.0f} requests served"
    )
