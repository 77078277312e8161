"""The control plane the cluster tests run against is a real one.

Not a fake API: the release we built answers /version; kube-controller-manager turns a Deployment into a
ReplicaSet and Pods; kube-scheduler binds them to (kwok) nodes where they run; deleting the Deployment
garbage-collects everything it owned through ownerReferences; and RBAC denies a ServiceAccount until a
Role and RoleBinding allow it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.clusterkit import Cluster, wait_for

pytestmark = pytest.mark.cluster

IMAGE = "registry.k8s.io/pause:3.10"  # never pulled on kwok nodes; tiny and runnable on a real (kind) cluster


def test_version_is_the_built_release(cluster: Cluster) -> None:
    info = client.VersionApi(cluster.client()).get_code()
    assert info.major == "1"
    if cluster.expected_version:
        assert info.git_version == cluster.expected_version
        assert info.minor == cluster.expected_version.split(".")[1]


def test_deployment_runs_on_scheduled_nodes_and_is_garbage_collected(cluster: Cluster, namespace: str) -> None:
    api_client = cluster.client()
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    labels = {"app": "smoke"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="smoke", labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=3,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[
                        client.V1Container(
                            name="main",
                            image=IMAGE,
                            resources=client.V1ResourceRequirements(requests={"cpu": "100m", "memory": "32Mi"}),
                        )
                    ]
                ),
            ),
        ),
    )
    created = apps.create_namespaced_deployment(namespace, deployment)

    # kube-controller-manager: Deployment -> ReplicaSet (owned by the Deployment)
    def owned_replicasets() -> list[client.V1ReplicaSet]:
        items = apps.list_namespaced_replica_set(namespace, label_selector="app=smoke").items
        return [
            rs for rs in items if any(ref.uid == created.metadata.uid for ref in rs.metadata.owner_references or [])
        ]

    replicaset = wait_for(owned_replicasets, 60, "a ReplicaSet owned by the Deployment")[0]

    # ... ReplicaSet -> Pods; kube-scheduler binds each to a node; the node (kwok) runs them
    def running_pods() -> list[client.V1Pod]:
        pods = core.list_namespaced_pod(namespace, label_selector="app=smoke").items
        ready = [
            pod
            for pod in pods
            if pod.status.phase == "Running"
            and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        ]
        return ready if len(ready) == 3 else []

    pods = wait_for(running_pods, 120, "3 Running, Ready pods")
    nodes = {node.metadata.name: node for node in core.list_node().items}
    for pod in pods:
        assert [ref.uid for ref in pod.metadata.owner_references] == [replicaset.metadata.uid]
        assert pod.spec.node_name in nodes, "bound by the scheduler to a real Node object"
        assert pod.status.pod_ip
    if cluster.dev:
        assert all(nodes[pod.spec.node_name].metadata.labels.get("type") == "kwok" for pod in pods)
    wait_for(
        lambda: apps.read_namespaced_deployment_status("smoke", namespace).status.available_replicas == 3,
        60,
        "the Deployment to report 3 available replicas",
    )

    # deleting the owner: the garbage collector removes the ReplicaSet and, through it, the Pods
    apps.delete_namespaced_deployment("smoke", namespace, body=client.V1DeleteOptions(propagation_policy="Background"))
    wait_for(lambda: not apps.list_namespaced_replica_set(namespace).items, 60, "the ReplicaSet to be collected")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 90, "the Pods to be collected")


def test_job_pods_run_to_completion(cluster: Cluster, namespace: str) -> None:
    batch = client.BatchV1Api(cluster.client())
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="once"),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="main", image="busybox:1.36", command=["true"])],
                )
            ),
        ),
    )
    batch.create_namespaced_job(namespace, job)
    done = wait_for(
        lambda: (status := batch.read_namespaced_job_status("once", namespace).status).succeeded == 1 and status,
        120,
        "the Job to succeed",
    )
    assert any(c.type == "Complete" and c.status == "True" for c in done.conditions or [])


def test_rbac_is_enforced_for_a_service_account(
    cluster: Cluster, namespace: str, sa_kubeconfig: Callable[..., Path]
) -> None:
    reader = client.CoreV1Api(cluster.client(sa_kubeconfig(namespace, "reader")))

    with pytest.raises(ApiException) as denied:
        reader.list_namespaced_pod(namespace)
    assert denied.value.status == 403
    assert f"system:serviceaccount:{namespace}:reader" in denied.value.body

    rbac = client.RbacAuthorizationV1Api(cluster.client())
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list", "watch"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader-reads-pods"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ),
    )

    def allowed() -> bool:
        try:
            reader.list_namespaced_pod_with_http_info(namespace)
        except ApiException as error:
            if error.status == 403:
                return False
            raise
        return True

    wait_for(allowed, 30, "the RoleBinding to take effect")
    _, status, _ = reader.list_namespaced_pod_with_http_info(namespace)
    assert status == 200

    # exactly what was granted, no more: other resources and other namespaces stay forbidden
    for forbidden in (lambda: reader.list_namespaced_secret(namespace), lambda: reader.list_namespaced_pod("default")):
        with pytest.raises(ApiException) as still_denied:
            forbidden()
        assert still_denied.value.status == 403
