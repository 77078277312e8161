"""The drift sidecar as a real process for the integration tests: launched with its listeners on free ports, its
ready lines read, then driven over HTTP (events, /status, /metrics)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "modelversion.yaml"
WINDOW = 200
ROWS_PER_EVENT = 5
MAX_BODY = 1_000_000
START_TIMEOUT_S = 300  # alibi-detect's import: ~5 s on an idle machine, minutes on a loaded one


class Sidecar:
    def __init__(
        self, process: subprocess.Popen[str], urls: dict[str, str], stderr: Path, frame: pd.DataFrame, mv: Any
    ) -> None:
        self.process, self.stderr, self.frame, self.signature = process, stderr, frame, mv
        self.url, self.metrics_url = urls["ingest"], urls["metrics"]
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def post(self, headers: dict[str, str], body: Any) -> httpx.Response:
        return self.client.post("/", headers=headers, content=body)

    def status(self) -> dict[str, Any]:
        return self.client.get("/status").json()

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def wait_windows(self, version: int, count: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()["versions"][str(version)]
            if status["windowsEvaluated"] >= count:
                return status
            time.sleep(0.05)
        raise AssertionError(f"v{version}: {count} windows not evaluated in {timeout}s: {status}\n{self.log()}")

    def log(self) -> str:
        return self.stderr.read_text()[-3000:]

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Launched:
    """A sidecar process started, its ready lines (the listeners' URLs) read from its stdout."""

    def __init__(self, popen: subprocess.Popen[str], stderr: Path) -> None:
        self.popen, self.stderr = popen, stderr
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in popen.stdout], daemon=True).start()

    def ready(self) -> dict[str, str]:
        urls: dict[str, str] = {}
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(urls) < 2 and time.monotonic() < deadline and self.popen.poll() is None:
            try:
                match = re.match(r"drift sidecar (?:(metrics) )?on (http://\S+)", self.lines.get(timeout=1))
            except queue.Empty:
                continue
            if match:
                urls[match.group(1) or "ingest"] = match.group(2)
        if len(urls) < 2:
            self.popen.kill()
            pytest.fail(f"sidecar did not start (exit {self.popen.poll()}, {urls}):\n{self.stderr.read_text()[-3000:]}")
        return urls


def launch_sidecar(home: Path, paths: list[Path], stderr: Path) -> Launched:
    """`python -m monitoring.sidecar` on loopback with a metrics listener, KS detection on WINDOW rows, for the
    ModelVersion records at `paths` (KUBELOOP_HOME `home`), its stderr to `stderr`."""
    command = [sys.executable, "-m", "monitoring.sidecar", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    for path in paths:
        command += ["--model-version", str(path)]
    command += ["--detector", "ks", "--window", str(WINDOW), "--p-value", "0.05", "--reference-size", "2000"]
    command += ["--max-body-bytes", str(MAX_BODY)]
    env = {**os.environ, "KUBELOOP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    with stderr.open("w") as err:
        popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    return Launched(popen, stderr)
