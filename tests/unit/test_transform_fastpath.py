"""The numpy fast path (`transform_columns`, `predict_columns`) against the pandas transform it replaced: same bytes
for any rows, including nulls, unseen categories and values that overflow float32."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeloop.api.modelversion import Feature
from kubeloop.artifact import ModelArtifact
from kubeloop.data.bundled import bundled_path
from kubeloop.errors import DataError
from kubeloop.training import tasks
from kubeloop.training.models import mlp
from kubeloop.transform import TabularTransform, _as_str, _numeric
from serving.validation import SignatureValidator

# pandas dtypes of a training (or typed serving) frame, per kubeloop dtype
STORAGE = {"float": "float64", "int": "Int64", "bool": "boolean", "string": "string"}
TRAINED = ["a", "b", "None", "nan"]  # strings that look like nulls but are not
SERVED = [*TRAINED, "c", ""]  # and unseen ones


def old_transform(transform: TabularTransform, frame: pd.DataFrame) -> np.ndarray:
    """The transform as it was before the fast path (pandas Categorical per string feature): the oracle."""
    out = np.zeros((len(frame), transform.output_dim), dtype=np.float64)
    offset = 0
    for feature in transform.features:
        series = frame[feature.name]
        if feature.categories is None:
            values = _numeric(feature.name, series)
            out[:, offset] = (np.where(np.isnan(values), feature.mean, values) - feature.mean) / feature.std
        else:
            codes = pd.Categorical(_as_str(series), categories=feature.categories).codes
            hit = codes >= 0
            out[np.flatnonzero(hit), offset + codes[hit]] = 1.0
        offset += feature.width
    with np.errstate(over="ignore"):
        return out.astype(np.float32)


def old_predict(artifact: ModelArtifact, frame: pd.DataFrame) -> np.ndarray:
    task = artifact.transform.task
    with torch.no_grad():
        out = tasks.predictions(task, artifact.model(torch.from_numpy(old_transform(artifact.transform, frame))))
    out = out.numpy()
    return artifact.transform.decode_value(out).astype(np.float32) if task == "regression" else out


def validator_columns(transform: TabularTransform, rows: dict[str, list]) -> dict[str, np.ndarray]:
    """Columns as the model server's validator hands them over: float64 with NaN, or object arrays of str/None."""
    return {
        f.name: np.array(rows[f.name], dtype=object)
        if f.categories is not None
        else np.array([np.nan if v is None else float(v) for v in rows[f.name]], dtype=np.float64)
        for f in transform.features
    }


def value(kind: str, serving: bool) -> st.SearchStrategy:
    if kind == "float":
        moderate = st.floats(-1e3, 1e3, allow_nan=False)
        # serving: values that overflow float32 after scaling, as an absurd request would send
        return st.none() | (moderate | st.sampled_from([1e300, -1e300, 3.5e38, 1e39]) if serving else moderate)
    if kind == "int":
        return st.none() | st.integers(-(10**15) if serving else -1000, 10**15 if serving else 1000)
    if kind == "bool":
        return st.none() | st.booleans()
    return st.none() | st.sampled_from(SERVED if serving else TRAINED)


@st.composite
def cases(draw: st.DrawFn) -> tuple[pd.DataFrame, dict[str, str], dict[str, list]]:
    kinds = draw(st.lists(st.sampled_from(list(STORAGE)), min_size=1, max_size=5))
    dtypes = {f"{kind}{i}": kind for i, kind in enumerate(kinds)}
    train_rows, serve_rows = draw(st.integers(1, 8)), draw(st.integers(0, 6))
    train = pd.DataFrame(
        {
            name: pd.array(draw(st.lists(value(kind, False), min_size=train_rows, max_size=train_rows)), STORAGE[kind])
            for name, kind in dtypes.items()
        }
    )
    train["label"] = draw(st.lists(st.sampled_from(["Yes", "No"]), min_size=train_rows, max_size=train_rows))
    served = {
        name: draw(st.lists(value(kind, True), min_size=serve_rows, max_size=serve_rows))
        for name, kind in dtypes.items()
    }
    return train, dtypes, served


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # no feature value seen: width 0
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fast_path_equals_the_pandas_transform(case: tuple[pd.DataFrame, dict[str, str], dict[str, list]]) -> None:
    train, dtypes, served = case
    transform = TabularTransform.fit(train, label="label", positive_class="Yes")
    typed = pd.DataFrame({name: pd.array(served[name], STORAGE[kind]) for name, kind in dtypes.items()})
    from_json = pd.DataFrame(
        [dict(zip(served, row, strict=True)) for row in zip(*served.values(), strict=True)], columns=list(served)
    )
    columns = validator_columns(transform, served)

    expected = old_transform(transform, typed)

    assert expected.shape == (len(typed), transform.output_dim) and expected.dtype == np.float32
    for out in (
        transform.transform_columns(columns),
        transform.transform(typed),
        transform.transform(from_json),
        transform.transform(pd.DataFrame(columns)),
        old_transform(transform, from_json),
    ):
        assert out.dtype == np.float32 and out.shape == expected.shape
        assert out.tobytes() == expected.tobytes()
    torch.manual_seed(0)
    artifact = ModelArtifact(mlp(transform.output_dim, hidden_units=[4]), transform, "mlp", {})
    np.testing.assert_array_equal(artifact.predict_columns(columns), old_predict(artifact, typed))
    np.testing.assert_array_equal(artifact.predict(typed), old_predict(artifact, typed))


def test_values_of_other_types_compare_as_str_and_pandas_nulls_as_nulls() -> None:
    train = pd.DataFrame({"code": ["1", "2.5", "True", "x"], "label": ["Yes", "No", "Yes", "No"]})
    transform = TabularTransform.fit(train, label="label", positive_class="Yes")
    served = np.array([1, 2.5, True, np.str_("x"), np.nan, pd.NA, None, 3, "nan"], dtype=object)

    out = transform.transform_columns({"code": served})

    np.testing.assert_array_equal(out, old_transform(transform, pd.DataFrame({"code": served})))
    assert out.argmax(axis=1)[:4].tolist() == [0, 1, 2, 3] and not out[4:].any()


@pytest.mark.parametrize(
    "dataset,label,task,positive",
    [
        ("arrests", "released", "binary", "Yes"),
        ("penguins", "species", "multiclass", None),
        ("abalone", "rings", "regression", None),
    ],
)
def test_predict_columns_equals_predict_for_every_task(
    dataset: str, label: str, task: str, positive: str | None
) -> None:
    frame = pd.read_csv(bundled_path(dataset))
    transform = TabularTransform.fit(frame, label=label, task=task, positive_class=positive)
    torch.manual_seed(0)
    artifact = ModelArtifact(
        mlp(transform.output_dim, hidden_units=[8], outputs=transform.label_width), transform, "mlp", {}
    )
    rows = frame.head(300).astype(object).where(frame.head(300).notna(), None)
    columns = validator_columns(transform, {name: rows[name].tolist() for name in transform.feature_names})

    out = artifact.predict_columns(columns)

    assert out.dtype == np.float32
    assert out.shape == ((300, len(transform.classes)) if task == "multiclass" else (300,))
    np.testing.assert_array_equal(out, artifact.predict(frame.head(300)))
    np.testing.assert_array_equal(out, old_predict(artifact, frame.head(300)))


def test_the_servers_validated_columns_predict_as_the_frame_does() -> None:
    frame = pd.read_csv(bundled_path("arrests")).head(50)
    transform = TabularTransform.fit(frame, label="released", positive_class="Yes")
    torch.manual_seed(0)
    artifact = ModelArtifact(mlp(transform.output_dim, hidden_units=[8]), transform, "mlp", {})
    validator = SignatureValidator([Feature(**f) for f in transform.input_features()])
    rows = frame[transform.feature_names].to_dict(orient="records")
    rows[0] = rows[0] | {"sex": "Other", "age": 10**6}  # an unseen category, a value far out of range

    batch = validator.from_v1({"instances": rows})

    np.testing.assert_array_equal(artifact.predict_columns(batch.columns), artifact.predict(pd.DataFrame(rows)))


def test_columns_are_checked_like_a_frame() -> None:
    transform = TabularTransform.fit(
        pd.DataFrame({"age": [20, 30], "city": ["Oslo", "Lima"], "label": ["Yes", "No"]}),
        label="label",
        positive_class="Yes",
    )
    city = np.array(["Oslo"], dtype=object)

    with pytest.raises(DataError, match=r"missing feature columns \['age'\]"):
        transform.transform_columns({"city": city})
    with pytest.raises(DataError, match=r"feature columns differ in length \{'age': 2, 'city': 1\}"):
        transform.transform_columns({"age": np.array([1.0, 2.0]), "city": city})
    with pytest.raises(DataError, match=r"feature column 'age' must be numeric, found object \(e.g. 'old'\)"):
        transform.transform_columns({"age": np.array(["old"], dtype=object), "city": city})
    assert transform.transform_columns({"age": np.array([None, 20], dtype=object), "city": city.repeat(2)}).shape == (
        2,
        3,
    )
