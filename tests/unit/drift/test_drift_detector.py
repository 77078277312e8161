"""The drift detector on in-memory frames of the bundled arrests data: the reference, feature-wise tests and their
correction, MMD, the k-of-m decision rule with its declared false-positive rate and detection delay, and skew."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kubeloop.api.modelversion import Signature
from monitoring import detectors
from monitoring.schema import Schema
from tests.support import traffic_events as traffic
from tests.support.drift_inputs import FEATURES, REFERENCE

WINDOW = 200


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
