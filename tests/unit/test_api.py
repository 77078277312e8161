"""The kubeloop.dev/v1alpha1 pydantic models: loading resources, defaults, and errors that name the field.

What the generated CRDs accept and reject (and their agreement with these models) is tested in test_crds.py and
test_crd_rules.py.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop.api import (
    API_VERSION,
    KINDS,
    ModelDeployment,
    ModelVersion,
    TrainingJob,
    load_resources,
    parse_resource,
)
from kubeloop.api.common import quantity_value
from kubeloop.api.modeldeployment import (
    MODE_IMMUTABLE,
    RejectedVersion,
    rejected_versions,
    update_problem,
    version_refusal,
)
from kubeloop.api.trainingjob import NAME_RULE
from kubeloop.errors import SpecError

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"


def doc(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / name).read_text())


def error_of(obj: Any) -> str:
    with pytest.raises(SpecError) as caught:
        parse_resource(obj, "in.yaml")
    return str(caught.value)


def test_samples_load_with_their_values() -> None:
    (job,) = load_resources(SAMPLES / "trainingjob.yaml")
    assert isinstance(job, TrainingJob)
    assert job.metadata.name == "arrests-mlp" and job.metadata.namespace == "default"
    spec = job.spec
    assert (spec.model.name, spec.dataset.uri, spec.dataset.label) == (
        "arrests",
        "bundled://arrests",
        "released",
    )
    assert (spec.dataset.positive_class, spec.dataset.slice_column) == ("Yes", "colour")
    h = spec.hyperparameters
    assert (h.epochs, h.batch_size, h.learning_rate, h.seed, h.test_fraction) == (8, 128, 0.01, 7, 0.2)
    assert (spec.workers.replicas, spec.workers.cpu, spec.workers.memory, spec.workers.gpu) == (
        2,
        1,
        "2Gi",
        0,
    )
    assert (spec.backend, spec.resolved_backend(), spec.checkpoint.every_epochs, spec.max_failures) == (
        "auto",
        "gloo",
        1,
        2,
    )
    assert (spec.gate.thresholds.roc_auc, spec.gate.thresholds.accuracy) == (0.6, 0.7)
    assert spec.gate.max_regression.roc_auc == 0.02 and spec.gate.max_regression.accuracy is None

    (deployment,) = load_resources(SAMPLES / "modeldeployment.yaml")
    assert isinstance(deployment, ModelDeployment)
    d = deployment.spec
    assert (d.model, d.version, d.canary, d.deployment_mode) == ("arrests", 1, None, "Standard")
    assert (d.drift.detector, d.drift.window) == ("ks", 200)
    a = d.autoscaling
    assert (a.min_replicas, a.max_replicas, a.metric, a.target) == (1, 3, "cpu", 80)

    (version,) = load_resources(SAMPLES / "modelversion.yaml")
    assert isinstance(version, ModelVersion)
    assert version.metadata.name == ModelVersion.resource_name(version.spec.model, version.spec.version)
    assert version.spec.lineage.dataset_rows == 5226 and version.spec.stage == "Production"
    assert set(version.spec.metrics.slices.values) == {"Black", "White"}


def test_commented_canary_in_the_sample_is_valid_when_uncommented() -> None:
    text = (SAMPLES / "modeldeployment.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("  # canary:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append("  " + line[4:])
    obj = yaml.safe_load(text)
    obj["spec"].update(yaml.safe_load("\n".join(block)))
    canary = parse_resource(obj).spec.canary
    assert canary is not None and canary.version == 2 and canary.analysis.steps == [10, 25, 50, 100]


@pytest.mark.parametrize("name", ["trainingjob.yaml", "modeldeployment.yaml", "modelversion.yaml"])
def test_to_manifest_round_trips(name: str) -> None:
    resource = parse_resource(doc(name))
    manifest = resource.to_manifest()
    assert manifest["apiVersion"] == API_VERSION and manifest["kind"] == resource.KIND
    assert parse_resource(manifest) == resource
    assert "status" not in manifest  # None fields are left out, so a manifest can be applied as is


def test_defaults_fill_a_minimal_trainingjob() -> None:
    job = parse_resource(
        {
            "apiVersion": API_VERSION,
            "kind": "TrainingJob",
            "metadata": {"name": "tiny"},
            "spec": {
                "model": {"name": "m"},
                "dataset": {"uri": "data.csv", "label": "y", "positiveClass": "1"},
            },
        }
    )
    assert isinstance(job, TrainingJob)
    assert job.spec.workers.replicas == 2 and job.spec.backend == "auto" and job.spec.resolved_backend() == "gloo"
    assert job.spec.model.builder == "kubeloop.training.models:mlp" and job.spec.model.params == {}


def test_snake_case_names_are_accepted_too() -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["hyperparameters"] = {"batch_size": 64}
    assert parse_resource(obj).spec.hyperparameters.batch_size == 64


@pytest.mark.parametrize(
    ("gpu", "backend", "resolved"), [(0, "auto", "gloo"), (1, "auto", "nccl"), (2, "gloo", "gloo")]
)
def test_resolved_backend(gpu: int, backend: str, resolved: str) -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["workers"]["gpu"] = gpu
    obj["spec"]["backend"] = backend
    assert parse_resource(obj).spec.resolved_backend() == resolved


@pytest.mark.parametrize("value", [2, "500m", "4Gi", "1.5", "250M"])
def test_quantities_accepted(value: int | str) -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["workers"]["memory"] = value
    assert parse_resource(obj).spec.workers.memory == value


@pytest.mark.parametrize("value", ["2GB", "lots", "", "1 Gi", "-500m"])
def test_quantities_rejected_naming_the_field(value: str) -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["workers"]["memory"] = value
    assert f"  spec.workers.memory: {value!r} is not a Kubernetes quantity" in error_of(obj)


@pytest.mark.parametrize("value", [-1, "-1"])  # a numeric string is read as the integer
def test_negative_quantities_rejected_naming_the_field(value: int | str) -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["workers"]["cpu"] = value
    assert "  spec.workers.cpu: must not be negative" in error_of(obj)


@pytest.mark.parametrize(
    ("cpu", "value", "ray_cpus"),
    [
        (1, "1", 1),
        ("500m", "0.5", 1),
        ("1", "1", 1),
        ("1.5", "1.5", 2),
        ("1500m", "1.5", 2),
        ("2", "2", 2),
        (8, "8", 8),
    ],
)
def test_worker_cpu_quantity_and_the_cpus_ray_train_reserves(cpu: int | str, value: str, ray_cpus: int) -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["workers"]["cpu"] = cpu
    workers = parse_resource(obj).spec.workers
    assert quantity_value(workers.cpu) == Decimal(value)
    assert workers.ray_cpus() == ray_cpus  # Ray counts a node's CPUs in whole numbers: a fraction rounds up


def test_quantity_value_of_memory_suffixes() -> None:
    assert [quantity_value(q) for q in ("4Gi", "250M", "1k", "100m")] == [
        4 * 2**30,
        250 * 10**6,
        1000,
        Decimal("0.1"),
    ]


@pytest.mark.parametrize("name", ["a", "arrests-mlp", "a1", "x" * 47, "arrests-mlp-r20260101000000"])
def test_trainingjob_names_kuberay_accepts(name: str) -> None:
    obj = doc("trainingjob.yaml")
    obj["metadata"]["name"] = name
    assert parse_resource(obj).metadata.name == name


@pytest.mark.parametrize("name", ["1arrests", "arrests.mlp", "x" * 48, "arrests-", "-arrests"])
def test_trainingjob_names_kuberay_refuses_are_rejected_naming_the_field_and_the_fix(name: str) -> None:
    obj = doc("trainingjob.yaml")
    obj["metadata"]["name"] = name
    message = error_of(obj)
    assert "metadata.name" in message
    if name.startswith("-") or name.endswith("-"):  # not even a Kubernetes name: ObjectMeta's own pattern
        return
    assert f"  {NAME_RULE} (got {name!r})" in message.splitlines()
    assert "at most 47 characters" in NAME_RULE and "rename it" in NAME_RULE


def test_retrain_names_a_trainingjob_by_the_same_rule() -> None:
    obj = doc("modeldeployment.yaml")
    obj["spec"]["retrain"] = {"enabled": True, "trainingJob": "1arrests"}
    assert "spec.retrain.trainingJob: String should match pattern" in error_of(obj)
    obj["spec"]["retrain"]["trainingJob"] = "x" * 48
    assert "spec.retrain.trainingJob: String should have at most 47 characters" in error_of(obj)


@pytest.mark.parametrize(
    ("mode", "metric", "target", "ok"),
    [
        ("Standard", "cpu", 100, True),
        ("Standard", "cpu", 101, False),
        ("Standard", "memory", 101, False),
        ("Knative", "cpu", 101, False),  # kubeloop gives cpu and memory to Knative's HPA class: the same bound
        ("Knative", "concurrency", 150, True),
        ("Knative", "rps", 500, True),
    ],
)
def test_autoscaling_target_is_bounded_where_kserve_bounds_it(mode: str, metric: str, target: int, ok: bool) -> None:
    obj = doc("modeldeployment.yaml")
    obj["spec"]["deploymentMode"] = mode
    obj["spec"]["autoscaling"].update(metric=metric, target=target)
    if ok:
        assert parse_resource(obj).spec.autoscaling.target == target
    else:
        assert error_of(obj).splitlines()[1:] == [
            f"  spec.autoscaling.target ({target}) is a utilization percentage for metric {metric}: at most 100, "
            "as KServe's HPA accepts"
        ]


def test_deployment_mode_may_not_change_on_update() -> None:
    standard = parse_resource(doc("modeldeployment.yaml"))
    assert isinstance(standard, ModelDeployment)
    knative = standard.model_copy(update={"spec": standard.spec.model_copy(update={"deployment_mode": "Knative"})})
    assert update_problem(standard.spec, standard.spec) is None
    assert update_problem(standard.spec, knative.spec) == f"spec.{MODE_IMMUTABLE} (was Standard, now Knative)"
    assert "re-create the ModelDeployment" in MODE_IMMUTABLE


def test_rejected_versions_are_refused_unless_the_spec_allows_them() -> None:
    obj = doc("modeldeployment.yaml")
    obj["spec"]["canary"] = {"version": 2}
    md = parse_resource(obj)
    assert isinstance(md, ModelDeployment) and md.spec.allow_rejected is False
    stable = parse_resource(doc("modelversion.yaml"))
    assert isinstance(stable, ModelVersion)
    canary = stable.model_copy(deep=True)
    canary.spec.version, canary.spec.stage, canary.spec.stage_reason = 2, "Rejected", None
    versions = {1: stable, 2: canary}
    assert rejected_versions(md.spec, versions) == [
        RejectedVersion("spec.canary.version", "arrests:2", "no reason recorded")
    ]
    assert version_refusal(md.spec, versions) == (
        "spec.canary.version: arrests:2 is Rejected (no reason recorded): serve a Candidate or Production version, "
        "or set spec.allowRejected: true to serve it anyway for debugging"
    )
    assert rejected_versions(md.spec, {1: stable}) == []  # a version not read is not judged here
    obj["spec"]["allowRejected"] = True
    allowed = parse_resource(obj)
    assert isinstance(allowed, ModelDeployment) and allowed.spec.allow_rejected is True
    assert version_refusal(allowed.spec, versions) is None
    assert len(rejected_versions(allowed.spec, versions)) == 1  # still said, as a warning, where it is served


def test_knative_mode_says_it_needs_knative_serving() -> None:
    description = ModelDeployment.model_json_schema(by_alias=True)["$defs"]["ModelDeploymentSpec"]["properties"][
        "deploymentMode"
    ]["description"]
    assert "needs Knative Serving installed" in description and "platform/up.sh does not install it" in description


def test_error_names_the_source_the_resource_and_every_bad_field() -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["workers"]["replicas"] = 0
    obj["spec"]["hyperparameters"]["learningRate"] = 0
    obj["spec"]["dataset"].pop("label")
    lines = error_of(obj).splitlines()
    assert lines[0] == "in.yaml: TrainingJob arrests-mlp is invalid:"
    assert sorted(lines[1:]) == [
        "  spec.dataset.label: Field required",
        "  spec.hyperparameters.learningRate: Input should be greater than 0",
        "  spec.workers.replicas: Input should be greater than or equal to 1",
    ]


def test_cross_field_errors_are_reported_once_with_their_own_path() -> None:
    obj = doc("trainingjob.yaml")
    obj["spec"]["backend"] = "nccl"
    assert error_of(obj).splitlines()[1:] == [
        "  spec.backend: nccl needs GPUs: set spec.workers.gpu >= 1, or use backend auto or gloo"
    ]
    obj = doc("modeldeployment.yaml")
    obj["spec"]["deploymentMode"] = "Knative"
    obj["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "metric": "concurrency"}
    assert parse_resource(obj).spec.autoscaling.min_replicas == 0  # scale to zero is fine on Knative


def test_wrong_api_version_kind_or_shape() -> None:
    obj = doc("trainingjob.yaml")
    assert "apiVersion must be kubeloop.dev/v1alpha1, got 'kubeloop.dev/v1'" in error_of(
        {**obj, "apiVersion": "kubeloop.dev/v1"}
    )
    assert f"unknown kind 'Pipeline'; known kinds: {', '.join(sorted(KINDS))}" in error_of({**obj, "kind": "Pipeline"})
    assert "expected a mapping" in error_of(["not", "a", "mapping"])


def test_load_resources_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_resources(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_resources(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(SpecError, match="holds no resource"):
        load_resources(empty)


def test_load_resources_reads_every_document(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text(
        (SAMPLES / "trainingjob.yaml").read_text() + "---\n" + (SAMPLES / "modeldeployment.yaml").read_text()
    )
    assert [r.KIND for r in load_resources(both)] == ["TrainingJob", "ModelDeployment"]
