"""The feature transform fitted on training rows, saved as JSON inside the model artifact.

The model server loads this very class from the artifact, so training and serving share one implementation:
`transform(frame)` converts the frame's columns and goes through `transform_columns`, the path the server calls
with its validated columns (numpy only, no DataFrame per request).
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from pydantic import BaseModel, ConfigDict, ValidationError

from kubeloop.api.modelversion import Task
from kubeloop.data.snapshot import Dtype, dtype_of
from kubeloop.errors import DataError

TRANSFORM_FILE = "transform.json"


class Feature(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    dtype: Dtype
    # numeric (float, int, bool as 0/1): standardization; nulls become the mean, so 0 after scaling
    mean: float | None = None
    std: float | None = None
    # string: one-hot over these, in this order; unseen values and nulls are all zeros
    categories: list[str] | None = None
    # the training rows: whether they had nulls here, and numeric features' smallest and largest value (None
    # when unknown: a transform.json written before these were recorded, or no values)
    nullable: bool = True
    minimum: float | None = None
    maximum: float | None = None

    @property
    def width(self) -> int:
        return len(self.categories) if self.categories is not None else 1


class TabularTransform(BaseModel):
    """Features in, and the label as the network learns it: binary, 1.0 for the positive class else 0.0;
    multiclass, the index of the class in ``classes``; regression, the value standardized with the training
    rows' mean and std (``decode_value`` undoes it)."""

    model_config = ConfigDict(frozen=True)

    label: str
    features: list[Feature]
    task: Task = "binary"
    positive_class: str | None = None
    classes: list[str] | None = None
    label_mean: float | None = None
    label_std: float | None = None

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        *,
        label: str,
        task: Task = "binary",
        positive_class: str | None = None,
        exclude: Sequence[str] = (),
    ) -> TabularTransform:
        if frame.empty:
            raise DataError("cannot fit a transform on an empty frame: the training split has no rows")
        missing = [name for name in [label, *exclude] if name not in frame.columns]
        if missing:
            raise DataError(f"columns {missing} not in the training data (columns: {list(frame.columns)})")
        features = [_fit_feature(str(name), frame[name]) for name in frame.columns if name not in {label, *exclude}]
        if not features:
            raise DataError(f"no feature columns left after excluding the label {label!r} and {list(exclude)}")
        if task == "binary":
            if positive_class is None:
                raise DataError("task binary needs the positive class: the label value that counts as positive")
            return cls(label=label, features=features, positive_class=positive_class)
        if task == "multiclass":
            classes = sorted(_as_str(frame[label]).dropna().unique())
            return cls(label=label, features=features, task=task, classes=classes)
        values = _numeric(label, frame[label])
        present = values[~np.isnan(values)]
        std = float(present.std()) if present.size else 0.0
        mean = float(present.mean()) if present.size else 0.0
        return cls(label=label, features=features, task=task, label_mean=mean, label_std=std if std > 0 else 1.0)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def output_dim(self) -> int:
        """Width of the transformed features: the network's input."""
        return sum(f.width for f in self.features)

    @property
    def label_width(self) -> int:
        """The network's outputs: one logit (binary), one per class (multiclass), one value (regression)."""
        return len(self.classes) if self.task == "multiclass" and self.classes else 1

    def input_features(self) -> list[dict]:
        """The model's input signature: one entry per input column (name, dtype, categories of a string feature,
        nullable, and the training min and max of a numeric one when known)."""
        return [
            f.model_dump(include={"name", "dtype", "categories", "nullable"}, exclude_none=True)
            | ({"min": f.minimum} if f.minimum is not None else {})
            | ({"max": f.maximum} if f.maximum is not None else {})
            for f in self.features
        ]

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 features, one row per frame row (by position), ``output_dim`` wide."""
        return self.transform_columns(self.frame_columns(frame))

    def frame_columns(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The frame's feature columns as `transform_columns` takes them; raises if one is missing, or if a numeric
        feature's column holds anything but numbers and nulls."""
        self._check_present(frame.columns)
        return {
            f.name: _numeric(f.name, frame[f.name])
            if f.categories is None
            else _as_str(frame[f.name]).to_numpy(dtype=object, na_value=None)
            for f in self.features
        }

    def transform_columns(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """`transform` of one array per feature, all of one length: numeric features as numbers (float64 with NaN
        for nulls, as the model server's validator gives them), string features as object arrays of str with None
        for nulls (any other value is compared as ``str(value)``, a pandas null as a null)."""
        plan = self._plan
        self._check_present(columns)
        lengths = [len(columns[name]) for name in plan.names]
        rows = lengths[0]
        if lengths.count(rows) != len(lengths):
            given = dict(zip(plan.names, lengths, strict=True))
            raise DataError(f"feature columns differ in length {given}: give every feature one value per row")
        # one spare column past the end: unseen categories and nulls are set there and dropped
        out = np.zeros((rows, plan.width + 1), dtype=np.float64)
        if plan.numeric:
            # rows by numeric features
            values = np.array([_numbers(name, columns[name]) for name in plan.numeric], dtype=np.float64).T
            means, stds = plan.means, plan.stds
            out[:, plan.numeric_columns] = (np.where(np.isnan(values), means, values) - means) / stds
        if plan.strings:
            count = rows * len(plan.strings)
            codes = np.fromiter(
                chain.from_iterable(map(index.__getitem__, columns[name]) for name, index in plan.strings),
                dtype=np.intp,
                count=count,
            )
            out[np.arange(count) % rows, codes] = 1.0  # codes run feature by feature
        # a finite but absurd input (1e300) overflows float32 to inf: the server refuses the non-finite answer
        with np.errstate(over="ignore"):
            return out[:, : plan.width].astype(np.float32)

    @cached_property
    def _plan(self) -> _Plan:
        """Per-feature state for `transform_columns`, computed once per (frozen) transform."""
        numeric: list[tuple[str, int, float, float]] = []
        strings: list[tuple[str, _Categories]] = []
        width = self.output_dim
        offset = 0
        for f in self.features:
            if f.categories is None:
                numeric.append((f.name, offset, f.mean, f.std))
            else:
                columns = {category: offset + i for i, category in enumerate(f.categories)}
                strings.append((f.name, _Categories(columns, missed=width)))
            offset += f.width
        return _Plan(
            names=tuple(self.feature_names),
            width=width,
            numeric=tuple(name for name, _, _, _ in numeric),
            numeric_columns=np.array([column for _, column, _, _ in numeric], dtype=np.intp),
            means=np.array([mean for _, _, mean, _ in numeric], dtype=np.float64),
            stds=np.array([std for _, _, _, std in numeric], dtype=np.float64),
            strings=tuple(strings),
        )

    def _check_present(self, columns: Collection[str]) -> None:
        missing = [name for name in self._plan.names if name not in columns]
        if missing:
            raise DataError(f"missing feature columns {missing}: the model was trained on {self.feature_names}")

    def encode_label(self, frame: pd.DataFrame) -> np.ndarray:
        """The label as the network learns it: float32 0/1 (binary), int64 class index (multiclass), float32
        standardized value (regression)."""
        if self.label not in frame.columns:
            raise DataError(f"label column {self.label!r} is missing (columns: {list(frame.columns)})")
        series = frame[self.label]
        nulls = int(series.isna().sum())
        if nulls:
            raise DataError(f"label column {self.label!r} has {nulls} nulls: drop or fill those rows")
        if self.task == "binary":
            return (_as_str(series) == self.positive_class).to_numpy(dtype=np.float32)
        if self.task == "multiclass":
            codes = pd.Categorical(_as_str(series), categories=self.classes).codes
            if (codes < 0).any():
                unknown = sorted(_as_str(series)[codes < 0].unique())[:5]
                raise DataError(
                    f"label column {self.label!r} holds classes the model was not trained on: {unknown} "
                    f"(trained on {self.classes})"
                )
            return codes.astype(np.int64)
        return ((_numeric(self.label, series) - self.label_mean) / self.label_std).astype(np.float32)

    def label_values(self, frame: pd.DataFrame) -> np.ndarray:
        """The label in evaluation's terms: 0/1 (binary), class index (multiclass), the value itself (regression)."""
        encoded = self.encode_label(frame)
        return self.decode_value(encoded) if self.task == "regression" else encoded.astype(np.int64)

    def decode_value(self, standardized: np.ndarray) -> np.ndarray:
        """Regression: the network's standardized output in the label's units."""
        return np.asarray(standardized, dtype=np.float64) * self.label_std + self.label_mean

    def save(self, path: Path) -> Path:
        """Write to ``path`` if it ends in .json, else to ``path/transform.json``; returns the file."""
        file = _file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(self.model_dump_json(indent=2) + "\n")
        return file

    @classmethod
    def load(cls, path: Path) -> TabularTransform:
        file = _file(path)
        try:
            return cls.model_validate_json(file.read_text())
        except (OSError, ValidationError) as e:
            raise DataError(f"cannot load the transform from {file}: {e}") from e


@dataclass(frozen=True, eq=False)  # eq by identity: pydantic's __eq__ compares a model's fields, not this cache
class _Plan:
    names: tuple[str, ...]
    width: int  # output_dim
    numeric: tuple[str, ...]  # numeric features, in order
    numeric_columns: np.ndarray  # each one's output column
    means: np.ndarray
    stds: np.ndarray
    strings: tuple[tuple[str, _Categories], ...]  # string features: category -> its output column


def _numbers(name: str, values: np.ndarray) -> np.ndarray:
    """A numeric feature's values as numbers; anything but a numeric array goes through the frame's checks."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return values
    return _numeric(name, pd.Series(values, copy=False))


class _Categories(dict[str, int]):
    """A string feature's category -> output column; any other value looks up `missed`, the spare column. A value
    neither str nor None is looked up as ``str(value)`` (a pandas null stays a null), as `_as_str` compares."""

    def __init__(self, columns: dict[str, int], missed: int):
        super().__init__(columns)
        self.missed = missed

    def __missing__(self, value: object) -> int:
        if value is None or type(value) is str or (ptypes.is_scalar(value) and pd.isna(value)):
            return self.missed
        return self.get(str(value), self.missed)


def _file(path: Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / TRANSFORM_FILE


def _fit_feature(name: str, series: pd.Series) -> Feature:
    dtype = dtype_of(series)
    nullable = bool(series.isna().any())
    if dtype == "string":
        categories = sorted(_as_str(series).dropna().unique())
        return Feature(name=name, dtype=dtype, categories=categories, nullable=nullable)
    values = _numeric(name, series)
    present = values[~np.isnan(values)]
    mean = float(present.mean()) if present.size else 0.0
    std = float(present.std()) if present.size else 0.0
    # bool features have no range worth checking: the server's validator takes only true and false
    ranged = dtype != "bool" and present.size > 0
    return Feature(
        name=name,
        dtype=dtype,
        mean=mean,
        std=std if std > 0 else 1.0,
        nullable=nullable,
        minimum=float(present.min()) if ranged else None,
        maximum=float(present.max()) if ranged else None,
    )


def _numeric(name: str, series: pd.Series) -> np.ndarray:
    """float64 values with NaN for nulls; object columns (e.g. built from JSON) must hold only numbers."""
    if not (ptypes.is_bool_dtype(series.dtype) or ptypes.is_numeric_dtype(series.dtype)):
        present = series.dropna()
        bad = present[~present.map(lambda v: isinstance(v, numbers.Number | np.bool_))]
        if not ptypes.is_object_dtype(series.dtype) or len(bad):
            example = f" (e.g. {bad.iloc[0]!r})" if len(bad) else ""
            raise DataError(f"feature column {name!r} must be numeric, found {series.dtype}{example}")
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _as_str(series: pd.Series) -> pd.Series:
    """Values as str (nulls kept), so categories compare the same whatever dtype the frame arrived with."""
    return series.astype(object).map(str, na_action="ignore")
