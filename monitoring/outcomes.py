"""Ground truth joined to what was served, and each version's performance on it.

A served prediction waits, by its request id (the id KServe's logger gives the request and response events), for
its labels, which may come hours later, in batches and out of order. The join keeps a bounded number of waiting
requests (the oldest is dropped and counted as expired); a label for an id it never saw, or saw labelled already,
is counted, not an error. Each version's live metrics are computed on its last ``window`` labelled rows.

Where labels never arrive, the model's own probabilities say what performance to expect if they are calibrated
(confidence-based performance estimation): labels drawn from the predicted probabilities, the metric computed on
each draw, reported as the mean with a 95% interval.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn import metrics as skm

from kubeloop.api.modelversion import Signature

LabelResult = Literal["joined", "unknown", "duplicate", "mismatch", "expired"]
Prediction = float | list[float]

DEFAULT_CAPACITY = 100_000  # requests waiting for labels, per sidecar
DEFAULT_WINDOW = 500  # labelled rows per version the live metrics are computed on
ESTIMATE_DRAWS = 200
CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Served:
    version: int
    predictions: list[Prediction]


@dataclass
class Estimate:
    value: float
    low: float
    high: float


@dataclass
class VersionOutcomes:
    """One version's labelled rows (the last ``window``) and its served rows (for the estimate without labels)."""

    window: int
    predictions: deque[Prediction] = field(init=False)
    labels: deque[float] = field(init=False)
    served: deque[Prediction] = field(init=False)
    labelled_total: int = 0

    def __post_init__(self) -> None:
        self.predictions = deque(maxlen=self.window)
        self.labels = deque(maxlen=self.window)
        self.served = deque(maxlen=self.window)


class OutcomeJoin:
    """Predictions by request id until their labels arrive; the joined rows per version; counts of every result."""

    def __init__(self, signature: Signature, capacity: int = DEFAULT_CAPACITY, window: int = DEFAULT_WINDOW) -> None:
        self.signature = signature
        self.capacity = capacity
        self.window = window
        self.results: Counter[LabelResult] = Counter()
        self._waiting: OrderedDict[str, Served] = OrderedDict()
        self._labelled: OrderedDict[str, None] = OrderedDict()  # ids already joined, to count duplicates
        self._versions: dict[int, VersionOutcomes] = {}
        self._lock = threading.Lock()

    def version(self, version: int) -> VersionOutcomes:
        if version not in self._versions:
            self._versions[version] = VersionOutcomes(self.window)
        return self._versions[version]

    def served(self, request_id: str, version: int, predictions: Sequence[Prediction]) -> None:
        with self._lock:
            self._waiting[request_id] = Served(version, list(predictions))
            self._waiting.move_to_end(request_id)
            self.version(version).served.extend(predictions)
            while len(self._waiting) > self.capacity:
                self._waiting.popitem(last=False)
                self.results["expired"] += 1

    def label(self, request_id: str, labels: Sequence[float]) -> LabelResult:
        """Join decoded labels (one per row of the request) to the request's predictions."""
        with self._lock:
            served = self._waiting.get(request_id)
            if served is None:
                result: LabelResult = "duplicate" if request_id in self._labelled else "unknown"
            elif len(labels) != len(served.predictions):
                result = "mismatch"
            else:
                del self._waiting[request_id]
                self._labelled[request_id] = None
                while len(self._labelled) > self.capacity:
                    self._labelled.popitem(last=False)
                outcomes = self.version(served.version)
                outcomes.predictions.extend(served.predictions)
                outcomes.labels.extend(labels)
                outcomes.labelled_total += len(labels)
                result = "joined"
            self.results[result] += 1
            return result

    def live(self, version: int) -> dict[str, float | None]:
        """The version's metrics on its last ``window`` labelled rows (None where a metric is undefined yet)."""
        with self._lock:
            outcomes = self.version(version)
            predictions, labels = list(outcomes.predictions), np.asarray(outcomes.labels, dtype=np.float64)
        return performance(self.signature, predictions, labels)

    def estimate(self, version: int, seed: int = 0) -> dict[str, Estimate]:
        with self._lock:
            served = list(self.version(version).served)
        return estimate_without_labels(self.signature, served, seed)

    def status(self, version: int) -> dict[str, Any]:
        outcomes = self.version(version)
        return {
            "labelled": len(outcomes.labels),
            "labelledTotal": outcomes.labelled_total,
            "live": self.live(version),
            "estimated": {name: vars(e) for name, e in self.estimate(version).items()},
        }


def performance(signature: Signature, predictions: Sequence[Prediction], labels: np.ndarray) -> dict[str, float | None]:
    """Live metrics of joined rows, the same the evaluation computes on the test split, plus calibration and the
    label balance."""
    if len(labels) == 0:
        return {"rows": 0}
    if signature.task == "regression":
        values = np.asarray(predictions, dtype=np.float64)
        return {
            "rows": len(labels),
            "mae": float(np.mean(np.abs(values - labels))),
            "rmse": float(np.sqrt(np.mean((values - labels) ** 2))),
            "labelMean": float(labels.mean()),
        }
    if signature.task == "multiclass":
        probabilities = np.asarray(predictions, dtype=np.float64)
        classes = list(range(probabilities.shape[1]))
        truth = labels.astype(np.int64)
        both = len(np.unique(truth)) == len(classes)
        shares = np.bincount(truth, minlength=len(classes)) / len(truth)
        return {
            "rows": len(labels),
            "accuracy": float(np.mean(probabilities.argmax(axis=1) == truth)),
            "rocAuc": float(skm.roc_auc_score(truth, probabilities, multi_class="ovr", labels=classes))
            if both
            else None,
            "calibrationError": _calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == truth),
            **{f"labelShare.{name}": float(s) for name, s in zip(signature.classes or [], shares, strict=False)},
        }
    scores = np.asarray(predictions, dtype=np.float64)
    both = len(np.unique(labels)) == 2
    return {
        "rows": len(labels),
        "accuracy": float(np.mean((scores >= 0.5) == (labels == 1))),
        "rocAuc": float(skm.roc_auc_score(labels, scores)) if both else None,
        "calibrationError": _calibration_error(scores, labels == 1),
        "positiveShare": float(labels.mean()),
    }


def _calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Expected calibration error: the row-weighted gap between mean confidence and the observed rate, over equal-
    width bins of the confidence."""
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total / len(confidence))


def estimate_without_labels(
    signature: Signature, predictions: Sequence[Prediction], seed: int = 0, draws: int = ESTIMATE_DRAWS
) -> dict[str, Estimate]:
    """Accuracy (and binary ROC AUC) the predicted probabilities imply if they are calibrated: labels drawn from
    them ``draws`` times; the mean and the 2.5/97.5 percentiles of the metric over the draws."""
    if signature.task == "regression" or not predictions:
        return {}
    rng = np.random.default_rng(seed)
    found: dict[str, list[float]] = {"accuracy": []}
    if signature.task == "multiclass":
        probabilities = np.asarray(predictions, dtype=np.float64)
        probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
        predicted = probabilities.argmax(axis=1)
        cumulative = probabilities.cumsum(axis=1)
        for _ in range(draws):
            drawn = (rng.random((len(predicted), 1)) > cumulative).sum(axis=1)
            found["accuracy"].append(float(np.mean(drawn == predicted)))
    else:
        scores = np.clip(np.asarray(predictions, dtype=np.float64), 0.0, 1.0)
        found["rocAuc"] = []
        for _ in range(draws):
            drawn = rng.random(len(scores)) < scores
            found["accuracy"].append(float(np.mean((scores >= 0.5) == drawn)))
            if 0 < drawn.sum() < len(drawn):
                found["rocAuc"].append(float(skm.roc_auc_score(drawn, scores)))
    return {
        name: Estimate(float(np.mean(v)), float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
        for name, v in found.items()
        if v
    }
