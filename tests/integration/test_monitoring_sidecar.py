"""The drift sidecar as a real process over real HTTP: a real snapshot, ModelVersion records in a real registry,
CloudEvents as KServe's logger sends them, real alibi-detect behind it.

One sidecar serves the module (starting one imports alibi-detect: seconds): version 1 gets in-distribution traffic
(KServe's Go header casing, v1 bodies, no ce-modelversion: the default version), version 2 gets a shift (lower-case
headers, v2 bodies, ce-modelversion: 2), and both get malformed events; version 3 gets batches from kubeloop's own
payload logger. It runs as in a predictor pod: the ingest listener on loopback, the read-only metrics listener on
every address.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from kubeloop.api.modelversion import ModelVersion
from monitoring.detectors import DECLARED_DETECTION_WINDOWS, DECLARED_FALSE_POSITIVE_RATE
from tests.support import traffic_events as traffic
from tests.support.drift_sidecar import MAX_BODY, ROWS_PER_EVENT, SAMPLE, WINDOW, Sidecar, launch_sidecar

pytestmark = pytest.mark.integration

FEATURES = ["colour", "year", "age", "sex", "employed", "citizen", "checks"]


def _record(home: Path, digest: str, version: int) -> Path:
    from kubeloop.registry import Registry

    doc = yaml.safe_load(SAMPLE.read_text())
    doc["spec"]["lineage"]["datasetDigest"] = digest
    doc["spec"]["signature"]["inputs"] = [
        {"name": "colour", "dtype": "string", "categories": ["Black", "White"], "nullable": False},
        {"name": "year", "dtype": "int", "nullable": False},
        {"name": "age", "dtype": "int", "nullable": False},
        {"name": "sex", "dtype": "string", "categories": ["Female", "Male"], "nullable": False},
        {"name": "employed", "dtype": "string", "categories": ["No", "Yes"], "nullable": False},
        {"name": "citizen", "dtype": "string", "categories": ["No", "Yes"], "nullable": False},
        {"name": "checks", "dtype": "int", "nullable": False},
    ]
    spec = ModelVersion.model_validate(doc).spec
    registry = Registry(home / "registry")
    allocated, _ = registry.allocate(spec.model)
    assert allocated == version
    spec.version = version
    registry.save(spec, "test record: no training")
    return registry.root / spec.model / f"v{version}" / "modelversion.yaml"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    home = tmp_path_factory.mktemp("monitoring-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBELOOP_HOME", str(home))
        from kubeloop.data.snapshot import ingest, read_frame

        snapshot = ingest("bundled://arrests")
        frame = read_frame(snapshot)
        paths = [_record(home, snapshot.digest, v) for v in (1, 2, 3)]
    process = launch_sidecar(home, paths, home / "sidecar.stderr")
    mv = ModelVersion.model_validate(yaml.safe_load(paths[0].read_text())).spec.signature.inputs
    running = Sidecar(process.popen, process.ready(), process.stderr, frame, mv)
    try:
        yield running
    finally:
        running.stop()


def _send_rows(sidecar: Sidecar, rows: pd.DataFrame, start_id: int, *, version: int | None, v2: bool) -> int:
    records = traffic.records(rows, FEATURES)
    casing = "lower" if v2 else "go"
    sent = 0
    for i in range(0, len(records), ROWS_PER_EVENT):
        batch = records[i : i + ROWS_PER_EVENT]
        event_id = f"e{start_id + sent}"
        body = traffic.v2_request(batch, sidecar.signature) if v2 else traffic.v1_request(batch)
        response = sidecar.post(traffic.event_headers("request", event_id, version=version, casing=casing), body)
        assert response.status_code == 200, response.text
        scores = [0.6 + 0.3 * (r["age"] > 30) for r in batch]  # something that moves with the shift
        body = traffic.v2_response(scores) if v2 else traffic.v1_response(scores)
        response = sidecar.post(traffic.event_headers("response", event_id, version=version, casing=casing), body)
        assert response.status_code == 200, response.text
        sent += 1
    return sent


def test_in_distribution_traffic_over_20_windows_stays_within_the_false_positive_rate(sidecar: Sidecar) -> None:
    rng = np.random.default_rng(2026)
    states = []
    for window in range(20):
        _send_rows(sidecar, traffic.in_distribution(sidecar.frame, WINDOW, rng), window * 100, version=None, v2=False)
        states.append(sidecar.wait_windows(1, window + 1)["state"])
    status = sidecar.status()["versions"]["1"]
    assert status["windowsEvaluated"] == 20 and status["rows"] == 20 * WINDOW
    assert status["windowsInDrift"] == states.count("Drift")
    assert states.count("Drift") <= DECLARED_FALSE_POSITIVE_RATE * 20, states
    assert status["events"] == {"request": 20 * WINDOW // ROWS_PER_EVENT, "response": 20 * WINDOW // ROWS_PER_EVENT}
    assert set(status["lastWindow"]["pValues"]) == set(FEATURES)
    assert abs(status["skew"]["age"]["mean_shift"]) < 0.3
    metrics = sidecar.metrics()
    detected = 1.0 if status["state"] == "Drift" else 0.0
    assert f'kubeloop_drift_detected{{model="arrests",version="1"}} {detected}' in metrics
    assert 'kubeloop_drift_windows_total{model="arrests",result="dropped",version="1"} 0.0' in metrics
    assert re.search(r'kubeloop_drift_p_value\{feature="age",model="arrests",version="1"\} 0\.\d+', metrics)
    assert 'kubeloop_drift_detector_seconds_count{detector="ks"}' in metrics


def test_shifted_traffic_is_flagged_within_the_declared_windows(sidecar: Sidecar) -> None:
    rng = np.random.default_rng(7)
    frame = sidecar.frame
    # 3 clean windows, then the shift (age +15 years, colour mix inverted) begins half-way into window 4
    rows = pd.concat(
        [
            traffic.in_distribution(frame, 3 * WINDOW + WINDOW // 2, rng),
            traffic.shift_age_colour(frame, 5 * WINDOW, rng),
        ],
        ignore_index=True,
    )
    states = []
    for window in range(len(rows) // WINDOW):
        part = rows.iloc[window * WINDOW : (window + 1) * WINDOW]
        _send_rows(sidecar, part, 10_000 + window * 100, version=2, v2=True)
        states.append(sidecar.wait_windows(2, window + 1)["state"])
        if states[-1] == "Drift":
            break
    assert states[:3] == ["NoDrift"] * 3, states
    assert "Drift" in states, states
    assert states.index("Drift") - 3 + 1 <= DECLARED_DETECTION_WINDOWS, states
    status = sidecar.status()["versions"]["2"]
    assert status["drift"]["state"] == "Drift" and status["drift"]["minPValue"] < 1e-6
    assert {"age", "colour"} <= set(status["lastWindow"]["driftedFeatures"])
    # the window explains itself: how far each feature moved, and the drifted features' shares of the shift
    shares, effects = status["lastWindow"]["shares"], status["lastWindow"]["effects"]
    assert set(shares) == set(status["lastWindow"]["driftedFeatures"]) and sum(shares.values()) == pytest.approx(1)
    assert effects["age"] > 0.3 and effects["age"] == max(effects.values()) and shares["age"] == max(shares.values())
    assert status["skew"]["age"]["mean_shift"] > 1.0 and status["skew"]["colour"]["linf"] > 0.3
    assert status["predictionShift"]["against"] == 1 and status["predictionShift"]["ksDistance"] > 0.1
    metrics = sidecar.metrics()
    assert 'kubeloop_drift_detected{model="arrests",version="2"} 1.0' in metrics
    skew = re.search(
        r'kubeloop_drift_skew\{feature="age",model="arrests",statistic="mean_shift",version="2"\} (\S+)', metrics
    )
    assert skew and float(skew.group(1)) > 1.0, [line for line in metrics.splitlines() if "skew" in line][:20]
    share = re.search(r'kubeloop_drift_share\{feature="age",model="arrests",version="2"\} (\S+)', metrics)
    assert share and float(share.group(1)) == pytest.approx(shares["age"])


MALFORMED: list[tuple[str, dict[str, str], bytes | None, int]] = [
    ("bad_json", traffic.event_headers("request", "m1"), b'{"instances": [', 400),
    ("bad_json", traffic.event_headers("request", "m2"), b"\x00\xff garbage", 400),
    ("missing_header", {"Content-Type": "application/json"}, b'{"instances": []}', 400),
    ("unknown_type", {**traffic.event_headers("request", "m3"), "Ce-Type": "dev.example.unknown"}, b"{}", 400),
    ("unknown_version", traffic.event_headers("request", "m4", version=9), traffic.v1_request([{}]), 400),
    ("bad_body", traffic.event_headers("request", "m5"), b'"just a string"', 400),
    ("empty", traffic.event_headers("request", "m6"), b'{"instances": []}', 400),
    ("too_large", traffic.event_headers("request", "m7"), b"[" + b"1," * MAX_BODY + b"1]", 413),
]


def test_malformed_events_are_counted_and_the_process_stays_up(sidecar: Sidecar) -> None:
    before = sidecar.status()["events"]["malformed"]
    row = {"colour": "White", "year": 2000, "age": 21, "sex": "Male", "employed": "Yes", "citizen": "No", "checks": 1}
    cases = [
        *MALFORMED,
        ("unknown_feature", traffic.event_headers("request", "m8"), traffic.v1_request([{**row, "zip": "M5V"}]), 400),
        ("wrong_type", traffic.event_headers("request", "m9"), traffic.v1_request([{**row, "age": "old"}]), 400),
        ("wrong_type", traffic.event_headers("response", "m9"), b'{"predictions": ["yes"]}', 400),
        ("missing_feature", traffic.event_headers("request", "m10"), traffic.v1_request([{"age": 30}]), 400),
    ]
    for reason, headers, body, code in cases:
        response = sidecar.post(headers, body)
        assert response.status_code == code, (reason, response.text)
        assert reason in response.text
    # a huge body streamed without a content-length is cut off at the limit too
    chunks = (b"x" * 65536 for _ in range(40))
    response = sidecar.client.post("/", headers=traffic.event_headers("request", "m11"), content=chunks)
    assert response.status_code == 413
    expected = {}
    for reason, *_ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    expected["too_large"] += 1
    after = sidecar.status()["events"]["malformed"]
    assert {k: after.get(k, 0) - before.get(k, 0) for k in expected} == expected
    metrics = sidecar.metrics()
    for reason in expected:
        assert re.search(rf'kubeloop_drift_events_malformed_total\{{reason="{reason}"\}} [1-9]', metrics), reason
    assert 'kubeloop_drift_events_received_total{type="unknown"}' in metrics
    assert sidecar.client.get("/healthz").status_code == 200
    assert sidecar.process.poll() is None
    ok = sidecar.post(traffic.event_headers("request", "ok"), traffic.v1_request([row]))
    assert ok.status_code == 200
    assert "malformed_event" in sidecar.log()  # logged, one line per reason at most every 10 s


def _other_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1: the one its default route leaves from (a pod's IP, in a pod)
    when there is one, and 127.0.0.2 (loopback, but not the address the ingest listener is bound to)."""
    found = ["127.0.0.2"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            address = ""
    if address and not address.startswith("127."):
        found.insert(0, address)
    return found


def test_ingest_is_loopback_only_and_the_metrics_listener_is_read_only(sidecar: Sidecar) -> None:
    ingest_port = int(sidecar.url.rsplit(":", 1)[1])
    metrics_port = int(sidecar.metrics_url.rsplit(":", 1)[1])
    assert sidecar.url.startswith("http://127.0.0.1:") and sidecar.metrics_url.startswith("http://0.0.0.0:")
    event = traffic.event_headers("request", "outside"), traffic.v1_request([{"age": 30}])
    received = sidecar.status()["events"]["received"]
    for address in _other_addresses():
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://{address}:{ingest_port}/", headers=event[0], content=event[1], timeout=5)
        metrics = httpx.get(f"http://{address}:{metrics_port}/metrics", timeout=10)
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'kubeloop_drift_detected{model="arrests",version="1"}' in metrics.text
        assert httpx.get(f"http://{address}:{metrics_port}/status", timeout=10).json()["defaultVersion"] == 1
        assert httpx.get(f"http://{address}:{metrics_port}/healthz", timeout=10).status_code == 200
        refused = httpx.post(f"http://{address}:{metrics_port}/", headers=event[0], content=event[1], timeout=10)
        assert refused.status_code == 405, refused.text
    assert sidecar.status()["events"]["received"] == received  # nothing from outside reached the detector
    assert sidecar.client.get("/metrics").status_code == 200  # in the pod, the ingest listener serves reads too


# ---- kubeloop's payload logger: batched mode -----------------------------------------------------------------------
def test_the_payload_loggers_batches_fill_a_window(sidecar: Sidecar) -> None:
    """The model server's PayloadLogger posting to the real sidecar: every event taken, version 3's window tested."""
    from serving.payload_logger import EventSource, PayloadLogger

    records = traffic.records(traffic.in_distribution(sidecar.frame, 250, np.random.default_rng(5)), FEATURES)
    requests = [traffic.v1_request(records[i : i + ROWS_PER_EVENT]) for i in range(0, 250, ROWS_PER_EVENT)]
    answer = traffic.v1_response([0.7] * ROWS_PER_EVENT)
    received = sidecar.status()["events"]["received"]
    source = EventSource("http://localhost:8080/", "arrests", "default", model_version="3")
    logger = PayloadLogger(f"{sidecar.url}/", source, model="arrests", registry=None)
    labels = {"model": "arrests", "version": "3"}

    def metric(name: str) -> float | None:
        return logger.metrics.registry.get_sample_value(name, labels)

    async def send() -> None:
        for wave in range(5):  # a few batches
            for i in range(10):
                logger.log(f"p{wave}-{i}", requests[wave * 10 + i], answer, "application/json")
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 30
        while metric("kubeloop_payload_events_sent_total") != 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await logger.close()

    asyncio.run(send())
    assert metric("kubeloop_payload_events_sent_total") == 100, sidecar.log()
    assert metric("kubeloop_payload_events_failed_total") == 0 and metric("kubeloop_payload_sink_up") == 1
    status = sidecar.wait_windows(3, 1)
    assert status["events"] == {"request": 50, "response": 50}
    assert (status["rows"], status["windowFill"], status["windowsDropped"]) == (250, 250 - WINDOW, 0)
    assert status["predictions"]["count"] == WINDOW and status["predictions"]["mean"] == pytest.approx(0.7)
    assert sidecar.status()["events"]["received"] - received == 100


def test_a_malformed_event_in_a_batch_is_counted_and_the_rest_taken(sidecar: Sidecar) -> None:
    from serving.payload_logger import BATCH_CONTENT_TYPE, REQUEST_OPENING, BatchEncoder, EventSource

    encoder = BatchEncoder(EventSource("http://localhost:8080/", "arrests", "default", model_version="3"))
    row = {"colour": "White", "year": 2000, "age": 21, "sex": "Male", "employed": "Yes", "citizen": "No", "checks": 1}
    bodies = [traffic.v1_request([row]), traffic.v1_request([{**row, "age": "old"}]), traffic.v1_request([row])]
    items = [
        (f"b{i}", time.time(), body, traffic.v1_response([0.5]), "application/json", REQUEST_OPENING)
        for i, body in enumerate(bodies)
    ]
    before = sidecar.status()
    headers = {"content-type": BATCH_CONTENT_TYPE}
    response = sidecar.client.post("/", headers=headers, content=encoder.encode(items))
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 5, "rejected": 1, "reasons": {"wrong_type": 1}}
    after = sidecar.status()
    assert after["events"]["malformed"].get("wrong_type", 0) - before["events"]["malformed"].get("wrong_type", 0) == 1
    counts = {
        k: after["versions"]["3"]["events"][k] - before["versions"]["3"]["events"][k]
        for k in after["versions"]["3"]["events"]
    }
    assert counts == {"request": 2, "response": 3}
    unusable = sidecar.client.post("/", headers=headers, content=b'[{"specversion": "1.0",')
    assert (unusable.status_code, unusable.json()) == (400, {"error": "bad_json"})
