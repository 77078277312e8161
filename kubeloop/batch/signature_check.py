"""Check a table's rows against a ModelVersion's input signature, vectorized, before any row is scored.

The rules are the model server's (serving/validation.py) applied to columns instead of JSON values:

- a null (or NaN) in a feature that is not nullable: ``null_value``;
- a value of the wrong type: ``wrong_type`` (text that is no number in a numeric feature, a fraction in an int
  one, inf, anything but true/false in a bool one);
- a value more than ``ABSURD_STDS`` training standard deviations from the training mean: ``out_of_range`` (the
  server refuses these whatever its outOfRange policy); values merely outside the training [min, max] are scored
  and counted per feature, as the server's default ``outOfRange: count`` does;
- a string outside the signature's categories: ``unseen_category`` (the server scores these as "no category"; a
  batch sets them aside, where they can be looked at, instead of scoring them silently).

A row's reason names its first problem in signature order: ``null_value: age``. What is wrong with a whole column
(a feature missing, a column whose type can never hold the feature) is a `DataError` from `check_schema`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kubeloop.api.modelversion import Feature
from kubeloop.errors import DataError

ABSURD_STDS = 1e6  # the model server's bound (serving.validation.ABSURD_STDS)
REASON = "reason"
_TEXT = ("true", "false")


@dataclass
class CheckedRows:
    """The rows that pass (`ok`), their features as `TabularTransform.transform_columns` takes them, each row's
    reason (None where it passes), and per numeric feature how many passing rows lie outside the training range."""

    ok: np.ndarray
    columns: dict[str, np.ndarray]
    reasons: np.ndarray
    out_of_range: dict[str, int]


def check_schema(schema: pa.Schema, features: Sequence[Feature], carry: Sequence[str], where: str) -> None:
    """Every feature and carried column present, each feature in a column type that can hold it; else a DataError
    that names the columns."""
    names = set(schema.names)
    missing = [f.name for f in features if f.name not in names]
    if missing:
        raise DataError(
            f"{where} lacks the feature columns {missing} of the model's signature "
            f"({', '.join(f.name for f in features)}): add them to the input"
        )
    missing_carry = [name for name in carry if name not in names]
    if missing_carry:
        raise DataError(f"spec.carry: {where} has no columns {missing_carry} (columns: {', '.join(schema.names)})")
    wrong = [
        f"{f.name} is {schema.field(f.name).type}, the signature says {f.dtype}"
        for f in features
        if not _can_hold(schema.field(f.name).type, f.dtype)
    ]
    if wrong:
        raise DataError(f"{where}: {'; '.join(wrong)}: write these columns with the signature's types")


def check_rows(table: pa.Table, features: Sequence[Feature], scales: dict[str, tuple[float, float]]) -> CheckedRows:
    """`scales`: the fitted transform's (mean, std) of each numeric feature, for the absurd-value bound."""
    rows = table.num_rows
    reasons = np.full(rows, None, dtype=object)
    columns: dict[str, np.ndarray] = {}
    out_of_range: dict[str, int] = {}
    for feature in features:
        column = table.column(feature.name)
        if feature.dtype == "string":
            values, problems = _strings(column, feature)
        else:
            values, problems = _numbers(column, feature, scales.get(feature.name))
        for kind, bad in problems:
            reasons[bad & (reasons == None)] = f"{kind}: {feature.name}"  # noqa: E711 (elementwise)
        columns[feature.name] = values
    ok = reasons == None  # noqa: E711 (elementwise)
    for feature in features:
        values = columns[feature.name] = columns[feature.name][ok]
        if feature.dtype in ("float", "int"):
            low = -np.inf if feature.min is None else feature.min
            high = np.inf if feature.max is None else feature.max
            if count := int(np.count_nonzero((values < low) | (values > high))):
                out_of_range[feature.name] = count
    return CheckedRows(ok=ok, columns=columns, reasons=reasons, out_of_range=out_of_range)


def _can_hold(kind: pa.DataType, dtype: str) -> bool:
    if _is_text(kind) or pa.types.is_null(kind):
        return True  # text is checked row by row; a column of only nulls is checked for nulls
    if dtype in ("float", "int"):
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    return dtype == "bool" and pa.types.is_boolean(kind)


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _strings(column: pa.ChunkedArray, feature: Feature) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    if pa.types.is_null(column.type):
        column = column.cast(pa.string())
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    null = column.is_null().to_numpy(zero_copy_only=False)
    problems = [("null_value", null)] if not feature.nullable else []
    if feature.categories is not None:
        known = pc.is_in(column, value_set=pa.array(feature.categories)).to_numpy(zero_copy_only=False)
        problems.append(("unseen_category", ~known & ~null))
    return column.to_numpy(), problems


def _numbers(
    column: pa.ChunkedArray, feature: Feature, scale: tuple[float, float] | None
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """float64 values (NaN for nulls, as the transform takes them) and the rows' problems."""
    kind = column.type
    wrong = np.zeros(len(column), dtype=bool)
    if _is_text(kind):
        text = pd.Series(column.cast(pa.string()).to_numpy(), dtype=object)
        present = text.notna().to_numpy()
        if feature.dtype == "bool":
            lowered = text.str.strip().str.lower()
            values = np.where(lowered == "true", 1.0, np.where(lowered == "false", 0.0, np.nan))
        else:
            values = pd.to_numeric(text.str.strip(), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        wrong = present & np.isnan(values)  # text that is no number (or no true/false)
    elif pa.types.is_null(kind):
        values = np.full(len(column), np.nan)
    else:
        values = column.cast(pa.float64()).to_numpy()
    null = np.isnan(values) & ~wrong
    problems = [("wrong_type", wrong)]
    if feature.dtype != "bool":
        with np.errstate(invalid="ignore"):
            infinite = np.isinf(values)
            fraction = np.isfinite(values) & (values != np.round(values))
            problems.append(("wrong_type", infinite | fraction if feature.dtype == "int" else infinite))
            if scale is not None:
                mean, std = scale
                problems.append(("out_of_range", (np.abs(values - mean) > ABSURD_STDS * std) & ~infinite))
    if not feature.nullable:
        problems.insert(0, ("null_value", null))
    return values, problems
