"""The feature schema the sidecar checks events against and encodes windows with.

Built from a ModelVersion's input signature (names, dtypes, categories, nullability). Numeric features (float,
int) are kept as float64 with NaN for null; categorical features (string, bool) as integer codes: the known
categories in order, then one code for null and one for any value never seen in training, so a reference sample,
a serving window and the training snapshot's statistics are all encoded the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from kubeloop.api.modelversion import Feature, Signature
from kubeloop.data.snapshot import ColumnStats

Kind = Literal["numeric", "categorical"]
NULL_LABEL = "<null>"
OTHER_LABEL = "<other>"


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    dtype: str  # float | int | bool | string
    nullable: bool
    # categorical only: known labels in code order; codes len(categories) = null, len(categories) + 1 = unseen
    categories: tuple[str, ...] = ()
    codes: Mapping[object, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kind(self) -> Kind:
        return "numeric" if self.dtype in ("float", "int") else "categorical"

    @property
    def null_code(self) -> int:
        return len(self.categories)

    @property
    def other_code(self) -> int:
        return len(self.categories) + 1

    @property
    def labels(self) -> list[str]:
        """Label of every code, null and unseen included."""
        return [*self.categories, NULL_LABEL, OTHER_LABEL]


def _feature_spec(feature: Feature, stats: ColumnStats | None) -> FeatureSpec:
    if feature.dtype in ("float", "int"):
        return FeatureSpec(feature.name, feature.dtype, feature.nullable)
    if feature.dtype == "bool":
        # JSON true/false; the snapshot's statistics name them "False"/"True" (str() of the value)
        return FeatureSpec(
            feature.name, "bool", feature.nullable, ("False", "True"), {False: 0, True: 1, "False": 0, "True": 1}
        )
    categories = feature.categories
    if categories is None:
        # no declared categories: the training snapshot's (most frequent first), else every value is unseen
        categories = list(stats.categories) if stats is not None and stats.categories else []
    return FeatureSpec(
        feature.name, "string", feature.nullable, tuple(categories), {c: i for i, c in enumerate(categories)}
    )


@dataclass(frozen=True)
class Schema:
    features: tuple[FeatureSpec, ...]

    @classmethod
    def from_signature(cls, signature: Signature, stats: Mapping[str, ColumnStats] | None = None) -> Schema:
        stats = stats or {}
        return cls(tuple(_feature_spec(f, stats.get(f.name)) for f in signature.inputs))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def index(self) -> dict[str, int]:
        return {f.name: i for i, f in enumerate(self.features)}

    def numeric(self) -> list[int]:
        return [i for i, f in enumerate(self.features) if f.kind == "numeric"]

    def categorical(self) -> list[int]:
        return [i for i, f in enumerate(self.features) if f.kind == "categorical"]

    def encode_frame(self, frame: pd.DataFrame) -> list[np.ndarray]:
        """One array per feature, encoded as serving windows are: float64 (NaN = null) or int64 codes."""
        missing = [name for name in self.names if name not in frame.columns]
        if missing:
            raise KeyError(f"columns {missing} missing from the frame (columns: {list(frame.columns)})")
        columns: list[np.ndarray] = []
        for spec in self.features:
            series = frame[spec.name]
            if spec.kind == "numeric":
                columns.append(pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan))
            else:
                columns.append(encode_labels(spec, series.tolist()))
        return columns


def encode_labels(spec: FeatureSpec, values: Sequence[object]) -> np.ndarray:
    """Codes of categorical values given as Python objects (str, bool, None, pandas NA)."""
    codes = spec.codes
    null, other = spec.null_code, spec.other_code
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if value is None or value is pd.NA or (isinstance(value, float) and value != value):
            out[i] = null
        else:
            out[i] = codes.get(value if not isinstance(value, np.bool_) else bool(value), other)
    return out
