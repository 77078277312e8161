"""The operator under test and the objects the cluster tests create (shared by the test modules and bench/).

- ``OperatorProcess``: ``python -m operators`` as a child process with a given kubeconfig and environment.
- ``sample()``, ``create()``, ``get()`` …: the samples of manifests/samples and CustomObjectsApi shorthands.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeloop.processes import free_port
from tests.support.clusterkit import wait_for

REPO = Path(__file__).resolve().parents[2]
RELEASE, SYSTEM = "kubeloop", "kubeloop-system"
OPERATOR_SA = "kubeloop-operator"
GROUP, VERSION = "kubeloop.dev", "v1alpha1"


def sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "manifests/samples" / f"{name}.yaml").read_text())


class OperatorProcess:
    """``python -m operators`` as a child process with a given kubeconfig; started, killed, restarted at will."""

    def __init__(self, kubeconfig: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_port = 0

    def start(self) -> None:
        self.health_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBELOOP_HEALTH_PORT": str(self.health_port),
            "KUBELOOP_METRICS_PORT": str(free_port()),
            "KUBELOOP_RETRY_DELAY": "2",
            "KUBELOOP_WORKERS": "4",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "operators"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"the operator exited:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until /healthz answers; otherwise the operator is stopped (no stray process) and its log's tail shown."""
        try:
            wait_for(self.healthy, timeout, "the operator's /healthz")
        except pytest.fail.Exception:
            tail = self.tail()
            self.stop()
            pytest.fail(f"the operator was not healthy within {timeout}s; its log ends:\n{tail}", pytrace=False)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def create(api: client.CustomObjectsApi, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    group, version = doc["apiVersion"].split("/")
    plural = {"TrainingJob": "trainingjobs", "ModelVersion": "modelversions", "ModelDeployment": "modeldeployments"}
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return api.create_namespaced_custom_object(group, version, namespace, plural[doc["kind"]], doc)


def get(api: client.CustomObjectsApi, group: str, version: str, plural: str, ns: str, name: str) -> dict | None:
    try:
        return api.get_namespaced_custom_object(group, version, ns, plural, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def rayjob(api: client.CustomObjectsApi, ns: str, name: str) -> dict | None:
    return get(api, "ray.io", "v1", "rayjobs", ns, name)


def inferenceservice(api: client.CustomObjectsApi, ns: str, name: str) -> dict | None:
    return get(api, "serving.kserve.io", "v1beta1", "inferenceservices", ns, name)


def kubeloop_obj(api: client.CustomObjectsApi, plural: str, ns: str, name: str) -> dict | None:
    return get(api, GROUP, VERSION, plural, ns, name)


def modelversion_doc(version: int = 1) -> dict[str, Any]:
    doc = sample("modelversion")
    doc["metadata"]["name"] = f"arrests-v{version}"
    doc["spec"]["version"] = version
    doc["spec"]["artifactUri"] = f"file:///var/lib/kubeloop/registry/arrests/v{version}/artifact"
    return doc


def owned_by(items: list[Any], uid: str) -> list[Any]:
    """The items (dicts or client models) whose ownerReferences name ``uid``."""

    def refs(item: Any) -> list[Any]:
        meta = item["metadata"] if isinstance(item, dict) else item.metadata
        found = meta.get("ownerReferences") if isinstance(meta, dict) else meta.owner_references
        return [r["uid"] if isinstance(r, dict) else r.uid for r in found or []]

    return [item for item in items if uid in refs(item)]


def routed(api: client.CustomObjectsApi, namespace: str, md_uid: str) -> dict[str, int] | None:
    """The weights of the HTTPRoute the operator owns for a ModelDeployment: {Service name: weight}."""
    items = api.list_namespaced_custom_object("gateway.networking.k8s.io", "v1", namespace, "httproutes")["items"]
    routes = owned_by(items, md_uid)
    if len(routes) != 1:
        return None
    (rule,) = routes[0]["spec"]["rules"]
    return {ref["name"]: ref.get("weight", 1) for ref in rule["backendRefs"]}
