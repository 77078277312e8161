"""A shadow in the cluster: mirrored by the HTTPRoute, judged on Prometheus series, promoted to a canary or rejected;
and every served version's outcomes on ground truth in status.

Real: the kube-apiserver (dev control plane) with the Gateway API CRDs (the HTTPRoute with its RequestMirror filter
is validated against them), KServe (its webhooks admit the shadow's InferenceService, its controller makes and, once
the shadow is stopped, deletes its Deployment), the operator as the chart's ServiceAccount (RBAC enforced) and a
Prometheus server scraping a loopback exporter every second.

Played by the test: the serving stack's metrics (serving_exporter.ServingExporter), whose traffic follows the
HTTPRoute the operator writes: its weights, and its mirror, which copies the filter's percent of the requests to the
shadow's version (a Gateway discards the shadow's answers, so no paired agreement exists in a cluster).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from serving_exporter import Behaviour, ServingExporter, scraped

from kubeloop.analysis.prometheus import EmbeddedPrometheus
from tests.cluster import operator_checks
from tests.support.clusterkit import Cluster, exists, wait_for
from tests.support.operatorkit import OperatorProcess, create, inferenceservice, kubeloop_obj, modelversion_doc, sample

prometheus = pytest.fixture(operator_checks.real_prometheus, scope="module", name="prometheus")
analysing_operator = pytest.fixture(operator_checks.analysing_operator, scope="module", name="analysing_operator")

INTERVAL_S = 3
ANALYSIS = {"interval": f"{INTERVAL_S}s", "windows": 2, "maxFailedWindows": 2,
            "canary": {"steps": [10, 100], "interval": f"{INTERVAL_S}s"}}  # fmt: skip


@pytest.fixture
def exporter(
    cluster: Cluster, prometheus: EmbeddedPrometheus, namespace: str, kubeloop_home: str
) -> Iterator[ServingExporter]:
    served = scraped(client.CustomObjectsApi(cluster.client()), prometheus, namespace)
    yield served
    served.stop()


def md_of(api: client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    return kubeloop_obj(api, "modeldeployments", namespace, "arrests") or {}


def status_of(api: client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    return md_of(api, namespace).get("status") or {}


def actions(api: client.CustomObjectsApi, namespace: str) -> list[str]:
    return [entry["action"] for entry in status_of(api, namespace).get("history") or []]


def versions(api: client.CustomObjectsApi, namespace: str, shadow_stage: str = "Candidate") -> None:
    v1, v3 = modelversion_doc(1), modelversion_doc(3)
    v1["spec"]["stage"], v3["spec"]["stage"] = "Production", shadow_stage
    create(api, namespace, v1)
    create(api, namespace, v3)


def test_a_mirrored_shadow_is_reported_from_prometheus_then_becomes_the_canary(
    analysing_operator: OperatorProcess, exporter: ServingExporter, api: client.CustomObjectsApi,
    core: client.CoreV1Api, namespace: str,
) -> None:  # fmt: skip
    versions(api, namespace)
    exporter.behaviour[1] = Behaviour(live={"rows": 420.0, "rocAuc": 0.8123, "accuracy": 0.74},
                                      estimated={"rocAuc": (0.8, 0.77, 0.83)})  # fmt: skip
    exporter.behaviour[3] = Behaviour(live={"rows": 35.0, "rocAuc": 0.79})
    create(api, namespace, sample("modeldeployment") | {"spec": sample("modeldeployment")["spec"] | {
        "shadow": {"version": 3, "percent": 50, "analysis": ANALYSIS}}})  # fmt: skip

    # the shadow's InferenceService, admitted by KServe's webhooks, and KServe's Deployment of it
    shadow = wait_for(lambda: inferenceservice(api, namespace, "arrests-shadow"), 60, "the shadow InferenceService")
    server = shadow["spec"]["predictor"]["containers"][0]
    assert server["args"][server["args"].index("--model-version") + 1] == "/etc/kubeloop/versions/v3.yaml"
    assert shadow["metadata"]["ownerReferences"][0]["uid"] == md_of(api, namespace)["metadata"]["uid"]
    apps = client.AppsV1Api(core.api_client)
    wait_for(lambda: exists(lambda: apps.read_namespaced_deployment("arrests-shadow-predictor", namespace)), 60,
             "KServe's Deployment of the shadow")  # fmt: skip
    # the route carries the mirror (stored: valid under the Gateway API CRD); the exporter mirrors as a Gateway would
    wait_for(lambda: exporter.mirrors_seen == [(3, 50)], 30, "the HTTPRoute mirroring 50% to v3")

    # status.outcomes from Prometheus: each served version, rounded
    expected = [
        {"version": 1, "labelled": 420, "live": {"rocAuc": 0.812, "accuracy": 0.74},
         "estimated": {"rocAuc": {"value": 0.8, "low": 0.77, "high": 0.83}}},
        {"version": 3, "labelled": 35, "live": {"rocAuc": 0.79}, "estimated": {}},
    ]  # fmt: skip
    wait_for(lambda: status_of(api, namespace).get("outcomes") == expected, 30, "status.outcomes of v1 and v3")

    # judged window by window on the mirrored requests, then handed to the canary analysis
    wait_for(lambda: "shadowPromote" in actions(api, namespace), 6 * INTERVAL_S + 30, "the shadow promoted")
    history = status_of(api, namespace)["history"]
    assert actions(api, namespace)[0] == "shadowStart"
    judged = [entry for entry in history if entry["action"] in ("shadowHold", "shadowPromote")]
    assert judged[-1]["action"] == "shadowPromote" and "v3 becomes the canary at 10%" in judged[-1]["reason"]
    checks = {c["name"]: c["status"] for c in judged[-1]["checks"]}
    assert checks["errorRate"] == "pass" and checks["agreement"] == "skip"  # no paired answers behind a Gateway
    report = status_of(api, namespace)["shadow"]
    assert report["version"] == 3 and report["passedWindows"] == 2 and report["mirrored"] > 0
    spec = md_of(api, namespace)["spec"]
    assert "shadow" not in spec and spec["canary"]["version"] == 3  # (the canary analysis may have moved it on)
    assert spec["canary"]["analysis"]["steps"] == [10, 100]

    # the mirror goes, the shadow's InferenceService is stopped (kept) and KServe deletes its workload
    wait_for(lambda: exporter.mirror() is None, 30, "the mirror removed from the route")
    stopped = wait_for(lambda: (inferenceservice(api, namespace, "arrests-shadow") or {}).get("metadata", {}).get(
        "annotations", {}).get("serving.kserve.io/stop") == "true", 30, "the shadow stopped")  # fmt: skip
    assert stopped
    wait_for(lambda: not exists(lambda: apps.read_namespaced_deployment("arrests-shadow-predictor", namespace)), 60,
             "KServe deleting the stopped shadow's Deployment")  # fmt: skip
    reasons = {"ShadowStarted", "ShadowPromoted", "ShadowStopped"}
    wait_for(lambda: reasons <= {r for r, _ in operator_checks.events_of(core, namespace, "arrests")}, 30,
             f"Events {sorted(reasons)}")  # fmt: skip


def test_a_failing_shadow_is_rejected_and_never_answers(
    analysing_operator: OperatorProcess, exporter: ServingExporter, api: client.CustomObjectsApi,
    core: client.CoreV1Api, namespace: str,
) -> None:  # fmt: skip
    versions(api, namespace)
    exporter.behaviour[1] = Behaviour()
    exporter.behaviour[3] = Behaviour(error_rate=0.3)  # a broken candidate: 30% of its requests fail
    create(api, namespace, sample("modeldeployment") | {"spec": sample("modeldeployment")["spec"] | {
        "shadow": {"version": 3, "analysis": ANALYSIS}}})  # fmt: skip

    wait_for(lambda: "shadowReject" in actions(api, namespace), 6 * INTERVAL_S + 60, "the shadow rejected")
    rejected = status_of(api, namespace)["history"][-1]
    assert "error rate" in rejected["reason"] and rejected["reason"].endswith("rejecting v3")
    spec = md_of(api, namespace)["spec"]
    assert "shadow" not in spec and "canary" not in spec
    mv = wait_for(
        lambda: (
            (kubeloop_obj(api, "modelversions", namespace, "arrests-v3") or {}).get("spec", {}).get("stage")
            == "Rejected"
            and kubeloop_obj(api, "modelversions", namespace, "arrests-v3")
        ),
        30,
        "v3 Rejected",
    )
    assert mv["spec"]["stageReason"] == rejected["reason"]
    assert set(exporter.splits_seen[-1]) == {1}  # users were only ever answered by v1
    assert all(set(split) == {1} for split in exporter.splits_seen)
