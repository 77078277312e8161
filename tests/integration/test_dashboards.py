"""The dashboards against the running processes: every metric a dashboard queries is one that kubeloop's real
model servers, drift sidecar, traffic splitter and operator export on /metrics (the multiclass-only predicted-class
counters from a multiclass server's and sidecar's metrics built in-process), and `promtool check metrics` is
clean on each of those outputs. While they run: `kubeloop status`'s live table, and the report's drift section.

The processes: a canary ModelDeployment (stable v1, canary v2 of the session's trained models, see
test_report_card.py) started by kubeloop.local_deployment.LocalDeployment as `kubeloop run` and the quickstart start it,
given real traffic (and one malformed request); the operator's metrics endpoint served as the operator serves it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from test_report_card import Trained, structure_of, trained_models

from tests.support import dashboards, tools

pytestmark = pytest.mark.integration

CANARY_PERCENT = 30


@dataclass
class Running:
    trained: Trained
    endpoints: object
    state_file: Path
    metrics: dict[str, str]  # process -> its /metrics text after the traffic
    features: object  # rows to send


@pytest.fixture(scope="module")
def running(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from kubeloop.api import ModelDeployment, load_resources
    from kubeloop.api.modeldeployment import Canary
    from kubeloop.data.snapshot import load_snapshot, read_frame
    from kubeloop.local_deployment import LocalDeployment
    from kubeloop.registry import Registry
    from kubeloop.traffic import send
    from operators import metrics as operator_metrics

    trained = trained_models(tmp_path_factory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBELOOP_HOME", str(trained.home))
        (deployment,) = load_resources(Path(__file__).resolve().parents[2] / "manifests/samples/modeldeployment.yaml")
        assert isinstance(deployment, ModelDeployment)
        deployment.spec.version = trained.baseline.spec.version
        deployment.spec.canary = Canary(version=trained.model.spec.version, traffic_percent=CANARY_PERCENT)
        record = trained.model
        features = [f.name for f in record.spec.signature.inputs]
        frame = read_frame(load_snapshot(record.spec.lineage.dataset_digest))[features]
        operator = operator_metrics.serve(0, "127.0.0.1")
        local = LocalDeployment(deployment, Registry())
        try:
            endpoints = local.start()
            assert local.state_file is not None and local.state_file.is_file()
            # 600 rows: at least one full drift window (200 rows) for the stable version at 70% of the traffic
            result = send(endpoints.url, record.spec.model, frame.iloc[:600])
            assert result.failed == 0, result.errors[:3]
            bad = httpx.post(f"{endpoints.url}/v1/models/{record.spec.model}:predict", json={"instances": [{"x": 1}]})
            assert bad.status_code == 400
            operator_metrics.reconciled("TrainingJob", "ok", 0.05)
            operator_metrics.child("RayJob", "created")
            _wait_for_a_window(endpoints.sidecar, deployment.spec.version)
            urls = {f"server-v{v}": u for v, u in endpoints.servers.items()}
            urls |= {"sidecar": endpoints.sidecar, "splitter": endpoints.splitter}
            urls["operator"] = f"http://127.0.0.1:{operator.server_address[1]}"
            texts = {name: httpx.get(f"{url}/metrics", timeout=30).text for name, url in urls.items()}
            yield Running(trained, endpoints, local.state_file, texts, frame)
        finally:
            state_file = local.state_file
            local.stop()
            operator.shutdown()
            operator.server_close()
        assert state_file is None or not state_file.exists()  # stopped: `kubeloop status` no longer lists it


def _wait_for_a_window(sidecar: str, version: int, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{sidecar}/status", timeout=10).json()["versions"][str(version)]["windowsEvaluated"] >= 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"the sidecar evaluated no window of v{version} in {timeout}s")


def _multiclass_metrics(record) -> list[str]:
    """/metrics of a multiclass model server and drift sidecar, built in-process as the processes build theirs: the
    predicted-class counters only a multiclass model's processes declare, which the binary ones running here do not."""
    import dataclasses

    from prometheus_client import CollectorRegistry, generate_latest

    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import build_monitor
    from serving.metrics import ServingMetrics

    classes = ("Adelie", "Chinstrap", "Gentoo")
    registry = CollectorRegistry()
    ServingMetrics(record.spec.model, 1, [], registry=registry, task="multiclass", classes=classes)
    config = SidecarConfig(window=50)
    monitor = dataclasses.replace(build_monitor(record, config), task="multiclass", classes=classes)
    sidecar = DriftSidecar([monitor], config, default_version=monitor.version)
    return [generate_latest(registry).decode(), generate_latest(sidecar.registry).decode()]


def test_every_dashboard_metric_is_exported_by_a_running_process(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBELOOP_HOME", str(running.trained.home))  # the sidecar's reference: the model's snapshot
    exported: set[str] = set()
    for text in [*running.metrics.values(), *_multiclass_metrics(running.trained.model)]:
        exported |= dashboards.exported_names(text)
    missing = {
        name: sorted(dashboards.dashboard_metrics(board) - exported) for name, board in dashboards.load().items()
    }
    assert not any(missing.values()), f"queried but exported by no kubeloop process: {missing}"
    # and the processes really answered with data: the main series carry samples, not just declarations
    lines = [line for text in running.metrics.values() for line in text.splitlines() if line and line[0] != "#"]
    sampled = {line.split("{")[0].split()[0] for line in lines}
    for name in ("kubeloop_requests_total", "kubeloop_request_duration_seconds_bucket", "kubeloop_request_errors_total",
                 "kubeloop_drift_p_value", "kubeloop_drift_events_received_total",
                 "kubeloop_splitter_request_duration_seconds_bucket", "kubeloop_operator_reconcile_total"):  # fmt: skip
        assert name in sampled, name


@pytest.mark.parametrize("process", ["stable", "canary", "sidecar", "splitter", "operator"])
def test_promtool_check_metrics_is_clean(running: Running, process: str) -> None:
    versions = {"stable": running.trained.baseline.spec.version, "canary": running.trained.model.spec.version}
    name = f"server-v{versions[process]}" if process in versions else process
    done = subprocess.run(
        [tools.promtool(), "check", "metrics"], input=running.metrics[name], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), f"{name}:\n{done.stdout}{done.stderr}"


def test_status_prints_the_live_table(running: Running, kubeloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeloop.status_view import running_deployments, status_table
    from kubeloop.traffic import send

    monkeypatch.setenv("KUBELOOP_HOME", str(running.trained.home))
    (state,) = running_deployments()
    assert state.servers == running.endpoints.servers and state.sidecar == running.endpoints.sidecar
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            send(running.endpoints.url, state.model, running.features.iloc[:40])

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        table = status_table(interval=2.0)
    finally:
        stop.set()
        sender.join(60)
    print(table)
    lines = table.splitlines()
    assert lines[0].split() == [
        *("DEPLOYMENT", "MODEL", "VERSION", "ROLE", "TRAFFIC", "REQ/S", "ERRORS", "P99", "DRIFT", "LABELLED", "LIVE")
    ]
    stable, canary = lines[1].split(), lines[2].split()
    assert stable[:5] == ["arrests", "arrests", f"v{state.stable}", "stable", f"{100 - CANARY_PERCENT}%"]
    assert canary[:5] == ["arrests", "arrests", f"v{state.canary}", "canary", f"{CANARY_PERCENT}%"]
    assert float(stable[5]) > 0 and stable[7].endswith("ms")
    assert stable[8] in ("NoDrift", "Drift"), table  # at least one window evaluated


def test_report_shows_the_running_sidecar(
    running: Running, kubeloop_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    monkeypatch.setenv("KUBELOOP_HOME", str(running.trained.home))
    registry = Registry()
    record = registry.get("arrests", running.trained.baseline.spec.version)
    path = write_report(record, registry, kubeloop_home / "live.html", sidecar=running.endpoints.sidecar)
    text = path.read_text()
    structure = structure_of(text)
    drift = text.split('<section id="drift">')[1].split("</section>")[0]
    assert "events received" in drift and "events dropped" in drift and "recent windows" in drift
    assert "Last window (200 rows)" in drift and "<th>p-value</th>" in drift
    assert any(alt.startswith("Last window") for _, alt in structure.images)
