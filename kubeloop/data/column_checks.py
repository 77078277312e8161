"""The per-column findings of :mod:`kubeloop.data.validation`: column types, the declared schema (nulls, ranges,
categories, extra columns), and ranges and domains against a baseline snapshot's statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from kubeloop.api.validation import Finding, Rule, Severity
from kubeloop.data.snapshot import Dtype, dtype_of

if TYPE_CHECKING:  # validation.py defines the schema and imports this module
    from kubeloop.data.validation import ColumnSpec, DatasetSchema

RANGE_SLACK = 0.1  # baseline [min, max] is widened by this share of its range before values count as new
UNSEEN_ERROR_SHARE = 0.01  # unseen categories in more than this share of rows are an error, else a warning
MOSTLY_NUMERIC = 0.9  # a string column whose values parse as numbers at least this often is a broken numeric one
NUMERIC: tuple[Dtype, ...] = ("float", "int")
_EXAMPLES = 5


def finding(severity: Severity, column: str | None, rule: Rule, message: str) -> Finding:
    return Finding(column=column, rule=rule, severity=severity, message=message)


def compatible(expected: Dtype, actual: Dtype) -> bool:
    return expected == actual or (expected, actual) == ("float", "int")


def _examples(values: pd.Series) -> str:
    unique = sorted(values.astype(str).unique())
    more = ", …" if len(unique) > _EXAMPLES else ""
    return ", ".join(repr(v) for v in unique[:_EXAMPLES]) + more


def _unparsable(series: pd.Series) -> tuple[pd.Series, int]:
    """The non-null values that do not parse as numbers, and how many non-null values there are."""
    values = series.dropna().astype(str)
    parsed = pd.to_numeric(values.str.strip(), errors="coerce")
    return values[parsed.isna()], len(values)


def type_detail(expected: Dtype, series: pd.Series) -> str:
    """Why a column is not of the expected dtype: how many values are not, and examples."""
    if expected in NUMERIC and dtype_of(series) == "string":
        bad, total = _unparsable(series)
        return f": {len(bad)} of {total} values do not parse as numbers ({_examples(bad)})"
    if expected == "int" and dtype_of(series) == "float":
        values = series.dropna().astype("float64")
        fractional = values[values != values.round()]
        if len(fractional):
            return f": {len(fractional)} of {len(values)} values are not whole numbers ({_examples(fractional)})"
    return ""


def mixed_type(name: str, series: pd.Series) -> list[Finding]:
    bad, total = _unparsable(series)
    if not len(bad) or total - len(bad) < MOSTLY_NUMERIC * total:
        return []
    msg = (
        f"{len(bad)} of {total} values do not parse as numbers ({_examples(bad)}), so the column was read as "
        "text: fix or blank those values, or declare the column with dtype string in the schema if it is text"
    )
    return [finding("error", name, "mixed_type", msg)]


def uninformative(name: str, series: pd.Series, spec: ColumnSpec | None, schema: DatasetSchema) -> list[Finding]:
    values = series.dropna()
    if values.empty:
        policy = (spec and spec.on_all_null) or schema.on_all_null
        rule: Rule = "all_null"
        msg = f"all {len(series)} values are null: the column carries no information (severity: onAllNull)"
    elif values.nunique() == 1:
        policy = (spec and spec.on_constant) or schema.on_constant
        rule = "constant"
        msg = (
            f"every non-null value is {str(values.iloc[0])!r}: the column carries no information (severity: onConstant)"
        )
    else:
        return []
    return [] if policy == "ignore" else [finding(policy, name, rule, msg)]


def against_schema(frame: pd.DataFrame, schema: DatasetSchema) -> list[Finding]:
    findings = []
    for spec in schema.columns:
        if spec.name not in frame.columns:
            findings.append(finding("error", spec.name, "missing_column", "declared column is absent from the data"))
            continue
        series = frame[spec.name]
        if not compatible(spec.dtype, dtype_of(series)):
            continue  # a type_mismatch of type_findings: ranges and domains would mean nothing
        findings += _null_rate(spec, float(series.isna().mean()))
        findings += _declared_range(spec, series)
        if spec.categories is not None:
            values = series.dropna().astype(str)
            outside = values[~values.isin(spec.categories)]
            if len(outside):
                msg = f"{len(outside)} values outside declared categories ({_examples(outside)})"
                findings.append(finding("error", spec.name, "domain", msg))
    if not schema.allow_extra_columns:
        declared = {spec.name for spec in schema.columns}
        for name in frame.columns:
            if name not in declared:
                msg = "column is not declared (declare it or set allowExtraColumns)"
                findings.append(finding("error", name, "extra_column", msg))
    return findings


def _null_rate(spec: ColumnSpec, null_rate: float) -> list[Finding]:
    allowed = spec.max_null_rate if spec.max_null_rate is not None else (1.0 if spec.nullable else 0.0)
    if null_rate <= allowed:
        return []
    limit = "column is not nullable" if allowed == 0 else f"above declared max {allowed:.1%}"
    return [finding("error", spec.name, "null_rate", f"{null_rate:.1%} nulls, {limit}")]


def _declared_range(spec: ColumnSpec, series: pd.Series) -> list[Finding]:
    if spec.dtype not in NUMERIC or (spec.min is None and spec.max is None):
        return []
    values = series.dropna().astype("float64")
    findings = []
    if spec.min is not None and (below := int((values < spec.min).sum())):
        msg = f"{below} values below declared min {spec.min:g} (min seen {values.min():g})"
        findings.append(finding("error", spec.name, "range", msg))
    if spec.max is not None and (above := int((values > spec.max).sum())):
        msg = f"{above} values above declared max {spec.max:g} (max seen {values.max():g})"
        findings.append(finding("error", spec.name, "range", msg))
    return findings


def baseline_range(name: str, series: pd.Series, lo: float, hi: float) -> list[Finding]:
    slack = RANGE_SLACK * (hi - lo)
    values = series.dropna().astype("float64")
    findings = []
    if below := int((values < lo - slack).sum()):
        msg = f"{below} values below baseline min {lo:g} widened by 10% (min seen {values.min():g})"
        findings.append(finding("warning", name, "range", msg))
    if above := int((values > hi + slack).sum()):
        msg = f"{above} values above baseline max {hi:g} widened by 10% (max seen {values.max():g})"
        findings.append(finding("warning", name, "range", msg))
    return findings


def unseen(name: str, series: pd.Series, known: dict[str, int]) -> list[Finding]:
    values = series.dropna().astype(str)
    unseen = values[~values.isin(list(known))]
    if unseen.empty:
        return []
    share = len(unseen) / len(series)
    msg = f"{len(unseen)} values ({share:.1%} of rows) unseen in the baseline ({_examples(unseen)})"
    return [finding("error" if share > UNSEEN_ERROR_SHARE else "warning", name, "domain", msg)]
