"""The two backends of the feature-wise drift tests, alibi-detect and scipy, on the same recorded windows of the
bundled arrests data: the same p-values (alibi keeps them as float32), the same flagged windows under both
corrections, the same Drift states."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from kubeloop.api.modeldeployment import DriftMonitor
from kubeloop.api.modelversion import ModelVersion
from kubeloop.data.bundled import bundled_path
from monitoring import detectors
from monitoring.config import SidecarConfig
from monitoring.schema import Schema
from tests.support import traffic_events as traffic

SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "modelversion.yaml"
Window = Callable[[pd.DataFrame, int, np.random.Generator], pd.DataFrame]
# (how the window's rows are drawn, windows of it, rows per window): in-distribution windows, shifts large and small
# (the small ones put p-values near the thresholds, where a backend difference would flip a decision), and one
# categorical mix inverted
RECORDED: list[tuple[str, Window, int, int]] = [
    ("calm", traffic.in_distribution, 20, 200),
    ("calm-small", traffic.in_distribution, 10, 60),
    ("age+colour", traffic.shift_age_colour, 6, 200),
    ("age+1y", lambda f, n, rng: traffic.shift_mean(f, n, rng, "age", 1), 10, 100),
    ("checks+1", lambda f, n, rng: traffic.shift_mean(f, n, rng, "checks", 1), 10, 40),
    ("colour-mix", lambda f, n, rng: traffic.invert_mix(f, "colour", n, rng), 8, 12),
]


@pytest.fixture(scope="module")
def schema() -> Schema:
    record = ModelVersion.model_validate(yaml.safe_load(SAMPLE.read_text()))
    return Schema.from_signature(record.spec.signature)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(bundled_path("arrests"), dtype_backend="numpy_nullable")


@pytest.fixture(scope="module")
def windows(schema: Schema, frame: pd.DataFrame) -> list[tuple[str, list[np.ndarray]]]:
    rng = np.random.default_rng(17)
    return [
        (f"{name}#{i}", schema.encode_frame(draw(frame, rows, rng)))
        for name, draw, count, rows in RECORDED
        for i in range(count)
    ]


@pytest.mark.parametrize("correction", ["bonferroni", "fdr"])
def test_scipy_decides_every_recorded_window_as_alibi_does(schema, frame, windows, correction) -> None:
    reference = detectors.Reference.from_frame(schema, frame, 2000, seed=0)
    alibi = detectors.FeatureWiseDrift(reference, 0.05, correction, backend="alibi")
    scipy = detectors.FeatureWiseDrift(reference, 0.05, correction, backend="scipy")
    trackers = {"alibi": detectors.DriftTracker(), "scipy": detectors.DriftTracker()}
    flagged = 0
    for name, columns in windows:
        a, s = alibi.test(columns), scipy.test(columns)
        assert a.flagged == s.flagged, f"{name}: alibi {a.features} scipy {s.features}"
        assert a.threshold == pytest.approx(s.threshold, rel=1e-6), name
        assert list(a.features) == list(s.features) and set(a.features) == set(schema.names)
        for feature, test in a.features.items():
            other = s.features[feature]
            assert other.test == test.test
            # alibi stores p-values and statistics as float32: equal to 1e-5, and p-values below float32's range
            # (a strong shift's 1e-60) are 0 there
            assert other.p_value == pytest.approx(test.p_value, rel=1e-5, abs=1e-35), f"{name} {feature}"
            assert other.distance == pytest.approx(test.distance, rel=1e-5), f"{name} {feature}"
            assert other.effect == pytest.approx(test.effect, rel=1e-5), f"{name} {feature}"
        assert trackers["alibi"].update(a.flagged) == trackers["scipy"].update(s.flagged)
        flagged += a.flagged
    # the recorded windows do exercise both decisions, near the threshold too
    assert 0 < flagged < len(windows)


def test_the_backend_flows_from_the_deployment_spec_and_mmd_needs_alibi() -> None:
    assert DriftMonitor().backend == "alibi"
    assert SidecarConfig.from_monitor(DriftMonitor(backend="scipy")).backend == "scipy"
    with pytest.raises(ValidationError, match="mmd runs on backend alibi only"):
        DriftMonitor(detector="mmd", backend="scipy")
    with pytest.raises(ValidationError, match="backend"):
        DriftMonitor(backend="numpy")


def test_a_flagged_window_says_which_features_moved_how_far_and_their_share(schema, frame) -> None:
    reference = detectors.Reference.from_frame(schema, frame, 2000, seed=0)
    rng = np.random.default_rng(5)
    for backend in ("alibi", "scipy"):
        detector = detectors.FeatureWiseDrift(reference, 0.05, "bonferroni", backend=backend)
        age = detector.test(schema.encode_frame(traffic.shift_mean(frame, 400, rng, "age", 8)))
        assert age.flagged and age.drifted_features() == ["age"] and age.shares() == {"age": 1.0}
        both = detector.test(schema.encode_frame(traffic.shift_age_colour(frame, 400, rng, years=15)))
        shares = both.shares()
        assert set(shares) >= {"age", "colour"} and sum(shares.values()) == pytest.approx(1.0)
        assert all(0 <= test.effect <= 1 for test in both.features.values())
        # KS D of age against Cramer's V of colour: one scale, so the shares compare them
        assert both.features["age"].effect == both.features["age"].distance
        calm = detector.test(schema.encode_frame(traffic.in_distribution(frame, 400, rng)))
        assert not calm.flagged and calm.shares() == {}
