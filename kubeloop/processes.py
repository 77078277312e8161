"""Child processes of the embedded mode: started by module name, awaited until ready, stopped together."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import httpx

from kubeloop.errors import KubeloopError
from kubeloop.log import event

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    output: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    def tail(self) -> str:
        return "\n".join(self.output)


class ProcessGroup:
    """Starts `python -m MODULE ...` children; a context manager that always stops them (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, module: str, args: list[str], health_url: str, timeout: float = 300) -> Child:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ.copy(),
            start_new_session=True,  # Ctrl-C reaches the parent only; the parent stops the children in order
        )
        child = Child(name, process)
        self.children.append(child)
        threading.Thread(target=self._pump, args=(child,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise KubeloopError(f"{name} exited with code {process.returncode} while starting:\n{child.tail()}")
            try:
                if httpx.get(health_url, timeout=1).status_code == 200:
                    event(log, "process.ready", process=name, pid=process.pid, url=health_url)
                    return child
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise KubeloopError(f"{name} was not ready at {health_url} within {timeout:.0f}s:\n{child.tail()}")

    @staticmethod
    def _pump(child: Child) -> None:
        assert child.process.stdout is not None
        for line in child.process.stdout:
            child.output.append(line.rstrip())
            log.debug("%s: %s", child.name, line.rstrip())

    def dead(self) -> list[Child]:
        return [child for child in self.children if child.process.poll() is not None]

    def stop(self, grace: float = 10) -> None:
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
            event(log, "process.stopped", process=child.name, code=child.process.returncode)
        self.children.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
