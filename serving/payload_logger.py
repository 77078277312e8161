"""Payload logging to the drift sidecar: KServe logger CloudEvents, sent in batches off the request path.

The events are those of KServe's logger agent (kserve/kserve pkg/logger): a request event for every logged
inference request, a response event for a 200, both with the request's Ce-Id (else a new UUID). They go in
CloudEvents *batched* content mode: one HTTP POST carries the events queued since the previous one, as a JSON
array of structured events:

    POST <path>
    content-type: application/cloudevents-batch+json

    [{"specversion": "1.0", "type": "org.kubeflow.serving.inference.request", "id": "<Ce-Id>",
      "time": "<RFC 3339>", "source": "<--source-uri>", "inferenceservicename": "...", "namespace": "...",
      "component": "predictor", "endpoint": "default", "modelversion": "<N>",
      "datacontenttype": "<the request's Content-Type>", "data": <the body>}, ...]

`data` is the body's bytes, embedded without being decoded or encoded again: a body of a JSON content type was
parsed as JSON by the server that answered it (the server logs no request it refused). A body of any other
content type goes as `data_base64`. The sidecar answers a batch 200 with the events it took and refused; an event
it refuses is its finding about that event (its malformed metric counts it), not a failed delivery.

`log()` is one append to a bounded deque (full: the events are dropped and counted), no I/O and no await. The
sender is a callback on the server's event loop -- no thread, so no GIL hand-offs -- that runs `linger` seconds
after an event finds it idle, encodes at most `max_batch_events` events or about `max_batch_bytes` per POST and
writes them over one keep-alive HTTP/1.1 connection, pipelining at most `max_in_flight` unanswered POSTs: a
slower sidecar gets fuller batches, then the queue fills and drops. A sidecar that stops answering for `timeout`
seconds is disconnected, a dead one is retried with backoff (the events queued meanwhile are counted failed).
The connection is held while idle, and reopened before a sink's keep-alive timeout (uvicorn's: 5 s) could close
it under a write, so `kubeloop_payload_sink_up` tells whether the sink is reachable without traffic too.

Cost on the server (one-row requests, 2-core development machine): `log()` 0.2 µs; encoding 0.5 µs an event;
all of the sender's work, the writes and the answers included, ~3 µs a request at 2,500 requests/s with the
default `linger` of 50 ms (~5.5 µs with 10 ms: fewer, fuller batches spend less on writes and answers).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from kubeloop.feedback import FEEDBACK_TYPE
from kubeloop.log import event

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
IDLE_S = 3.0  # an idle connection is reopened after 3-4 s: before a sink's keep-alive timeout (uvicorn: 5 s)
_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_EVENT_OVERHEAD = 400  # bytes of one event's attributes, for the batch size limit

log = logging.getLogger("kubeloop.serving.payload")

# (ce_id, time.time(), request body, response body or None, content type, the first event's opening bytes): one
# logged request (its request event and, for a 200, its response event), or one feedback body (a feedback event)
Item = tuple[str, float, bytes, bytes | None, str, bytes]


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


class PayloadMetrics:
    """The payload logger's metrics, labelled by the model and version whose events it sends."""

    def __init__(self, model: str, version: str, registry: CollectorRegistry | None = REGISTRY):
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        labels = ("model", "version")

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, labels, registry=registry).labels(model, version)

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, labels, registry=registry).labels(model, version)

        self.sent = counter("kubeloop_payload_events_sent", "CloudEvents the sink acknowledged (a 2xx to their batch).")
        self.failed = counter(
            "kubeloop_payload_events_failed",
            "CloudEvents not delivered because the sink failed: unreachable, connection reset, no answer within the "
            "timeout, or a non-2xx answer to their batch.",
        )
        self.dropped = counter(
            "kubeloop_payload_events_dropped",
            "CloudEvents dropped unsent: the queue was full (the sink slow or down) or the server stopped.",
        )
        self.queue_depth = gauge("kubeloop_payload_queue_depth", "Logged requests whose CloudEvents wait to be sent.")
        self.sink_up = gauge(
            "kubeloop_payload_sink_up",
            "1 when the sink's last connection attempt or answer succeeded, 0 while it is unreachable, times out or "
            "answers non-2xx.",
        )


class BatchEncoder:
    """Logged requests as one CloudEvents batch body: the attributes that never change encoded once, each body's
    bytes embedded as they are."""

    def __init__(self, source: EventSource):
        static = {
            "source": source.source,
            "inferenceservicename": source.inference_service,
            "namespace": source.namespace,
            "component": source.component,
            "endpoint": source.endpoint,
        }
        if source.model_version:
            static["modelversion"] = source.model_version
        self._static = orjson.dumps(static)[1:-1] + b","
        self._second = -1
        self._second_text = b""
        self._content_types: dict[str, tuple[bytes, bool]] = {}

    def encode(self, items: Sequence[Item]) -> bytes:
        if not items:
            return b"[]"
        parts = [b"["]
        append = parts.append
        for ce_id, when, request, response, content_type, opening in items:
            quoted_type, is_json = self._content_type(content_type)
            attributes = b'"id":%b,"time":"%b",%b"datacontenttype":%b,' % (
                orjson.dumps(ce_id),
                self._stamp(when),
                self._static,
                quoted_type,
            )
            append(opening)
            append(attributes)
            _data(append, request, is_json)
            if response is not None:
                append(RESPONSE_OPENING)
                append(attributes)
                _data(append, response, is_json)
        parts[-1] = b"}]"  # the last event's "},"
        return b"".join(parts)

    def _stamp(self, when: float) -> bytes:
        """RFC 3339 in UTC to the microsecond; the date and time of day formatted once a second."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return b"%b.%06dZ" % (self._second_text, int((when - second) * 1e6))

    def _content_type(self, content_type: str) -> tuple[bytes, bool]:
        known = self._content_types.get(content_type)
        if known is None:
            media = content_type.partition(";")[0].strip().lower()
            known = (orjson.dumps(content_type), media == "application/json" or media.endswith("+json"))
            if len(self._content_types) >= 32:  # a client's headers decide these: keep a few
                self._content_types.clear()
            self._content_types[content_type] = known
        return known


REQUEST_OPENING = b'{"specversion":"1.0","type":"' + REQUEST_TYPE.encode() + b'",'
RESPONSE_OPENING = b'{"specversion":"1.0","type":"' + RESPONSE_TYPE.encode() + b'",'
FEEDBACK_OPENING = b'{"specversion":"1.0","type":"' + FEEDBACK_TYPE.encode() + b'",'


def _data(append: Callable[[bytes], None], body: bytes, is_json: bool) -> None:
    if is_json and body:
        append(b'"data":')
        append(body)
    else:
        append(b'"data_base64":"')
        append(base64.b64encode(body))
        append(b'"')
    append(b"},")


class _Answers(asyncio.Protocol):
    """Reads the sink's pipelined HTTP/1.1 answers and hands their status codes to the logger, in order."""

    def __init__(self, owner: PayloadLogger):
        self.owner = owner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        statuses: list[int] = []
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
            statuses.append(int(parts[1]))
            if b"connection: close" in lower or parts[0] == b"HTTP/1.0":
                close = True
                break
        if statuses:
            self.owner._answered(statuses)
        if close and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class PayloadLogger:
    """Queues each logged request's events and sends them in batches to `url` (see the module's docstring).

    `model` and `source.model_version` label its metrics (`registry`: None for a registry of its own).
    """

    def __init__(
        self,
        url: str,
        source: EventSource,
        *,
        model: str,
        registry: CollectorRegistry | None = REGISTRY,
        queue_size: int = 2000,
        max_in_flight: int = 4,
        timeout: float = 5.0,
        linger: float = 0.05,
        max_batch_events: int = 256,
        max_batch_bytes: int = 1 << 20,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--logger-url {url!r}: expected http://HOST[:PORT]/PATH")
        self.url, self.source = url, source
        self._host, self._tls = parts.hostname, parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._head = (
            f"POST {path} HTTP/1.1\r\nhost: {host_header}\r\ncontent-type: {BATCH_CONTENT_TYPE}\r\ncontent-length: "
        ).encode("latin-1")
        self.encoder = BatchEncoder(source)
        self.metrics = PayloadMetrics(model, source.model_version, registry)
        self.queue_size, self.max_in_flight, self.timeout, self.linger = queue_size, max_in_flight, timeout, linger
        self.max_batch_events, self.max_batch_bytes = max_batch_events, max_batch_bytes
        self._queue: deque[Item] = deque()
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocol: _Answers | None = None
        self._connecting = False
        self._flush_scheduled = False
        self._in_flight: deque[int] = deque()  # events of each POST written and not yet answered, oldest first
        self._last_answer = 0.0  # monotonic: the last answer, or the first write after none was unanswered
        self._last_used = 0.0  # monotonic: the last write or answer on the connection
        self._retry_at = 0.0
        self._backoff = 0.0
        self._up: bool | None = None  # the sink as last seen; None before the first attempt
        self._refusing = False  # its last answer was not a 2xx: a new connection alone does not make it up
        self._closed = False
        self._ticker: asyncio.TimerHandle | None = None

    # ---- request path: one append per request, never a wait
    def log(self, ce_id: str, request_body: bytes, response_body: bytes | None, content_type: str) -> None:
        if len(self._queue) >= self.queue_size or self._closed:
            self.metrics.dropped.inc(1 if response_body is None else 2)
            return
        self._enqueue((ce_id, time.time(), request_body, response_body, content_type, REQUEST_OPENING))

    def log_feedback(self, body: bytes) -> None:
        """A feedback body (kubeloop/feedback.py, already checked) as one event of its own type and a new id."""
        if len(self._queue) >= self.queue_size or self._closed:
            self.metrics.dropped.inc()
            return
        self._enqueue((str(uuid.uuid4()), time.time(), body, None, "application/json", FEEDBACK_OPENING))

    def _enqueue(self, item: Item) -> None:
        self._queue.append(item)
        if not self._flush_scheduled:
            if self._loop is None:
                self.start()
            self._flush_scheduled = True
            self._loop.call_later(self.linger, self._flush)

    def start(self) -> None:
        """Connect and watch the connection, on the running event loop (the first `log()` starts it otherwise):
        started with the server, `kubeloop_payload_sink_up` is right before the first request."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ticker = self._loop.call_later(1.0, self._tick)
        self._connect()

    async def close(self) -> None:
        """Stop sending without flushing: what is queued or unanswered is counted as dropped."""
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        left = sum(1 if item[3] is None else 2 for item in self._queue) + sum(self._in_flight)
        self._queue.clear()
        self._in_flight.clear()
        if left:
            self.metrics.dropped.inc(left)
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    # ---- the sender, on the loop
    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or not self._queue:
            return
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            self._connect()  # flushes once connected
            return
        queue, in_flight, requests = self._queue, self._in_flight, []
        while queue and len(in_flight) < self.max_in_flight:
            items: list[Item] = []
            events = size = 0
            while queue:
                _, _, request, response, _, _ = queue[0]
                count = 1 if response is None else 2
                more = len(request) + (len(response) if response is not None else 0) + count * _EVENT_OVERHEAD
                if items and (events + count > self.max_batch_events or size + more > self.max_batch_bytes):
                    break
                items.append(queue.popleft())
                events += count
                size += more
            body = self.encoder.encode(items)
            requests.append(b"%b%d\r\n\r\n%b" % (self._head, len(body), body))
            in_flight.append(events)
        if not requests:
            return  # the sink is behind: the queue absorbs, then drops
        now = time.monotonic()
        if len(in_flight) == len(requests):
            self._last_answer = now  # the timeout runs from the first unanswered write
        self._last_used = now
        protocol.transport.write(requests[0] if len(requests) == 1 else b"".join(requests))

    def _connect(self) -> None:
        if self._connecting or self._closed or time.monotonic() < self._retry_at:
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
            self._down(error)
            return
        self._connecting = False
        if self._closed:
            protocol.transport.abort()
            return
        self._protocol = protocol
        self._backoff = 0.0
        self._last_used = time.monotonic()
        if not self._refusing:
            self._set_up()
        self._flush()

    def _answered(self, statuses: list[int]) -> None:
        now = time.monotonic()
        self._last_answer = self._last_used = now
        sent = failed = 0
        in_flight = self._in_flight
        for status in statuses:
            if not in_flight:
                break  # an answer to nothing asked: not counted
            if 200 <= status < 300:
                sent += in_flight.popleft()
            else:
                failed += in_flight.popleft()
        if sent:
            self.metrics.sent.inc(sent)
        if failed:
            self.metrics.failed.inc(failed)
        self._refusing = not 200 <= statuses[-1] < 300
        if self._refusing:
            self._down(f"answered {statuses[-1]}")
        else:
            self._set_up()
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _lost(self, protocol: _Answers) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        unanswered = sum(self._in_flight)
        self._in_flight.clear()
        if self._closed:
            return
        if unanswered:  # a sink closing an idle connection is no failure; one that drops what it was sent is
            self.metrics.failed.inc(unanswered)
            self._down("connection lost")
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _set_up(self) -> None:
        if self._up is not True:
            if self._up is False:
                event(log, "payload.recovered", url=self.url)
            self._up = True
            self.metrics.sink_up.set(1)

    def _down(self, error: object) -> None:
        if self._up is not False:
            self._up = False
            self.metrics.sink_up.set(0)
            event(log, "payload.sidecar_unreachable", logging.WARNING, url=self.url, error=error)

    def _tick(self) -> None:
        """Once a second: drop a connection whose sink stopped answering, reopen an idle one before the sink's
        keep-alive timeout closes it, retry a connection that failed."""
        if self._closed:
            return
        now = time.monotonic()
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None and not protocol.transport.is_closing():
            if self._in_flight and now - self._last_answer > self.timeout:
                self._down(f"no answer for {self.timeout:g}s")
                protocol.transport.abort()
            elif not self._in_flight and now - self._last_used > IDLE_S:
                self._protocol = None
                protocol.transport.close()
                self._connect()
        elif protocol is None:
            self._connect()
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._ticker = self._loop.call_later(1.0, self._tick)
