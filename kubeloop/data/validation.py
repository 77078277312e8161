"""Validate a snapshot against a declared schema and against a baseline snapshot (drift in the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field
from pydantic.alias_generators import to_camel

from kubeloop.data.snapshot import CATEGORY_CAP, Dtype, Snapshot, read_frame
from kubeloop.errors import DataError, KubeloopError

Rule = Literal[
    "missing_column",
    "extra_column",
    "type_mismatch",
    "null_rate",
    "range",
    "domain",
    "label_balance",
    "empty",
]
Severity = Literal["error", "warning"]

RANGE_SLACK = 0.1  # baseline [min, max] is widened by this share of its range before values count as new
UNSEEN_ERROR_SHARE = 0.01  # unseen categories in more than this share of rows are an error, else a warning
_EXAMPLES = 5


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ColumnSpec(_Model):
    name: str
    dtype: Dtype
    nullable: bool = False
    # when set, nulls are allowed up to this share of rows whatever `nullable` says
    max_null_rate: float | None = Field(default=None, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None


class DatasetSchema(_Model):
    columns: list[ColumnSpec]
    label: str | None = None
    allow_extra_columns: bool = False

    @classmethod
    def from_yaml(cls, path: Path) -> DatasetSchema:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"cannot read dataset schema {path}: {e}") from e
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise DataError(f"invalid dataset schema {path}: {problems}") from e


class Finding(BaseModel):
    column: str | None
    rule: Rule
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}  {self.column or '-'}  {self.rule}: {self.message}"


class ValidationReport(BaseModel):
    snapshot_digest: str
    baseline_digest: str | None
    findings: list[Finding]

    @computed_field
    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_text(self) -> str:
        against = f" against baseline {self.baseline_digest}" if self.baseline_digest else ""
        warnings = len(self.findings) - len(self.errors)
        verdict = "OK" if self.ok else "FAILED"
        head = f"{self.snapshot_digest}{against}: {verdict} ({len(self.errors)} errors, {warnings} warnings)"
        return "\n".join([head, *map(str, self.findings)])


class ValidationFailed(KubeloopError):
    def __init__(self, report: ValidationReport) -> None:
        super().__init__("\n".join(map(str, report.errors)))
        self.report = report

    def __reduce__(self):  # the default would rebuild from the message; Ray pickles errors across processes
        return type(self), (self.report,)


def infer_schema(snapshot: Snapshot) -> DatasetSchema:
    """A strict schema that the snapshot itself passes: its dtypes, nullability, ranges and domains."""
    columns = []
    for name, dtype in snapshot.columns.items():
        stats = snapshot.stats[name]
        categories = stats.categories if stats.categories and len(stats.categories) < CATEGORY_CAP else None
        columns.append(
            ColumnSpec(
                name=name,
                dtype=dtype,
                nullable=stats.null_rate > 0,
                min=stats.min,
                max=stats.max,
                categories=sorted(categories) if categories else None,
            )
        )
    return DatasetSchema(columns=columns)


def validate(
    snapshot: Snapshot,
    schema: DatasetSchema | None = None,
    baseline: Snapshot | None = None,
    *,
    label: str | None = None,
    balance_tolerance: float = 0.1,
    null_rate_tolerance: float = 0.05,
) -> ValidationReport:
    """Check the snapshot against the declared schema and/or the baseline snapshot's stats.

    Label balance is compared only with a baseline and a label (``label``, else the schema's).
    """
    findings: list[Finding] = []
    if snapshot.rows == 0:
        findings.append(Finding(column=None, rule="empty", severity="error", message="the snapshot has no rows"))
    else:
        frame = read_frame(snapshot)
        if schema is not None:
            findings += _against_schema(snapshot, frame, schema)
        if baseline is not None:
            findings += _against_baseline(snapshot, frame, baseline, null_rate_tolerance)
            label = label or (schema.label if schema else None)
            if label:
                findings += _label_balance(frame, baseline, label, balance_tolerance)
    return ValidationReport(
        snapshot_digest=snapshot.digest,
        baseline_digest=baseline.digest if baseline else None,
        findings=findings,
    )


def _error(column: str | None, rule: Rule, message: str) -> Finding:
    return Finding(column=column, rule=rule, severity="error", message=message)


def _warning(column: str | None, rule: Rule, message: str) -> Finding:
    return Finding(column=column, rule=rule, severity="warning", message=message)


def _compatible(expected: Dtype, actual: Dtype) -> bool:
    return expected == actual or (expected, actual) == ("float", "int")


def _examples(values: pd.Series) -> str:
    unique = sorted(values.astype(str).unique())
    more = ", …" if len(unique) > _EXAMPLES else ""
    return ", ".join(repr(v) for v in unique[:_EXAMPLES]) + more


def _non_numeric_example(snapshot: Snapshot, column: str) -> str:
    for value in snapshot.stats[column].categories or {}:
        try:
            float(value)
        except ValueError:
            return f" (e.g. {value!r})"
    return ""


def _against_schema(snapshot: Snapshot, frame: pd.DataFrame, schema: DatasetSchema) -> list[Finding]:
    findings = []
    declared = {spec.name for spec in schema.columns}
    for spec in schema.columns:
        if spec.name not in snapshot.columns:
            findings.append(_error(spec.name, "missing_column", "declared column is absent from the data"))
            continue
        actual = snapshot.columns[spec.name]
        if not _compatible(spec.dtype, actual):
            hint = _non_numeric_example(snapshot, spec.name) if spec.dtype in ("float", "int") else ""
            findings.append(_error(spec.name, "type_mismatch", f"declared {spec.dtype}, found {actual}{hint}"))
            continue
        findings += _null_rate(spec, snapshot.stats[spec.name].null_rate)
        findings += _declared_range(spec, frame[spec.name])
        if spec.categories is not None:
            values = frame[spec.name].dropna().astype(str)
            outside = values[~values.isin(spec.categories)]
            if len(outside):
                findings.append(
                    _error(
                        spec.name,
                        "domain",
                        f"{len(outside)} values outside declared categories ({_examples(outside)})",
                    )
                )
    if not schema.allow_extra_columns:
        for name in snapshot.columns:
            if name not in declared:
                findings.append(
                    _error(name, "extra_column", "column is not declared (declare it or set allowExtraColumns)")
                )
    return findings


def _null_rate(spec: ColumnSpec, null_rate: float) -> list[Finding]:
    allowed = spec.max_null_rate if spec.max_null_rate is not None else (1.0 if spec.nullable else 0.0)
    if null_rate <= allowed:
        return []
    limit = "column is not nullable" if allowed == 0 else f"above declared max {allowed:.1%}"
    return [_error(spec.name, "null_rate", f"{null_rate:.1%} nulls, {limit}")]


def _declared_range(spec: ColumnSpec, series: pd.Series) -> list[Finding]:
    if spec.dtype not in ("float", "int") or (spec.min is None and spec.max is None):
        return []
    values = series.dropna().astype("float64")
    findings = []
    if spec.min is not None and (below := int((values < spec.min).sum())):
        msg = f"{below} values below declared min {spec.min:g} (min seen {values.min():g})"
        findings.append(_error(spec.name, "range", msg))
    if spec.max is not None and (above := int((values > spec.max).sum())):
        msg = f"{above} values above declared max {spec.max:g} (max seen {values.max():g})"
        findings.append(_error(spec.name, "range", msg))
    return findings


def _against_baseline(
    snapshot: Snapshot, frame: pd.DataFrame, baseline: Snapshot, null_rate_tolerance: float
) -> list[Finding]:
    findings = []
    for name, base_dtype in baseline.columns.items():
        if name not in snapshot.columns:
            findings.append(_error(name, "missing_column", "column of the baseline is absent"))
            continue
        dtype = snapshot.columns[name]
        if (base_dtype, dtype) == ("int", "float"):
            # pandas writes an int column with nulls as 1.0, 2.0: still numbers, so worth a look, not a stop
            findings.append(_warning(name, "type_mismatch", "baseline has int, found float"))
        elif not _compatible(base_dtype, dtype):
            findings.append(_error(name, "type_mismatch", f"baseline has {base_dtype}, found {dtype}"))
            continue
        base, now = baseline.stats[name], snapshot.stats[name]
        if now.null_rate - base.null_rate > null_rate_tolerance:
            msg = (
                f"null rate rose from {base.null_rate:.1%} to {now.null_rate:.1%} (tolerance {null_rate_tolerance:.1%})"
            )
            findings.append(_error(name, "null_rate", msg))
        if dtype in ("float", "int") and base.min is not None and base.max is not None:
            findings += _baseline_range(name, frame[name], base.min, base.max)
        # a capped baseline domain is incomplete, so "unseen" would be meaningless
        if base.categories is not None and len(base.categories) < CATEGORY_CAP:
            findings += _unseen(name, frame[name], base.categories, snapshot.rows)
    for name in snapshot.columns:
        if name not in baseline.columns:
            findings.append(_warning(name, "extra_column", "column is new since the baseline"))
    return findings


def _baseline_range(name: str, series: pd.Series, lo: float, hi: float) -> list[Finding]:
    slack = RANGE_SLACK * (hi - lo)
    values = series.dropna().astype("float64")
    findings = []
    if below := int((values < lo - slack).sum()):
        msg = f"{below} values below baseline min {lo:g} widened by 10% (min seen {values.min():g})"
        findings.append(_warning(name, "range", msg))
    if above := int((values > hi + slack).sum()):
        msg = f"{above} values above baseline max {hi:g} widened by 10% (max seen {values.max():g})"
        findings.append(_warning(name, "range", msg))
    return findings


def _unseen(name: str, series: pd.Series, known: dict[str, int], rows: int) -> list[Finding]:
    values = series.dropna().astype(str)
    unseen = values[~values.isin(list(known))]
    if unseen.empty:
        return []
    share = len(unseen) / rows
    msg = f"{len(unseen)} values ({share:.1%} of rows) unseen in the baseline ({_examples(unseen)})"
    return [(_error if share > UNSEEN_ERROR_SHARE else _warning)(name, "domain", msg)]


def _label_balance(frame: pd.DataFrame, baseline: Snapshot, label: str, tolerance: float) -> list[Finding]:
    if label not in frame.columns or label not in baseline.columns:
        return []
    now = frame[label].dropna().astype(str).value_counts(normalize=True)
    categories = baseline.stats[label].categories
    if categories is not None:
        base = pd.Series(categories, dtype="float64") / sum(categories.values())
    else:  # numeric label: the stats hold no class counts, so read just that column of the baseline
        base = read_frame(baseline, columns=[label])[label].dropna().astype(str).value_counts(normalize=True)
    classes = sorted(set(now.index) | set(base.index))
    shifts = {c: float(now.get(c, 0.0)) - float(base.get(c, 0.0)) for c in classes}
    # binary labels shift both classes equally: name the one that grew
    worst = max(classes, key=lambda c: (round(abs(shifts[c]), 9), shifts[c]), default=None)
    if worst is None or abs(shifts[worst]) <= tolerance:
        return []
    msg = (
        f"share of class {worst!r} moved from {base.get(worst, 0.0):.1%} to {now.get(worst, 0.0):.1%} "
        f"(tolerance {tolerance:.1%})"
    )
    return [_error(label, "label_balance", msg)]
