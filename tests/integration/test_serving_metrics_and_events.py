"""The model server's metrics, its payload events (KServe logger CloudEvents, in batches), its prediction cache, and
a slow, then dead, sidecar that never slows or fails a prediction (servers: tests/integration/conftest.py).
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from tests.support.serving_fixtures import Process, arrests_frame, rows, scrape
from tests.support.serving_requests import CACHED, GOOD, predict_v1, predict_v2, v1, v2_body

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- metrics and payload events
def test_metrics_count_requests_errors_predictions_and_features(server, client):
    before = client.get(f"{server.url}/metrics").text
    frame = arrests_frame()
    assert predict_v1(client, server, {"instances": rows(frame, 10)}).status_code == 200
    assert predict_v2(client, server, v2_body(rows(frame, 5))).status_code == 200
    assert predict_v1(client, server, v1(age="x")).status_code == 400
    assert predict_v1(client, server, {"instances": [{**GOOD, "colour": "Purple"}]}).status_code == 200
    after = client.get(f"{server.url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return scrape(after, name, **labels) - scrape(before, name, **labels)

    base = {"model": "arrests", "version": "1"}
    assert delta("kubeloop_requests_total", **base, protocol="v1", code="200") == 2
    assert delta("kubeloop_requests_total", **base, protocol="v2", code="200") == 1
    assert delta("kubeloop_requests_total", **base, protocol="v1", code="400") == 1
    assert delta("kubeloop_request_errors_total", **base, reason="wrong_type") == 1
    assert delta("kubeloop_prediction_count", **base) == 16
    assert delta("kubeloop_feature_value_count", **base, feature="age") == 16
    assert delta("kubeloop_feature_category_total", **base, feature="colour", value="__other__") == 1
    colours = delta("kubeloop_feature_category_total", **base, feature="colour")
    assert colours == 16
    assert scrape(after, "request_predict_seconds_count", model_name="arrests") > 0  # kserve's own
    assert "kubeloop_payload_events_sent_total" in after


def test_payload_events_are_kserve_logger_cloudevents_in_batches(server, client, sink):
    body = {"instances": rows(arrests_frame(), 2)}
    response = predict_v1(client, server, body, headers={"ce-id": "trace-7"})
    assert response.status_code == 200
    rejected = predict_v1(client, server, v1(age="x"), headers={"ce-id": "trace-8"})
    assert rejected.status_code == 400
    after = predict_v1(client, server, v1(), headers={"ce-id": "trace-9"})  # sent after trace-8: its witness
    assert after.status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [e for e in client.get(f"{sink.url}/events").json() if e["event"]["id"].startswith("trace-")]
        if len({e["event"]["id"] for e in events} & {"trace-7", "trace-9"}) == 2:
            break
        time.sleep(0.1)
    assert not any(e["event"]["id"] == "trace-8" for e in events)  # a refused request is not logged
    by_type = {(e["event"]["id"], e["event"]["type"]): e for e in events if e["event"]["id"] == "trace-7"}
    assert set(by_type) == {
        ("trace-7", "org.kubeflow.serving.inference.request"),
        ("trace-7", "org.kubeflow.serving.inference.response"),
    }
    request = by_type[("trace-7", "org.kubeflow.serving.inference.request")]
    answer = by_type[("trace-7", "org.kubeflow.serving.inference.response")]
    for item in (request, answer):
        assert item["headers"]["content-type"] == "application/cloudevents-batch+json"
        event = item["event"]
        assert event["specversion"] == "1.0"
        assert event["source"] == f"http://localhost:{server.url.rsplit(':', 1)[1]}/"
        assert event["inferenceservicename"] == "arrests-isvc"
        assert event["namespace"] == "ml"
        assert event["component"] == "predictor"
        assert event["endpoint"] == "default"
        assert event["modelversion"] == "1"
        assert event["datacontenttype"] == "application/json"
        assert event["time"].endswith("Z")
    assert request["event"]["data"] == body
    assert answer["event"]["data"] == response.json()
    metrics = client.get(f"{server.url}/metrics").text
    assert scrape(metrics, "kubeloop_payload_sink_up", model="arrests", version="1") == 1
    assert scrape(metrics, "kubeloop_payload_events_sent_total", model="arrests", version="1") >= 4


# ---------------------------------------------------------------- the prediction cache
def test_prediction_cache_static_then_dynamic(processes, client, artifact):
    cached = processes["logged"]
    frame = arrests_frame()
    features = frame.drop(columns=["released"])
    before = client.get(f"{cached.url}/metrics").text
    base = {"model": "arrests", "version": "1"}
    assert scrape(before, "kubeloop_cache_entries", **base, tier="static") > 0  # distinct rows among the first 20

    def ask(start: int, n: int) -> None:
        response = predict_v1(client, cached, {"instances": rows(frame, n, start=start)})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            response.json()["predictions"], artifact.predict(features.iloc[start : start + n]), atol=1e-6
        )

    ask(0, CACHED)  # all precomputed
    ask(3000, 10)  # the long tail: computed, then remembered
    ask(3000, 10)
    after = client.get(f"{cached.url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return scrape(after, name, **base, **labels) - scrape(before, name, **base, **labels)

    assert delta("kubeloop_cache_hits_total", tier="static") >= CACHED
    assert delta("kubeloop_cache_hits_total", tier="dynamic") >= 10 - delta("kubeloop_cache_misses_total")
    assert 1 <= delta("kubeloop_cache_misses_total") <= 10
    assert 0 < scrape(after, "kubeloop_cache_entries", **base, tier="dynamic") <= 50


# ---------------------------------------------------------------- a slow, then dead, sidecar
def test_slow_then_dead_sidecar_never_slows_or_fails_predictions(processes, client):
    server, logged, slow = processes["server"], processes["logged"], processes["slow_sink"]
    body = v1()
    try:

        def latencies(target: Process, n: int = 60) -> list[float]:
            out = []
            for _ in range(n):
                started = time.perf_counter()
                response = predict_v1(client, target, body)
                out.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
            return sorted(out)

        answered_before = scrape(client.get(f"{logged.url}/metrics").text, "kubeloop_requests_total", code="200")
        latencies(logged, 10)  # warm-up
        reference = latencies(server)  # same model, its sink fast
        with_slow_sink = latencies(logged)
        # each batch takes the slow sink 0.5 s: were the sender on the request path, a request would take >= 1 s
        assert with_slow_sink[len(with_slow_sink) // 2] < max(3 * reference[len(reference) // 2], 0.05)
        assert with_slow_sink[-1] < 1.0

        failures: list[str] = []
        done = threading.Event()
        served = [0]

        def traffic() -> None:
            with httpx.Client(timeout=30) as own:
                while not done.is_set():
                    response = predict_v1(own, logged, body)
                    if response.status_code != 200:
                        failures.append(response.text)
                    served[0] += 1

        senders = [threading.Thread(target=traffic) for _ in range(2)]
        for thread in senders:
            thread.start()
        time.sleep(1.0)
        slow.stop(sig=9)  # the sidecar dies while traffic flows
        time.sleep(3.0)
        done.set()
        for thread in senders:
            thread.join(30)
        assert failures == [] and served[0] > 20

        metrics = client.get(f"{logged.url}/metrics").text
        answered = scrape(metrics, "kubeloop_requests_total", code="200") - answered_before
        assert scrape(metrics, "kubeloop_payload_events_failed_total") > 0
        assert scrape(metrics, "kubeloop_payload_events_dropped_total") > 0
        assert answered == served[0] + 70
        assert client.get(f"{logged.url}/v2/health/ready").json() == {"ready": True}
    finally:
        slow.stop(sig=9)
        code = logged.stop()
    assert code == 0, logged.log.read_text()[-2000:]  # SIGTERM: a clean stop
