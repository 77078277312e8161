"""The kopf handlers against an in-memory API: idempotent, converging, owning only their children.

The handlers are plain functions (kopf calls them with keyword arguments); here they run against ``FakeKube``,
a dict-backed stand-in for the apiserver (create / get / replace / JSON merge patch, uids, resourceVersions,
AlreadyExists). Re-running a handler on a converged cluster must write nothing; a fake "existing" child with
server-side additions must be left alone; a child of the same name owned by someone else must not be touched.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from operators import admission, deployment_handlers, handlers, kube, metrics, run_handlers
from operators import canary as canary_analysis
from operators import inferenceservice as isvc
from operators import rayjob as rj
from operators.settings import Settings
from tests.support.fake_kube import FakeKube

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    client = FakeKube()
    handlers.set_kube(client)
    events: list[tuple[str, str, str]] = []
    monkeypatch.setattr(handlers, "emit", lambda body, type_, reason, message: events.append((type_, reason, message)))
    monkeypatch.setattr(handlers, "settings", lambda: Settings())
    client.events = events  # type: ignore[attr-defined]
    yield client
    handlers.set_kube(None)


def sample(name: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / f"manifests/samples/{name}.yaml").read_text())
    doc["metadata"]["namespace"] = "ml"
    doc["spec"].update(spec)
    return doc


def apply_patch(fake: FakeKube, body: dict[str, Any], patch: kopf.Patch) -> dict[str, Any]:
    """What kopf does with the handler's ``patch``: merge it into the object's status."""
    if patch.get("status"):
        kind = kube.kind_of(body["apiVersion"], body["kind"])
        fake.patch(kind, "ml", body["metadata"]["name"], {"status": dict(patch["status"])}, subresource="status")
    return fake.find(body["kind"], body["metadata"]["name"])  # type: ignore[return-value]


def run_tj(fake: FakeKube, body: dict[str, Any], reason: str = "resume") -> dict[str, Any]:
    patch = kopf.Patch()
    run_handlers.reconcile_trainingjob(body=body, patch=patch, reason=reason)
    return apply_patch(fake, body, patch)


def run_md(fake: FakeKube, body: dict[str, Any]) -> tuple[dict[str, Any], Exception | None]:
    patch = kopf.Patch()
    error = None
    try:
        deployment_handlers.reconcile_modeldeployment(body=body, patch=patch)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        error = exc
    return apply_patch(fake, body, patch), error


# --- TrainingJob ----------------------------------------------------------------------------------------------------


def test_trainingjob_reconcile_creates_children_once(fake: FakeKube) -> None:
    tj = fake.put(sample("trainingjob"))
    tj = run_tj(fake, tj)
    created = [w for w in fake.writes if w[0] == "create"]
    assert [w[1] for w in created] == ["ConfigMap", "ServiceAccount", "RayJob", "Role", "RoleBinding"]
    assert tj["status"]["phase"] == "Pending"
    assert tj["status"]["rayJobName"] == "arrests-mlp"
    snapshot = copy.deepcopy(fake.objects)
    fake.writes.clear()
    run_tj(fake, tj)
    assert [w for w in fake.writes if w[0] != "patch/status"] == []  # converged: no child written
    for key, obj in snapshot.items():
        if obj["kind"] != "TrainingJob":
            assert fake.objects[key] == obj
    assert fake.events == [
        (
            "Normal",
            "Created",
            "ConfigMap arrests-mlp-trainingjob, ServiceAccount arrests-mlp-training, RayJob arrests-mlp, "
            "Role arrests-mlp-training, RoleBinding arrests-mlp-training created",
        )
    ]


def test_a_new_trainingjob_creates_its_children_without_reading_them(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    get = fake.get
    monkeypatch.setattr(
        fake, "get", lambda kind, namespace, name: reads.append(kind.kind) or get(kind, namespace, name)
    )
    tj = run_tj(fake, fake.put(sample("trainingjob")), reason="create")
    assert reads == []
    assert [w[1] for w in fake.writes if w[0] == "create"] == [
        "ConfigMap",
        "ServiceAccount",
        "RayJob",
        "Role",
        "RoleBinding",
    ]
    assert tj["status"]["phase"] == "Pending"
    assert [e[1] for e in fake.events] == ["Created"]


def test_the_reconcile_says_submitted_and_the_rayjob_event_has_nothing_to_add(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    tj = run_tj(fake, fake.put(sample("trainingjob")), reason="create")
    assert {c["type"]: c["status"] for c in tj["status"]["conditions"]}["Submitted"] == "True"
    assert tj["status"]["phase"] == "Pending"
    job = fake.find("RayJob", "arrests-mlp")
    assert run_handlers.sync_trainingjob_status(job) is None  # what the RayJob says is already there
    monkeypatch.setattr(fake, "get", lambda *args: pytest.fail("a status-less RayJob needs no read"))
    run_handlers.on_rayjob_event(body=job, type="ADDED")


def test_a_create_retried_after_a_restart_converges_what_exists(fake: FakeKube) -> None:
    """Killed after submitting, before kopf recorded the create, and the spec edited meanwhile: the create runs
    again, finds the children and leaves the ConfigMap the run reads as it was."""
    tj = fake.put(sample("trainingjob"))
    run_tj(fake, tj, reason="create")
    cm_before = fake.find("ConfigMap", "arrests-mlp-trainingjob")
    job_before = fake.find("RayJob", "arrests-mlp")
    fake.objects.pop(("rolebindings", "ml", "arrests-mlp-training"))
    tj["spec"]["workers"]["replicas"] = 5
    fake.writes.clear()
    fake.events.clear()  # type: ignore[attr-defined]
    run_tj(fake, tj, reason="create")
    assert [w[:2] for w in fake.writes if w[0] != "patch/status"] == [("create", "RoleBinding")]
    assert fake.find("ConfigMap", "arrests-mlp-trainingjob") == cm_before
    assert fake.find("RayJob", "arrests-mlp") == job_before
    assert [e[1] for e in fake.events] == ["Created", "SpecChangedAfterSubmission"]


def test_trainingjob_reconcile_leaves_a_running_rayjob_alone(fake: FakeKube) -> None:
    tj = fake.put(sample("trainingjob"))
    run_tj(fake, tj)
    job = fake.find("RayJob", "arrests-mlp")
    # what the apiserver and KubeRay add: defaults inside lists, status
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["numOfHosts"] = 1
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = (
        "/dev/termination-log"
    )
    job["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    fake.objects[("rayjobs", "ml", "arrests-mlp")] = job
    fake.writes.clear()
    run_tj(fake, fake.find("TrainingJob", "arrests-mlp"))
    assert [w for w in fake.writes if w[0] != "patch/status"] == []
    assert fake.find("RayJob", "arrests-mlp") == job


def test_a_spec_change_after_submission_does_not_touch_the_rayjob(fake: FakeKube) -> None:
    tj = fake.put(sample("trainingjob"))
    tj = run_tj(fake, tj)
    before = fake.find("RayJob", "arrests-mlp")
    cm_before = fake.find("ConfigMap", "arrests-mlp-trainingjob")
    tj["spec"]["workers"]["replicas"] = 5
    fake.events.clear()  # type: ignore[attr-defined]
    run_tj(fake, tj)
    assert fake.find("RayJob", "arrests-mlp") == before
    assert fake.find("ConfigMap", "arrests-mlp-trainingjob") == cm_before  # the spec the run read stays
    assert ("Warning", "SpecChangedAfterSubmission") in [(e[0], e[1]) for e in fake.events]


def test_a_child_name_taken_by_another_owner_is_not_touched(fake: FakeKube) -> None:
    tj = fake.put(sample("trainingjob"))
    foreign = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "arrests-mlp-trainingjob",
            "namespace": "ml",
            "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "other", "controller": True}],
        },
        "data": {"a": "b"},
    }
    fake.put(foreign)
    with pytest.raises(kopf.TemporaryError, match="not controlled by this resource"):
        run_tj(fake, tj)
    assert fake.find("ConfigMap", "arrests-mlp-trainingjob")["data"] == {"a": "b"}
    assert fake.of_kind("RayJob") == []
    assert ("Warning", "NameConflict") in [(e[0], e[1]) for e in fake.events]


def test_an_invalid_trainingjob_is_marked_and_not_retried(fake: FakeKube) -> None:
    doc = sample("trainingjob")
    doc["spec"]["hyperparameters"]["epochs"] = 0
    tj = fake.put(doc)
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match="epochs"):
        run_handlers.reconcile_trainingjob(body=tj, patch=patch)
    status = apply_patch(fake, tj, patch)["status"]
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["type"] == "Valid" and status["conditions"][0]["status"] == "False"
    assert fake.of_kind("RayJob") == []


# --- RayJob status -> TrainingJob, ModelVersion registration --------------------------------------------------------


def finish(fake: FakeKube, job_status: str, deployment: str = "Complete", result: str | None = None) -> dict[str, Any]:
    job = fake.find("RayJob", "arrests-mlp")
    job["status"] = {"jobStatus": job_status, "jobDeploymentStatus": deployment, "endTime": "2026-11-23T10:09:00Z"}
    fake.objects[("rayjobs", "ml", "arrests-mlp")] = job
    if result is not None:
        cm = kube.kind_of("v1", "ConfigMap")
        fake.patch(cm, "ml", "arrests-mlp-trainingjob", {"data": {rj.RESULT_KEY: result}})
    return job


def result_text(**changes: Any) -> str:
    doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
    doc["spec"]["lineage"]["trainingJob"] = "ml/arrests-mlp"
    doc["spec"]["stage"] = "Candidate"
    doc["spec"].update(changes)
    return yaml.safe_dump(doc)


def test_a_succeeded_run_registers_its_modelversion_once(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    job = finish(fake, "SUCCEEDED", result=result_text())
    written = run_handlers.sync_trainingjob_status(job)
    assert written is not None
    tj = fake.find("TrainingJob", "arrests-mlp")
    status = tj["status"]
    assert status["phase"] == "Succeeded"
    assert status["modelVersion"] == "arrests-v1"
    assert status["metrics"]["rocAuc"] == pytest.approx(0.724)
    assert status["epochsCompleted"] == 8
    assert status["completionTime"] == "2026-11-23T10:09:00Z"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert conditions["ModelRegistered"]["status"] == "True"
    (mv,) = fake.of_kind("ModelVersion")
    assert mv["metadata"]["labels"]["kubeloop.dev/trainingjob"] == "arrests-mlp"
    assert mv["spec"]["stage"] == "Candidate"
    assert ("Normal", "Registered") in [(e[0], e[1]) for e in fake.events]
    # every later event of the same RayJob: nothing more to write
    fake.writes.clear()
    assert run_handlers.sync_trainingjob_status(job) is None
    assert fake.writes == []
    assert len(fake.of_kind("ModelVersion")) == 1


def test_registration_survives_a_restart_between_create_and_status(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    job = finish(fake, "SUCCEEDED", result=result_text())
    manifest = rj.registered_modelversion(handlers.parse(fake.find("TrainingJob", "arrests-mlp")), result_text())
    fake.put(manifest)  # created by a previous operator process that died before writing the status
    run_handlers.sync_trainingjob_status(job)
    assert fake.find("TrainingJob", "arrests-mlp")["status"]["modelVersion"] == "arrests-v1"
    assert len(fake.of_kind("ModelVersion")) == 1


def test_a_version_registered_by_another_run_is_not_claimed(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    other = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
    other["metadata"]["namespace"] = "ml"
    fake.put(other)
    job = finish(fake, "SUCCEEDED", result=result_text())
    run_handlers.sync_trainingjob_status(job)
    status = fake.find("TrainingJob", "arrests-mlp")["status"]
    assert "modelVersion" not in status
    registered = next(c for c in status["conditions"] if c["type"] == "ModelRegistered")
    assert (registered["status"], registered["reason"]) == ("False", "VersionExists")


def test_a_failed_gate_registers_a_rejected_version_and_fails(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    job = finish(fake, "FAILED", "Failed", result=result_text(stage="Rejected", stageReason="rocAuc 0.5 < 0.6"))
    run_handlers.sync_trainingjob_status(job)
    status = fake.find("TrainingJob", "arrests-mlp")["status"]
    assert status["phase"] == "Failed"
    assert status["modelVersion"] == "arrests-v1"
    assert fake.of_kind("ModelVersion")[0]["spec"]["stage"] == "Rejected"


def test_a_run_without_result_says_so(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    run_handlers.sync_trainingjob_status(finish(fake, "SUCCEEDED"))
    status = fake.find("TrainingJob", "arrests-mlp")["status"]
    assert status["phase"] == "Succeeded"
    registered = next(c for c in status["conditions"] if c["type"] == "ModelRegistered")
    assert (registered["status"], registered["reason"]) == ("False", "NoResult")
    assert fake.of_kind("ModelVersion") == []


def test_a_forged_result_is_refused(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    run_handlers.sync_trainingjob_status(finish(fake, "SUCCEEDED", result=result_text(stage="Production")))
    status = fake.find("TrainingJob", "arrests-mlp")["status"]
    registered = next(c for c in status["conditions"] if c["type"] == "ModelRegistered")
    assert (registered["status"], registered["reason"]) == ("False", "InvalidResult")
    assert fake.of_kind("ModelVersion") == []


def test_rayjob_of_a_deleted_or_replaced_trainingjob_is_ignored(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob")))
    job = fake.find("RayJob", "arrests-mlp")
    job["metadata"]["ownerReferences"][0]["uid"] = "a-previous-incarnation"
    fake.writes.clear()
    assert run_handlers.sync_trainingjob_status(job) is None
    assert fake.writes == []


# --- a TrainingJob's search -------------------------------------------------------------------------------------


def test_a_search_summary_the_run_publishes_is_mirrored_into_status_tuning(fake: FakeKube) -> None:
    run_tj(fake, fake.put(sample("trainingjob-tuning")))
    job = fake.find("RayJob", "arrests-mlp-search")
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2  # 1 worker x 2 trials at once
    job["status"] = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
    fake.objects[("rayjobs", "ml", "arrests-mlp-search")] = job
    run_handlers.sync_trainingjob_status(job)
    assert "tuning" not in fake.find("TrainingJob", "arrests-mlp-search")["status"]  # nothing published yet
    summary = {"metric": "valAuc", "mode": "max", "trials": 6, "completed": 1, "stopped": 0, "failed": 1,
               "trialEpochs": 9, "bestTrial": "t1", "bestMetric": 0.71, "bestParams": {"learningRate": 0.02},
               "summary": [{"trial": "t1", "params": {"learningRate": 0.02}, "status": "Completed", "epochs": 8,
                            "metric": 0.71},
                           {"trial": "t2", "params": {"learningRate": 0.09}, "status": "Failed", "epochs": 1,
                            "error": "loss is NaN"}]}  # fmt: skip
    cm = kube.kind_of("v1", "ConfigMap")
    fake.patch(cm, "ml", "arrests-mlp-search-trainingjob", {"data": {rj.TUNING_KEY: yaml.safe_dump(summary)}})
    tj = fake.find("TrainingJob", "arrests-mlp-search")
    run_handlers.watch_search(body=tj)  # the timer: no RayJob event says a trial ended
    status = fake.find("TrainingJob", "arrests-mlp-search")["status"]
    assert status["phase"] == "Running"
    assert status["tuning"] == summary
    fake.writes.clear()
    run_handlers.watch_search(body=fake.find("TrainingJob", "arrests-mlp-search"))
    assert fake.writes == []  # the same summary: nothing to write


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
    cm = kube.kind_of("v1", "ConfigMap")
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


# --- ModelDeployment ----------------------------------------------------------------------------------------------


def put_versions(fake: FakeKube, *numbers: int) -> None:
    for n in numbers:
        doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
        doc["metadata"].update(name=f"arrests-v{n}", namespace="ml")
        doc["spec"]["version"] = n
        doc["spec"]["artifactUri"] = f"file:///var/lib/kubeloop/registry/arrests/v{n}/artifact"
        fake.put(doc)


def test_modeldeployment_reconcile_converges(fake: FakeKube) -> None:
    put_versions(fake, 1)
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert error is None
    assert [w[1] for w in fake.writes if w[0] == "create"] == ["ConfigMap", "InferenceService", "HTTPRoute"]
    for kind in ("InferenceService", "HTTPRoute"):
        assert fake.find(kind, "arrests")["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]
    assert md["status"]["url"] == "http://arrests.ml.example.com"
    created = "ConfigMap arrests-model-versions, InferenceService arrests, HTTPRoute arrests created"
    assert ("Normal", "Created", created) in fake.events
    fake.writes.clear()
    run_md(fake, md)
    assert [w for w in fake.writes if w[0] != "patch/status"] == []


def test_modeldeployment_waits_for_its_modelversion(fake: FakeKube) -> None:
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError)
    assert md["status"]["ready"] is False
    ready = md["status"]["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "ModelVersionNotFound")
    assert "arrests-v1" in ready["message"]
    assert fake.of_kind("InferenceService") == []
    put_versions(fake, 1)
    md, error = run_md(fake, md)
    assert error is None
    assert len(fake.of_kind("InferenceService")) == 1


def reject(fake: FakeKube, version: int, reason: str) -> None:
    fake.find("ModelVersion", f"arrests-v{version}")["spec"].update(stage="Rejected", stageReason=reason)


def condition(md: dict[str, Any], type_: str) -> tuple[str, str, str]:
    (cond,) = [c for c in md["status"]["conditions"] if c["type"] == type_]
    return cond["status"], cond["reason"], cond["message"]


def test_a_rejected_version_is_refused_until_the_spec_allows_it(fake: FakeKube) -> None:
    put_versions(fake, 1)
    reject(fake, 1, "rocAuc 0.61 is below the threshold 0.7")
    md, error = run_md(fake, fake.put(sample("modeldeployment")))
    message = (
        "spec.version: arrests:1 is Rejected (rocAuc 0.61 is below the threshold 0.7): serve a Candidate or "
        "Production version, or set spec.allowRejected: true to serve it anyway for debugging"
    )
    assert isinstance(error, kopf.PermanentError) and str(error) == message  # nothing to retry: the spec must change
    assert condition(md, "VersionAdmitted") == ("False", "VersionRejected", message)
    assert condition(md, "Ready") == ("False", "VersionRejected", "nothing is served: " + message)
    assert md["status"]["ready"] is False
    assert fake.events == [("Warning", "VersionRejected", message)]
    assert fake.writes == [("patch/status", "ModelDeployment", "arrests")]  # no child written

    fake.events.clear()
    md["spec"]["allowRejected"] = True
    md, error = run_md(fake, md)
    assert error is None
    assert len(fake.of_kind("InferenceService")) == 1
    served = "spec.version: arrests:1 is Rejected (rocAuc 0.61 is below the threshold 0.7): served because "
    served += "spec.allowRejected is true (debugging)"
    assert condition(md, "VersionAdmitted") == ("True", "RejectedAllowed", served)
    assert ("Warning", "RejectedVersionServed", served) in fake.events
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]


def test_a_rejected_canary_leaves_the_stable_serving_as_it_was(fake: FakeKube) -> None:
    put_versions(fake, 1, 2, 3)
    md, error = run_md(fake, fake.put(sample("modeldeployment")))
    assert error is None and condition(md, "VersionAdmitted") == ("True", "Admitted", "arrests:1 Production")
    served = copy.deepcopy(fake.find("InferenceService", "arrests"))
    served["status"] = {"url": "http://arrests-ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}
    fake.find("InferenceService", "arrests")["status"] = served["status"]
    deployment_handlers.sync_modeldeployment_status(served)
    md = fake.find("ModelDeployment", "arrests")
    reject(fake, 2, "rolled back: error rate 9.0% > 1.0%")
    fake.writes.clear()
    canary = {"version": 2, "trafficPercent": 10, "analysis": {"steps": [10, 50, 100]}}
    md["spec"]["canary"] = canary
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.PermanentError)
    status, reason, message = condition(md, "VersionAdmitted")
    assert (status, reason) == ("False", "VersionRejected")
    assert message.startswith("spec.canary.version: arrests:2 is Rejected (rolled back: error rate 9.0% > 1.0%): ")
    assert fake.writes == [("patch/status", "ModelDeployment", "arrests")]  # the InferenceService is left as it was
    assert condition(md, "Ready")[0] == "True" and md["status"]["ready"] is True  # v1 still serves
    # KServe's events keep being mirrored, without claiming the refused split
    deployment_handlers.sync_modeldeployment_status(fake.find("InferenceService", "arrests"))
    md = fake.find("ModelDeployment", "arrests")
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]
    assert md["status"]["canaryPhase"] == "None"
    # and the canary analysis judges nothing
    fake.writes.clear()
    assert canary_analysis.tick(md, fake, lambda *event: fake.events.append(event[1:]), None) is None
    assert fake.writes == []

    md["spec"]["canary"] = canary | {"version": 3}  # the spec fixed: it proceeds
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError) and "once KServe reports it ready" in str(error)
    assert condition(md, "VersionAdmitted") == ("True", "Admitted", "arrests:1 Production, arrests:3 Production")
    assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["predictor"]["name"] == "v3"
    assert [t["version"] for t in md["status"]["traffic"]] == [1, 3]


def test_canary_then_promotion_removes_the_canary(fake: FakeKube) -> None:
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment", canary={"version": 2, "trafficPercent": 10}))
    md, _ = run_md(fake, md)
    assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["trafficPercent"] == 10
    md["spec"]["version"] = 2
    del md["spec"]["canary"]
    md, error = run_md(fake, md)
    assert error is None
    spec = fake.find("InferenceService", "arrests")["spec"]
    assert "canary" not in spec  # replaced, not merged: the canary entry is gone
    server = spec["predictor"]["containers"][0]
    assert server["args"][server["args"].index("--model-version") + 1] == "/etc/kubeloop/versions/v2.yaml"
    assert set(fake.find("ConfigMap", "arrests-model-versions")["data"]) == {"v2.yaml"}
    assert md["status"]["canaryPhase"] == "None"


def backends(fake: FakeKube) -> list[tuple[str, int]]:
    (rule,) = fake.find("HTTPRoute", "arrests")["spec"]["rules"]
    return [(ref["name"], ref["weight"]) for ref in rule["backendRefs"]]


def traffic_condition(md: dict[str, Any]) -> tuple[str, str]:
    (cond,) = [c for c in md["status"]["conditions"] if c["type"] == "TrafficSplit"]
    return cond["status"], cond["reason"]


def test_the_httproute_follows_the_canary_through_steps_promotion_and_rollback(fake: FakeKube) -> None:
    put_versions(fake, 1, 2, 3)
    md = fake.put(sample("modeldeployment", canary={"version": 2, "trafficPercent": 10}))
    md, error = run_md(fake, md)
    # KServe has not reported the canary ready: the stable keeps all traffic, and the reconcile comes back
    assert isinstance(error, kopf.TemporaryError) and "ready" in str(error)
    assert backends(fake) == [("arrests-predictor", 100)]
    assert traffic_condition(md) == ("False", "CanaryNotReady")
    assert [t["percent"] for t in md["status"]["traffic"]] == [90, 10]  # the split asked for
    obj = fake.find("InferenceService", "arrests")
    obj["status"] = {"canaryStatuses": [{"name": "v2", "ready": True, "trafficPercent": 10}]}
    md, error = run_md(fake, md)
    assert error is None
    assert backends(fake) == [("arrests-predictor", 90), ("arrests-v2-predictor", 10)]
    assert traffic_condition(md) == ("True", "HTTPRoute")
    for percent in (25, 50, 100):  # what operators.canary writes at each step
        md["spec"]["canary"]["trafficPercent"] = percent
        md, error = run_md(fake, md)
        assert error is None
        assert backends(fake) == [("arrests-predictor", 100 - percent), ("arrests-v2-predictor", percent)]
        assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["trafficPercent"] == percent
    md["spec"]["version"] = 2  # promoted
    del md["spec"]["canary"]
    md, error = run_md(fake, md)
    assert error is None
    assert backends(fake) == [("arrests-predictor", 100)]
    md["spec"]["canary"] = {"version": 3, "trafficPercent": 10}
    fake.find("InferenceService", "arrests")["status"] = {
        "canaryStatuses": [{"name": "v3", "ready": True, "trafficPercent": 10}]
    }
    md, error = run_md(fake, md)
    assert backends(fake) == [("arrests-predictor", 90), ("arrests-v3-predictor", 10)]
    del md["spec"]["canary"]  # rolled back
    md, error = run_md(fake, md)
    assert error is None
    assert backends(fake) == [("arrests-predictor", 100)]
    assert traffic_condition(md) == ("True", "HTTPRoute")
    assert len(fake.of_kind("HTTPRoute")) == 1


def test_without_a_gateway_a_canary_is_said_to_get_no_traffic(fake: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "settings", lambda: Settings(gateway=""))
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment", canary={"version": 2, "trafficPercent": 10}))
    md, error = run_md(fake, md)
    assert error is None
    assert fake.of_kind("HTTPRoute") == []
    assert traffic_condition(md) == ("False", "NoGateway")
    (warning,) = [e for e in fake.events if e[0] == "Warning"]
    assert warning[1] == "CanaryWithoutTraffic" and "gets no traffic" in warning[2]
    obj = fake.find("InferenceService", "arrests")
    obj["status"] = {"url": "http://arrests-ml.example.com"}
    deployment_handlers.sync_modeldeployment_status(obj)
    assert fake.find("ModelDeployment", "arrests")["status"]["url"] == "http://arrests-ml.example.com"


def test_knative_gets_no_httproute(fake: FakeKube) -> None:
    put_versions(fake, 1)
    md, error = run_md(fake, fake.put(sample("modeldeployment", deploymentMode="Knative")))
    assert error is None
    assert fake.of_kind("HTTPRoute") == []
    assert "TrafficSplit" not in {c["type"] for c in md["status"]["conditions"]}


def test_a_cluster_without_the_httproute_kind_is_told_what_to_install(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    create = fake.create

    def no_httproutes(kind: kube.Kind, namespace: str | None, body: Any) -> dict[str, Any]:
        if kind.kind == "HTTPRoute":
            raise kube.ApiError(404, "Not Found", {"message": "the server could not find the requested resource"})
        return create(kind, namespace, body)

    monkeypatch.setattr(fake, "create", no_httproutes)
    put_versions(fake, 1)
    _, error = run_md(fake, fake.put(sample("modeldeployment")))
    assert isinstance(error, kopf.TemporaryError)
    assert "gateway.networking.k8s.io/v1 HTTPRoute" in str(error) and "Gateway API CRDs" in str(error)
    assert sorted(e[1] for e in fake.events) == ["Created", "KindNotServed"]  # ConfigMap, InferenceService went in
    assert len(fake.of_kind("InferenceService")) == 1


def test_knative_canary_creates_the_stable_first(fake: FakeKube) -> None:
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment", deploymentMode="Knative", canary={"version": 2, "trafficPercent": 20}))
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError)
    obj = fake.find("InferenceService", "arrests")
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert md["status"]["traffic"] == [{"version": 1, "percent": 100, "role": "stable"}]
    obj["status"] = {"components": {"predictor": {"latestRolledoutRevision": "arrests-predictor-00001"}}}
    md, error = run_md(fake, md)
    assert error is None
    assert fake.find("InferenceService", "arrests")["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert [t["percent"] for t in md["status"]["traffic"]] == [80, 20]


def test_invalid_canary_steps_are_rejected_with_the_field(fake: FakeKube) -> None:
    put_versions(fake, 1, 2)
    canary = {"version": 2, "trafficPercent": 10, "analysis": {"steps": [50, 10]}}
    md = fake.put(sample("modeldeployment", canary=canary))
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.PermanentError)
    assert "steps" in str(error)
    assert md["status"]["conditions"][0]["reason"] == "InvalidSpec"
    assert fake.of_kind("InferenceService") == []


def test_a_fixed_spec_clears_the_invalid_condition(fake: FakeKube) -> None:
    put_versions(fake, 1)
    md = fake.put(sample("modeldeployment", canary={"version": 1, "trafficPercent": 5}))  # canary == stable
    md, error = run_md(fake, md)
    assert isinstance(error, kopf.PermanentError)
    del md["spec"]["canary"]
    md, error = run_md(fake, md)
    assert error is None
    assert "Valid" not in {c["type"] for c in md["status"]["conditions"]}
    assert len(fake.of_kind("InferenceService")) == 1


def test_inferenceservice_status_is_mirrored(fake: FakeKube) -> None:
    put_versions(fake, 1)
    run_md(fake, fake.put(sample("modeldeployment")))
    obj = fake.find("InferenceService", "arrests")
    obj["status"] = {"url": "http://arrests-ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}
    new = deployment_handlers.sync_modeldeployment_status(obj)
    assert new is not None
    status = fake.find("ModelDeployment", "arrests")["status"]
    assert status["ready"] is True
    assert status["url"] == "http://arrests.ml.example.com"  # kubeloop's HTTPRoute, not KServe's own host
    assert status["drift"] == {"state": "Unknown"}
    fake.writes.clear()
    assert deployment_handlers.sync_modeldeployment_status(obj) is None
    assert fake.writes == []


# --- apply, admission, settings, metrics ----------------------------------------------------------------------------


def test_contains_ignores_server_additions_but_not_changes() -> None:
    assert kube.contains({"a": 1, "b": [{"x": 1, "y": 2}]}, {"a": 1, "b": [{"x": 1}]})
    assert kube.contains({"cpu": "1"}, {"cpu": 1})
    assert not kube.contains({"b": [{"x": 1}, {"x": 2}]}, {"b": [{"x": 1}]})
    assert not kube.contains({"a": True}, {"a": 1})
    assert not kube.contains({"a": {"b": 1}}, {"a": {"b": 2}})


def test_admission_problems_name_the_field() -> None:
    ok = sample("modeldeployment")
    assert admission.problems(ok) is None
    bad = sample("modeldeployment", canary={"version": 2, "analysis": {"steps": [10, 10]}})
    message = admission.problems(bad)
    assert message is not None and "spec.canary.analysis.steps" in message
    assert admission.missing_versions(ok, lambda ns, name: False) == ["arrests-v1"]
    assert admission.missing_versions(ok, lambda ns, name: True) == []


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELOOP_SERVING_IMAGE", "registry.local/serving:dev")
    monkeypatch.setenv("KUBELOOP_GPU_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("KUBELOOP_GPU_TOLERATION", "false")
    monkeypatch.setenv("KUBELOOP_SIDECAR_PORT", "9000")
    monkeypatch.setenv("KUBELOOP_STORAGE_PVC", "")
    settings = Settings.from_env()
    assert settings.serving_image == "registry.local/serving:dev"
    assert settings.gpu_node_selector == {"pool": "gpu"}
    assert settings.gpu_toleration is False
    assert settings.sidecar_port == 9000
    assert settings.storage_pvc == ""
    monkeypatch.setenv("KUBELOOP_SIDECAR_PORT", "nine")
    with pytest.raises(ValueError, match="KUBELOOP_SIDECAR_PORT"):
        Settings.from_env()


def test_metrics_exposition() -> None:
    metrics.reconciled("TrainingJob", "ok", 0.02)
    metrics.child("RayJob", "created")
    text = metrics.render()
    assert 'kubeloop_operator_reconcile_total{kind="TrainingJob",result="ok"}' in text
    assert 'kubeloop_operator_children_total{kind="RayJob",action="created"}' in text
    assert 'kubeloop_operator_reconcile_seconds_bucket{kind="TrainingJob",le="0.025"}' in text
    assert isvc.COMPONENT == "inference"


def test_the_canary_analysis_reads_the_predicted_class_query_the_settings_give(monkeypatch: pytest.MonkeyPatch) -> None:
    from operators.canary import prometheus_source

    monkeypatch.setenv("KUBELOOP_PROMETHEUS_URL", "http://prometheus:9090")
    source = prometheus_source(Settings.from_env())
    assert 'namespace="$namespace"' in source.queries.predicted_classes  # one namespace's series by default
    monkeypatch.setenv("KUBELOOP_QUERY_PREDICTED_CLASSES", 'my_classes_total{model="$model",version="$version"}')
    source = prometheus_source(Settings.from_env())
    assert source.queries.predicted_classes == 'my_classes_total{model="$model",version="$version"}'


def test_a_child_changed_by_another_writer_between_read_and_write_is_applied_again_shortly(fake: FakeKube) -> None:
    """KServe's controller writes its InferenceService too: a replace with a stale resourceVersion is a 409, which
    retries in a second (kopf's default for an unexpected error is a minute)."""
    put_versions(fake, 1, 2)
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert error is None
    md["spec"]["canary"] = {"version": 2, "trafficPercent": 10}
    read, kserve_writes = fake.get, itertools.count()

    def racing_get(kind: kube.Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = read(kind, namespace, name)
        if kind.kind == "InferenceService" and obj is not None:  # KServe updates it right after each read
            fake.objects[fake._key(kind, namespace, name)]["metadata"]["resourceVersion"] = f"k{next(kserve_writes)}"
        return obj

    fake.get = racing_get
    _, error = run_md(fake, md)
    assert isinstance(error, kopf.TemporaryError) and error.delay == 1
    assert "InferenceService arrests changed while being updated: applying again" in str(error)
    fake.get = read
    _, error = run_md(fake, md)
    assert error is None or "canary v2 gets its traffic" in str(error)
    assert fake.find("InferenceService", "arrests")["spec"]["canary"][0]["trafficPercent"] == 10


def test_the_status_mirror_never_overwrites_a_condition_the_reconcile_wrote_meanwhile(fake: FakeKube) -> None:
    """The InferenceService's events and the reconcile both write status.conditions (a list a merge patch
    replaces whole): the mirror's patch carries the resourceVersion it read, so a stale one is refused and
    recomputed, and VersionAdmitted True written meanwhile by the reconcile stays."""
    put_versions(fake, 1)
    md = fake.put(sample("modeldeployment"))
    md, error = run_md(fake, md)
    assert error is None
    key = ("modeldeployments", "ml", "arrests")
    stale = [dict(c, status="False", reason="VersionRejected") if c["type"] == "VersionAdmitted" else c
             for c in fake.objects[key]["status"]["conditions"]]  # fmt: skip
    fake.objects[key]["status"]["conditions"] = stale
    read, reconciled = fake.get, []

    def racing_get(kind: kube.Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = read(kind, namespace, name)
        if kind.kind == "ModelDeployment" and not reconciled:  # the reconcile's status write lands right after
            reconciled.append(True)
            fake.patch(kind, namespace, name, {"status": {"conditions": [
                dict(c, status="True", reason="Admitted") if c["type"] == "VersionAdmitted" else c for c in stale
            ]}}, subresource="status")  # fmt: skip
        return obj

    served = fake.find("InferenceService", "arrests")
    served["status"] = {"url": "http://arrests.ml", "conditions": [{"type": "Ready", "status": "True"}]}
    fake.get = racing_get
    assert deployment_handlers.sync_modeldeployment_status(served)["ready"] is True  # KServe's news: something to write
    fake.get = read
    (admitted,) = [c for c in fake.objects[key]["status"]["conditions"] if c["type"] == "VersionAdmitted"]
    assert (admitted["status"], admitted["reason"]) == ("True", "Admitted")
