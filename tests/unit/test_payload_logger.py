"""The payload logger: its batch encoding read back by the drift sidecar's own parser, and its sending, metrics and
sink_up gauge against real local TCP sinks (on the test's event loop) that accept, refuse, fail or go silent."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
import pytest

from kubeloop.feedback import FEEDBACK_TYPE
from monitoring.events import decode_batch, parse_envelope
from serving.payload_logger import (
    BATCH_CONTENT_TYPE,
    FEEDBACK_OPENING,
    REQUEST_OPENING,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    BatchEncoder,
    EventSource,
    PayloadLogger,
    _Answers,
    event_id,
)

SOURCE = EventSource("http://localhost:8080/", "arrests-isvc", "ml", "canary", "predictor", "4")
LABELS = {"model": "arrests", "version": "4"}
REQUEST = b'{"instances": [{"age": 21, "colour": "White"}]}'
RESPONSE = b'{"predictions":[0.25]}'


# ---------------------------------------------------------------- encoding
def test_a_batch_reads_back_as_the_events_kserve_logs() -> None:
    when = 1_700_000_000.25
    items = [
        ("trace-1", when, REQUEST, RESPONSE, "application/json", REQUEST_OPENING),
        (
            'odd"id\\',
            when + 1,
            REQUEST,
            None,
            "application/json",
            REQUEST_OPENING,
        ),  # answered non-200: no response event
    ]
    events = orjson.loads(BatchEncoder(SOURCE).encode(items))
    assert [(e["id"], e["type"]) for e in events] == [
        ("trace-1", REQUEST_TYPE),
        ("trace-1", RESPONSE_TYPE),
        ('odd"id\\', REQUEST_TYPE),
    ]
    common = {
        "specversion": "1.0",
        "source": "http://localhost:8080/",
        "inferenceservicename": "arrests-isvc",
        "namespace": "ml",
        "component": "predictor",
        "endpoint": "canary",
        "modelversion": "4",
        "datacontenttype": "application/json",
    }
    for e in events:
        assert {k: e[k] for k in common} == common
    assert events[0]["time"] == datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    assert events[2]["time"] == "2023-11-14T22:13:21.250000Z"
    assert [e["data"] for e in events] == [json.loads(REQUEST), json.loads(RESPONSE), json.loads(REQUEST)]
    # what the drift sidecar makes of them
    parsed = [parse_envelope(e) for e in decode_batch(BatchEncoder(SOURCE).encode(items))]
    assert [(meta.type, meta.id, meta.model_version, meta.endpoint) for meta, _ in parsed] == [
        ("request", "trace-1", 4, "canary"),
        ("response", "trace-1", 4, "canary"),
        ("request", 'odd"id\\', 4, "canary"),
    ]
    assert parsed[1][1] == {"predictions": [0.25]}


def test_a_feedback_body_goes_as_one_event_of_its_own_type() -> None:
    feedback = b'{"feedback": [{"id": "trace-1", "label": "Yes"}]}'
    items = [
        ("trace-1", 0.0, REQUEST, RESPONSE, "application/json", REQUEST_OPENING),
        ("fb-1", 5.0, feedback, None, "application/json", FEEDBACK_OPENING),
    ]
    events = orjson.loads(BatchEncoder(SOURCE).encode(items))
    assert [(e["id"], e["type"]) for e in events][2:] == [("fb-1", FEEDBACK_TYPE)]
    assert events[2]["data"] == json.loads(feedback) and events[2]["modelversion"] == "4"


def test_json_bodies_are_embedded_byte_for_byte() -> None:
    body = b'{ "instances" :[ {"name": "\\u00e9t\\u00e9", "x": 1.50e0, "y": -0.0} ] }'
    answer = b'{"predictions": [1E-3]}'
    for content_type in ("application/json", "application/json; charset=utf-8", "application/vnd.kubeloop+json"):
        encoded = BatchEncoder(SOURCE).encode([("a", 0.0, body, answer, content_type, REQUEST_OPENING)])
        assert b'"data":' + body + b"}" in encoded and b'"data":' + answer + b"}" in encoded
        assert [e["data"] for e in orjson.loads(encoded)] == [json.loads(body), json.loads(answer)]


def test_other_content_goes_as_data_base64() -> None:
    raw = b"\x00\xff not json"
    events = orjson.loads(
        BatchEncoder(SOURCE).encode([("a", 0.0, raw, b"[1]", "application/octet-stream", REQUEST_OPENING)])
    )
    assert [base64.b64decode(e["data_base64"]) for e in events] == [raw, b"[1]"]
    assert all("data" not in e and e["datacontenttype"] == "application/octet-stream" for e in events)
    empty = orjson.loads(BatchEncoder(SOURCE).encode([("b", 0.0, b"", None, "application/json", REQUEST_OPENING)]))
    assert empty[0]["data_base64"] == ""  # no body is no JSON value: never `"data":` followed by nothing


def test_event_ids_are_passed_on_or_made() -> None:
    assert event_id(b"abc-1") == "abc-1"
    made = event_id(None)
    assert len(made) == 36 and made != event_id(None)
    assert event_id(b"bad id with spaces") != "bad id with spaces"


class _Owner:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    def _answered(self, statuses: list[int]) -> None:
        self.statuses += statuses

    def _lost(self, _protocol: object) -> None:
        pass


def test_pipelined_answers_are_read_across_reads() -> None:
    owner = _Owner()
    protocol = _Answers(owner)  # type: ignore[arg-type]
    answer = b'{"accepted":2,"rejected":0,"reasons":{}}'
    stream = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
        b"HTTP/1.1 503 Busy\r\ncontent-length: 3\r\n\r\nbad"
    ) % (len(answer), answer)
    for i in range(0, len(stream), 7):
        protocol.data_received(stream[i : i + 7])
    assert owner.statuses == [200, 200, 503] and protocol.buffer == b""


# ---------------------------------------------------------------- sending, against real sinks
class Sink(asyncio.Protocol):
    """A local HTTP sink: `mode` ok (200 and a batch answer), error (500), reset (dies on the first request: the
    connection closed unanswered, the port closed), silent (on the first request stops listening and never answers)."""

    def __init__(self, server: SinkServer) -> None:
        self.server, self.buffer = server, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.connections.append(transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in head[1:])
            length = int(headers["content-length"])
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
            self.server.requests.append((head[0], headers, body))
            mode = self.server.mode
            if mode in ("reset", "silent"):
                self.server.server.close()
                if mode == "reset":
                    self.transport.close()
                return
            if mode == "ok":
                answer = b'{"accepted":%d,"rejected":0}' % len(json.loads(body))
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(answer), answer))
            elif mode == "error":
                self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")


class SinkServer:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections: list[asyncio.BaseTransport] = []

    async def start(self) -> str:
        self.server = await asyncio.get_running_loop().create_server(lambda: Sink(self), "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/events"

    def events(self) -> list[dict]:
        return [event for _, _, body in self.requests for event in json.loads(body)]


def closed_port() -> int:
    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def value(logger: PayloadLogger, name: str) -> float:
    found = logger.metrics.registry.get_sample_value(name, LABELS)
    assert found is not None, name
    return found


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def new_logger(url: str, **options: object) -> PayloadLogger:
    return PayloadLogger(url, SOURCE, model="arrests", registry=None, **options)  # type: ignore[arg-type]


def test_requests_are_sent_in_few_batches_and_counted_sent() -> None:
    async def scenario() -> None:
        sink = SinkServer("ok")
        logger = new_logger(await sink.start())
        logger.start()
        await until(lambda: value(logger, "kubeloop_payload_sink_up") == 1)  # up before any request
        for i in range(100):
            logger.log(f"r{i}", REQUEST, RESPONSE if i % 2 == 0 else None, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_sent_total") == 150)
        assert len(sink.requests) == 1  # all queued within the linger: one POST
        line, headers, _ = sink.requests[0]
        assert line == "POST /events HTTP/1.1" and headers["content-type"] == BATCH_CONTENT_TYPE
        events = sink.events()
        assert [e["id"] for e in events if e["type"] == REQUEST_TYPE] == [f"r{i}" for i in range(100)]
        assert sum(e["type"] == RESPONSE_TYPE for e in events) == 50
        assert value(logger, "kubeloop_payload_events_failed_total") == 0
        assert value(logger, "kubeloop_payload_queue_depth") == 0
        await logger.close()
        assert value(logger, "kubeloop_payload_events_dropped_total") == 0

    run(scenario)


def test_batches_are_capped_and_pipelined() -> None:
    async def scenario() -> None:
        sink = SinkServer("ok")
        logger = new_logger(await sink.start(), max_batch_events=10, max_in_flight=2, max_batch_bytes=10_000)
        for i in range(25):
            logger.log(f"r{i}", REQUEST, RESPONSE, "application/json")  # 50 events
        big = b'{"instances": [' + b",".join([b'{"age": 1}'] * 2000) + b"]}"  # ~22 kB: over the byte cap alone
        logger.log("big", big, None, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_sent_total") == 51)
        sizes = [len(json.loads(body)) for _, _, body in sink.requests]
        assert sizes == [10, 10, 10, 10, 10, 1]  # pairs never split; the big event alone
        assert len(sink.connections) == 1  # one keep-alive connection
        await logger.close()

    run(scenario)


def test_an_unreachable_sink_fails_events_and_sink_up_says_so() -> None:
    async def scenario() -> None:
        logger = new_logger(f"http://127.0.0.1:{closed_port()}/")
        logger.start()
        await until(lambda: value(logger, "kubeloop_payload_sink_up") == 0)
        await asyncio.sleep(0.1)  # past the first backoff (50 ms)
        logger.log("a", REQUEST, RESPONSE, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_failed_total") == 2)
        assert value(logger, "kubeloop_payload_events_sent_total") == 0
        await logger.close()

    run(scenario)


def test_a_sink_answering_5xx_fails_its_batch_then_recovers() -> None:
    async def scenario() -> None:
        sink = SinkServer("error")
        logger = new_logger(await sink.start())
        logger.log("a", REQUEST, RESPONSE, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_failed_total") == 2)
        assert value(logger, "kubeloop_payload_sink_up") == 0
        sink.mode = "ok"
        logger.log("b", REQUEST, None, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_sent_total") == 1)
        assert value(logger, "kubeloop_payload_sink_up") == 1
        assert value(logger, "kubeloop_payload_events_failed_total") == 2
        await logger.close()

    run(scenario)


def test_a_reset_connection_fails_what_was_unanswered() -> None:
    async def scenario() -> None:
        sink = SinkServer("reset")
        logger = new_logger(await sink.start())
        logger.log("a", REQUEST, RESPONSE, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_failed_total") == 2)
        assert value(logger, "kubeloop_payload_sink_up") == 0
        await logger.close()

    run(scenario)


def test_a_silent_sink_times_out() -> None:
    async def scenario() -> None:
        sink = SinkServer("silent")
        logger = new_logger(await sink.start(), timeout=0.2)
        logger.log("a", REQUEST, RESPONSE, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_failed_total") == 2, timeout=5)  # the 1 s tick
        assert value(logger, "kubeloop_payload_sink_up") == 0
        await logger.close()

    run(scenario)


def test_a_sink_closing_an_idle_connection_is_no_failure() -> None:
    async def scenario() -> None:
        sink = SinkServer("ok")
        logger = new_logger(await sink.start())
        logger.log("a", REQUEST, RESPONSE, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_sent_total") == 2)
        sink.connections[0].close()  # as uvicorn does after its keep-alive timeout
        await until(lambda: len(sink.connections) == 2, timeout=5)  # reopened by the tick
        logger.log("b", REQUEST, RESPONSE, "application/json")
        await until(lambda: value(logger, "kubeloop_payload_events_sent_total") == 4)
        assert value(logger, "kubeloop_payload_events_failed_total") == 0
        assert value(logger, "kubeloop_payload_sink_up") == 1
        await logger.close()

    run(scenario)


def test_a_full_queue_drops_and_counts() -> None:
    async def scenario() -> None:
        logger = new_logger("http://127.0.0.1:9/", queue_size=3)
        for _ in range(5):  # nothing runs between these appends: the queue cannot drain
            logger.log("id", b"{}", b"{}", "application/json")
        await logger.close()
        assert value(logger, "kubeloop_payload_events_dropped_total") == 2 * 2 + 3 * 2  # 2 refused, 3 left unsent

    run(scenario)


def test_metrics_carry_the_model_and_version() -> None:
    logger = new_logger("http://127.0.0.1:9/")
    names = {metric.name: metric for metric in logger.metrics.registry.collect()}
    for name in ("kubeloop_payload_events_sent", "kubeloop_payload_events_failed", "kubeloop_payload_events_dropped"):
        assert [s.labels for s in names[name].samples if s.name.endswith("_total")] == [LABELS]
    for name in ("kubeloop_payload_queue_depth", "kubeloop_payload_sink_up"):
        assert [s.labels for s in names[name].samples] == [LABELS]
    with pytest.raises(ValueError, match="expected http://HOST"):
        new_logger("ftp://sidecar/")
