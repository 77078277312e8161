"""Integration fixtures: one local Ray cluster; for the model-server modules (test_serving*.py), the registered
arrests models, their artifact, an HTTP client and the servers with their payload sinks (started once a session)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeloop.api.load import load_resources
from kubeloop.artifact import ModelArtifact
from tests.support.serving_fixtures import (
    Process,
    arrests_frame,
    launch_server,
    launch_sink,
    record_path,
    rows,
    shared_home,
    start_all,
    stop_all,
)
from tests.support.serving_requests import CACHED, MAX_BODY


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the session (starting one costs ~5 s); training joins it."""
    import ray

    from kubeloop.training.ray_runner import connect

    os.environ.pop("RAY_ADDRESS", None)
    started = connect(workers=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def serving_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two registered versions of the arrests model (different seeds)."""
    return shared_home(tmp_path_factory)


@pytest.fixture(scope="session")
def artifact(serving_home: Path) -> ModelArtifact:
    """The artifact of arrests v1, the version the servers serve."""
    return ModelArtifact.load(load_resources(record_path(serving_home, 1))[0].spec.artifact_uri)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def processes(serving_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    """The HTTP model servers of the test_serving*.py modules, started side by side once a session: a sink and the
    server logging to it; a slow sink and a second server ("logged") logging to it, with the prediction cache on
    (hybrid: the first CACHED bundled rows precomputed, an LRU of 50 for the rest). The slow-sidecar test stops the
    second pair."""
    logs = tmp_path_factory.mktemp("serving")
    env = {"KUBELOOP_HOME": str(serving_home)}
    cache_file = logs / "cache-rows.jsonl"
    cache_file.write_text("".join(json.dumps(row) + "\n" for row in rows(arrests_frame(), CACHED)))
    sink, slow_sink = start_all(launch_sink(logs / "sink.log"), launch_sink(logs / "slow-sink.log", "--delay", "0.5"))
    try:
        server, logged = start_all(
            launch_server(
                record_path(serving_home, 1),
                logs / "server.log",
                "--logger-url", f"{sink.url}/",
                "--inference-service", "arrests-isvc",
                "--namespace", "ml",
                "--endpoint", "default",
                "--max-body-bytes", str(MAX_BODY),
                "--max-batch-size", "256",
                env=env,
            ),
            launch_server(
                record_path(serving_home, 1),
                logs / "logged.log",
                "--logger-url", f"{slow_sink.url}/",
                "--logger-queue", "20",
                "--cache", "hybrid",
                "--cache-file", str(cache_file),
                "--cache-size", "50",
                env=env,
            ),
        )  # fmt: skip
    except BaseException:
        sink.stop()
        slow_sink.stop()
        raise
    yield {"sink": sink, "server": server, "slow_sink": slow_sink, "logged": logged}
    stop_all(server, logged, sink, slow_sink)


@pytest.fixture(scope="session")
def sink(processes: dict[str, Process]) -> Process:
    return processes["sink"]


@pytest.fixture(scope="session")
def server(processes: dict[str, Process]) -> Process:
    return processes["server"]
