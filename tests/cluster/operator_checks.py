"""What the operator's cluster tests share: the operator as a process (plain, or analysing on a real Prometheus),
kubectl, the run head's environment, Events, and what the operator's server-side apply leaves on a child."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes import client

from kubeloop import in_cluster
from kubeloop.analysis.prometheus import EmbeddedPrometheus
from kubeloop.kube import RestKube, kind_of
from operators import children
from tests.support.clusterkit import Cluster
from tests.support.operatorkit import OperatorProcess


def running_operator(operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator under test, as the chart's ServiceAccount, for one test module."""
    process = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator-log") / "operator.log")
    process.start()
    process.wait_healthy()
    yield process
    process.stop()
    errors = [line for line in process.log_path.read_text(errors="replace").splitlines() if "Traceback" in line]
    print(f"operator log: {process.log_path} ({len(errors)} tracebacks)")


def real_prometheus() -> Iterator[EmbeddedPrometheus]:
    """A Prometheus server (Debian's binary) scraping every second, for one test module."""
    if shutil.which("prometheus") is None:
        pytest.fail("these tests need a real Prometheus: apt-get install prometheus (./dev test installs it)")
    server = EmbeddedPrometheus(scrape_interval="1s", rules=None)
    server.start()
    yield server
    server.stop()


def analysing_operator(
    operator_kubeconfig: Path, prometheus: EmbeddedPrometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator under test reading its signals from ``prometheus``, its watch timer every second."""
    process = OperatorProcess(
        operator_kubeconfig,
        tmp_path_factory.mktemp("loop-operator") / "operator.log",
        {"KUBELOOP_PROMETHEUS_URL": prometheus.url, "KUBELOOP_ANALYSIS_TICK_SECONDS": "1"},
    )
    process.start()
    process.wait_healthy()
    yield process
    process.stop()


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


def events_of(core: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str]]:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [(e.reason, e.message) for e in events]


def reapplied(cluster: Cluster, operator_kubeconfig: Path, desired: dict[str, Any]) -> tuple[children.Action, bool]:
    """The operator's apply of ``desired`` once more, as its ServiceAccount, and whether the object's resourceVersion
    stayed (UNCHANGED and True: the object held every field of it, and the apiserver wrote nothing)."""
    kube = RestKube(cluster.client(operator_kubeconfig), children.FIELD_MANAGER)
    kind, meta = kind_of(desired["apiVersion"], desired["kind"]), desired["metadata"]
    before = kube.get(kind, meta["namespace"], meta["name"]) or {"metadata": {}}
    action, after = children.apply(kube, desired)
    return action, after["metadata"]["resourceVersion"] == before["metadata"].get("resourceVersion")


def holds(stored: Any, desired: Any) -> bool:
    """Whether ``stored`` has every field of ``desired`` with its value: what the apiserver kept of a child the
    operator only creates (a RayJob), KubeRay's additions inside it aside (a list item's ``scaleStrategy``)."""
    if isinstance(desired, dict):
        return isinstance(stored, dict) and all(k in stored and holds(stored[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(stored, list) and len(stored) == len(desired) and all(map(holds, stored, desired))
    return stored == desired
