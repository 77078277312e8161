"""Where kubeloop keeps its local state (snapshots, registry, Ray results): one root, set by KUBELOOP_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("KUBELOOP_HOME", Path.home() / ".kubeloop")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def snapshots_dir() -> Path:
    return home() / "snapshots"


def registry_dir() -> Path:
    return home() / "registry"


def runs_dir() -> Path:
    return home() / "runs"


def loops_dir() -> Path:
    """The embedded loop's decision histories (one JSON Lines file per run: what status.history holds in a cluster)."""
    return home() / "loops"
