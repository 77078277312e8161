"""`kubeloop quickstart`: the embedded default, no cluster.

1. train the sample TrainingJob on the bundled dataset with real Ray workers, gate and register it (promoted when
   no version is in Production yet);
2. serve it as the sample ModelDeployment describes: KServe model server + drift sidecar, on loopback;
3. send in-distribution traffic (the detector must stay quiet), then shifted traffic (it must fire);
4. print a report.
"""

from __future__ import annotations

import logging
import time
from importlib.resources import files
from pathlib import Path

import httpx
import numpy as np

from kubeloop import config
from kubeloop.api import ModelDeployment, TrainingJob, load_resources
from kubeloop.data.snapshot import load_snapshot, read_frame
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from kubeloop.models_view import detail
from kubeloop.registry import Registry
from kubeloop.report import write_report
from kubeloop.traffic import TrafficResult, send, shifted

log = logging.getLogger(__name__)
# the sample resources ship inside the package (manifests/samples links here), so an installed kubeloop has them
SAMPLES = Path(str(files("kubeloop") / "samples"))
CALM_WINDOWS = 6  # in-distribution windows sent before the shift
MAX_SHIFTED_WINDOWS = 6  # shifted windows sent before giving up on the detector


def sample(name: str) -> ModelDeployment | TrainingJob:
    """The sample resource of that file name (manifests/samples), as shipped with the package."""
    path = SAMPLES / name
    if not path.is_file():
        raise KubeloopError(f"{path} is missing: run the quickstart from a kubeloop checkout")
    (resource,) = load_resources(path)
    return resource


def _step(number: int, text: str) -> None:
    print(f"\n[{number}/4] {text}", flush=True)


def _version_status(sidecar: str, version: int, windows: int, timeout: float = 60) -> dict:
    """Wait until the sidecar has evaluated `windows` windows of a version; return its status."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{sidecar}/status", timeout=5).json()["versions"][str(version)]
        if status["windowsEvaluated"] >= windows or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def _traffic_line(name: str, result: TrafficResult) -> str:
    return (
        f"{name}: {result.requests} requests ({result.rows} rows), {result.failed} failed, "
        f"p50 {result.percentile(50):.1f} ms, p99 {result.percentile(99):.1f} ms"
    )


def quickstart(epochs: int, workers: int) -> int:
    from kubeloop.local_deployment import LocalDeployment
    from kubeloop.training.job import run_training_job

    started = time.perf_counter()
    job = sample("trainingjob.yaml")
    assert isinstance(job, TrainingJob)
    job.spec.hyperparameters.epochs = epochs
    job.spec.workers.replicas = workers

    _step(1, f"train {job.spec.model.name} with {workers} Ray workers, {epochs} epochs (state in {config.home()})")
    outcome = run_training_job(job)
    record = outcome.model_version
    registry = Registry()
    if record.spec.stage == "Candidate" and registry.production(record.spec.model) is None:
        record = registry.promote(record.spec.model, record.spec.version, "first version to pass the gate")
    print(detail(record), flush=True)
    if record.spec.stage == "Rejected":
        raise KubeloopError(f"{record.metadata.name} did not pass the gate; not serving it")
    trained = time.perf_counter()

    deployment = sample("modeldeployment.yaml")
    assert isinstance(deployment, ModelDeployment)
    deployment.spec.version = record.spec.version
    window = deployment.spec.drift.window
    model = record.spec.model
    features = [feature.name for feature in record.spec.signature.inputs]
    data = read_frame(load_snapshot(record.spec.lineage.dataset_digest))[features]
    rng = np.random.default_rng(0)

    _step(2, f"serve {record.metadata.name}: KServe model server + drift sidecar ({deployment.spec.drift.detector})")
    with LocalDeployment(deployment, registry) as local:
        endpoints = local.start()
        print(f"model server {endpoints.url}   drift sidecar {endpoints.sidecar}", flush=True)

        _step(3, f"{CALM_WINDOWS} windows of in-distribution traffic ({window} rows each)")
        calm = data.iloc[rng.choice(len(data), CALM_WINDOWS * window, replace=False)]
        calm_result = send(endpoints.url, model, calm)
        calm_status = _version_status(endpoints.sidecar, record.spec.version, CALM_WINDOWS)
        print(_traffic_line("in-distribution", calm_result))
        print(
            f"detector: {calm_status['windowsEvaluated']} windows, {calm_status['windowsFlagged']} flagged, "
            f"state {calm_status['state']}",
            flush=True,
        )

        _step(4, f"shifted traffic (age +15 years, colour mix inverted), up to {MAX_SHIFTED_WINDOWS} windows")
        shift_started, shifted_result, status = time.perf_counter(), TrafficResult(), calm_status
        for number in range(1, MAX_SHIFTED_WINDOWS + 1):
            rows = shifted(data.iloc[rng.choice(len(data), window, replace=False)], seed=number)
            batch = send(endpoints.url, model, rows)
            shifted_result.requests += batch.requests
            shifted_result.rows += batch.rows
            shifted_result.failed += batch.failed
            shifted_result.latencies += batch.latencies
            status = _version_status(endpoints.sidecar, record.spec.version, CALM_WINDOWS + number)
            last = status.get("lastWindow", {})
            print(f"  window {number}: flagged={last.get('flagged')} drifted={last.get('driftedFeatures')}", flush=True)
            if status["state"] == "Drift":
                break
        print(_traffic_line("shifted", shifted_result))
        report = write_report(record, registry, sidecar=endpoints.sidecar)

    detected = status["state"] == "Drift"
    event(log, "quickstart.done", drift=detected, seconds=time.perf_counter() - started)
    print("\n=== kubeloop quickstart report ===")
    overall = record.spec.metrics.overall
    print(
        f"model        {record.metadata.name} ({record.spec.stage}), AUC {overall.roc_auc:.3f}, "
        f"accuracy {overall.accuracy:.3f}; trained in {trained - started:.0f}s"
    )
    print(f"artifact     {record.spec.artifact_uri}")
    print(
        f"served       {calm_result.requests + shifted_result.requests} requests, "
        f"{calm_result.failed + shifted_result.failed} failed"
    )
    print(
        f"calm         {calm_status['windowsFlagged']} of {calm_status['windowsEvaluated']} windows flagged "
        f"-> state {calm_status['state']}"
    )
    if detected:
        print(
            f"shifted      drift detected after {number} window(s), {time.perf_counter() - shift_started:.1f}s "
            f"after the first shifted request; features: {', '.join(status['lastWindow']['driftedFeatures'])}"
        )
    else:
        print(f"shifted      drift NOT detected in {MAX_SHIFTED_WINDOWS} windows")
    print(f"report       {report}")
    print(f"took         {time.perf_counter() - started:.0f}s")
    print(
        f"next         kubeloop models show {model}:{record.spec.version}   |   "
        f"kubeloop run -f {SAMPLES / 'modeldeployment.yaml'}"
    )
    return 0 if detected and calm_status["state"] != "Drift" else 1
