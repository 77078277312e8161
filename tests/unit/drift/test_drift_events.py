"""Logger CloudEvents as the drift sidecar reads them: headers in every casing, the content modes, v1 and v2 request
bodies, predictions per task, and every malformed event refused with its reason."""

from __future__ import annotations

import math
from typing import Any

import pytest

from monitoring.events import REQUEST_TYPE, Malformed, RequestParser, lower_headers, parse_event
from monitoring.predictions import parse_predictions
from monitoring.schema import Schema
from tests.support import traffic_events as traffic
from tests.support.drift_inputs import FEATURES, ROW


@pytest.fixture(scope="module")
def parser(schema: Schema) -> RequestParser:
    return RequestParser(schema)


def test_headers_in_go_and_lower_case_parse_alike() -> None:
    body = traffic.v1_request([ROW])
    go = traffic.event_headers("request", "id-1", version=2, endpoint="canary", casing="go")
    assert "Ce-Id" in go
    lower = traffic.event_headers("request", "id-1", version=2, endpoint="canary", casing="lower")
    meta_go, payload = parse_event(lower_headers(go), body)
    meta_lower, _ = parse_event(lower_headers(lower), body)
    assert meta_go == meta_lower
    assert (meta_go.type, meta_go.id, meta_go.endpoint, meta_go.model_version) == ("request", "id-1", "canary", 2)
    assert meta_go.inference_service == "arrests" and meta_go.component == "predictor"
    assert payload == {"instances": [ROW]}
    response, _ = parse_event(lower_headers(traffic.event_headers("response", "id-1")), b'{"predictions": [0.5]}')
    assert response.type == "response" and response.model_version is None


def test_structured_mode_event() -> None:
    envelope = (
        b'{"specversion": "1.0", "type": "' + REQUEST_TYPE.encode() + b'", "id": "x", "source": "s",'
        b' "modelversion": "v3", "data": {"instances": []}}'
    )
    meta, payload = parse_event({"content-type": "application/cloudevents+json"}, envelope)
    assert meta.model_version == 3 and payload == {"instances": []}


def test_v1_rows_as_objects_and_as_lists(parser) -> None:
    rows = parser.parse({"instances": [ROW, [ROW[f] for f in FEATURES]]})
    assert rows.n == 2
    assert rows.columns[0] == [1, 1]  # White is code 1
    assert rows.columns[2] == [21.0, 21.0]
    assert rows.columns[3] == [1, 1]  # Male
    unseen = parser.parse({"instances": [{**ROW, "colour": "Green"}]})
    assert unseen.columns[0] == [parser.schema.features[0].other_code]


def test_v2_tensors_per_feature_and_one_row_tensor(parser, signature) -> None:
    records = [ROW, {**ROW, "age": 40, "colour": "Black"}]
    rows = parser.parse(traffic.json.loads(traffic.v2_request(records, signature.inputs)))
    assert rows.n == 2 and rows.columns[2] == [21.0, 40.0] and rows.columns[0] == [1, 0]
    flat = [value for r in records for value in (r[f] for f in FEATURES)]
    one = parser.parse({"inputs": [{"name": "input-0", "shape": [2, 7], "datatype": "BYTES", "data": flat}]})
    assert one.columns == rows.columns
    columnar = parser.parse({"inputs": {f: [r[f] for r in records] for f in FEATURES}})
    assert columnar.columns == rows.columns


def test_predictions_v1_and_v2() -> None:
    assert parse_predictions({"predictions": [0.25, [0.1, 0.9], {"probability": 0.4}]}) == [0.25, 0.9, 0.4]
    v2 = {"outputs": [{"name": "label", "data": [1, 0]}, {"name": "probability", "shape": [2], "data": [0.7, 0.2]}]}
    assert parse_predictions(v2) == [0.7, 0.2]
    two_classes = {"outputs": [{"name": "probability", "shape": [2, 2], "data": [0.3, 0.7, 0.6, 0.4]}]}
    assert parse_predictions(two_classes) == [0.7, 0.4]


def test_predictions_per_task() -> None:
    rows = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    assert parse_predictions({"predictions": rows}, "multiclass", 3) == rows
    flat = {"outputs": [{"name": "probabilities", "shape": [2, 3], "datatype": "FP32", "data": [*rows[0], *rows[1]]}]}
    assert parse_predictions(flat, "multiclass", 3) == rows
    nested = {"outputs": [{"name": "label", "data": [0, 2]}, {"name": "probabilities", "shape": [2, 3], "data": rows}]}
    assert parse_predictions(nested, "multiclass", 3) == rows
    assert parse_predictions({"predictions": [9.5, 11]}, "regression") == [9.5, 11.0]
    v2 = {"outputs": [{"name": "value", "shape": [2, 1], "datatype": "FP32", "data": [[9.5], [11.0]]}]}
    assert parse_predictions(v2, "regression") == [9.5, 11.0]


@pytest.mark.parametrize(
    ("payload", "task", "reason"),
    [
        ({"predictions": [[0.5, 0.5]]}, "multiclass", "shape_mismatch"),  # 2 of 3 classes
        ({"predictions": [0.5]}, "multiclass", "wrong_type"),
        ({"predictions": [[0.5, "x", 0.2]]}, "multiclass", "wrong_type"),
        ({"predictions": [[0.5, math.inf, 0.2]]}, "multiclass", "wrong_type"),
        ({"outputs": [{"name": "probabilities", "shape": [2], "data": [0.1, 0.9]}]}, "multiclass", "shape_mismatch"),
        ({"outputs": [{"name": "probabilities", "shape": [1, 3], "data": [0.1, 0.9]}]}, "multiclass", "shape_mismatch"),
        ({"predictions": []}, "multiclass", "empty"),
        ({"predictions": [[1.0, 2.0]]}, "regression", "wrong_type"),
        ({"predictions": [math.nan]}, "regression", "wrong_type"),
        ({"outputs": [{"name": "value", "shape": [1, 2], "data": [1.0, 2.0]}]}, "regression", "shape_mismatch"),
    ],
)
def test_malformed_task_responses(payload, task, reason) -> None:
    with pytest.raises(Malformed) as info:
        parse_predictions(payload, task, 3)
    assert info.value.reason == reason


def _headers(**override: Any) -> dict[str, str]:
    headers = {"ce-specversion": "1.0", "ce-type": REQUEST_TYPE, "ce-id": "1", "content-type": "application/json"}
    headers.update(override)
    return {k: v for k, v in headers.items() if v is not None}


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        (_headers(), b"{not json", "bad_json"),
        (_headers(), b"", "bad_json"),
        (_headers(), b"\xff\xfe\x00", "bad_json"),
        (_headers(**{"ce-type": None}), b"{}", "missing_header"),
        (_headers(**{"ce-id": None, "ce-specversion": None}), b"{}", "missing_header"),
        (_headers(**{"ce-specversion": "0.3"}), b"{}", "bad_header"),
        (_headers(**{"ce-type": "com.example.other"}), b"{}", "unknown_type"),
        (_headers(**{"ce-modelversion": "latest"}), b"{}", "bad_header"),
        ({"content-type": "application/cloudevents+json"}, b"[1]", "bad_body"),
    ],
)
def test_malformed_events_headers_and_json(headers, body, reason) -> None:
    with pytest.raises(Malformed) as info:
        parse_event(headers, body)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([ROW], "bad_body"),
        ({"rows": [ROW]}, "bad_body"),
        ({"instances": "abc"}, "bad_body"),
        ({"instances": []}, "empty"),
        ({"instances": [42]}, "bad_body"),
        ({"instances": [{**ROW, "height": 180}]}, "unknown_feature"),
        ({"instances": [{k: v for k, v in ROW.items() if k != "age"}]}, "missing_feature"),
        ({"instances": [{**ROW, "age": "21"}]}, "wrong_type"),
        ({"instances": [{**ROW, "age": True}]}, "wrong_type"),
        ({"instances": [{**ROW, "colour": 3}]}, "wrong_type"),
        ({"instances": [{**ROW, "age": math.inf}]}, "wrong_type"),
        ({"instances": [{**ROW, "age": None}]}, "null_value"),
        ({"instances": [{**ROW, "age": math.nan}]}, "null_value"),
        ({"instances": [ROW, [1, 2]]}, "shape_mismatch"),
        ({"inputs": [{"name": "age", "shape": [2], "data": [1]}]}, "shape_mismatch"),
        ({"inputs": [{"name": "age", "data": [1, 2]}, {"name": "year", "data": [2000]}]}, "shape_mismatch"),
        ({"inputs": [{"name": "age", "data": [[1], 2]}]}, "shape_mismatch"),
        ({"inputs": [{"name": "weight", "shape": [1], "data": [1]}]}, "unknown_feature"),
        ({"inputs": [{"data": [1]}]}, "bad_body"),
        ({"inputs": []}, "empty"),
    ],
)
def test_malformed_request_bodies(parser, payload, reason) -> None:
    with pytest.raises(Malformed) as info:
        parser.parse(payload)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"predictions": "x"}, "bad_body"),
        ({"predictions": []}, "empty"),
        ({"predictions": ["yes"]}, "wrong_type"),
        ({"outputs": [{"name": "probability"}]}, "bad_body"),
        ({}, "bad_body"),
        ("text", "bad_body"),
    ],
)
def test_malformed_responses(payload, reason) -> None:
    with pytest.raises(Malformed) as info:
        parse_predictions(payload)
    assert info.value.reason == reason
