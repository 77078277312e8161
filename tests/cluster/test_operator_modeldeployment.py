"""A ModelDeployment against a real apiserver, KServe (webhooks and controller), KubeRay and the operator as the
chart's ServiceAccount (see test_operator.py for the set-up): served, its canary split by the HTTPRoute, promoted
and rolled back; a Rejected version refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from operators.settings import Settings
from tests.cluster.operator_checks import (
    kubectl,
    running_operator,
)
from tests.support.clusterkit import Cluster, exists, wait_for
from tests.support.operatorkit import (
    GROUP,
    VERSION,
    OperatorProcess,
    create,
    inferenceservice,
    kubeloop_obj,
    modelversion_doc,
    owned_by,
    routed,
    sample,
)

operator = pytest.fixture(running_operator, scope="module", name="operator")  # one operator process per module


def test_modeldeployment_is_served_by_kserve_and_its_canary_split_by_a_weighted_route(
    cluster: Cluster, operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api,
    namespace: str, kubeconfig: Path, kubeloop_home: str,
) -> None:  # fmt: skip
    """Stable, a canary at each step, promoted, then a canary rolled back: what KServe (its webhooks and its
    controller) and the operator make of each, in the InferenceService, Deployments, Services and the HTTPRoute."""
    md = create(api, namespace, sample("modeldeployment"))
    uid = md["metadata"]["uid"]
    wait_for(
        lambda: any(
            c["reason"] == "ModelVersionNotFound"
            for c in (kubeloop_obj(api, "modeldeployments", namespace, "arrests") or {}).get("status", {}).get(
                "conditions", []
            )
        ),
        60, "the deployment to wait for its ModelVersion",
    )  # fmt: skip
    create(api, namespace, modelversion_doc(1))
    obj = wait_for(lambda: inferenceservice(api, namespace, "arrests"), 60, "the InferenceService")

    settings = Settings()
    predictor = obj["spec"]["predictor"]
    containers = {c["name"]: c for c in predictor["containers"]}
    assert set(containers) == {"kserve-container", "drift-detector"}
    sidecar = containers["drift-detector"]
    assert sidecar["args"][sidecar["args"].index("--detector") + 1] == "ks"
    assert sidecar["args"][sidecar["args"].index("--window") + 1] == "200"
    assert predictor["logger"] == {"url": f"http://127.0.0.1:{settings.sidecar_port}/", "mode": "all"}
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"]) == (1, 3, "cpu")
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    versions = core.read_namespaced_config_map("arrests-model-versions", namespace)
    assert set(versions.data) == {"v1.yaml"}

    # KServe: the stable predictor's Deployment and Service; its pod mutated by KServe's webhook (the payload
    # logger's agent container joins ours) and running on a kwok node
    apps = client.AppsV1Api(core.api_client)

    def deployment(name: str) -> bool:
        return exists(lambda: apps.read_namespaced_deployment(name, namespace))  # one read: KServe may delete it

    def predictor_pods(name: str) -> list[Any]:
        pods = core.list_namespaced_pod(namespace, label_selector="serving.kserve.io/inferenceservice=arrests").items
        return [p for p in pods if p.metadata.name.startswith(f"{name}-") and p.status.phase == "Running"]

    wait_for(lambda: deployment("arrests-predictor"), 60, "KServe's Deployment arrests-predictor")
    (pod,) = wait_for(lambda: predictor_pods("arrests-predictor"), 120, "the stable predictor pod Running")
    assert {c.name for c in pod.spec.containers} >= {"kserve-container", "drift-detector", "agent"}
    if cluster.dev:
        assert core.read_node(pod.spec.node_name).metadata.labels.get("type") == "kwok"
    service = core.read_namespaced_service("arrests-predictor", namespace)
    assert service.spec.ports[0].port == 80

    # KServe reports it Ready; the deployment mirrors that, and its URL is the route's
    status = wait_for(
        lambda: (s := kubeloop_obj(api, "modeldeployments", namespace, "arrests")["status"]).get("ready") and s,
        120, "the deployment Ready (KServe's Ready condition)",
    )  # fmt: skip
    assert status["drift"] == {"state": "Unknown"}
    assert wait_for(lambda: routed(api, namespace, uid), 60, "the HTTPRoute") == {"arrests-predictor": 100}
    (route,) = owned_by(
        api.list_namespaced_custom_object("gateway.networking.k8s.io", "v1", namespace, "httproutes")["items"], uid
    )
    assert status["url"] == f"http://{route['spec']['hostnames'][0]}"

    # a reconcile of the converged deployment (an annotation starts one) applies the same children: server-side
    # apply of an unchanged intent, which the apiserver does not write, and no Updated Event
    def served() -> list[Any]:
        routes = api.list_namespaced_custom_object("gateway.networking.k8s.io", "v1", namespace, "httproutes")
        objs = [inferenceservice(api, namespace, "arrests"), *owned_by(routes["items"], uid)]
        versions = core.read_namespaced_config_map("arrests-model-versions", namespace)
        meta = [{k: o["metadata"].get(k) for k in ("generation", "labels", "annotations")} for o in objs]
        return [*meta, versions.metadata.resource_version]

    before = served()
    touched = {"metadata": {"annotations": {"test.kubeloop.dev/touched": "1"}}}
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "modeldeployments", "arrests", touched)
    wait_for(
        lambda: "test.kubeloop.dev/touched" in kubeloop_obj(api, "modeldeployments", namespace, "arrests")["metadata"][
            "annotations"].get("kubeloop.dev/last-handled-configuration", ""),
        60, "the operator to reconcile the touched deployment",
    )  # fmt: skip
    assert served() == before
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.kind=ModelDeployment").items
    assert "Updated" not in {e.reason for e in events}

    def step(version: int, percent: int) -> None:
        """The canary at ``percent``: KServe's canary Deployment and Service, and the route's weights."""
        name = f"arrests-v{version}-predictor"
        api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "modeldeployments", "arrests",
            {"spec": {"canary": {"version": version, "trafficPercent": percent}}},
        )  # fmt: skip
        wait_for(
            lambda: [(c["predictor"]["name"], c["trafficPercent"]) for c in
                     (inferenceservice(api, namespace, "arrests") or {}).get("spec", {}).get("canary") or []]
            == [(f"v{version}", percent)],
            60, f"spec.canary v{version} at {percent}% (admitted by KServe's validating webhook)",
        )  # fmt: skip
        wait_for(lambda: deployment(name), 60, f"KServe's canary Deployment {name}")
        wait_for(lambda: predictor_pods(name), 120, f"the canary pod of {name} Running")
        assert core.read_namespaced_service(name, namespace).spec.ports[0].port == 80
        wait_for(
            lambda: routed(api, namespace, uid) == {"arrests-predictor": 100 - percent, name: percent},
            60, f"the route at {100 - percent}/{percent}",
        )  # fmt: skip
        wait_for(
            lambda: any(
                c["type"] == "CanaryReady" and c["status"] == "True"
                for c in kubeloop_obj(api, "modeldeployments", namespace, "arrests")["status"]["conditions"]
            ),
            120, "CanaryReady (KServe's, once the canary Deployment is available)",
        )  # fmt: skip
        wait_for(
            lambda: [t["percent"] for t in kubeloop_obj(api, "modeldeployments", namespace, "arrests")["status"][
                "traffic"]] == [100 - percent, percent],
            60, "the traffic split in the status",
        )  # fmt: skip

    def stable_only(version: int, gone: str) -> None:
        wait_for(
            lambda: not (isvc := inferenceservice(api, namespace, "arrests"))["spec"].get("canary")
            and any(f"v{version}.yaml" in arg for arg in isvc["spec"]["predictor"]["containers"][0]["args"]),
            60, f"the InferenceService serving v{version} alone",
        )  # fmt: skip
        wait_for(lambda: routed(api, namespace, uid) == {"arrests-predictor": 100}, 60, "the route at 100% stable")
        wait_for(lambda: not deployment(gone), 60, f"KServe to delete the canary Deployment {gone}")
        wait_for(
            lambda: not exists(lambda: core.read_namespaced_service(gone, namespace)), 60, f"the Service {gone} gone"
        )

    create(api, namespace, modelversion_doc(2))
    for percent in (10, 50):
        step(2, percent)
    table = kubectl(kubeconfig, "get", "modeldeployments", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "MODEL", "STABLE", "CANARY", "TRAFFIC", "SHADOW", "DRIFT", "READY", "URL"], table
    row = table.splitlines()[1].split()
    assert row[:6] == ["arrests", "arrests", "1", "2", "50", "Unknown"], table  # no shadow: an empty column

    # promoted: v2 is the stable, the canary goes
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "modeldeployments", "arrests", {"spec": {"version": 2, "canary": None}}
    )
    stable_only(2, "arrests-v2-predictor")

    # rolled back: a canary of v3 removed, v2 stays
    create(api, namespace, modelversion_doc(3))
    step(3, 10)
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "modeldeployments", "arrests", {"spec": {"canary": None}}
    )
    stable_only(2, "arrests-v3-predictor")


def test_a_rejected_version_is_refused_with_a_condition_and_an_event_until_the_spec_allows_it(
    operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str,
    kubeloop_home: str,
) -> None:  # fmt: skip
    """A ModelDeployment naming a Rejected ModelVersion: no InferenceService, condition VersionAdmitted False and a
    Warning Event naming spec.version and the stage reason; once spec.allowRejected is true it is served."""
    mv = modelversion_doc(1)
    mv["spec"].update(stage="Rejected", stageReason="rocAuc 0.61 is below the threshold 0.7")
    create(api, namespace, mv)
    create(api, namespace, sample("modeldeployment"))

    def admission(status: str) -> dict[str, Any] | None:
        md = kubeloop_obj(api, "modeldeployments", namespace, "arrests") or {}
        conditions = (md.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "VersionAdmitted" and c["status"] == status), None)

    def warning(reason: str) -> Any:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=arrests").items
        return next((e for e in events if e.reason == reason and e.type == "Warning"), None)

    refused = wait_for(lambda: admission("False"), 60, "VersionAdmitted False")
    assert refused["reason"] == "VersionRejected"
    assert refused["message"] == (
        "spec.version: arrests:1 is Rejected (rocAuc 0.61 is below the threshold 0.7): serve a Candidate or "
        "Production version, or set spec.allowRejected: true to serve it anyway for debugging"
    )
    event = wait_for(lambda: warning("VersionRejected"), 30, "the VersionRejected Event (posted asynchronously)")
    assert event.message == refused["message"]
    assert inferenceservice(api, namespace, "arrests") is None

    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "modeldeployments", "arrests", {"spec": {"allowRejected": True}}
    )
    wait_for(lambda: inferenceservice(api, namespace, "arrests"), 60, "the InferenceService, once allowed")
    assert wait_for(lambda: admission("True"), 60, "VersionAdmitted True")["reason"] == "RejectedAllowed"
    wait_for(lambda: warning("RejectedVersionServed"), 30, "the RejectedVersionServed Event")
