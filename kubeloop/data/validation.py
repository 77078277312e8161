"""Validate a snapshot: column types, a declared schema, and drift from a baseline snapshot.

Against a baseline every column shared by both gets a distance between its two distributions, as TFDV does:

- string and bool columns: the L-infinity distance between category shares (the largest change in the share of
  one category, in [0, 1]);
- int and float columns: the Jensen-Shannon distance (``scipy.spatial.distance.jensenshannon``, base 2, in
  [0, 1]) between histograms whose bins are fixed from the baseline: one per distinct baseline value when it has
  at most ``BINS + 1`` of them, else one per baseline decile; plus one bin below the baseline's min and one above
  its max. PSI over the same bins on request.

Nulls are left out of the distributions (the null rate has its own check). A distance above its threshold is a
finding (rule ``drift``) of the configured severity. The label column (the ``label`` argument, else the schema's)
is compared by class shares (L-infinity, rule ``label_balance``) unless it is a float column or its column spec
names another metric; when no label is known it is compared like any other column.

Default thresholds (``DEFAULT_THRESHOLDS``): linf 0.1, jensen_shannon 0.2, psi 0.25. Between two versions of 300
rows drawn from one distribution, sampling noise alone keeps the L-infinity distance of a two-category column
under 0.1 in about 99% of cases and the Jensen-Shannon distance under 0.18; a category share moving by more than
10 points, or a positive feature scaled by 1.3 (Jensen-Shannon 0.4 and more), is an error. Smaller data is
noisier: raise the thresholds in the schema.

The schema (YAML, camelCase or snake_case keys)::

    label: released
    allowExtraColumns: false
    onAllNull: warning              # an all-null column: error | warning | ignore (default warning)
    onConstant: warning             # a column with one distinct value: error | warning | ignore
    categoricalDistance: {threshold: 0.1, severity: error}             # string/bool columns (metric linf)
    numericDistance: {metric: jensen_shannon, threshold: 0.2, severity: error}  # or metric psi
    columns:
      - {name: colour, dtype: string, categories: [Black, White], distance: {threshold: 0.2, severity: warning}}
      - {name: age, dtype: int, min: 12, max: 100, maxNullRate: 0.01, distance: {metric: psi}}
      - {name: note, dtype: string, nullable: true, onAllNull: ignore, onConstant: error}

A column's ``distance`` wins over the schema-wide setting field by field (a metric set without a threshold gets
that metric's default); ``severity: ignore`` keeps the distance in the report without a finding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from scipy.spatial.distance import jensenshannon

from kubeloop.api.validation import (
    METRIC_NAMES,
    FeatureDistance,
    Finding,
    Metric,
    Policy,
    Rule,
    Severity,
    ValidationReport,
)
from kubeloop.data.column_checks import (
    NUMERIC,
    against_schema,
    baseline_range,
    compatible,
    finding,
    mixed_type,
    type_detail,
    uninformative,
    unseen,
)
from kubeloop.data.snapshot import CATEGORY_CAP, Dtype, Snapshot, dtype_of, read_frame
from kubeloop.errors import DataError, KubeloopError

__all__ = [
    "ColumnSpec",
    "DatasetSchema",
    "DistanceSpec",
    "FeatureDistance",
    "Finding",
    "Rule",
    "Severity",
    "ValidationFailed",
    "ValidationReport",
    "infer_schema",
    "type_findings",
    "validate",
]

BINS = 10  # histogram bins between the baseline's min and max, for the numeric distances
DEFAULT_THRESHOLDS: dict[Metric, float] = {"linf": 0.1, "jensen_shannon": 0.2, "psi": 0.25}
_PSI_FLOOR = 1e-4  # empty bins count as this share, or PSI would be infinite


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class DistanceSpec(_Model):
    """How a column's distance to the baseline is measured and judged; unset fields fall back to the defaults."""

    metric: Metric | None = None
    threshold: float | None = Field(default=None, ge=0)
    severity: Policy | None = None


class ColumnSpec(_Model):
    name: str
    dtype: Dtype
    nullable: bool = False
    # when set, nulls are allowed up to this share of rows whatever `nullable` says
    max_null_rate: float | None = Field(default=None, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None
    distance: DistanceSpec | None = None
    # severity of an all-null or constant column; unset: the schema's onAllNull / onConstant
    on_all_null: Policy | None = None
    on_constant: Policy | None = None

    @model_validator(mode="after")
    def _metric_fits_dtype(self) -> ColumnSpec:
        if self.distance and self.distance.metric not in (None, "linf") and self.dtype not in NUMERIC:
            raise ValueError(
                f"distance.metric {self.distance.metric} needs an int or float column, {self.name} is {self.dtype}: "
                "use linf"
            )
        return self


class DatasetSchema(_Model):
    columns: list[ColumnSpec]
    label: str | None = None
    allow_extra_columns: bool = False
    categorical_distance: DistanceSpec = Field(default_factory=DistanceSpec)
    numeric_distance: DistanceSpec = Field(default_factory=DistanceSpec)
    on_all_null: Policy = "warning"
    on_constant: Policy = "warning"

    @model_validator(mode="after")
    def _categorical_is_linf(self) -> DatasetSchema:
        if self.categorical_distance.metric not in (None, "linf"):
            raise ValueError(f"categoricalDistance.metric must be linf, not {self.categorical_distance.metric}")
        return self

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

    def column(self, name: str) -> ColumnSpec | None:
        return next((spec for spec in self.columns if spec.name == name), None)


_DEFAULT_SCHEMA = DatasetSchema(columns=[], allow_extra_columns=True)


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
    null_rate_tolerance: float = 0.05,
) -> ValidationReport:
    """Check the snapshot's types, then against the declared schema and/or the baseline snapshot.

    The label (``label``, else the schema's) must be a column; with a baseline its class shares are compared.
    """
    findings: list[Finding] = []
    distances: list[FeatureDistance] = []
    label = label or (schema.label if schema else None)
    if snapshot.rows == 0:
        findings.append(finding("error", None, "empty", "the snapshot has no rows"))
    else:
        frame = read_frame(snapshot)
        findings += type_findings(frame, schema)
        if schema is not None:
            findings += against_schema(frame, schema)
        if label and label not in frame.columns and not (schema and schema.column(label)):
            findings.append(finding("error", label, "missing_column", "the label column is absent from the data"))
        if baseline is not None:
            skip = {f.column for f in findings if f.rule in ("type_mismatch", "mixed_type") and f.severity == "error"}
            found, distances = _against_baseline(
                frame, baseline, schema or _DEFAULT_SCHEMA, label, null_rate_tolerance, skip
            )
            findings += found
    return ValidationReport(
        snapshot_digest=snapshot.digest,
        baseline_digest=baseline.digest if baseline else None,
        findings=findings,
        distances=distances,
    )


def type_findings(data: pd.DataFrame | Snapshot, schema: DatasetSchema | None = None) -> list[Finding]:
    """Findings about column types that would otherwise go unnoticed; part of `validate`, usable on its own.

    - ``mixed_type`` (error): a string column whose non-null values mostly (``column_checks.MOSTLY_NUMERIC``) parse
      as numbers but a few do not, e.g. ``?`` or ``12,5``: a numeric column that was read as text. A column the schema
      declares follows the schema instead: ``type_mismatch`` (error) when the declared dtype does not fit,
      with the count and examples of the values that do not.
    - ``all_null`` and ``constant``: a column with only nulls, or one distinct non-null value; severity from the
      column's ``onAllNull`` / ``onConstant``, else the schema's, else warning (``ignore``: no finding).
    """
    frame = read_frame(data) if isinstance(data, Snapshot) else data
    schema = schema or _DEFAULT_SCHEMA
    findings: list[Finding] = []
    for name in frame.columns:
        series, spec = frame[name], schema.column(name)
        actual = dtype_of(series)
        if spec is not None and not compatible(spec.dtype, actual):
            mismatch = f"declared {spec.dtype}, found {actual}{type_detail(spec.dtype, series)}"
            findings.append(finding("error", name, "type_mismatch", mismatch))
        elif spec is None and actual == "string":
            findings += mixed_type(name, series)
        findings += uninformative(name, series, spec, schema)
    return findings


def _against_baseline(
    frame: pd.DataFrame,
    baseline: Snapshot,
    schema: DatasetSchema,
    label: str | None,
    null_rate_tolerance: float,
    skip: set[str | None],
) -> tuple[list[Finding], list[FeatureDistance]]:
    """Findings against the baseline, and every shared column's distance; `skip`: columns whose type is wrong."""
    shared = [name for name in baseline.columns if name in frame.columns]
    base_frame = read_frame(baseline, columns=shared)
    findings, distances = [], []
    for name, base_dtype in baseline.columns.items():
        if name not in frame.columns:
            findings.append(finding("error", name, "missing_column", "column of the baseline is absent"))
            continue
        if name in skip:
            continue
        series = frame[name]
        dtype = dtype_of(series)
        if (base_dtype, dtype) == ("int", "float"):
            # pandas writes an int column with nulls as 1.0, 2.0: still numbers, so worth a look, not a stop
            findings.append(finding("warning", name, "type_mismatch", "baseline has int, found float"))
        elif not compatible(base_dtype, dtype):
            msg = f"baseline has {base_dtype}, found {dtype}{type_detail(base_dtype, series)}"
            findings.append(finding("error", name, "type_mismatch", msg))
            continue
        base = baseline.stats[name]
        null_rate = float(series.isna().mean())
        if null_rate - base.null_rate > null_rate_tolerance:
            msg = f"null rate rose from {base.null_rate:.1%} to {null_rate:.1%} (tolerance {null_rate_tolerance:.1%})"
            findings.append(finding("error", name, "null_rate", msg))
        if dtype in NUMERIC and base.min is not None and base.max is not None:
            findings += baseline_range(name, series, base.min, base.max)
        # a capped baseline domain is incomplete, so "unseen" would be meaningless
        if base.categories is not None and len(base.categories) < CATEGORY_CAP:
            findings += unseen(name, series, base.categories)
        distance = _distance(name, base_frame[name], series, schema, is_label=name == label)
        if distance is not None:
            distances.append(distance)
            findings += _drifted(distance, is_label=name == label)
    for name in frame.columns:
        if name not in baseline.columns:
            findings.append(finding("warning", name, "extra_column", "column is new since the baseline"))
    return findings, distances


def _rule_for(name: str, dtype: Dtype, schema: DatasetSchema, is_label: bool) -> tuple[Metric, float, Policy]:
    """The metric, threshold and severity for one column: its spec, else the schema's defaults, else ours."""
    own = (spec.distance if (spec := schema.column(name)) else None) or DistanceSpec()
    numeric = dtype in NUMERIC
    kind = schema.numeric_distance if numeric else schema.categorical_distance
    # a label is a set of classes unless it is a float (a regression target)
    default_metric: Metric = "linf" if not numeric or (is_label and dtype == "int") else "jensen_shannon"
    metric = own.metric or (None if is_label else kind.metric) or default_metric
    threshold = own.threshold
    if threshold is None:
        kind_metric = kind.metric or ("jensen_shannon" if numeric else "linf")
        threshold = kind.threshold if kind.threshold is not None and kind_metric == metric else None
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[metric]
    return metric, threshold, own.severity or kind.severity or "error"


def _distance(
    name: str, base: pd.Series, now: pd.Series, schema: DatasetSchema, is_label: bool
) -> FeatureDistance | None:
    dtype = dtype_of(base)
    metric, threshold, severity = _rule_for(name, dtype, schema, is_label)
    base, now = base.dropna(), now.dropna()
    if base.empty or now.empty:
        return None
    rule = {"column": name, "metric": metric, "threshold": threshold, "severity": severity}
    if metric == "linf":
        before = _class_values(base).value_counts(normalize=True)
        after = _class_values(now).value_counts(normalize=True)
        shifts = after.sub(before, fill_value=0.0)
        # two classes move by the same amount: name the one that grew
        category = max(shifts.index, key=lambda c: (round(abs(shifts[c]), 9), shifts[c], str(c)))
        return FeatureDistance(
            **rule,
            value=abs(float(shifts[category])),
            category=category,
            before=float(before.get(category, 0.0)),
            after=float(after.get(category, 0.0)),
        )
    base_values, now_values = base.astype("float64").to_numpy(), now.astype("float64").to_numpy()
    edges = _bin_edges(base_values)
    p, q = _histogram(base_values, edges), _histogram(now_values, edges)
    if metric == "psi":
        a, b = np.maximum(p, _PSI_FLOOR), np.maximum(q, _PSI_FLOOR)
        value = float(np.sum((b - a) * np.log(b / a)))
    else:
        value = float(np.nan_to_num(jensenshannon(p, q, base=2)))
    return FeatureDistance(
        **rule, value=max(value, 0.0), before=float(base_values.mean()), after=float(now_values.mean())
    )


def _class_values(series: pd.Series) -> pd.Series:
    """Values as class names: numbers that are whole read the same from an int and a float column (1, not 1.0)."""
    if dtype_of(series) in NUMERIC:
        numbers = series.astype("float64")
        if (numbers == numbers.round()).all():
            return numbers.astype("int64").astype(str)
        return numbers.astype(str)
    return series.astype(str)


def _bin_edges(base: np.ndarray) -> np.ndarray:
    """Bin edges from the baseline: its distinct values when few, else its deciles; the max gets its own bin."""
    distinct = np.unique(base)
    inner = distinct if len(distinct) <= BINS + 1 else np.unique(np.quantile(base, np.linspace(0, 1, BINS + 1)))
    return np.append(inner, np.nextafter(inner[-1], np.inf))


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shares per bin: below the first edge, [edge i, edge i+1) for each, at or above the last edge."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / counts.sum()


def _drifted(distance: FeatureDistance, is_label: bool) -> list[Finding]:
    if not distance.exceeded or distance.severity == "ignore":
        return []
    judged = f"{METRIC_NAMES[distance.metric]} {distance.value:.3f} above threshold {distance.threshold:g}"
    if is_label and distance.metric == "linf":
        moved = f"share of class {distance.category!r} moved from {distance.before:.1%} to {distance.after:.1%}"
        return [finding(distance.severity, distance.column, "label_balance", f"{moved}: {judged}")]
    return [finding(distance.severity, distance.column, "drift", f"{judged}: {distance.moved()}")]
