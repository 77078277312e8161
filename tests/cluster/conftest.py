"""Cluster tests: a real kube-apiserver, not a mock.

Which cluster:
- ``KUBELOOP_TEST_KUBECONFIG=/path/to/kubeconfig``: any existing cluster (a kind cluster on a laptop, say); the
  identity in it must be cluster-admin.
- otherwise the dev control plane of ``platform/dev-controlplane/`` (etcd, kube-apiserver, kube-controller-manager,
  kube-scheduler, kwok with 2 fake nodes), started once per session on 127.0.0.1 and stopped at the end. Its
  binaries are built from Go modules into ``${KUBELOOP_CACHE:-~/.cache/kubeloop}`` the first time (about half an
  hour on 2 cores; done before the first test runs, so no test's timeout pays for it).

Every test here carries ``pytest.mark.cluster`` (added below), so ``-m "not cluster"`` leaves them out.
Fixtures: ``cluster`` (clusterkit.Cluster), ``kubeconfig`` (admin, Path), ``namespace`` (fresh per test),
``sa_kubeconfig(namespace, name)`` (a ServiceAccount's kubeconfig, no permissions until bound); for the operator:
``upstream`` (the real KubeRay operator and KServe controller with its webhooks, and the KServe, KubeRay and Gateway
API CRDs, started on the dev control plane by platform/dev-controlplane/upstream.py; on another cluster they must be
installed already), ``chart`` (helm install of helm/kubeloop), ``operator_kubeconfig`` (the chart's
ServiceAccount), ``api``/``core`` (clients with the admin identity), ``kubeloop_home`` (the PersistentVolumeClaim the
Ray and predictor pods mount, so they schedule and run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kubeloop import chart as chart_render
from operators.settings import Settings
from tests.support.clusterkit import (
    EXTERNAL_ENV,
    HERE,
    Cluster,
    exists,
    load_controlplane,
    load_upstream,
    service_account_kubeconfig,
    wait_for,
)
from tests.support.operatorkit import OPERATOR_SA, RELEASE, REPO, SYSTEM


def _is_cluster_test(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_cluster_test(item):
            item.add_marker(pytest.mark.cluster)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control plane before any test runs when cluster tests were selected and the cache is empty."""
    if os.environ.get(EXTERNAL_ENV) or session.config.option.collectonly:
        return
    if not any(_is_cluster_test(item) for item in session.items):
        return
    controlplane = load_controlplane()
    if controlplane.is_built() and load_upstream().is_built(controlplane.bin_dir()):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(
            f"\ntests/cluster: building the dev control plane into {controlplane.bin_dir()} "
            "(first run on this machine; later runs reuse it) ...",
            flush=True,
        )
        started = time.monotonic()
        controlplane.build(stdout=sys.stdout)
        print(f"tests/cluster: control plane built in {time.monotonic() - started:.0f}s", flush=True)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    external = os.environ.get(EXTERNAL_ENV)
    if external:
        path = Path(external).expanduser()
        if not path.is_file():
            pytest.fail(f"{EXTERNAL_ENV}={external} is not a file")
        yield Cluster(kubeconfig=path)
        return
    controlplane = load_controlplane()
    if not (controlplane.is_built() and load_upstream().is_built(controlplane.bin_dir())):
        controlplane.build()  # the collection hook builds; this covers other entry points
    plane = controlplane.ControlPlane(die_with_parent=True)
    plane.start()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(
            f"\ntests/cluster: control plane {plane.k8s_version} up in {plane.startup_seconds:.1f}s ({plane.server})",
            flush=True,
        )
    try:
        yield Cluster(kubeconfig=plane.kubeconfig, dev=plane)
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(cluster: Cluster) -> Path:
    """An admin kubeconfig for the cluster under test."""
    return cluster.kubeconfig


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting for it to go)."""
    from kubernetes import client

    api = client.CoreV1Api(cluster.client())
    name = f"kl-test-{uuid.uuid4().hex[:8]}"
    api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # pods are admitted only once the service-account controller made the namespace's "default" SA
    wait_for(lambda: exists(lambda: api.read_namespaced_service_account("default", name)), 60, "default SA")
    yield name
    api.delete_namespace(name)


@pytest.fixture
def sa_kubeconfig(kubeconfig: Path, tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``sa_kubeconfig(namespace, name)`` -> a kubeconfig for that ServiceAccount (created if missing)."""

    def make(namespace: str, name: str, expiration_seconds: int = 3600) -> Path:
        return service_account_kubeconfig(
            kubeconfig, namespace, name, tmp_path / f"{namespace}-{name}.kubeconfig", expiration_seconds
        )

    return make


UPSTREAM_CRDS = ("rayjobs.ray.io", "rayclusters.ray.io", "inferenceservices.serving.kserve.io",
                 "httproutes.gateway.networking.k8s.io")  # fmt: skip


@pytest.fixture(scope="session")
def upstream(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    """The real KubeRay operator and KServe controller (webhooks on) with their CRDs and Gateway API's.

    On the dev control plane they are started here, as processes in its process group; another cluster must have
    them installed (platform/up.sh), which is checked through the CRDs they serve."""
    if cluster.dev is not None:
        started = load_upstream().Upstream(cluster.dev).start()
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"tests/cluster: KubeRay and KServe (webhooks on) up in {started.startup_seconds:.1f}s", flush=True)
        return
    ext = client.ApiextensionsV1Api(cluster.client())
    missing = [name for name in UPSTREAM_CRDS if not exists(lambda n=name: ext.read_custom_resource_definition(n))]
    if missing:
        pytest.fail(f"the cluster lacks {', '.join(missing)}: install the stack first (platform/up.sh)")


@pytest.fixture(scope="session")
def chart(cluster: Cluster, kubeconfig: Path, upstream: None) -> str:
    """helm upgrade --install of helm/kubeloop into kubeloop-system; the helm output."""
    helm = chart_render.find_helm()
    if helm is None:
        pytest.fail("no helm binary (the dev control plane build makes one)")
    args = [helm, "--kubeconfig", str(kubeconfig), "upgrade", "--install", RELEASE, str(REPO / "helm/kubeloop")]
    args += ["--namespace", SYSTEM, "--create-namespace"]
    if cluster.dev:  # kwok runs the pod (nothing to pull), so --wait is meaningful and quick
        args += ["--wait", "--timeout", "120s"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    apps = client.AppsV1Api(cluster.client())
    apps.patch_namespaced_deployment_scale(f"{RELEASE}-operator", SYSTEM, {"spec": {"replicas": 0}})
    return done.stdout


@pytest.fixture(scope="session")
def operator_kubeconfig(kubeconfig: Path, chart: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("operator") / "operator.kubeconfig"
    return service_account_kubeconfig(kubeconfig, SYSTEM, OPERATOR_SA, path, expiration_seconds=7200)


@pytest.fixture
def api(cluster: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.client())


@pytest.fixture
def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.client())


@pytest.fixture
def kubeloop_home(core: client.CoreV1Api, namespace: str) -> Iterator[str]:
    """The ``kubeloop-home`` PersistentVolumeClaim the Ray pods and predictors mount (platform/kubeloop-home.yaml on
    a real cluster), bound to a hostPath PersistentVolume that no pod here ever uses for real."""
    claim = Settings().storage_pvc
    pv_name = f"kubeloop-home-{namespace}"
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany", "ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/{pv_name}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    yield claim
    core.delete_persistent_volume(pv_name)
