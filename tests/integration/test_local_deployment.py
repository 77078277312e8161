"""The embedded deployment behaves like a pod: a real LocalDeployment of a registered arrests model (the model server
and the drift sidecar as real processes). A killed process is restarted on its port while the rest keeps serving,
and `kubeloop status` shows the restarts; `kubeloop run -f` stops everything on SIGTERM, as on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from kubeloop.api import ModelDeployment
from kubeloop.api.modeldeployment import Canary, Shadow
from kubeloop.errors import SpecError
from kubeloop.local_deployment import Endpoints, LocalDeployment
from kubeloop.processes import RestartPolicy
from kubeloop.registry import Registry
from kubeloop.status_view import DeploymentEndpoints, status_table
from tests.support.serving_fixtures import (
    arrests_frame,
    home_with_shared_models,
    register_shared,
    rows,
    scrape,
    shared_home,
)

pytestmark = pytest.mark.integration

BACKOFF = RestartPolicy(backoff=0.5, backoff_max=2, reset_after=60)
DEPLOYMENT = """\
apiVersion: kubeloop.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: {name}
spec:
  model: arrests
  version: 1
  drift:
    window: 50
    referenceSize: 200
"""


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Predictions:
    """Predictions posted one after another in a thread; the status of each (0: no answer)."""

    url: str
    codes: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"instances": rows(arrests_frame(), 1)}
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    self.codes.append(client.post(f"{self.url}/v1/models/arrests:predict", json=body).status_code)
                except httpx.HTTPError:
                    self.codes.append(0)
                time.sleep(0.01)

    def finish(self) -> list[int]:
        self.stop.set()
        self.thread.join(30)
        return self.codes


@dataclass
class Running:
    local: LocalDeployment
    endpoints: Endpoints
    home: Path

    def state(self) -> DeploymentEndpoints:
        assert self.local.state_file is not None
        return DeploymentEndpoints.from_json(self.local.state_file.read_text())

    def child(self, name: str):
        (child,) = [c for c in self.local.processes.children if c.name == name]
        return child


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """arrests v1 served with its drift sidecar, restarts after a 0.5 s back-off (doubling up to 2 s)."""
    deployment = ModelDeployment.model_validate(
        {
            "metadata": {"name": "arrests"},
            "spec": {"model": "arrests", "version": 1, "drift": {"window": 50, "referenceSize": 200}},
        }
    )
    # the registry is read in the home the first context sets
    with (
        home_with_shared_models(tmp_path_factory, "restarts-home") as home,
        LocalDeployment(deployment, Registry(), restart=BACKOFF) as local,
    ):
        yield Running(local, local.start(), home)


def test_a_killed_sidecar_is_restarted_on_its_port_while_predictions_keep_answering(running, monkeypatch) -> None:
    monkeypatch.setenv("KUBELOOP_HOME", str(running.home))
    sidecar, url = running.child("drift-sidecar"), running.endpoints.sidecar
    assert url is not None and running.state().restarts == {"drift-sidecar": 0, "server-v1": 0}
    killed = sidecar.process.pid
    assert running.state().pids["drift-sidecar"] == killed
    predictions = Predictions(running.endpoints.url)
    wait_for(lambda: len(predictions.codes) >= 20, 60, "predictions before the kill")
    os.kill(killed, signal.SIGKILL)
    restarted = wait_for(lambda: sidecar.restarts == 1, 30, "the sidecar restarted")
    ready = wait_for(lambda: answers(f"{url}/healthz"), 120, "the restarted sidecar answering on its port")
    # the payload logger's events reach the new process, on the same port
    wait_for(lambda: scrape(httpx.get(f"{url}/metrics").text, "kubeloop_drift_events_received_total") > 0, 60, "events")
    codes = predictions.finish()
    print(f"sidecar restarted {restarted:.2f}s after the kill, ready {ready:.2f}s later; {len(codes)} predictions")
    assert BACKOFF.backoff <= restarted < BACKOFF.backoff + 5
    assert len(codes) > 20 and set(codes) == {200}, f"{len(codes)} predictions: {sorted(set(codes))}"
    assert sidecar.process.pid != killed and not alive(killed)

    state = running.state()
    assert state.restarts == {"drift-sidecar": 1, "server-v1": 0}
    assert state.pids["drift-sidecar"] == sidecar.process.pid and state.sidecar == url
    assert 0 <= time.time() - state.last_restart["drift-sidecar"] < 300
    table = status_table(interval=0.5)
    print(table)
    assert "arrests drift-sidecar: restarts 1 (" in table and "server-v1: restarts" not in table
    assert table.splitlines()[1].split()[:3] == ["arrests", "arrests", "v1"]


def test_a_killed_model_server_is_restarted_and_answers_again(running, monkeypatch) -> None:
    monkeypatch.setenv("KUBELOOP_HOME", str(running.home))
    server, url = running.child("server-v1"), running.endpoints.servers[1]
    killed = server.process.pid
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: server.restarts == 1, 30, "the server restarted")
    ready = wait_for(lambda: answers(f"{url}/v2/health/ready"), 180, "the restarted server ready on its port")
    answer = httpx.post(f"{url}/v1/models/arrests:predict", json={"instances": rows(arrests_frame(), 3)}, timeout=30)
    print(f"server ready {ready:.2f}s after its restart")
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    assert server.process.pid != killed and not alive(killed)
    assert running.state().restarts["server-v1"] == 1 and running.state().pids["server-v1"] == server.process.pid
    table = status_table(interval=0.5)
    print(table)
    assert "arrests server-v1: restarts 1 (" in table


@pytest.fixture
def run_home(tmp_path_factory: pytest.TempPathFactory, kubeloop_home: Path) -> Path:
    """This test's KUBELOOP_HOME with arrests v1 registered."""
    register_shared(shared_home(tmp_path_factory))
    return kubeloop_home


def kubeloop_run(home: Path, name: str) -> tuple[subprocess.Popen, Path, DeploymentEndpoints]:
    """`kubeloop run -f` of a ModelDeployment in a process of its own, once its state file says it serves."""
    spec = home / f"{name}.yaml"
    spec.write_text(DEPLOYMENT.format(name=name))
    log = home / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "kubeloop.cli", "run", "-f", str(spec)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBELOOP_HOME": str(home)},
    )
    state_file = home / "deployments" / f"{name}.json"
    try:
        wait_for(lambda: state_file.exists() or process.poll() is not None, 240, "the deployment's state file")
    except AssertionError:
        process.kill()
        raise
    assert process.poll() is None, log.read_text()
    state = DeploymentEndpoints.from_json(state_file.read_text())
    assert sorted(state.pids) == ["drift-sidecar", "server-v1"] and all(map(alive, state.pids.values()))
    return process, state_file, state


def test_sigterm_stops_the_children_and_removes_the_state_file(run_home) -> None:
    process, state_file, state = kubeloop_run(run_home, "sigterm")
    process.send_signal(signal.SIGTERM)
    code = process.wait(60)
    log = (run_home / "sigterm.log").read_text()
    print(log.splitlines()[-3:])
    assert code == 143, log
    assert log.rstrip().endswith("terminated")
    assert not any(map(alive, state.pids.values())) and not state_file.exists()
    assert not answers(f"{state.servers[1]}/v2/health/ready") and not answers(f"{state.sidecar}/healthz")


def test_a_second_signal_during_the_cleanup_leaves_no_child_behind(run_home) -> None:
    process, state_file, state = kubeloop_run(run_home, "twice")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # the children are stopping now
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGTERM)
    code = process.wait(60)
    log = (run_home / "twice.log").read_text()
    assert code == 143, log
    assert "SIGINT: stopping already" in log and "SIGTERM: stopping already" in log
    assert not any(map(alive, state.pids.values())) and not state_file.exists()


def test_a_canary_added_to_a_running_deployment(tmp_path_factory: pytest.TempPathFactory, kubeloop_home: Path) -> None:
    """add_canary, as the closed loop rolls a retrained version out: v2's server with a drift sidecar of its own and
    the splitter in front, recorded for `kubeloop status`; the splitter's injected fault rate fails v2's predictions
    only; set_canary_percent moves the split."""
    register_shared(shared_home(tmp_path_factory), versions=(1, 2))
    deployment = ModelDeployment.model_validate(
        {"metadata": {"name": "canary"}, "spec": {"model": "arrests", "version": 1, "drift": {"window": 50}}}
    )
    with LocalDeployment(deployment, Registry(), restart=None) as local:
        stable = local.start()
        endpoints = local.add_canary(Canary(version=2, traffic_percent=50), fault_rate=1.0)
        assert endpoints.url == endpoints.splitter and endpoints.servers[1] == stable.servers[1]
        assert endpoints.canary_sidecar is not None and endpoints.canary_sidecar != endpoints.sidecar
        names = sorted(child.name for child in local.processes.children)
        assert names == ["drift-sidecar", "drift-sidecar-canary", "server-v1", "server-v2", "splitter"]
        assert local.state_file is not None
        state = DeploymentEndpoints.from_json(local.state_file.read_text())
        assert (state.canary, state.canary_percent, state.url) == (2, 50, endpoints.url)

        def answered() -> set[tuple[str, int]]:
            with httpx.Client(timeout=30) as client:
                body = {"instances": rows(arrests_frame(), 1)}
                answers = [client.post(f"{endpoints.url}/v1/models/arrests:predict", json=body) for _ in range(40)]
            return {(answer.headers["x-kubeloop-version"], answer.status_code) for answer in answers}

        assert answered() == {("1", 200), ("2", 500)}  # 40 requests at 50%: both versions, but for 2**-39
        local.set_canary_percent(0)
        assert answered() == {("1", 200)}
        (splitter,) = [child for child in local.processes.children if child.name == "splitter"]
        assert splitter.command[splitter.command.index("--percent") + 1] == "0"  # a restart keeps the split
        with pytest.raises(SpecError, match="add_canary needs a started deployment without a canary"):
            local.add_canary(Canary(version=2))


def test_a_shadow_in_the_spec_becomes_the_canary_and_a_restarted_splitter_stays_promoted(
    tmp_path_factory: pytest.TempPathFactory, kubeloop_home: Path
) -> None:
    """spec.shadow: v2's server with a drift sidecar of its own, the splitter mirroring to it (users answered by v1
    only); promote_shadow makes it the canary at its percentage without a new splitter, and the splitter's command
    line follows: killed, it comes back promoted."""
    register_shared(shared_home(tmp_path_factory), versions=(1, 2))
    spec = {"model": "arrests", "version": 1, "drift": {"window": 50}, "shadow": {"version": 2, "percent": 100}}
    deployment = ModelDeployment.model_validate({"metadata": {"name": "shadow"}, "spec": spec})
    body = {"instances": rows(arrests_frame(), 1)}

    def versions(url: str, n: int = 20) -> set[str]:
        with httpx.Client(timeout=30) as client:
            answers = [client.post(f"{url}/v1/models/arrests:predict", json=body) for _ in range(n)]
        assert {answer.status_code for answer in answers} == {200}
        return {answer.headers["x-kubeloop-version"] for answer in answers}

    with LocalDeployment(deployment, Registry(), restart=BACKOFF) as local:
        endpoints = local.start()
        names = sorted(child.name for child in local.processes.children)
        assert names == ["drift-sidecar", "drift-sidecar-shadow", "server-v1", "server-v2", "splitter"]
        assert endpoints.url == endpoints.splitter and endpoints.shadow_sidecar not in (None, endpoints.sidecar)
        assert local.state_file is not None
        state = DeploymentEndpoints.from_json(local.state_file.read_text())
        assert (state.shadow, state.shadow_percent, state.sidecars) == (2, 100, {2: endpoints.shadow_sidecar})
        assert versions(endpoints.url) == {"1"}

        def mirrored() -> float:
            text = httpx.get(f"{endpoints.splitter}/metrics").text
            return scrape(text, "kubeloop_splitter_requests_total", version="2", code="200")

        wait_for(lambda: mirrored() == 20, 30, "the 20 copies answered by the shadow")

        promoted = local.promote_shadow(Canary(version=2, traffic_percent=100))
        assert (promoted.url, promoted.canary_sidecar, promoted.shadow_sidecar) == (
            endpoints.url,
            endpoints.shadow_sidecar,
            None,
        )
        assert versions(promoted.url) == {"2"}
        traffic = httpx.get(f"{promoted.splitter}/admin/traffic").json()
        assert (traffic["percent"], traffic["candidate"]["version"], "shadow" in traffic) == (100, "2", False)
        state = DeploymentEndpoints.from_json(local.state_file.read_text())
        assert (state.canary, state.canary_percent, state.shadow, state.sidecars) == (
            2,
            100,
            None,
            {2: endpoints.shadow_sidecar},
        )
        with pytest.raises(SpecError, match="add_shadow needs a started deployment without a canary or a shadow"):
            local.add_shadow(Shadow(version=2))

        (splitter,) = [child for child in local.processes.children if child.name == "splitter"]
        assert "--shadow" not in splitter.command and "--candidate-version" in splitter.command
        os.kill(splitter.process.pid, signal.SIGKILL)
        wait_for(lambda: splitter.restarts == 1, 30, "the splitter restarted")
        wait_for(lambda: answers(f"{promoted.splitter}/v2/health/ready"), 60, "the restarted splitter")
        assert versions(promoted.url) == {"2"}
