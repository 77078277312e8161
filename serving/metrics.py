"""kubeloop's Prometheus metrics of a model server, next to kserve's own on the same /metrics.

Per-value statistics (prediction distribution, feature values, categories) are aggregated a batch at a time with
numpy and exposed through a custom collector, so their cost per request does not grow with one Python call per
value. Request counters are plain prometheus_client counters with their label children cached.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kubeloop.api.modelversion import Feature, Task
from kubeloop.histograms import value_buckets

# fine between 10 and 50 ms, where a p99 ratio between two healthy versions is judged: coarse bounds there made the
# interpolated ratio of two equal servers swing past 1.5
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.035,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
PREDICTION_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20))
Z_STEPS = (-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
OTHER, NULL = "__other__", "__null__"
PREDICTION_HELP: dict[Task, str] = {
    "binary": "Predicted probability of the positive class.",
    "multiclass": "Probability of the predicted class (the model's confidence).",
    "regression": "Predicted value of the label (buckets: a round step on the training label's mean -3..+3 std).",
}


def feature_buckets(mean: float | None, std: float | None) -> tuple[float, ...]:
    """Bucket bounds at the training mean plus -3..3 training standard deviations.

    For a feature with a non-negative mean the bounds below 0 become one bound at 0: Prometheus histograms with
    negative buckets carry no _sum and _count (prometheus_client leaves them out).
    """
    if mean is None or std is None or not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        return (0.0,)
    bounds = {float(f"{mean + k * std:.6g}") for k in Z_STEPS}
    if mean >= 0:
        bounds = {max(bound, 0.0) for bound in bounds}
    return tuple(sorted(bounds))


class _BulkHistogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.sum = 0.0

    def observe_many(self, values: np.ndarray) -> None:
        values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
        if values.size:
            # Prometheus buckets are "less than or equal": value v lands in the first bound >= v
            self.counts += np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=self.counts.size)
            self.sum += float(values.sum(dtype=np.float64))


class ServingMetrics(Collector):
    """All of one model server's kubeloop metrics (one model version per process).

    The prediction histogram holds one number per row whatever the task: P(positive) (binary), the predicted
    class's probability (multiclass, which also counts rows per predicted class), the value (regression, buckets
    from the training label's mean and std: `label_stats`).
    """

    def __init__(
        self,
        model: str,
        version: int,
        features: Sequence[Feature],
        numeric_stats: dict[str, tuple[float | None, float | None]] | None = None,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        task: Task = "binary",
        classes: Sequence[str] = (),
        label_stats: tuple[float | None, float | None] = (None, None),
    ):
        self.model, self.version = model, str(version)
        registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        numeric_stats = numeric_stats or {}
        self.features = list(features)
        self.task, self.classes = task, list(classes)
        if task == "multiclass" and not self.classes:
            raise ValueError("a multiclass model's metrics need its classes (spec.signature.classes)")
        self._prediction = _BulkHistogram(value_buckets(*label_stats) if task == "regression" else PREDICTION_BUCKETS)
        self._predicted = np.zeros(len(self.classes), dtype=np.int64)
        self._values = {
            f.name: _BulkHistogram(feature_buckets(*numeric_stats.get(f.name, (None, None))))
            for f in self.features
            if f.dtype != "string"
        }
        self._known = {f.name: frozenset(f.categories or ()) for f in self.features if f.dtype == "string"}
        self._categories: Tally[tuple[str, str]] = Tally()
        self._nulls: Tally[str] = Tally()
        labels = ("model", "version")
        self.requests = Counter(
            "kubeloop_requests",
            "Inference requests by protocol and HTTP status.",
            (*labels, "protocol", "code"),
            registry=registry,
        )
        self.errors = Counter(
            "kubeloop_request_errors",
            "Rejected or failed inference requests by reason.",
            (*labels, "reason"),
            registry=registry,
        )
        self.latency = Histogram(
            "kubeloop_request_duration_seconds",
            "Inference request latency in the model server, first byte in to response sent, by protocol and status.",
            (*labels, "protocol", "code"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.out_of_range = Counter(
            "kubeloop_feature_out_of_range",
            "Numeric input values outside the training rows' [min, max], by feature (counted, clipped or rejected "
            "per the deployment's spec.inputs.outOfRange).",
            (*labels, "feature"),
            registry=registry,
        )
        self.batch_rows = Histogram(
            "kubeloop_inference_batch_rows",
            "Rows per model call (requests merged by the batcher).",
            labels,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=registry,
        ).labels(self.model, self.version)
        self.cache_hits = Counter(
            "kubeloop_cache_hits",
            "Prediction cache hits by tier (static: precomputed, dynamic: LRU).",
            (*labels, "tier"),
            registry=registry,
        )
        self.cache_misses = Counter(
            "kubeloop_cache_misses", "Prediction cache misses (rows computed).", labels, registry=registry
        ).labels(self.model, self.version)
        self.cache_entries = Gauge(
            "kubeloop_cache_entries", "Prediction cache entries by tier.", (*labels, "tier"), registry=registry
        )
        self._request_children: dict[tuple[str, int | str], tuple[Counter, Histogram]] = {}
        self._error_children: dict[str, Counter] = {}
        registry.register(self)

    # ---- request path helpers
    def count_request(self, protocol: str, code: int | str, seconds: float) -> None:
        """One answered request: `code` is the HTTP status, or the gRPC status name (OK, INVALID_ARGUMENT, ...)."""
        children = self._request_children.get((protocol, code))
        if children is None:
            labels = (self.model, self.version, protocol, str(code))
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._request_children[(protocol, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_out_of_range(self, counts: dict[str, int]) -> None:
        for feature, count in counts.items():
            self.out_of_range.labels(self.model, self.version, feature).inc(count)

    def count_error(self, reason: str) -> None:
        child = self._error_children.get(reason)
        if child is None:
            child = self._error_children[reason] = self.errors.labels(self.model, self.version, reason)
        child.inc()

    def observe_batch(self, columns: dict[str, np.ndarray], outputs: np.ndarray) -> None:
        """Prediction and input statistics of one model call; `outputs` as the model answers: one number per row,
        or (multiclass) one row of class probabilities."""
        self.batch_rows.observe(len(outputs))
        if outputs.ndim == 2:
            scores = outputs.max(axis=1)
            predicted = np.bincount(outputs.argmax(axis=1), minlength=len(self.classes))
        else:
            scores, predicted = outputs, None
        with self._lock:
            self._prediction.observe_many(scores.astype(np.float64, copy=False))
            if predicted is not None:
                self._predicted += predicted
            for name, histogram in self._values.items():
                values = columns[name]
                nulls = int(np.isnan(values).sum())
                if nulls:
                    self._nulls[name] += nulls
                histogram.observe_many(values)
            for name, known in self._known.items():
                for value, count in Tally(columns[name].tolist()).items():
                    label = NULL if value is None else value if value in known else OTHER
                    if label == NULL:
                        self._nulls[name] += count
                    self._categories[(name, label)] += count

    # ---- exposition
    def collect(self) -> Iterable[Metric]:
        base = [self.model, self.version]
        with self._lock:
            prediction = HistogramMetricFamily(
                "kubeloop_prediction", PREDICTION_HELP[self.task], labels=("model", "version")
            )
            prediction.add_metric(base, _buckets(self._prediction), self._prediction.sum)
            families: list[Metric] = [prediction]
            if self.task == "multiclass":
                predicted = CounterMetricFamily(
                    "kubeloop_predicted_class",
                    "Rows by predicted class (the class of the highest probability).",
                    labels=("model", "version", "class"),
                )
                for label, count in zip(self.classes, self._predicted.tolist(), strict=True):
                    predicted.add_metric([*base, label], count)
                families.append(predicted)
            values = HistogramMetricFamily(
                "kubeloop_feature_value",
                "Served values of numeric input features (buckets at the training mean -3..+3 std).",
                labels=("model", "version", "feature"),
            )
            for name, histogram in self._values.items():
                values.add_metric([*base, name], _buckets(histogram), histogram.sum)
            categories = CounterMetricFamily(
                "kubeloop_feature_category",
                f"Served values of categorical input features ({OTHER}: not seen in training, {NULL}: null).",
                labels=("model", "version", "feature", "value"),
            )
            for (name, value), count in sorted(self._categories.items()):
                categories.add_metric([*base, name, value], count)
            nulls = CounterMetricFamily(
                "kubeloop_feature_null",
                "Null (or NaN) input values by feature.",
                labels=("model", "version", "feature"),
            )
            for f in self.features:
                nulls.add_metric([*base, f.name], self._nulls.get(f.name, 0))
        return [*families, values, categories, nulls]

    def describe(self) -> Iterable[Metric]:
        return []


def _buckets(histogram: _BulkHistogram) -> list[tuple[str, float]]:
    cumulative = np.cumsum(histogram.counts)
    out = [(repr(float(bound)), float(count)) for bound, count in zip(histogram.bounds, cumulative[:-1], strict=True)]
    out.append(("+Inf", float(cumulative[-1])))
    return out
