"""The TrainingJob handlers against the in-memory API (tests/support/fake_kube.py): children created once and
converged without writes, a submitted RayJob never changed, a child of another owner never touched, the RayJob's
status mirrored and its ModelVersion registered once."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
import yaml

from kubeloop.kube import kind_of
from operators import handlers, run_handlers
from operators import rayjob as rj
from tests.support.fake_kube import FakeKube
from tests.support.handlerkit import REPO, apply_patch, installed_fake, sample


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    yield from installed_fake(monkeypatch)


def run_tj(fake: FakeKube, body: dict[str, Any], reason: str = "resume") -> dict[str, Any]:
    patch = kopf.Patch()
    run_handlers.reconcile_trainingjob(body=body, patch=patch, reason=reason)
    return apply_patch(fake, body, patch)


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


def test_a_new_trainingjob_reads_each_child_once_for_its_owner_then_creates_it(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    get = fake.get
    monkeypatch.setattr(
        fake, "get", lambda kind, namespace, name: reads.append(kind.kind) or get(kind, namespace, name)
    )
    tj = run_tj(fake, fake.put(sample("trainingjob")), reason="create")
    assert reads == ["RayJob", "ConfigMap", "ServiceAccount", "RayJob", "Role", "RoleBinding"]  # submitted?, owners
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
        cm = kind_of("v1", "ConfigMap")
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
    cm = kind_of("v1", "ConfigMap")
    fake.patch(cm, "ml", "arrests-mlp-search-trainingjob", {"data": {rj.TUNING_KEY: yaml.safe_dump(summary)}})
    tj = fake.find("TrainingJob", "arrests-mlp-search")
    run_handlers.watch_search(body=tj)  # the timer: no RayJob event says a trial ended
    status = fake.find("TrainingJob", "arrests-mlp-search")["status"]
    assert status["phase"] == "Running"
    assert status["tuning"] == summary
    fake.writes.clear()
    run_handlers.watch_search(body=fake.find("TrainingJob", "arrests-mlp-search"))
    assert fake.writes == []  # the same summary: nothing to write
