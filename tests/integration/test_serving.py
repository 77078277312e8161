"""The model server over real HTTP: real processes (`python -m serving.server`), real registered models, a real sink
(tests/integration/conftest.py starts them once for the test_serving*.py modules). Here: the served model is the
trained model, bad requests are refused naming the field (fuzzed too), and a rejected version is served only when
its deployment allows it.

The models come from serving_fixtures.register_model: bundled data (arrests: binary; penguins: multiclass; abalone:
regression), the training code's TabularTransform.fit, MLP builder and task losses, trained in-process for a few
full-batch steps (not a Ray TrainingJob).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from kubeloop.api.load import load_resources
from tests.support.serving_fixtures import arrests_frame, record_path, rows, scrape
from tests.support.serving_requests import FEATURES, GOOD, MAX_BODY, V2_TYPES, predict_v1, predict_v2, v1, v2, v2_body

pytestmark = pytest.mark.integration


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


def test_served_columns_transform_like_the_training_frame(serving_home, artifact):
    """Validated columns (float64 / object) go through the fitted transform exactly as the raw bundled frame does."""
    from serving.validation import SignatureValidator

    features = load_resources(record_path(serving_home, 1))[0].spec.signature.inputs
    batch = SignatureValidator(features).from_v1({"instances": rows(arrests_frame(), 50)})
    served = artifact.transform.transform(pd.DataFrame(batch.columns))
    raw = artifact.transform.transform(arrests_frame().drop(columns=["released"]).iloc[:50])
    np.testing.assert_array_equal(served, raw)


# ---------------------------------------------------------------- a rejected version
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
