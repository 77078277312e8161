"""The signals a canary step is judged on, read through one interface from Prometheus or from /metrics directly.

Per model version and analysis window (the increase of each counter over the window):

- requests by HTTP status code (errors: 5xx), from the traffic layer in front of the versions;
- the latency histogram (buckets), for p99;
- the prediction histogram (buckets) and, for a multiclass model, the rows per predicted class, for the
  candidate-vs-stable prediction shift;
- the drift detector's flag (a gauge, its latest value).

Which series carry them is one `Queries` object of PromQL selectors with `$model` and `$version` placeholders, so any
Prometheus works (point the selectors at the metrics your stack has). `PrometheusSource` asks Prometheus's HTTP
query API (`sum by (le) (increase(SELECTOR[WINDOW]))` …); `MetricsSource` scrapes the processes' `/metrics` itself and
computes the same increases between its own scrapes. Both return the same `VersionSignals`; the math on them
(quantiles, KS distance of two histograms) is shared and lives here.

Only the Python standard library is used (urllib), so the operator image and the embedded mode both import it.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
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

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    def p99(self) -> float | None:
        return histogram_quantile(0.99, self.latency)

    @property
    def predicted(self) -> float:
        return self.predictions[-1][1] if self.predictions else 0.0

    def class_shares(self) -> dict[str, float] | None:
        """Each predicted class's share of the rows; None when no class was counted (not multiclass, no rows)."""
        total = sum(self.classes.values())
        return {label: count / total for label, count in self.classes.items()} if total > 0 else None


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus's histogram_quantile on cumulative buckets: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # in the +Inf bucket: the highest finite bound, as Prometheus answers
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


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
        )

    def render(self, template: str, model: str, version: int, namespace: str = "") -> str:
        return Template(template).substitute(model=model, version=str(version), namespace=namespace)


class SignalSource(Protocol):
    """Where the analysis reads its signals. `tick()` is called when an interval starts (a no-op for Prometheus,
    which keeps its own history; the direct scraper takes its baseline then)."""

    def tick(self) -> None: ...

    def version_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> VersionSignals: ...


class SignalError(RuntimeError):
    """The source could not be read (Prometheus down, a target unreachable)."""


# ---- Prometheus's HTTP API -------------------------------------------------------------------------------------


class PrometheusSource:
    def __init__(self, url: str, queries: Queries | None = None, timeout: float = 10.0) -> None:
        self.url, self.queries, self.timeout = url.rstrip("/"), queries or Queries(), timeout

    def tick(self) -> None:
        pass

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

        requests = increase(q.requests, q.code_label)
        drift = self.query(f"max({q.render(q.drift, model, version, namespace)})")
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
        )


# ---- the processes' /metrics, scraped directly -------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse_exposition(text: str) -> list[Sample]:
    """Samples of the Prometheus text format (enough of it for prometheus_client's output)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        parsed = {k: _unescape(v) for k, _, v in _LABEL.findall(labels or "")}
        try:
            samples.append((name, parsed, float(value)))
        except ValueError:
            continue
    return samples


def _unescape(value: str) -> str:
    return value.replace(r"\"", '"').replace(r"\n", "\n").replace("\\\\", "\\")


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        name, _, rest = text.strip().partition("{")
        return cls(name.strip(), tuple((k, op, _unescape(v)) for k, op, v in _LABEL.findall(rest.rstrip("}"))))

    def matches(self, name: str, labels: dict[str, str]) -> bool:
        if name != self.name:
            return False
        for key, op, value in self.matchers:
            actual = labels.get(key, "")
            if (
                (op == "=" and actual != value)
                or (op == "!=" and actual == value)
                or (op == "=~" and not re.fullmatch(value, actual))
            ):
                return False
        return True


def _with_total(name: str) -> set[str]:
    """prometheus_client exposes counter `x` as `x_total`; a selector may name either."""
    return {name, name + "_total", name.removesuffix("_total")}


class MetricsSource:
    """Scrapes the given `/metrics` URLs itself and answers the same questions as Prometheus would.

    The increase over a window is the difference between the latest scrape and the latest scrape at least one
    window old (the oldest one when none is that old); counter resets count from zero.
    """

    def __init__(
        self,
        targets: Sequence[str] | Callable[[], Sequence[str]],
        queries: Queries | None = None,
        timeout: float = 5.0,
        keep_s: float = 900.0,
    ) -> None:
        self._targets, self.queries, self.timeout, self.keep_s = targets, queries or Queries(), timeout, keep_s
        self.history: list[tuple[float, list[Sample]]] = []

    def targets(self) -> list[str]:
        return list(self._targets() if callable(self._targets) else self._targets)

    def tick(self) -> None:
        self.scrape()

    def scrape(self) -> list[Sample]:
        samples: list[Sample] = []
        for url in self.targets():
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    samples += parse_exposition(response.read().decode("utf-8", "replace"))
            except OSError:
                continue  # a target that is down contributes nothing, as a failed Prometheus scrape
        now = time.monotonic()
        self.history.append((now, samples))
        self.history = [(t, s) for t, s in self.history if now - t <= self.keep_s] or self.history[-1:]
        return samples

    def _window(self, window_s: float) -> tuple[list[Sample], list[Sample]]:
        now_samples = self.scrape()
        now = self.history[-1][0]
        older = [s for t, s in self.history[:-1] if now - t >= window_s * 0.999]
        base = older[-1] if older else (self.history[0][1] if len(self.history) > 1 else [])
        return base, now_samples

    def version_signals(self, model: str, version: int, window_s: float, namespace: str = "") -> VersionSignals:
        q = self.queries
        base, current = self._window(window_s)

        def increase(template: str, by: str) -> dict[str, float]:
            selector = Selector.parse(q.render(template, model, version, namespace))
            names = _with_total(selector.name)
            grouped: dict[str, float] = {}
            before = {
                (n, tuple(sorted(lab.items()))): v
                for n, lab, v in base
                if n in names and selector.matches(selector.name, lab)
            }
            for name, labels, value in current:
                if name not in names or not selector.matches(selector.name, labels):
                    continue
                previous = before.get((name, tuple(sorted(labels.items()))), 0.0)
                delta = value - previous if value >= previous else value
                key = labels.get(by, "")
                grouped[key] = grouped.get(key, 0.0) + delta
            return grouped

        requests = increase(q.requests, q.code_label)
        drift_selector = Selector.parse(q.render(q.drift, model, version, namespace))
        flags = [v for n, lab, v in current if n == drift_selector.name and drift_selector.matches(n, lab)]
        return VersionSignals(
            version=version,
            requests=sum(requests.values()),
            errors=sum(v for code, v in requests.items() if code.startswith("5")),
            latency=_buckets(increase(q.latency_buckets, "le").items()),
            predictions=_buckets(increase(q.prediction_buckets, "le").items()),
            drift=(max(flags) >= 1) if flags else None,
            classes=increase(q.predicted_classes, "class"),
        )


def _buckets(pairs: Iterable[tuple[str, float]]) -> Buckets:
    out = sorted((float(le), _finite(value)) for le, value in pairs)
    return out if out and out[-1][1] > 0 else []


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0
