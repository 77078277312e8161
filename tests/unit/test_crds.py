"""The generated CRDs: structural, up to date, and every sample valid for the models, the schema and every CEL rule
(checked as tests/support/crd_validation.py does it, like the apiserver). What both refuse: test_crd_rules.py."""

from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from kubeloop.api import KINDS, TrainingJob, load_resources
from kubeloop.api.trainingjob import Hyperparameters, TrainingJobSpec
from kubeloop.manifests import CRD_DIRS, HEADER, ManifestError, check, crd_for, generate, render_all, structural_errors
from tests.support.crd_validation import (
    REPO,
    SAMPLES,
    apply_defaults,
    cel_results,
    crd_violations,
    declared_rules,
    openapi_schema,
    samples_by_kind,
    to_jsonschema,
)

STALE = "is stale: run `kubeloop manifests generate`"


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
    assert set(samples_by_kind()) == set(KINDS)


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
