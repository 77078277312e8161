"""The drift sidecar's Prometheus series: window results, detector time, and the events counted per version."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from monitoring.config import DETECTOR_BUCKETS
from monitoring.events import (
    REASONS,
    Predictions,
)
from monitoring.outcomes import OutcomeJoin
from monitoring.versions import VersionMonitor


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
        self.effect = Gauge(
            "kubeloop_drift_effect",
            "Last window's effect size per feature on one 0..1 scale: KS D (numeric), Cramer's V (categorical)",
            [*mv, "feature"],
            registry=registry,
        )
        self.share = Gauge(
            "kubeloop_drift_share",
            "Each drifted feature's share of the last window's shift (its effect over the drifted features' sum); 0 "
            "for a feature that did not drift",
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

    TYPES = ("request", "response", "feedback", "unknown")

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


class OutcomeMetrics:
    """Ground truth per version, read from the join at scrape time (the estimates as last refreshed)."""

    def __init__(self, join: OutcomeJoin, monitors: Sequence[VersionMonitor]) -> None:
        self.join = join
        self.versions = [(m.labels, m.version) for m in monitors]

    def collect(self) -> Iterator[Metric]:
        model = self.versions[0][0][0]
        results = CounterMetricFamily(
            "kubeloop_feedback_labels",
            "Feedback entries by result: joined; unknown (an id not served here, or expired); duplicate; mismatch "
            "(not one label per row); expired (served requests dropped unlabelled, the oldest first)",
            labels=["model", "result"],
        )
        for result in ("joined", "unknown", "duplicate", "mismatch", "expired"):
            results.add_metric([model, result], self.join.results[result])
        labelled = CounterMetricFamily(
            "kubeloop_labelled_rows", "Served rows joined to their labels", labels=["model", "version"]
        )
        loss = CounterMetricFamily(
            "kubeloop_labelled_loss",
            "Sum of the labelled rows' loss: log loss (binary, multiclass; probabilities clipped to [1e-7, 1-1e-7]), "
            "squared error (regression)",
            labels=["model", "version"],
        )
        loss_squared = CounterMetricFamily(
            "kubeloop_labelled_loss_squared",
            "Sum of the squares of the labelled rows' loss (with the sum and the rows: its variance over an interval)",
            labels=["model", "version"],
        )
        live = GaugeMetricFamily(
            "kubeloop_live_metric",
            "Each version's performance on its last labelled rows (rows: how many): rocAuc, accuracy, "
            "calibrationError, positiveRate (binary); accuracy, rocAuc, calibrationError, labelShare.CLASS "
            "(multiclass); mae, rmse, labelMean (regression)",
            labels=["model", "version", "metric"],
        )
        estimated = GaugeMetricFamily(
            "kubeloop_estimated_metric",
            "Performance the model's own probabilities imply without labels (if calibrated): value, and the 95% "
            "interval's low and high",
            labels=["model", "version", "metric", "bound"],
        )
        for labels, version in self.versions:
            rows, loss_sum, loss_squared_sum = self.join.totals(version)
            labelled.add_metric(list(labels), rows)
            loss.add_metric(list(labels), loss_sum)
            loss_squared.add_metric(list(labels), loss_squared_sum)
            for name, value in self.join.live(version).items():
                if value is not None:
                    live.add_metric([*labels, name], value)
            for name, found in self.join.estimate(version).items():
                for bound in ("value", "low", "high"):
                    estimated.add_metric([*labels, name, bound], getattr(found, bound))
        yield from (results, labelled, loss, loss_squared, live, estimated)
