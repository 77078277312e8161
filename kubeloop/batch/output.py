"""A BatchPrediction's output directory, written whole or not at all.

A run writes into a staging directory beside OUTPUT (``.NAME.staging-<id>``), the lineage last, then swaps it in:
the previous OUTPUT is renamed aside, the staging directory renamed to OUTPUT, the old one deleted. On a local
filesystem both are renames, so OUTPUT is at any moment either a previous run's complete output, a complete new
one, or briefly absent; never half-written. On an object store (no rename) files are copied: there
``_lineage.json`` appears last, and a reader waits for it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import fsspec

from kubeloop import config


class StagedOutput:
    def __init__(self, uri: str) -> None:
        if "://" in uri:
            self.fs, self.path = fsspec.core.url_to_fs(uri)
        else:
            path = Path(uri).expanduser()
            self.fs, self.path = fsspec.filesystem("file"), str(path if path.is_absolute() else config.home() / path)
        self.uri = self.fs.unstrip_protocol(self.path)
        parent, name = self.path.rstrip("/").rsplit("/", 1)
        run = uuid.uuid4().hex[:12]
        self.staging = f"{parent}/.{name}.staging-{run}"
        self._old = f"{parent}/.{name}.old-{run}"

    @property
    def staging_uri(self) -> str:
        return self.fs.unstrip_protocol(self.staging)

    def create(self, *directories: str) -> None:
        for directory in ("", *directories):
            self.fs.makedirs(f"{self.staging}/{directory}".rstrip("/"), exist_ok=True)

    def keep_only(self, names: set[str]) -> int:
        """Delete the staged Parquet files not in `names` (written by an attempt that died); returns how many."""
        orphans = [
            path
            for path in self.fs.find(self.staging)
            if path.endswith(".parquet") and path[len(self.staging) + 1 :] not in names
        ]
        for path in orphans:
            self.fs.rm(path)
        return len(orphans)

    def write_json(self, name: str, document: dict[str, Any]) -> None:
        with self.fs.open(f"{self.staging}/{name}", "w") as stream:
            stream.write(json.dumps(document, indent=2) + "\n")

    def commit(self) -> None:
        if self.fs.exists(self.path):
            self.fs.mv(self.path, self._old, recursive=True)
        self.fs.mv(self.staging, self.path, recursive=True)
        if self.fs.exists(self._old):
            self.fs.rm(self._old, recursive=True)

    def discard(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
