"""The model server with multiclass (penguins) and regression (abalone) models over real HTTP: answers in the
signature's class order and in the label's units, metadata, concurrent and merged requests split back per request,
inputs too far out refused, per-task metrics, the prediction cache keeping class probabilities.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
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
    bundled_frame,
    launch_server,
    record_path,
    rows,
    scrape,
    start_all,
    stop_all,
    task_home,
)
from tests.support.serving_requests import CACHED

pytestmark = pytest.mark.integration


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
    from monitoring.predictions import parse_predictions

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
    from monitoring.predictions import parse_predictions

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
