"""TrainingJob -> RayJob, field by field; the RayJob status mapping; the run's result -> ModelVersion.

Upstream fields checked (read from the sources with the search tool, not guessed):

ray-project/kuberay ``ray-operator/apis/ray/v1/rayjob_types.go``:
  RayJobSpec: ``entrypoint``, ``runtimeEnvYAML``, ``submissionMode`` (K8sJobMode | HTTPMode | InteractiveMode),
  ``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished``, ``backoffLimit`` ("each retry creates a new
  RayCluster"), ``rayClusterSpec``, ``submitterPodTemplate`` (corev1.PodTemplateSpec), ``metadata``
  (map[string]string), ``activeDeadlineSeconds``, ``suspend``.
  RayJobStatus: ``jobId``, ``rayClusterName``, ``dashboardURL``, ``jobStatus`` (PENDING RUNNING STOPPED SUCCEEDED
  FAILED), ``jobDeploymentStatus`` (Initializing Running Complete Failed Suspending Suspended Retrying Waiting),
  ``reason`` (SubmissionFailed DeadlineExceeded AppFailed), ``message``, ``startTime``, ``endTime``, ``succeeded``,
  ``failed``.
ray-project/kuberay ``ray-operator/apis/ray/v1/raycluster_types.go``:
  RayClusterSpec: ``headGroupSpec``, ``workerGroupSpecs``, ``rayVersion``. HeadGroupSpec: ``template``,
  ``rayStartParams`` (map[string]string), ``serviceType``. WorkerGroupSpec: ``groupName``, ``replicas``,
  ``minReplicas``, ``maxReplicas``, ``rayStartParams``, ``template``, ``numOfHosts``.
ray-project/kuberay ``ray-operator/controllers/ray/rayjob_controller.go`` (getSubmitterTemplate): a user
  submitterPodTemplate is used as given, "the first container is assumed to be the submitter", and KubeRay fills
  its command when the template sets none.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop.api import ModelVersion, TrainingJob, load_resources, parse_resource
from operators import rayjob as rj
from operators import rayrun
from operators.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings()


def sample_trainingjob(**spec_changes: Any) -> TrainingJob:
    doc = yaml.safe_load((REPO / "manifests/samples/trainingjob.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="0a1b-uid", generation=3)
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    tj = parse_resource(doc)
    assert isinstance(tj, TrainingJob)
    return tj


def head(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


def worker_group(job: dict[str, Any]) -> dict[str, Any]:
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def container(template: dict[str, Any]) -> dict[str, Any]:
    (only,) = template["spec"]["containers"]
    return only


# --- the RayJob ---------------------------------------------------------------------------------------------------


def test_rayjob_identity_owner_and_labels() -> None:
    job = rj.desired_rayjob(sample_trainingjob(), SETTINGS)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    meta = job["metadata"]
    assert (meta["name"], meta["namespace"]) == ("arrests-mlp", "ml")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "TrainingJob",
            "name": "arrests-mlp",
            "uid": "0a1b-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = meta["labels"]
    assert labels["app.kubernetes.io/name"] == "kubeloop"
    assert labels["app.kubernetes.io/instance"] == "arrests-mlp"
    assert labels["app.kubernetes.io/component"] == "training"
    assert labels["app.kubernetes.io/part-of"] == "kubeloop"
    assert labels["app.kubernetes.io/managed-by"] == "kubeloop-operator"
    assert labels["kubeloop.dev/trainingjob"] == "arrests-mlp"
    assert labels["kubeloop.dev/model"] == "arrests"


def test_rayjob_job_fields() -> None:
    spec = rj.desired_rayjob(sample_trainingjob(), SETTINGS)["spec"]
    assert spec["entrypoint"] == "kubeloop run -f /etc/kubeloop/trainingjob.yaml"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert "ttlSecondsAfterFinished" not in spec  # KubeRay's default 0: delete the cluster at once
    assert spec["rayClusterSpec"]["rayVersion"] == SETTINGS.ray_version
    assert spec["metadata"] == {"kubeloop.dev/trainingjob": "ml/arrests-mlp"}


@pytest.mark.parametrize("max_failures", [0, 1, 4])
def test_max_failures_is_ray_trains_only_the_rayjob_is_never_retried(max_failures: int) -> None:
    """One retry layer: a RayJob retry is a whole new RayCluster, and under it Ray Train would retry again
    ((N+1)^2 attempts). spec.maxFailures goes to Ray Train's FailureConfig (through the spec the run reads)."""
    tj = sample_trainingjob(maxFailures=max_failures)
    job = rj.desired_rayjob(tj, SETTINGS)
    assert job["spec"]["backoffLimit"] == 0
    run_reads = yaml.safe_load(rj.desired_configmap(tj)["data"]["trainingjob.yaml"])
    assert run_reads["spec"]["maxFailures"] == max_failures


def test_rayjob_ttl_when_configured() -> None:
    spec = rj.desired_rayjob(sample_trainingjob(), Settings(ray_ttl_seconds=120))["spec"]
    assert spec["ttlSecondsAfterFinished"] == 120


def test_head_runs_the_driver_with_the_spec_mounted() -> None:
    group = head(rj.desired_rayjob(sample_trainingjob(), SETTINGS))
    assert group["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    pod = group["template"]["spec"]
    c = container(group["template"])
    assert c["name"] == "ray-head"
    assert c["image"] == SETTINGS.training_image
    assert c["resources"] == {
        "requests": {"cpu": SETTINGS.ray_head_cpu, "memory": SETTINGS.ray_head_memory},
        "limits": {"cpu": SETTINGS.ray_head_cpu, "memory": SETTINGS.ray_head_memory},
    }
    assert {p["containerPort"] for p in c["ports"]} == {6379, 8265, 10001}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["trainingjob"] == {"name": "trainingjob", "mountPath": "/etc/kubeloop", "readOnly": True}
    assert mounts["kubeloop-home"]["mountPath"] == SETTINGS.home_mount_path
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trainingjob"]["configMap"] == {
        "name": "arrests-mlp-trainingjob",
        "items": [{"key": "trainingjob.yaml", "path": "trainingjob.yaml"}],
    }
    assert volumes["kubeloop-home"] == {
        "name": "kubeloop-home",
        "persistentVolumeClaim": {"claimName": SETTINGS.storage_pvc},
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBELOOP_HOME"]["value"] == SETTINGS.home_mount_path
    assert env["KUBELOOP_RESULT_CONFIGMAP"]["value"] == "arrests-mlp-trainingjob"
    assert env["KUBELOOP_RESULT_KEY"]["value"] == "modelversion.yaml"
    assert env["KUBELOOP_TRAININGJOB"]["value"] == "arrests-mlp"
    assert env["KUBELOOP_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert pod["serviceAccountName"] == "arrests-mlp-training"
    assert pod["automountServiceAccountToken"] is True
    assert "nodeSelector" not in pod


def test_worker_group_from_spec_workers_without_gpus() -> None:
    tj = sample_trainingjob(workers__replicas=3, workers__cpu="1500m", workers__memory="3Gi")
    group = worker_group(rj.desired_rayjob(tj, SETTINGS))
    assert group["groupName"] == "workers"
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 3)
    assert group["rayStartParams"] == {"num-cpus": "2"}  # 1500m: a Ray Train worker reserves 2 whole CPUs
    c = container(group["template"])
    assert c["name"] == "ray-worker"
    assert c["image"] == SETTINGS.training_image
    assert c["resources"] == {
        "requests": {"cpu": "1500m", "memory": "3Gi"},
        "limits": {"cpu": "1500m", "memory": "3Gi"},
    }
    pod = group["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "trainingjob" not in {v["name"] for v in pod["volumes"]}


def test_worker_group_with_gpus() -> None:
    tj = sample_trainingjob(workers__gpu=2, backend="nccl")
    job = rj.desired_rayjob(tj, SETTINGS)
    group = worker_group(job)
    assert group["rayStartParams"] == {"num-cpus": "1", "num-gpus": "2"}
    c = container(group["template"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in c["resources"]["requests"]  # extended resources: requests default to limits
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # the head asks for none
    head_pod = head(job)["template"]["spec"]
    assert "nvidia.com/gpu" not in container(head(job)["template"])["resources"]["limits"]
    assert "nodeSelector" not in head_pod


@pytest.mark.parametrize(("cpu", "ray_cpus"), [(1, 1), ("500m", 1), ("1", 1), ("1500m", 2), ("2", 2), (4, 4)])
def test_each_worker_pod_holds_exactly_one_ray_train_worker(cpu: int | str, ray_cpus: int) -> None:
    """The pod offers Ray (num-cpus) what one Ray Train worker reserves (ScalingConfig resources_per_worker, from
    the same Workers.ray_cpus()): one fits, two do not; the head offers none. The container keeps workers.cpu."""
    tj = sample_trainingjob(workers__cpu=cpu, workers__replicas=3)
    assert tj.spec.workers.ray_cpus() == ray_cpus
    job = rj.desired_rayjob(tj, SETTINGS)
    group = worker_group(job)
    offered = int(group["rayStartParams"]["num-cpus"])
    assert ray_cpus <= offered < 2 * ray_cpus
    assert head(job)["rayStartParams"]["num-cpus"] == "0"
    assert container(group["template"])["resources"]["requests"]["cpu"] == str(cpu)


@pytest.mark.parametrize(("cpu", "gpu"), [("500m", 0), ("1500m", 0), (2, 1)])
def test_ray_train_reserves_per_worker_what_each_worker_pod_offers(cpu: int | str, gpu: int) -> None:
    """The run's ScalingConfig (kubeloop.training) and the RayJob's worker group (the operator) agree, and
    spec.maxFailures is Ray Train's FailureConfig."""
    from kubeloop.training import job as training
    from kubeloop.training import ray_runner

    tj = sample_trainingjob(workers__cpu=cpu, workers__gpu=gpu, workers__replicas=3, maxFailures=3)
    settings = training.train_settings(tj, gpus=gpu)
    scaling = ray_runner.scaling_config(settings)
    group = worker_group(rj.desired_rayjob(tj, SETTINGS))
    assert scaling.num_workers == group["replicas"] == 3
    assert scaling.resources_per_worker["CPU"] == int(group["rayStartParams"]["num-cpus"])
    assert scaling.resources_per_worker.get("GPU", 0) == int(group["rayStartParams"].get("num-gpus", 0)) == gpu
    assert ray_runner.run_config(settings).failure_config.max_failures == 3


def test_gpu_scheduling_follows_settings() -> None:
    tj = sample_trainingjob(workers__gpu=1)
    settings = Settings(gpu_node_selector={"kubeloop.dev/pool": "gpu"}, gpu_toleration=False)
    pod = worker_group(rj.desired_rayjob(tj, settings))["template"]["spec"]
    assert pod["nodeSelector"] == {"kubeloop.dev/pool": "gpu"}
    assert "tolerations" not in pod


def test_every_pod_is_pod_security_restricted() -> None:
    job = rj.desired_rayjob(sample_trainingjob(), SETTINGS)
    templates = [head(job)["template"], worker_group(job)["template"], job["spec"]["submitterPodTemplate"]]
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsUser"] == SETTINGS.user_id
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["runAsNonRoot"] is True


def test_submitter_template_leaves_the_command_to_kuberay() -> None:
    template = rj.desired_rayjob(sample_trainingjob(), SETTINGS)["spec"]["submitterPodTemplate"]
    (c,) = template["spec"]["containers"]
    assert c["name"] == "ray-job-submitter"
    assert "command" not in c and "args" not in c
    assert template["spec"]["restartPolicy"] == "Never"
    assert template["spec"]["automountServiceAccountToken"] is False


def test_without_storage_pvc_the_home_is_an_empty_dir() -> None:
    job = rj.desired_rayjob(sample_trainingjob(), Settings(storage_pvc=""))
    volumes = {v["name"]: v for v in head(job)["template"]["spec"]["volumes"]}
    assert volumes["kubeloop-home"] == {"name": "kubeloop-home", "emptyDir": {}}


def test_a_trainingjob_without_uid_cannot_own_children() -> None:
    doc = yaml.safe_load((REPO / "manifests/samples/trainingjob.yaml").read_text())
    with pytest.raises(ValueError, match="uid"):
        rj.desired_rayjob(parse_resource(doc), SETTINGS)  # type: ignore[arg-type]


def test_every_name_derived_from_the_longest_trainingjob_name_is_valid() -> None:
    """A TrainingJob name of 47 characters (the most the CRD and the model allow): the RayJob keeps it, which KubeRay
    accepts (DNS-1035, <= 47: its RayCluster adds 6 and the Services up to 10 more), and the other children's names
    and the label values stay within 63."""
    doc = yaml.safe_load((REPO / "manifests/samples/trainingjob.yaml").read_text())
    doc["metadata"].update(name="a" + "-b" * 23, namespace="ml", uid="0a1b-uid")
    tj = parse_resource(doc)
    assert isinstance(tj, TrainingJob) and len(tj.metadata.name) == 47
    rayjob = rj.desired_rayjob(tj, SETTINGS)
    assert rayjob["metadata"]["name"] == tj.metadata.name
    children = [rayjob, rj.desired_configmap(tj), rj.desired_service_account(tj), rj.desired_role(tj)]
    children.append(rj.desired_role_binding(tj))
    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for child in children:
        assert len(child["metadata"]["name"]) <= 63 and label.match(child["metadata"]["name"]), child["metadata"]
        assert all(len(value) <= 63 for value in child["metadata"]["labels"].values()), child["metadata"]["labels"]


# --- the spec ConfigMap, the run's identity ------------------------------------------------------------------------


def test_configmap_holds_the_trainingjob_kubeloop_run_reads(tmp_path: Path) -> None:
    tj = sample_trainingjob(hyperparameters__epochs=3)
    cm = rj.desired_configmap(tj)
    assert cm["metadata"]["name"] == "arrests-mlp-trainingjob"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "0a1b-uid"
    assert set(cm["data"]) == {"trainingjob.yaml"}
    path = tmp_path / "trainingjob.yaml"
    path.write_text(cm["data"]["trainingjob.yaml"])
    (again,) = load_resources(path)  # what `kubeloop run -f` does
    assert isinstance(again, TrainingJob)
    assert again.spec == tj.spec
    assert (again.metadata.name, again.metadata.namespace) == ("arrests-mlp", "ml")
    assert "uid" not in yaml.safe_load(path.read_text())["metadata"]


def test_the_run_may_patch_its_one_configmap_and_nothing_else() -> None:
    tj = sample_trainingjob()
    sa, role, binding = rj.desired_service_account(tj), rj.desired_role(tj), rj.desired_role_binding(tj)
    assert sa["metadata"]["name"] == role["metadata"]["name"] == binding["metadata"]["name"] == "arrests-mlp-training"
    assert sa["automountServiceAccountToken"] is False
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["arrests-mlp-trainingjob"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "arrests-mlp-training",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "arrests-mlp-training", "namespace": "ml"}]


# --- status mapping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deployment", "job", "phase"),
    [
        ("", "", "Pending"),
        ("Initializing", "", "Pending"),
        ("Waiting", "", "Pending"),
        ("Suspended", "", "Pending"),
        ("Running", "PENDING", "Running"),
        ("Running", "RUNNING", "Running"),
        ("Retrying", "FAILED", "Running"),
        ("Complete", "SUCCEEDED", "Succeeded"),
        ("Complete", "FAILED", "Failed"),
        ("Complete", "STOPPED", "Failed"),
        ("Failed", "", "Failed"),
        ("ValidationFailed", "", "Failed"),
        ("Failed", "RUNNING", "Failed"),
    ],
)
def test_phase_of(deployment: str, job: str, phase: str) -> None:
    assert rayrun.phase_of({"jobDeploymentStatus": deployment, "jobStatus": job}) == phase


def rayjob_with(status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "arrests-mlp", "namespace": "ml"}, "status": status}


def test_status_mirrors_the_rayjob() -> None:
    tj = sample_trainingjob()
    status = rj.trainingjob_status(
        tj,
        rayjob_with(
            {
                "jobStatus": "RUNNING",
                "jobDeploymentStatus": "Running",
                "dashboardURL": "arrests-mlp-raycluster-head-svc.ml.svc.cluster.local:8265",
                "startTime": "2026-11-23T10:00:00Z",
            }
        ),
    )
    assert status["phase"] == "Running"
    assert status["rayJobName"] == "arrests-mlp"
    assert status["jobStatus"] == "RUNNING"
    assert status["jobDeploymentStatus"] == "Running"
    assert status["dashboardURL"] == "arrests-mlp-raycluster-head-svc.ml.svc.cluster.local:8265"
    assert status["startTime"] == "2026-11-23T10:00:00Z"
    assert "completionTime" not in status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Submitted"]["status"] == "True"
    assert conditions["Running"]["status"] == "True"
    assert conditions["Complete"]["status"] == "False"
    assert conditions["Failed"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] for c in status["conditions"])


def test_status_of_a_failed_job_carries_reason_and_message() -> None:
    status = rj.trainingjob_status(
        sample_trainingjob(),
        rayjob_with(
            {
                "jobStatus": "FAILED",
                "jobDeploymentStatus": "Failed",
                "reason": "AppFailed",
                "message": "gate failed: rocAuc 0.51 < 0.6",
                "endTime": "2026-11-23T10:05:00Z",
            }
        ),
    )
    assert status["phase"] == "Failed"
    assert status["completionTime"] == "2026-11-23T10:05:00Z"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"], failed["message"]) == (
        "True",
        "AppFailed",
        "gate failed: rocAuc 0.51 < 0.6",
    )


def test_condition_transition_time_is_kept_while_the_status_holds() -> None:
    tj = sample_trainingjob()
    first = rj.trainingjob_status(tj, rayjob_with({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}))
    old = [{**c, "lastTransitionTime": "2026-01-01T00:00:00Z"} for c in first["conditions"]]
    again = rj.trainingjob_status(tj, rayjob_with({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}), old)
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"2026-01-01T00:00:00Z"}
    done = rj.trainingjob_status(tj, rayjob_with({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}), old)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Submitted"] == "2026-01-01T00:00:00Z"
    assert times["Complete"] != "2026-01-01T00:00:00Z"
    assert times["Running"] != "2026-01-01T00:00:00Z"


# --- the run's result -----------------------------------------------------------------------------------------------


def reported(**changes: Any) -> str:
    doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
    doc["spec"]["lineage"]["trainingJob"] = "ml/arrests-mlp"
    doc["spec"]["stage"] = "Candidate"
    doc["metadata"] = {"name": "arrests-v1", "namespace": "default", "labels": {"x": "y"}}
    for key, value in changes.items():
        doc["spec"][key] = value
    return yaml.safe_dump(doc)


def test_registered_modelversion_from_the_run() -> None:
    manifest = rj.registered_modelversion(sample_trainingjob(), reported())
    assert manifest["apiVersion"] == "kubeloop.dev/v1alpha1"
    assert manifest["kind"] == "ModelVersion"
    meta = manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == ("arrests-v1", "ml")
    assert "ownerReferences" not in meta  # a registry entry outlives its job
    assert meta["labels"]["kubeloop.dev/trainingjob"] == "arrests-mlp"
    assert meta["labels"]["kubeloop.dev/model"] == "arrests"
    assert meta["labels"]["kubeloop.dev/version"] == "1"
    assert "x" not in meta["labels"]
    mv = parse_resource(manifest)
    assert isinstance(mv, ModelVersion)
    assert mv.spec.stage == "Candidate"
    assert mv.spec.metrics.overall.roc_auc == pytest.approx(0.724)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not yaml", "not YAML"),
        (yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap"}), "apiVersion"),
        (reported(model="other"), "trains 'arrests'"),
        (reported(stage="Production"), "Candidate or Rejected"),
        (reported(version=0), "spec.version"),
    ],
)
def test_a_bad_result_is_refused(text: str, match: str) -> None:
    with pytest.raises(rj.ResultError, match=match):
        rj.registered_modelversion(sample_trainingjob(), text)


def test_a_result_naming_another_job_is_refused() -> None:
    doc = yaml.safe_load(reported())
    doc["spec"]["lineage"]["trainingJob"] = "ml/someone-else"
    with pytest.raises(rj.ResultError, match=r"lineage\.trainingJob"):
        rj.registered_modelversion(sample_trainingjob(), yaml.safe_dump(doc))


def test_metrics_status_from_the_modelversion() -> None:
    manifest = rj.registered_modelversion(sample_trainingjob(), reported())
    out = rj.metrics_status(manifest)
    assert out["modelVersion"] == "arrests-v1"
    assert out["metrics"]["rocAuc"] == pytest.approx(0.724)
    assert out["metrics"]["accuracy"] == pytest.approx(0.842)
    assert out["epochsCompleted"] == 8


def test_metrics_status_carries_the_tasks_metrics_and_the_validation_report() -> None:
    doc = yaml.safe_load(reported())
    doc["spec"]["signature"] |= {"task": "regression"}
    doc["spec"]["signature"].pop("positiveClass", None)
    doc["spec"]["metrics"]["overall"] = {"rows": 835, "rmse": 2.26, "mae": 1.55, "r2": 0.5, "labelMean": 9.9}
    doc["spec"]["metrics"].pop("slices", None)
    digest = doc["spec"]["lineage"]["datasetDigest"]
    doc["spec"]["validation"] = {
        "snapshotDigest": digest,
        "baselineDigest": digest,
        "findings": [{"column": "age", "rule": "constant", "severity": "warning", "message": "one value: 30"}],
        "distances": [
            {"column": "age", "metric": "jensen_shannon", "value": 0.05, "threshold": 0.2, "severity": "error"}
        ],
    }
    out = rj.metrics_status(rj.registered_modelversion(sample_trainingjob(), yaml.safe_dump(doc)))
    assert out["metrics"] == {"rmse": 2.26, "mae": 1.55, "r2": 0.5, "labelMean": 9.9}
    assert out["validation"]["distances"][0]["value"] == 0.05
    assert out["validation"]["findings"][0]["rule"] == "constant"
