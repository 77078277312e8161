"""The local model registry: one directory per model version holding its ModelVersion record and artifact.

Layout: <registry>/<model>/v<N>/modelversion.yaml and <registry>/<model>/v<N>/artifact/. Version numbers are
allocated by an exclusive mkdir, so two runs registering at once never share a number.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

from kubeloop import config
from kubeloop.api.common import ObjectMeta
from kubeloop.api.modelversion import ModelVersion, ModelVersionSpec, ModelVersionStatus, Stage, StageChange
from kubeloop.errors import KubeloopError

RECORD = "modelversion.yaml"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """NAME or NAME:VERSION (VERSION as 3 or v3)."""
    name, _, version = ref.partition(":")
    if not version:
        return name, None
    try:
        return name, int(version.removeprefix("v"))
    except ValueError:
        raise KubeloopError(f"{ref!r}: expected NAME or NAME:VERSION with a number, e.g. arrests:2") from None


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or config.registry_dir()

    def allocate(self, model: str) -> tuple[int, Path]:
        """Reserve the next version number of a model: returns it and its (new, empty) directory."""
        directory = self.root / model
        directory.mkdir(parents=True, exist_ok=True)
        version = max(self._versions(model), default=0) + 1
        while True:
            try:
                (directory / f"v{version}").mkdir()
                return version, directory / f"v{version}"
            except FileExistsError:
                version += 1

    def save(self, spec: ModelVersionSpec, reason: str) -> ModelVersion:
        record = ModelVersion(
            metadata=ObjectMeta(name=ModelVersion.resource_name(spec.model, spec.version)),
            spec=spec,
            status=ModelVersionStatus(stage_history=[StageChange(stage=spec.stage, time=_now(), reason=reason)]),
        )
        self._write(record)
        return record

    def get(self, model: str, version: int | None = None) -> ModelVersion:
        versions = self._versions(model)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise KubeloopError(f"no model named {model!r} in the registry at {self.root} (models: {known})")
        version = version or max(versions)
        path = self.root / model / f"v{version}" / RECORD
        if not path.is_file():
            raise KubeloopError(f"{model} has no version {version}; versions: {sorted(versions)}")
        return ModelVersion.model_validate(yaml.safe_load(path.read_text()))

    def record_path(self, model: str, version: int) -> Path:
        """The ModelVersion YAML of a version: what the serving and drift processes are started with."""
        self.get(model, version)
        return self.root / model / f"v{version}" / RECORD

    def resolve(self, ref: str) -> ModelVersion:
        return self.get(*parse_ref(ref))

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def list(self, model: str | None = None) -> list[ModelVersion]:
        names = [model] if model else self.models()
        return [self.get(name, version) for name in names for version in sorted(self._versions(name))]

    def production(self, model: str) -> ModelVersion | None:
        return next((mv for mv in self.list(model) if mv.spec.stage == "Production"), None)

    def promote(self, model: str, version: int, reason: str = "promoted") -> ModelVersion:
        """Make a version Production; the previous Production version becomes Archived."""
        target = self.get(model, version)
        if target.spec.stage == "Rejected":
            raise KubeloopError(f"{target.metadata.name} was rejected ({target.spec.stage_reason}); not promoting")
        current = self.production(model)
        if current is not None and current.spec.version != version:
            self._set_stage(current, "Archived", f"superseded by {target.metadata.name}")
        return self._set_stage(target, "Production", reason)

    def reject(self, model: str, version: int, reason: str) -> ModelVersion:
        return self._set_stage(self.get(model, version), "Rejected", reason)

    def rollback(self, model: str, reason: str = "rolled back") -> ModelVersion:
        """Archive the current Production version and restore the one that was Production before it."""
        current = self.production(model)
        if current is None:
            raise KubeloopError(f"{model} has no Production version to roll back from")
        previous = self._previous_production(model, current.spec.version)
        if previous is None:
            raise KubeloopError(f"{model}: no earlier Production version to roll back to")
        self._set_stage(current, "Archived", f"{reason}: replaced by {previous.metadata.name}")
        return self._set_stage(previous, "Production", f"{reason}: restored from {current.metadata.name}")

    def _previous_production(self, model: str, current: int) -> ModelVersion | None:
        became_production = [
            (change.time, mv)
            for mv in self.list(model)
            if mv.spec.version != current and mv.spec.stage == "Archived" and mv.status
            for change in mv.status.stage_history
            if change.stage == "Production"
        ]
        return max(became_production, key=lambda item: item[0])[1] if became_production else None

    def _set_stage(self, record: ModelVersion, stage: Stage, reason: str) -> ModelVersion:
        record.spec.stage, record.spec.stage_reason = stage, reason
        status = record.status or ModelVersionStatus()
        status.stage_history.append(StageChange(stage=stage, time=_now(), reason=reason))
        record.status = status
        self._write(record)
        return record

    def _versions(self, model: str) -> list[int]:
        directory = self.root / model
        if not directory.is_dir():
            return []
        return [int(p.name[1:]) for p in directory.iterdir() if p.name[1:].isdigit() and (p / RECORD).is_file()]

    def _write(self, record: ModelVersion) -> None:
        path = self.root / record.spec.model / f"v{record.spec.version}" / RECORD
        text = yaml.safe_dump(record.to_manifest(), sort_keys=False)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as stream:
            stream.write(text)
        os.replace(stream.name, path)


def _now() -> datetime:
    return datetime.now(UTC)
