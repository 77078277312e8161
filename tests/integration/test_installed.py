"""kubeloop installed, not cloned: the wheel built from pyproject.toml, installed with the locked dependencies into a
fresh environment outside the checkout, runs `kubeloop quickstart` from a directory with no repository in sight (the
samples, the bundled data and the servers' modules come from the installed packages)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import tools

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(command: list[str | Path], *, timeout: float, cwd: Path | None = None, env: dict | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{command[:3]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


def test_the_wheel_installed_outside_the_clone_runs_quickstart(tmp_path: Path) -> None:
    uv = tools.uv()
    dist = tmp_path / "dist"
    _run([uv, "build", "--wheel", "--out-dir", dist, REPO], timeout=300)
    (wheel,) = dist.glob("kubeloop-*.whl")
    requirements = tmp_path / "requirements.txt"
    _run(
        [uv, "export", "--frozen", "--all-extras", "--no-dev", "--no-emit-project", "--no-hashes", "-o", requirements],
        cwd=REPO,
        timeout=120,
    )
    # beside the uv cache, on its filesystem, so the packages are hard links and not gigabytes of copies
    cache = Path(os.environ.get("KUBELOOP_CACHE", Path.home() / ".cache" / "kubeloop"))
    with tempfile.TemporaryDirectory(prefix="wheel-test-", dir=cache) as directory:
        venv = Path(directory) / "venv"
        python = venv / "bin" / "python"
        _run([uv, "venv", "--python", sys.executable, venv], timeout=120)
        # the lock's versions exactly (its resolution applies pyproject's override), then the wheel alone
        _run([uv, "pip", "install", "--python", python, "--no-deps", "-r", requirements], timeout=900)
        _run([uv, "pip", "install", "--python", python, "--no-deps", wheel], timeout=120)

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
        env |= {"KUBELOOP_HOME": str(tmp_path / "home"), "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
        where = _run(
            [python, "-c", "import kubeloop, serving; print(kubeloop.__file__, serving.__file__)"],
            cwd=elsewhere,
            env=env,
            timeout=60,
        )
        assert str(REPO) not in where and str(venv) in where, where
        try:
            output = _run([venv / "bin" / "kubeloop", "quickstart"], cwd=elsewhere, env=env, timeout=900)
        finally:
            subprocess.run([venv / "bin" / "kubeloop", "ray", "stop"], env=env, capture_output=True, timeout=120)
    # exit 0: trained, registered, served without a failed request, calm windows quiet, the shift detected
    assert "=== kubeloop quickstart report ===" in output and "drift detected" in output, output[-3000:]
    assert (tmp_path / "home" / "registry" / "arrests" / "v1" / "modelversion.yaml").is_file()
