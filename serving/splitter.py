"""`python -m serving.splitter`: the embedded mode's canary router in front of a stable and a candidate model server.

Every request path is forwarded to one of the two servers; the candidate gets `--percent` of the traffic,
deterministically by request id: the `x-request-id` header when the client sends one (else a new UUID, passed on to
the server), hashed (blake2b) to a bucket 0..99, candidate when the bucket is below the percentage. So a given id
always lands on the same version for a given percentage, and raising the percentage only moves ids from stable to
candidate. Responses carry `x-kubeloop-version` and `x-request-id`.

The splitter's own routes: `GET /metrics` (kubeloop_splitter_*), `GET /admin/traffic` and
`POST /admin/traffic {"percent": K}` to change the split at run time (the canary analysis walks its steps through
it). It binds 127.0.0.1 by default; the admin route has no authentication, like the rest of the embedded mode.

For rollback drills, `--candidate-fault-rate R` (`--stable-fault-rate R`) answers a random share R of the POST
requests routed to that version with HTTP 500 instead of forwarding them, counted under the version like any other
answer (as a failing pod behind a mesh would be). Off by default.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import random
import ssl
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, exposition

from kubeloop import log as kubeloop_log
from kubeloop.asgi import header, lifespan, read_body, respond
from kubeloop.log import event
from serving.metrics import LATENCY_BUCKETS
from serving.net import SignalGuard, bind, run, url_of

log = logging.getLogger("kubeloop.serving.splitter")

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


def bucket(request_id: str) -> int:
    """0..99, stable across processes and runs (unlike Python's salted hash)."""
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


@dataclass
class Backend:
    version: str
    url: str
    fault_rate: float = 0.0  # share of POST requests answered 500 without forwarding (rollback drills)

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


class _Pool:
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


class SplitterMetrics:
    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.requests = Counter(
            "kubeloop_splitter_requests",
            "Requests routed, by model version and HTTP status.",
            ("version", "code"),
            registry=registry,
        )
        self.latency = Histogram(
            "kubeloop_splitter_request_duration_seconds",
            "Time from request to the upstream's full answer.",
            ("version",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.percent = Gauge(
            "kubeloop_splitter_candidate_percent",
            "Declared share of traffic sent to the candidate.",
            registry=registry,
        )
        self.versions = Gauge(
            "kubeloop_splitter_backend_info",
            "The versions behind the splitter (1 per role).",
            ("role", "version"),
            registry=registry,
        )


class Splitter:
    """A raw ASGI app (no framework on the hot path)."""

    def __init__(
        self,
        stable: Backend,
        candidate: Backend | None,
        percent: int,
        *,
        timeout: float = 30.0,
        max_body_bytes: int = 16 << 20,
        metrics: SplitterMetrics | None = None,
    ):
        self.stable, self.candidate = stable, candidate
        self.timeout, self.max_body_bytes = timeout, max_body_bytes
        self.metrics = metrics or SplitterMetrics()
        self.percent = 0
        self.set_percent(percent)
        self.metrics.versions.labels("stable", stable.version).set(1)
        if candidate is not None:
            self.metrics.versions.labels("candidate", candidate.version).set(1)
        self._pools = {b.version: _Pool(b.url, timeout) for b in (stable, candidate) if b}
        self._children: dict[tuple[str, int], Any] = {}
        self._latency = {b.version: self.metrics.latency.labels(b.version) for b in (stable, candidate) if b}
        self._faults = random.Random()

    def set_percent(self, percent: Any) -> int:
        if type(percent) is not int or not 0 <= percent <= 100:
            raise ValueError(f"percent: expected an integer from 0 to 100, got {percent!r}")
        if percent and self.candidate is None:
            raise ValueError("percent: no candidate behind this splitter (start it with --candidate)")
        self.percent = percent
        self.metrics.percent.set(percent)
        return percent

    def choose(self, request_id: str) -> Backend:
        if self.candidate is not None and self.percent and bucket(request_id) < self.percent:
            return self.candidate
        return self.stable

    def traffic(self) -> dict:
        out = {"percent": self.percent, "stable": _describe(self.stable)}
        if self.candidate is not None:
            out["candidate"] = _describe(self.candidate)
        return out

    def _injects_fault(self, backend: Backend, method: str) -> bool:
        return backend.fault_rate > 0 and method == "POST" and self._faults.random() < backend.fault_rate

    # ---- ASGI
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send, self._close_pools)
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics" and scope["method"] == "GET":
            encoder, content_type = exposition.choose_encoder(header(scope, b"accept"))
            return await respond(send, 200, encoder(self.metrics.registry), content_type.encode())
        if path == "/admin/traffic":
            return await self._admin(scope, receive, send)
        await self._forward(scope, receive, send)

    def _close_pools(self) -> None:
        for pool in self._pools.values():
            pool.close()

    async def _admin(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["method"] == "GET":
            return await _json(send, 200, self.traffic())
        if scope["method"] != "POST":
            return await _json(send, 405, {"error": "admin/traffic: use GET or POST"})
        body = await read_body(receive, 4096)
        try:
            request = json.loads(body or b"null")
            if not isinstance(request, dict) or "percent" not in request:
                raise ValueError('body: expected {"percent": K}')
            before = self.percent
            self.set_percent(request["percent"])
        except (ValueError, UnicodeDecodeError) as error:
            return await _json(send, 400, {"error": str(error)})
        event(log, "traffic.changed", before=before, percent=self.percent)
        await _json(send, 200, self.traffic())

    async def _forward(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request_id = header(scope, b"x-request-id") or str(uuid.uuid4())
        backend = self.choose(request_id)
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP and k != b"x-request-id"]
        headers.append((b"x-request-id", request_id.encode("latin-1")))
        routing = [(b"x-kubeloop-version", backend.version.encode()), (b"x-request-id", request_id.encode("latin-1"))]
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            return await self._answer(send, backend, started, 413, b'{"error": "body: too large for the splitter"}')
        if self._injects_fault(backend, scope["method"]):
            message = f"injected fault: the splitter fails {backend.fault_rate:g} of v{backend.version}'s requests"
            return await self._answer(send, backend, started, 500, _error(message))
        target = scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            status, upstream_headers, answer = await self._pools[backend.version].send(
                scope["method"], target, headers, body
            )
        except TimeoutError:
            message = f"upstream v{backend.version}: no answer within {self.timeout:g}s"
            return await self._answer(send, backend, started, 504, _error(message))
        except (OSError, ConnectionError, UpstreamError) as error:
            message = f"upstream v{backend.version} ({backend.url}): {error}"
            return await self._answer(send, backend, started, 502, _error(message))
        answer_headers = [
            (k, v) for k, v in upstream_headers if k.lower() not in HOP_BY_HOP and k.lower() != b"x-request-id"
        ]
        await self._answer(send, backend, started, status, answer, answer_headers + routing)

    async def _answer(
        self, send: Any, backend: Backend, started: float, status: int, body: bytes, headers: list | None = None
    ) -> None:
        if headers is None:
            headers = [(b"content-type", b"application/json"), (b"x-kubeloop-version", backend.version.encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        child = self._children.get((backend.version, status))
        if child is None:
            child = self._children[(backend.version, status)] = self.metrics.requests.labels(backend.version, status)
        child.inc()
        self._latency[backend.version].observe(time.perf_counter() - started)


def _describe(backend: Backend) -> dict:
    out: dict = {"version": backend.version, "url": backend.url}
    if backend.fault_rate:
        out["faultRate"] = backend.fault_rate
    return out


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def _json(send: Any, status: int, payload: Any) -> None:
    await respond(send, status, json.dumps(payload).encode(), b"application/json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.splitter", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--stable", required=True, metavar="URL", help="the stable model server, e.g. http://127.0.0.1:8081")
    p.add_argument("--stable-version", required=True, help="its model version (the x-kubeloop-version it gets)")
    p.add_argument("--candidate", metavar="URL", help="the candidate model server")
    p.add_argument("--candidate-version", help="its model version")
    p.add_argument("--percent", type=int, default=0, help="share of traffic for the candidate, 0..100")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an upstream answer")
    for role in ("stable", "candidate"):
        p.add_argument(
            f"--{role}-fault-rate",
            type=float,
            default=0.0,
            metavar="R",
            help=f"answer this share (0..1) of the POST requests routed to the {role} with HTTP 500 (default 0)",
        )
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    kubeloop_log.setup(args.verbose)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = logging.getLogger("kubeloop").handlers
        logging.getLogger(name).propagate = False
    if bool(args.candidate) != bool(args.candidate_version):
        print("error: --candidate and --candidate-version go together", file=sys.stderr)
        return 2
    if args.candidate_fault_rate and not args.candidate:
        print("error: --candidate-fault-rate needs --candidate", file=sys.stderr)
        return 2
    try:
        stable = Backend(str(args.stable_version).removeprefix("v"), args.stable.rstrip("/"), args.stable_fault_rate)
        candidate = None
        if args.candidate:
            version, url = str(args.candidate_version).removeprefix("v"), args.candidate.rstrip("/")
            candidate = Backend(version, url, args.candidate_fault_rate)
        splitter = Splitter(stable, candidate, args.percent, timeout=args.timeout)
        sock = bind(args.host, args.port)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    url = url_of(args.host, sock)
    config = uvicorn.Config(splitter, log_config=None, access_log=False, server_header=False, lifespan="on")
    server = uvicorn.Server(config)
    guard = SignalGuard()
    gc.collect()
    gc.freeze()  # start-up objects out of the collector's reach: no long pauses in full collections

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            guard.serving = True
            shares = f"v{stable.version} {100 - splitter.percent}%"
            if candidate is not None:
                shares += f", v{candidate.version} {splitter.percent}%"
            event(log, "splitter.ready", url=url, percent=splitter.percent)
            print(f"splitting on {url} ({shares})", flush=True)
        await task

    run(serve)
    event(log, "splitter.stopped", url=url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
