"""The operator against a real apiserver, installed by its chart and running as the chart's ServiceAccount.

The chart is installed with helm (CRDs, ServiceAccount, ClusterRole/Binding, Deployment). The operator under test
is ``python -m operators`` run here as a process whose kubeconfig holds the token of the chart's ServiceAccount
(``kubeloop-system/kubeloop-operator``): every request it makes is authorized by the chart's RBAC, nothing else.
(The chart's own Deployment is scaled to 0 so that, on a real cluster, it cannot reconcile beside the one under
test; on the dev control plane its pod is a kwok pod that runs nothing anyway.)

What the operator writes is judged by the real upstream controllers (the ``upstream`` fixture): the KubeRay operator
turns the RayJob into a RayCluster and a submitter Job, KServe's webhooks default, validate and mutate the
InferenceService and its pods, and its controller makes the predictor Deployments and Services; their pods run on
kwok nodes. The one thing played here is what only a running Ray cluster could say: the Ray job's final status,
which KubeRay reads from the Ray dashboard (test_the_ray_job_that_never_reports shows what KubeRay does without it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeloop import in_cluster
from kubeloop.api import BatchPrediction, ModelVersion, TrainingJob, parse_resource
from operators import admission, batchjob
from operators import chart as chart_render
from operators import rayjob as rj
from operators.kube import contains
from operators.settings import Settings
from tests.support.clusterkit import Cluster, exists, service_account_kubeconfig, wait_for
from tests.support.operatorkit import (
    GROUP,
    RELEASE,
    SYSTEM,
    VERSION,
    OperatorProcess,
    create,
    free_port,
    get,
    inferenceservice,
    kubeloop_obj,
    modelversion_doc,
    owned_by,
    rayjob,
    routed,
    sample,
)

pytestmark = pytest.mark.cluster


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and done.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)}: {done.stderr}")
    return done


def as_the_run_head(
    run_config: Path, namespace: str, configmap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubeloop.in_cluster as `kubeloop run` calls it in a RayJob's head: the pod's token and CA file and the
    environment the operator sets, here pointing at this control plane."""
    run_cluster = yaml.safe_load(run_config.read_text())["clusters"][0]["cluster"]
    server = urlparse(run_cluster["server"])
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(yaml.safe_load(run_config.read_text())["users"][0]["user"]["token"])
    if "certificate-authority-data" in run_cluster:
        (account / "ca.crt").write_bytes(base64.b64decode(run_cluster["certificate-authority-data"]))
    else:
        (account / "ca.crt").write_bytes(Path(run_cluster["certificate-authority"]).read_bytes())
    monkeypatch.setattr(in_cluster, "SERVICE_ACCOUNT", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", server.hostname)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    monkeypatch.setenv("KUBELOOP_RESULT_CONFIGMAP", configmap)
    monkeypatch.setenv("KUBELOOP_NAMESPACE", namespace)


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator(operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator-log") / "operator.log")
    process.start()
    process.wait_healthy()
    yield process
    process.stop()
    errors = [line for line in process.log_path.read_text(errors="replace").splitlines() if "Traceback" in line]
    print(f"operator log: {process.log_path} ({len(errors)} tracebacks)")


# --- the chart ------------------------------------------------------------------------------------------------------


def test_chart_installs_with_its_crds(cluster: Cluster, kubeconfig: Path, chart: str) -> None:
    helm = chart_render.find_helm()
    assert helm
    status = subprocess.run(
        [helm, "--kubeconfig", str(kubeconfig), "status", RELEASE, "-n", SYSTEM, "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(status.stdout)["info"]["status"] == "deployed"
    ext = client.ApiextensionsV1Api(cluster.client())
    for plural in admission.PLURALS:  # every kind of the API
        crd = ext.read_custom_resource_definition(f"{plural}.{GROUP}")
        assert crd.spec.versions[0].name == VERSION
    rbac = client.RbacAuthorizationV1Api(cluster.client())
    role = rbac.read_cluster_role(f"{RELEASE}-operator")
    assert all("*" not in (rule.verbs or []) for rule in role.rules)


def test_the_operators_identity_is_least_privilege(cluster: Cluster, operator_kubeconfig: Path, namespace: str) -> None:
    as_operator = cluster.client(operator_kubeconfig)
    core, custom = client.CoreV1Api(as_operator), client.CustomObjectsApi(as_operator)
    custom.list_cluster_custom_object(GROUP, VERSION, "trainingjobs")  # granted
    denied = [
        lambda: core.list_namespaced_secret(namespace),
        lambda: core.list_namespaced_pod(namespace),
        lambda: core.list_namespaced_config_map(namespace),
        lambda: custom.delete_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", "x"),
        lambda: custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelversions", "x"),
        lambda: client.AppsV1Api(as_operator).list_namespaced_deployment(namespace),
    ]
    for call in denied:
        with pytest.raises(ApiException) as error:
            call()
        assert error.value.status == 403


# --- TrainingJob -> RayJob ------------------------------------------------------------------------------------------


def test_trainingjob_becomes_a_rayjob_that_kuberay_runs_and_registers_its_modelversion(
    cluster: Cluster, operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api,
    namespace: str, kubeconfig: Path, kubeloop_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    tj = create(api, namespace, sample("trainingjob"))
    job = wait_for(lambda: rayjob(api, namespace, "arrests-mlp"), 60, "the RayJob")

    # the fields the operator wrote, as stored by the apiserver
    model = parse_resource({k: v for k, v in tj.items() if k != "status"})
    assert isinstance(model, TrainingJob)
    desired = rj.desired_rayjob(model, Settings())
    assert contains(job["spec"], desired["spec"])
    assert job["spec"]["entrypoint"] == "kubeloop run -f /etc/kubeloop/trainingjob.yaml"
    assert job["spec"].get("backoffLimit", 0) == 0, "retries are Ray Train's (maxFailures), not new RayClusters"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    (ref,) = job["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == (
        "TrainingJob", tj["metadata"]["uid"], True, True,
    )  # fmt: skip
    cm = core.read_namespaced_config_map("arrests-mlp-trainingjob", namespace)
    assert yaml.safe_load(cm.data["trainingjob.yaml"])["spec"]["model"]["name"] == "arrests"
    wait_for(
        lambda: any(
            e.reason == "Created" and "RayJob" in e.message
            for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=arrests-mlp").items
        ),
        30, "the Created Event naming the RayJob (posted asynchronously)",
    )  # fmt: skip

    # KubeRay: a RayCluster from the RayJob's spec, its head and worker pods running on kwok nodes, then the
    # submitter Job; the RayJob's status moves on and the TrainingJob mirrors it
    ray_cluster_name = wait_for(
        lambda: (rayjob(api, namespace, "arrests-mlp").get("status") or {}).get("rayClusterName"),
        60, "KubeRay to name the RayCluster",
    )  # fmt: skip
    ray_cluster = wait_for(
        lambda: get(api, "ray.io", "v1", "rayclusters", namespace, ray_cluster_name), 60, "the RayCluster"
    )
    assert owned_by([ray_cluster], job["metadata"]["uid"])
    (group,) = ray_cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == model.spec.workers.replicas

    def ray_pods_running() -> list[Any] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={ray_cluster_name}").items
        wanted = 1 + model.spec.workers.replicas  # the head and one pod per Ray Train worker
        return pods if len(pods) == wanted and all(p.status.phase == "Running" for p in pods) else None

    pods = wait_for(ray_pods_running, 120, "the Ray head and worker pods Running")
    assert len(pods) == 1 + model.spec.workers.replicas
    batch = client.BatchV1Api(core.api_client)
    wait_for(lambda: exists(lambda: batch.read_namespaced_job("arrests-mlp", namespace)), 120, "the submitter Job")
    wait_for(
        lambda: (kubeloop_obj(api, "trainingjobs", namespace, "arrests-mlp") or {}).get("status", {}).get("phase")
        == "Running",
        120, "the TrainingJob Running, from KubeRay's jobDeploymentStatus",
    )  # fmt: skip

    # the run reports its ModelVersion as the run's ServiceAccount: it may patch its ConfigMap, nothing else
    run_config = service_account_kubeconfig(kubeconfig, namespace, "arrests-mlp-training", tmp_path / "run.kubeconfig")
    as_run = client.CoreV1Api(cluster.client(run_config))
    result = modelversion_doc()
    result["spec"]["lineage"]["trainingJob"] = f"{namespace}/arrests-mlp"
    result["spec"]["stage"] = "Candidate"
    as_the_run_head(run_config, namespace, "arrests-mlp-trainingjob", tmp_path, monkeypatch)
    assert in_cluster.publish_result(ModelVersion.model_validate(result))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other")))
    with pytest.raises(ApiException) as denied:
        as_run.patch_namespaced_config_map("other", namespace, {"data": {"x": "y"}})
    assert denied.value.status == 403
    with pytest.raises(ApiException) as denied:
        client.CustomObjectsApi(cluster.client(run_config)).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "modelversions", {**result, "metadata": {"name": "forged"}}
        )
    assert denied.value.status == 403

    # what the Ray dashboard would answer KubeRay once the run ends (no Ray runs in a kwok pod): the job SUCCEEDED
    api.patch_namespaced_custom_object_status(
        "ray.io", "v1", namespace, "rayjobs", "arrests-mlp",
        {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-23T10:00:00Z"}},
    )  # fmt: skip
    final = wait_for(
        lambda: (s := kubeloop_obj(api, "trainingjobs", namespace, "arrests-mlp")["status"]).get("modelVersion") and s,
        60, "the ModelVersion registered",
    )  # fmt: skip
    assert final["phase"] == "Succeeded"
    assert final["metrics"]["rocAuc"] == pytest.approx(0.724)
    mv = kubeloop_obj(api, "modelversions", namespace, "arrests-v1")
    assert mv is not None and mv["spec"]["stage"] == "Candidate"
    assert mv["metadata"]["labels"]["kubeloop.dev/trainingjob"] == "arrests-mlp"

    table = kubectl(kubeconfig, "get", "trainingjobs", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "TASK", "WORKERS", "GPUS", "MODEL"], table
    assert table.splitlines()[1].split()[2] == "binary"  # the CRD defaults spec.task
    assert "arrests-v1" in table and "Succeeded" in table
    # KubeRay's own end of a finished job: shutdownAfterJobFinishes deletes the RayCluster
    wait_for(
        lambda: get(api, "ray.io", "v1", "rayclusters", namespace, ray_cluster_name) is None,
        120, "KubeRay to delete the finished job's RayCluster",
    )  # fmt: skip


def test_the_ray_job_that_never_reports_fails_the_trainingjob_with_kuberays_reason(
    operator: OperatorProcess, api: client.CustomObjectsApi, namespace: str, kubeloop_home: str
) -> None:
    """Left alone, the RayJob follows KubeRay's real path: the submitter Job's pod completes (kwok), no Ray
    dashboard answers, and 30 s later KubeRay fails the RayJob; the TrainingJob says so, in KubeRay's words."""
    create(api, namespace, sample("trainingjob"))
    status = wait_for(
        lambda: (s := (kubeloop_obj(api, "trainingjobs", namespace, "arrests-mlp") or {}).get("status", {}))
        .get("phase") == "Failed" and s,
        180, "the TrainingJob Failed",
    )  # fmt: skip
    job = rayjob(api, namespace, "arrests-mlp")
    assert job["status"]["jobDeploymentStatus"] == "Failed"
    assert status["jobDeploymentStatus"] == "Failed"
    assert job["status"]["message"] in status["message"], (job["status"], status)


def test_deleting_a_trainingjob_collects_its_children(
    operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    create(api, namespace, sample("trainingjob"))
    wait_for(lambda: rayjob(api, namespace, "arrests-mlp"), 60, "the RayJob")
    api.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingjobs", "arrests-mlp", body={"propagationPolicy": "Background"}
    )
    wait_for(lambda: rayjob(api, namespace, "arrests-mlp") is None, 90, "the RayJob to be garbage-collected")
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    label = "kubeloop.dev/trainingjob=arrests-mlp"
    wait_for(
        lambda: (
            not core.list_namespaced_config_map(namespace, label_selector=label).items
            and not core.list_namespaced_service_account(namespace, label_selector=label).items
            and not rbac.list_namespaced_role(namespace, label_selector=label).items
            and not rbac.list_namespaced_role_binding(namespace, label_selector=label).items
        ),
        90,
        "the ConfigMap, ServiceAccount, Role and RoleBinding to be collected",
    )


# --- BatchPrediction -> RayJob ----------------------------------------------------------------------------------------


def events_of(core: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}").items]  # fmt: skip


def test_batchprediction_runs_as_a_rayjob_reports_progress_and_leaves_nothing_behind(
    cluster: Cluster, operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api,
    namespace: str, kubeconfig: Path, kubeloop_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Applied as the sample is: the Production version resolved, the RayJob KubeRay runs on kwok pods, the run's
    progress and outcome (published as the run would) in the status and Events, and nothing left once deleted."""
    create(api, namespace, modelversion_doc(1))  # the sample's stage: Production
    bp_doc = sample("batchprediction")
    bp_doc["metadata"]["namespace"] = namespace
    bp = api.create_namespaced_custom_object(GROUP, VERSION, namespace, "batchpredictions", bp_doc)
    job = wait_for(lambda: rayjob(api, namespace, "arrests-scoring"), 60, "the RayJob")

    model = parse_resource({k: v for k, v in bp.items() if k != "status"})
    assert isinstance(model, BatchPrediction)
    assert contains(job["spec"], batchjob.desired_rayjob(model, 1, Settings())["spec"])
    assert job["spec"]["entrypoint"] == "kubeloop run -f /etc/kubeloop/batchprediction.yaml"
    assert job["spec"]["metadata"]["kubeloop.dev/version"] == "1"
    (ref,) = job["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"]) == ("BatchPrediction", bp["metadata"]["uid"])
    document = core.read_namespaced_config_map("arrests-scoring-batchprediction", namespace).data["spec.yaml"]
    assert yaml.safe_load(document)["spec"]["version"] == 1  # the Production version, pinned
    status = wait_for(
        lambda: (kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring") or {}).get("status"),
        30, "the submitted status",
    )  # fmt: skip
    assert status["modelVersion"] == "arrests-v1"

    # KubeRay: the RayCluster with the head and spec.workers.replicas workers of spec.workers, on kwok nodes
    ray_cluster_name = wait_for(
        lambda: (rayjob(api, namespace, "arrests-scoring").get("status") or {}).get("rayClusterName"),
        60, "KubeRay to name the RayCluster",
    )  # fmt: skip

    def ray_pods_running() -> list[Any] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={ray_cluster_name}").items
        return pods if len(pods) == 1 + model.spec.workers.replicas and all(
            p.status.phase == "Running" for p in pods) else None  # fmt: skip

    pods = wait_for(ray_pods_running, 120, "the Ray head and worker pods Running")
    workers = [p for p in pods if p.metadata.labels.get("kubeloop.dev/ray-node") == "worker"]
    assert len(workers) == model.spec.workers.replicas
    for pod in workers:
        (container,) = pod.spec.containers
        assert container.resources.limits == {"cpu": "1", "memory": "2Gi"}
        assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == kubeloop_home
                   for v in pod.spec.volumes)  # fmt: skip
    wait_for(
        lambda: (kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring") or {}).get("status", {})
        .get("phase") == "Running",
        120, "the BatchPrediction Running, from KubeRay's jobDeploymentStatus",
    )  # fmt: skip

    # the run publishes its progress as its own ServiceAccount; the operator reads it while the job runs
    run_config = service_account_kubeconfig(kubeconfig, namespace, "arrests-scoring-batch", tmp_path / "run.kubeconfig")
    as_the_run_head(run_config, namespace, "arrests-scoring-batchprediction", tmp_path, monkeypatch)
    progress = {
        "phase": "Running",
        "rowsTotal": 5226,
        "rowsDone": 4096,
        "rowsRejected": 2,
        "modelVersion": "arrests-v1",
    }
    assert in_cluster.publish({batchjob.RESULT_KEY: progress})
    wait_for(
        lambda: kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring")["status"].get("rowsDone") == 4096,
        30, "the rows scored so far in the status",
    )  # fmt: skip
    outcome = {
        **progress,
        "phase": "Succeeded",
        "rowsDone": 5224,
        "outputUri": "file:///var/lib/kubeloop/batch/x",
        "inputDigest": "sha256:" + "c" * 64,
        "drift": {"state": "NoDrift", "pValue": 0.41, "features": []},
    }
    assert in_cluster.publish({batchjob.RESULT_KEY: outcome})
    # what the Ray dashboard would answer KubeRay once the run ends (no Ray runs in a kwok pod)
    api.patch_namespaced_custom_object_status(
        "ray.io", "v1", namespace, "rayjobs", "arrests-scoring",
        {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-23T10:00:00Z"}},
    )  # fmt: skip
    final = wait_for(
        lambda: (s := kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring")["status"])
        .get("phase") == "Succeeded" and s,
        60, "the BatchPrediction Succeeded",
    )  # fmt: skip
    assert (final["rowsDone"], final["rowsTotal"], final["rowsRejected"]) == (5224, 5226, 2)
    assert final["outputUri"] == "file:///var/lib/kubeloop/batch/x" and final["drift"]["state"] == "NoDrift"
    events = wait_for(
        lambda: (e := events_of(core, namespace, "arrests-scoring")) and any(r == "Finished" for r, _ in e) and e,
        30, "the Finished Event (posted asynchronously)",
    )  # fmt: skip
    assert any(r == "Started" for r, _ in events), events
    assert any(r == "Finished" and "5224 of 5226 rows scored, 2 rejected" in m for r, m in events), events
    table = kubectl(kubeconfig, "get", "batchpredictions", "-n", namespace).stdout
    assert table.splitlines()[0].split() == ["NAME", "PHASE", "MODEL", "VERSION", "ROWS", "REJECTED", "DRIFT", "AGE"]
    assert table.splitlines()[1].split()[:6] == ["arrests-scoring", "Succeeded", "arrests-v1", "5224", "2", "NoDrift"]

    # deleted: the RayJob and everything the run needed go with it (owner references), and so does it
    api.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "batchpredictions", "arrests-scoring", body={"propagationPolicy": "Background"}
    )
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    label = "kubeloop.dev/batchprediction=arrests-scoring"
    wait_for(
        lambda: (
            kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring") is None
            and rayjob(api, namespace, "arrests-scoring") is None
            and not core.list_namespaced_config_map(namespace, label_selector=label).items
            and not core.list_namespaced_service_account(namespace, label_selector=label).items
            and not rbac.list_namespaced_role(namespace, label_selector=label).items
            and not rbac.list_namespaced_role_binding(namespace, label_selector=label).items
        ),
        90, "the BatchPrediction, its RayJob, ConfigMap, ServiceAccount, Role and RoleBinding gone",
    )  # fmt: skip


def test_a_batchprediction_with_no_version_to_score_with_fails_and_creates_nothing(
    operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    bp_doc = sample("batchprediction")
    bp_doc["metadata"]["namespace"] = namespace
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, "batchpredictions", bp_doc)
    status = wait_for(
        lambda: (s := kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring").get("status") or {})
        .get("phase") == "Failed" and s,
        60, "the BatchPrediction Failed",
    )  # fmt: skip
    assert "spec.model arrests" in status["message"]
    assert wait_for(
        lambda: [m for r, m in events_of(core, namespace, "arrests-scoring") if r == "ModelVersionNotFound"],
        30, "the Warning Event",
    ) == [status["message"]]  # fmt: skip
    assert rayjob(api, namespace, "arrests-scoring") is None
    label = "kubeloop.dev/batchprediction=arrests-scoring"
    assert not core.list_namespaced_config_map(namespace, label_selector=label).items


# --- ModelDeployment -> InferenceService ----------------------------------------------------------------------------


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

    def deployment(name: str) -> Any:
        return exists(lambda: apps.read_namespaced_deployment(name, namespace)) and apps.read_namespaced_deployment(
            name, namespace
        )

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
    assert header == ["NAME", "MODEL", "STABLE", "CANARY", "TRAFFIC", "DRIFT", "READY", "URL"], table
    row = table.splitlines()[1].split()
    assert row[:6] == ["arrests", "arrests", "1", "2", "50", "Unknown"], table

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


# --- restarts mid-reconcile -----------------------------------------------------------------------------------------


def test_killing_the_operator_mid_reconcile_leaves_one_child_of_each_kind(
    operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    """SIGKILL the operator five times while it is writing children (some exist, not all), then let it finish."""
    operator.stop()
    jobs = [f"train-{i}" for i in range(20)]
    deployments = [f"serve-{i}" for i in range(5)]
    total = 5 * len(jobs) + 2 * len(deployments)  # ConfigMap, SA, RayJob, Role, RoleBinding; ConfigMap, ISVC
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    managed = "app.kubernetes.io/managed-by=kubeloop-operator"

    def children() -> int:
        return (
            len(core.list_namespaced_config_map(namespace, label_selector=managed).items)
            + len(core.list_namespaced_service_account(namespace, label_selector=managed).items)
            + len(rbac.list_namespaced_role(namespace, label_selector=managed).items)
            + len(rbac.list_namespaced_role_binding(namespace, label_selector=managed).items)
            + len(api.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")["items"])
            + len(
                api.list_namespaced_custom_object("serving.kserve.io", "v1beta1", namespace, "inferenceservices")[
                    "items"
                ]
            )
        )

    kills: list[int] = []
    try:
        create(api, namespace, modelversion_doc(1))
        for name in jobs:
            doc = sample("trainingjob")
            doc["metadata"]["name"] = name
            create(api, namespace, doc)
        for name in deployments:
            doc = sample("modeldeployment")
            doc["metadata"]["name"] = name
            create(api, namespace, doc)
        for _ in range(5):
            before = children()
            operator.start()
            deadline = time.monotonic() + 90
            while children() == before and time.monotonic() < deadline:  # kill as soon as it has written something
                time.sleep(0.02)
            operator.kill()
            kills.append(children())
    finally:
        operator.start()
        operator.wait_healthy()
    print(f"children present at each kill (of {total}): {kills}")
    assert sum(0 < n < total for n in kills) >= 3, f"the kills did not land mid-reconcile: {kills} of {total}"

    def converged() -> bool:
        done = all(
            (kubeloop_obj(api, "trainingjobs", namespace, n) or {}).get("status", {}).get("rayJobName") for n in jobs
        )
        return done and all(inferenceservice(api, namespace, n) for n in deployments)

    wait_for(converged, 180, "every TrainingJob and ModelDeployment reconciled")
    assert children() == total
    for name in jobs:
        uid = kubeloop_obj(api, "trainingjobs", namespace, name)["metadata"]["uid"]
        label = f"kubeloop.dev/trainingjob={name}"
        children = {
            "RayJob": api.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", label_selector=label)[
                "items"
            ],
            "ConfigMap": core.list_namespaced_config_map(namespace, label_selector=label).items,
            "ServiceAccount": core.list_namespaced_service_account(namespace, label_selector=label).items,
            "Role": rbac.list_namespaced_role(namespace, label_selector=label).items,
            "RoleBinding": rbac.list_namespaced_role_binding(namespace, label_selector=label).items,
        }
        for kind, items in children.items():
            assert len(items) == 1, f"{name}: {len(items)} {kind}"
            item = items[0]
            refs = item["metadata"]["ownerReferences"] if isinstance(item, dict) else item.metadata.owner_references
            uids = [r["uid"] if isinstance(r, dict) else r.uid for r in refs]
            assert uids == [uid], f"{name}: {kind} owned by {uids}"
    for name in deployments:
        label = f"kubeloop.dev/modeldeployment={name}"
        isvcs = api.list_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", namespace, "inferenceservices", label_selector=label
        )["items"]
        assert len(isvcs) == 1
        assert len(core.list_namespaced_config_map(namespace, label_selector=label).items) == 1


# --- rejected by the apiserver --------------------------------------------------------------------------------------


def _tj(**spec: Any) -> dict[str, Any]:
    doc = sample("trainingjob")
    doc["metadata"]["name"] = "bad"
    for path, value in spec.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


def _md(**spec: Any) -> dict[str, Any]:
    doc = sample("modeldeployment")
    doc["metadata"]["name"] = "bad"
    doc["spec"].update(spec)
    return doc


def _mv(**spec: Any) -> dict[str, Any]:
    doc = modelversion_doc(1)
    doc["metadata"]["name"] = "bad"
    for path, value in spec.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return doc


INVALID = [
    (_tj(workers__replicas=0), "spec.workers.replicas"),
    (_tj(workers__gpu=17), "spec.workers.gpu"),
    (_tj(workers__memory="2 GB"), "spec.workers.memory"),
    (_tj(backend="nccl"), "spec.backend"),
    (_tj(hyperparameters__learningRate=0), "spec.hyperparameters.learningRate"),
    (_tj(dataset__digest="md5:abc"), "spec.dataset.digest"),
    (_tj(model__name="Bad_Name"), "spec.model.name"),
    (_tj(dataset=None), "spec.dataset"),
    (_tj(maxFailures=-1), "spec.maxFailures"),
    ({**_tj(), "metadata": {"name": "1bad"}}, "metadata.name"),  # not DNS-1035: KubeRay refuses the RayJob
    ({**_tj(), "metadata": {"name": "bad." + "x" * 20}}, "metadata.name"),
    ({**_tj(), "metadata": {"name": "x" * 48}}, "metadata.name"),  # KubeRay's RayJob names stop at 47
    (_md(autoscaling={"minReplicas": 3, "maxReplicas": 2}), "spec.autoscaling.maxReplicas"),
    (_md(canary={"version": 1, "trafficPercent": 10}), "spec.canary.version"),
    (_md(autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "rps"}), "spec.autoscaling"),
    (_md(canary={"version": 2, "trafficPercent": 150}), "spec.canary.trafficPercent"),
    (_md(drift={"detector": "chi2"}), "spec.drift.detector"),
    (_md(deploymentMode="Serverless"), "spec.deploymentMode"),
    (_md(retrain={"enabled": True}), "spec.retrain.trainingJob"),
    (_md(retrain={"enabled": True, "trainingJob": "x" * 48}), "spec.retrain.trainingJob"),
    (_md(autoscaling={"target": 101}), "spec.autoscaling.target"),  # KServe's HPA takes 1-100 percent
    (_md(autoscaling={"metric": "memory", "target": 150}), "spec.autoscaling.target"),
    (_mv(lineage__datasetDigest="sha256:xyz"), "spec.lineage.datasetDigest"),
    (_mv(stage="Live"), "spec.stage"),
]


@pytest.mark.parametrize(("doc", "field"), INVALID, ids=[f"{d['kind']}:{f}" for d, f in INVALID])
def test_invalid_resources_are_rejected_naming_the_field(
    chart: str, api: client.CustomObjectsApi, namespace: str, doc: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as error:
        create(api, namespace, doc)
    assert error.value.status == 422, error.value.body
    assert field in json.loads(error.value.body)["message"], error.value.body


def test_unknown_fields_are_rejected_by_strict_validation(chart: str, kubeconfig: Path, namespace: str) -> None:
    doc = _tj()
    doc["spec"]["workers"]["cpus"] = 2  # a typo of cpu
    doc["metadata"]["namespace"] = namespace
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", "-"],
        input=yaml.safe_dump(doc), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert 'unknown field "spec.workers.cpus"' in done.stderr


# --- the validating webhook ---------------------------------------------------------------------------------------


@pytest.fixture
def webhook(
    cluster: Cluster, operator: OperatorProcess, operator_kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[None]:
    """The operator with its admission webhook on (self-signed TLS on 127.0.0.1), registered for one namespace."""
    if not cluster.dev:
        pytest.skip("the apiserver must reach the webhook on this machine's loopback")
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    with_webhook = OperatorProcess(
        operator_kubeconfig,
        tmp_path / "operator-webhook.log",
        {
            "KUBELOOP_WEBHOOK_ENABLED": "true",
            "KUBELOOP_WEBHOOK_PORT": str(port),
            "KUBELOOP_WEBHOOK_CERT": str(crt),
            "KUBELOOP_WEBHOOK_KEY": str(key),
        },
    )
    ca = base64.b64encode(crt.read_bytes()).decode()
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": f"kubeloop-test-{namespace}"},
        "webhooks": [
            {
                "name": f"{plural}.validate.kubeloop.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "resources": [plural],
                        "operations": ["CREATE", "UPDATE"],
                    }
                ],
                "clientConfig": {"url": f"https://127.0.0.1:{port}/validate-{plural}", "caBundle": ca},
            }
            for plural in admission.PLURALS
        ],
    }
    admission_api = client.AdmissionregistrationV1Api(cluster.client())
    operator.stop()
    with_webhook.start()
    try:
        with_webhook.wait_healthy()
        admission_api.create_validating_webhook_configuration(config)
        yield
    finally:
        with contextlib.suppress(ApiException):
            admission_api.delete_validating_webhook_configuration(config["metadata"]["name"])
        with_webhook.stop()
        operator.start()
        operator.wait_healthy()


def test_the_webhook_rejects_what_the_schema_cannot_and_warns_of_missing_versions(
    webhook: None, api: client.CustomObjectsApi, kubeconfig: Path, namespace: str
) -> None:
    doc = sample("modeldeployment")
    doc["spec"]["canary"] = {"version": 2, "trafficPercent": 10, "analysis": {"steps": [50, 10]}}

    def rejected() -> str | None:
        try:
            create(api, namespace, doc)
        except ApiException as error:
            body = json.loads(error.body)
            return body["message"] if "denied the request" in body["message"] else None
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modeldeployments", "arrests")
        return None

    message = wait_for(rejected, 30, "the webhook to deny decreasing canary steps")
    assert "spec.canary.analysis.steps" in message and "steps must increase strictly" in message
    doc["spec"]["canary"]["analysis"]["steps"] = [10, 50]
    doc["metadata"]["namespace"] = namespace
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", "-"],
        input=yaml.safe_dump(doc), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no ModelVersion arrests-v1, arrests-v2 yet" in done.stderr  # admitted, with a warning


def test_the_webhook_refuses_a_batchprediction_the_schema_admits(
    webhook: None, api: client.CustomObjectsApi, namespace: str
) -> None:
    doc = sample("batchprediction")
    doc["spec"]["carry"] = ["year", "colour", "year"]  # a list the schema cannot make unique

    def rejected() -> str | None:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, "batchpredictions", doc)
        except ApiException as error:
            body = json.loads(error.body)
            return body["message"] if "denied the request" in body["message"] else None
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, "batchpredictions", "arrests-scoring")
        return None

    message = wait_for(rejected, 30, "the webhook to deny a repeated carry column")
    assert "spec.carry" in message and "year" in message
