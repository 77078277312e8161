"""A real Prometheus server for the embedded mode: Debian's `prometheus` binary, a generated config scraping the
local processes on loopback every `scrape_interval`, storage in a temporary directory, the alert rules loaded.

`Scraped` is what the embedded mode reads its canary signals from: this server, through the same `PrometheusSource`
and PromQL the operator uses against the cluster's Prometheus.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from kubeloop.analysis.signals import PrometheusSource, Queries
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from kubeloop.processes import free_port

log = logging.getLogger(__name__)
RULES = Path(__file__).resolve().parents[2] / "monitoring" / "rules" / "kubeloop.rules.yaml"


def binary() -> str | None:
    """The `prometheus` executable on PATH, if there is one."""
    return shutil.which("prometheus")


class EmbeddedPrometheus:
    def __init__(self, scrape_interval: str = "1s", rules: Path | None = RULES, executable: str | None = None):
        self.executable = executable or binary()
        if self.executable is None:
            raise KubeloopError(
                "the embedded mode reads its signals from a Prometheus server, and no `prometheus` executable is on "
                "PATH: install it (Debian/Ubuntu: `apt-get install prometheus`; `./dev test` installs it when run as "
                "root), or put a Prometheus 2.x binary named `prometheus` in a directory on PATH"
            )
        self.scrape_interval, self.rules = scrape_interval, rules
        self.directory = Path(tempfile.mkdtemp(prefix="kubeloop-prometheus-"))
        self.config = self.directory / "prometheus.yml"
        self.targets: dict[str, list[str]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def _write(self) -> None:
        config: dict = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": self.scrape_interval,
                    "static_configs": [
                        {
                            "targets": [t.removeprefix("http://").rstrip("/") for t in targets],
                            "labels": self.labels.get(job, {}),
                        }
                    ],
                }
                for job, targets in sorted(self.targets.items())
                if targets
            ],
        }
        if self.rules is not None and self.rules.is_file():
            config["rule_files"] = [str(self.rules)]
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    def scrape(self, job: str, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Scrape these base URLs (their /metrics) as `job`, adding `labels` to their series (as Kubernetes service
        discovery adds `namespace`); reloads a running server (SIGHUP)."""
        self.targets[job], self.labels[job] = list(targets), dict(labels or {})
        self._write()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)
            event(log, "prometheus.reloaded", job=job, targets=",".join(targets))

    def start(self, timeout: float = 60) -> str:
        self._write()
        self.process = subprocess.Popen(
            [
                self.executable,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise KubeloopError(f"prometheus exited with {self.process.returncode}: {self.process.stderr.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        event(log, "prometheus.ready", url=self.url, config=self.config)
                        return self.url
            except OSError:
                pass
            time.sleep(0.2)
        raise KubeloopError(f"prometheus was not ready at {self.url} within {timeout:.0f}s")

    def active_targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets?state=active", timeout=5) as response:
            return json.load(response)["data"]["activeTargets"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedPrometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Scraped:
    """The embedded mode's signal source: an `EmbeddedPrometheus`, started, and a `PrometheusSource` reading it.

    KubeloopError when the `prometheus` binary is missing (the message says how to install it).
    """

    def __init__(self, *, scrape_interval: str = "1s", queries: Queries | None = None):
        self.prometheus = EmbeddedPrometheus(scrape_interval)
        try:
            self.prometheus.start()
        except BaseException:
            self.prometheus.stop()  # a server that never became ready, and its temporary directory
            raise
        self.source = PrometheusSource(self.prometheus.url, queries)

    @property
    def backend(self) -> str:
        return f"Prometheus {self.prometheus.url}"

    def scrape(self, job: str, targets: Sequence[str]) -> None:
        """Scrape these base URLs (their /metrics) as `job`, from now on."""
        self.prometheus.scrape(job, targets)

    def stop(self) -> None:
        self.prometheus.stop()
