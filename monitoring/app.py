"""The drift sidecar's ASGI application: event ingestion (the hot path), the detection thread, /status, /metrics."""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from kubeloop.api.modelversion import ModelVersion
from kubeloop.asgi import lifespan, respond
from kubeloop.feedback import LabelError, parse_feedback
from kubeloop.log import event
from monitoring.config import LOG_EVERY_S, SidecarConfig
from monitoring.detection import evaluate_window
from monitoring.events import BATCH, EventMeta, Malformed, decode_batch, parse_envelope, parse_event
from monitoring.metrics import EventCounters, Metrics, OutcomeMetrics
from monitoring.outcomes import OutcomeJoin
from monitoring.predictions import parse_predictions
from monitoring.status import version_status
from monitoring.versions import VersionMonitor, build_monitor

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Requests of one batch for one version whose rows are all objects: converted together."""

    monitor: VersionMonitor
    payloads: list[Any] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # the first row of each request among `rows`

    def add(self, payload: Any, rows: list[dict[str, Any]]) -> None:
        self.payloads.append(payload)
        self.starts.append(len(self.rows))
        self.rows.extend(rows)


@dataclass
class _Batch:
    groups: dict[int, _Group] = field(default_factory=dict)  # by version
    rejected: dict[str, int] = field(default_factory=dict)  # events by reason

    def group(self, monitor: VersionMonitor) -> _Group:
        group = self.groups.get(monitor.version)
        if group is None:
            group = self.groups[monitor.version] = _Group(monitor)
        return group

    def refused(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass
class _Job:
    monitor: VersionMonitor
    columns: list[list[Any]]
    events: int


class DriftSidecar:
    """The ASGI application (no framework: four routes, and the event route is the hot path)."""

    def __init__(self, monitors: Sequence[VersionMonitor], config: SidecarConfig, default_version: int) -> None:
        self.read_only_ports: frozenset[int] = frozenset()  # local ports of the read-only (metrics) listener
        self.monitors = {m.version: m for m in monitors}
        if default_version not in self.monitors:
            raise ValueError(f"default version {default_version} is not one of {sorted(self.monitors)}")
        self.default = self.monitors[default_version]
        self.config = config
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.metrics = Metrics(self.registry)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.detection_queue)
        self.metrics.pending.set_function(self._jobs.qsize)
        self.counters = EventCounters(list(self.monitors.values()))
        self.registry.register(self.counters)
        self.outcomes = OutcomeJoin(self.default.task, self.default.classes, window=config.window)
        self.registry.register(OutcomeMetrics(self.outcomes, list(self.monitors.values())))
        self._received = self.counters.received
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.started = time.time()
        self._thread = threading.Thread(target=self._detect_loop, name="drift-detector", daemon=True)
        for monitor in self.monitors.values():
            self.metrics.detected.labels(*monitor.labels).set(0)
            for result in ("drift", "no_drift", "dropped", "error"):
                self.metrics.windows.labels(*monitor.labels, result)

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued window was tested (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._jobs.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    # ---- ingestion (event loop) --------------------------------------------------------------------------------
    def ingest(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """Take one event; returns an HTTP status and, for a rejected event, the reason."""
        try:
            meta, payload = parse_event(headers, body)
        except Malformed as error:
            self._received["unknown"] += 1
            return self._reject(error)
        return self._take(meta, payload)

    def ingest_batch(self, body: bytes) -> tuple[int, bytes]:
        """Take a batched-mode body: 200 with the events accepted and rejected (each rejected one counted and logged
        as it would be alone), 4xx only when the body is no batch at all.

        Each event is checked as it would be alone, but the rows of the requests in the common form (objects of the
        signature's features) are converted and appended once per version and batch, not once per event.
        """
        try:
            envelopes = decode_batch(body)
        except Malformed as error:
            self._received["unknown"] += 1
            status, reason = self._reject(error)
            return status, b'{"error":"' + reason.encode() + b'"}'
        batch = _Batch()
        for envelope in envelopes:
            try:
                meta, payload = parse_envelope(envelope)
            except Malformed as error:
                self._received["unknown"] += 1
                batch.refused(self._reject(error)[1])
                continue
            status, reason = self._take(meta, payload, batch)
            if status != 200:
                batch.refused(reason)
        for group in list(batch.groups.values()):
            self._take_group(group, batch)
        refused = sum(batch.rejected.values())
        answer = {"accepted": len(envelopes) - refused, "rejected": refused, "reasons": batch.rejected}
        return 200, json.dumps(answer, separators=(",", ":")).encode()

    def _take(self, meta: EventMeta, payload: Any, batch: _Batch | None = None) -> tuple[int, str]:
        self._received[meta.type] += 1
        try:
            monitor = self.monitors.get(meta.model_version) if meta.model_version is not None else self.default
            if monitor is None:
                raise Malformed(
                    "unknown_version", f"ce-modelversion {meta.model_version}: have {sorted(self.monitors)}"
                )
            if meta.type == "request":
                if batch is not None:
                    objects = monitor.parser.object_rows(payload)
                    if objects is not None:
                        batch.group(monitor).add(payload, objects)
                        return 200, ""
                    group = batch.groups.get(monitor.version)
                    if group is not None:  # rows go to the window in the order of their events
                        self._take_group(group, batch)
                rows = monitor.parser.parse(payload)
                monitor.requests += 1
                self._append(monitor, rows.n, rows.columns)
            elif meta.type == "response":
                predictions = parse_predictions(payload, monitor.task, len(monitor.classes))
                monitor.responses += 1
                monitor.predictions.extend(predictions)
                self.counters.observe(monitor.labels, predictions)
                self.outcomes.served(meta.id, monitor.version, predictions)
            else:
                self._feedback(monitor, payload)
        except Malformed as error:
            return self._reject(error)
        return 200, ""

    def _feedback(self, monitor: VersionMonitor, payload: Any) -> None:
        """Labels joined to the predictions served under their request ids (whichever version served them)."""
        if monitor.signature is None:
            raise Malformed("bad_feedback", f"version {monitor.version} was monitored without its signature")
        try:
            entries = parse_feedback(payload, monitor.signature)
        except LabelError as error:
            raise Malformed("bad_feedback", str(error)) from error
        for entry in entries:
            self.outcomes.label(entry.request_id, entry.labels)

    def _take_group(self, group: _Group, batch: _Batch) -> None:
        """The requests of a batch grouped for one version: converted at once, or when one of them is malformed
        one by one, as alone."""
        del batch.groups[group.monitor.version]
        monitor = group.monitor
        try:
            columns = monitor.parser.convert_objects(group.rows)
        except (Malformed, KeyError):
            for payload in group.payloads:
                try:
                    rows = monitor.parser.parse(payload)
                except Malformed as error:
                    batch.refused(self._reject(error)[1])
                    continue
                monitor.requests += 1
                self._append(monitor, rows.n, rows.columns)
            return
        monitor.requests += len(group.payloads)
        self._append(monitor, len(group.rows), columns, group.starts)

    def _append(self, monitor: VersionMonitor, n: int, columns: list[list[Any]], starts: Sequence[int] = (0,)) -> None:
        """Rows into the version's window, handing full windows off; `starts`: the first row of each event among
        them (a window counts the events that begin in it)."""
        monitor.rows += n
        self.counters.rows[monitor.labels] += n
        start = 0
        while start < n:
            take = min(n - start, monitor.window - monitor.filled)
            whole = start == 0 and take == n
            for target, source in zip(monitor.columns, columns, strict=True):
                target.extend(source if whole else source[start : start + take])
            monitor.window_events += (
                len(starts) if whole else bisect_left(starts, start + take) - bisect_left(starts, start)
            )
            monitor.filled += take
            start += take
            if monitor.filled >= monitor.window:
                self._hand_off(monitor)

    def _hand_off(self, monitor: VersionMonitor) -> None:
        job = _Job(monitor, monitor.columns, monitor.window_events)
        monitor.columns = [[] for _ in monitor.schema.features]
        monitor.filled = 0
        monitor.window_events = 0
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            monitor.dropped_windows += 1
            self.counters.dropped += job.events
            self.metrics.windows.labels(*monitor.labels, "dropped").inc()
            self._log_limited("window_dropped", "detection queue full", events=job.events, version=monitor.version)

    def _reject(self, error: Malformed) -> tuple[int, str]:
        self.counters.malformed[error.reason] += 1
        self._log_limited(error.reason, error.detail)
        return (413 if error.reason == "too_large" else 400), error.reason

    def _log_limited(self, reason: str, detail: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(reason, -math.inf) < LOG_EVERY_S:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_logged[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        name = "window_dropped" if reason == "window_dropped" else "malformed_event"
        extra = {} if name == "window_dropped" else {"reason": reason}
        detail = "".join(c if c.isprintable() else "?" for c in detail[:200])  # one line, whatever the sender sent
        event(log, name, logging.WARNING, **extra, detail=detail, **fields, suppressed_since_last=suppressed)

    # ---- detection (its own thread) ----------------------------------------------------------------------------
    def _detect_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                evaluate_window(job.monitor, job.columns, self.metrics)
                self.outcomes.refresh_estimate(job.monitor.version)
            except Exception as error:  # a detector failure costs one window, never the process
                job_monitor = job.monitor if job else None
                if job_monitor is not None:
                    job_monitor.errors += 1
                    self.metrics.windows.labels(*job_monitor.labels, "error").inc()
                event(log, "detector_error", logging.ERROR, error=repr(error)[:300])
            finally:
                self._jobs.task_done()

    # ---- status ------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        versions = {str(v): version_status(m, self.default) for v, m in self.monitors.items()}
        for version, status in versions.items():
            status["outcomes"] = self.outcomes.status(int(version))
        return {
            "defaultVersion": self.default.version,
            "detector": self.config.detector,
            "window": self.config.window,
            "rule": {
                "alpha": self.config.p_value,
                "correction": self.config.correction if self.config.detector == "ks" else "none",
                "alarm": f"Drift when >= {self.config.alarm_k} of the last {self.config.alarm_m} windows are flagged",
                "k": self.config.alarm_k,
                "m": self.config.alarm_m,
            },
            "events": {
                "received": sum(self.counters.received.values()),
                "malformed": {k: v for k, v in self.counters.malformed.items() if v},
                "dropped": self.counters.dropped,
            },
            "feedback": {result: self.outcomes.results[result] for result in sorted(self.outcomes.results)},
            "pendingWindows": self._jobs.qsize(),
            "uptimeSeconds": round(time.time() - self.started, 3),
            "versions": versions,
        }

    # ---- ASGI --------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan(receive, send)
            return
        if kind != "http":
            return
        method = scope["method"]
        if method == "POST":
            if self.read_only_ports and (scope.get("server") or ("", 0))[1] in self.read_only_ports:
                await respond(send, 405, b'{"error":"read-only listener: GET /metrics /status /healthz"}', close=True)
                return
            await self._post(scope, receive, send)
            return
        path = scope["path"]
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b'{"error":"POST events, GET /metrics /status /healthz"}')
        elif path == "/metrics":
            await respond(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
        elif path == "/status":
            await respond(send, 200, json.dumps(self.status()).encode())
        elif path in ("/healthz", "/readyz", "/"):
            alive = self._thread.is_alive()
            await respond(send, 200 if alive else 503, b'{"status":"ok"}' if alive else b'{"status":"detector dead"}')
        else:
            await respond(send, 404, b'{"error":"not found"}')

    async def _post(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers: dict[str, str] = {}
        length = -1
        known = _HEADERS
        for name, value in scope["headers"]:  # ASGI servers give lower-case names
            key = known.get(name)
            if key is not None:
                headers[key] = value.decode("latin-1")
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
        limit = self.config.max_body_bytes
        if length > limit:
            self._received["unknown"] += 1
            status, reason = self._reject(Malformed("too_large", f"content-length {length} > {limit}"))
            await respond(send, status, b'{"error":"too_large"}', close=True)
            return
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body"):
            chunks = [body]
            size = len(body)
            while message.get("more_body"):
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    self._received["unknown"] += 1
                    status, _ = self._reject(Malformed("too_large", f"body over {limit} bytes"))
                    await respond(send, status, b'{"error":"too_large"}', close=True)
                    return
                chunks.append(chunk)
            body = b"".join(chunks)
        if headers.get("content-type", "").startswith(BATCH):
            status, answer = self.ingest_batch(body)
            await respond(send, status, answer)
            return
        status, reason = self.ingest(headers, body)
        if status == 200:
            await send(_OK_START)
            await send(_EMPTY_BODY)
        else:
            await respond(send, status, b'{"error":"' + reason.encode() + b'"}')


# the headers the sidecar reads (CloudEvents attributes it uses, and the content type for structured mode)
_HEADERS = {
    name.encode(): name
    for name in (
        "content-type",
        "ce-specversion",
        "ce-type",
        "ce-id",
        "ce-source",
        "ce-inferenceservicename",
        "ce-namespace",
        "ce-component",
        "ce-endpoint",
        "ce-modelversion",
    )
}
_OK_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
_EMPTY_BODY = {"type": "http.response.body", "body": b""}


def build_sidecar(records: Sequence[ModelVersion], config: SidecarConfig, default_version: int | None) -> DriftSidecar:
    from kubeloop.errors import KubeloopError

    versions = [r.spec.version for r in records]
    if len(set(versions)) != len(versions):
        raise KubeloopError(f"model versions must be distinct, got {versions}")
    monitors = [build_monitor(record, config) for record in records]
    default = default_version if default_version is not None else versions[0]
    if default not in versions:
        raise KubeloopError(f"--default-version {default} is not among the model versions {versions}")
    return DriftSidecar(monitors, config, default)
