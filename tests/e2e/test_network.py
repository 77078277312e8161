"""The cluster's own plumbing that everything else rides on: every node Ready, and a pod on one node reaching a
Service backed by a pod on another by its DNS name (what a Ray worker does to reach its head)."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from tests.support.clusterkit import wait_for


def _pod(name: str, image: str, node: str, command: list[str], labels: dict[str, str] | None = None) -> Any:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            node_name=node,
            restart_policy="Never",
            containers=[client.V1Container(name=name, image=image, command=command)],
        ),
    )


def test_pods_on_different_nodes_reach_each_other_through_a_service_name(
    core: client.CoreV1Api, namespace: str, chart_values: dict[str, Any]
) -> None:
    nodes = core.list_node().items
    assert nodes and all(any(c.type == "Ready" and c.status == "True" for c in n.status.conditions) for n in nodes), [
        (n.metadata.name, [(c.type, c.status) for c in n.status.conditions]) for n in nodes
    ]
    workers = [n.metadata.name for n in nodes if "node-role.kubernetes.io/control-plane" not in n.metadata.labels]
    assert len(workers) >= 2, f"two schedulable nodes needed, have {workers}"
    image = f"{chart_values['image']['repository']}:{chart_values['image']['tag'] or _app_version()}"

    core.create_namespaced_pod(namespace, _pod(
        "server", image, workers[0], ["python", "-m", "http.server", "8000"], labels={"app": "server"}
    ))  # fmt: skip
    core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="server"),
        spec=client.V1ServiceSpec(selector={"app": "server"}, ports=[client.V1ServicePort(port=80, target_port=8000)]),
    ))  # fmt: skip
    wait_for(lambda: core.read_namespaced_pod("server", namespace).status.phase == "Running", 300, "server Running", 1)
    url = f"http://server.{namespace}.svc.cluster.local/"
    probe = f"import urllib.request as u; print('status', u.urlopen({url!r}, timeout=20).status)"
    core.create_namespaced_pod(namespace, _pod("client", image, workers[1], ["python", "-c", probe]))
    phase = wait_for(
        lambda: (p := core.read_namespaced_pod("client", namespace).status.phase) in ("Succeeded", "Failed") and p,
        300, "the client pod to finish", 1,
    )  # fmt: skip
    log = core.read_namespaced_pod_log("client", namespace)
    assert phase == "Succeeded" and "status 200" in log, log


def _app_version() -> str:
    from tests.support.operatorkit import REPO

    for line in (REPO / "helm/kubeloop/Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise AssertionError("no appVersion in helm/kubeloop/Chart.yaml")
