"""Shared fixtures: every test gets its own kubeloop state directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def kubeloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kubeloop-home"
    monkeypatch.setenv("KUBELOOP_HOME", str(home))
    return home
