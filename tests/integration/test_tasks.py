"""Multiclass and regression TrainingJobs end to end: the samples trained with 2 Ray Train workers (gloo), gated,
registered with their signature, then served (v1 and v2) with the drift sidecar watching their predictions."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from kubeloop.api import ModelDeployment, TrainingJob, load_resources
from kubeloop.artifact import ModelArtifact
from kubeloop.data.snapshot import read_frame
from kubeloop.evaluation import metrics
from kubeloop.local_deployment import LocalDeployment
from kubeloop.registry import Registry
from kubeloop.traffic import payload, send
from kubeloop.training.job import JobOutcome, run_training_job, split_snapshot
from serving.validation import V2_DATATYPES

pytestmark = pytest.mark.integration

SAMPLES = {
    "multiclass": "manifests/samples/trainingjob-multiclass.yaml",
    "regression": "manifests/samples/trainingjob-regression.yaml",
}


def sample(task: str) -> TrainingJob:
    (job,) = load_resources(SAMPLES[task])
    assert isinstance(job, TrainingJob) and job.spec.task == task
    return job


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory, request):
    """Both samples trained once for the module, in one state directory."""
    home = tmp_path_factory.mktemp("kubeloop-home")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("KUBELOOP_HOME", str(home))
    request.addfinalizer(monkeypatch.undo)
    return home, {task: run_training_job(sample(task)) for task in SAMPLES}


@pytest.fixture
def outcomes(trained, monkeypatch) -> dict[str, JobOutcome]:
    """The trained samples by task, with KUBELOOP_HOME at their registry."""
    home, done = trained
    monkeypatch.setenv("KUBELOOP_HOME", str(home))
    return done


def test_multiclass_sample_trains_gates_and_registers_class_probabilities(outcomes):
    outcome = outcomes["multiclass"]
    record = outcome.model_version
    assert record.spec.stage == "Candidate" and record.spec.gate.passed
    assert record.spec.lineage.workers == 2 and record.spec.lineage.backend == "gloo"
    signature = record.spec.signature
    assert signature.task == "multiclass" and signature.positive_class is None
    assert signature.classes == ["Adelie", "Chinstrap", "Gentoo"]
    overall = record.spec.metrics.overall
    assert overall.accuracy >= 0.9 and overall.f1 >= 0.85 and overall.roc_auc > 0.95
    assert overall.rmse is None and overall.positive_rate is None
    assert set(overall.class_rates) == set(signature.classes)
    assert set(record.spec.metrics.slices.values) == {"Biscoe", "Dream", "Torgersen"}
    assert all("val_accuracy" in epoch for epoch in record.spec.metrics.per_epoch)

    # the artifact answers a probability per class, in the signature's order, matching the registered metrics
    artifact = ModelArtifact.load(record.spec.artifact_uri)
    _, test = split_snapshot(sample("multiclass"), outcome.snapshot)
    proba = artifact.predict(test)
    assert proba.shape == (len(test), 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    labels = artifact.transform.label_values(test)
    assert metrics(labels, proba, "multiclass", signature.classes) == overall
    # stratified: every class is in the test rows in its overall share (Chinstrap: 68 of 344 rows)
    assert overall.rows == len(test) and overall.class_rates["Chinstrap"] == pytest.approx(68 / 344, abs=0.02)


def test_regression_sample_trains_gates_and_registers_values(outcomes):
    outcome = outcomes["regression"]
    record = outcome.model_version
    assert record.spec.stage == "Candidate" and record.spec.gate.passed
    assert record.spec.signature.task == "regression" and record.spec.signature.classes is None
    overall = record.spec.metrics.overall
    assert overall.rmse < 2.6 and overall.r2 > 0.4 and overall.mae < overall.rmse
    assert overall.accuracy is None and overall.roc_auc is None
    assert set(record.spec.metrics.slices.values) == {"F", "I", "M"}
    assert all("val_rmse" in epoch for epoch in record.spec.metrics.per_epoch)

    artifact = ModelArtifact.load(record.spec.artifact_uri)
    _, test = split_snapshot(sample("regression"), outcome.snapshot)
    values = artifact.predict(test)
    assert values.shape == (len(test),)
    # answers are rings, in the label's units (the network trains on the standardized label)
    assert 5 < float(values.mean()) < 15 and overall.label_mean == pytest.approx(test["rings"].mean())
    assert metrics(artifact.transform.label_values(test), values, "regression") == overall


def _wait_for_window(sidecar: str, version: int, rows: int) -> dict:
    """The sidecar's status once it saw `rows` predictions and its detector thread tested a window (the test runs
    after the rows arrive, so the prediction count alone does not say it ran)."""
    deadline = time.monotonic() + 60
    while True:
        status = httpx.get(f"{sidecar}/status", timeout=10).json()["versions"][str(version)]
        seen = status["predictions"]["count"] >= rows and status["windowsEvaluated"] >= 1
        if seen or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


@pytest.mark.parametrize("task", list(SAMPLES))
def test_served_v1_and_v2_and_monitored_per_task(outcomes, task):
    """The registered version behind `kubeloop run -f` of a ModelDeployment: v1 and v2 answer what the artifact
    answers (class probabilities in the signature's order, or the value), and the drift sidecar watches them."""
    record = outcomes[task].model_version
    signature = record.spec.signature
    deployment = ModelDeployment.model_validate(
        {
            "metadata": {"name": record.spec.model},
            "spec": {"model": record.spec.model, "version": 1, "drift": {"window": 100, "referenceSize": 200}},
        }
    )
    frame = read_frame(outcomes[task].snapshot)
    features = frame[[f.name for f in signature.inputs]].dropna().iloc[:100]
    expected = ModelArtifact.load(record.spec.artifact_uri).predict(features)
    with LocalDeployment(deployment, Registry()) as local:
        endpoints = local.start()
        v1 = httpx.post(
            f"{endpoints.url}/v1/models/{record.spec.model}:predict", json=payload(features.iloc[:5]), timeout=30
        )
        assert v1.status_code == 200, v1.text
        assert np.allclose(np.array(v1.json()["predictions"]), expected[:5], atol=1e-5)

        columns = [
            {
                "name": f.name,
                "shape": [5],
                "datatype": V2_DATATYPES[f.dtype][0],
                "data": features[f.name].iloc[:5].tolist(),
            }
            for f in signature.inputs
        ]
        v2 = httpx.post(f"{endpoints.url}/v2/models/{record.spec.model}/infer", json={"inputs": columns}, timeout=30)
        assert v2.status_code == 200, v2.text
        (output,) = v2.json()["outputs"]
        if task == "multiclass":
            assert (output["name"], output["shape"]) == ("probabilities", [5, 3])
            assert np.allclose(np.reshape(output["data"], (5, 3)), expected[:5], atol=1e-5)
        else:
            assert (output["name"], output["shape"]) == ("value", [5])
            assert np.allclose(output["data"], expected[:5], atol=1e-4)

        result = send(endpoints.url, record.spec.model, features.iloc[5:])
        assert result.failed == 0, result.errors[:3]
        status = _wait_for_window(endpoints.sidecar, 1, len(features))
    assert status["task"] == task and status["predictions"]["count"] == len(features)
    assert status["windowsEvaluated"] >= 1 and status["state"] == "NoDrift"
    if task == "multiclass":
        shares = status["predictions"]["classShares"]
        assert list(shares) == signature.classes and sum(shares.values()) == pytest.approx(1)
        assert shares == pytest.approx(
            dict(zip(signature.classes, np.bincount(expected.argmax(axis=1), minlength=3) / len(expected), strict=True))
        )
    else:
        assert status["predictions"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-3)
