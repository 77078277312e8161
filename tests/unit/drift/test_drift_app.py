"""The drift sidecar's application in-process: windows and detection, malformed events and unknown versions, a full
detection queue, ASGI routes and the body limit, the read-only metrics listener, the listener flags."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from monitoring import detectors
from monitoring.events import lower_headers
from tests.support import traffic_events as traffic
from tests.support.drift_inputs import FEATURES, ROW, asgi_call, request_event


def test_sidecar_windows_split_batches_and_run_the_detector(app, frame) -> None:
    rows = traffic.records(traffic.shift_age_colour(frame, 120, np.random.default_rng(9)), FEATURES)
    for start in range(0, 120, 15):  # 8 events of 15 rows: windows of 50 fill mid-event
        assert app.ingest(*request_event(rows[start : start + 15], version=2)) == (200, "")
    assert app.ingest(lower_headers(traffic.event_headers("response", "r")), traffic.v1_response([0.9, 0.8])) == (
        200,
        "",
    )
    assert app.drain()
    status = app.status()
    v1, v2 = status["versions"]["1"], status["versions"]["2"]
    assert (v2["rows"], v2["windowsEvaluated"], v2["windowFill"]) == (120, 2, 20)
    assert v2["state"] == "Drift" and v2["drift"]["state"] == "Drift" and v2["drift"]["events"] == 8
    assert "age" in v2["lastWindow"]["driftedFeatures"]
    assert v1["windowsEvaluated"] == 0 and v1["state"] == "Unknown" and v1["predictions"]["count"] == 2
    assert set(v2["skew"]) == set(FEATURES)
    assert [w["state"] for w in v2["history"]] == ["NoDrift", "Drift"] and set(v2["history"][0]["pValues"]) == set(
        FEATURES
    )


def test_sidecar_counts_malformed_events_and_unknown_versions(app) -> None:
    assert app.ingest(*request_event([ROW], version=7)) == (400, "unknown_version")
    assert app.ingest(*request_event([{**ROW, "age": "old"}])) == (400, "wrong_type")
    assert app.ingest({}, b"{}") == (400, "missing_header")
    status = app.status()
    assert status["events"]["malformed"] == {"unknown_version": 1, "wrong_type": 1, "missing_header": 1}
    assert status["events"]["received"] == 3 and status["versions"]["1"]["rows"] == 0


def test_sidecar_drops_windows_when_the_detector_queue_is_full(schema, reference) -> None:
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    config = SidecarConfig(window=20, detection_queue=1)
    monitor = VersionMonitor(
        "arrests", 1, schema, reference, detectors.FeatureWiseDrift(reference), detectors.DriftTracker(), 20, deque()
    )
    sidecar = DriftSidecar([monitor], config, default_version=1)  # not started: nothing takes windows off
    for _ in range(3):
        sidecar.ingest(*request_event([ROW] * 10))
        sidecar.ingest(*request_event([ROW] * 10))
    assert sidecar.counters.dropped == 4  # window 1 queued; windows 2 and 3 (2 events each) dropped
    assert sidecar.status()["versions"]["1"]["windowsDropped"] == 2


def test_asgi_routes_and_body_limit(app) -> None:
    headers = [(k.encode(), v.encode()) for k, v in request_event([ROW])[0].items()]
    assert asgi_call(app, "POST", "/", headers, [traffic.v1_request([ROW])])[0] == 200
    assert asgi_call(app, "POST", "/any/path", headers, [b'{"instances": [', b"{}]}"])[0] == 400  # missing features
    big = [(b"content-length", b"20000"), *headers]
    assert asgi_call(app, "POST", "/", big, [b"x" * 20000]) == (413, b'{"error":"too_large"}')
    assert asgi_call(app, "POST", "/", headers, [b"x" * 6000, b"x" * 6000])[0] == 413  # chunked, no length
    status, body = asgi_call(app, "GET", "/metrics", [], [b""])
    assert status == 200 and b'kubeloop_drift_events_malformed_total{reason="too_large"} 2.0' in body
    assert asgi_call(app, "GET", "/healthz", [], [b""])[0] == 200
    assert asgi_call(app, "GET", "/status", [], [b""])[0] == 200
    assert asgi_call(app, "GET", "/nothing", [], [b""])[0] == 404
    assert asgi_call(app, "DELETE", "/status", [], [b""])[0] == 405


def test_the_metrics_listener_is_read_only(app) -> None:
    app.read_only_ports = frozenset({8091})
    headers = [(k.encode(), v.encode()) for k, v in request_event([ROW])[0].items()]
    metrics = ("0.0.0.0", 8091)
    status, body = asgi_call(app, "POST", "/", headers, [traffic.v1_request([ROW])], server=metrics)
    assert status == 405 and b"read-only" in body
    assert app.status()["events"]["received"] == 0  # refused before parsing: nothing counted
    for path in ("/metrics", "/status", "/healthz"):
        assert asgi_call(app, "GET", path, [], [b""], server=metrics)[0] == 200
    assert asgi_call(app, "POST", "/", headers, [traffic.v1_request([ROW])])[0] == 200  # the ingest listener takes it
    assert app.status()["events"]["received"] == 1


def test_listener_arguments() -> None:
    from monitoring.sidecar import Listener, _parser, listeners

    def parse(*argv: str) -> tuple[Listener, Listener | None]:
        return listeners(_parser().parse_args([*argv, "--model-version", "arrests:1"]))

    assert parse() == (Listener("127.0.0.1", 8090), None)  # embedded mode: one loopback listener, every route
    assert parse("--port", "9000", "--metrics-port", "9001") == (Listener("127.0.0.1", 9000), Listener("0.0.0.0", 9001))
    assert parse("--port", "0", "--metrics-port", "0", "--metrics-host", "::")[1] == Listener("::", 0)
    with pytest.raises(ValueError, match="port of its own"):
        parse("--port", "9000", "--metrics-port", "9000")
    with pytest.raises(ValueError, match="0-65535"):
        parse("--metrics-port", "70000")


def test_bad_listener_arguments_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from monitoring.sidecar import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "9000", "--metrics-port", "9000", "--model-version", "arrests:1"])
    assert exit_info.value.code == 2
    assert "--metrics-port 9000 is the ingest --port too" in capsys.readouterr().err
