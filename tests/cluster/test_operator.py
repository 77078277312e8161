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

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeloop import chart as chart_render
from kubeloop import in_cluster
from kubeloop.api import ModelVersion, TrainingJob, parse_resource
from operators import admission, rayrun
from operators import rayjob as rj
from operators.children import Action
from operators.settings import Settings
from tests.cluster.operator_checks import (
    as_the_run_head,
    events_of,
    holds,
    kubectl,
    reapplied,
    running_operator,
)
from tests.support.clusterkit import Cluster, exists, service_account_kubeconfig, wait_for
from tests.support.operatorkit import (
    GROUP,
    RELEASE,
    SYSTEM,
    VERSION,
    OperatorProcess,
    create,
    get,
    inferenceservice,
    kubeloop_obj,
    modelversion_doc,
    owned_by,
    rayjob,
    sample,
)

pytestmark = pytest.mark.cluster


operator = pytest.fixture(running_operator, scope="module", name="operator")  # one operator process per module


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
    operator_kubeconfig: Path,
) -> None:  # fmt: skip
    tj = create(api, namespace, sample("trainingjob"))
    job = wait_for(lambda: rayjob(api, namespace, "arrests-mlp"), 60, "the RayJob")

    # the fields the operator wrote, as stored by the apiserver
    model = parse_resource({k: v for k, v in tj.items() if k != "status"})
    assert isinstance(model, TrainingJob)
    desired = rj.desired_rayjob(model, Settings())
    assert holds(job["spec"], desired["spec"])
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
    # the other children applied again, as the operator does on every reconcile (server-side apply): each already
    # holds every field the operator asks for, and the apiserver writes nothing
    run = rj.training_run(model)
    for child in (rayrun.desired_configmap(run), rayrun.desired_service_account(run), rayrun.desired_role(run),
                  rayrun.desired_role_binding(run)):  # fmt: skip
        assert reapplied(cluster, operator_kubeconfig, child) == (Action.UNCHANGED, True), child["kind"]

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


def test_a_child_name_another_owner_holds_is_refused_and_left_alone(
    operator: OperatorProcess, api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str
) -> None:
    """A ConfigMap of the run's name that the TrainingJob does not control: the operator reads it before applying,
    leaves it as it is, says so in a NameConflict Warning and creates nothing after it."""
    meta = client.V1ObjectMeta(name="arrests-mlp-trainingjob")
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta, data={"a": "b"}))
    create(api, namespace, sample("trainingjob"))
    message = wait_for(
        lambda: next((m for r, m in events_of(core, namespace, "arrests-mlp") if r == "NameConflict"), None),
        60, "the NameConflict Warning",
    )  # fmt: skip
    assert "not controlled by this resource" in message
    assert core.read_namespaced_config_map("arrests-mlp-trainingjob", namespace).data == {"a": "b"}
    assert rayjob(api, namespace, "arrests-mlp") is None


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
