"""The drift detector on in-memory frames of the bundled arrests data, skew, the decision rule, event parsing and
the sidecar application in-process. alibi-detect is imported once for the module (it takes seconds)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client import generate_latest

from kubeloop.api.modelversion import ModelVersion, Signature
from kubeloop.data.bundled import bundled_path
from monitoring import detectors
from monitoring.events import (
    REQUEST_TYPE,
    Malformed,
    RequestParser,
    lower_headers,
    parse_event,
    parse_predictions,
)
from monitoring.schema import Schema
from tests.support import tools
from tests.support import traffic_events as traffic

SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "modelversion.yaml"
FEATURES = ["colour", "year", "age", "sex", "employed", "citizen", "checks"]
WINDOW = 200
REFERENCE = 2000


@pytest.fixture(scope="module")
def signature() -> Signature:
    return ModelVersion.model_validate(yaml.safe_load(SAMPLE.read_text())).spec.signature


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(bundled_path("arrests"), dtype_backend="numpy_nullable")


@pytest.fixture(scope="module")
def schema(signature: Signature) -> Schema:
    return Schema.from_signature(signature)


@pytest.fixture(scope="module")
def reference(schema: Schema, frame: pd.DataFrame) -> detectors.Reference:
    return detectors.Reference.from_frame(schema, frame, REFERENCE, seed=0)


@pytest.fixture(scope="module")
def detector(reference: detectors.Reference) -> detectors.FeatureWiseDrift:
    return detectors.FeatureWiseDrift(reference, alpha=0.05, correction="bonferroni")


def window_of(schema: Schema, rows: pd.DataFrame) -> list[np.ndarray]:
    return schema.encode_frame(rows)


# ---- detector ----------------------------------------------------------------------------------------------------


def test_reference_is_a_seeded_sample_encoded_like_serving(schema, frame, reference) -> None:
    again = detectors.Reference.from_frame(schema, frame, REFERENCE, seed=0)
    other = detectors.Reference.from_frame(schema, frame, REFERENCE, seed=1)
    assert reference.size == REFERENCE and reference.snapshot_rows == len(frame)
    assert all(np.array_equal(a, b) for a, b in zip(reference.columns, again.columns, strict=True))
    assert not np.array_equal(reference.columns[2], other.columns[2])
    colour = schema.features[0]
    assert colour.categories == ("Black", "White")
    assert set(np.unique(reference.columns[0])) == {0, 1}  # codes in the signature's order
    assert reference.columns[2].dtype == np.float64  # age: numeric


def test_no_drift_on_an_unshifted_window(schema, frame, detector) -> None:
    result = detector.test(window_of(schema, traffic.in_distribution(frame, WINDOW, np.random.default_rng(1))))
    assert not result.flagged
    assert list(result.features) == ["year", "age", "checks", "colour", "sex", "employed", "citizen"]
    assert {name: t.test for name, t in result.features.items()} == {
        "year": "ks",
        "age": "ks",
        "checks": "ks",
        "colour": "chi2",
        "sex": "chi2",
        "employed": "chi2",
        "citizen": "chi2",
    }
    assert all(0.0 <= t.p_value <= 1.0 and t.distance >= 0 for t in result.features.values())
    assert result.min_p_value > 0.05 / 7 and result.rows == WINDOW and result.detector == "ks"


def test_drift_on_a_shifted_window_names_the_features(schema, frame, detector) -> None:
    rows = traffic.shift_age_colour(frame, WINDOW, np.random.default_rng(2))
    result = detector.test(window_of(schema, rows))
    assert result.flagged
    assert {"age", "colour"} <= set(result.drifted_features())
    assert result.features["age"].p_value < 1e-6 and result.features["age"].distance > 0.5
    assert result.features["colour"].p_value < 1e-6


def test_a_mean_shift_of_one_numeric_feature_is_found_alone(schema, frame, detector) -> None:
    rows = traffic.shift_mean(frame, WINDOW, np.random.default_rng(3), "checks", 2)
    result = detector.test(window_of(schema, rows))
    assert result.flagged and result.drifted_features() == ["checks"]


def test_bonferroni_correction_is_across_all_features(schema, frame, detector) -> None:
    result = detector.test(window_of(schema, traffic.in_distribution(frame, WINDOW, np.random.default_rng(4))))
    k = len(result.features)
    assert k == 7 and result.correction == "bonferroni"
    assert result.threshold == pytest.approx(0.05 / k)
    for t in result.features.values():
        assert t.adjusted_p_value == pytest.approx(min(1.0, t.p_value * k))
    # one feature at p=0.01 is significant alone, not after the correction over 7 features
    adjusted, flagged, threshold = detectors.correct([0.01, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.05, "bonferroni")
    assert not flagged and adjusted[0] == pytest.approx(0.07) and threshold == pytest.approx(0.05 / 7)


def test_fdr_correction_is_benjamini_hochberg() -> None:
    adjusted, flagged, threshold = detectors.correct([0.02, 0.001, 0.5, 0.01], 0.05, "fdr")
    assert flagged
    assert adjusted == pytest.approx([0.02 * 4 / 3, 0.004, 0.5, 0.02])
    assert threshold == pytest.approx(0.05 * 3 / 4)
    assert detectors.correct([0.2, 0.3], 0.05, "fdr")[1] is False
    with pytest.raises(ValueError, match="bonferroni or fdr"):
        detectors.correct([0.1], 0.05, "holm")  # type: ignore[arg-type]


def test_nulls_and_unseen_categories_are_tested_not_crashed(signature, frame) -> None:
    nullable = Signature.model_validate(
        {**signature.model_dump(), "inputs": [{**f.model_dump(), "nullable": True} for f in signature.inputs]}
    )
    schema = Schema.from_signature(nullable)
    reference = detectors.Reference.from_frame(schema, frame, 500, seed=0)
    detector = detectors.FeatureWiseDrift(reference)
    rows = traffic.in_distribution(frame, WINDOW, np.random.default_rng(5)).astype(object)
    rows.loc[: WINDOW // 2, "age"] = None  # half the ages missing: KS on the rest
    rows.loc[:40, "colour"] = "Green"  # a colour training never saw: its own category for Chi-square
    result = detector.test(schema.encode_frame(rows))
    assert set(result.features) == set(FEATURES)
    assert result.flagged and "colour" in result.drifted_features() and "age" not in result.drifted_features()
    rows["age"] = None
    assert "age" not in detector.test(schema.encode_frame(rows)).features  # nothing to test, nothing reported


def test_mmd_option_flags_a_shift(schema, frame, reference) -> None:
    import torch

    torch.manual_seed(0)
    mmd = detectors.MMDDetector(reference, alpha=0.05, n_permutations=40, reference_cap=300)
    assert mmd.reference_rows == 300
    assert mmd.encode(reference.columns).shape == (REFERENCE, 3 + 4 * 4)  # 3 numeric + 4 x (2 categories + 2)
    shifted = mmd.test(window_of(schema, traffic.shift_age_colour(frame, WINDOW, np.random.default_rng(6))))
    assert shifted.flagged and list(shifted.features) == ["all"] and shifted.features["all"].distance > 0
    unshifted = mmd.test(window_of(schema, traffic.in_distribution(frame, WINDOW, np.random.default_rng(7))))
    assert not unshifted.flagged


# ---- decision rule -----------------------------------------------------------------------------------------------


def test_drift_tracker_is_k_of_m() -> None:
    tracker = detectors.DriftTracker(k=2, m=3)
    assert tracker.state == "Unknown"
    states = [tracker.update(f) for f in [True, False, False, True, True, False, False, False]]
    assert states == ["NoDrift", "NoDrift", "NoDrift", "NoDrift", "Drift", "Drift", "NoDrift", "NoDrift"]
    assert (tracker.windows, tracker.flagged_windows, tracker.drift_windows) == (8, 3, 2)
    with pytest.raises(ValueError, match="k <= m"):
        detectors.DriftTracker(k=4, m=3)


def test_declared_false_positive_rate_holds_over_20_windows(schema, frame) -> None:
    """20 in-distribution windows against each of 3 independently drawn references."""
    drift_windows = 0
    for seed in range(3):
        reference = detectors.Reference.from_frame(schema, frame, REFERENCE, seed=100 + seed)
        detector = detectors.FeatureWiseDrift(reference)
        tracker = detectors.DriftTracker()
        rows = traffic.in_distribution(frame, WINDOW * 20, np.random.default_rng(200 + seed))
        columns = window_of(schema, rows)
        for start in range(0, WINDOW * 20, WINDOW):
            tracker.update(detector.test([c[start : start + WINDOW] for c in columns]).flagged)
        assert tracker.drift_windows <= detectors.DECLARED_FALSE_POSITIVE_RATE * 20
        drift_windows += tracker.drift_windows
    assert drift_windows / 60 <= detectors.DECLARED_FALSE_POSITIVE_RATE


@pytest.mark.parametrize("shift", ["age_colour", "age_mean"])
def test_declared_detection_delay_holds(schema, frame, detector, shift) -> None:
    """Shift begins in the middle of window 4 (after 3 clean windows): Drift by the declared window."""
    rng = np.random.default_rng(8)
    before = traffic.in_distribution(frame, 3 * WINDOW + WINDOW // 2, rng)
    after = (
        traffic.shift_age_colour(frame, 5 * WINDOW, rng)
        if shift == "age_colour"
        else traffic.shift_mean(frame, 5 * WINDOW, rng, "age", 8)  # ~1 training std
    )
    columns = window_of(schema, pd.concat([before, after], ignore_index=True))
    tracker = detectors.DriftTracker()
    states = [tracker.update(detector.test([c[s : s + WINDOW] for c in columns]).flagged) for s in range(0, 1800, 200)]
    assert states[:3] == ["NoDrift"] * 3
    first = states.index("Drift")
    assert first - 3 + 1 <= detectors.DECLARED_DETECTION_WINDOWS


# ---- skew --------------------------------------------------------------------------------------------------------


def test_skew_numbers_on_a_known_shift(schema, frame, reference) -> None:
    shifted = frame.copy()
    shifted["age"] = shifted["age"] + 15
    shifted["colour"] = shifted["colour"].map({"Black": "White", "White": "Black"}).astype("string")
    numbers = detectors.skew(reference, schema.encode_frame(shifted))
    age, stats = numbers["age"], reference.stats["age"]
    assert age["mean_shift"] == pytest.approx(15 / stats.std)
    assert age["std_ratio"] == pytest.approx(1.0)
    assert age["null_rate_delta"] == 0.0
    assert age["out_of_range"] == pytest.approx(float((frame["age"] + 15 > stats.max).mean()))
    black, white = (frame["colour"] == "Black").mean(), (frame["colour"] == "White").mean()
    assert numbers["colour"]["linf"] == pytest.approx(abs(white - black))
    assert numbers["colour"]["unseen_share"] == 0.0
    assert numbers["year"]["mean_shift"] == pytest.approx(0.0, abs=1e-12)
    assert numbers["sex"]["linf"] == pytest.approx(0.0, abs=1e-12)


def test_skew_counts_nulls_and_unseen_values(schema, frame, reference) -> None:
    rows = frame.head(100).astype(object)
    rows.loc[:9, "checks"] = None
    rows.loc[:19, "sex"] = "Unknown"
    numbers = detectors.skew(reference, schema.encode_frame(rows))
    assert numbers["checks"]["null_rate_delta"] == pytest.approx(0.10)
    assert numbers["sex"]["unseen_share"] == pytest.approx(0.20)
    assert numbers["sex"]["linf"] >= 0.20


# ---- events ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parser(schema: Schema) -> RequestParser:
    return RequestParser(schema)


ROW = {"colour": "White", "year": 2000, "age": 21, "sex": "Male", "employed": "Yes", "citizen": "No", "checks": 1}


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


# ---- the sidecar application, in-process -------------------------------------------------------------------------


@pytest.fixture
def app(schema, reference, detector):
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    config = SidecarConfig(window=50, max_body_bytes=10_000)

    def monitor(version: int) -> VersionMonitor:
        return VersionMonitor(
            model="arrests",
            version=version,
            schema=schema,
            reference=reference,
            detector=detector,
            tracker=detectors.DriftTracker(),
            window=config.window,
            predictions=deque(maxlen=50),
        )

    sidecar = DriftSidecar([monitor(1), monitor(2)], config, default_version=1)
    sidecar.start()
    yield sidecar
    sidecar.stop()


def _request(rows: list[dict[str, Any]], **kw: Any) -> tuple[dict[str, str], bytes]:
    return lower_headers(traffic.event_headers("request", "r", **kw)), traffic.v1_request(rows)


def test_sidecar_windows_split_batches_and_run_the_detector(app, frame) -> None:
    rows = traffic.records(traffic.shift_age_colour(frame, 120, np.random.default_rng(9)), FEATURES)
    for start in range(0, 120, 15):  # 8 events of 15 rows: windows of 50 fill mid-event
        assert app.ingest(*_request(rows[start : start + 15], version=2)) == (200, "")
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
    assert app.ingest(*_request([ROW], version=7)) == (400, "unknown_version")
    assert app.ingest(*_request([{**ROW, "age": "old"}])) == (400, "wrong_type")
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
        sidecar.ingest(*_request([ROW] * 10))
        sidecar.ingest(*_request([ROW] * 10))
    assert sidecar.counters.dropped == 4  # window 1 queued; windows 2 and 3 (2 events each) dropped
    assert sidecar.status()["versions"]["1"]["windowsDropped"] == 2


# ---- batched mode ------------------------------------------------------------------------------------------------
BATCH = "application/cloudevents-batch+json"


def _event(kind: str, event_id: str, data: Any, version: int | None = None, **extra: Any) -> dict[str, Any]:
    """One structured event as kubeloop's payload logger writes it into a batch."""
    envelope = {
        "specversion": "1.0",
        "type": REQUEST_TYPE if kind == "request" else traffic.RESPONSE_TYPE,
        "id": event_id,
        "time": "2026-11-23T10:00:00.000000Z",
        "source": "http://localhost:8080/",
        "inferenceservicename": "arrests",
        "namespace": "default",
        "component": "predictor",
        "endpoint": "default",
        "datacontenttype": "application/json",
        "data": data,
        **extra,
    }
    if version is not None:
        envelope["modelversion"] = str(version)
    return envelope


def _batch(events: list[Any]) -> bytes:
    return json.dumps(events).encode()


def _rows(*ages: int) -> dict[str, Any]:
    return {"instances": [{**ROW, "age": age} for age in ages]}


def test_a_batch_is_taken_event_by_event_and_answered_with_counts(app) -> None:
    as_lists = {"instances": [[ROW[f] if f != "age" else 50 for f in FEATURES]]}  # not the common form
    events = [
        _event("request", "a", _rows(20, 21), version=2),
        _event("request", "b", _rows(22), version=2),
        _event("request", "c", {"instances": [{**ROW, "age": "old"}]}, version=2),  # wrong_type
        _event("request", "d", as_lists, version=2),  # taken alone: the rows before it go first
        _event("request", "e", _rows(23), version=2),
        _event("request", "f", _rows(24), version=9),  # unknown_version
        _event("response", "a", {"predictions": [0.9, 0.8]}, version=2),
        _event("response", "b", {"predictions": ["high"]}, version=2),  # wrong_type
        {**_event("request", "g", _rows(25)), "type": "com.example.other"},  # unknown_type
        "not an event",  # bad_body
        {**_event("request", "h", None), "data_base64": base64.b64encode(json.dumps(_rows(26)).encode()).decode()},
    ]
    del events[-1]["data"]
    status, answer = app.ingest_batch(_batch(events))
    assert status == 200
    reasons = {"wrong_type": 2, "unknown_version": 1, "unknown_type": 1, "bad_body": 1}
    assert json.loads(answer) == {"accepted": 6, "rejected": 5, "reasons": reasons}
    v1, v2 = app.monitors[1], app.monitors[2]
    assert v2.columns[FEATURES.index("age")] == [20.0, 21.0, 22.0, 50.0, 23.0]  # in the order of their events
    assert (v2.requests, v2.responses, v2.rows, v2.window_events) == (4, 1, 5, 4)
    assert (v1.requests, v1.rows, v1.columns[FEATURES.index("age")]) == (1, 1, [26.0])  # data_base64, default version
    status = app.status()
    assert status["events"]["malformed"] == reasons
    assert status["events"]["received"] == len(events)
    assert app.counters.received == {"request": 7, "response": 2, "unknown": 2}  # unknown: no readable type


def test_a_batch_with_a_non_finite_number_rejects_that_event_alone(app) -> None:
    good = json.dumps(_event("request", "a", _rows(30))).encode()
    bad = good.replace(b'"age": 30', b'"age": NaN').replace(b'"id": "a"', b'"id": "b"')  # Python's json takes NaN
    huge = good.replace(b'"age": 30', b'"age": 1e400').replace(b'"id": "a"', b'"id": "c"')
    status, answer = app.ingest_batch(b"[" + b",".join([good, bad, huge, good]) + b"]")
    assert (status, json.loads(answer)) == (200, {"accepted": 2, "rejected": 2, "reasons": {"wrong_type": 2}})
    assert app.monitors[1].columns[FEATURES.index("age")] == [30.0, 30.0]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [(b"[{]", 400, "bad_json"), (b"", 400, "bad_json"), (b'{"id": "1"}', 400, "bad_body"), (b'"x"', 400, "bad_body")],
)
def test_a_body_that_is_no_batch_is_refused_whole(app, body, status, reason) -> None:
    headers = [(b"content-type", BATCH.encode())]
    assert _call(app, "POST", "/", headers, [body]) == (status, b'{"error":"%b"}' % reason.encode())
    assert app.status()["events"] == {"received": 1, "malformed": {reason: 1}, "dropped": 0}


def test_batches_over_the_asgi_route_and_an_empty_one(app) -> None:
    headers = [(b"content-type", BATCH.encode())]
    body = _batch([_event("request", "a", _rows(30)), _event("response", "a", {"predictions": [0.5]})])
    assert _call(app, "POST", "/", headers, [body[:20], body[20:]]) == (
        200,
        b'{"accepted":2,"rejected":0,"reasons":{}}',
    )
    assert _call(app, "POST", "/", headers, [b"[]"])[0] == 200
    assert app.status()["versions"]["1"]["events"] == {"request": 1, "response": 1}


def test_a_window_counts_the_events_that_begin_in_it_batched_or_not(schema, reference) -> None:
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    def sidecar() -> DriftSidecar:  # not started: the first full window waits, the next ones are dropped
        detector = detectors.FeatureWiseDrift(reference)
        monitor = VersionMonitor("arrests", 1, schema, reference, detector, detectors.DriftTracker(), 20, deque())
        return DriftSidecar([monitor], SidecarConfig(window=20, detection_queue=1), default_version=1)

    ages = [[20 + i] * 7 for i in range(9)]  # 9 events of 7 rows: windows of 20 fill mid-event
    alone, batched = sidecar(), sidecar()
    for event_ages in ages:
        alone.ingest(*_request([{**ROW, "age": a} for a in event_ages]))
    status, _ = batched.ingest_batch(_batch([_event("request", str(i), _rows(*a)) for i, a in enumerate(ages)]))
    assert status == 200
    for app in (alone, batched):
        monitor = app.monitors[1]
        assert (monitor.rows, monitor.filled, monitor.dropped_windows) == (63, 3, 2)
        assert app.counters.dropped == 6  # windows 2 and 3 each hold 3 events' first rows
        assert monitor.window_events == 0  # the last window's rows come from an event begun in the one before
    assert alone.monitors[1].columns == batched.monitors[1].columns


def test_ingesting_batches_keeps_up_with_a_busy_model_server(schema, reference, frame) -> None:
    """20,000 one-row events (10,000 requests and their responses) in batches of 256 through the ASGI app: the bench
    sends ~3,000 events/s. Measured on the 2-core development machine: 0.10-0.11 s (~5 µs an event, the ASGI call
    and the JSON included); the bound is 3x that."""
    import time

    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    config = SidecarConfig(window=200, detection_queue=100)
    monitor = VersionMonitor(
        "arrests", 1, schema, reference, detectors.FeatureWiseDrift(reference), detectors.DriftTracker(), 200, deque()
    )
    app = DriftSidecar([monitor], config, default_version=1)  # not started: ingestion alone is measured
    rows = traffic.records(traffic.in_distribution(frame, 10_000, np.random.default_rng(3)), FEATURES)
    events = []
    for i, row in enumerate(rows):
        events.append(_event("request", str(i), {"instances": [row]}, version=1))
        events.append(_event("response", str(i), {"predictions": [0.5]}, version=1))
    bodies = [_batch(events[i : i + 256]) for i in range(0, len(events), 256)]
    headers = [(b"content-type", BATCH.encode())]
    started = time.perf_counter()
    answers = [_call(app, "POST", "/", headers, [body]) for body in bodies]
    seconds = time.perf_counter() - started
    assert {status for status, _ in answers} == {200}
    assert app.status()["versions"]["1"]["rows"] == 10_000 and app.status()["events"]["malformed"] == {}
    assert seconds < 0.35, f"{len(events)} events took {seconds:.2f} s"


CLASSES = ("Adelie", "Chinstrap", "Gentoo")


def _task_sidecar(schema, reference, detector, task: str, **fields: Any):
    """A stable (v1) and a canary (v2) version of one multiclass or regression model, in-process; the request side
    (the arrests schema) is not what these tests are about."""
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    def monitor(version: int) -> VersionMonitor:
        return VersionMonitor(
            "m", version, schema, reference, detector, detectors.DriftTracker(), 50, deque(maxlen=100), task, **fields
        )

    return DriftSidecar([monitor(1), monitor(2)], SidecarConfig(window=50), default_version=1)


def _responses(app: Any, version: int, body: dict[str, Any]) -> None:
    headers = lower_headers(traffic.event_headers("response", "r", version=version))
    assert app.ingest(headers, json.dumps(body).encode()) == (200, "")


def test_multiclass_predictions_status_shift_and_metrics(schema, reference, detector) -> None:
    app = _task_sidecar(schema, reference, detector, "multiclass", classes=CLASSES)
    stable = [[0.8, 0.1, 0.1]] * 30 + [[0.1, 0.7, 0.2]] * 10  # 3/4 Adelie, confident
    canary = [[0.2, 0.2, 0.6]] * 40  # all Gentoo, less sure
    for start in range(0, 40, 10):
        _responses(app, 1, {"predictions": stable[start : start + 10]})
        flat = [p for row in canary[start : start + 10] for p in row]
        _responses(app, 2, {"outputs": [{"name": "probabilities", "shape": [10, 3], "datatype": "FP32", "data": flat}]})
    versions = app.status()["versions"]
    v1, v2 = versions["1"], versions["2"]
    assert v1["task"] == "multiclass" and v1["predictions"]["count"] == 40
    assert v1["predictions"]["classShares"] == {"Adelie": 0.75, "Chinstrap": 0.25, "Gentoo": 0.0}
    assert v1["predictions"]["mean"] == pytest.approx(0.775)  # the predicted class's probability
    assert v1["predictions"]["p10"] == pytest.approx(0.7) and v1["predictions"]["p90"] == pytest.approx(0.8)
    assert v2["predictions"]["classShares"] == {"Adelie": 0.0, "Chinstrap": 0.0, "Gentoo": 1.0}
    assert "predictionShift" not in v1  # the default version is what the others are compared with
    shift = v2["predictionShift"]
    # P(Adelie) and P(Chinstrap): 0.2 everywhere vs 0.8 or 0.1 for 3/4 of the stable rows; P(Gentoo): 0.6 vs <= 0.2
    assert shift["byClass"] == {"Adelie": 0.75, "Chinstrap": 0.75, "Gentoo": 1.0}
    assert shift == {"against": 1, "ksDistance": 1.0, "byClass": shift["byClass"]}
    text = generate_latest(app.registry).decode()
    for version, counts in (("1", (30, 10, 0)), ("2", (0, 0, 40))):
        for label, count in zip(CLASSES, counts, strict=True):
            line = f'kubeloop_drift_predicted_class_total{{class="{label}",model="m",version="{version}"}} {count}.0'
            assert line in text
    assert 'kubeloop_drift_prediction_bucket{le="0.7",model="m",version="2"} 40.0' in text
    assert 'kubeloop_drift_prediction_bucket{le="0.7",model="m",version="1"} 10.0' in text
    assert 'kubeloop_drift_prediction_count{model="m",version="1"} 40.0' in text
    _promtool_clean(text)


def test_regression_predictions_status_shift_and_metrics(schema, reference, detector) -> None:
    from kubeloop.histograms import value_buckets

    bounds = value_buckets(10.0, 3.0)
    app = _task_sidecar(schema, reference, detector, "regression", prediction_buckets=bounds)
    values = np.linspace(4.0, 16.0, 40)
    _responses(app, 1, {"predictions": values.tolist()})
    shifted = values + 3.0
    _responses(app, 2, {"outputs": [{"name": "value", "shape": [40], "datatype": "FP32", "data": shifted.tolist()}]})
    v1, v2 = app.status()["versions"]["1"], app.status()["versions"]["2"]
    assert v1["task"] == "regression"
    assert v1["predictions"] == {
        "count": 40,
        "mean": pytest.approx(10.0),
        "p10": pytest.approx(np.quantile(values, 0.1)),
        "p50": pytest.approx(10.0),
        "p90": pytest.approx(np.quantile(values, 0.9)),
    }
    assert v2["predictionShift"] == {"against": 1, "ksDistance": pytest.approx(0.25)}  # 3 of a 12 wide range
    text = generate_latest(app.registry).decode()
    assert bounds == tuple(float(b) for b in range(0, 21, 2))
    assert 'kubeloop_drift_prediction_bucket{le="10.0",model="m",version="1"} 20.0' in text
    below = int((shifted <= 18).sum())
    assert f'kubeloop_drift_prediction_bucket{{le="18.0",model="m",version="2"}} {below}.0' in text
    assert 'kubeloop_drift_prediction_sum{model="m",version="2"} 520.0' in text
    assert "kubeloop_drift_predicted_class" not in text
    _promtool_clean(text)


def test_versions_of_other_tasks_or_classes_get_no_prediction_shift(schema, reference, detector) -> None:
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    def monitor(version: int, task: str, classes: tuple[str, ...] = ()) -> VersionMonitor:
        tracker = detectors.DriftTracker()
        return VersionMonitor("m", version, schema, reference, detector, tracker, 50, deque(), task, classes)

    app = DriftSidecar(
        [monitor(1, "binary"), monitor(2, "regression"), monitor(3, "multiclass", CLASSES[:2])],
        SidecarConfig(window=50),
        default_version=1,
    )
    _responses(app, 1, {"predictions": [0.2, 0.9]})
    _responses(app, 2, {"predictions": [12.5]})
    _responses(app, 3, {"predictions": [[0.4, 0.6]]})
    versions = app.status()["versions"]
    assert [versions[v]["predictions"]["count"] for v in "123"] == [2, 1, 1]
    assert not any("predictionShift" in versions[v] for v in "123")
    headers = lower_headers(traffic.event_headers("response", "r", version=3))
    assert app.ingest(headers, b'{"predictions": [[0.2, 0.3, 0.5]]}') == (400, "shape_mismatch")


def _promtool_clean(text: str) -> None:
    done = subprocess.run([tools.promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def _call(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    server: tuple[str, int] = ("127.0.0.1", 8090),
) -> tuple:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers, "server": server}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_asgi_routes_and_body_limit(app) -> None:
    headers = [(k.encode(), v.encode()) for k, v in _request([ROW])[0].items()]
    assert _call(app, "POST", "/", headers, [traffic.v1_request([ROW])])[0] == 200
    assert _call(app, "POST", "/any/path", headers, [b'{"instances": [', b"{}]}"])[0] == 400  # missing features
    big = [(b"content-length", b"20000"), *headers]
    assert _call(app, "POST", "/", big, [b"x" * 20000]) == (413, b'{"error":"too_large"}')
    assert _call(app, "POST", "/", headers, [b"x" * 6000, b"x" * 6000])[0] == 413  # chunked, no length
    status, body = _call(app, "GET", "/metrics", [], [b""])
    assert status == 200 and b'kubeloop_drift_events_malformed_total{reason="too_large"} 2.0' in body
    assert _call(app, "GET", "/healthz", [], [b""])[0] == 200
    assert _call(app, "GET", "/status", [], [b""])[0] == 200
    assert _call(app, "GET", "/nothing", [], [b""])[0] == 404
    assert _call(app, "DELETE", "/status", [], [b""])[0] == 405


def test_the_metrics_listener_is_read_only(app) -> None:
    app.read_only_ports = frozenset({8091})
    headers = [(k.encode(), v.encode()) for k, v in _request([ROW])[0].items()]
    metrics = ("0.0.0.0", 8091)
    status, body = _call(app, "POST", "/", headers, [traffic.v1_request([ROW])], server=metrics)
    assert status == 405 and b"read-only" in body
    assert app.status()["events"]["received"] == 0  # refused before parsing: nothing counted
    for path in ("/metrics", "/status", "/healthz"):
        assert _call(app, "GET", path, [], [b""], server=metrics)[0] == 200
    assert _call(app, "POST", "/", headers, [traffic.v1_request([ROW])])[0] == 200  # the ingest listener takes it
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
