"""Read kubeloop resources from YAML, with errors that name the file, the resource and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubeloop.api.batchprediction import BatchPrediction
from kubeloop.api.common import API_VERSION, Resource
from kubeloop.api.modeldeployment import ModelDeployment
from kubeloop.api.modelversion import ModelVersion
from kubeloop.api.trainingjob import TrainingJob
from kubeloop.errors import SpecError

KINDS: dict[str, type[Resource]] = {
    cls.KIND: cls for cls in (TrainingJob, ModelVersion, ModelDeployment, BatchPrediction)
}


def format_validation_error(error: ValidationError, what: str) -> str:
    lines = [f"{what} is invalid:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(root)"
        message = item["msg"].removeprefix("Value error, ")
        # cross-field validators name their own full field path (spec.backend: …) inside the message
        lines.append(f"  {message}" if message.startswith(f"{path}.") else f"  {path}: {message}")
    return "\n".join(lines)


def parse_resource(doc: Any, source: str = "<input>") -> Resource:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a mapping with apiVersion, kind, metadata and spec")
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if api_version != API_VERSION:
        raise SpecError(f"{source}: apiVersion must be {API_VERSION}, got {api_version!r}")
    if kind not in KINDS:
        raise SpecError(f"{source}: unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    name = (doc.get("metadata") or {}).get("name", "?")
    try:
        return KINDS[kind].model_validate(doc)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, f"{source}: {kind} {name}")) from None


def load_resources(path: str | Path) -> list[Resource]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no such file: {path}")
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not docs:
        raise SpecError(f"{path}: holds no resource")
    return [parse_resource(doc, str(path)) for doc in docs]
