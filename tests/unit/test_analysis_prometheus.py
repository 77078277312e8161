"""The canary signals read from a real Prometheus (Debian's `prometheus`, started as the embedded mode starts it)
scraping the model servers' and the drift sidecar's real expositions: `PrometheusSource` with the embedded mode's
queries and with the cluster's (series labelled as the chart's PodMonitor scrape labels them), and `Scraped`.

Every exposition is served first with all its values at 0, then as it is, with timestamps 12 s and 8 s before the
test began: so each counter's `increase()` over a window holding both is its value times `INCREASE`, exactly (PromQL
extrapolates half the 4 s between the two samples past the last one, the window's end being further away than 1.1
times that, and nothing before a first sample at 0).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest

from kubeloop.analysis import AnalysisState, CheckResult, PrometheusSource, Queries, VersionSignals, decide
from kubeloop.analysis.prometheus import EmbeddedPrometheus, Scraped
from kubeloop.analysis.signals import ks_distance
from kubeloop.api.modeldeployment import CanaryAnalysis
from kubeloop.errors import KubeloopError
from tests.support.metrics_endpoint import MetricsEndpoint

CLASSES = ("Adelie", "Chinstrap", "Gentoo")
INCREASE = 1.5
WINDOW_S = 300.0  # holds both samples however long Prometheus takes to start
Target = tuple[Callable[[], str], Mapping[str, str]]  # an exposition, and the labels its scrape adds


def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        time.sleep(0.2)


def stamped(exposition: str, timestamp_ms: int, zero: bool = False) -> str:
    """Every sample of a prometheus_client exposition (its value ends the line) at this time, its value 0 if `zero`."""
    out = []
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            line = f"{series} {0 if zero else value} {timestamp_ms}"
        out.append(line + "\n")
    return "".join(out)


class Traffic:
    """Expositions served at 0 until `flow()`, as they are from then on (timestamps: see the module's docstring)."""

    def __init__(self) -> None:
        self.flowing = False
        self.endpoints: list[MetricsEndpoint] = []
        now_ms = int(time.time() * 1000)
        self.before_ms, self.after_ms = now_ms - 12_000, now_ms - 8_000

    def serve(self, exposition: Callable[[], str]) -> MetricsEndpoint:
        def text(_: int) -> str:
            if self.flowing:
                return stamped(exposition(), self.after_ms)
            return stamped(exposition(), self.before_ms, zero=True)

        endpoint = MetricsEndpoint(text)
        self.endpoints.append(endpoint)
        return endpoint

    def flow(self) -> None:
        """Serve the real values, until Prometheus has stored them (a later scrape of every endpoint has begun)."""
        scraped = [endpoint.scrapes for endpoint in self.endpoints]
        self.flowing = True
        until(lambda: all(e.scrapes >= n + 2 for e, n in zip(self.endpoints, scraped, strict=True)))

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


@contextmanager
def prometheus_scraping(targets: Sequence[Target]) -> Iterator[tuple[str, Traffic]]:
    """A real Prometheus scraping each exposition as its own target, with these target labels; yields its URL and
    the traffic once every target was scraped at 0."""
    traffic = Traffic()
    with ExitStack() as stack:
        stack.callback(traffic.close)
        prometheus = stack.enter_context(EmbeddedPrometheus("1s", rules=None))
        for n, (exposition, labels) in enumerate(targets):
            prometheus.scrape(f"target-{n}", [traffic.serve(exposition).url], labels)
        prometheus.start()
        up = PrometheusSource(prometheus.url)
        until(lambda: up.query("sum(up)") == [({}, float(len(targets)))])
        yield prometheus.url, traffic


def prediction_shift(stable: VersionSignals, candidate: VersionSignals) -> CheckResult:
    """The predictionShift check of a canary step on these signals (default thresholds)."""
    decision = decide(CanaryAnalysis(steps=[10, 100]), AnalysisState(), stable, candidate)
    (check,) = [c for c in decision.checks if c.name == "predictionShift"]
    return check


# ---- the embedded mode: Scraped ---------------------------------------------------------------------------------

SPLITTER = """# HELP kubeloop_splitter_requests_total Requests
# TYPE kubeloop_splitter_requests_total counter
kubeloop_splitter_requests_total{code="200",version="2"} %(ok)s
kubeloop_splitter_requests_total{code="500",version="2"} %(bad)s
kubeloop_splitter_requests_total{code="200",version="1"} 1000.0
kubeloop_splitter_request_duration_seconds_bucket{le="0.01",version="2"} %(ok)s
kubeloop_splitter_request_duration_seconds_bucket{le="+Inf",version="2"} %(total)s
kubeloop_prediction_bucket{model="arrests",version="2",le="0.5"} %(total)s
kubeloop_prediction_bucket{model="arrests",version="2",le="+Inf"} %(total)s
kubeloop_drift_detected{model="arrests",version="2"} 1.0
"""


def test_scraped_reads_increases_over_the_window_from_its_prometheus() -> None:
    """The embedded mode's queries (the splitter's requests and latency, the server's predictions, the sidecar's
    flag) on targets added while Prometheus runs, as the loop adds the canary's."""
    traffic = Traffic()
    endpoint = traffic.serve(lambda: SPLITTER % {"ok": 30, "bad": 10, "total": 40})
    scraped = Scraped()
    try:
        assert scraped.backend == f"Prometheus {scraped.prometheus.url}"
        scraped.scrape("canary", [endpoint.url])
        until(lambda: endpoint.scrapes >= 2)  # the first one, at 0, is stored
        traffic.flow()
        got = scraped.source.version_signals("arrests", 2, window_s=WINDOW_S)
        assert (got.requests, got.errors, got.error_rate) == (40 * INCREASE, 10 * INCREASE, 0.25)
        assert got.latency == [(0.01, 30 * INCREASE), (float("inf"), 40 * INCREASE)]
        assert got.predicted == 40 * INCREASE and got.drift is True
        assert scraped.source.version_signals("arrests", 7, window_s=WINDOW_S).drift is None
    finally:
        scraped.stop()
        traffic.close()
    assert not scraped.prometheus.directory.exists()


def test_scraped_without_prometheus_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus there
    with pytest.raises(KubeloopError, match=r"no `prometheus` executable is on PATH") as error:
        Scraped()
    assert "apt-get install prometheus" in str(error.value) and "./dev test" in str(error.value)


# ---- per task: the model servers' real expositions ------------------------------------------------------------------


def model_servers(**tasks: dict) -> tuple[dict[int, object], Callable[[], str]]:
    """Model servers' metrics, one per version (keyword `v<N>`: ServingMetrics options), and their /metrics text."""
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import ServingMetrics

    registries, servers = {}, {}
    for name, options in tasks.items():
        version = int(name.removeprefix("v"))
        registries[version] = CollectorRegistry()
        servers[version] = ServingMetrics("penguins", version, [], registry=registries[version], **options)
    return servers, lambda: "".join(generate_latest(r).decode() for r in registries.values())


def probabilities(predicted: list[int], confidence: float = 0.8) -> np.ndarray:
    """One row of class probabilities per predicted class index, the predicted one at `confidence`."""
    rows = np.full((len(predicted), len(CLASSES)), (1 - confidence) / (len(CLASSES) - 1))
    rows[np.arange(len(predicted)), predicted] = confidence
    return rows


def test_prometheus_source_reads_the_predicted_class_mix() -> None:
    """`sum by (class) (increase(kubeloop_predicted_class_total{...}[window]))`, with the embedded mode's queries and
    the cluster's (the scrape adds `namespace`, as a PodMonitor scrape does)."""
    servers, text = model_servers(
        v1={"task": "multiclass", "classes": CLASSES}, v2={"task": "multiclass", "classes": CLASSES}, v3={}
    )
    servers[1].observe_batch({}, probabilities([0] * 34 + [1] * 33 + [2] * 33))
    servers[2].observe_batch({}, probabilities([0] * 80 + [1] * 10 + [2] * 10))
    servers[3].observe_batch({}, np.array([0.2, 0.9]))
    with prometheus_scraping([(text, {"namespace": "ml"})]) as (url, traffic):
        traffic.flow()
        local, cluster = PrometheusSource(url), PrometheusSource(url, Queries.cluster())
        stable = local.version_signals("penguins", 1, WINDOW_S)
        candidate = local.version_signals("penguins", 2, WINDOW_S)
        assert stable.classes == {c: n * INCREASE for c, n in zip(CLASSES, (34, 33, 33), strict=True)}
        assert candidate.classes == {c: n * INCREASE for c, n in zip(CLASSES, (80, 10, 10), strict=True)}
        assert stable.predictions == candidate.predictions  # the same confidence
        assert local.version_signals("penguins", 3, WINDOW_S).classes == {}  # binary
        assert cluster.version_signals("penguins", 2, WINDOW_S, namespace="ml").classes == candidate.classes
        assert cluster.version_signals("penguins", 2, WINDOW_S, namespace="staging").classes == {}
        check = prediction_shift(stable, candidate)
        assert check.status == "fail" and check.value == pytest.approx(0.46)


def test_regression_value_buckets_compare_across_versions() -> None:
    """Two regression versions trained on slightly different labels: their value buckets lie on the same grid of
    round steps (here 2, from 0..20 and from 2..22), so the histograms' KS distance is near 0 on the same values and
    large on shifted ones."""
    from kubeloop.histograms import value_buckets

    assert value_buckets(10.0, 3.0)[:2] == (0.0, 2.0) and value_buckets(12.0, 3.2)[:2] == (2.0, 4.0)
    servers, text = model_servers(
        v1={"task": "regression", "label_stats": (10.0, 3.0)},
        v2={"task": "regression", "label_stats": (12.0, 3.2)},
        v3={"task": "regression", "label_stats": (12.0, 3.2)},
    )
    values = np.random.default_rng(0).normal(11.0, 3.0, 2000)
    servers[1].observe_batch({}, values)
    servers[2].observe_batch({}, values[::-1].copy())
    servers[3].observe_batch({}, values + 3.0)
    with prometheus_scraping([(text, {})]) as (url, traffic):
        traffic.flow()
        source = PrometheusSource(url)
        stable, same, shifted = (source.version_signals("penguins", v, WINDOW_S) for v in (1, 2, 3))
    assert stable.classes == {}
    assert ks_distance(same.predictions, stable.predictions) < 0.01
    assert prediction_shift(stable, same).status == "pass"
    check = prediction_shift(stable, shifted)
    assert check.status == "fail" and check.value > 0.3


# ---- the cluster's default queries against series labelled as the chart's PodMonitor scrape labels them -------------


def _predictor_pod(stable: int, canary: int, drifting: bool) -> dict[str, str]:
    """/metrics of one predictor pod's two containers serving `stable` (its sidecar also knows `canary`)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from monitoring.metrics import Metrics
    from serving.metrics import ServingMetrics

    registry = CollectorRegistry()
    server = ServingMetrics("arrests", stable, [], registry=registry)
    for code, seconds in [(200, 0.004)] * 8 + [(500, 0.2)] * 2:
        server.count_request("v1", code, seconds)
    server.observe_batch({}, np.array([0.2, 0.9, 0.7]))
    sidecar_registry = CollectorRegistry()
    drift = Metrics(sidecar_registry)
    drift.detected.labels("arrests", str(stable)).set(1 if drifting else 0)
    drift.detected.labels("arrests", str(canary)).set(0)  # the other version's window, which this pod never fills
    return {
        "kserve-container": generate_latest(registry).decode(),
        "drift-detector": generate_latest(sidecar_registry).decode(),
    }


def test_cluster_queries_select_the_series_a_podmonitor_scrape_stores() -> None:
    from operators import inferenceservice as isvc

    # prometheus-operator's target labels for a PodMonitor endpoint: namespace, pod, container, endpoint (the port's
    # name), job (<namespace>/<PodMonitor name>) and instance; honor_labels false, its default, as here
    ports = {"kserve-container": isvc.SERVER_PORT_NAME, "drift-detector": isvc.SIDECAR_METRICS_PORT_NAME}
    pods = {
        ("ml", "arrests-predictor-7d9f"): _predictor_pod(1, 2, drifting=False),
        ("ml", "arrests-predictor-v2-5c4b"): _predictor_pod(2, 1, drifting=True),
        ("other", "arrests-predictor-1a2b"): _predictor_pod(1, 2, drifting=True),  # same model elsewhere
    }
    targets = [
        (
            lambda text=text: text,
            {
                "namespace": namespace,
                "pod": pod,
                "container": container,
                "endpoint": ports[container],
                "job": "kubeloop-system/kubeloop-predictors",
                "instance": f"10.0.0.1:{container}",
            },
        )
        for (namespace, pod), containers in pods.items()
        for container, text in containers.items()
    ]
    with prometheus_scraping(targets) as (url, traffic):
        traffic.flow()
        source = PrometheusSource(url, Queries.cluster())
        stored = source.query('{__name__=~"kubeloop_.+"}')
        # no exported label is shadowed by a target label (Prometheus would keep it as exported_<name>)
        assert stored and not [key for labels, _ in stored for key in labels if key.startswith("exported_")]

        def signals(version: int, namespace: str) -> VersionSignals:
            return source.version_signals("arrests", version, window_s=WINDOW_S, namespace=namespace)

        canary = signals(2, "ml")
        assert (canary.requests, canary.errors) == (10 * INCREASE, 2 * INCREASE)
        assert canary.latency[-1] == (float("inf"), 10 * INCREASE) and canary.p99() is not None
        assert canary.predicted == 3 * INCREASE and canary.drift is True
        stable = signals(1, "ml")
        # the other namespace not in it
        assert (stable.requests, stable.predicted, stable.drift) == (10 * INCREASE, 3 * INCREASE, False)
        nowhere = signals(2, "staging")
        assert (nowhere.requests, nowhere.predicted, nowhere.drift) == (0, 0, None)


def test_annotation_scrapes_keep_model_and_version_too() -> None:
    """Plain Prometheus's kubernetes-pods job copies every pod label to a target label (labelmap, names sanitized):
    none of the predictor pods' labels may become one the servers export."""
    import yaml

    from kubeloop.api import parse_resource
    from operators import inferenceservice as isvc
    from operators.settings import Settings

    samples = Path(__file__).resolve().parents[2] / "manifests/samples"
    md = yaml.safe_load((samples / "modeldeployment.yaml").read_text())
    md["metadata"].update(namespace="ml", uid="md-uid")
    md["spec"].update(drift={"enabled": True}, canary={"version": 2, "trafficPercent": 10})
    versions = {}
    for n in (1, 2):
        mv = yaml.safe_load((samples / "modelversion.yaml").read_text())
        mv["metadata"].update(name=f"arrests-v{n}", namespace="ml")
        mv["spec"]["version"] = n
        versions[n] = parse_resource(mv)
    obj = isvc.desired_inferenceservice(parse_resource(md), versions, Settings())
    exported = {"model", "version", "code", "protocol", "reason", "le", "feature", "value", "tier", "result", "class"}
    for component in [obj["spec"]["predictor"], obj["spec"]["canary"][0]["predictor"]]:
        labels = {**obj["metadata"]["labels"], **component["labels"]}
        mapped = {re.sub(r"[^a-zA-Z0-9_]", "_", key) for key in labels}
        assert not mapped & exported, mapped & exported
