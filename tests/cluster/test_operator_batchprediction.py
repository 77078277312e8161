"""A BatchPrediction against a real apiserver, KubeRay and the operator as the chart's ServiceAccount (see
test_operator.py for the set-up): the RayJob it runs as, its progress, and a spec with no version to score with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubeloop import in_cluster
from kubeloop.api import BatchPrediction, parse_resource
from operators import batchjob
from operators.settings import Settings
from tests.cluster.operator_checks import (
    as_the_run_head,
    events_of,
    holds,
    kubectl,
    running_operator,
)
from tests.support.clusterkit import Cluster, service_account_kubeconfig, wait_for
from tests.support.operatorkit import (
    GROUP,
    VERSION,
    OperatorProcess,
    create,
    kubeloop_obj,
    modelversion_doc,
    rayjob,
    sample,
)

operator = pytest.fixture(running_operator, scope="module", name="operator")  # one operator process per module


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
    assert holds(job["spec"], batchjob.desired_rayjob(model, 1, Settings())["spec"])
    assert job["spec"]["entrypoint"] == "kubeloop run -f /etc/kubeloop/batchprediction.yaml"
    assert job["spec"]["metadata"]["kubeloop.dev/version"] == "1"
    (ref,) = job["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"]) == ("BatchPrediction", bp["metadata"]["uid"])
    document = core.read_namespaced_config_map("arrests-scoring-batchprediction", namespace).data["spec.yaml"]
    assert yaml.safe_load(document)["spec"]["version"] == 1  # the Production version, pinned
    status = wait_for(  # the reconcile's status, or first the RayJob's mirrored and then the reconcile's
        lambda: (s := (kubeloop_obj(api, "batchpredictions", namespace, "arrests-scoring") or {}).get("status", {}))
        .get("modelVersion") and s,
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
