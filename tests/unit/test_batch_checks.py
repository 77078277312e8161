"""The batch's signature check (row by row, vectorized) and its drift test from counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kubeloop.api.modelversion import Feature
from kubeloop.batch.drift import Bins, Reference, judge
from kubeloop.batch.signature_check import check_rows, check_schema
from kubeloop.errors import DataError

FEATURES = [
    Feature(name="colour", dtype="string", categories=["Black", "White"], nullable=False),
    Feature(name="age", dtype="int", nullable=False, min=12, max=66),
    Feature(name="score", dtype="float", nullable=True, min=0, max=1),
    Feature(name="flag", dtype="bool", nullable=False),
]
SCALES = {"age": (30.0, 8.0), "score": (0.5, 0.2)}


def test_each_bad_row_gets_its_first_problem_and_good_rows_pass_as_the_transform_takes_them() -> None:
    table = pa.table(
        {
            "colour": ["Black", "White", None, "Purple", "White", "Black", "White", "Black"],
            "age": ["30", "31", "32", "33", "abc", "2.5", "1e12", "80"],  # a CSV's numeric column, read as text
            "score": [0.1, None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
            "flag": ["true", "False", "true", "true", "true", "true", "true", "TRUE"],
        }
    )
    checked = check_rows(table, FEATURES, SCALES)
    assert checked.reasons.tolist() == [
        None,
        None,
        "null_value: colour",
        "unseen_category: colour",
        "wrong_type: age",
        "wrong_type: age",
        "out_of_range: age",
        None,
    ]
    assert checked.ok.tolist() == [True, True, False, False, False, False, False, True]
    assert checked.columns["colour"].tolist() == ["Black", "White", "Black"]
    np.testing.assert_array_equal(checked.columns["age"], [30.0, 31.0, 80.0])
    np.testing.assert_array_equal(checked.columns["score"], [0.1, np.nan, 0.8])  # a nullable feature's null: NaN
    np.testing.assert_array_equal(checked.columns["flag"], [1.0, 0.0, 1.0])
    assert checked.out_of_range == {"age": 1}  # 80 is outside the training ages: scored and counted


def test_typed_columns_are_checked_the_same_way() -> None:
    table = pa.table(
        {
            "colour": pa.array(["Black", "White", "Black"]).dictionary_encode(),
            "age": pa.array([20, None, 40], pa.int64()),
            "score": [float("inf"), 0.2, 0.3],
            "flag": [True, False, None],
        }
    )
    reasons = check_rows(table, FEATURES, SCALES).reasons.tolist()
    assert reasons == ["wrong_type: score", "null_value: age", "null_value: flag"]


def test_the_schema_check_names_missing_columns_carry_and_types() -> None:
    schema = pa.schema([("colour", pa.string()), ("age", pa.int64()), ("flag", pa.float64()), ("id", pa.int64())])
    with pytest.raises(DataError, match=r"lacks the feature columns \['score'\]"):
        check_schema(schema, FEATURES, [], "input.parquet")
    schema = schema.append(pa.field("score", pa.float64()))
    with pytest.raises(DataError, match=r"spec\.carry: input\.parquet has no columns \['key'\]"):
        check_schema(schema, FEATURES, ["id", "key"], "input.parquet")
    with pytest.raises(DataError, match="flag is double, the signature says bool"):
        check_schema(schema, FEATURES, ["id"], "input.parquet")


def test_drift_needs_a_significant_and_large_move() -> None:
    bins = [Bins("colour", categories=("Black", "White")), Bins("age", edges=(20.0, 30.0, 40.0, 40.0000001))]
    reference = Reference(
        bins, {"colour": np.array([30_000, 70_000]), "age": np.array([0, 25_000, 50_000, 25_000, 0])}, "sha256:x"
    )
    same = {"colour": np.array([3000, 7000]), "age": np.array([0, 2500, 5000, 2500, 0])}
    state, tests = judge(reference, same)
    assert (state.state, state.features, state.p_value) == ("NoDrift", [], 1.0)
    # significant with these many rows, but colour's share moves by 2 points only: no drift
    slight = {"colour": np.array([320_000, 680_000]), "age": np.array([0, 250_000, 500_000, 250_000, 0])}
    state, tests = judge(reference, slight)
    assert state.state == "NoDrift" and state.p_value < 0.05
    moved = {"colour": np.array([700, 300]), "age": np.array([0, 0, 100, 500, 400])}
    state, tests = judge(reference, moved)
    assert state.state == "Drift" and state.features == ["colour", "age"]
    assert [t.corrected_p_value for t in tests] == [min(1.0, 2 * t.p_value) for t in tests]  # Bonferroni over 2
