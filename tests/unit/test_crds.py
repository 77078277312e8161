"""The generated CRDs: structural, up to date, and agreeing with the pydantic models on what is valid.

A resource is checked against a CRD the way the apiserver does it, as far as Python can: defaults from
the schema applied, the openAPIV3Schema validated with jsonschema (Draft 4, after translating the
Kubernetes extensions), and every x-kubernetes-validations rule evaluated with cel-python at its node.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import celpy
import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from kubeloop.api import KINDS, ModelDeployment, TrainingJob, load_resources, parse_resource
from kubeloop.api.modeldeployment import update_problem
from kubeloop.api.trainingjob import Hyperparameters, TrainingJobSpec
from kubeloop.errors import SpecError
from kubeloop.manifests import (
    CRD_DIRS,
    HEADER,
    ManifestError,
    check,
    crd_for,
    generate,
    render_all,
    structural_errors,
)
from operators import admission

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
STALE = "is stale: run `kubeloop manifests generate`"


# --- validating like the apiserver -------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    path: str  # spec.workers.replicas
    message: str
    source: str  # "schema" or "cel"

    def __str__(self) -> str:
        return f"{self.path}: {self.message} ({self.source})"


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema node as Draft 4 JSON Schema: nullable and int-or-string made explicit, and unknown
    fields rejected where they are not preserved (kubectl's default strict field validation)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_jsonschema(value)
        elif key not in ("nullable", "default", "description") and not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]  # pattern applies to strings, minimum to integers, as in Go
    if node.get("nullable") and "type" in out:
        out["type"] = [*out["type"], "null"] if isinstance(out["type"], list) else [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: absent fields with a default get it, recursively (value is changed in place)."""
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        if isinstance(node.get("additionalProperties"), dict):
            for item in value.values():
                apply_defaults(node["additionalProperties"], item)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            apply_defaults(node["items"], item)
    return value


@functools.cache
def cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


NO_OLD = object()  # a create, or a node with no old value to correlate with


def cel_results(
    node: dict[str, Any], value: Any, path: str = "", old: Any = NO_OLD
) -> list[tuple[str, dict[str, Any], bool]]:
    """(path, rule, passed) for every x-kubernetes-validations rule reached by the value.

    A transition rule (one that reads oldSelf) runs only where the old object has a value at the same path
    (an update), as in the apiserver; list items are not correlated (none of ours is a map list)."""
    if value is None:
        return []
    results = []
    for rule in node.get("x-kubernetes-validations", []):
        bindings = {"self": celpy.json_to_cel(value)}
        if "oldSelf" in rule["rule"]:
            if old is NO_OLD or old is None:
                continue
            bindings["oldSelf"] = celpy.json_to_cel(old)
        try:
            result = cel_program(rule["rule"]).evaluate(bindings)
        except celpy.CELEvalError:  # an evaluation error fails the rule, as in the apiserver
            result = None
        results.append((path, rule, isinstance(result, celpy.celtypes.BoolType) and bool(result)))
    join = (lambda name: f"{path}.{name}") if path else (lambda name: name)

    def old_of(key: str) -> Any:
        return old.get(key, NO_OLD) if isinstance(old, dict) else NO_OLD

    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                results += cel_results(sub, value[name], join(name), old_of(name))
        if isinstance(node.get("additionalProperties"), dict):
            for key, item in value.items():
                results += cel_results(node["additionalProperties"], item, join(key), old_of(key))
    elif isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            results += cel_results(node["items"], item, f"{path}[{index}]")
    return results


@functools.cache
def crd_schema_and_validator(cls: type) -> tuple[dict[str, Any], jsonschema.Draft4Validator]:
    schema = openapi_schema(crd_for(cls))
    return schema, jsonschema.Draft4Validator(to_jsonschema(schema))


def crd_violations(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[Violation]:
    """What the apiserver (with kubectl's strict field validation) would reject in obj, by field path: created,
    or replacing old (both defaulted, as the apiserver defaults what it reads from etcd)."""
    schema, validator = crd_schema_and_validator(KINDS[obj["kind"]])
    obj = apply_defaults(schema, copy.deepcopy(obj))
    found = [
        Violation(".".join(str(part) for part in error.absolute_path), error.message, "schema")
        for error in validator.iter_errors(obj)
    ]
    previous = NO_OLD if old is None else apply_defaults(schema, copy.deepcopy(old))
    for path, rule, passed in cel_results(schema, obj, old=previous):
        if not passed:
            field = rule.get("fieldPath", "").lstrip(".")
            found.append(Violation(f"{path}.{field}" if field else path, rule["message"], "cel"))
    return found


def pydantic_message(obj: dict[str, Any]) -> str | None:
    try:
        parse_resource(obj, "test")
    except SpecError as error:
        return str(error)
    return None


@functools.cache
def _samples_by_kind() -> dict[str, dict[str, Any]]:
    """The sample named after each kind (trainingjob.yaml, …); other samples of a kind show its variants."""
    docs = {path.stem: yaml.safe_load(path.read_text()) for path in SAMPLES}
    return {kind: docs[kind.lower()] for kind in KINDS}


def declared_rules(node: Any) -> list[dict[str, Any]]:
    """Every x-kubernetes-validations rule in a schema (a property may be named `rule`: walk, do not grep)."""
    if isinstance(node, list):
        return [rule for item in node for rule in declared_rules(item)]
    if not isinstance(node, dict):
        return []
    own = list(node.get("x-kubernetes-validations", []))
    return own + [
        rule for key, sub in node.items() if key != "x-kubernetes-validations" for rule in declared_rules(sub)
    ]


def sample(kind: str) -> dict[str, Any]:
    return copy.deepcopy(_samples_by_kind()[kind])


# --- the generated files ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(KINDS.values()), ids=list(KINDS))
def test_crd_is_structural_with_status_and_printer_columns(cls: type) -> None:
    crd = crd_for(cls)
    assert structural_errors(openapi_schema(crd)) == []
    assert crd["metadata"]["name"] == f"{cls.PLURAL}.kubeloop.dev"
    spec = crd["spec"]
    assert spec["group"] == "kubeloop.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == cls.KIND and spec["names"]["categories"] == ["kubeloop"]
    assert spec["names"]["shortNames"] == sorted(cls.SHORT_NAMES)
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == [c.name for c in cls.PRINTER_COLUMNS]
    assert all(c["jsonPath"].startswith((".spec.", ".status.", ".metadata.")) for c in columns)
    schema = openapi_schema(crd)
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["properties"]["apiVersion"]["type"] == schema["properties"]["kind"]["type"] == "string"
    assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    assert schema["required"] == ["spec"]


def test_printer_column_paths_exist_in_the_schema() -> None:
    for cls in KINDS.values():
        schema = openapi_schema(crd_for(cls))
        for column in cls.PRINTER_COLUMNS:
            node = schema
            for part in column.json_path.lstrip(".").split("."):
                node = node["properties"][part] if node.get("properties") else {"type": "object"}
            assert node["type"] in {"string", "integer", "number", "boolean", "object"}, column.json_path


def test_schema_translation_details() -> None:
    schema = openapi_schema(crd_for(TrainingJob))
    spec = schema["properties"]["spec"]
    workers = spec["properties"]["workers"]["properties"]
    # int-or-string: no type, the quantity pattern for strings, the minimum for integers, the default kept
    assert "type" not in workers["cpu"] and workers["cpu"]["x-kubernetes-int-or-string"] is True
    assert workers["cpu"]["default"] == 1 and workers["memory"]["default"] == "2Gi"
    assert "pattern" in workers["memory"] and workers["memory"]["minimum"] == 0
    # 2020-12 exclusive bounds become OpenAPI v3 booleans
    rate = spec["properties"]["hyperparameters"]["properties"]["learningRate"]
    assert (rate["minimum"], rate["exclusiveMinimum"], rate["maximum"]) == (0, True, 10)
    # Optional[X] -> X with nullable, no null default
    digest = spec["properties"]["dataset"]["properties"]["digest"]
    assert digest["type"] == "string" and digest["nullable"] is True and "default" not in digest
    # maps keep additionalProperties; free-form maps are preserved, not pruned
    status = schema["properties"]["status"]["properties"]
    assert status["metrics"] == {"type": "object", "additionalProperties": {"type": "number"}}
    params = spec["properties"]["model"]["properties"]["params"]
    assert params["x-kubernetes-preserve-unknown-fields"] is True and "additionalProperties" not in params
    # CEL rules where the model declares them
    paths = [rule["fieldPath"] for rule in spec["x-kubernetes-validations"]]
    assert paths == [".backend", ".dataset.positiveClass", ".dataset.positiveClass"]
    text = yaml.safe_dump(schema)
    for absent in ("$ref", "$defs", "anyOf", "title", "const", "examples"):  # as keys: enum values may hold them
        assert f"{absent}:" not in text


def test_every_default_is_valid_for_its_node() -> None:
    """The apiserver rejects a CRD whose defaults do not validate against their own schema."""

    def walk(node: dict[str, Any], path: str) -> None:
        if "default" in node:
            without = {key: value for key, value in node.items() if key != "default"}
            errors = list(jsonschema.Draft4Validator(to_jsonschema(without)).iter_errors(node["default"]))
            assert not errors, f"{path}: default {node['default']!r}: {errors[0].message}"
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    for cls in KINDS.values():
        walk(openapi_schema(crd_for(cls)), cls.KIND)


def test_structural_errors_finds_what_the_apiserver_rejects() -> None:
    bad = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "a": {"$ref": "#/$defs/A"},
            "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "c": {"description": "untyped"},
            "d": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": {}},
            "e": {"type": "string", "const": "x"},
            "f": {"type": "number", "exclusiveMinimum": 0},
            "g": {"type": "integer", "x-kubernetes-int-or-string": True},
        },
    }
    errors = "\n".join(structural_errors(bad))
    for expected in (
        "properties.metadata: must be only {type: object}",
        "properties.a: $ref is not allowed",
        "properties.b: anyOf is not allowed",
        "properties.c: no type",
        "properties.d: additionalProperties and properties are mutually exclusive",
        "properties.e: 'const' is not a CRD schema keyword",
        "properties.f: exclusiveMinimum must be a boolean",
        "properties.g: x-kubernetes-int-or-string must not have a type",
    ):
        assert expected in errors
    allowed = {
        "type": "object",
        "properties": {
            "q": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "free": {"x-kubernetes-preserve-unknown-fields": True},
        },
    }
    assert structural_errors(allowed) == []


def test_a_union_the_crd_cannot_express_is_refused() -> None:
    class Odd(BaseModel):
        value: int | list[str]

    class OddResource(TrainingJob):
        spec: Odd  # type: ignore[assignment]

    with pytest.raises(ManifestError, match=r"spec\.value: a union"):
        crd_for(OddResource)


def test_render_all_is_deterministic_and_identical_in_both_folders() -> None:
    files = render_all()
    assert files == render_all()
    by_plural = {cls.PLURAL: cls for cls in KINDS.values()}
    plurals = sorted(by_plural)
    assert sorted(files) == sorted(folder / f"{p}.kubeloop.dev.yaml" for folder in CRD_DIRS for p in plurals)
    for plural in plurals:
        texts = {files[folder / f"{plural}.kubeloop.dev.yaml"] for folder in CRD_DIRS}
        assert len(texts) == 1
        (text,) = texts
        assert text.startswith(HEADER)
        assert yaml.safe_load(text) == crd_for(by_plural[plural])


def test_generated_files_in_the_repo_are_up_to_date() -> None:
    assert check(REPO) == []


def write_rendered(root: Path) -> None:
    for relative, text in render_all().items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def test_check_names_the_files_a_model_change_made_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_rendered(tmp_path)
    assert check(tmp_path) == []

    # The model changes (a new hyperparameter) and nobody regenerates.
    class NewHyperparameters(Hyperparameters):
        warmup_epochs: Annotated[int, Field(ge=0)] = 0

    class NewSpec(TrainingJobSpec):
        hyperparameters: NewHyperparameters = Field(default_factory=NewHyperparameters)

    class NewTrainingJob(TrainingJob):
        spec: NewSpec

    NewTrainingJob.__doc__ = sys.modules[TrainingJob.__module__].__doc__
    before = (tmp_path / "manifests/crds/trainingjobs.kubeloop.dev.yaml").read_text()
    monkeypatch.setitem(KINDS, "TrainingJob", NewTrainingJob)

    assert check(tmp_path) == [
        f"helm/kubeloop/crds/trainingjobs.kubeloop.dev.yaml {STALE}",
        f"manifests/crds/trainingjobs.kubeloop.dev.yaml {STALE}",
    ]
    after = render_all()[Path("manifests/crds/trainingjobs.kubeloop.dev.yaml")]
    changed = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed and all(line.startswith("+") for line in changed)
    assert "warmupEpochs:" in "\n".join(changed)

    written = generate(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "helm/kubeloop/crds/trainingjobs.kubeloop.dev.yaml",
        "manifests/crds/trainingjobs.kubeloop.dev.yaml",
    ]
    assert check(tmp_path) == [] and generate(tmp_path) == []


def test_check_reports_missing_and_orphaned_files_and_generate_fixes_them(tmp_path: Path) -> None:
    write_rendered(tmp_path)
    (tmp_path / "manifests/crds/modelversions.kubeloop.dev.yaml").unlink()
    (tmp_path / "helm/kubeloop/crds/oldthings.kubeloop.dev.yaml").write_text("# a removed kind\n")
    (tmp_path / "manifests/crds/kustomization.yaml").write_text("resources: []\n")  # not ours: left alone
    assert check(tmp_path) == [
        "manifests/crds/modelversions.kubeloop.dev.yaml is missing: run `kubeloop manifests generate`",
        "helm/kubeloop/crds/oldthings.kubeloop.dev.yaml is not generated from any kind in kubeloop/api: "
        "run `kubeloop manifests generate` to remove it",
    ]
    generate(tmp_path)
    assert check(tmp_path) == []
    assert not (tmp_path / "helm/kubeloop/crds/oldthings.kubeloop.dev.yaml").exists()
    assert (tmp_path / "manifests/crds/kustomization.yaml").exists()


# --- samples ----------------------------------------------------------------------------------------


def test_there_is_a_sample_of_every_kind() -> None:
    assert {yaml.safe_load(p.read_text())["kind"] for p in SAMPLES} == set(KINDS)
    assert set(_samples_by_kind()) == set(KINDS)


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_is_valid_for_the_models_the_schema_and_every_cel_rule(path: Path) -> None:
    (resource,) = load_resources(path)
    doc = yaml.safe_load(path.read_text())
    assert crd_violations(doc) == []
    assert crd_violations(doc, old=doc) == []  # an update that changes nothing
    schema = openapi_schema(crd_for(KINDS[doc["kind"]]))
    defaulted = apply_defaults(schema, copy.deepcopy(doc))
    results = cel_results(schema, defaulted, old=defaulted)
    declared = len(declared_rules(schema))
    assert len(results) == declared  # the sample, updated, reaches every rule of its kind (transition rules too)
    assert declared > 0 or doc["kind"] == "ModelVersion"  # ModelVersion has no cross-field rule
    assert all(passed for _, _, passed in results), [rule for _, rule, passed in results if not passed]
    # The CRD's defaults are the models' defaults: the defaulted object parses to the same resource.
    assert type(resource).model_validate(apply_defaults(schema, copy.deepcopy(doc))) == resource


# --- invalid resources: rejected by the models and by the CRD, naming the field -----------------------


def edit(kind: str, **changes: Any) -> dict[str, Any]:
    """The sample of kind, with spec fields set by dotted path (a value of ... deletes the field)."""
    doc = sample(kind)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = doc["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(leaf)
        else:
            node[leaf] = value
    return doc


def named(kind: str, name: str) -> dict[str, Any]:
    doc = sample(kind)
    doc["metadata"]["name"] = name
    return doc


@dataclass
class Invalid:
    doc: dict[str, Any]
    pydantic: str  # a line of the SpecError
    path: str  # the CRD violation's field path
    crd: str  # in its message
    source: str = "schema"


INVALID: dict[str, Callable[[], Invalid]] = {
    "negative workers": lambda: Invalid(
        edit("TrainingJob", workers__replicas=-2),
        "spec.workers.replicas: Input should be greater than or equal to 1",
        "spec.workers.replicas",
        "-2 is less than the minimum of 1",
    ),
    "unknown backend": lambda: Invalid(
        edit("TrainingJob", backend="mpi"),
        "spec.backend: Input should be 'auto', 'gloo' or 'nccl'",
        "spec.backend",
        "'mpi' is not one of ['auto', 'gloo', 'nccl']",
    ),
    "nccl without GPUs": lambda: Invalid(
        edit("TrainingJob", backend="nccl"),
        "spec.backend: nccl needs GPUs",
        "spec.backend",
        "backend nccl needs GPUs",
        source="cel",
    ),
    "nccl with GPU count left to the default": lambda: Invalid(
        edit("TrainingJob", backend="nccl", workers__gpu=...),
        "spec.backend: nccl needs GPUs",
        "spec.backend",
        "backend nccl needs GPUs",
        source="cel",
    ),
    "cpu not a quantity": lambda: Invalid(
        edit("TrainingJob", workers__cpu="lots"),
        "spec.workers.cpu: 'lots' is not a Kubernetes quantity",
        "spec.workers.cpu",
        "'lots' does not match",
    ),
    "memory not a quantity": lambda: Invalid(
        edit("TrainingJob", workers__memory="2GB"),
        "spec.workers.memory: '2GB' is not a Kubernetes quantity",
        "spec.workers.memory",
        "'2GB' does not match",
    ),
    "negative cpu": lambda: Invalid(
        edit("TrainingJob", workers__cpu=-1),
        "spec.workers.cpu: must not be negative",
        "spec.workers.cpu",
        "-1 is less than the minimum of 0",
    ),
    "unknown field": lambda: Invalid(
        edit("TrainingJob", workers__gpus=1),
        "spec.workers.gpus: Extra inputs are not permitted",
        "spec.workers",
        "('gpus' was unexpected)",
    ),
    "bad model name": lambda: Invalid(
        edit("TrainingJob", model__name="Arrests_MLP"),
        "spec.model.name: String should match pattern",
        "spec.model.name",
        "'Arrests_MLP' does not match",
    ),
    "missing dataset label": lambda: Invalid(
        edit("TrainingJob", dataset__label=...),
        "spec.dataset.label: Field required",
        "spec.dataset",
        "'label' is a required property",
    ),
    "TrainingJob name starting with a digit": lambda: Invalid(
        named("TrainingJob", "1arrests"),
        "metadata.name must be a DNS-1035 label of at most 47 characters",
        "",  # a rule at the root: the apiserver reports it on the object, the message names the field
        "metadata.name must be a DNS-1035 label of at most 47 characters",
        source="cel",
    ),
    "TrainingJob name with a dot": lambda: Invalid(
        named("TrainingJob", "arrests.mlp"),
        "metadata.name must be a DNS-1035 label",
        "",
        "metadata.name must be a DNS-1035 label",
        source="cel",
    ),
    "TrainingJob name of 48 characters": lambda: Invalid(
        named("TrainingJob", "a" * 48),
        "metadata.name must be a DNS-1035 label of at most 47 characters",
        "",
        "metadata.name must be a DNS-1035 label of at most 47 characters",
        source="cel",
    ),
    "retrain trainingJob no TrainingJob can be named": lambda: Invalid(
        edit("ModelDeployment", retrain={"enabled": True, "trainingJob": "1arrests"}),
        "spec.retrain.trainingJob: String should match pattern",
        "spec.retrain.trainingJob",
        "'1arrests' does not match",
    ),
    "cpu utilization target 150": lambda: Invalid(
        edit("ModelDeployment", autoscaling__target=150),
        "spec.autoscaling.target (150) is a utilization percentage for metric cpu: at most 100",
        "spec.autoscaling.target",
        "spec.autoscaling.target is a utilization percentage for metric cpu or memory",
        source="cel",
    ),
    "memory utilization target 101 with the metric's default mode": lambda: Invalid(
        edit("ModelDeployment", deploymentMode=..., autoscaling__metric="memory", autoscaling__target=101),
        "spec.autoscaling.target (101) is a utilization percentage for metric memory: at most 100",
        "spec.autoscaling.target",
        "at most 100",
        source="cel",
    ),
    "canary version is the stable version": lambda: Invalid(
        edit("ModelDeployment", canary={"version": 1}),
        "spec.canary.version must differ from the stable spec.version",
        "spec.canary.version",
        "canary.version must differ from the stable version",
        source="cel",
    ),
    "maxReplicas below minReplicas": lambda: Invalid(
        edit("ModelDeployment", autoscaling__minReplicas=3, autoscaling__maxReplicas=2),
        "spec.autoscaling.maxReplicas (2) must be >= minReplicas (3)",
        "spec.autoscaling.maxReplicas",
        "maxReplicas must be >= minReplicas",
        source="cel",
    ),
    "rps metric in Standard mode": lambda: Invalid(
        edit("ModelDeployment", autoscaling__metric="rps"),
        "spec.autoscaling.metric rps needs deploymentMode Knative",
        "spec.autoscaling",
        "need deploymentMode Knative",
        source="cel",
    ),
    "scale to zero in Standard mode (deploymentMode defaulted)": lambda: Invalid(
        edit("ModelDeployment", deploymentMode=..., autoscaling__minReplicas=0),
        "spec.autoscaling.minReplicas 0 (scale to zero) needs deploymentMode Knative",
        "spec.autoscaling",
        "need deploymentMode Knative",
        source="cel",
    ),
    "traffic percent 150": lambda: Invalid(
        edit("ModelDeployment", canary={"version": 2, "trafficPercent": 150}),
        "spec.canary.trafficPercent: Input should be less than or equal to 100",
        "spec.canary.trafficPercent",
        "150 is greater than the maximum of 100",
    ),
    "drift window too small": lambda: Invalid(
        edit("ModelDeployment", drift__window=5),
        "spec.drift.window: Input should be greater than or equal to 20",
        "spec.drift.window",
        "5 is less than the minimum of 20",
    ),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_resource_is_rejected_by_models_and_crd_naming_the_field(case: str) -> None:
    invalid = INVALID[case]()
    message = pydantic_message(invalid.doc)
    assert message is not None, "the models accepted it"
    assert any(line.strip().startswith(invalid.pydantic) for line in message.splitlines()), message
    violations = crd_violations(invalid.doc)
    assert [v.source for v in violations] == [invalid.source], [str(v) for v in violations]
    assert violations[0].path == invalid.path, str(violations[0])
    assert invalid.crd in violations[0].message, str(violations[0])


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
