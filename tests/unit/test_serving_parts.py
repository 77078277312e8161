"""Pure parts of serving/: signature validation, metrics aggregation, the cache, split buckets (payload events:
test_payload_logger.py)."""

from __future__ import annotations

import math
import re
import subprocess
from collections import Counter

import numpy as np
import pytest
from kserve.protocol.infer_type import InferInput, InferRequest
from prometheus_client import CollectorRegistry, generate_latest

from kubeloop.api.modelversion import Feature
from kubeloop.histograms import value_buckets
from serving.cache import PredictionCache, row_keys
from serving.metrics import ServingMetrics, feature_buckets
from serving.splitter import Backend, Splitter, SplitterMetrics, bucket
from serving.validation import InvalidRequest, SignatureValidator
from tests.support import tools

FEATURES = [
    Feature(name="colour", dtype="string", categories=["Black", "White"], nullable=False),
    Feature(name="age", dtype="int", nullable=False),
    Feature(name="score", dtype="float", nullable=True),
    Feature(name="employed", dtype="bool", nullable=True),
]
ROW = {"colour": "White", "age": 21, "score": 0.5, "employed": True}


@pytest.fixture
def validator() -> SignatureValidator:
    return SignatureValidator(FEATURES, max_batch=3)


def rejected(call, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as error:
        call(*args)
    return error.value


# ---------------------------------------------------------------- v1
def test_v1_rows_as_objects_and_lists_give_the_same_columns(validator):
    as_objects = validator.from_v1({"instances": [ROW, {**ROW, "score": None, "employed": None}]})
    as_lists = validator.from_v1({"instances": [list(ROW.values()), ["White", 21, None, None]]})
    for batch in (as_objects, as_lists):
        assert batch.rows == 2 and batch.protocol == "v1"
        assert batch.columns["colour"].dtype == object and list(batch.columns["colour"]) == ["White", "White"]
        assert batch.columns["age"].dtype == np.float64 and list(batch.columns["age"]) == [21.0, 21.0]
        assert batch.columns["score"][0] == 0.5 and math.isnan(batch.columns["score"][1])
        assert batch.columns["employed"][0] == 1.0 and math.isnan(batch.columns["employed"][1])


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        ("text", "invalid_request", "body: expected a JSON object"),
        ({}, "missing_feature", "instances: field required"),
        ({"instances": 3}, "wrong_type", "instances: expected a list of rows, got an integer"),
        ({"instances": []}, "empty_batch", "instances: empty batch"),
        ({"instances": [ROW] * 4}, "batch_too_large", "instances: 4 rows exceed the maximum batch of 3"),
        ({"instances": [7]}, "wrong_type", "instances[0]: expected an object"),
        ({"instances": [[1]]}, "wrong_shape", "instances[0]: expected 4 values in signature order"),
        ({"instances": [{**ROW, "x": 1}]}, "unknown_feature", "instances[0].x: unknown feature"),
        ({"instances": [{"colour": "White"}]}, "missing_feature", "instances[0].age: missing feature"),
        ({"instances": [{**ROW, "age": "21"}]}, "wrong_type", "instances[0].age: expected an integer, got a string"),
        ({"instances": [{**ROW, "age": True}]}, "wrong_type", "instances[0].age: expected an integer, got a boolean"),
        ({"instances": [{**ROW, "age": 2.5}]}, "wrong_type", "instances[0].age: expected an integer, got 2.5"),
        ({"instances": [{**ROW, "age": 10**400}]}, "wrong_type", "instances[0].age: 1000"),
        ({"instances": [{**ROW, "score": math.inf}]}, "wrong_type", "instances[0].score: expected a finite number"),
        ({"instances": [{**ROW, "score": "high"}]}, "wrong_type", "instances[0].score: expected a number"),
        ({"instances": [{**ROW, "employed": 1}]}, "wrong_type", "instances[0].employed: expected true or false"),
        ({"instances": [{**ROW, "colour": 1}]}, "wrong_type", "instances[0].colour: expected a string"),
        ({"instances": [{**ROW, "colour": None}]}, "null_value", "instances[0].colour: null is not allowed"),
        ({"instances": [ROW, {**ROW, "age": None}]}, "null_value", "instances[1].age: null is not allowed"),
        ({"instances": [{**ROW, "age": math.nan}]}, "null_value", "instances[0].age: NaN is not allowed"),
    ],
)
def test_v1_rejections_name_the_field(validator, body, kind, message):
    error = rejected(validator.from_v1, body)
    assert error.kind == kind
    assert str(error).startswith(message), str(error)


def test_integral_floats_are_integers_and_unseen_categories_pass(validator):
    batch = validator.from_v1({"instances": [{**ROW, "age": 30.0, "colour": "Green"}]})
    assert batch.columns["age"][0] == 30.0 and batch.columns["colour"][0] == "Green"


# ---------------------------------------------------------------- v2
def v2_request(**overrides) -> InferRequest:
    tensors = {
        "colour": ("BYTES", ["White", "Black"]),
        "age": ("INT64", [21, 30]),
        "score": ("FP32", [0.5, None]),
        "employed": ("BOOL", [True, False]),
    }
    inputs = []
    for name, (datatype, data) in tensors.items():
        spec = {"name": name, "shape": [len(data)], "datatype": datatype, "data": data} | overrides.get(name, {})
        if spec.get("name") is not None:
            inputs.append(InferInput(spec["name"], spec["shape"], spec["datatype"], spec["data"]))
    return InferRequest(model_name="m", infer_inputs=inputs, request_id="r1")


def test_v2_tensors_become_columns(validator):
    batch = validator.from_v2(v2_request())
    assert batch.rows == 2 and batch.protocol == "v2" and batch.request.id == "r1"
    assert list(batch.columns["colour"]) == ["White", "Black"]
    assert list(batch.columns["age"]) == [21.0, 30.0]
    assert math.isnan(batch.columns["score"][1])
    nested = validator.from_v2(v2_request(age={"shape": [2, 1], "data": [[21], [30]]}))
    assert list(nested.columns["age"]) == [21.0, 30.0]


@pytest.mark.parametrize(
    ("overrides", "kind", "message"),
    [
        ({"age": {"datatype": "FP32"}}, "wrong_type", "inputs[1] ('age').datatype: expected INT64"),
        ({"age": {"shape": [2, 2]}}, "wrong_shape", "inputs[1] ('age').shape: expected [n] or [n, 1]"),
        ({"age": {"shape": [3]}}, "wrong_shape", "inputs[1] ('age').data: shape [3] needs 3 values, got 2"),
        ({"age": {"shape": [1], "data": [1]}}, "wrong_shape", "inputs[1] ('age').shape: 1 rows"),
        ({"age": {"data": ["a", 1]}}, "wrong_type", "inputs[1] ('age').data[0]: expected an integer"),
        ({"age": {"data": [1, None]}}, "null_value", "inputs[1] ('age').data[1]: null is not allowed"),
        ({"age": {"name": None}}, "missing_feature", "inputs: missing feature 'age'"),
        ({"age": {"name": "height"}}, "unknown_feature", "inputs[1] ('height'): unknown feature"),
        ({"age": {"name": "colour"}}, "wrong_shape", "inputs[1] ('colour'): feature 'colour' given twice"),
        ({"employed": {"datatype": "BYTES"}}, "wrong_type", "inputs[3] ('employed').datatype: expected BOOL"),
    ],
)
def test_v2_rejections_name_the_field(validator, overrides, kind, message):
    error = rejected(validator.from_v2, v2_request(**overrides))
    assert error.kind == kind
    assert str(error).startswith(message), str(error)


def test_v2_empty_and_oversized_batches(validator):
    empty = {name: {"shape": [0], "data": []} for name in ("colour", "age", "score", "employed")}
    assert rejected(validator.from_v2, v2_request(**empty)).kind == "empty_batch"
    big = {
        "colour": {"shape": [4], "data": ["White"] * 4},
        "age": {"shape": [4], "data": [1] * 4},
        "score": {"shape": [4], "data": [1.0] * 4},
        "employed": {"shape": [4], "data": [True] * 4},
    }
    assert rejected(validator.from_v2, v2_request(**big)).kind == "batch_too_large"
    assert rejected(validator.from_v2, InferRequest(model_name="m", infer_inputs=[])).kind == "missing_feature"


def test_v2_bytes_strings_as_grpc_sends_them_are_decoded(validator):
    batch = validator.from_v2(v2_request(colour={"data": [b"White", "Black"]}))
    assert list(batch.columns["colour"]) == ["White", "Black"]
    error = rejected(validator.from_v2, v2_request(colour={"data": [b"\xff\xfe", "Black"]}))
    assert error.kind == "wrong_type" and str(error).startswith("inputs[0] ('colour').data[0]: expected UTF-8 text")


# ---------------------------------------------------------------- ranges (spec.inputs.outOfRange)
RANGED = [
    Feature(name="colour", dtype="string", categories=["Black", "White"], nullable=False),
    Feature(name="age", dtype="int", nullable=False, min=18, max=80),
    Feature(name="score", dtype="float", nullable=True),  # no range recorded (an older ModelVersion)
]
SCALES = {"age": (40.0, 10.0), "score": (0.5, 0.2)}


def ranged(policy: str) -> SignatureValidator:
    return SignatureValidator(RANGED, out_of_range=policy, scales=SCALES)


def ages(*values: float | None) -> dict:
    return {"instances": [{"colour": "White", "age": a, "score": None} for a in values]}


def test_count_answers_out_of_range_rows_and_counts_them_per_feature():
    validator = ranged("count")
    batch = validator.from_v1(ages(17, 40, 95))
    assert validator.check_ranges(batch) == {"age": 2}
    assert list(batch.columns["age"]) == [17.0, 40.0, 95.0]
    assert validator.check_ranges(validator.from_v1(ages(18, 80))) == {}


def test_clip_moves_values_to_the_nearest_training_bound():
    validator = ranged("clip")
    batch = validator.from_v1(ages(17, 40, 95))
    assert validator.check_ranges(batch) == {"age": 2}
    assert list(batch.columns["age"]) == [18.0, 40.0, 80.0]


def test_reject_names_the_field_value_and_range():
    validator = ranged("reject")
    error = rejected(validator.check_ranges, validator.from_v1(ages(40, 95)))
    assert error.kind == "out_of_range"
    assert str(error).startswith("instances[1].age: 95 is outside the training range [18, 80]"), str(error)
    request = InferRequest(
        model_name="m",
        infer_inputs=[
            InferInput("score", [1], "FP32", [None]),
            InferInput("age", [1], "INT64", [5]),
            InferInput("colour", [1], "BYTES", ["White"]),
        ],
    )
    error = rejected(validator.check_ranges, validator.from_v2(request))
    assert str(error).startswith("inputs[1] ('age').data[0]: 5 is outside"), str(error)


@pytest.mark.parametrize("policy", ["count", "clip", "reject"])
def test_absurd_values_are_rejected_whatever_the_policy(policy):
    validator = ranged(policy)
    error = rejected(validator.check_ranges, validator.from_v1(ages(1e200)))
    assert error.kind == "out_of_range" and "1e+200 is more than 1e+06 training standard deviations" in str(error)
    score = {"instances": [{"colour": "White", "age": 40, "score": -1e12}]}
    assert rejected(validator.check_ranges, validator.from_v1(score)).kind == "out_of_range"


# ---------------------------------------------------------------- metrics
def test_feature_buckets_follow_the_training_distribution():
    assert feature_buckets(10.0, 2.0) == (4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 16.0)
    assert feature_buckets(1.0, 1.0)[0] == 0.0  # no negative bounds for a non-negative feature
    assert feature_buckets(None, None) == (0.0,)


COLUMNS = {
    "colour": np.array(["White", "Green", None], dtype=object),
    "age": np.array([20.0, 30.0, 95.0]),
    "score": np.array([0.1, np.nan, 0.3]),
    "employed": np.array([1.0, 0.0, np.nan]),
}


def test_batch_statistics_are_aggregated_per_call():
    registry = CollectorRegistry()
    metrics = ServingMetrics("m", 3, FEATURES, {"age": (30.0, 10.0)}, registry=registry)
    metrics.observe_batch(COLUMNS, np.array([0.07, 0.5, 0.97], dtype=np.float32))
    metrics.count_request("v1", 200, 0.004)
    metrics.count_request("v1", 400, 0.0001)
    metrics.count_error("wrong_type")
    metrics.count_out_of_range({"age": 2})
    samples = parse(generate_latest(registry).decode())
    base = {"model": "m", "version": "3"}

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset({**base, **labels}.items()))]

    assert value("kubeloop_prediction_bucket", le="0.1") == 1
    assert value("kubeloop_prediction_count") == 3
    assert value("kubeloop_feature_value_bucket", feature="age", le="30.0") == 2
    assert value("kubeloop_feature_value_count", feature="age") == 3
    assert value("kubeloop_feature_category_total", feature="colour", value="__other__") == 1
    assert value("kubeloop_feature_category_total", feature="colour", value="__null__") == 1
    assert value("kubeloop_feature_category_total", feature="colour", value="White") == 1
    assert value("kubeloop_feature_null_total", feature="score") == 1
    assert value("kubeloop_requests_total", code="200", protocol="v1") == 1
    ok = {"code": "200", "protocol": "v1"}
    assert value("kubeloop_request_duration_seconds_bucket", le="0.0025", **ok) == 0  # the fast 400 is apart
    assert value("kubeloop_request_duration_seconds_bucket", le="0.005", **ok) == 1
    assert value("kubeloop_request_duration_seconds_bucket", le="0.001", code="400", protocol="v1") == 1
    assert value("kubeloop_feature_out_of_range_total", feature="age") == 2
    assert value("kubeloop_request_errors_total", reason="wrong_type") == 1
    assert value("kubeloop_inference_batch_rows_count") == 1


def test_value_buckets_are_round_steps_over_the_training_label():
    assert value_buckets(10.0, 2.0) == tuple(float(b) for b in range(4, 17))  # step 1: half the std
    assert value_buckets(9.93, 3.22) == tuple(float(b) for b in range(0, 21, 2))  # abalone rings: step 2, from 0
    assert value_buckets(0.52, 0.12) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # no 0.30000000000000004
    assert value_buckets(-5.0, 1.0) == tuple(-8.0 + 0.5 * k for k in range(13))  # negative mean: negative bounds
    assert value_buckets(1.0, 1.0)[0] == 0.0  # no negative bounds for a non-negative label
    assert value_buckets(1234.0, 100.0) == tuple(float(b) for b in range(900, 1551, 50))  # step 50
    assert value_buckets(None, None) == value_buckets(3.0, 0.0) == (0.0,)


def test_multiclass_metrics_count_predicted_classes_and_confidence():
    registry = CollectorRegistry()
    metrics = ServingMetrics("m", 2, FEATURES, registry=registry, task="multiclass", classes=["a", "b", "c"])
    outputs = np.array([[0.62, 0.28, 0.1], [0.1, 0.19, 0.71], [0.02, 0.15, 0.83]], dtype=np.float32)
    metrics.observe_batch(COLUMNS, outputs)
    text = generate_latest(registry).decode()
    samples = parse(text)
    base = {"model": "m", "version": "2"}

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset({**base, **labels}.items()))]

    assert [value("kubeloop_predicted_class_total", **{"class": c}) for c in "abc"] == [1, 0, 2]
    assert value("kubeloop_prediction_bucket", le="0.65") == 1  # the predicted class's probability
    assert value("kubeloop_prediction_bucket", le="0.75") == 2
    assert value("kubeloop_prediction_count") == 3 and value("kubeloop_inference_batch_rows_count") == 1
    assert value("kubeloop_prediction_sum") == pytest.approx(0.62 + 0.71 + 0.83)
    assert "# HELP kubeloop_prediction Probability of the predicted class (the model's confidence)." in text
    promtool_clean(text)
    with pytest.raises(ValueError, match=r"spec\.signature\.classes"):
        ServingMetrics("m", 2, FEATURES, registry=CollectorRegistry(), task="multiclass")


def test_regression_metrics_bucket_values_by_the_training_label():
    registry = CollectorRegistry()
    metrics = ServingMetrics("m", 1, FEATURES, registry=registry, task="regression", label_stats=(10.0, 2.0))
    metrics.observe_batch(COLUMNS, np.array([3.0, 10.0, 17.5], dtype=np.float32))
    text = generate_latest(registry).decode()
    samples = parse(text)
    base = {"model": "m", "version": "1"}
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items() if name == "kubeloop_prediction_bucket"}
    assert list(buckets) == [*(repr(float(b)) for b in range(4, 17)), "+Inf"]
    assert (buckets["4.0"], buckets["10.0"], buckets["16.0"], buckets["+Inf"]) == (1, 2, 2, 3)
    assert samples[("kubeloop_prediction_sum", frozenset(base.items()))] == 30.5
    assert "kubeloop_predicted_class" not in text
    promtool_clean(text)


def promtool_clean(text: str) -> None:
    done = subprocess.run([tools.promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            metric, _, number = line.rpartition(" ")
            name, _, labels = metric.partition("{")
            pairs = re.findall(r'(\w+)="([^"]*)"', labels)
            out[(name, frozenset(pairs))] = float(number)
    return out


# ---------------------------------------------------------------- cache
def test_cache_tiers_and_lru_bound():
    cache = PredictionCache("hybrid", size=2)
    keys = [("a",), ("b",), ("c",), ("d",)]
    cache.preload([keys[0]], np.array([0.1]))
    found, misses = cache.lookup(keys[:3])
    assert found[0] == pytest.approx(0.1) and misses == [1, 2]
    cache.store([keys[1], keys[2]], [0.2, 0.3])
    cache.store([keys[3]], [0.4])  # evicts b, the least recently used
    found, misses = cache.lookup(keys)
    assert misses == [1] and found[2:] == [0.3, 0.4]
    assert cache.hits == {"static": 2, "dynamic": 2} and cache.misses == 3
    static_only = PredictionCache("static")
    static_only.store([("x",)], [0.5])
    assert static_only.lookup([("x",)])[1] == [0]
    with pytest.raises(ValueError):
        PredictionCache("off")


def test_cache_keeps_class_probabilities_per_row():
    cache = PredictionCache("hybrid", size=10)
    keys = [("a",), ("b",), ("c",)]
    cache.preload([keys[0]], np.array([[0.7, 0.2, 0.1]], dtype=np.float32))
    found, misses = cache.lookup(keys)
    assert misses == [1, 2]
    cache.store([keys[1], keys[2]], [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    found, misses = cache.lookup(keys)
    assert misses == []
    np.testing.assert_allclose(np.asarray(found), [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], rtol=1e-6)


def test_cache_keys_treat_nan_as_null():
    keys = row_keys({"a": np.array([1.0, np.nan]), "b": np.array(["x", None], dtype=object)}, ["a", "b"])
    assert keys == [(1.0, "x"), (None, None)]


# ---------------------------------------------------------------- splitter
def test_buckets_are_stable_and_uniform():
    assert bucket("user-1") == bucket("user-1")
    counts = Counter(bucket(f"id-{i}") for i in range(20_000))
    assert set(counts) == set(range(100))
    assert max(counts.values()) < 1.5 * 200 and min(counts.values()) > 0.5 * 200


def test_split_choice_and_percent_validation():
    splitter = Splitter(Backend("1", "http://a"), Backend("2", "http://b"), 30, metrics=SplitterMetrics(registry=None))
    ids = [f"r{i}" for i in range(1000)]
    chosen = [splitter.choose(i).version for i in ids]
    assert chosen == [("2" if bucket(i) < 30 else "1") for i in ids]
    for bad in (-1, 101, 2.5, True, "10"):
        with pytest.raises(ValueError, match="percent"):
            splitter.set_percent(bad)
    alone = Splitter(Backend("1", "http://a"), None, 0, metrics=SplitterMetrics(registry=None))
    with pytest.raises(ValueError, match="no candidate"):
        alone.set_percent(5)
    assert {alone.choose(i).version for i in ids} == {"1"}
