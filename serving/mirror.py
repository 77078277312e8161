"""The splitter's shadow mirror: copies of live requests sent in the background to a version that never answers a
user, and the shadow's answers paired with the answers the users got.

A pair is a mirrored request both versions answered 200. Its predictions are compared row by row, by the model's
task: binary scores agree when on the same side of 0.5, multiclass probability vectors when they have the same
argmax, regression values when the shadow's is within 10% of the user's; the pair agrees when every row does. The
distance of a row is |shadow - user| (multiclass: the largest absolute difference of the two vectors). Exported as
kubeloop_shadow_pairs_total{version, agree}, kubeloop_shadow_distance_total{version} and
kubeloop_shadow_rows_total{version}, the series the shadow analysis reads (kubeloop/analysis/signals.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from kubeloop.api.modelversion import Task
from kubeloop.log import event
from serving.upstream import Backend

log = logging.getLogger("kubeloop.serving.mirror")

REGRESSION_TOLERANCE = 0.1  # a regression shadow agrees within 10% of the value the user got
MAX_IN_FLIGHT = 64  # mirrored requests waiting for the shadow; more are dropped, and counted


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.pairs = Counter(
            "kubeloop_shadow_pairs",
            "Mirrored requests both the shadow and the user's version answered 200, by whether they agreed.",
            ("version", "agree"),
            registry=registry,
        )
        self.distance = Counter(
            "kubeloop_shadow_distance",
            "Sum over the paired rows of |shadow - user's| score (multiclass: the largest difference per row).",
            ("version",),
            registry=registry,
        )
        self.rows = Counter(
            "kubeloop_shadow_rows", "Rows of the paired answers compared.", ("version",), registry=registry
        )
        self.dropped = Counter(
            "kubeloop_shadow_dropped",
            f"Requests not mirrored to the shadow: {MAX_IN_FLIGHT} copies already waiting for it.",
            ("version",),
            registry=registry,
        )
        self.percent = Gauge(
            "kubeloop_splitter_shadow_percent", "Declared share of requests mirrored to the shadow.", registry=registry
        )


@dataclass(frozen=True)
class Pair:
    agree: bool
    distance: float  # summed over the rows
    rows: int


def predictions(answer: bytes) -> list | None:
    """The per-row predictions of a v1 answer ({"predictions": [...]}) or a v2 one (the first output, rows of a 2-d
    output rebuilt from its row-major data); None when the answer holds neither."""
    try:
        body = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("predictions"), list):
        return body["predictions"]
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
        return None
    data, shape = outputs[0].get("data"), outputs[0].get("shape")
    if not isinstance(data, list):
        return None
    if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return [data[i : i + shape[1]] for i in range(0, len(data), shape[1])]
    return data


def _row(task: Task, user: Any, shadow: Any) -> tuple[bool, float]:
    if task == "multiclass":
        distance = max(abs(float(s) - float(u)) for s, u in zip(shadow, user, strict=True))
        return max(range(len(user)), key=user.__getitem__) == max(range(len(shadow)), key=shadow.__getitem__), distance
    user, shadow = float(user), float(shadow)
    distance = abs(shadow - user)
    if task == "regression":
        return distance <= REGRESSION_TOLERANCE * abs(user), distance
    return (shadow >= 0.5) == (user >= 0.5), distance


def compare(task: Task, user_answer: bytes, shadow_answer: bytes) -> Pair:
    """The pair of two 200 answers to the same request; answers whose predictions cannot be lined up row by row
    (not JSON, other row counts or shapes) disagree, with no rows compared."""
    user, shadow = predictions(user_answer), predictions(shadow_answer)
    if user is None or shadow is None or len(user) != len(shadow) or not user:
        return Pair(False, 0.0, 0)
    try:
        rows = [_row(task, u, s) for u, s in zip(user, shadow, strict=True)]
    except (TypeError, ValueError):
        return Pair(False, 0.0, 0)
    return Pair(all(agree for agree, _ in rows), sum(distance for _, distance in rows), len(rows))


def check_share(name: str, percent: Any) -> int:
    """A percentage of the traffic, or ValueError naming the field."""
    if type(percent) is not int or not 0 <= percent <= 100:
        raise ValueError(f"{name}: expected an integer from 0 to 100, got {percent!r}")
    return percent


class Mirror:
    """The mirror to one shadow: its share of requests, the copies in flight (bounded), the pairing."""

    def __init__(self, backend: Backend, percent: int, task: Task, metrics: ShadowMetrics) -> None:
        self.backend, self.version, self.task, self.metrics = backend, backend.version, task, metrics
        self.percent = 0
        self.set_percent(percent)
        self._in_flight: set[asyncio.Task] = set()
        self._pairs = {agree: metrics.pairs.labels(self.version, agree) for agree in ("true", "false")}
        self._distance, self._rows = metrics.distance.labels(self.version), metrics.rows.labels(self.version)
        self._dropped = metrics.dropped.labels(self.version)  # every series exported from 0: exact increase()

    def set_percent(self, percent: Any) -> int:
        self.percent = check_share("shadowPercent", percent)
        self.metrics.percent.set(self.percent)
        return self.percent

    def mirrors(self, request_bucket: int) -> bool:
        """The top `percent` buckets are mirrored: apart from the candidate's, which start at 0."""
        return request_bucket >= 100 - self.percent

    def submit(self, copy: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run `copy()` in the background, unless MAX_IN_FLIGHT copies already wait (dropped and counted)."""
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self._dropped.inc()
            return False
        task = asyncio.get_running_loop().create_task(copy())
        self._in_flight.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            event(log, "mirror.failed", level=logging.WARNING, version=self.version, error=repr(task.exception()))

    def pair(self, user_status: int, user_answer: bytes, shadow_status: int, shadow_answer: bytes) -> Pair | None:
        """Count the pair of a mirrored request's two answers; None (not a pair) unless both are 200."""
        if user_status != 200 or shadow_status != 200:
            return None
        found = compare(self.task, user_answer, shadow_answer)
        self._pairs["true" if found.agree else "false"].inc()
        self._distance.inc(found.distance)
        self._rows.inc(found.rows)
        return found

    def describe(self) -> dict:
        return {"percent": self.percent, "task": self.task, "inFlight": len(self._in_flight)}
