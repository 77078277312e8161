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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


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
def namespace(
    request: pytest.FixtureRequest, core: client.CoreV1Api, api: client.CustomObjectsApi, chart_values: dict[str, Any]
) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    claim = yaml.safe_load((REPO / "platform/kubeloop-home.yaml").read_text())
    claim["metadata"]["name"] = chart_values["storage"]["pvcName"]
    core.create_namespaced_persistent_volume_claim(name, claim)
    yield name
    if request.node.stash.get(_FAILED, False):
        print(_diagnostics(core, api, name))
    core.delete_namespace(name)
    wait_for(lambda: _gone(core, name), 300, f"namespace {name} deleted")


def _diagnostics(core: client.CoreV1Api, api: client.CustomObjectsApi, namespace: str) -> str:
    """What a failed test's namespace held, before it is deleted: kubeloop's and KubeRay's statuses, the events,
    and the end of every pod's log."""
    lines = [f"\n--- e2e diagnostics for namespace {namespace}"]
    for group, version, plural in (
        ("kubeloop.dev", "v1alpha1", "trainingjobs"),
        ("kubeloop.dev", "v1alpha1", "modeldeployments"),
        ("ray.io", "v1", "rayjobs"),
    ):
        for obj in api.list_namespaced_custom_object(group, version, namespace, plural)["items"]:
            status = json.dumps(obj.get("status") or {}, indent=1)
            lines.append(f"{plural}/{obj['metadata']['name']} status:\n{status[-6000:]}")
    for event in core.list_namespaced_event(namespace).items:
        lines.append(f"event {event.involved_object.kind}/{event.involved_object.name}: {event.reason} {event.message}")
    for pod in core.list_namespaced_pod(namespace).items:
        for container in pod.spec.containers:
            try:
                log = core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container=container.name, tail_lines=120
                )
            except client.ApiException as error:
                log = f"(no log: {error.reason})"
            lines.append(f"--- log of {pod.metadata.name}/{container.name} ({pod.status.phase}):\n{log}")
    return "\n".join(lines)


def _gone(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
    except client.ApiException as error:
        return error.status == 404
    return False
