"""Sockets and process plumbing shared by the model server and the splitter."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to exactly `host` (127.0.0.1 locally), port 0 meaning any free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def url_of(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SignalGuard:
    """SIGTERM/SIGINT outside uvicorn's own handling: before serving they stop the start (SystemExit); once uvicorn
    served -- it handles the signal, shuts down gracefully, then re-raises it -- they are ignored, so the process
    can finish its own cleanup and exit 0."""

    def __init__(self) -> None:
        self.serving = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.serving:
            raise SystemExit(128 + signum)


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run on uvloop when it is there (kserve installs uvicorn[standard]), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
        return
    uvloop.run(main())
