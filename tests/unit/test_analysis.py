"""The canary analysis engine and the retrain policy (pure), the signal math, and both signal sources (the direct
/metrics scraper, and Prometheus's HTTP API on a real Prometheus) on the model servers' real expositions."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from kubeloop.analysis import (
    AnalysisState,
    CheckResult,
    MetricsSource,
    PrometheusSource,
    RetrainState,
    VersionSignals,
    decide,
    decide_retrain,
)
from kubeloop.analysis.prometheus import EmbeddedPrometheus
from kubeloop.analysis.signals import (
    Queries,
    Selector,
    duration_seconds,
    histogram_quantile,
    ks_distance,
    parse_exposition,
    share_gap,
)
from kubeloop.api.modeldeployment import AnalysisRecord, CanaryAnalysis, CanaryChecks, Retrain

ANALYSIS = CanaryAnalysis(steps=[10, 25, 50, 100], interval="5s", max_failed_checks=2)
LAT_FAST = [(0.01, 90.0), (0.05, 100.0), (float("inf"), 100.0)]
LAT_SLOW = [(0.01, 0.0), (0.05, 10.0), (0.5, 100.0), (float("inf"), 100.0)]
PRED_LOW = [(0.25, 80.0), (0.5, 95.0), (0.75, 100.0), (float("inf"), 100.0)]
PRED_HIGH = [(0.25, 0.0), (0.5, 5.0), (0.75, 20.0), (float("inf"), 100.0)]


def serve_text(body: Callable[[], str]) -> ThreadingHTTPServer:
    """A /metrics endpoint on loopback answering ``body()``; the caller shuts it down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def signals(
    version: int, requests=100.0, errors=0.0, latency=LAT_FAST, predictions=PRED_LOW, drift=False, classes=None
):
    return VersionSignals(version, requests, errors, list(latency), list(predictions), drift, dict(classes or {}))


def test_durations() -> None:
    assert duration_seconds("30s") == 30
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("500ms") == 0.5
    with pytest.raises(ValueError):
        duration_seconds("5 minutes")


def test_histogram_quantile_matches_prometheus() -> None:
    # 100 observations: 90 in (0, 0.01], 10 in (0.01, 0.05]: p50 at 0.01*50/90, p99 at 0.01 + 0.04*9/10
    assert histogram_quantile(0.5, LAT_FAST) == pytest.approx(0.01 * 50 / 90)
    assert histogram_quantile(0.99, LAT_FAST) == pytest.approx(0.046)
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 5.0)]) == 0.1  # +Inf bucket: highest finite bound
    assert histogram_quantile(0.99, []) is None


def test_ks_distance_of_histograms() -> None:
    assert ks_distance(PRED_LOW, PRED_LOW) == 0
    assert ks_distance(PRED_LOW, PRED_HIGH) == pytest.approx(0.9)
    assert ks_distance(PRED_LOW, []) is None


def test_share_gap_is_the_largest_class_share_difference() -> None:
    assert share_gap({"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.5, "c": 0.3}) == (pytest.approx(0.3), "a")
    assert share_gap({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == (0.0, "a")
    assert signals(1).class_shares() is None  # not multiclass
    assert signals(1, classes={"a": 0.0}).class_shares() is None  # no rows
    assert signals(1, classes={"a": 30.0, "b": 10.0}).class_shares() == {"a": 0.75, "b": 0.25}


def walk(analysis, stable, candidate, intervals):
    state, decisions = AnalysisState(), []
    for _ in range(intervals):
        decision = decide(analysis, state, stable, candidate)
        decisions.append(decision)
        state = decision.state
        if decision.final:
            break
    return decisions


def test_healthy_candidate_walks_the_steps_and_is_promoted() -> None:
    decisions = walk(ANALYSIS, signals(1), signals(2), 10)
    assert [(d.action, d.percent, d.next_percent) for d in decisions] == [
        ("advance", 10, 25),
        ("advance", 25, 50),
        ("advance", 50, 100),
        ("promote", 100, 100),
    ]
    assert "promoting v2" in decisions[-1].reason
    assert all(c.status == "pass" for c in decisions[0].checks)


@pytest.mark.parametrize(
    ("candidate", "failing"),
    [
        (signals(2, errors=20), "errorRate"),
        (signals(2, latency=LAT_SLOW), "p99LatencyRatio"),
        (signals(2, predictions=PRED_HIGH), "predictionShift"),
        (signals(2, drift=True), "drift"),
    ],
)
def test_each_check_can_fail_and_two_failures_roll_back(candidate: VersionSignals, failing: str) -> None:
    decisions = walk(ANALYSIS, signals(1), candidate, 10)
    assert [d.action for d in decisions] == ["hold", "rollback"]  # within two intervals
    assert decisions[-1].next_percent == 0
    assert [c.name for c in decisions[-1].checks if c.status == "fail"] == [failing]
    assert "rolling back to v1" in decisions[-1].reason and "failed check 2 of 2" in decisions[-1].reason


STABLE_MIX = {"Adelie": 34.0, "Chinstrap": 33.0, "Gentoo": 33.0}


def prediction_shift_check(decision) -> CheckResult:
    (check,) = [c for c in decision.checks if c.name == "predictionShift"]
    return check


def test_a_multiclass_canary_predicting_another_class_mix_at_the_same_confidence_fails() -> None:
    """Same confidence histogram, so a KS distance of 0; but the candidate predicts Adelie for 80% of the rows where
    the stable version does for 34%: the class-share gap decides."""
    stable = signals(1, classes=STABLE_MIX)
    candidate = signals(2, classes={"Adelie": 80.0, "Chinstrap": 10.0, "Gentoo": 10.0})
    assert ks_distance(candidate.predictions, stable.predictions) == 0
    decisions = walk(ANALYSIS, stable, candidate, 10)
    assert [d.action for d in decisions] == ["hold", "rollback"]
    check = prediction_shift_check(decisions[-1])
    assert check.status == "fail" and check.value == pytest.approx(0.46)
    assert check.reason == (
        "predicted-class share gap 0.460 (class 'Adelie': 80.0% of the candidate's predictions, 34.0% of the "
        "stable's) > KS distance 0.000 of the confidence histograms"
    )
    assert check.reason in decisions[-1].reason and "predictionShift 0.46 > 0.2" in decisions[-1].line()


def test_a_multiclass_canary_with_the_same_class_mix_and_confidence_passes() -> None:
    candidate = signals(2, classes={label: count * 3 for label, count in STABLE_MIX.items()})  # 3x the traffic
    decision = decide(ANALYSIS, AnalysisState(), signals(1, classes=STABLE_MIX), candidate)
    check = prediction_shift_check(decision)
    assert decision.action == "advance" and check.status == "pass" and check.value == 0
    assert check.reason.startswith("KS distance 0.000 of the confidence histograms >= predicted-class share gap 0.000")


def test_a_multiclass_canary_less_confident_on_the_same_mix_fails_on_the_histogram() -> None:
    stable = signals(1, classes=STABLE_MIX)
    candidate = signals(2, predictions=PRED_HIGH, classes={"Adelie": 30.0, "Chinstrap": 35.0, "Gentoo": 35.0})
    check = prediction_shift_check(decide(ANALYSIS, AnalysisState(), stable, candidate))
    assert check.status == "fail" and check.value == pytest.approx(0.9)
    assert check.reason.startswith("KS distance 0.900 of the confidence histograms >= predicted-class share gap 0.040")


def test_binary_and_regression_prediction_shift_is_the_histogram_ks_distance() -> None:
    check = prediction_shift_check(decide(ANALYSIS, AnalysisState(), signals(1), signals(2, predictions=PRED_HIGH)))
    assert check.status == "fail" and check.value == pytest.approx(0.9)
    assert check.reason == "KS distance 0.900 between candidate and stable predictions"


def test_no_candidate_traffic_holds_without_counting_a_failure() -> None:
    decision = decide(ANALYSIS, AnalysisState(step=1), signals(1), signals(2, requests=0, predictions=[]))
    assert decision.action == "hold" and decision.state.failed_checks == 0 and decision.next_percent == 25


def test_comparisons_are_skipped_when_stable_gets_no_traffic() -> None:
    stable = signals(1, requests=0, latency=[], predictions=[])
    decision = decide(ANALYSIS, AnalysisState(step=3), stable, signals(2))
    assert decision.action == "promote"
    assert {c.name: c.status for c in decision.checks} == {
        "errorRate": "pass",
        "p99LatencyRatio": "skip",
        "predictionShift": "skip",
        "drift": "pass",
    }


def test_failures_accumulate_across_steps_and_thresholds_come_from_the_spec() -> None:
    analysis = CanaryAnalysis(steps=[50, 100], max_failed_checks=3, checks=CanaryChecks(max_error_rate=0.5))
    decision = decide(analysis, AnalysisState(step=0, failed_checks=2), signals(1), signals(2, errors=20))
    assert decision.action == "advance"  # 20% errors is within 50%
    decision = decide(analysis, decision.state, signals(1), signals(2, errors=60))
    assert decision.action == "rollback" and decision.state.failed_checks == 3


def test_decision_record_is_a_valid_status_history_entry() -> None:
    decision = decide(ANALYSIS, AnalysisState(), signals(1), signals(2, errors=20))
    entry = AnalysisRecord.model_validate(decision.record())
    assert entry.action == "hold" and entry.traffic_percent == 10 and entry.checks[0].status == "fail"
    assert "errorRate 0.2 > 0.01" in decision.line()


def test_retrain_needs_sustained_drift_and_is_rate_limited() -> None:
    policy = Retrain(enabled=True, sustained_for="5m", min_interval="1h", training_job="t")
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    first = decide_retrain(policy, RetrainState(), True, t0)
    assert not first.start and first.state.drift_since == t0
    blip = decide_retrain(policy, first.state, False, t0 + timedelta(minutes=2))
    assert blip.state.drift_since is None  # drift must be uninterrupted
    state = decide_retrain(policy, blip.state, True, t0 + timedelta(minutes=3)).state
    assert not decide_retrain(policy, state, True, t0 + timedelta(minutes=7)).start
    go = decide_retrain(policy, state, True, t0 + timedelta(minutes=8))
    assert go.start and "sustained for 300s" in go.reason and go.state.last_started == t0 + timedelta(minutes=8)
    storm = decide_retrain(policy, go.state, True, t0 + timedelta(minutes=30))
    assert not storm.start and "minInterval 1h" in storm.reason
    assert decide_retrain(policy, go.state, True, t0 + timedelta(minutes=69)).start
    assert not decide_retrain(policy, state, True, t0 + timedelta(minutes=9), canary_active=True).start
    assert not decide_retrain(Retrain(enabled=False), state, True, t0 + timedelta(hours=2)).start


EXPOSITION = """# HELP kubeloop_splitter_requests_total Requests
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


def test_selectors_and_exposition_parsing() -> None:
    samples = parse_exposition(EXPOSITION % {"ok": 1, "bad": 2, "total": 3})
    assert ("kubeloop_splitter_requests_total", {"code": "500", "version": "2"}, 2.0) in samples
    selector = Selector.parse('kubeloop_splitter_requests_total{version="2",code=~"5.."}')
    assert [v for n, lab, v in samples if selector.matches(n, lab)] == [2.0]


def test_metrics_source_reads_increases_over_the_window() -> None:
    values = {"ok": 10, "bad": 0, "total": 10}

    server = serve_text(lambda: EXPOSITION % values)
    try:
        source = MetricsSource([f"http://127.0.0.1:{server.server_port}/metrics"], Queries())
        source.tick()
        values.update(ok=40, bad=10, total=50)
        got = source.version_signals("arrests", 2, window_s=0.0)
        assert (got.requests, got.errors, got.error_rate) == (40, 10, 0.25)
        assert got.latency == [(0.01, 30.0), (float("inf"), 40.0)]
        assert got.predicted == 40 and got.drift is True
        assert source.version_signals("arrests", 7, window_s=0.0).drift is None
    finally:
        server.shutdown()


# ---- per task: the model servers' real expositions through both sources ------------------------------------------

CLASSES = ("Adelie", "Chinstrap", "Gentoo")


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


def test_metrics_source_reads_the_predicted_class_mix() -> None:
    servers, text = model_servers(
        v1={"task": "multiclass", "classes": CLASSES}, v2={"task": "multiclass", "classes": CLASSES}, v3={}
    )
    servers[1].observe_batch({}, probabilities([0] * 5))  # before the baseline: not in the increase
    scraped = {"namespace": "ml", "pod": "penguins-predictor-1", "container": "kserve-container"}
    server = serve_text(text)
    clustered = serve_text(lambda: scraped_as(text(), scraped))
    try:
        local = MetricsSource([f"http://127.0.0.1:{server.server_port}/metrics"], Queries())
        cluster = MetricsSource([f"http://127.0.0.1:{clustered.server_port}/metrics"], Queries.cluster())
        local.tick()
        cluster.tick()
        servers[1].observe_batch({}, probabilities([0] * 34 + [1] * 33 + [2] * 33))
        servers[2].observe_batch({}, probabilities([0] * 80 + [1] * 10 + [2] * 10))
        servers[3].observe_batch({}, np.array([0.2, 0.9]))
        time.sleep(0.3)
        window = 0.2  # since the tick's scrape, not since the scrape of an earlier question

        stable = local.version_signals("penguins", 1, window)
        candidate = local.version_signals("penguins", 2, window)
        assert stable.classes == dict(zip(CLASSES, (34.0, 33.0, 33.0), strict=True))
        assert candidate.classes == dict(zip(CLASSES, (80.0, 10.0, 10.0), strict=True))
        assert stable.predictions == candidate.predictions  # the same confidence
        assert local.version_signals("penguins", 3, window).classes == {}  # binary
        assert cluster.version_signals("penguins", 2, window, namespace="ml").classes == candidate.classes
        assert cluster.version_signals("penguins", 2, window, namespace="staging").classes == {}
        check = prediction_shift_check(decide(ANALYSIS, AnalysisState(), stable, candidate))
        assert check.status == "fail" and check.value == pytest.approx(0.46)
    finally:
        server.shutdown()
        clustered.shutdown()


def test_prometheus_source_reads_the_predicted_class_mix() -> None:
    """A real Prometheus scraping the servers (with a namespace label, as a PodMonitor scrape adds it) answers the
    cluster queries: `sum by (class) (increase(kubeloop_predicted_class_total{...}[window]))`."""
    servers, text = model_servers(v1={"task": "multiclass", "classes": CLASSES}, v2={})
    server = serve_text(text)
    try:
        with EmbeddedPrometheus("1s", rules=None) as prometheus:
            prometheus.scrape("servers", [f"http://127.0.0.1:{server.server_port}"], {"namespace": "ml"})
            prometheus.start()
            source = PrometheusSource(prometheus.url, Queries.cluster())
            total = 'sum(kubeloop_predicted_class_total{namespace="ml"})'
            until(lambda: source.query(total) == [({}, 0.0)])  # scraped while every count is 0
            servers[1].observe_batch({}, probabilities([0] * 60 + [1] * 30 + [2] * 10))
            servers[2].observe_batch({}, np.array([0.2, 0.9]))
            until(lambda: source.query(total) == [({}, 100.0)])
            multiclass = source.version_signals("penguins", 1, window_s=60.0, namespace="ml")
            # increase() extrapolates every class's series alike: the shares are exact
            assert multiclass.class_shares() == pytest.approx(dict(zip(CLASSES, (0.6, 0.3, 0.1), strict=True)))
            assert source.version_signals("penguins", 2, window_s=60.0, namespace="ml").classes == {}
            assert source.version_signals("penguins", 1, window_s=60.0, namespace="staging").classes == {}
    finally:
        server.shutdown()


def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        time.sleep(0.2)


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
    server = serve_text(text)
    try:
        # a first scrape each: every counter's increase is its whole value
        stable, same, shifted = (
            MetricsSource([f"http://127.0.0.1:{server.server_port}/metrics"]).version_signals("penguins", v, 60.0)
            for v in (1, 2, 3)
        )
    finally:
        server.shutdown()
    assert stable.classes == {}
    assert ks_distance(same.predictions, stable.predictions) < 0.01
    assert prediction_shift_check(decide(ANALYSIS, AnalysisState(), stable, same)).status == "pass"
    check = prediction_shift_check(decide(ANALYSIS, AnalysisState(), stable, shifted))
    assert check.status == "fail" and check.value > 0.3


# ---- the cluster's default queries against series labelled as the chart's PodMonitor scrape labels them --------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def scraped_as(exposition: str, target: dict[str, str]) -> str:
    """The samples of an exposition as Prometheus stores them from a target with these labels (honor_labels false,
    the PodMonitor default: an exported label that a target label also names is kept as exported_<name>)."""
    lines = []
    for name, labels, value in parse_exposition(exposition):
        stored = {(f"exported_{k}" if k in target else k): v for k, v in labels.items()}
        stored.update(target)
        body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(stored.items()))
        lines.append(f"{name}{{{body}}} {value!r}")
    return "\n".join(lines) + "\n"


def _predictor_pod(stable: int, canary: int, drifting: bool) -> dict[str, str]:
    """/metrics of one predictor pod's two containers serving `stable` (its sidecar also knows `canary`)."""
    import numpy as np
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
    # name), job (<namespace>/<PodMonitor name>) and instance
    ports = {"kserve-container": isvc.SERVER_PORT_NAME, "drift-detector": isvc.SIDECAR_METRICS_PORT_NAME}
    pods = {
        ("ml", "arrests-predictor-7d9f"): _predictor_pod(1, 2, drifting=False),
        ("ml", "arrests-predictor-v2-5c4b"): _predictor_pod(2, 1, drifting=True),
        ("other", "arrests-predictor-1a2b"): _predictor_pod(1, 2, drifting=True),  # same model elsewhere
    }
    stored = ""
    for (namespace, pod), containers in pods.items():
        for container, text in containers.items():
            target = {
                "namespace": namespace,
                "pod": pod,
                "container": container,
                "endpoint": ports[container],
                "job": "kubeloop-system/kubeloop-predictors",
                "instance": f"10.0.0.1:{container}",
            }
            stored += scraped_as(text, target)
    assert "exported_" not in stored  # no exported label is shadowed by a target label

    server = serve_text(lambda: stored)
    try:

        def signals(version: int, namespace: str) -> VersionSignals:
            # a first scrape: each counter's increase is its whole value
            source = MetricsSource([f"http://127.0.0.1:{server.server_port}/metrics"], Queries.cluster())
            return source.version_signals("arrests", version, window_s=30.0, namespace=namespace)

        canary = signals(2, "ml")
        assert (canary.requests, canary.errors) == (10, 2)
        assert canary.latency[-1] == (float("inf"), 10.0) and canary.p99() is not None
        assert canary.predicted == 3 and canary.drift is True
        stable = signals(1, "ml")
        assert (stable.requests, stable.predicted, stable.drift) == (10, 3, False)  # the other namespace not in it
        nowhere = signals(2, "staging")
        assert (nowhere.requests, nowhere.predicted, nowhere.drift) == (0, 0, None)
    finally:
        server.shutdown()


def test_annotation_scrapes_keep_model_and_version_too() -> None:
    """Plain Prometheus's kubernetes-pods job copies every pod label to a target label (labelmap, names sanitized):
    none of the predictor pods' labels may become one the servers export."""
    from pathlib import Path

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
