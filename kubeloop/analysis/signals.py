"""The signals a canary step is judged on, read through one interface from Prometheus or from /metrics directly.

Per model version and analysis window (the increase of each counter over the window):

- requests by HTTP status code (errors: 5xx), from the traffic layer in front of the versions;
- the latency histogram (buckets), for p99;
- the prediction histogram (buckets) and, for a multiclass model, the rows per predicted class, for the
  candidate-vs-stable prediction shift;
- the drift detector's flag (a gauge, its latest value);
- ground truth, from the drift sidecar's join of feedback to served rows: the rows labelled in the window with the
  sums of their loss and squared loss (a Welch test of candidate against stable), and the live metrics now;
- the estimate without labels (what the model's own probabilities imply), its value and 95% interval now.

Which series carry them is one `Queries` object of PromQL selectors with `$model` and `$version` placeholders, so any
Prometheus works (point the selectors at the metrics your stack has). `PrometheusSource` asks Prometheus's HTTP
query API (`sum by (le) (increase(SELECTOR[WINDOW]))` …): the cluster's Prometheus for the operator, the embedded
mode's own (`kubeloop.analysis.prometheus`) on one machine. The math on the signals (PromQL's histogram_quantile,
the KS distance of two histograms) lives here, and is the one `kubeloop status` uses too.

Only the Python standard library is used (urllib), so the operator image and the embedded mode both import it.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from string import Template
from typing import Protocol

_DURATION = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """Go-style duration as the API declares it ("30s", "5m", "1h30m", "500ms") in seconds."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 1h30m)")
    return sum(int(number) * _UNITS[unit] for number, unit in parts)


def promql_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


Buckets = list[tuple[float, float]]  # (upper bound `le`, cumulative count), sorted by bound, last bound +Inf


@dataclass
class VersionSignals:
    """One version's signals over one analysis window."""

    version: int
    requests: float = 0.0
    errors: float = 0.0
    latency: Buckets = field(default_factory=list)
    predictions: Buckets = field(default_factory=list)
    drift: bool | None = None  # None: no detector reports this version
    classes: dict[str, float] = field(default_factory=dict)  # rows per predicted class (multiclass only)
    # ground truth: rows labelled in the window, the sums of their loss and squared loss (for the Welch test)
    labelled: float = 0.0
    loss_sum: float = 0.0
    loss_squared_sum: float = 0.0
    live: dict[str, float] = field(default_factory=dict)  # the live metrics now (kubeloop_live_metric), rows included
    estimated: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {value, low, high}

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    def p99(self) -> float | None:
        return histogram_quantile(0.99, self.latency)

    def loss(self) -> tuple[float, float] | None:
        """Mean and sample variance of the labelled rows' loss in the window; None below two rows."""
        n = self.labelled
        if n < 2:
            return None
        mean = self.loss_sum / n
        return mean, max(0.0, (self.loss_squared_sum - n * mean * mean) / (n - 1))

    @property
    def predicted(self) -> float:
        return self.predictions[-1][1] if self.predictions else 0.0

    def class_shares(self) -> dict[str, float] | None:
        """Each predicted class's share of the rows; None when no class was counted (not multiclass, no rows)."""
        total = sum(self.classes.values())
        return {label: count / total for label, count in self.classes.items()} if total > 0 else None


BOUNDS = ("value", "low", "high")  # kubeloop_estimated_metric's `bound` label


@dataclass(frozen=True)
class Outcomes:
    """A version's performance on ground truth now: the live metrics on its last labelled rows (`rows` included)
    and the estimates without labels (metric -> {value, low, high})."""

    live: dict[str, float] = field(default_factory=dict)
    estimated: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PairedSignals:
    """The mirror's paired answers in a window: pairs compared (both answered 200), those that agreed, and the
    summed absolute score difference over the rows compared."""

    pairs: float = 0.0
    agreed: float = 0.0
    distance_sum: float = 0.0
    rows: float = 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.pairs if self.pairs > 0 else None

    @property
    def distance(self) -> float | None:
        return self.distance_sum / self.rows if self.rows > 0 else None


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """PromQL's histogram_quantile on cumulative buckets sorted by bound: linear interpolation inside the bucket the
    rank falls in (the first one starting at 0), the highest finite bound when it falls in the +Inf bucket.

    None where PromQL answers NaN: fewer than two buckets, no +Inf bucket, no observations.
    """
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]) or buckets[-1][1] <= 0:
        return None
    if not 0 <= q <= 1:
        return -math.inf if q < 0 else math.inf
    rank = q * buckets[-1][1]
    index = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    bound, count = buckets[index]
    if index == len(buckets) - 1:
        return buckets[-2][0]
    if index == 0 and bound <= 0:
        return bound
    lower_bound, lower_count = buckets[index - 1] if index > 0 else (0.0, 0.0)
    if count == lower_count:  # q 0 on an empty first bucket
        return bound
    return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)


def ks_distance(a: Buckets, b: Buckets) -> float | None:
    """Kolmogorov-Smirnov distance of two histograms with the same bounds: the largest gap of their CDFs at a bound."""
    if not a or not b or a[-1][1] <= 0 or b[-1][1] <= 0:
        return None
    cdf_a = {bound: count / a[-1][1] for bound, count in a}
    cdf_b = {bound: count / b[-1][1] for bound, count in b}
    bounds = sorted(set(cdf_a) | set(cdf_b))
    gap, last_a, last_b = 0.0, 0.0, 0.0
    for bound in bounds:
        last_a, last_b = cdf_a.get(bound, last_a), cdf_b.get(bound, last_b)
        gap = max(gap, abs(last_a - last_b))
    return gap


def share_gap(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    """L-infinity distance of two class-share maps (a class missing on one side has share 0 there): the largest
    gap and the class it is at."""
    label = max(sorted(a.keys() | b.keys()), key=lambda c: abs(a.get(c, 0.0) - b.get(c, 0.0)))
    return abs(a.get(label, 0.0) - b.get(label, 0.0)), label


@dataclass(frozen=True)
class Queries:
    """PromQL selectors of the series behind each signal (`$model`, `$version`, `$namespace` are substituted).

    The defaults name the embedded mode's processes: the traffic splitter's request counter and latency histogram
    (it sees every request, failed upstreams included), the model server's prediction histogram and predicted-class
    counter (multiclass models only; summed by its `class` label) and the drift sidecar's flag. `cluster()` names
    the model servers' own series per namespace, for KServe, where no kubeloop splitter sits in front of the
    versions.
    """

    requests: str = 'kubeloop_splitter_requests_total{version="$version"}'
    code_label: str = "code"
    latency_buckets: str = 'kubeloop_splitter_request_duration_seconds_bucket{version="$version"}'
    prediction_buckets: str = 'kubeloop_prediction_bucket{model="$model",version="$version"}'
    predicted_classes: str = 'kubeloop_predicted_class_total{model="$model",version="$version"}'
    drift: str = 'kubeloop_drift_detected{model="$model",version="$version"}'
    labelled: str = 'kubeloop_labelled_rows_total{model="$model",version="$version"}'
    loss: str = 'kubeloop_labelled_loss_total{model="$model",version="$version"}'
    loss_squared: str = 'kubeloop_labelled_loss_squared_total{model="$model",version="$version"}'
    live: str = 'kubeloop_live_metric{model="$model",version="$version"}'
    estimated: str = 'kubeloop_estimated_metric{model="$model",version="$version"}'  # label bound=value|low|high
    # the mirror's paired answers (the embedded splitter; empty: not available, as behind a Gateway's RequestMirror)
    shadow_pairs: str = 'kubeloop_shadow_pairs_total{version="$version"}'  # label agree="true"|"false"
    shadow_distance: str = 'kubeloop_shadow_distance_total{version="$version"}'
    shadow_rows: str = 'kubeloop_shadow_rows_total{version="$version"}'

    @classmethod
    def cluster(cls) -> Queries:
        """Per namespace, from the model server and drift sidecar of the predictor pods, as the chart's PodMonitor
        (predictor.podMonitor) scrapes them: the servers export `model` and `version`, the scrape adds `namespace`
        (and `pod`, `container`, `endpoint`, aggregated away: counters summed over replicas, the drift flag the max)."""
        where = '{namespace="$namespace",model="$model",version="$version"}'
        return cls(
            requests=f"kubeloop_requests_total{where}",
            latency_buckets=f"kubeloop_request_duration_seconds_bucket{where}",
            prediction_buckets=f"kubeloop_prediction_bucket{where}",
            predicted_classes=f"kubeloop_predicted_class_total{where}",
            drift=f"kubeloop_drift_detected{where}",
            labelled=f"kubeloop_labelled_rows_total{where}",
            loss=f"kubeloop_labelled_loss_total{where}",
            loss_squared=f"kubeloop_labelled_loss_squared_total{where}",
            live=f"kubeloop_live_metric{where}",
            estimated=f"kubeloop_estimated_metric{where}",
            shadow_pairs="",
            shadow_distance="",
            shadow_rows="",
        )

    def render(self, template: str, model: str, version: int, namespace: str = "") -> str:
        return Template(template).substitute(model=model, version=str(version), namespace=namespace)


class SignalSource(Protocol):
    """Where the analysis reads its signals: a `PrometheusSource`, or a test's fake."""

    def version_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> VersionSignals: ...

    def paired_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> PairedSignals: ...

    def outcomes(self, model: str, version: int, namespace: str = "") -> Outcomes: ...


class SignalError(RuntimeError):
    """The source could not be read (Prometheus down, a target unreachable)."""


# ---- Prometheus's HTTP API -------------------------------------------------------------------------------------


class PrometheusSource:
    def __init__(self, url: str, queries: Queries | None = None, timeout: float = 10.0) -> None:
        self.url, self.queries, self.timeout = url.rstrip("/"), queries or Queries(), timeout

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: [(labels, value)]."""
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(address, timeout=self.timeout) as response:
                body = json.load(response)
        except (OSError, ValueError) as error:
            raise SignalError(f"Prometheus at {self.url}: {promql}: {error}") from error
        if body.get("status") != "success":
            raise SignalError(f"Prometheus at {self.url}: {promql}: {body.get('error', body)}")
        return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]

    def version_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> VersionSignals:
        q, window = self.queries, promql_duration(window_s)

        def increase(template: str, by: str) -> list[tuple[dict[str, str], float]]:
            selector = q.render(template, model, version, namespace)
            return self.query(f"sum by ({by}) (increase({selector}[{window}]))")

        def total(template: str) -> float:
            return sum(_finite(value) for _, value in increase(template, "model"))

        requests = increase(q.requests, q.code_label)
        drift = self.query(f"max({q.render(q.drift, model, version, namespace)})")
        outcomes = self.outcomes(model, version, namespace)
        return VersionSignals(
            version=version,
            requests=sum(_finite(value) for _, value in requests),
            errors=sum(_finite(value) for labels, value in requests if labels.get(q.code_label, "").startswith("5")),
            latency=_buckets((labels.get("le", "+Inf"), value) for labels, value in increase(q.latency_buckets, "le")),
            predictions=_buckets(
                (labels.get("le", "+Inf"), value) for labels, value in increase(q.prediction_buckets, "le")
            ),
            drift=(drift[0][1] >= 1) if drift else None,
            classes={
                labels.get("class", ""): _finite(value) for labels, value in increase(q.predicted_classes, "class")
            },
            labelled=total(q.labelled),
            loss_sum=total(q.loss),
            loss_squared_sum=total(q.loss_squared),
            live=outcomes.live,
            estimated=outcomes.estimated,
        )

    def outcomes(self, model: str, version: int, namespace: str = "") -> Outcomes:
        """A version's live metrics and estimates without labels, as they are now (gauges: no window)."""
        q = self.queries
        live = self.query(f"max by (metric) ({q.render(q.live, model, version, namespace)})")
        estimated: dict[str, dict[str, float]] = {}
        for labels, value in self.query(f"max by (metric, bound) ({q.render(q.estimated, model, version, namespace)})"):
            if math.isfinite(value):
                estimated.setdefault(labels.get("metric", ""), {})[labels.get("bound", "value")] = value
        return Outcomes(
            live={labels.get("metric", ""): value for labels, value in live if math.isfinite(value)},
            estimated={metric: bounds for metric, bounds in estimated.items() if len(bounds) == len(BOUNDS)},
        )

    def paired_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> PairedSignals:
        """A shadow version's paired answers over the window; all zero where the queries name no paired series."""
        q, window = self.queries, promql_duration(window_s)
        if not q.shadow_pairs:
            return PairedSignals()

        def increase(template: str, by: str) -> list[tuple[dict[str, str], float]]:
            selector = q.render(template, model, version, namespace)
            return self.query(f"sum by ({by}) (increase({selector}[{window}]))")

        pairs = increase(q.shadow_pairs, "agree")
        return PairedSignals(
            pairs=sum(_finite(value) for _, value in pairs),
            agreed=sum(_finite(value) for labels, value in pairs if labels.get("agree") == "true"),
            distance_sum=sum(_finite(value) for _, value in increase(q.shadow_distance, "version")),
            rows=sum(_finite(value) for _, value in increase(q.shadow_rows, "version")),
        )


def _buckets(pairs: Iterable[tuple[str, float]]) -> Buckets:
    out = sorted((float(le), _finite(value)) for le, value in pairs)
    return out if out and out[-1][1] > 0 else []


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0
