"""ProcessGroup restarts an exited child like the kubelet restarts a container (CrashLoopBackOff), with a real tiny
HTTP child; the CLI's SIGINT/SIGTERM handling."""

from __future__ import annotations

import logging
import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kubeloop.cli import StopSignals, Terminated
from kubeloop.processes import Child, ProcessGroup, RestartPolicy, free_port

# a child: answers 200 on GET / at --port; with --up S it prints "giving up" and exits with --code after S seconds
CHILD = textwrap.dedent(
    """
    import argparse, os, threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--up", type=float, default=0)
    parser.add_argument("--code", type=int, default=3)
    args = parser.parse_args()
    server = HTTPServer(("127.0.0.1", args.port), Health)  # allow_reuse_address: SO_REUSEADDR, as the servers do

    def give_up():
        print("giving up", flush=True)
        os._exit(args.code)

    if args.up:
        threading.Timer(args.up, give_up).start()
    print(f"child {os.getpid()} on {args.port}", flush=True)
    server.serve_forever()
    """
)
FAST = RestartPolicy(backoff=0.2, backoff_max=0.8, reset_after=30)


@pytest.fixture
def child_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "tiny_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the children inherit the environment
    return "tiny_child"


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[logging.LogRecord]]:
    caplog.set_level(logging.INFO, logger="kubeloop.processes")
    return lambda name: [r for r in caplog.records if r.getMessage().startswith(name + " ")]


def fields(record: logging.LogRecord) -> dict[str, str]:
    return dict(part.split("=", 1) for part in record.getMessage().split(" ")[1:] if "=" in part)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def group() -> Iterator[list[ProcessGroup]]:
    made: list[ProcessGroup] = []
    yield made
    for each in made:
        each.stop(grace=2)


def start(groups: list[ProcessGroup], module: str, *extra: str, **options: object) -> tuple[ProcessGroup, Child]:
    group = ProcessGroup(**options)  # type: ignore[arg-type]
    groups.append(group)
    port = free_port()
    child = group.start("tiny", module, ["--port", str(port), *extra], f"http://127.0.0.1:{port}/", timeout=30)
    return group, child


def test_the_backoff_doubles_per_crash_up_to_its_cap_and_resets_after_a_long_run() -> None:
    policy = RestartPolicy()  # the defaults: 1 s, doubling, capped at 30 s, reset after 60 s up
    assert [policy.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    crashes = 0
    for uptime in (0.5, 3, 10, 59):
        crashes = policy.crashes_after(crashes, uptime)
    assert crashes == 4 and policy.delay(crashes) == 8
    assert policy.crashes_after(crashes, 60) == 1  # up a minute: the next restart waits 1 s again
    scaled = RestartPolicy(backoff=0.1, backoff_max=0.25, reset_after=1)
    assert [scaled.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.25, 0.25]


def test_a_killed_child_comes_back_on_the_same_port_after_the_backoff(group, child_module, events) -> None:
    restarted: list[int] = []
    processes, child = start(group, child_module, restart=FAST, on_restart=lambda c: restarted.append(c.restarts))
    first = child.process.pid
    os.kill(first, signal.SIGKILL)
    took = wait_for(lambda: child.restarts == 1 and answers(child.health_url))
    assert child.process.pid != first and child.process.poll() is None
    assert FAST.backoff <= took < 10, took
    assert restarted == [1] and child.last_restart is not None and abs(time.time() - child.last_restart) < 10
    (exited,) = events("process.exited")
    assert exited.getMessage().startswith(f"process.exited process=tiny pid={first} code=-9 uptime=")
    assert f"output='child {first} on {child.health_url.split(':')[-1].rstrip('/')}'" in exited.getMessage()
    (again,) = events("process.restarted")
    assert fields(again) == {"process": "tiny", "pid": str(child.process.pid), "restarts": "1", "backoff": "0.2"}
    assert processes.dead() == []  # supervised: nothing is dead for good


def test_a_crash_looping_child_waits_longer_each_time_up_to_the_cap(group, child_module, events) -> None:
    _, child = start(group, child_module, "--up", "0.3", "--code", "3", restart=FAST)
    wait_for(lambda: len(events("process.restarted")) >= 4, timeout=30)
    backoffs = [float(fields(r)["backoff"]) for r in events("process.restarted")][:4]
    assert backoffs == [0.2, 0.4, 0.8, 0.8]
    exits, restarts = events("process.exited"), events("process.restarted")
    for exited, restarted in zip(exits, restarts[:4], strict=False):
        assert " code=3 " in exited.getMessage() and exited.getMessage().endswith("\\ngiving up'")
        assert restarted.created - exited.created >= float(fields(restarted)["backoff"]) - 0.01
    assert child.restarts >= 4


def test_stop_ends_the_watching_first_so_a_stopped_child_is_not_restarted(group, child_module, events) -> None:
    slow = RestartPolicy(backoff=30, backoff_max=30, reset_after=60)
    processes, child = start(group, child_module, restart=slow)
    waiting_group, waiting = start(group, child_module, restart=slow)
    os.kill(waiting.process.pid, signal.SIGKILL)
    wait_for(lambda: len(events("process.exited")) == 1)  # its restart is 30 s away
    began = time.monotonic()
    processes.stop(grace=2)
    waiting_group.stop(grace=2)
    assert time.monotonic() - began < 5  # the back-off wait is cut short
    time.sleep(1)
    assert not answers(child.health_url) and not answers(waiting.health_url)
    assert child.process.poll() is not None and waiting.restarts == 0
    assert events("process.restarted") == [] and len(events("process.exited")) == 1  # the stop is no crash


def test_without_a_restart_policy_an_exited_child_is_dead(group, child_module) -> None:
    processes, child = start(group, child_module, "--up", "0.3", restart=None)
    wait_for(lambda: processes.dead() == [child])
    time.sleep(0.5)
    assert child.restarts == 0 and child.process.returncode == 3


def test_sigterm_interrupts_like_ctrl_c_and_a_second_signal_does_not_interrupt_the_cleanup(capsys) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cleaned = False
    with StopSignals() as signals, pytest.raises(KeyboardInterrupt) as raised:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # during the cleanup: ignored, the cleanup runs to its end
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            cleaned = True
    assert isinstance(raised.value, Terminated) and signals.received == signal.SIGTERM and cleaned
    assert capsys.readouterr().err.count("stopping already") == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored
