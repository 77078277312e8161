"""HTTP/1.1 to the model servers behind the splitter: pooled keep-alive connections, responses parsed by httptools
(uvicorn's parser), a stale idle connection retried once on a fresh one."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


@dataclass
class Backend:
    """A model server behind the splitter."""

    version: str
    url: str
    fault_rate: float = 0.0  # share of POST inference requests answered 500 without forwarding (rollback drills)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault rate of v{self.version}: expected a share from 0 to 1, got {self.fault_rate:g}")


class UpstreamError(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a model server; responses parsed by httptools (uvicorn's parser)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.got_data = False
        self.head = False
        self.future: asyncio.Future | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def request(self, data: bytes, head: bool) -> asyncio.Future:
        self.future = asyncio.get_running_loop().create_future()
        self.headers, self.body, self.got_data, self.head = [], [], False, head
        self.transport.write(data)
        return self.future

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(UpstreamError(f"invalid HTTP from upstream: {error}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("upstream closed the connection"))

    def _fail(self, error: Exception) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(error)

    # httptools callbacks
    def onheader(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head:  # no body follows the answer to a HEAD: done, and not reused
            self.closed = True
            self._done(False)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self._done(self.parser.should_keep_alive())

    def _done(self, keep_alive: bool) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body), keep_alive))


class Pool:
    """Idle keep-alive connections to one upstream; a request on a stale one is retried once on a new one."""

    def __init__(self, url: str, timeout: float, keep: int = 64):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: expected http://HOST:PORT")
        self.host, self.tls = parts.hostname, parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.encode()
        self.prefix = (parts.path or "").rstrip("/")
        self.timeout, self.keep = timeout, keep
        self.idle: list[_Connection] = []

    async def send(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple:
        lines = [f"{method} {self.prefix}{target} HTTP/1.1\r\n".encode("latin-1"), b"host: ", self.host_header]
        for name, value in headers:
            lines += [b"\r\n", name, b": ", value]
        lines.append(b"\r\ncontent-length: %d\r\n\r\n" % len(body))
        lines.append(body)
        data = b"".join(lines)
        for attempt in (1, 2):
            connection, reused = await self._acquire()
            try:
                status, answer_headers, answer, keep_alive = await asyncio.wait_for(
                    connection.request(data, method == "HEAD"), self.timeout
                )
            except TimeoutError:
                connection.transport.abort()
                raise
            except (ConnectionError, OSError):
                connection.transport.close()
                if reused and not connection.got_data and attempt == 1:
                    continue  # the upstream had closed this idle connection: once more on a fresh one
                raise
            except BaseException:
                connection.transport.abort()
                raise
            if keep_alive and not connection.closed and len(self.idle) < self.keep:
                self.idle.append(connection)
            else:
                connection.transport.close()
            return status, answer_headers, answer
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection, True
        context = ssl.create_default_context() if self.tls else None
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port, ssl=context), self.timeout
        )
        return connection, False

    def close(self) -> None:
        for connection in self.idle:
            connection.transport.close()
        self.idle.clear()
