"""Helpers for the cluster tests (imported by conftest.py and the test modules; a unique name on purpose).

- ``load_controlplane()``, ``load_upstream()``: platform/dev-controlplane/{controlplane,upstream}.py, imported by
  path.
- ``Cluster``: the cluster under test (kubeconfig, the dev control plane when this session started it).
- ``wait_for()``: poll until true or fail the test.
- ``service_account_kubeconfig()``: a kubeconfig acting as a ServiceAccount (token from the TokenRequest API),
  to prove what a non-admin identity may and may not do.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import yaml

HERE = Path(__file__).resolve().parent
DEV_CONTROLPLANE = HERE.parents[1] / "platform" / "dev-controlplane"
EXTERNAL_ENV = "KUBELOOP_TEST_KUBECONFIG"
T = TypeVar("T")


def _load(stem: str) -> ModuleType:
    """platform/ is not a package (it would shadow the stdlib's `platform`): import its modules by path."""
    name = f"kubeloop_dev_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEV_CONTROLPLANE / f"{stem}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_controlplane() -> ModuleType:
    return _load("controlplane")


def load_upstream() -> ModuleType:
    return _load("upstream")


@dataclass
class Cluster:
    """The cluster under test. ``dev`` is the dev ControlPlane when this session started it (None otherwise)."""

    kubeconfig: Path
    dev: Any = None

    @property
    def expected_version(self) -> str | None:
        """The Kubernetes release the cluster must report, when it is one we built."""
        return self.dev.k8s_version if self.dev else None

    def client(self, kubeconfig: Path | None = None) -> Any:
        """A kubernetes.client.ApiClient for the admin kubeconfig, or for ``kubeconfig``."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def exists(read: Callable[[], object]) -> bool:
    """True when ``read()`` succeeds, False on a 404 (other API errors propagate)."""
    from kubernetes.client.exceptions import ApiException

    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def service_account_kubeconfig(
    admin_kubeconfig: Path,
    namespace: str,
    name: str,
    path: Path,
    expiration_seconds: int = 3600,
) -> Path:
    """Create ServiceAccount ``namespace/name`` (if missing), get a token for it with the TokenRequest API and
    write a kubeconfig at ``path`` that acts as that identity (``system:serviceaccount:<ns>:<name>``) against
    the same cluster. It has exactly the RBAC permissions granted to it: none, until a binding says so."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(admin_kubeconfig)))
    try:
        api.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
    except ApiException as error:
        if error.status != 409:
            raise
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
    )
    token = api.create_namespaced_service_account_token(name, namespace, request).status.token

    admin = yaml.safe_load(admin_kubeconfig.read_text())
    current = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster_entry = next(c for c in admin["clusters"] if c["name"] == current["cluster"])
    user = f"system:serviceaccount:{namespace}:{name}"
    context = {"cluster": cluster_entry["name"], "user": user, "namespace": namespace}
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster_entry],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path
