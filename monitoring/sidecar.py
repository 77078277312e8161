"""The drift-detector sidecar: a CloudEvents sink for KServe's payload logger that watches for drift.

    python -m monitoring.sidecar --host 127.0.0.1 --port 8090 [--metrics-port 8091 [--metrics-host 0.0.0.0]]
        --model-version mv.yaml [--model-version mv2.yaml] [--default-version N] --detector ks|mmd --window 200
        --p-value 0.05 --reference-size 2000

For each ModelVersion it loads a seeded reference sample of the training snapshot named in its lineage and keeps
a window per version. ``POST`` (any path) takes one event (binary or structured mode, as KServe's logger sends
them) or a batch of them (batched mode, as kubeloop's model server sends them): the handler parses and appends,
nothing more; a full window is handed to a detection thread through a bounded queue (a window that finds the queue
full is dropped and its events counted in ``kubeloop_drift_events_dropped_total``), so the sink answers in
microseconds and never blocks KServe's logger (whose own queue of 100 blocks predictions when it fills). Request
events feed the drift windows, response events a per-version prediction window (for canary analysis), read per the
ModelVersion's ``spec.signature.task``: a score (binary), class probabilities (multiclass), a value (regression).
``GET /metrics`` (Prometheus), ``GET /status`` (JSON), ``GET /healthz``. A malformed event is answered 4xx (in a
batch: counted in the batch's 200 answer), counted by reason and logged (at most one line per reason per
``LOG_EVERY_S``); it never stops the process.

Listeners: ``--host``/``--port`` serves every route; keep it on loopback, the logger posts from inside the pod. With
``--metrics-port`` a second, read-only listener (``--metrics-host``, 0.0.0.0 by default) serves the GET routes to
the pod network for Prometheus and answers events with 405, so nothing outside the pod can feed the detector.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import queue
import socket
import sys
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from kubeloop.api.modeldeployment import DriftMonitor, DriftStatus
from kubeloop.api.modelversion import ModelVersion, Task
from kubeloop.data.snapshot import ColumnStats
from kubeloop.histograms import value_buckets
from kubeloop.log import event
from monitoring.detectors import (
    ALARM_K,
    ALARM_M,
    DEFAULT_CORRECTION,
    MIN_REFERENCE_PER_WINDOW,
    MMD_PERMUTATIONS,
    Correction,
    Detector,
    DriftTracker,
    Reference,
    WindowResult,
    build_detector,
    skew,
    window_statistics,
)
from monitoring.events import (
    BATCH,
    REASONS,
    EventMeta,
    Malformed,
    Predictions,
    RequestParser,
    decode_batch,
    parse_envelope,
    parse_event,
    parse_predictions,
)
from monitoring.schema import Schema

log = logging.getLogger("monitoring.sidecar")  # not __name__: that is __main__ under python -m

LOG_EVERY_S = 10.0  # malformed events: at most one log line per reason in this many seconds
DEFAULT_MAX_BODY = 4 * 1024 * 1024
DETECTOR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREDICTION_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
HISTORY = 50  # recent windows kept per version for /status (p-values, flag, state)


@dataclass(frozen=True)
class SidecarConfig:
    detector: Literal["ks", "mmd"] = "ks"
    window: int = 500  # rows (inference instances) per detection window
    p_value: float = 0.05  # family-wise alpha of one window's test
    reference_size: int = 2000
    correction: Correction = DEFAULT_CORRECTION
    alarm_k: int = ALARM_K
    alarm_m: int = ALARM_M
    seed: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY
    detection_queue: int = 8  # full windows waiting for the detector
    prediction_window: int = 0  # predictions kept per version (0: the drift window's size)
    mmd_permutations: int = MMD_PERMUTATIONS

    @classmethod
    def from_monitor(cls, monitor: DriftMonitor, **overrides: Any) -> SidecarConfig:
        return cls(
            detector=monitor.detector,
            window=monitor.window,
            p_value=monitor.p_value,
            reference_size=monitor.reference_size,
            **overrides,
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        mv = ["model", "version"]
        self.p_value = Gauge(
            "kubeloop_drift_p_value",
            "Last window's p-value per feature (mmd: feature=all)",
            [*mv, "feature"],
            registry=registry,
        )
        self.distance = Gauge(
            "kubeloop_drift_distance",
            "Last window's test statistic per feature (KS D, chi2, MMD^2)",
            [*mv, "feature"],
            registry=registry,
        )
        self.detected = Gauge("kubeloop_drift_detected", "1 when the model version is in Drift", mv, registry=registry)
        self.windows = Counter(
            "kubeloop_drift_windows",
            "Windows by result: drift|no_drift (one corrected test), dropped, error",
            [*mv, "result"],
            registry=registry,
        )
        self.seconds = Histogram(
            "kubeloop_drift_detector_seconds",
            "Time of one window's drift test",
            ["detector"],
            buckets=DETECTOR_BUCKETS,
            registry=registry,
        )
        self.skew = Gauge(
            "kubeloop_drift_skew",
            "Training/serving skew of the last window per feature: mean_shift (in training std), std_ratio, "
            "null_rate_delta, out_of_range (numeric); linf, unseen_share, null_rate_delta (categorical)",
            [*mv, "feature", "statistic"],
            registry=registry,
        )
        self.pending = Gauge(
            "kubeloop_drift_pending_windows", "Full windows waiting for the detector", registry=registry
        )


class EventCounters:
    """The per-event counters, kept as plain ints: the event route runs them for every event, and a
    prometheus_client child's inc() (a lock each) cost more than parsing a one-row event. Only the event loop's
    thread writes them, and /metrics is served by that same thread, so a scrape sees a consistent set."""

    TYPES = ("request", "response", "unknown")

    def __init__(self, monitors: Sequence[VersionMonitor]) -> None:
        self.received: dict[str, int] = dict.fromkeys(self.TYPES, 0)
        self.malformed: dict[str, int] = dict.fromkeys(REASONS, 0)  # every reason exported from the start
        self.dropped = 0
        self.rows: dict[tuple[str, str], int] = {m.labels: 0 for m in monitors}
        self.bounds = {m.labels: m.prediction_buckets for m in monitors}
        self.buckets = {m.labels: [0] * (len(m.prediction_buckets) + 1) for m in monitors}
        self.score_sums: dict[tuple[str, str], float] = {m.labels: 0.0 for m in monitors}
        self.classes = {m.labels: m.classes for m in monitors if m.task == "multiclass"}
        self.predicted = {labels: [0] * len(classes) for labels, classes in self.classes.items()}

    def observe(self, labels: tuple[str, str], predictions: Predictions) -> None:
        """One response's predictions into the histogram: the score or value, or (multiclass) the predicted class's
        probability, and the predicted class counted."""
        predicted = self.predicted.get(labels)
        if predicted is None:
            scores = predictions
        else:
            scores = []
            for row in predictions:
                best = max(range(len(row)), key=row.__getitem__)
                predicted[best] += 1
                scores.append(row[best])
        bounds, counts = self.bounds[labels], self.buckets[labels]
        for score in scores:
            counts[bisect_left(bounds, score)] += 1
        self.score_sums[labels] += sum(scores)

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "kubeloop_drift_events_received", "CloudEvents received by ce-type (unknown: unreadable)", labels=["type"]
        )
        for kind, value in self.received.items():
            received.add_metric([kind], value)
        malformed = CounterMetricFamily(
            "kubeloop_drift_events_malformed", "Events rejected, by reason", labels=["reason"]
        )
        for reason, value in self.malformed.items():
            malformed.add_metric([reason], value)
        dropped = CounterMetricFamily(
            "kubeloop_drift_events_dropped", "Events in windows dropped because the detection queue was full"
        )
        dropped.add_metric([], self.dropped)
        rows = CounterMetricFamily(
            "kubeloop_drift_rows", "Rows (instances) appended to drift windows", labels=["model", "version"]
        )
        scores = HistogramMetricFamily(
            "kubeloop_drift_prediction",
            "Predictions seen in response events: the score (binary), the predicted class's probability (multiclass), "
            "the value (regression)",
            labels=["model", "version"],
        )
        for labels, value in self.rows.items():
            rows.add_metric(list(labels), value)
            cumulative = list(accumulate(self.buckets[labels]))
            bounds = [*(str(b) for b in self.bounds[labels]), "+Inf"]
            scores.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), self.score_sums[labels])
        yield from (received, malformed, dropped, rows, scores)
        if self.predicted:
            predicted = CounterMetricFamily(
                "kubeloop_drift_predicted_class",
                "Rows of response events by predicted class (multiclass)",
                labels=["model", "version", "class"],
            )
            for labels, counts in self.predicted.items():
                for label, count in zip(self.classes[labels], counts, strict=True):
                    predicted.add_metric([*labels, label], count)
            yield predicted


@dataclass
class VersionMonitor:
    model: str
    version: int
    schema: Schema
    reference: Reference
    detector: Detector
    tracker: DriftTracker
    window: int
    predictions: deque[Any]  # the last predictions: numbers, or (multiclass) lists of class probabilities
    task: Task = "binary"
    classes: tuple[str, ...] = ()  # multiclass: the order of the probabilities (spec.signature.classes)
    prediction_buckets: tuple[float, ...] = PREDICTION_BUCKETS
    parser: RequestParser = field(init=False)
    # the event loop's side: the window being filled
    columns: list[list[Any]] = field(init=False)
    filled: int = 0
    window_events: int = 0
    requests: int = 0
    responses: int = 0
    rows: int = 0
    # the detection thread's side: results of the last window
    last: WindowResult | None = None
    last_skew: dict[str, dict[str, float]] = field(default_factory=dict)
    last_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    last_checked: datetime | None = None
    errors: int = 0
    dropped_windows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards the detection results
    last_flag_log: float = -math.inf
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def __post_init__(self) -> None:
        self._labels = (self.model, str(self.version))
        self.parser = RequestParser(self.schema)
        self.columns = [[] for _ in self.schema.features]

    @property
    def labels(self) -> tuple[str, str]:
        return self._labels


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
            else:
                predictions = parse_predictions(payload, monitor.task, len(monitor.classes))
                monitor.responses += 1
                monitor.predictions.extend(predictions)
                self.counters.observe(monitor.labels, predictions)
        except Malformed as error:
            return self._reject(error)
        return 200, ""

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
                self._detect(job)
            except Exception as error:  # a detector failure costs one window, never the process
                job_monitor = job.monitor if job else None
                if job_monitor is not None:
                    job_monitor.errors += 1
                    self.metrics.windows.labels(*job_monitor.labels, "error").inc()
                event(log, "detector_error", logging.ERROR, error=repr(error)[:300])
            finally:
                self._jobs.task_done()

    def _detect(self, job: _Job) -> None:
        monitor = job.monitor
        schema = monitor.schema
        arrays = [
            np.asarray(col, dtype=np.float64 if spec.kind == "numeric" else np.int64)
            for col, spec in zip(job.columns, schema.features, strict=True)
        ]
        result = monitor.detector.test(arrays)
        skews = skew(monitor.reference, arrays)
        stats = window_statistics(schema, arrays)
        with monitor.lock:
            monitor.last_skew, monitor.last_stats = skews, stats
            previous = monitor.tracker.state
            state = monitor.tracker.update(result.flagged)
            monitor.last = result
            monitor.last_checked = datetime.now(UTC)
            monitor.history.append(
                {
                    "time": monitor.last_checked.isoformat(),
                    "pValues": {k: _finite(t.p_value) for k, t in result.features.items()},
                    "flagged": result.flagged,
                    "state": state,
                }
            )
        labels = monitor.labels
        metrics = self.metrics
        metrics.seconds.labels(result.detector).observe(result.seconds)
        metrics.windows.labels(*labels, "drift" if result.flagged else "no_drift").inc()
        metrics.detected.labels(*labels).set(1 if state == "Drift" else 0)
        for feature, test in result.features.items():
            metrics.p_value.labels(*labels, feature).set(test.p_value)
            metrics.distance.labels(*labels, feature).set(test.distance)
        for feature, numbers in monitor.last_skew.items():
            for statistic, value in numbers.items():
                metrics.skew.labels(*labels, feature, statistic).set(value)
        if state != previous:  # every change of state, and flagged windows at most once per LOG_EVERY_S
            event(log, "drift_state", model=monitor.model, version=monitor.version, state=state, previous=previous)
        if result.flagged and time.monotonic() - monitor.last_flag_log >= LOG_EVERY_S:
            monitor.last_flag_log = time.monotonic()
            event(
                log,
                "drift_window",
                model=monitor.model,
                version=monitor.version,
                state=state,
                features=",".join(result.drifted_features()) or "-",
                min_p=result.min_p_value or 0.0,
                flagged_windows=monitor.tracker.flagged_windows,
            )

    # ---- status ------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        versions = {str(v): self._version_status(m) for v, m in self.monitors.items()}
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
            "pendingWindows": self._jobs.qsize(),
            "uptimeSeconds": round(time.time() - self.started, 3),
            "versions": versions,
        }

    def _version_status(self, m: VersionMonitor) -> dict[str, Any]:
        with m.lock:
            return self._version_status_locked(m)

    def _version_status_locked(self, m: VersionMonitor) -> dict[str, Any]:
        last = m.last
        drift = DriftStatus(
            state=m.tracker.state,
            min_p_value=_finite(last.min_p_value) if last else None,
            events=m.requests,
            last_checked=m.last_checked,
        ).model_dump(mode="json", by_alias=True)
        out: dict[str, Any] = {
            "model": m.model,
            "version": m.version,
            "task": m.task,
            "drift": drift,
            "state": m.tracker.state,
            "referenceRows": m.reference.size,
            "referenceDigest": m.reference.digest,
            "events": {"request": m.requests, "response": m.responses},
            "rows": m.rows,
            "windowFill": m.filled,
            "windowsEvaluated": m.tracker.windows,
            "windowsFlagged": m.tracker.flagged_windows,
            "windowsInDrift": m.tracker.drift_windows,
            "windowsDropped": m.dropped_windows,
            "windowErrors": m.errors,
            "recentFlags": list(m.tracker.recent),
            "skew": _clean(m.last_skew),
            "serving": _clean(m.last_stats),
            "predictions": _prediction_summary(m),
            "history": list(m.history),
        }
        if last is not None:
            out["lastWindow"] = {
                "detector": last.detector,
                "rows": last.rows,
                "flagged": last.flagged,
                "threshold": last.threshold,
                "correction": last.correction,
                "seconds": round(last.seconds, 6),
                "driftedFeatures": last.drifted_features(),
                "pValues": {k: _finite(t.p_value) for k, t in last.features.items()},
                "adjustedPValues": {k: _finite(t.adjusted_p_value) for k, t in last.features.items()},
                "distances": {k: _finite(t.distance) for k, t in last.features.items()},
                "tests": {k: t.test for k, t in last.features.items()},
            }
        if m is not self.default and len(m.predictions) and len(self.default.predictions):
            shift = prediction_shift(m, self.default)
            if shift is not None:
                out["predictionShift"] = shift
        return out

    # ---- ASGI --------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        method = scope["method"]
        if method == "POST":
            if self.read_only_ports and (scope.get("server") or ("", 0))[1] in self.read_only_ports:
                await _respond(send, 405, b'{"error":"read-only listener: GET /metrics /status /healthz"}', close=True)
                return
            await self._post(scope, receive, send)
            return
        path = scope["path"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b'{"error":"POST events, GET /metrics /status /healthz"}')
        elif path == "/metrics":
            await _respond(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
        elif path == "/status":
            await _respond(send, 200, json.dumps(self.status()).encode())
        elif path in ("/healthz", "/readyz", "/"):
            alive = self._thread.is_alive()
            await _respond(send, 200 if alive else 503, b'{"status":"ok"}' if alive else b'{"status":"detector dead"}')
        else:
            await _respond(send, 404, b'{"error":"not found"}')

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
            await _respond(send, status, b'{"error":"too_large"}', close=True)
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
                    await _respond(send, status, b'{"error":"too_large"}', close=True)
                    return
                chunks.append(chunk)
            body = b"".join(chunks)
        if headers.get("content-type", "").startswith(BATCH):
            status, answer = self.ingest_batch(body)
            await _respond(send, status, answer)
            return
        status, reason = self.ingest(headers, body)
        if status == 200:
            await send(_OK_START)
            await send(_EMPTY_BODY)
        else:
            await _respond(send, status, b'{"error":"' + reason.encode() + b'"}')


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


async def _respond(
    send: Any, status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _clean(nested: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {k: {s: _finite(v) for s, v in stats.items()} for k, stats in nested.items()}


def _prediction_summary(monitor: VersionMonitor) -> dict[str, Any]:
    """Count, mean and p10/p50/p90 of the kept predictions: of the score (binary), the value (regression), the
    predicted class's probability (multiclass, which adds each class's share of the predictions)."""
    if not monitor.predictions:
        return {"count": 0}
    values = np.array(monitor.predictions, dtype=np.float64)
    scores = values.max(axis=1) if values.ndim == 2 else values
    q10, q50, q90 = np.quantile(scores, [0.1, 0.5, 0.9])
    summary: dict[str, Any] = {
        "count": len(scores),
        "mean": float(scores.mean()),
        "p10": float(q10),
        "p50": float(q50),
        "p90": float(q90),
    }
    if values.ndim == 2:
        shares = np.bincount(values.argmax(axis=1), minlength=len(monitor.classes)) / len(values)
        summary["classShares"] = dict(zip(monitor.classes, shares.tolist(), strict=True))
    return summary


def prediction_shift(monitor: VersionMonitor, default: VersionMonitor) -> dict[str, Any] | None:
    """How far a version's kept predictions are from the default version's: the two-sample KS distance of the
    scores or values; multiclass, the largest over the classes of the KS distance of that class's probability
    (``byClass`` lists them), which moves with the predicted-class mix and with the confidence alike. None when the
    two versions' outputs do not compare (another task, other classes)."""
    if (monitor.task, monitor.classes) != (default.task, default.classes):
        return None
    ours, theirs = np.array(monitor.predictions, dtype=np.float64), np.array(default.predictions, dtype=np.float64)
    if ours.ndim == 1:
        return {"against": default.version, "ksDistance": ks_distance(ours, theirs)}
    by_class = {label: ks_distance(ours[:, i], theirs[:, i]) for i, label in enumerate(monitor.classes)}
    return {"against": default.version, "ksDistance": max(by_class.values()), "byClass": by_class}


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    gap = np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(gap)))


# ---- building it -------------------------------------------------------------------------------------------------


def read_model_version(ref: str) -> ModelVersion:
    """A ModelVersion from a YAML file, or from the local registry as NAME:VERSION."""
    from kubeloop.api.load import load_resources
    from kubeloop.errors import KubeloopError

    path = Path(ref)
    if path.is_file():
        found = [r for r in load_resources(path) if isinstance(r, ModelVersion)]
        if len(found) != 1:
            raise KubeloopError(f"{path}: expected exactly one ModelVersion, found {len(found)}")
        return found[0]
    if ":" in ref and "/" not in ref:
        from kubeloop.registry import Registry

        return Registry().resolve(ref)
    raise KubeloopError(f"no such ModelVersion file: {ref} (or give NAME:VERSION from the local registry)")


def build_monitor(record: ModelVersion, config: SidecarConfig) -> VersionMonitor:
    from kubeloop.data.snapshot import load_snapshot
    from kubeloop.errors import KubeloopError

    spec = record.spec
    signature = spec.signature
    if signature.task == "multiclass" and not signature.classes:
        raise KubeloopError(
            f"{record.metadata.name}: spec.signature.classes is empty: a multiclass ModelVersion names its classes, "
            "the order of its probabilities"
        )
    snapshot = load_snapshot(spec.lineage.dataset_digest)
    schema = Schema.from_signature(spec.signature, snapshot.stats)
    reference = Reference.from_snapshot(schema, snapshot, config.reference_size, config.seed)
    if reference.size < MIN_REFERENCE_PER_WINDOW * config.window:
        event(
            log,
            "small_reference",
            logging.WARNING,
            version=spec.version,
            reference=reference.size,
            window=config.window,
            advice=f"the declared false-positive rate assumes reference >= {MIN_REFERENCE_PER_WINDOW}x window",
        )
    detector = build_detector(
        config.detector, reference, config.p_value, config.correction, mmd_permutations=config.mmd_permutations
    )
    event(
        log,
        "monitoring",
        model=spec.model,
        version=spec.version,
        detector=config.detector,
        features=len(schema.features),
        reference=reference.size,
        snapshot=snapshot.digest[:19],
        window=config.window,
    )
    return VersionMonitor(
        model=spec.model,
        version=spec.version,
        schema=schema,
        reference=reference,
        detector=detector,
        tracker=DriftTracker(config.alarm_k, config.alarm_m),
        window=config.window,
        predictions=deque(maxlen=config.prediction_window or config.window),
        task=signature.task,
        classes=tuple(signature.classes or ()),
        prediction_buckets=_prediction_buckets(signature.task, snapshot.stats.get(signature.label)),
    )


def _prediction_buckets(task: Task, label: ColumnStats | None) -> tuple[float, ...]:
    """Probabilities: tenths. Values: round steps over the training snapshot's label mean -3..+3 std, the bounds
    the model server's own histogram takes from the training split (so they most often coincide)."""
    if task != "regression":
        return PREDICTION_BUCKETS
    return value_buckets(label.mean, label.std) if label is not None else value_buckets(None, None)


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


# ---- the command -------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = DriftMonitor()
    p = argparse.ArgumentParser(prog="python -m monitoring.sidecar", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--host", default="127.0.0.1", help="the listener for events and every route; keep it on loopback (%(default)s)"
    )
    p.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="also serve GET /metrics /status /healthz, and no events, on this port (0: a free one, printed)",
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="the read-only listener's address (default %(default)s)")
    p.add_argument(
        "--model-version",
        action="append",
        required=True,
        metavar="PATH|NAME:VERSION",
        help="a ModelVersion YAML (repeat for stable + canary); NAME:VERSION reads the local registry",
    )
    p.add_argument("--default-version", type=int, help="version of events without ce-modelversion (first given)")
    p.add_argument("--detector", choices=["ks", "mmd"], default=defaults.detector)
    p.add_argument("--window", type=int, default=defaults.window, help="rows per detection window")
    p.add_argument("--p-value", type=float, default=defaults.p_value, help="family-wise alpha per window")
    p.add_argument("--reference-size", type=int, default=defaults.reference_size)
    p.add_argument("--correction", choices=["bonferroni", "fdr"], default=DEFAULT_CORRECTION)
    p.add_argument("--alarm-k", type=int, default=ALARM_K, help="Drift when >= k of the last m windows flag")
    p.add_argument("--alarm-m", type=int, default=ALARM_M)
    p.add_argument("--seed", type=int, default=0, help="seed of the reference sample")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--detection-queue", type=int, default=8, help="full windows that may wait for the detector")
    p.add_argument("--mmd-permutations", type=int, default=MMD_PERMUTATIONS)
    p.add_argument("--verbose", action="store_true")
    return p


def _setup_logging(verbose: bool) -> None:
    from kubeloop.log import setup

    setup(verbose)
    kubeloop_logger = logging.getLogger("kubeloop")
    ours = logging.getLogger("monitoring")
    ours.handlers[:] = kubeloop_logger.handlers
    ours.setLevel(kubeloop_logger.level)
    ours.propagate = False


@dataclass(frozen=True)
class Listener:
    host: str
    port: int  # 0: a free one


def listeners(args: argparse.Namespace) -> tuple[Listener, Listener | None]:
    """The ingest listener and the read-only metrics listener (None without --metrics-port)."""
    ingest = Listener(args.host, args.port)
    for name, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"{name} {port}: expected 0-65535 (0: a free port)")
    if args.metrics_port is None:
        return ingest, None
    if args.metrics_port == args.port and args.port != 0:
        raise ValueError(f"--metrics-port {args.metrics_port} is the ingest --port too: give it a port of its own")
    return ingest, Listener(args.metrics_host, args.metrics_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        ingest, metrics = listeners(args)
    except ValueError as error:
        parser.error(str(error))
    _setup_logging(args.verbose)
    disable_created_metrics()  # no *_created series: they would double the exposition
    from pydantic import ValidationError

    from kubeloop.errors import KubeloopError

    try:
        # the ModelDeployment's own bounds (window >= 20, 0 < p < 1, ...) apply to the flags too
        monitor = DriftMonitor(
            detector=args.detector, window=args.window, p_value=args.p_value, reference_size=args.reference_size
        )
        config = SidecarConfig.from_monitor(
            monitor,
            correction=args.correction,
            alarm_k=args.alarm_k,
            alarm_m=args.alarm_m,
            seed=args.seed,
            max_body_bytes=args.max_body_bytes,
            detection_queue=args.detection_queue,
            mmd_permutations=args.mmd_permutations,
        )
        DriftTracker(config.alarm_k, config.alarm_m)
        if args.detector == "mmd":
            import torch

            torch.set_num_threads(1)  # a sidecar shares the pod's CPU with the predictor
        records = [read_model_version(ref) for ref in args.model_version]
        app = build_sidecar(records, config, args.default_version)
    except (KubeloopError, ValidationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # torch, alibi-detect and the references (~500k objects) live as long as the process: out of the collector's
    # reach, a full collection no longer walks them (measured: 0.27 s with the GIL held, the event loop stopped)
    gc.collect()
    gc.freeze()
    app.start()
    try:
        serve(app, ingest, metrics)
    finally:
        app.stop()
    return 0


# per-event work uvicorn can skip: access log lines, proxy-header rewriting, Server and Date response headers
UVICORN_SETTINGS: dict[str, Any] = {
    "access_log": False,
    "log_level": "warning",
    "lifespan": "off",
    "proxy_headers": False,
    "server_header": False,
    "date_header": False,
}


def serve(app: DriftSidecar, ingest: Listener, metrics: Listener | None = None) -> None:
    """Serve `app` on the ingest listener and, if given, the read-only metrics listener: one server, one event loop,
    both sockets (the app tells them apart by the local port of each request)."""
    import uvicorn

    sockets = [_bind(ingest)]
    if metrics is not None:
        sockets.append(_bind(metrics))
        app.read_only_ports = frozenset({sockets[1].getsockname()[1]})

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                ports = [sock.getsockname()[1] for sock in sockets or ()]
                print(f"drift sidecar on http://{_url_host(ingest.host)}:{ports[0]}", flush=True)
                if metrics is not None:
                    print(f"drift sidecar metrics on http://{_url_host(metrics.host)}:{ports[1]}", flush=True)

    Server(uvicorn.Config(app, **UVICORN_SETTINGS)).run(sockets=sockets)


def _bind(listener: Listener) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    dualstack = listener.host == "::" and socket.has_dualstack_ipv6()  # "::" takes IPv4 connections too
    try:
        return socket.create_server(
            (listener.host, listener.port), family=family, backlog=2048, dualstack_ipv6=dualstack
        )
    except OSError as error:
        raise SystemExit(f"error: cannot listen on {listener.host}:{listener.port}: {error}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
