"""The BatchPrediction handlers against the in-memory API (tests/support/fake_kube.py): the version scored with,
one run per resource, its progress and outcome mirrored with Events."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
import yaml

from kubeloop.kube import kind_of
from operators import admission, run_handlers
from tests.support.fake_kube import FakeKube
from tests.support.handlerkit import REPO, apply_patch, installed_fake, sample


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    yield from installed_fake(monkeypatch)


# --- BatchPrediction ----------------------------------------------------------------------------------------------


def put_version(fake: FakeKube, version: int, stage: str = "Production", model: str = "arrests") -> None:
    doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
    doc["metadata"].update(name=f"{model}-v{version}", namespace="ml")
    doc["spec"].update(model=model, version=version, stage=stage)
    fake.put(doc)


def run_bp(fake: FakeKube, body: dict[str, Any], reason: str = "resume") -> tuple[dict[str, Any], Exception | None]:
    patch = kopf.Patch()
    error = None
    try:
        run_handlers.reconcile_batchprediction(body=body, patch=patch, reason=reason)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        error = exc
    return apply_patch(fake, body, patch), error


def submitted_document(fake: FakeKube) -> dict[str, Any]:
    return yaml.safe_load(fake.find("ConfigMap", "arrests-scoring-batchprediction")["data"]["spec.yaml"])


def test_a_batchprediction_scores_with_the_production_version_and_converges(fake: FakeKube) -> None:
    put_version(fake, 1, "Archived")
    put_version(fake, 2, "Production")
    put_version(fake, 3, "Candidate")
    put_version(fake, 7, "Production", model="other")
    bp, error = run_bp(fake, fake.put(sample("batchprediction")), reason="create")
    assert error is None
    assert [w[1] for w in fake.writes if w[0] == "create"] == [
        "ConfigMap", "ServiceAccount", "RayJob", "Role", "RoleBinding",
    ]  # fmt: skip
    assert bp["status"]["phase"] == "Pending"
    assert bp["status"]["modelVersion"] == "arrests-v2"
    assert bp["status"]["rayJobName"] == "arrests-scoring"
    assert submitted_document(fake)["spec"]["version"] == 2
    job = fake.find("RayJob", "arrests-scoring")
    assert job["spec"]["metadata"]["kubeloop.dev/version"] == "2"
    assert fake.find("ServiceAccount", "arrests-scoring-batch") is not None
    # v3 promoted meanwhile: the submitted run keeps v2, and nothing is written again
    fake.objects[("modelversions", "ml", "arrests-v3")]["spec"]["stage"] = "Production"
    fake.writes.clear()
    fake.events.clear()  # type: ignore[attr-defined]
    run_bp(fake, fake.find("BatchPrediction", "arrests-scoring"))
    assert [w for w in fake.writes if w[0] != "patch/status"] == []
    assert fake.events == []
    assert submitted_document(fake)["spec"]["version"] == 2


def test_a_batchprediction_without_a_version_to_score_with_fails_and_creates_nothing(fake: FakeKube) -> None:
    put_version(fake, 1, "Candidate")
    body = fake.put(sample("batchprediction"))
    bp, error = run_bp(fake, body, reason="create")
    assert isinstance(error, kopf.PermanentError)
    assert [w for w in fake.writes if w[0] != "patch/status"] == []
    assert bp["status"]["phase"] == "Failed"
    assert "spec.model arrests" in bp["status"]["message"] and "Production" in bp["status"]["message"]
    (valid,) = bp["status"]["conditions"]
    assert (valid["type"], valid["status"], valid["reason"]) == ("Valid", "False", "ModelVersionNotFound")
    assert fake.events == [("Warning", "ModelVersionNotFound", bp["status"]["message"])]  # type: ignore[attr-defined]
    # a version that does not exist is named as the field that names it
    bp["spec"]["version"] = 4
    bp, error = run_bp(fake, bp, reason="update")
    assert isinstance(error, kopf.PermanentError)
    assert "spec.version 4" in bp["status"]["message"] and "arrests-v4" in bp["status"]["message"]
    assert fake.of_kind("RayJob") == []
    # nothing ran yet: the fixed spec is the one submitted, and the condition goes
    bp["spec"]["version"] = 1
    bp, error = run_bp(fake, bp, reason="update")
    assert error is None
    assert bp["status"]["phase"] == "Pending"
    assert [c["type"] for c in bp["status"]["conditions"]] == ["Submitted", "Running", "Complete", "Failed"]
    assert submitted_document(fake)["spec"]["version"] == 1


def test_a_spec_change_after_submission_changes_nothing_and_says_so(fake: FakeKube) -> None:
    put_version(fake, 1)
    put_version(fake, 2, "Candidate")
    run_bp(fake, fake.put(sample("batchprediction")), reason="create")
    before = copy.deepcopy(fake.objects)
    bp = fake.find("BatchPrediction", "arrests-scoring")
    bp["spec"]["version"] = 2
    bp["spec"]["output"] = "batch/elsewhere"
    fake.events.clear()  # type: ignore[attr-defined]
    run_bp(fake, bp, reason="update")
    for key, obj in before.items():
        if obj["kind"] != "BatchPrediction":
            assert fake.objects[key] == obj
    assert [(e[0], e[1]) for e in fake.events] == [("Warning", "SpecChangedAfterSubmission")]  # type: ignore[attr-defined]


def set_rayjob_status(fake: FakeKube, **status: Any) -> dict[str, Any]:
    job = fake.find("RayJob", "arrests-scoring")
    job["status"] = status
    fake.objects[("rayjobs", "ml", "arrests-scoring")] = job
    return job


def publish(fake: FakeKube, **fields: Any) -> None:
    cm = kind_of("v1", "ConfigMap")
    fake.patch(cm, "ml", "arrests-scoring-batchprediction", {"data": {"batchprediction.yaml": yaml.safe_dump(fields)}})


def test_progress_and_outcome_are_mirrored_with_events(fake: FakeKube) -> None:
    put_version(fake, 1)
    run_bp(fake, fake.put(sample("batchprediction")), reason="create")
    fake.events.clear()  # type: ignore[attr-defined]
    job = set_rayjob_status(fake, jobDeploymentStatus="Running", jobStatus="RUNNING")
    run_handlers.on_batch_rayjob_event(body=job, type="MODIFIED")
    status = fake.find("BatchPrediction", "arrests-scoring")["status"]
    assert status["phase"] == "Running" and "rowsDone" not in status
    assert fake.events == [("Normal", "Started", "RayJob arrests-scoring is scoring bundled://arrests")]  # type: ignore[attr-defined]
    # the run publishes progress; only the timer sees it (the RayJob does not change)
    publish(fake, phase="Running", rowsTotal=5226, rowsDone=4096, rowsRejected=2, modelVersion="arrests-v1")
    run_handlers.watch_batchprediction(body=fake.find("BatchPrediction", "arrests-scoring"))
    status = fake.find("BatchPrediction", "arrests-scoring")["status"]
    assert (status["phase"], status["rowsDone"], status["rowsTotal"], status["rowsRejected"]) == (
        "Running",
        4096,
        5226,
        2,
    )
    # done: rows, rejected, output, drift; one Event with the rows and the rejected
    publish(fake, phase="Succeeded", rowsTotal=5226, rowsDone=5224, rowsRejected=2, modelVersion="arrests-v1",
            outputUri="file:///var/lib/kubeloop/batch/arrests-scoring", inputDigest="sha256:" + "b" * 64,
            drift={"state": "NoDrift", "pValue": 0.4})  # fmt: skip
    job = set_rayjob_status(fake, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", endTime="2026-11-23T10:09:00Z")
    run_handlers.on_batch_rayjob_event(body=job, type="MODIFIED")
    status = fake.find("BatchPrediction", "arrests-scoring")["status"]
    assert (status["phase"], status["rowsDone"], status["completionTime"]) == (
        "Succeeded",
        5224,
        "2026-11-23T10:09:00Z",
    )
    assert status["outputUri"] == "file:///var/lib/kubeloop/batch/arrests-scoring"
    assert status["drift"] == {"state": "NoDrift", "pValue": 0.4, "features": []}  # as BatchDrift reads it
    assert status["inputDigest"] == "sha256:" + "b" * 64
    finished = fake.events[-1]  # type: ignore[attr-defined]
    assert finished[:2] == ("Normal", "Finished")
    assert "5224 of 5226 rows scored, 2 rejected" in finished[2]
    fake.writes.clear()
    assert run_handlers.sync_batchprediction_status(job) is None
    assert fake.writes == []


def test_a_failed_batch_run_says_why(fake: FakeKube) -> None:
    put_version(fake, 1)
    run_bp(fake, fake.put(sample("batchprediction")), reason="create")
    fake.events.clear()  # type: ignore[attr-defined]
    job = set_rayjob_status(fake, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed",
                            message="Job entrypoint command failed with exit code 1")  # fmt: skip
    run_handlers.on_batch_rayjob_event(body=job, type="MODIFIED")
    status = fake.find("BatchPrediction", "arrests-scoring")["status"]
    assert status["phase"] == "Failed"
    assert fake.events == [("Warning", "Failed", "Job entrypoint command failed with exit code 1")]  # type: ignore[attr-defined]


def test_an_invalid_batchprediction_is_failed_and_refused_by_admission(fake: FakeKube) -> None:
    doc = sample("batchprediction")
    doc["spec"]["batchSize"] = 0
    bp, error = run_bp(fake, fake.put(doc), reason="create")
    assert isinstance(error, kopf.PermanentError)
    assert bp["status"]["phase"] == "Failed"
    assert fake.of_kind("RayJob") == []
    assert "spec.batchSize" in (admission.problems(doc) or "")
    assert admission.problems(sample("batchprediction")) is None
    assert "batchpredictions" in admission.PLURALS
