from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubeloop.data.bundled import ARRESTS
from kubeloop.data.snapshot import ingest, read_frame
from kubeloop.errors import DataError
from kubeloop.transform import TabularTransform


@pytest.fixture
def train() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": pd.array([20, 30, None, 50], dtype="Int64"),
            "income": [1.5, 2.5, 3.5, np.nan],
            "city": pd.array(["Oslo", "Lima", None, "Oslo"], dtype="string"),
            "member": pd.array([True, False, True, True], dtype="boolean"),
            "constant": [7.0] * 4,
            "released": ["Yes", "No", "Yes", "No"],
        }
    )


@pytest.fixture
def fitted(train: pd.DataFrame) -> TabularTransform:
    return TabularTransform.fit(train, label="released", positive_class="Yes")


def test_fit_standardizes_numbers_and_one_hot_encodes_strings(fitted: TabularTransform, train: pd.DataFrame) -> None:
    out = fitted.transform(train)

    assert fitted.feature_names == ["age", "income", "city", "member", "constant"]
    assert fitted.output_dim == 1 + 1 + 2 + 1 + 1
    assert out.dtype == np.float32 and out.shape == (4, 6)
    age_mean, age_std = np.mean([20, 30, 50]), np.std([20, 30, 50])
    np.testing.assert_allclose(out[:, 0], (np.array([20, 30, age_mean, 50]) - age_mean) / age_std, rtol=1e-6)
    assert out[2, 0] == 0.0 and out[3, 1] == 0.0  # nulls become the training mean
    np.testing.assert_array_equal(out[:, 2:4], [[0, 1], [1, 0], [0, 0], [0, 1]])  # categories Lima, Oslo
    np.testing.assert_allclose(out[:, 4], (np.array([1, 0, 1, 1]) - 0.75) / np.std([1, 0, 1, 1]), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 5], 0.0)  # std 0 is taken as 1
    np.testing.assert_array_equal(fitted.transform(train.iloc[::-1]), out[::-1])  # by position, not index


def test_save_load_round_trip_is_exact(fitted: TabularTransform, train: pd.DataFrame, tmp_path: Path) -> None:
    file = fitted.save(tmp_path / "artifact")
    loaded = TabularTransform.load(tmp_path / "artifact")

    assert file == tmp_path / "artifact" / "transform.json"
    assert json.loads(file.read_text())["label"] == "released"
    assert loaded == fitted
    np.testing.assert_allclose(loaded.transform(train), fitted.transform(train), rtol=0, atol=1e-7)
    assert TabularTransform.load(fitted.save(tmp_path / "elsewhere.json")) == fitted


def test_unknown_category_and_null_encode_as_zeros(fitted: TabularTransform, train: pd.DataFrame) -> None:
    serving = train.drop(columns="released").head(2).assign(city=["Rome", None])

    np.testing.assert_array_equal(fitted.transform(serving)[:, 2:4], 0.0)


def test_serving_frames_built_from_json_work(fitted: TabularTransform, train: pd.DataFrame) -> None:
    rows = [
        {"age": 20, "income": 1.5, "city": "Lima", "member": True, "constant": 7},
        {"age": None, "income": None, "city": None, "member": None, "constant": 7},
    ]
    from_json = pd.DataFrame(rows)

    out = fitted.transform(from_json)

    expected = fitted.transform(train.iloc[[1]].assign(age=20, income=1.5, member=True))
    np.testing.assert_array_equal(out[0, [0, 1, 2, 3, 5]], expected[0, [0, 1, 2, 3, 5]])
    np.testing.assert_array_equal(out[1, [0, 1, 2, 3, 4]], 0.0)


def test_missing_or_non_numeric_feature_column_is_named(fitted: TabularTransform, train: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"missing feature columns \['income'\]"):
        fitted.transform(train.drop(columns="income"))
    with pytest.raises(DataError, match=r"feature column 'age' must be numeric, found object \(e.g. 'old'\)"):
        fitted.transform(train.assign(age=[20, "old", None, 50]))
    with pytest.raises(DataError, match=r"feature column 'income' must be numeric, found string"):
        fitted.transform(train.assign(income=pd.array(["1", "2", "3", "4"], dtype="string")))


def test_encode_label(fitted: TabularTransform, train: pd.DataFrame) -> None:
    labels = fitted.encode_label(train)

    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])
    with pytest.raises(DataError, match="label column 'released' is missing"):
        fitted.encode_label(train.drop(columns="released"))
    with pytest.raises(DataError, match="label column 'released' has 1 nulls"):
        fitted.encode_label(train.assign(released=["Yes", None, "No", "No"]))


def test_input_features_describe_the_signature(fitted: TabularTransform) -> None:
    assert fitted.input_features() == [
        {"name": "age", "dtype": "int", "nullable": True, "min": 20.0, "max": 50.0},
        {"name": "income", "dtype": "float", "nullable": True, "min": 1.5, "max": 3.5},
        {"name": "city", "dtype": "string", "categories": ["Lima", "Oslo"], "nullable": True},
        {"name": "member", "dtype": "bool", "nullable": False},
        {"name": "constant", "dtype": "float", "nullable": False, "min": 7.0, "max": 7.0},
    ]


def test_fit_records_the_training_rows_nulls_and_ranges(train: pd.DataFrame) -> None:
    frame = train.assign(empty=pd.array([None] * 4, dtype="Float64"), negative=[-3, -1, 0, 2])

    features = {f.name: f for f in TabularTransform.fit(frame, label="released", positive_class="Yes").features}

    assert features["age"].nullable and features["city"].nullable and features["empty"].nullable
    assert not features["member"].nullable and not features["negative"].nullable
    assert (features["negative"].minimum, features["negative"].maximum) == (-3.0, 2.0)
    assert features["empty"].minimum is None and features["empty"].maximum is None  # no values, no range
    assert features["member"].minimum is None and features["city"].maximum is None  # bools and strings have none


def test_a_transform_saved_before_nullability_and_ranges_loads_as_nullable(
    fitted: TabularTransform, train: pd.DataFrame, tmp_path: Path
) -> None:
    saved = json.loads(fitted.model_dump_json())
    for feature in saved["features"]:
        for key in ("nullable", "minimum", "maximum"):
            del feature[key]
    (tmp_path / "transform.json").write_text(json.dumps(saved))

    loaded = TabularTransform.load(tmp_path)

    assert [f["nullable"] for f in loaded.input_features()] == [True] * 5
    assert all("min" not in f and "max" not in f for f in loaded.input_features())
    np.testing.assert_array_equal(loaded.transform(train), fitted.transform(train))


def test_fit_rejects_unknown_label_or_exclusions(train: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"columns \['outcome'\] not in the training data"):
        TabularTransform.fit(train, label="outcome", positive_class="Yes")
    with pytest.raises(DataError, match=r"columns \['colour'\] not in the training data"):
        TabularTransform.fit(train, label="released", positive_class="Yes", exclude=["colour"])


def test_fits_the_bundled_dataset() -> None:
    frame = read_frame(ingest(ARRESTS.uri))

    transform = TabularTransform.fit(frame, label="released", positive_class="Yes", exclude=["colour"])
    out = transform.transform(frame)

    assert transform.feature_names == ["year", "age", "sex", "employed", "citizen", "checks"]
    assert out.shape == (5226, 3 + 2 * 3)
    np.testing.assert_allclose(out[:, [0, 1, 8]].mean(axis=0), 0.0, atol=1e-5)
    assert transform.encode_label(frame).mean() == pytest.approx(4334 / 5226)
