"""Checking a resource against a generated CRD the way the apiserver does, as far as Python can: defaults from the
schema applied, the openAPIV3Schema validated with jsonschema (Draft 4, after translating the Kubernetes
extensions), and every x-kubernetes-validations rule evaluated with cel-python at its node. And the samples
(manifests/samples/) to start from, edited field by field.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

from kubeloop.api import KINDS, parse_resource
from kubeloop.errors import SpecError
from kubeloop.manifests import crd_for

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "manifests" / "samples").glob("*.yaml"))


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
def samples_by_kind() -> dict[str, dict[str, Any]]:
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
    return copy.deepcopy(samples_by_kind()[kind])


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
