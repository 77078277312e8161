"""End-to-end tests: real pods on a real cluster (``./dev e2e``), never part of ``./dev test``.

``./dev e2e`` creates the kind cluster of kind-config.yaml and brings up the stack and kubeloop's chart
(``LOCAL=1 KUBELOOP=1 platform/up.sh``), then runs these against it. Against a cluster of your own (stack and
chart installed, kubeloop's images pullable by its nodes): ``KUBELOOP_TEST_KUBECONFIG=/path ./dev e2e``.
Every test here carries ``pytest.mark.e2e``; pyproject's ``norecursedirs`` keeps this folder out of ``./dev test``.

Fixtures: ``kubeconfig`` (Path), ``api``/``core`` (clients), ``namespace`` (one per test, deleted after it, with
the KUBELOOP_HOME claim the Ray and predictor pods mount), ``chart_values`` (the installed kubeloop release's).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from tests.support.clusterkit import EXTERNAL_ENV, wait_for
from tests.support.operatorkit import REPO, SYSTEM

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    path = os.environ.get(EXTERNAL_ENV)
    if not path or not Path(path).is_file():
        pytest.fail(
            f"{EXTERNAL_ENV} must name the kubeconfig of the cluster under test: run `./dev e2e` (it creates the "
            f"kind cluster and sets it), or set it to a cluster of your own with the stack installed"
        )
    return Path(path)


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Any:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="session")
def api(api_client: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture(scope="session")
def core(api_client: Any) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture(scope="session")
def chart_values(kubeconfig: Path) -> dict[str, Any]:
    """The values of the installed kubeloop release (images, storage), as helm reports them."""
    out = subprocess.run(
        ["helm", "--kubeconfig", str(kubeconfig), "get", "values", "kubeloop", "-n", SYSTEM, "--all", "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


@pytest.fixture
def namespace(core: client.CoreV1Api, chart_values: dict[str, Any]) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    claim = yaml.safe_load((REPO / "platform/kubeloop-home.yaml").read_text())
    claim["metadata"]["name"] = chart_values["storage"]["pvcName"]
    core.create_namespaced_persistent_volume_claim(name, claim)
    yield name
    core.delete_namespace(name)
    wait_for(lambda: _gone(core, name), 300, f"namespace {name} deleted")


def _gone(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
    except client.ApiException as error:
        return error.status == 404
    return False
