"""Ground truth joined to what was served, and each version's performance on it.

A served prediction waits, by its request id (the id KServe's logger gives the request and response events), for
its labels, which may come hours later, in batches and out of order. The join keeps a bounded number of waiting
requests (the oldest is dropped and counted as expired); a label for an id it never saw, or saw labelled already,
is counted, not an error. Each version's live metrics are computed on its last ``window`` labelled rows; each
labelled row's loss (log loss for classifiers, squared error for regression) is summed per version as it joins,
with its square, so the canary analysis can compare two versions' mean loss over any interval (a Welch test on
the counters' increase).

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
from scipy import stats
from sklearn import metrics as skm

from kubeloop.api.modelversion import Task

LabelResult = Literal["joined", "unknown", "duplicate", "mismatch", "expired"]
Prediction = float | list[float]

DEFAULT_CAPACITY = 100_000  # requests waiting for labels, per sidecar
DEFAULT_WINDOW = 500  # labelled rows per version the live metrics are computed on
ESTIMATE_DRAWS = 200
CALIBRATION_BINS = 10
PROBABILITY_CLIP = 1e-7  # log loss of a probability of 0 or 1 is clipped to a finite value, as sklearn's was


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
    loss_sum: float = 0.0  # over every labelled row, not only the window: counters for the canary analysis
    loss_squared_sum: float = 0.0

    def __post_init__(self) -> None:
        self.predictions = deque(maxlen=self.window)
        self.labels = deque(maxlen=self.window)
        self.served = deque(maxlen=self.window)


class OutcomeJoin:
    """Predictions by request id until their labels arrive; the joined rows per version; counts of every result."""

    def __init__(
        self, task: Task, classes: Sequence[str] = (), capacity: int = DEFAULT_CAPACITY, window: int = DEFAULT_WINDOW
    ) -> None:
        self.task, self.classes = task, tuple(classes)
        self.capacity = capacity
        self.window = window
        self.results: Counter[LabelResult] = Counter()
        # request id -> (version, its predictions), oldest first: a plain dict keeps insertion order and costs the
        # event route (every response event) less than an OrderedDict
        self._waiting: dict[str, tuple[int, Sequence[Prediction]]] = {}
        self._labelled: OrderedDict[str, None] = OrderedDict()  # ids already joined, to count duplicates
        self._versions: dict[int, VersionOutcomes] = {}
        self._estimates: dict[int, dict[str, Estimate]] = {}  # refreshed off the event loop (refresh_estimate)
        self._lock = threading.Lock()

    def version(self, version: int) -> VersionOutcomes:
        if version not in self._versions:
            self._versions[version] = VersionOutcomes(self.window)
        return self._versions[version]

    def served(self, request_id: str, version: int, predictions: Sequence[Prediction]) -> None:
        outcomes = self._versions.get(version) or self.version(version)
        waiting = self._waiting
        with self._lock:
            waiting[request_id] = (version, predictions)
            outcomes.served.extend(predictions)
            if len(waiting) > self.capacity:
                del waiting[next(iter(waiting))]
                self.results["expired"] += 1

    def label(self, request_id: str, labels: Sequence[float]) -> LabelResult:
        """Join decoded labels (one per row of the request) to the request's predictions."""
        with self._lock:
            served = self._waiting.get(request_id)
            if served is None:
                result: LabelResult = "duplicate" if request_id in self._labelled else "unknown"
            elif len(labels) != len(served[1]):
                result = "mismatch"
            else:
                del self._waiting[request_id]
                self._labelled[request_id] = None
                while len(self._labelled) > self.capacity:
                    self._labelled.popitem(last=False)
                outcomes = self.version(served[0])
                outcomes.predictions.extend(served[1])
                outcomes.labels.extend(labels)
                outcomes.labelled_total += len(labels)
                loss = row_loss(self.task, served[1], labels)
                outcomes.loss_sum += float(loss.sum())
                outcomes.loss_squared_sum += float(np.square(loss).sum())
                result = "joined"
            self.results[result] += 1
            return result

    def totals(self, version: int) -> tuple[int, float, float]:
        """The version's labelled rows, and the sums of their loss and squared loss, read together."""
        with self._lock:
            outcomes = self.version(version)
            return outcomes.labelled_total, outcomes.loss_sum, outcomes.loss_squared_sum

    def live(self, version: int) -> dict[str, float | None]:
        """The version's metrics on its last ``window`` labelled rows (None where a metric is undefined yet)."""
        with self._lock:
            outcomes = self.version(version)
            predictions, labels = list(outcomes.predictions), np.asarray(outcomes.labels, dtype=np.float64)
        return performance(self.task, self.classes, predictions, labels)

    def refresh_estimate(self, version: int, seed: int = 0) -> dict[str, Estimate]:
        """Re-estimate the version's performance from its served rows (a few hundred ms: not on the event loop)."""
        with self._lock:
            served = list(self.version(version).served)
        found = estimate_without_labels(self.task, served, seed)
        with self._lock:
            self._estimates[version] = found
        return found

    def estimate(self, version: int) -> dict[str, Estimate]:
        """The last refreshed estimate."""
        with self._lock:
            return dict(self._estimates.get(version, {}))

    def status(self, version: int) -> dict[str, Any]:
        outcomes = self.version(version)
        return {
            "labelled": len(outcomes.labels),
            "labelledTotal": outcomes.labelled_total,
            "live": self.live(version),
            "estimated": {name: vars(e) for name, e in self.estimate(version).items()},
        }


def row_loss(task: Task, predictions: Sequence[Prediction], labels: Sequence[float]) -> np.ndarray:
    """Each labelled row's loss: binary log loss of the score, multiclass -log of the true class's probability
    (probabilities clipped to [PROBABILITY_CLIP, 1 - PROBABILITY_CLIP]), regression the squared error."""
    truth = np.asarray(labels, dtype=np.float64)
    if task == "regression":
        return np.square(np.asarray(predictions, dtype=np.float64) - truth)
    if task == "multiclass":
        probabilities = np.asarray(predictions, dtype=np.float64)
        p = probabilities[np.arange(len(truth)), truth.astype(np.int64)]
    else:
        scores = np.asarray(predictions, dtype=np.float64)
        p = np.where(truth == 1, scores, 1 - scores)
    return -np.log(np.clip(p, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP))


def performance(
    task: Task, classes: Sequence[str], predictions: Sequence[Prediction], labels: np.ndarray
) -> dict[str, float | None]:
    """Live metrics of joined rows, the same the evaluation computes on the test split, plus calibration and the
    label balance."""
    if len(labels) == 0:
        return {"rows": 0}
    if task == "regression":
        values = np.asarray(predictions, dtype=np.float64)
        return {
            "rows": len(labels),
            "mae": float(np.mean(np.abs(values - labels))),
            "rmse": float(np.sqrt(np.mean((values - labels) ** 2))),
            "labelMean": float(labels.mean()),
        }
    if task == "multiclass":
        probabilities = np.asarray(predictions, dtype=np.float64)
        indices = list(range(probabilities.shape[1]))
        truth = labels.astype(np.int64)
        both = len(np.unique(truth)) == len(indices)
        shares = np.bincount(truth, minlength=len(indices)) / len(truth)
        return {
            "rows": len(labels),
            "accuracy": float(np.mean(probabilities.argmax(axis=1) == truth)),
            "rocAuc": float(skm.roc_auc_score(truth, probabilities, multi_class="ovr", labels=indices))
            if both
            else None,
            "calibrationError": _calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == truth),
            **{f"labelShare.{name}": float(s) for name, s in zip(classes, shares, strict=False)},
        }
    scores = np.asarray(predictions, dtype=np.float64)
    positive = labels == 1
    positives = np.array([positive.sum()])
    both = 0 < positives[0] < len(labels)
    return {
        "rows": len(labels),
        "accuracy": float(np.mean((scores >= 0.5) == positive)),
        "rocAuc": float(_auc_by_ranks(stats.rankdata(scores), positive[None], positives)[0]) if both else None,
        "calibrationError": _calibration_error(scores, labels == 1),
        "positiveRate": float(labels.mean()),
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
    task: Task, predictions: Sequence[Prediction], seed: int = 0, draws: int = ESTIMATE_DRAWS
) -> dict[str, Estimate]:
    """Accuracy (and binary ROC AUC) the predicted probabilities imply if they are calibrated: labels drawn from
    them ``draws`` times (all draws at once: it runs beside the drift tests); the mean and the 2.5/97.5 percentiles
    of the metric over the draws."""
    if task == "regression" or not predictions:
        return {}
    rng = np.random.default_rng(seed)
    found: dict[str, np.ndarray] = {}
    if task == "multiclass":
        probabilities = np.asarray(predictions, dtype=np.float64)
        probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
        cumulative = probabilities.cumsum(axis=1)
        drawn = (rng.random((draws, len(probabilities), 1)) > cumulative[None]).sum(axis=2)
        found["accuracy"] = (drawn == probabilities.argmax(axis=1)[None]).mean(axis=1)
    else:
        scores = np.clip(np.asarray(predictions, dtype=np.float64), 0.0, 1.0)
        drawn = rng.random((draws, len(scores))) < scores[None]
        found["accuracy"] = ((scores >= 0.5)[None] == drawn).mean(axis=1)
        positives = drawn.sum(axis=1)
        both = (positives > 0) & (positives < len(scores))
        found["rocAuc"] = _auc_by_ranks(stats.rankdata(scores), drawn[both], positives[both])
    return {
        name: Estimate(float(np.mean(v)), float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
        for name, v in found.items()
        if len(v)
    }


def _auc_by_ranks(ranks: np.ndarray, positive: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """ROC AUC of one score vector (its average ranks) against each row of labels: the Mann-Whitney U statistic
    over the number of positive-negative pairs, as sklearn computes it with ties counted half."""
    negatives = positive.shape[1] - positives
    return (positive @ ranks - positives * (positives + 1) / 2) / (positives * negatives)
