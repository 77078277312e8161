"""BatchPrediction -> RayJob (the same builder as a TrainingJob's), the RayJob and the run's report -> status; a
TrainingJob with spec.tuning sized for its search, and the search's summary -> status.tuning.

The report is what kubeloop.in_cluster.publish writes under ``batchprediction.yaml`` (a BatchPredictionStatus in
camelCase); KubeRay's RayJob fields are those test_operator_rayjob.py lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop.api import BatchPrediction, TrainingJob, parse_resource
from kubeloop.api.batchprediction import BatchPredictionStatus
from kubeloop.api.trainingjob import TrainingJobStatus
from operators import batchjob, rayrun
from operators import rayjob as rj
from operators.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings()


def sample_batch(name: str = "arrests-scoring", **spec: Any) -> BatchPrediction:
    doc = yaml.safe_load((REPO / "manifests/samples/batchprediction.yaml").read_text())
    doc["metadata"].update(name=name, namespace="ml", uid="bp-uid", generation=1)
    doc["spec"].update(spec)
    bp = parse_resource(doc)
    assert isinstance(bp, BatchPrediction)
    return bp


def sample_search(**tuning: Any) -> TrainingJob:
    doc = yaml.safe_load((REPO / "manifests/samples/trainingjob-tuning.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="tj-uid", generation=1)
    doc["spec"]["tuning"].update(tuning)
    tj = parse_resource(doc)
    assert isinstance(tj, TrainingJob)
    return tj


def pods(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    return cluster["headGroupSpec"], workers


# --- the RayJob -------------------------------------------------------------------------------------------------


def test_a_batchprediction_runs_as_a_rayjob_of_its_name() -> None:
    job = batchjob.desired_rayjob(sample_batch(), 3, SETTINGS)
    meta = job["metadata"]
    assert (job["apiVersion"], job["kind"], meta["name"], meta["namespace"]) == (
        "ray.io/v1", "RayJob", "arrests-scoring", "ml",
    )  # fmt: skip
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "BatchPrediction",
            "name": "arrests-scoring",
            "uid": "bp-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"]["kubeloop.dev/batchprediction"] == "arrests-scoring"
    assert meta["labels"]["kubeloop.dev/model"] == "arrests"
    assert meta["labels"]["app.kubernetes.io/component"] == "batch"
    spec = job["spec"]
    assert spec["entrypoint"] == "kubeloop run -f /etc/kubeloop/batchprediction.yaml"
    assert (spec["submissionMode"], spec["shutdownAfterJobFinishes"], spec["backoffLimit"]) == ("K8sJobMode", True, 0)
    assert spec["metadata"] == {"kubeloop.dev/batchprediction": "ml/arrests-scoring", "kubeloop.dev/version": "3"}
    assert batchjob.submitted_version(job) == 3


def test_head_and_workers_from_spec_workers_with_the_home_volume() -> None:
    bp = sample_batch(workers={"replicas": 3, "cpu": "1500m", "memory": "3Gi"})
    head, workers = pods(batchjob.desired_rayjob(bp, 1, SETTINGS))
    # Ray Data's read and write tasks need CPUs beside the actors: the head offers its own
    assert head["rayStartParams"] == {"num-cpus": "1", "dashboard-host": "0.0.0.0"}
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (3, 3, 3)
    assert workers["rayStartParams"] == {"num-cpus": "2"}  # 1500m: Ray counts whole CPUs
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"] == {
        "requests": {"cpu": "1500m", "memory": "3Gi"},
        "limits": {"cpu": "1500m", "memory": "3Gi"},
    }
    for group in (head, workers):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert {"name": "kubeloop-home", "persistentVolumeClaim": {"claimName": SETTINGS.storage_pvc}} in pod["volumes"]
        assert {"name": "kubeloop-home", "mountPath": SETTINGS.home_mount_path} in container["volumeMounts"]
        assert {"name": "KUBELOOP_HOME", "value": SETTINGS.home_mount_path} in container["env"]
        assert pod["serviceAccountName"] == "arrests-scoring-batch"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    head_pod = head["template"]["spec"]
    (container,) = head_pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBELOOP_RESULT_CONFIGMAP"] == "arrests-scoring-batchprediction"
    assert env["KUBELOOP_BATCHPREDICTION"] == "arrests-scoring"
    assert "KUBELOOP_RESULT_KEY" not in env  # a TrainingJob's ModelVersion key: a batch publishes its own
    assert head_pod["automountServiceAccountToken"] is True
    assert workers["template"]["spec"]["automountServiceAccountToken"] is False
    # the document is mounted under the name the entrypoint reads; its key leaves batchprediction.yaml to the run
    volume = next(v for v in head_pod["volumes"] if v["name"] == "batchprediction")
    assert volume["configMap"] == {
        "name": "arrests-scoring-batchprediction",
        "items": [{"key": "spec.yaml", "path": "batchprediction.yaml"}],
    }


def test_the_document_pins_the_version_the_operator_resolved(tmp_path: Path) -> None:
    bp = sample_batch()
    assert bp.spec.version is None
    run = batchjob.batch_run(bp, 4, SETTINGS)
    configmap = rayrun.desired_configmap(run)
    assert set(configmap["data"]) == {"spec.yaml"}
    path = tmp_path / "batchprediction.yaml"
    path.write_text(configmap["data"]["spec.yaml"])
    read = parse_resource(yaml.safe_load(path.read_text()))
    assert isinstance(read, BatchPrediction)
    assert read.spec.version == 4
    assert read.spec.model_dump(exclude={"version"}) == bp.spec.model_dump(exclude={"version"})
    assert read.metadata.name == "arrests-scoring" and read.metadata.namespace == "ml"
    assert rayrun.submitted_unchanged(configmap, run)
    assert not rayrun.submitted_unchanged(configmap, batchjob.batch_run(bp, 5, SETTINGS))
    assert not rayrun.submitted_unchanged(configmap, batchjob.batch_run(sample_batch(batchSize=10), 4, SETTINGS))


def test_the_run_may_patch_its_one_configmap() -> None:
    run = batchjob.batch_run(sample_batch(), 1, SETTINGS)
    role = rayrun.desired_role(run)
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["arrests-scoring-batchprediction"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = rayrun.desired_role_binding(run)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "arrests-scoring-batch", "namespace": "ml"}]
    assert rayrun.desired_service_account(run)["automountServiceAccountToken"] is False


def test_every_name_derived_from_the_longest_name_is_valid() -> None:
    name = "b" * 47
    run = batchjob.batch_run(sample_batch(name=name), 1, SETTINGS)
    children = [rayrun.desired_rayjob(run, SETTINGS), rayrun.desired_configmap(run), rayrun.desired_role(run)]
    for child in children:
        assert len(child["metadata"]["name"]) <= 63, child["kind"]
    assert run.configmap_name == f"{name}-batchprediction"


def test_a_trainingjob_and_a_batchprediction_share_one_rayjob_shape() -> None:
    """The same builder: what is not the kind's own (names, labels, entrypoint, sizes, env) is equal."""
    batch = batchjob.desired_rayjob(sample_batch(), 1, SETTINGS)
    training = rj.desired_rayjob(sample_search(), SETTINGS)
    for key in ("submissionMode", "shutdownAfterJobFinishes", "backoffLimit"):
        assert batch["spec"][key] == training["spec"][key]
    assert batch["spec"]["rayClusterSpec"]["rayVersion"] == training["spec"]["rayClusterSpec"]["rayVersion"]
    assert set(batch["spec"]["submitterPodTemplate"]["spec"]) == set(training["spec"]["submitterPodTemplate"]["spec"])
    (b_head, _), (t_head, _) = pods(batch), pods(training)
    (b_container,), (t_container,) = b_head["template"]["spec"]["containers"], t_head["template"]["spec"]["containers"]
    assert b_container["ports"] == t_container["ports"]
    assert b_container["image"] == t_container["image"] == SETTINGS.training_image


# --- which version --------------------------------------------------------------------------------------------


def mv(model: str, version: int, stage: str) -> dict[str, Any]:
    return {"spec": {"model": model, "version": version, "stage": stage}}


def test_the_newest_production_version_of_the_model() -> None:
    bp = sample_batch()
    listed = [mv("arrests", 1, "Archived"), mv("arrests", 2, "Production"), mv("arrests", 4, "Candidate"),
              mv("other", 9, "Production")]  # fmt: skip
    assert batchjob.production_version(bp, listed) == 2
    assert batchjob.production_version(bp, [*listed, mv("arrests", 3, "Production")]) == 3
    assert batchjob.production_version(bp, [mv("arrests", 4, "Candidate"), mv("other", 9, "Production")]) is None
    assert "spec.model arrests" in batchjob.version_problem(bp)
    assert "spec.version 7" in batchjob.missing_version_problem(
        bp, 7
    ) and "arrests-v7" in batchjob.missing_version_problem(bp, 7)


# --- status ---------------------------------------------------------------------------------------------------


def rayjob(status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "arrests-scoring"}, "status": status}


def report(**fields: Any) -> str:
    doc = {"phase": "Running", "rowsTotal": 50_000, "rowsDone": 20_480, "rowsRejected": 3,
           "outputUri": "file:///var/lib/kubeloop/batch/arrests-scoring", "modelVersion": "arrests-v3",
           "inputDigest": "sha256:" + "a" * 64}  # fmt: skip
    doc.update(fields)
    return yaml.safe_dump(doc)


def test_status_mirrors_the_rayjob_and_the_runs_report() -> None:
    bp = sample_batch()
    running = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": "2026-11-23T10:00:00Z"}
    status = batchjob.batchprediction_status(bp, rayjob(running), report())
    assert status["phase"] == "Running"
    assert (status["rowsDone"], status["rowsTotal"], status["rowsRejected"]) == (20_480, 50_000, 3)
    assert status["outputUri"] == "file:///var/lib/kubeloop/batch/arrests-scoring"
    assert status["modelVersion"] == "arrests-v3"
    assert status["message"] == (
        "20480 of 50000 rows scored, 3 rejected, into file:///var/lib/kubeloop/batch/arrests-scoring"
    )
    assert status["startTime"] == "2026-11-23T10:00:00Z"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Running"]["status"] == "True" and conditions["Reported"]["status"] == "True"
    BatchPredictionStatus.model_validate(status)
    assert set(status) <= set(BatchPredictionStatus.model_json_schema(by_alias=True)["properties"])

    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-23T10:05:00Z"}
    drift = {"state": "Drift", "pValue": 0.001, "features": ["year"]}
    final = batchjob.batchprediction_status(
        bp, rayjob(done), report(phase="Succeeded", rowsDone=50_000, drift=drift), status["conditions"]
    )
    assert (final["phase"], final["rowsDone"], final["completionTime"]) == ("Succeeded", 50_000, "2026-11-23T10:05:00Z")
    assert final["drift"] == drift
    assert final["message"].endswith("; drift: Drift")
    conditions = {c["type"]: c for c in final["conditions"]}
    assert conditions["Complete"]["status"] == "True" and conditions["Running"]["status"] == "False"


def test_a_run_that_reports_failed_fails_with_its_message() -> None:
    running = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    text = report(phase="Failed", message="input: column year missing from bundled://arrests")
    status = batchjob.batchprediction_status(sample_batch(), rayjob(running), text)
    assert status["phase"] == "Failed"
    assert status["message"] == "input: column year missing from bundled://arrests"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "RunFailed")


def test_a_failed_rayjob_fails_with_kuberays_reason() -> None:
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "", "reason": "AppFailed", "message": "driver exited 1"}
    status = batchjob.batchprediction_status(sample_batch(), rayjob(failed), None)
    assert (status["phase"], status["message"]) == ("Failed", "driver exited 1")
    condition = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (condition["status"], condition["reason"]) == ("True", "AppFailed")


@pytest.mark.parametrize(
    ("text", "reason"),
    [(None, "NoReport"), ("rowsDone: many\n", "InvalidReport"), ("[1, 2\n", "InvalidReport")],
)
def test_a_succeeded_run_without_a_valid_report_says_so(text: str | None, reason: str) -> None:
    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    status = batchjob.batchprediction_status(sample_batch(), rayjob(done), text)
    assert status["phase"] == "Succeeded"
    assert "rowsDone" not in status
    reported = next(c for c in status["conditions"] if c["type"] == "Reported")
    assert (reported["status"], reported["reason"]) == ("False", reason)


# --- a TrainingJob's search -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "parallelism"), [(1, 1), (1, 2), (2, 3)])
def test_a_search_gets_a_worker_pod_per_ray_train_worker_of_every_trial_at_once(
    replicas: int, parallelism: int
) -> None:
    doc = yaml.safe_load((REPO / "manifests/samples/trainingjob-tuning.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="tj-uid")
    doc["spec"]["workers"]["replicas"] = replicas
    doc["spec"]["tuning"]["parallelism"] = parallelism
    tj = parse_resource(doc)
    assert isinstance(tj, TrainingJob)
    _, workers = pods(rj.desired_rayjob(tj, SETTINGS))
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == replicas * parallelism
    assert workers["rayStartParams"] == {"num-cpus": str(tj.spec.workers.ray_cpus())}
    without = tj.model_copy(update={"spec": tj.spec.model_copy(update={"tuning": None})})
    assert pods(rj.desired_rayjob(without, SETTINGS))[1]["replicas"] == replicas


def test_the_search_summary_becomes_status_tuning() -> None:
    summary = {
        "metric": "valAuc", "mode": "max", "trials": 6, "completed": 2, "stopped": 3, "failed": 1,
        "trialEpochs": 22, "bestTrial": "t3", "bestMetric": 0.74, "bestParams": {"learningRate": 0.01},
        "resultsUri": "file:///var/lib/kubeloop/searches/arrests-mlp-search",
        "summary": [{"trial": "t3", "params": {"learningRate": 0.01}, "status": "Completed", "epochs": 8,
                     "metric": 0.74}],
    }  # fmt: skip
    tuning = rj.tuning_status(yaml.safe_dump(summary))
    assert tuning == summary
    TrainingJobStatus.model_validate({"tuning": tuning})
    with pytest.raises(rj.ResultError, match=r"tuning\.yaml"):
        rj.tuning_status(yaml.safe_dump({**summary, "trials": -1}))
