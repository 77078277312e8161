"""The Kubeflow pipelines: compiled YAML (loads, steps, DAG, platform config, freshness) and the steps' own logic."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kfp import components

from kubeloop.api import ModelDeployment, TrainingJob
from kubeloop.api.modelversion import Evaluation, Metrics, SliceMetrics
from kubeloop.api.trainingjob import name_is_valid
from kubeloop.errors import KubeloopError, SpecError
from pipelines import cluster_steps, steps
from pipelines.compile import COMPILED_DIR, check, normalize
from pipelines.definitions import DEFAULT_TRAINING_JOB
from tests.support.fake_kube import FakeKube

TRAINING_STEPS = {"ingest", "validate", "transform", "train", "evaluate", "register"}
# consumer -> the tasks it waits for (data or .after)
TRAINING_EDGES = {
    "ingest": set(),
    "validate": {"ingest"},
    "transform": {"ingest", "validate"},
    "train": {"ingest", "transform"},
    "evaluate": {"ingest", "train"},
    "register": {"ingest", "validate", "train", "evaluate"},
}


def load(name: str):
    return components.load_component_from_file(str(COMPILED_DIR / f"{name}.yaml"))


def dag_tasks(spec) -> dict[str, object]:
    """Every task of the pipeline, condition groups included, by name."""
    found = {}

    def walk(dag) -> None:
        for name, task in dag.tasks.items():
            found[name] = task
            component = spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                walk(component.dag)

    walk(spec.root.dag)
    return found


@pytest.mark.parametrize("name", ["training", "continuous"])
def test_compiled_yaml_loads_with_kfp_and_names_every_step(name):
    component = load(name)
    assert component.name == f"kubeloop-{name}"
    tasks = dag_tasks(component.pipeline_spec)
    expected = TRAINING_STEPS | ({"deploy"} if name == "continuous" else set())
    assert {n for n in tasks if not n.startswith("condition-")} == expected
    executors = component.pipeline_spec.deployment_spec["executors"]
    images = {executor["container"]["image"] for executor in executors.values()}
    assert images == {f"ghcr.io/kubeloop/training:{__import__('kubeloop').__version__}"}
    # nothing is pip-installed when a step starts: the image holds kubeloop and kfp
    assert all("pip install" not in " ".join(e["container"]["command"]) for e in executors.values())


def test_training_dag_edges():
    tasks = dag_tasks(load("training").pipeline_spec)
    assert {name: set(task.dependent_tasks) for name, task in tasks.items()} == TRAINING_EDGES


def test_continuous_deploys_only_inside_the_gate_condition():
    spec = load("continuous").pipeline_spec
    root = spec.root.dag.tasks
    conditions = [name for name in root if name.startswith("condition-")]
    assert len(conditions) == 1
    condition = root[conditions[0]]
    assert {name: set(task.dependent_tasks) for name, task in root.items() if name in TRAINING_EDGES} == TRAINING_EDGES
    assert set(condition.dependent_tasks) == {"evaluate", "register"}
    expected = "inputs.parameter_values['pipelinechannel--evaluate-Output'] == 'passed'"
    assert condition.trigger_policy.condition == expected
    inner = spec.components[condition.component_ref.name].dag.tasks
    assert list(inner) == ["deploy"]
    deploy_inputs = inner["deploy"].inputs.parameters
    assert deploy_inputs["version"].component_input_parameter == "pipelinechannel--register-version"
    assert deploy_inputs["model"].component_input_parameter == "pipelinechannel--register-model"


def test_cache_is_off_for_steps_with_side_effects_or_outside_state():
    tasks = dag_tasks(load("continuous").pipeline_spec)
    cached = {name for name, task in tasks.items() if task.caching_options.enable_cache}
    assert cached == {"transform", "train"}


@pytest.mark.parametrize("name", ["training", "continuous"])
def test_platform_config_mounts_home_secrets_and_gpu_scheduling(name):
    docs = list(yaml.safe_load_all((COMPILED_DIR / f"{name}.yaml").read_text()))
    assert len(docs) == 2, "the kfp-kubernetes platform config is missing: recompile with kfp-kubernetes installed"
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{step}" for step in dag_tasks(load(name).pipeline_spec) if "-" not in step}
    for executor, config in executors.items():
        (mount,) = config["pvcMount"]
        assert mount["mountPath"] == "/var/lib/kubeloop"
        assert mount["pvcNameParameter"]["componentInputParameter"].endswith("kubeloop_home_pvc"), executor
        gpu_step = executor in ("exec-train", "exec-evaluate")
        assert ("nodeSelector" in config) == gpu_step and ("tolerations" in config) == gpu_step, executor
        assert ("secretAsEnv" in config) == (executor == "exec-ingest"), executor
    (secret,) = executors["exec-ingest"]["secretAsEnv"]
    assert secret["secretName"] == "kubeloop-storage" and secret["optional"] is True
    assert executors["exec-train"]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "gpu_node_selector"


def test_compiled_yaml_is_fresh():
    # without kfp-kubernetes (the `pipelines` extra) check() raises MissingDependency, saying what to install
    assert check() == []


def test_check_names_a_stale_or_missing_file(tmp_path):
    (tmp_path / "training.yaml").write_text((COMPILED_DIR / "training.yaml").read_text() + "# edited\n")
    problems = check(tmp_path)
    assert len(problems) == 2
    assert "training.yaml is stale" in problems[0] and "continuous.yaml is missing" in problems[1]


def test_normalize_sorts_the_header_defaults_that_kfp_prints_in_hash_order():
    one = "# Inputs:\n#    job: dict [Default: {'b': 1.0, 'a': {'d': 2.0, 'c': 3.0}}]\ncomponents: {}\n"
    other = "# Inputs:\n#    job: dict [Default: {'a': {'c': 3.0, 'd': 2.0}, 'b': 1.0}]\ncomponents: {}\n"
    assert normalize(one) == normalize(other)
    assert '{"a": {"c": 3.0, "d": 2.0}, "b": 1.0}' in normalize(one)


# --- the steps' own logic -------------------------------------------------------------------------------------


def test_resolve_job_applies_the_run_overrides():
    job = steps.resolve_job(
        {**DEFAULT_TRAINING_JOB, "spec": {**DEFAULT_TRAINING_JOB["spec"]}}, "/data/new.csv", {"rocAuc": 0.99}
    )
    assert job.spec.dataset.uri == "/data/new.csv"
    assert job.spec.gate.thresholds.roc_auc == 0.99 and job.spec.gate.thresholds.accuracy == 0.7
    assert DEFAULT_TRAINING_JOB["spec"]["gate"]["thresholds"]["rocAuc"] == 0.6, "the default is not modified"
    # ints arrive as floats from KFP's Struct parameters
    floats = copy.deepcopy(DEFAULT_TRAINING_JOB)
    floats["spec"]["hyperparameters"]["epochs"] = 8.0
    assert steps.resolve_job(floats).spec.hyperparameters.epochs == 8
    with pytest.raises(SpecError, match=r"(?s)training_job.*spec.gate.thresholds.rocAuc: Input should be less than"):
        steps.resolve_job(DEFAULT_TRAINING_JOB, "", {"rocAuc": 7})
    with pytest.raises(SpecError, match="expected kind TrainingJob"):
        steps.resolve_job(
            {
                "apiVersion": "kubeloop.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "x"},
                "spec": {"model": "arrests", "version": 1},
            }
        )


def test_resolve_runner(monkeypatch):
    monkeypatch.delenv(steps.RUNNER_ENV, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert steps.resolve_runner("auto") == "local"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert steps.resolve_runner("auto") == "cluster"
    assert steps.resolve_runner("local") == "local"
    monkeypatch.setenv(steps.RUNNER_ENV, "local")
    assert steps.resolve_runner("auto") == "local"
    with pytest.raises(SpecError, match="runner: 'ray'"):
        steps.resolve_runner("ray")


def test_metric_values_flatten_overall_and_slices_and_skip_undefined():
    def metrics(auc):
        return Metrics(rows=10, positive_rate=0.5, accuracy=0.8, precision=0.7, recall=0.6, roc_auc=auc, log_loss=0.4)

    evaluation = Evaluation(
        overall=metrics(0.75),
        slices=SliceMetrics(column="colour", values={"Black": metrics(None), "White": metrics(0.8)}),
    )
    values = steps._metric_values(evaluation)
    assert values["rocAuc"] == 0.75 and values["logLoss"] == 0.4 and values["rows"] == 10.0
    assert values["colour=White/rocAuc"] == 0.8
    assert "colour=Black/rocAuc" not in values and values["colour=Black/accuracy"] == 0.8


DEPLOYMENT = """\
apiVersion: kubeloop.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: arrests
spec:
  model: arrests
  version: 1
  canary:
    version: 2
    trafficPercent: 50
    analysis:
      steps: [20, 100]
      interval: 10s
"""


def test_set_canary_in_file_writes_the_canary_and_keeps_its_analysis(tmp_path):
    path = tmp_path / "md.yaml"
    path.write_text(DEPLOYMENT)
    assert steps.set_canary_in_file(path, "arrests", 3, 10) == str(path)
    (deployment,) = [ModelDeployment.model_validate(doc) for doc in yaml.safe_load_all(path.read_text())]
    assert deployment.spec.version == 1
    assert deployment.spec.canary.version == 3 and deployment.spec.canary.traffic_percent == 10
    assert deployment.spec.canary.analysis.steps == [20, 100] and deployment.spec.canary.analysis.interval == "10s"

    with pytest.raises(SpecError, match="serves model 'arrests', not 'other'"):
        steps.set_canary_in_file(path, "other", 3, 10)
    with pytest.raises(SpecError, match="already serves arrests v1 as stable"):
        steps.set_canary_in_file(path, "arrests", 1, 10)
    with pytest.raises(SpecError, match=r"spec.canary.trafficPercent: Input should be less than or equal to 100"):
        steps.set_canary_in_file(path, "arrests", 4, 101)
    assert ModelDeployment.model_validate(yaml.safe_load(path.read_text())).spec.canary.version == 3


def test_parse_version_name():
    assert steps.parse_version_name("arrests-v12") == ("arrests", 12)
    assert steps.parse_version_name("my-model-v3") == ("my-model", 3)
    with pytest.raises(KubeloopError, match="not a ModelVersion name"):
        steps.parse_version_name("arrests")


# --- the cluster side, against the in-memory Kubernetes API -------------------------------------------------------


def job() -> TrainingJob:
    resolved = steps.resolve_job(DEFAULT_TRAINING_JOB)
    resolved.spec.dataset.digest = "sha256:" + "a" * 64
    return resolved


def operator_writes(kube: FakeKube, phases: list[dict]) -> Callable[[float], None]:
    """A `sleep` during which the operator writes the TrainingJob's next status."""

    def sleep(_: float) -> None:
        kube.find("TrainingJob", cluster_steps.trainingjob_name(job()))["status"] = phases.pop(0)

    return sleep


def test_run_trainingjob_creates_the_resource_and_waits_for_success():
    kube, slept = FakeKube(), []
    writes = operator_writes(kube, [{"phase": "Running"}, {"phase": "Succeeded", "modelVersion": "arrests-v4"}])
    done = cluster_steps.run_trainingjob(
        job(), kube=kube, namespace="ml", sleep=lambda s: slept.append(s) or writes(s), poll_s=5
    )
    assert done["status"]["modelVersion"] == "arrests-v4"
    assert len(slept) == 2
    name = cluster_steps.trainingjob_name(job())
    assert kube.writes == [("create", "TrainingJob", name)]
    body = kube.find("TrainingJob", name)
    assert (body["apiVersion"], body["metadata"]["namespace"]) == ("kubeloop.dev/v1alpha1", "ml")
    assert body["spec"]["dataset"]["digest"] == "sha256:" + "a" * 64, "the TrainingJob trains on the pinned snapshot"
    assert body["spec"]["workers"] == {"replicas": 2, "cpu": 1, "memory": "2Gi", "gpu": 0, "allowCpuFallback": False}
    TrainingJob.model_validate({k: v for k, v in body.items() if k != "status"})


def test_run_trainingjob_adopts_an_existing_job_and_reports_failure():
    kube = FakeKube()
    existing = job().to_manifest()
    existing["metadata"] = {"name": cluster_steps.trainingjob_name(job()), "namespace": "ml"}
    existing["status"] = {"phase": "Failed", "message": "RayJob failed: OOMKilled"}
    kube.put(existing)
    with pytest.raises(KubeloopError, match="failed: RayJob failed: OOMKilled"):
        cluster_steps.run_trainingjob(job(), kube=kube, namespace="ml", sleep=lambda _: None)
    assert kube.writes == []


def test_run_trainingjob_times_out():
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    kube = FakeKube()
    with pytest.raises(KubeloopError, match="not finished after 30s"):
        cluster_steps.run_trainingjob(
            job(), kube=kube, namespace="ml", timeout_s=30, poll_s=10, sleep=sleep, clock=lambda: now[0]
        )


def test_trainingjob_name_follows_the_spec():
    first, changed = job(), job()
    changed.spec.hyperparameters.epochs = 3
    assert cluster_steps.trainingjob_name(first) == cluster_steps.trainingjob_name(job())
    assert cluster_steps.trainingjob_name(first) != cluster_steps.trainingjob_name(changed)
    first.metadata.name = "x" * 47
    assert name_is_valid(cluster_steps.trainingjob_name(first))


def test_set_canary_patches_the_modeldeployment():
    kube, deployment = FakeKube(), yaml.safe_load(DEPLOYMENT)
    deployment["metadata"]["namespace"] = "ml"
    kube.put({**deployment, "status": {"ready": True}})
    assert cluster_steps.set_canary("ml/arrests", "arrests", 5, 10, kube=kube) == "ml/arrests"
    ((kind, name, subresource, body),) = kube.patches
    assert (kind, name, subresource) == ("ModelDeployment", "arrests", None)
    assert body["spec"]["canary"]["version"] == 5 and body["spec"]["canary"]["trafficPercent"] == 10
    assert body["spec"]["canary"]["analysis"]["steps"] == [20, 100]


def test_components_only_call_into_steps():
    """No step logic in the compiled YAML: each embedded component body is a call into pipelines.steps."""
    import inspect

    from pipelines import components as c

    for name in ("ingest", "validate", "transform", "train", "evaluate", "register", "deploy"):
        source = inspect.getsource(getattr(c, name).python_func)
        body = [line.strip() for line in source.split('"""')[-1].splitlines() if line.strip()]
        assert body[0] == "from pipelines import steps", name
        assert len(body) == 2 and f"steps.{name}(" in body[1], (name, body)


def test_run_local_rejects_an_unknown_pipeline():
    from pipelines.local import run_local

    with pytest.raises(SpecError, match="unknown pipeline 'nightly': known are training, continuous"):
        run_local("nightly")


def test_step_failure_is_recorded_for_run_local(tmp_path, monkeypatch):
    monkeypatch.setenv(steps.RECORD_ENV, str(tmp_path))
    artifact = SimpleNamespace(path=str(tmp_path / "dataset"), metadata={})
    with pytest.raises(KubeloopError):
        steps.ingest(DEFAULT_TRAINING_JOB, str(tmp_path / "missing.csv"), {}, artifact)
    record = yaml.safe_load((tmp_path / "ingest.json").read_text())
    assert record["ok"] is False and "no such file" in record["error"]
    assert Path(record["error"].split("no such file: ")[1]).name == "missing.csv"


@pytest.mark.parametrize(("gate", "deploys"), [("passed", True), ("failed", False)])
def test_local_runs_evaluate_the_compiled_gate_condition(gate, deploys):
    from kfp.local.orchestrator.enhanced_dag_orchestrator import ConditionEvaluator

    from pipelines.local import _import_kfp_local

    _import_kfp_local()
    root = load("continuous").pipeline_spec.root.dag.tasks
    (condition,) = [task.trigger_policy.condition for task in root.values() if task.trigger_policy.condition]
    outputs = SimpleNamespace(get_task_output=lambda task, key: gate if (task, key) == ("evaluate", "Output") else None)
    assert ConditionEvaluator.evaluate_condition(condition, outputs) is deploys
