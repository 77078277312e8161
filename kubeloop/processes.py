"""Child processes of the embedded mode: started by module name, awaited until ready, restarted like a pod's
containers when they exit, stopped together.

A child that exits on its own is started again with the same command line (so on the same port: ports are chosen
before start and passed as flags; the servers set SO_REUSEADDR, so connections left in TIME_WAIT do not block the
bind), after a back-off that doubles per crash as the kubelet's CrashLoopBackOff does, and awaited on its health URL
again. Each child is watched by a thread of its own; `stop` ends the watching first, so a child stopped on purpose
is not restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from kubeloop.errors import KubeloopError
from kubeloop.log import event

log = logging.getLogger(__name__)

# the kubelet's CrashLoopBackOff (10 s doubling to 5 min, reset after 10 min up) scaled to a developer's machine
RESTART_BACKOFF = 1.0  # seconds before the first restart
RESTART_BACKOFF_MAX = 30.0  # the doubling stops here
RESTART_RESET_AFTER = 60.0  # a child that stayed up this long counts its next crash as the first again
STARTUP_TIMEOUT = 300.0  # a model server loads torch and the model before it is ready
EXIT_OUTPUT_LINES = 10  # of a child's output, logged with process.exited


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RestartPolicy:
    """When an exited child is started again: `backoff` seconds after its first crash, doubling per consecutive
    crash up to `backoff_max`; a child that was up `reset_after` seconds or more starts the count again."""

    backoff: float = RESTART_BACKOFF
    backoff_max: float = RESTART_BACKOFF_MAX
    reset_after: float = RESTART_RESET_AFTER

    def delay(self, crashes: int) -> float:
        """The wait before the restart that follows `crashes` consecutive crashes (1 for the first)."""
        return min(self.backoff_max, self.backoff * 2 ** max(0, crashes - 1))

    def crashes_after(self, crashes: int, uptime: float) -> int:
        """The consecutive-crash count once a child that was up `uptime` seconds exits."""
        return 1 if uptime >= self.reset_after else crashes + 1


ALWAYS = RestartPolicy()  # a pod's restartPolicy: Always, with these numbers


@dataclass
class Child:
    name: str
    command: list[str]
    health_url: str
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)  # when the current process was started
    timeout: float = STARTUP_TIMEOUT  # for its health URL, at every start
    restarts: int = 0
    last_restart: float | None = None  # wall-clock time (time.time()) of the latest restart
    output: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    pump: threading.Thread | None = None

    def tail(self, lines: int | None = None) -> str:
        kept = list(self.output)
        return "\n".join(kept if lines is None else kept[-lines:])


class ProcessGroup:
    """Starts `python -m MODULE ...` children; restarts one that exits (unless `restart` is None); a context manager
    that always stops them (SIGTERM, then SIGKILL). `on_restart` is called (from the watching thread) after each
    restart, before the restarted child is ready."""

    def __init__(
        self,
        restart: RestartPolicy | None = ALWAYS,
        on_restart: Callable[[Child], None] | None = None,
    ) -> None:
        self.children: list[Child] = []
        self.restart = restart
        self.on_restart = on_restart
        self._lock = threading.Lock()  # a restart and `stop` never interleave: no child is started after a stop
        self._stopping = threading.Event()  # replaced by `stop`: a watcher checks the one it started with
        self._watchers: list[threading.Thread] = []

    def start(
        self, name: str, module: str, args: list[str], health_url: str, timeout: float = STARTUP_TIMEOUT
    ) -> Child:
        command = self._command(module, args)
        child = Child(name, command, health_url, self._spawn(command), timeout=timeout)
        self.children.append(child)
        self._pump(child)
        self._await_ready(child, self._stopping, first=True)
        if self.restart is not None:
            watcher = threading.Thread(
                target=self._watch, args=(child, self.restart, self._stopping), name=f"watch-{name}", daemon=True
            )
            self._watchers.append(watcher)
            watcher.start()
        return child

    def set_command(self, name: str, module: str, args: list[str]) -> None:
        """The command line the named child is restarted with from now on (the running process is left alone)."""
        for child in self.children:
            if child.name == name:
                child.command = self._command(module, args)

    @staticmethod
    def _command(module: str, args: list[str]) -> list[str]:
        return [sys.executable, "-m", module, *args]

    @staticmethod
    def _spawn(command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ.copy(),
            start_new_session=True,  # Ctrl-C reaches the parent only; the parent stops the children in order
        )

    @staticmethod
    def _pump(child: Child) -> None:
        def pump(process: subprocess.Popen) -> None:
            assert process.stdout is not None
            for line in process.stdout:
                child.output.append(line.rstrip())
                log.debug("%s: %s", child.name, line.rstrip())

        child.pump = threading.Thread(target=pump, args=(child.process,), name=f"output-{child.name}", daemon=True)
        child.pump.start()

    def _await_ready(self, child: Child, stopping: threading.Event, first: bool = False) -> bool:
        """Until `child` answers 200 on its health URL (True); False when it exited, timed out or the group stops.
        The first start raises instead: a child that cannot start at all is a mistake to report, not to retry."""
        process, timeout = child.process, child.timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stopping.is_set():
            if process.poll() is not None:
                if first:
                    raise KubeloopError(
                        f"{child.name} exited with code {process.returncode} while starting:\n{child.tail()}"
                    )
                return False
            try:
                if httpx.get(child.health_url, timeout=1).status_code == 200:
                    event(log, "process.ready", process=child.name, pid=process.pid, url=child.health_url)
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if first and not stopping.is_set():
            raise KubeloopError(
                f"{child.name} was not ready at {child.health_url} within {timeout:.0f}s:\n{child.tail()}"
            )
        if not stopping.is_set():
            event(log, "process.not_ready", level=logging.WARNING, process=child.name, url=child.health_url)
        return False

    def _watch(self, child: Child, policy: RestartPolicy, stopping: threading.Event) -> None:
        """Restart `child` whenever it exits, until the group stops."""
        crashes = 0
        while True:
            process = child.process
            code = process.wait()
            if stopping.is_set():
                return
            uptime = time.monotonic() - child.started
            crashes = policy.crashes_after(crashes, uptime)
            delay = policy.delay(crashes)
            if child.pump is not None:
                child.pump.join(2)  # its last lines say why it exited
            event(
                log,
                "process.exited",
                level=logging.WARNING,
                process=child.name,
                pid=process.pid,
                code=code,
                uptime=uptime,
                output=child.tail(EXIT_OUTPUT_LINES),
            )
            if stopping.wait(delay):
                return
            with self._lock:
                if stopping.is_set():
                    return
                child.output.clear()
                child.process, child.started = self._spawn(child.command), time.monotonic()
                child.restarts += 1
                child.last_restart = time.time()
                self._pump(child)
            event(
                log,
                "process.restarted",
                process=child.name,
                pid=child.process.pid,
                restarts=child.restarts,
                backoff=delay,
            )
            if self.on_restart is not None:
                try:
                    self.on_restart(child)
                except Exception as error:  # the record of a restart failing must not end the watching
                    event(log, "process.restart_unrecorded", level=logging.WARNING, process=child.name, error=error)
            self._await_ready(child, stopping)

    def dead(self) -> list[Child]:
        """Children that exited and will not be restarted: none unless the group restarts nothing."""
        if self.restart is not None:
            return []
        return [child for child in self.children if child.process.poll() is not None]

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to every child, SIGKILL to those still running after `grace` seconds. Interrupted (a signal
        raising in the main thread), it still kills every child before the exception goes on."""
        with self._lock:  # the watchers first: a child stopped here must not be restarted
            self._stopping.set()
            watchers = self._watchers
            self._stopping, self._watchers = threading.Event(), []  # a new start is watched again
        try:
            for child in reversed(self.children):
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in reversed(self.children):
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
                event(
                    log, "process.stopped", process=child.name, code=child.process.returncode, restarts=child.restarts
                )
        finally:
            for child in self.children:
                if child.process.poll() is None:
                    child.process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.process.wait(5)
            self.children.clear()
        for watcher in watchers:
            watcher.join(5)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
