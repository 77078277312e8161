"""What the CRDs and the pydantic models refuse: each invalid resource of crd_invalid_cases.yaml by both, naming the
field, and the CEL rules agreeing with the model validators over grids of specs (and the mode's immutability with
the webhook)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop.api import ModelDeployment, parse_resource
from kubeloop.api.modeldeployment import update_problem
from operators import admission
from tests.support.crd_validation import crd_violations, edit, named, pydantic_message, sample

INVALID: dict[str, dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "crd_invalid_cases.yaml").read_text())


def invalid_resource(case: dict[str, Any]) -> dict[str, Any]:
    """The case's resource: its kind's sample renamed, or with its spec fields set (None removes one)."""
    if "name" in case:
        return named(case["kind"], case["name"])
    changes = {path.replace(".", "__"): ... if value is None else value for path, value in case["spec"].items()}
    return edit(case["kind"], **changes)


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_resource_is_rejected_by_models_and_crd_naming_the_field(case: str) -> None:
    invalid = INVALID[case]
    doc = invalid_resource(invalid)
    message = pydantic_message(doc)
    assert message is not None, "the models accepted it"
    assert any(line.strip().startswith(invalid["models"]) for line in message.splitlines()), message
    violations = crd_violations(doc)
    source = "cel" if invalid.get("cel") else "schema"
    assert [v.source for v in violations] == [source], [str(v) for v in violations]
    assert violations[0].path == invalid["path"], str(violations[0])
    assert invalid["crd"] in violations[0].message, str(violations[0])


def test_canary_steps_order_is_checked_by_the_models_only() -> None:
    """CEL cannot compare neighbouring list items without Kubernetes' isSorted() (absent from cel-python),
    so strictly increasing steps is a model check: the operator and the CLI parse every spec with it."""
    doc = edit("ModelDeployment", canary={"version": 2, "analysis": {"steps": [50, 10]}})
    assert "spec.canary.analysis.steps: steps must increase strictly, got [50, 10]" in (pydantic_message(doc) or "")
    assert crd_violations(doc) == []


# --- the CEL rules and the pydantic validators agree ---------------------------------------------------


def test_modeldeployment_cel_rules_agree_with_the_model_validators() -> None:
    grid = itertools.product(["Standard", "Knative", None], ["cpu", "rps", "concurrency", None], [0, 1, 3], [1, 2])
    for mode, metric, low, high in grid:
        for canary in (None, 1, 2):
            changes: dict[str, Any] = {"autoscaling": {"minReplicas": low, "maxReplicas": high}}
            if metric:
                changes["autoscaling"]["metric"] = metric
            changes["deploymentMode"] = mode if mode else ...
            if canary:
                changes["canary"] = {"version": canary}
            doc = edit("ModelDeployment", **changes)
            accepted_by_models = pydantic_message(doc) is None
            accepted_by_crd = not crd_violations(doc)
            assert accepted_by_models == accepted_by_crd, (
                changes,
                pydantic_message(doc),
                crd_violations(doc),
            )


def test_autoscaling_target_rule_agrees_with_the_model_validator() -> None:
    """KServe v0.20's HPA check (validateScalingHPACompExtension) refuses a scaleTarget above 100 whatever the
    metric it scales on; kubeloop sends cpu and memory to the HPA (Standard, or Knative's hpa class) and concurrency
    and rps to Knative's KPA, which has no upper bound."""
    grid = itertools.product(["Standard", "Knative", None], ["cpu", "memory", "concurrency", "rps", None])
    for (mode, metric), target in itertools.product(grid, [1, 80, 100, 101, 1000, None]):
        scaling: dict[str, Any] = {"minReplicas": 1, "maxReplicas": 2}
        if metric:
            scaling["metric"] = metric
        if target:
            scaling["target"] = target
        doc = edit("ModelDeployment", deploymentMode=mode if mode else ..., autoscaling=scaling)
        accepted_by_models = pydantic_message(doc) is None
        assert accepted_by_models == (not crd_violations(doc)), (mode, metric, target, crd_violations(doc))
        utilization = metric in ("cpu", "memory", None)
        knative_metric = metric in ("concurrency", "rps")
        assert accepted_by_models == (
            not (utilization and (target or 80) > 100) and (mode == "Knative" or not knative_metric)
        )


def test_trainingjob_name_rule_agrees_with_the_model_validator() -> None:
    """KubeRay's ValidateRayJobMetadata: at most 47 characters, and IsDNS1035Label."""
    names = ["a", "ab", "a-b", "a1", "abc-123", "a" * 47, "a" * 46 + "1", "a" * 48, "1a", "a.b", "a_b", "A", "a-"]
    for name in names:
        doc = named("TrainingJob", name)
        accepted_by_models = pydantic_message(doc) is None
        assert accepted_by_models == (not crd_violations(doc)), (name, crd_violations(doc))
        kuberay = len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None
        assert accepted_by_models == kuberay, name


def test_deployment_mode_is_immutable_in_the_crd_the_models_and_the_webhook() -> None:
    """A transition rule (self == oldSelf) on the defaulted field: leaving the field out means Standard, on create
    and on update alike, so dropping an explicit Knative is a change too; KServe refuses any change of the mode."""
    for before, after in itertools.product(["Standard", "Knative", None], repeat=2):
        old = edit("ModelDeployment", deploymentMode=before if before else ...)
        new = edit("ModelDeployment", deploymentMode=after if after else ...)
        changed = (before or "Standard") != (after or "Standard")
        violations = crd_violations(new, old=old)
        if changed:
            assert [(v.path, v.source) for v in violations] == [("spec.deploymentMode", "cel")], violations
            assert "deploymentMode cannot be changed" in violations[0].message
        else:
            assert violations == []
        old_md, new_md = parse_resource(old), parse_resource(new)
        assert isinstance(old_md, ModelDeployment) and isinstance(new_md, ModelDeployment)
        assert (update_problem(old_md.spec, new_md.spec) is not None) == changed
        problem = admission.problems(new, old)
        assert (problem is not None) == changed
        if changed:
            assert "spec.deploymentMode cannot be changed" in problem
        assert crd_violations(new) == []  # creating either is fine


def test_trainingjob_cel_rule_agrees_with_the_model_validator() -> None:
    for backend, gpu, workers in itertools.product(["auto", "gloo", "nccl", None], [0, 1, None], [True, False]):
        doc = sample("TrainingJob")
        spec = doc["spec"]
        if backend is None:
            spec.pop("backend")
        else:
            spec["backend"] = backend
        if not workers:
            spec.pop("workers")
        elif gpu is None:
            spec["workers"].pop("gpu")
        else:
            spec["workers"]["gpu"] = gpu
        accepted_by_models = pydantic_message(doc) is None
        assert accepted_by_models == (not crd_violations(doc)), (backend, gpu, workers)
        assert accepted_by_models == (backend != "nccl" or (workers and gpu == 1))


def test_task_and_positive_class_rules_agree_with_the_model_validator() -> None:
    """binary (the default) needs positiveClass; multiclass and regression refuse it: in the CRD and the models."""
    for task, positive in itertools.product(["binary", "multiclass", "regression", None], ["Yes", 1, None]):
        doc = sample("TrainingJob")
        spec = doc["spec"]
        spec.pop("gate")  # the sample's AUC gate is binary-only, a rule of the models alone
        if task is not None:
            spec["task"] = task
        if positive is None:
            spec["dataset"].pop("positiveClass")
        else:
            spec["dataset"]["positiveClass"] = positive
        accepted_by_models = pydantic_message(doc) is None
        assert accepted_by_models == (not crd_violations(doc)), (task, positive)
        assert accepted_by_models == ((task in ("binary", None)) == (positive is not None)), (task, positive)
