"""Payload logging to the drift sidecar as CloudEvents, the way KServe's logger agent sends them.

Wire format (checked against kserve/kserve pkg/logger/worker.go, handler.go and cmd/agent/main.go): one HTTP POST
per event in CloudEvents *binary* mode, i.e. the event attributes are `ce-` headers and the body is the payload:

    ce-specversion: 1.0
    ce-id: <the request's Ce-Id header, else a new UUID>   (shared by a request and its response)
    ce-type: org.kubeflow.serving.inference.request | org.kubeflow.serving.inference.response
    ce-source: <--source-uri, default http://localhost:<port>/>
    ce-time: <RFC 3339>
    ce-inferenceservicename, ce-namespace, ce-component (predictor), ce-endpoint (default | canary)
    ce-metadata: {}          (the JSON map of forwarded metadata headers; none are forwarded here)
    ce-modelversion: <N>     (kubeloop's extension: the model version that answered)
    content-type: <the request's Content-Type>   (KServe uses it for the response event too)

As in KServe, the request event is sent for every inference request and the response event only for a 200.

Unlike KServe's agent, which blocks the request once its queue of 100 fills, sending is entirely off the request
path: `log()` only appends to a bounded queue (dropping and counting when it is full). The sender is a background
task on the server's event loop -- no thread, so no GIL hand-offs -- that writes what has queued up in one
non-blocking write over a keep-alive HTTP/1.1 connection (pipelined), and counts the sidecar's answers as they
arrive. It never awaits on behalf of a request: a slow sidecar stops being written to once `max_in_flight` events
are unanswered (the queue then fills and drops), a sidecar that stops answering for `timeout` seconds is
disconnected, and a dead one is retried with backoff, the events queued meanwhile counted as failed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from kubeloop.log import event
from serving.metrics import PayloadMetrics

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")

log = logging.getLogger("kubeloop.serving.payload")


@dataclass(frozen=True)
class EventSource:
    """The attributes every event of this server carries."""

    source: str
    inference_service: str
    namespace: str
    endpoint: str = "default"
    component: str = "predictor"
    model_version: str = ""


def event_id(header_value: bytes | str | None) -> str:
    """The incoming Ce-Id if it is a safe header value, else a new UUID (KServe's getOrCreateID)."""
    if header_value:
        text = header_value.decode("latin-1") if isinstance(header_value, bytes) else header_value
        if _SAFE_ID.match(text):
            return text
    return str(uuid.uuid4())


def rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def cloudevent_headers(
    source: EventSource, ce_type: str, ce_id: str, when: float, content_type: str
) -> list[tuple[str, str]]:
    headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", ce_id),
        ("ce-type", ce_type),
        ("ce-source", source.source),
        ("ce-time", rfc3339(when)),
        ("ce-inferenceservicename", source.inference_service),
        ("ce-namespace", source.namespace),
        ("ce-component", source.component),
        ("ce-endpoint", source.endpoint),
        ("ce-metadata", "{}"),
    ]
    if source.model_version:
        headers.append(("ce-modelversion", source.model_version))
    headers.append(("content-type", content_type))
    return headers


class _Answers(asyncio.Protocol):
    """Reads the sidecar's pipelined HTTP/1.1 answers; the logger counts them."""

    def __init__(self, owner: PayloadLogger):
        self.owner = owner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        ok = bad = 0
        close = False
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            status_line, _, header_block = head.partition(b"\r\n")
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                close = True
                break
            lower = header_block.lower()
            length = 0
            at = lower.find(b"content-length:")
            if at >= 0:
                digits = lower[at + 15 :].split(b"\r\n", 1)[0].strip()
                length = int(digits) if digits.isdigit() else 0
            elif b"transfer-encoding:" in lower:
                close = True  # chunked answers are not expected from a sink: read no further, reconnect
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length :]
            if 200 <= int(parts[1]) < 300:
                ok += 1
            else:
                bad += 1
            if b"connection: close" in lower or parts[0] == b"HTTP/1.0":
                close = True
                break
        self.owner._answered(ok, bad)
        if close and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class PayloadLogger:
    def __init__(
        self,
        url: str,
        source: EventSource,
        *,
        metrics: PayloadMetrics | None = None,
        queue_size: int = 2000,
        max_in_flight: int = 1000,
        timeout: float = 5.0,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--logger-url {url!r}: expected http://HOST[:PORT]/PATH")
        self.url, self.source = url, source
        self._host, self._tls = parts.hostname, parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        # the part of every event that never changes, written once
        static = [("ce-specversion", "1.0"), ("ce-source", source.source)]
        static += [("ce-inferenceservicename", source.inference_service), ("ce-namespace", source.namespace)]
        static += [("ce-component", source.component), ("ce-endpoint", source.endpoint), ("ce-metadata", "{}")]
        if source.model_version:
            static.append(("ce-modelversion", source.model_version))
        self._prefix = f"POST {path} HTTP/1.1\r\nhost: {host_header}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in static
        )
        self.metrics = metrics or PayloadMetrics(registry=None)
        self.queue_size, self.max_in_flight, self.timeout = queue_size, max_in_flight, timeout
        self._queue: deque[tuple[str, float, bytes, bytes | None, str]] = deque()
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocol: _Answers | None = None
        self._connecting = False
        self._flush_scheduled = False
        self._in_flight = 0
        self._last_answer = 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._healthy = True
        self._closed = False
        self._ticker: asyncio.TimerHandle | None = None

    # ---- request path: one append per request, never a wait
    def log(self, ce_id: str, request_body: bytes, response_body: bytes | None, content_type: str) -> None:
        if len(self._queue) >= self.queue_size or self._closed:
            self.metrics.dropped.inc(1 if response_body is None else 2)
            return
        self._queue.append((ce_id, time.time(), request_body, response_body, content_type))
        if not self._flush_scheduled:
            if self._loop is None:
                self._start(asyncio.get_running_loop())
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ticker = loop.call_later(1.0, self._tick)

    async def close(self) -> None:
        """Stop sending without flushing: what is queued or unanswered is counted as dropped."""
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        left = sum(1 if item[3] is None else 2 for item in self._queue) + self._in_flight
        self._queue.clear()
        self._in_flight = 0
        if left:
            self.metrics.dropped.inc(left)
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    # ---- the sender, on the loop
    def _encode(self, ce_type: str, ce_id: str, stamp: str, body: bytes, content_type: str) -> bytes:
        return (
            f"{self._prefix}ce-id: {ce_id}\r\nce-type: {ce_type}\r\nce-time: {stamp}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or not self._queue:
            return
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            self._connect()
            return
        room = self.max_in_flight - self._in_flight
        if room <= 0:
            return  # the sidecar is behind: the queue absorbs, then drops
        chunks = []
        sent = 0
        queue = self._queue
        while queue and sent < room:
            ce_id, when, request_body, response_body, content_type = queue.popleft()
            stamp = rfc3339(when)
            chunks.append(self._encode(REQUEST_TYPE, ce_id, stamp, request_body, content_type))
            sent += 1
            if response_body is not None:
                chunks.append(self._encode(RESPONSE_TYPE, ce_id, stamp, response_body, content_type))
                sent += 1
        if not self._in_flight:
            self._last_answer = time.monotonic()
        self._in_flight += sent
        protocol.transport.write(b"".join(chunks))

    def _connect(self) -> None:
        if self._connecting or time.monotonic() < self._retry_at:
            return
        self._connecting = True
        self._loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            context = ssl.create_default_context() if self._tls else None
            _, protocol = await asyncio.wait_for(
                self._loop.create_connection(lambda: _Answers(self), self._host, self._port, ssl=context),
                self.timeout,
            )
        except (TimeoutError, OSError) as error:
            self._connecting = False
            self._backoff = min(max(self._backoff * 2, 0.05), 2.0)
            self._retry_at = time.monotonic() + self._backoff
            # what waits now cannot be delivered: count it failed rather than hold it back from fresh events
            failed = sum(1 if item[3] is None else 2 for item in self._queue)
            self._queue.clear()
            if failed:
                self.metrics.failed.inc(failed)
            self._unhealthy(error)
            return
        self._connecting = False
        self._protocol = protocol
        self._flush()

    def _answered(self, ok: int, bad: int) -> None:
        self._in_flight = max(0, self._in_flight - ok - bad)
        self._last_answer = time.monotonic()
        if ok:
            self.metrics.sent.inc(ok)
            self._backoff = 0.0
            if not self._healthy:
                self._healthy = True
                event(log, "payload.recovered", url=self.url)
        if bad:
            self.metrics.failed.inc(bad)
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _lost(self, protocol: _Answers) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._in_flight:
            self.metrics.failed.inc(self._in_flight)
            self._in_flight = 0
        if not self._closed:
            self._unhealthy("connection lost")
            if self._queue and not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _unhealthy(self, error: object) -> None:
        if self._healthy:
            self._healthy = False
            event(log, "payload.sidecar_unreachable", logging.WARNING, url=self.url, error=error)

    def _tick(self) -> None:
        """Once a second: drop a connection whose sidecar stopped answering; retry a pending connect."""
        if self._closed:
            return
        protocol = self._protocol
        if (
            protocol is not None
            and protocol.transport is not None
            and self._in_flight
            and time.monotonic() - self._last_answer > self.timeout
        ):
            self._unhealthy(f"no answer for {self.timeout:g}s")
            protocol.transport.abort()
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._ticker = self._loop.call_later(1.0, self._tick)
