"""The model server over real HTTP: real processes (`python -m serving.server`), real registered models, a real sink.

The models come from serving_fixtures.register_model: bundled data (arrests: binary; penguins: multiclass; abalone:
regression), the training code's TabularTransform.fit, MLP builder and task losses, trained in-process for a few
full-batch steps (not a Ray TrainingJob).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from kubeloop.api.load import load_resources
from kubeloop.artifact import ModelArtifact
from tests.support import tools
from tests.support.serving_fixtures import (
    DATASETS,
    Process,
    arrests_frame,
    bundled_frame,
    launch_server,
    launch_sink,
    record_path,
    rows,
    scrape,
    shared_home,
    start_all,
    stop_all,
    task_home,
)

pytestmark = pytest.mark.integration

FEATURES = ["colour", "year", "age", "sex", "employed", "citizen", "checks"]
V2_TYPES = {"colour": "BYTES", "sex": "BYTES", "employed": "BYTES", "citizen": "BYTES"}
MAX_BODY = 64 * 1024
CACHED = 20


@pytest.fixture(scope="module")
def serving_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two registered versions of the arrests model (different seeds), shared by the serving test modules."""
    return shared_home(tmp_path_factory)


@pytest.fixture(scope="module")
def processes(serving_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """Started side by side: a sink and the server logging to it; a slow sink and a second server logging to it,
    with the prediction cache on (hybrid: the first CACHED bundled rows precomputed, an LRU of 50 for the rest)."""
    logs = tmp_path_factory.mktemp("serving")
    env = {"KUBELOOP_HOME": str(serving_home)}
    cache_file = logs / "cache-rows.jsonl"
    cache_file.write_text("".join(json.dumps(row) + "\n" for row in rows(arrests_frame(), CACHED)))
    sink, slow_sink = start_all(launch_sink(logs / "sink.log"), launch_sink(logs / "slow-sink.log", "--delay", "0.5"))
    try:
        server, logged = start_all(
            launch_server(
                record_path(serving_home, 1),
                logs / "server.log",
                "--logger-url", f"{sink.url}/",
                "--inference-service", "arrests-isvc",
                "--namespace", "ml",
                "--endpoint", "default",
                "--max-body-bytes", str(MAX_BODY),
                "--max-batch-size", "256",
                env=env,
            ),
            launch_server(
                record_path(serving_home, 1),
                logs / "logged.log",
                "--logger-url", f"{slow_sink.url}/",
                "--logger-queue", "20",
                "--cache", "hybrid",
                "--cache-file", str(cache_file),
                "--cache-size", "50",
                env=env,
            ),
        )  # fmt: skip
    except BaseException:
        sink.stop()
        slow_sink.stop()
        raise
    yield {"sink": sink, "server": server, "slow_sink": slow_sink, "logged": logged}
    stop_all(server, logged, sink, slow_sink)


@pytest.fixture(scope="module")
def sink(processes) -> Process:
    return processes["sink"]


@pytest.fixture(scope="module")
def server(processes) -> Process:
    return processes["server"]


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def artifact(serving_home: Path) -> ModelArtifact:
    return ModelArtifact.load(load_resources(record_path(serving_home, 1))[0].spec.artifact_uri)


def v2_body(instances: list[dict], request_id: str | None = None) -> dict:
    body = {
        "inputs": [
            {
                "name": name,
                "shape": [len(instances)],
                "datatype": V2_TYPES.get(name, "INT64"),
                "data": [row[name] for row in instances],
            }
            for name in FEATURES
        ]
    }
    if request_id:
        body["id"] = request_id
    return body


def predict_v1(client, server: Process, body: object, **kwargs):
    return client.post(f"{server.url}/v1/models/arrests:predict", json=body, **kwargs)


def predict_v2(client, server: Process, body: object, **kwargs):
    return client.post(f"{server.url}/v2/models/arrests/infer", json=body, **kwargs)


# ---------------------------------------------------------------- the served model is the trained model
def test_v1_and_v2_predictions_equal_the_artifact(server, client, artifact):
    frame = arrests_frame()
    instances = rows(frame, 200, start=100)
    expected = artifact.predict(frame.drop(columns=["released"]).iloc[100:300])

    as_objects = predict_v1(client, server, {"instances": instances})
    assert as_objects.status_code == 200, as_objects.text
    np.testing.assert_allclose(as_objects.json()["predictions"], expected, atol=1e-6)

    as_lists = predict_v1(client, server, {"instances": [[row[f] for f in FEATURES] for row in instances]})
    assert as_lists.status_code == 200, as_lists.text
    np.testing.assert_allclose(as_lists.json()["predictions"], expected, atol=1e-6)

    v2 = predict_v2(client, server, v2_body(instances, request_id="req-42"))
    assert v2.status_code == 200, v2.text
    answer = v2.json()
    assert answer["id"] == "req-42" and answer["model_name"] == "arrests" and answer["model_version"] == "1"
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probability", "FP32", [200])
    np.testing.assert_allclose(output["data"], expected, atol=1e-6)


def test_concurrent_requests_each_get_their_own_rows(server, artifact):
    """Concurrent requests share model calls; each must still get exactly its own predictions."""
    frame = arrests_frame()
    features = frame.drop(columns=["released"])
    jobs = [(start, 1 + start % 5) for start in range(0, 400, 7)]

    def call(job: tuple[int, int]) -> tuple[tuple[int, int], list[float]]:
        start, n = job
        with httpx.Client(timeout=30) as c:
            response = predict_v1(c, server, {"instances": rows(frame, n, start=start)})
        assert response.status_code == 200, response.text
        return job, response.json()["predictions"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for (start, n), predictions in pool.map(call, jobs):
            expected = artifact.predict(features.iloc[start : start + n])
            np.testing.assert_allclose(predictions, expected, atol=1e-6)


def test_health_and_metadata_list_the_signature(server, client, serving_home):
    assert client.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert client.get(f"{server.url}/v1/models/arrests").json() == {"name": "arrests", "ready": True}
    metadata = client.get(f"{server.url}/v2/models/arrests").json()
    record = load_resources(record_path(serving_home, 1))[0]
    assert [i["name"] for i in metadata["inputs"]] == [f.name for f in record.spec.signature.inputs]
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {f: V2_TYPES.get(f, "INT64") for f in FEATURES}
    assert all(i["shape"] == [-1] for i in metadata["inputs"])
    assert metadata["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]}]


# ---------------------------------------------------------------- bad requests: 4xx naming the field
GOOD = rows(arrests_frame(), 1)[0]


def v1(**changes: object) -> dict:
    row = {**GOOD, **changes}
    return {"instances": [{k: v for k, v in row.items() if v is not ...}]}


def v2(feature: str, **changes: object) -> dict:
    body = v2_body([GOOD])
    for tensor in body["inputs"]:
        if tensor["name"] == feature:
            tensor.update(changes)
    body["inputs"] = [t for t in body["inputs"] if t.get("name") is not ...]
    return body


BAD_REQUESTS = {
    "v1 wrong type": ("v1", v1(age="twenty"), 400, "instances[0].age: expected an integer"),
    "v1 fractional int": ("v1", v1(age=21.5), 400, "instances[0].age: expected an integer"),
    "v1 number for a string": ("v1", v1(colour=3), 400, "instances[0].colour: expected a string"),
    "v1 missing feature": ("v1", v1(checks=...), 400, "instances[0].checks: missing feature"),
    "v1 unknown feature": ("v1", v1(height=180), 400, "instances[0].height: unknown feature"),
    "v1 null not nullable": ("v1", v1(sex=None), 400, "instances[0].sex: null is not allowed"),
    "v1 row of wrong length": ("v1", {"instances": [[1, 2]]}, 400, "instances[0]: expected 7 values"),
    "v1 row not an object": ("v1", {"instances": ["x"]}, 400, "instances[0]: expected an object"),
    "v1 instances not a list": ("v1", {"instances": {"a": 1}}, 400, "instances: expected a list"),
    "v1 no instances": ("v1", {"rows": []}, 400, "instances: field required"),
    "v1 empty batch": ("v1", {"instances": []}, 400, "instances: empty batch"),
    "v1 too many rows": ("v1", {"instances": [GOOD] * 257}, 400, "instances: 257 rows exceed the maximum batch"),
    "v1 not an object": ("v1", [1, 2, 3], 400, "body: expected a JSON object"),
    "v2 wrong datatype": ("v2", v2("age", datatype="BYTES", data=["21"]), 400, "inputs[2] ('age').datatype: expected"),
    "v2 wrong value type": ("v2", v2("age", data=["21"]), 400, "inputs[2] ('age').data[0]: expected an integer"),
    "v2 wrong shape": ("v2", v2("age", shape=[1, 2]), 400, "inputs[2] ('age').shape: expected [n] or [n, 1]"),
    "v2 data and shape disagree": ("v2", v2("age", shape=[2]), 400, "inputs[2] ('age').data: shape [2] needs 2"),
    "v2 rows disagree": ("v2", v2("age", shape=[2], data=[21, 22]), 400, "inputs[2] ('age').shape: 2 rows"),
    "v2 missing feature": ("v2", v2("checks", name=...), 400, "inputs: missing feature 'checks'"),
    "v2 unknown feature": ("v2", v2("age", name="height"), 400, "('height'): unknown feature"),
    "v2 float tensor for an int": ("v2", v2("age", datatype="FP64"), 400, "inputs[2] ('age').datatype: expected INT64"),
    "v2 null not nullable": ("v2", v2("age", data=[None]), 400, "inputs[2] ('age').data[0]: null is not allowed"),
    "v2 empty batch": ("v2", {"inputs": [{**t, "shape": [0], "data": []} for t in v2_body([GOOD])["inputs"]]}, 400,
                       "inputs: empty batch"),
    "v2 malformed tensor": ("v2", {"inputs": [{"name": "age"}]}, 400, "inputs[0].shape: Field required"),
    "v2 not an object": ("v2", [1], 400, 'body: expected a JSON object {"inputs"'),
    "v2 unknown output": ("v2", {**v2_body([GOOD]), "outputs": [{"name": "logit"}]}, 400, "'logit'"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_400_naming_the_field(server, client, case):
    protocol, body, status, message = BAD_REQUESTS[case]
    send = predict_v1 if protocol == "v1" else predict_v2
    response = send(client, server, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.json()


def test_nan_is_a_null_in_v2(server, client):
    """The JSON parser of v2 reads NaN; a non-nullable feature refuses it naming the field."""
    body = json.dumps(v2("age", datatype="INT64")).replace('"data": [21]', '"data": [NaN]')
    response = client.post(
        f"{server.url}/v2/models/arrests/infer", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "inputs[2] ('age').data[0]: NaN is not allowed" in response.json()["error"]


def test_invalid_json_and_oversized_bodies(server, client):
    url = f"{server.url}/v1/models/arrests:predict"
    broken = client.post(url, content=b'{"instances": [', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "Unrecognized request format" in broken.json()["error"]
    broken_v2 = client.post(
        f"{server.url}/v2/models/arrests/infer", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert broken_v2.status_code == 400 and broken_v2.json()["error"].startswith("body: invalid JSON")

    big = json.dumps({"instances": [GOOD] * 2000}).encode()
    assert len(big) > MAX_BODY
    too_large = client.post(url, content=big, headers={"content-type": "application/json"})
    assert too_large.status_code == 413
    assert f"exceed the limit of {MAX_BODY} bytes" in too_large.json()["error"]

    def chunks():  # no content-length: the limit applies to what arrives
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "--max-body-bytes" in streamed.json()["error"]


def test_fuzzed_bodies_never_get_a_5xx(server, client):
    """A few hundred hypothesis-generated JSON bodies against v1 and v2; none answered 5xx; healthy after."""
    import hypothesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )
    names = st.sampled_from([*FEATURES, "height", ""]) | st.text(max_size=6)
    row_object = st.dictionaries(names, scalars, max_size=9)
    row_list = st.lists(scalars, min_size=0, max_size=9)
    v1_bodies = (
        st.fixed_dictionaries({"instances": st.lists(row_object | row_list | scalars, max_size=4)})
        | st.fixed_dictionaries({"instances": values})
        | values
    )
    tensor = st.fixed_dictionaries(
        {"name": names, "shape": st.lists(st.integers(-2, 4), max_size=3), "datatype": st.sampled_from(
            ["INT64", "INT32", "FP32", "FP64", "BOOL", "BYTES", "FP16", "UINT8", "nonsense"]
        ), "data": st.lists(scalars | st.lists(scalars, max_size=2), max_size=4)},
        optional={"parameters": st.dictionaries(st.text(max_size=5), scalars, max_size=2)},
    )  # fmt: skip
    v2_bodies = (
        st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=8)}, optional={"id": st.text(max_size=5)})
        | st.fixed_dictionaries({"inputs": values})
        | values
    )
    seen: list[int] = []
    common = settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True
    )

    def check(path: str, body: object) -> None:
        try:
            content = json.dumps(body, allow_nan=True).encode()
        except (ValueError, OverflowError):
            return
        response = client.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})
        seen.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert response.json()["error"]

    given(v1_bodies)(common(lambda body: check("/v1/models/arrests:predict", body)))()
    given(v2_bodies)(common(lambda body: check("/v2/models/arrests/infer", body)))()
    other_routes = st.sampled_from(
        [
            "/v1/models/arrests:explain",
            "/v1/models/other:predict",
            "/v2/models/other/infer",
            "/v2/models/arrests/versions/1/infer",
            "/v2/models/arrests/versions/7/infer",
            "/v2/models/other/versions/1/infer",
            "/v2/repository/models/arrests/unload",
            "/v2/repository/models/arrests/load",
            "/v2/repository/index",
        ]
    )
    given(other_routes, v2_bodies | v1_bodies)(common(check))()
    assert len(seen) >= 400 and hypothesis.__version__

    assert client.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert predict_v1(client, server, v1()).status_code == 200
    metrics = client.get(f"{server.url}/metrics").text
    for code in ("500", "501", "502", "503"):
        assert scrape(metrics, "kubeloop_requests_total", code=code) == 0


# ---------------------------------------------------------------- safe on the wire
def test_the_repository_extension_is_off_by_default(server, client):
    for action in ("unload", "load"):
        response = client.post(f"{server.url}/v2/repository/models/arrests/{action}")
        assert response.status_code == 403 and "--enable-repository" in response.json()["error"]
    assert client.get(f"{server.url}/v2").json()["extensions"] == []
    assert client.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert predict_v1(client, server, v1()).status_code == 200


def test_readiness_follows_the_model_when_the_repository_is_enabled(serving_home, tmp_path, client):
    """Opened on purpose: an unloaded model makes the server unready (503) instead of ready and answering 404."""
    server = start_all(
        launch_server(
            record_path(serving_home, 1), tmp_path / "repo.log", "--enable-repository",
            env={"KUBELOOP_HOME": str(serving_home)},
        )
    )[0]  # fmt: skip
    try:
        assert client.get(f"{server.url}/v2").json()["extensions"] == ["model_repository_extension"]
        assert client.get(f"{server.url}/v2/health/ready").status_code == 200
        assert client.post(f"{server.url}/v2/repository/models/arrests/unload").status_code == 200
        assert client.get(f"{server.url}/v2/health/ready").status_code == 503
        assert predict_v1(client, server, v1()).status_code == 404
    finally:
        stop_all(server)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/unknown/infer",
        "/v1/models/arrests:explain",
        "/v2/repository/models/arrests/load",
        "/v2/models/arrests/versions/1/infer",
    ],
)
def test_the_body_limit_holds_for_every_route_before_the_body_is_read(server, client, path):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # declares 200 MB, sends none of it
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {200 << 20}\r\n\r\n".encode()
        )
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"403", b"413"), status_line
    before = rss_kib(server.pid)
    chunk = b" " * (1 << 20)

    def body():  # 200 MiB without a content-length: the server must stop reading at the limit
        for _ in range(200):
            yield chunk

    try:
        streamed = client.post(f"{server.url}{path}", content=body(), headers={"content-type": "application/json"})
        assert streamed.status_code in (403, 413), streamed.text
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still writing
    assert rss_kib(server.pid) - before < 50 * 1024
    assert predict_v1(client, server, v1()).status_code == 200


def test_versioned_routes_answer_for_the_served_version(server, client, artifact):
    body = v2_body([GOOD])
    plain = predict_v2(client, server, body)
    versioned = client.post(f"{server.url}/v2/models/arrests/versions/1/infer", json=body)
    assert versioned.status_code == 200, versioned.text
    assert versioned.json()["outputs"] == plain.json()["outputs"]
    assert versioned.json()["model_version"] == "1"
    other = client.post(f"{server.url}/v2/models/arrests/versions/2/infer", json=body)
    assert other.status_code == 404
    assert "version 2 is not served here: this server serves version 1" in other.json()["error"]
    assert client.get(f"{server.url}/v2/models/arrests").json()["versions"] == ["1"]
    assert client.get(f"{server.url}/v2/models/arrests/versions/1").json()["versions"] == ["1"]
    assert client.get(f"{server.url}/v2/models/arrests/versions/1/ready").json()["ready"] is True


def test_inputs_outside_the_training_range_are_counted_and_absurd_ones_refused(server, client, serving_home):
    record = load_resources(record_path(serving_home, 1))[0]
    age = next(f for f in record.spec.signature.inputs if f.name == "age")
    assert age.nullable is False and age.min is not None and age.max is not None
    before = client.get(f"{server.url}/metrics").text
    beyond = predict_v1(client, server, v1(age=int(age.max) + 40))
    assert beyond.status_code == 200 and np.isfinite(beyond.json()["predictions"]).all()
    absurd = predict_v1(client, server, v1(age=10**200))
    assert absurd.status_code == 400, absurd.text
    assert absurd.json()["error"].startswith("instances[0].age: 1e+200 is more than")
    after = client.get(f"{server.url}/metrics").text
    labels = {"model": "arrests", "version": "1", "feature": "age"}
    assert (
        scrape(after, "kubeloop_feature_out_of_range_total", **labels)
        - scrape(before, "kubeloop_feature_out_of_range_total", **labels)
        == 1
    )
    assert scrape(after, "kubeloop_request_errors_total", reason="out_of_range") >= 1


def test_metrics_have_no_created_series_and_latency_by_code(server, client):
    assert predict_v1(client, server, v1(age="x")).status_code == 400
    metrics = client.get(f"{server.url}/metrics").text
    assert "_created" not in metrics
    base = {"model": "arrests", "version": "1", "protocol": "v1"}
    assert scrape(metrics, "kubeloop_request_duration_seconds_count", **base, code="400") >= 1
    assert scrape(metrics, "kubeloop_request_duration_seconds_count", **base, code="200") >= 1


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


# ---------------------------------------------------------------- binding
def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_listens_on_loopback_only(server):
    port = int(server.url.rsplit(":", 1)[1])
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex; not 00000000 (0.0.0.0)
    address = non_loopback_address()
    if address is not None:
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), timeout=5):
            pass


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


def test_served_columns_transform_like_the_training_frame(serving_home, artifact):
    """Validated columns (float64 / object) go through the fitted transform exactly as the raw bundled frame does."""
    from serving.validation import SignatureValidator

    features = load_resources(record_path(serving_home, 1))[0].spec.signature.inputs
    batch = SignatureValidator(features).from_v1({"instances": rows(arrests_frame(), 50)})
    served = artifact.transform.transform(pd.DataFrame(batch.columns))
    raw = artifact.transform.transform(arrests_frame().drop(columns=["released"]).iloc[:50])
    np.testing.assert_array_equal(served, raw)


def test_a_rejected_version_is_served_only_when_the_deployment_allows_it(serving_home, tmp_path):
    """`kubeloop run -f` of a ModelDeployment (LocalDeployment): a Rejected version is refused before anything
    starts, and served, with a warning, under spec.allowRejected."""
    from kubeloop.api import ModelDeployment
    from kubeloop.errors import SpecError
    from kubeloop.local_deployment import LocalDeployment
    from kubeloop.registry import Registry

    registry = Registry(tmp_path / "registry")
    version, _ = registry.allocate("arrests")
    (served,) = load_resources(record_path(serving_home, 1))  # its artifact stays where the shared home has it
    reason = "rocAuc 0.61 is below the threshold 0.7"
    registry.save(served.spec.model_copy(update={"version": version, "stage": "Rejected", "stage_reason": reason}), "")
    (deployment,) = load_resources(Path(__file__).resolve().parents[2] / "manifests/samples/modeldeployment.yaml")
    assert isinstance(deployment, ModelDeployment)
    deployment.spec.version, deployment.spec.drift.enabled = version, False

    with LocalDeployment(deployment, registry) as local, pytest.raises(SpecError, match=r"spec\.version: arrests:1"):
        local.start()
    assert local.processes.children == [] and local.state_file is None  # nothing was started

    class Warnings(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    warnings, logger = Warnings(), logging.getLogger("kubeloop.local_deployment")
    logger.addHandler(warnings)
    deployment.spec.allow_rejected = True
    try:
        with LocalDeployment(deployment, registry) as local:
            endpoints = local.start()
            body = {"instances": rows(arrests_frame(), 3)}
            answer = httpx.post(f"{endpoints.url}/v1/models/arrests:predict", json=body, timeout=30)
            assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    finally:
        logger.removeHandler(warnings)
    (warning,) = [record.getMessage() for record in warnings.records]
    assert warning == (
        f"deployment.rejected_served name=arrests field=spec.version version=arrests:1 reason={reason!r} "
        "because=spec.allowRejected"
    )


# ---------------------------------------------------------------- multiclass and regression models
TASK_MODELS = ("penguins", "abalone")


@pytest.fixture(scope="module")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return task_home(tmp_path_factory)


@pytest.fixture(scope="module")
def task_servers(task_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Process]:
    """penguins v1 (multiclass) with the prediction cache on (hybrid: the first CACHED rows precomputed) and
    abalone v1 (regression), started side by side."""
    logs = tmp_path_factory.mktemp("serving-tasks")
    env = {"KUBELOOP_HOME": str(task_models)}
    cache_file = logs / "penguin-rows.jsonl"
    cache_file.write_text("".join(json.dumps(row) + "\n" for row in task_rows("penguins", CACHED)))
    penguins, abalone = start_all(
        launch_server(
            record_path(task_models, 1, "penguins"),
            logs / "penguins.log",
            "--cache", "hybrid", "--cache-file", str(cache_file), "--cache-size", "50",
            env=env,
        ),
        launch_server(record_path(task_models, 1, "abalone"), logs / "abalone.log", env=env),
    )  # fmt: skip
    yield {"penguins": penguins, "abalone": abalone}
    stop_all(penguins, abalone)


@pytest.fixture(scope="module")
def task_artifacts(task_models: Path) -> dict[str, ModelArtifact]:
    return {
        name: ModelArtifact.load(load_resources(record_path(task_models, 1, name))[0].spec.artifact_uri)
        for name in TASK_MODELS
    }


def task_rows(model: str, n: int, start: int = 0) -> list[dict]:
    return rows(bundled_frame(model), n, start, label=DATASETS[model][0])


def task_features(model: str, n: int, start: int = 0) -> pd.DataFrame:
    return bundled_frame(model).drop(columns=[DATASETS[model][0]]).iloc[start : start + n]


def tensors(record, instances: list[dict]) -> dict:
    """A v2 body: one tensor per signature feature, of the datatype the model's metadata announces."""
    from serving.validation import V2_DATATYPES

    return {
        "inputs": [
            {
                "name": f.name,
                "shape": [len(instances)],
                "datatype": V2_DATATYPES[f.dtype][0],
                "data": [row[f.name] for row in instances],
            }
            for f in record.spec.signature.inputs
        ]
    }


def record_of(home: Path, model: str):
    return load_resources(record_path(home, 1, model))[0]


def test_multiclass_answers_probabilities_in_the_order_of_the_signature_classes(
    task_servers, task_artifacts, task_models, client
):
    from monitoring.events import parse_predictions

    server, artifact, record = task_servers["penguins"], task_artifacts["penguins"], record_of(task_models, "penguins")
    frame = bundled_frame("penguins")
    classes = record.spec.signature.classes
    assert classes == artifact.transform.classes == sorted(frame["species"].unique())
    instances = task_rows("penguins", 150, start=CACHED)  # not precomputed; row 47's sex is null
    assert any(None in row.values() for row in instances)
    expected = artifact.predict(task_features("penguins", 150, start=CACHED))
    assert expected.shape == (150, 3)

    v1_answer = client.post(f"{server.url}/v1/models/penguins:predict", json={"instances": instances})
    assert v1_answer.status_code == 200, v1_answer.text
    predictions = v1_answer.json()["predictions"]
    assert len(predictions) == 150 and all(len(p) == 3 for p in predictions)
    np.testing.assert_allclose(predictions, expected, rtol=1e-5, atol=1e-6)
    # the columns mean the classes in signature order: the predicted class names are the species, mostly
    species = frame["species"].iloc[CACHED : CACHED + 150].to_numpy()
    assert (np.asarray(classes)[np.argmax(predictions, axis=1)] == species).mean() > 0.9

    v2_answer = client.post(f"{server.url}/v2/models/penguins/infer", json=tensors(record, instances))
    assert v2_answer.status_code == 200, v2_answer.text
    (output,) = v2_answer.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [150, 3])
    np.testing.assert_allclose(output["data"], expected.reshape(-1), rtol=1e-5, atol=1e-6)  # row-major

    # what the drift sidecar reads from the payload logger's response events
    for body in (v1_answer.json(), v2_answer.json()):
        np.testing.assert_allclose(parse_predictions(body, "multiclass", 3), expected, rtol=1e-5, atol=1e-6)


def test_regression_answers_the_value_in_the_label_units(task_servers, task_artifacts, task_models, client):
    from monitoring.events import parse_predictions

    server, artifact, record = task_servers["abalone"], task_artifacts["abalone"], record_of(task_models, "abalone")
    instances = task_rows("abalone", 200, start=500)
    expected = artifact.predict(task_features("abalone", 200, start=500))
    assert expected.shape == (200,)
    rings = bundled_frame("abalone")["rings"].iloc[500:700].to_numpy()
    assert np.abs(expected - rings).mean() < 3  # rings, not the standardized value the network learns

    v1_answer = client.post(f"{server.url}/v1/models/abalone:predict", json={"instances": instances})
    assert v1_answer.status_code == 200, v1_answer.text
    np.testing.assert_allclose(v1_answer.json()["predictions"], expected, rtol=1e-5, atol=1e-5)

    v2_answer = client.post(f"{server.url}/v2/models/abalone/infer", json=tensors(record, instances))
    assert v2_answer.status_code == 200, v2_answer.text
    (output,) = v2_answer.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("value", "FP32", [200])
    np.testing.assert_allclose(output["data"], expected, rtol=1e-5, atol=1e-5)
    for body in (v1_answer.json(), v2_answer.json()):
        np.testing.assert_allclose(parse_predictions(body, "regression"), expected, rtol=1e-5, atol=1e-5)


def test_task_metadata_declares_the_output(task_servers, client):
    penguins = client.get(f"{task_servers['penguins'].url}/v2/models/penguins").json()
    assert penguins["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    abalone = client.get(f"{task_servers['abalone'].url}/v2/models/abalone").json()
    assert abalone["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1]}]
    assert [i["name"] for i in abalone["inputs"]][:2] == ["sex", "length"]


@pytest.mark.parametrize("model", TASK_MODELS)
def test_concurrent_task_requests_each_get_their_own_rows(task_servers, task_artifacts, task_models, model):
    """Concurrent v1 and v2 requests share model calls; each gets exactly its own rows' outputs back."""
    server, artifact, record = task_servers[model], task_artifacts[model], record_of(task_models, model)
    jobs = [(start, 1 + start % 5) for start in range(0, 300, 7)]

    def call(job: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray]:
        start, n = job
        instances = task_rows(model, n, start)
        with httpx.Client(timeout=30) as c:
            if start % 2:
                response = c.post(f"{server.url}/v1/models/{model}:predict", json={"instances": instances})
                assert response.status_code == 200, response.text
                return job, np.asarray(response.json()["predictions"])
            response = c.post(f"{server.url}/v2/models/{model}/infer", json=tensors(record, instances))
            assert response.status_code == 200, response.text
            (output,) = response.json()["outputs"]
            return job, np.asarray(output["data"]).reshape(output["shape"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for (start, n), answer in pool.map(call, jobs):
            expected = artifact.predict(task_features(model, n, start))
            assert answer.shape == expected.shape
            np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", TASK_MODELS)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the transform, on 1e300
def test_merged_requests_are_split_back_per_request(task_models, task_artifacts, model):
    """In-process, deterministically: requests that reach the model in one event-loop turn go through one model call
    (kubeloop_inference_batch_rows counts one), and each request gets its own rows back, v1 and v2 alike; a
    request whose output is not finite fails alone."""
    from kserve.errors import InferenceError
    from kserve.protocol.infer_type import InferInput, InferRequest
    from prometheus_client import CollectorRegistry

    from serving.metrics import ServingMetrics
    from serving.model import KubeloopModel

    record, artifact = record_of(task_models, model), task_artifacts[model]
    signature, transform = record.spec.signature, artifact.transform
    registry = CollectorRegistry()
    metrics = ServingMetrics(
        model,
        1,
        signature.inputs,
        registry=registry,
        task=signature.task,
        classes=signature.classes or (),
        label_stats=(transform.label_mean, transform.label_std),
    )
    served = KubeloopModel(model, record, metrics=metrics)
    served.load()
    jobs = [(0, 1), (1, 4), (5, 2), (7, 1), (8, 6)]

    def batch(start: int, n: int, protocol: str):
        instances = task_rows(model, n, start)
        if protocol == "v1":
            return served.validator.from_v1({"instances": instances})
        inputs = [
            InferInput(t["name"], t["shape"], t["datatype"], t["data"]) for t in tensors(record, instances)["inputs"]
        ]
        return served.validator.from_v2(InferRequest(model_name=model, infer_inputs=inputs, request_id=f"r{start}"))

    async def together(batches: list) -> list:
        return await asyncio.gather(*(served.predict(b) for b in batches), return_exceptions=True)

    def answer_of(result) -> np.ndarray:
        if isinstance(result, dict):
            return np.asarray(result["predictions"])
        body, _ = result.to_rest()
        (output,) = body["outputs"]
        assert output["name"] == {"penguins": "probabilities", "abalone": "value"}[model]
        return np.asarray(output["data"]).reshape(output["shape"])

    def calls() -> float:
        return registry.get_sample_value("kubeloop_inference_batch_rows_count", {"model": model, "version": "1"})

    protocols = ["v1", "v2", "v2", "v1", "v2"]
    results = asyncio.run(together([batch(s, n, p) for (s, n), p in zip(jobs, protocols, strict=True)]))
    assert calls() == 1  # one model call for the five requests
    for (start, n), result in zip(jobs, results, strict=True):
        expected = artifact.predict(task_features(model, n, start))
        answer = answer_of(result)
        assert answer.shape == expected.shape == ((n, 3) if model == "penguins" else (n,))
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)

    # a value far beyond the training data's range overflows the float32 network: that request alone fails
    numeric = next(f.name for f in signature.inputs if f.dtype == "float")
    extreme = served.validator.from_v1({"instances": [{**task_rows(model, 1, 9)[0], numeric: 1e300}]})
    good, bad, other = asyncio.run(together([batch(10, 3, "v1"), extreme, batch(13, 2, "v2")]))
    assert isinstance(bad, InferenceError) and "not finite (NaN or inf) for 1 row(s)" in str(bad), bad
    np.testing.assert_allclose(answer_of(good), artifact.predict(task_features(model, 3, 10)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answer_of(other), artifact.predict(task_features(model, 2, 13)), rtol=1e-5, atol=1e-5)
    assert calls() == 1 + 2  # the merged call failed; the two good requests ran alone after


def test_inputs_too_far_out_to_compute_are_refused_before_the_model(task_servers, client):
    """1e300 overflowed the float32 network to a non-finite answer (a 500); it is now a 400 naming the field (the
    non-finite guard itself: test_merged_requests_are_split_back_per_request, which skips the range check)."""
    for model, numeric in (("penguins", "bill_length_mm"), ("abalone", "length")):
        url = task_servers[model].url
        before = client.get(f"{url}/metrics").text
        row = {**task_rows(model, 1, 30)[0], numeric: 1e300}
        response = client.post(f"{url}/v1/models/{model}:predict", json={"instances": [task_rows(model, 1)[0], row]})
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith(f"instances[1].{numeric}: 1e+300 is more than 1e+06 training")
        after = client.get(f"{url}/metrics").text
        base = {"model": model, "version": "1"}
        assert (
            scrape(after, "kubeloop_request_errors_total", **base, reason="out_of_range")
            - scrape(before, "kubeloop_request_errors_total", **base, reason="out_of_range")
            == 1
        )
        assert scrape(after, "kubeloop_request_errors_total", **base, reason="model_error") == 0
        assert client.get(f"{url}/v2/health/ready").json() == {"ready": True}


def test_task_metrics_count_predicted_classes_and_values(task_servers, task_artifacts, client):
    from kubeloop.histograms import value_buckets

    penguins, abalone = task_servers["penguins"].url, task_servers["abalone"].url
    before = {url: client.get(f"{url}/metrics").text for url in (penguins, abalone)}
    instances = task_rows("penguins", 60, start=200)
    assert client.post(f"{penguins}/v1/models/penguins:predict", json={"instances": instances}).status_code == 200
    assert (
        client.post(
            f"{abalone}/v1/models/abalone:predict", json={"instances": task_rows("abalone", 40, start=900)}
        ).status_code
        == 200
    )
    after = {url: client.get(f"{url}/metrics").text for url in (penguins, abalone)}

    def delta(url: str, name: str, **labels: str) -> float:
        return scrape(after[url], name, **labels) - scrape(before[url], name, **labels)

    classes = task_artifacts["penguins"].transform.classes
    predicted = task_artifacts["penguins"].predict(task_features("penguins", 60, start=200)).argmax(axis=1)
    for index, label in enumerate(classes):
        assert (
            delta(penguins, "kubeloop_predicted_class_total", model="penguins", version="1", **{"class": label})
            == (predicted == index).sum()
        )
    assert delta(penguins, "kubeloop_prediction_count", model="penguins") == 60
    assert delta(penguins, "kubeloop_prediction_bucket", model="penguins", le="0.5") == 0  # 3 classes: max > 1/3

    values = task_artifacts["abalone"].predict(task_features("abalone", 40, start=900))
    transform = task_artifacts["abalone"].transform
    bounds = value_buckets(transform.label_mean, transform.label_std)
    exported = {line.split('le="')[1].split('"')[0] for line in after[abalone].splitlines()
                if line.startswith("kubeloop_prediction_bucket")}  # fmt: skip
    assert exported == {*(repr(float(b)) for b in bounds), "+Inf"}
    assert delta(abalone, "kubeloop_prediction_count", model="abalone") == 40
    assert delta(abalone, "kubeloop_prediction_sum", model="abalone") == pytest.approx(values.sum(), rel=1e-5)
    middle = repr(float(bounds[len(bounds) // 2]))
    assert (
        delta(abalone, "kubeloop_prediction_bucket", model="abalone", le=middle)
        == (values <= bounds[len(bounds) // 2]).sum()
    )
    for text in after.values():
        done = subprocess.run([tools.promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_prediction_cache_keeps_class_probabilities(task_servers, task_artifacts, client):
    server, artifact = task_servers["penguins"], task_artifacts["penguins"]
    before = client.get(f"{server.url}/metrics").text
    base = {"model": "penguins", "version": "1"}

    def ask(start: int, n: int) -> None:
        response = client.post(
            f"{server.url}/v1/models/penguins:predict", json={"instances": task_rows("penguins", n, start)}
        )
        assert response.status_code == 200, response.text
        expected = artifact.predict(task_features("penguins", n, start))
        np.testing.assert_allclose(response.json()["predictions"], expected, rtol=1e-5, atol=1e-6)

    ask(0, CACHED)  # all precomputed
    ask(300, 10)  # computed, then remembered
    ask(300, 10)
    after = client.get(f"{server.url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return scrape(after, name, **base, **labels) - scrape(before, name, **base, **labels)

    assert delta("kubeloop_cache_hits_total", tier="static") == CACHED
    assert delta("kubeloop_cache_misses_total") == 10 and delta("kubeloop_cache_hits_total", tier="dynamic") == 10
