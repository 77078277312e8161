from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubeloop.api.validation import FeatureDistance, ValidationReport
from kubeloop.data import validation
from kubeloop.data.bundled import ARRESTS, bundled_path
from kubeloop.data.snapshot import Snapshot, ingest
from kubeloop.data.validation import (
    ColumnSpec,
    DatasetSchema,
    DistanceSpec,
    ValidationFailed,
    infer_schema,
    type_findings,
    validate,
)
from kubeloop.errors import DataError, KubeloopError


def snap(tmp_path: Path, name: str, **columns: list) -> Snapshot:
    path = tmp_path / f"{name}.csv"
    # nullable dtypes, so an int column with nulls is written as 1, not 1.0
    pd.DataFrame(columns).convert_dtypes().to_csv(path, index=False)
    return ingest(str(path))


def people(n: int = 100, yes: int = 50, **overrides: list) -> dict[str, list]:
    columns = {
        "age": [20 + i % 40 for i in range(n)],
        "city": ["Oslo" if i % 2 else "Lima" for i in range(n)],
        "label": ["Yes"] * yes + ["No"] * (n - yes),
    }
    return columns | overrides


SCHEMA = DatasetSchema(
    label="label",
    columns=[
        ColumnSpec(name="age", dtype="float", min=18, max=99),
        ColumnSpec(name="city", dtype="string", categories=["Lima", "Oslo"]),
        ColumnSpec(name="label", dtype="string", categories=["No", "Yes"]),
    ],
)


def rules(report) -> list[tuple[str | None, str, str]]:
    return [(f.column, f.rule, f.severity) for f in report.findings]


def distance(report: ValidationReport, column: str) -> FeatureDistance:
    return next(d for d in report.distances if d.column == column)


def test_bundled_arrests_passes_its_own_schema_and_its_own_baseline() -> None:
    snapshot = ingest(ARRESTS.uri)

    report = validate(snapshot, ARRESTS.schema, snapshot)

    assert report.ok and report.findings == []
    assert report.to_text().splitlines()[0].endswith("OK (0 errors, 0 warnings)")
    assert len(report.distances) == 8 and {d.value for d in report.distances} == {0.0}
    assert {d.column: d.metric for d in report.distances} == {
        "released": "linf",
        "colour": "linf",
        "year": "jensen_shannon",
        "age": "jensen_shannon",
        "sex": "linf",
        "employed": "linf",
        "citizen": "linf",
        "checks": "jensen_shannon",
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_half_of_the_bundled_dataset_passes_against_the_whole(tmp_path: Path, seed: int) -> None:
    frame = pd.read_csv(bundled_path("arrests"))
    frame.sample(frac=0.5, random_state=seed).to_csv(tmp_path / "half.csv", index=False)

    report = validate(ingest(str(tmp_path / "half.csv")), ARRESTS.schema, ingest(ARRESTS.uri))

    assert report.ok and report.findings == []
    assert max(d.value for d in report.distances) < 0.05


def test_two_samples_of_one_distribution_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)

    def sample(name: str) -> Snapshot:
        n = 500
        return snap(
            tmp_path,
            name,
            income=rng.lognormal(3, 0.5, n).round(2).tolist(),
            kind=rng.choice(["a", "b", "c"], n, p=[0.32, 0.5, 0.18]).tolist(),
            label=rng.choice(["Yes", "No"], n).tolist(),
        )

    report = validate(sample("now"), baseline=sample("base"), label="label")

    assert report.ok and report.findings == [], report.to_text()


def test_a_category_mix_shift_is_an_error_with_its_distance(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(city=["Oslo"] * 32 + ["Lima"] * 68))
    shifted = snap(tmp_path, "now", **people(city=["Oslo"] * 89 + ["Lima"] * 11))

    report = validate(shifted, SCHEMA, baseline)

    assert not report.ok
    assert rules(report) == [("city", "drift", "error")]
    assert report.findings[0].message == (
        "L-infinity distance 0.570 above threshold 0.1: share of 'Oslo' 32.0% → 89.0%"
    )
    city = distance(report, "city")
    assert (city.metric, city.threshold, city.severity) == ("linf", 0.1, "error")
    assert city.value == pytest.approx(0.57)
    assert (city.category, city.before, city.after) == ("Oslo", pytest.approx(0.32), pytest.approx(0.89))
    assert "city: linf 0.570 > 0.1 (share of 'Oslo' 32.0% → 89.0%)" in report.to_text()


def test_a_numeric_feature_scaled_by_1_3_is_an_error_with_its_distance(tmp_path: Path) -> None:
    income = np.random.default_rng(3).normal(50, 10, 400).round(3)
    baseline = snap(tmp_path, "base", income=income.tolist())
    scaled = snap(tmp_path, "now", income=(income * 1.3).round(3).tolist())

    report = validate(scaled, baseline=baseline)

    assert ("income", "drift", "error") in rules(report)
    moved = distance(report, "income")
    assert moved.metric == "jensen_shannon" and moved.value > 0.4
    assert (moved.before, moved.after) == (pytest.approx(income.mean()), pytest.approx(income.mean() * 1.3, rel=1e-3))
    drift = next(f for f in report.findings if f.rule == "drift")
    assert drift.message.startswith(f"Jensen-Shannon distance {moved.value:.3f} above threshold 0.2: mean 50")


def test_a_label_flip_is_caught_with_its_distance_when_the_schema_names_the_label(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(yes=30))
    flipped = snap(tmp_path, "now", **people(yes=70))

    report = validate(flipped, SCHEMA, baseline)

    assert rules(report) == [("label", "label_balance", "error")]
    assert report.findings[0].message == (
        "share of class 'Yes' moved from 30.0% to 70.0%: L-infinity distance 0.400 above threshold 0.1"
    )
    assert distance(report, "label").value == pytest.approx(0.4)
    # no label named: the label column is a column like the others, and its drift is still an error
    assert rules(validate(flipped, baseline=baseline)) == [("label", "drift", "error")]
    assert rules(validate(flipped, baseline=baseline, label="label")) == [("label", "label_balance", "error")]
    assert validate(snap(tmp_path, "nudged", **people(yes=33)), SCHEMA, baseline).ok


def test_a_numeric_label_is_compared_by_class_shares(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", x=list(range(100)), y=[1] * 50 + [0] * 50)
    shifted = snap(tmp_path, "shifted", x=list(range(100)), y=[1] * 80 + [0] * 20)

    report = validate(shifted, baseline=baseline, label="y")

    assert rules(report) == [("y", "label_balance", "error")]
    assert (distance(report, "y").metric, distance(report, "y").category) == ("linf", "1")
    # not the label: an int column gets the Jensen-Shannon distance
    assert distance(validate(shifted, baseline=baseline), "y").metric == "jensen_shannon"


def test_a_label_the_data_lacks_is_an_error(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", **people())

    assert rules(validate(snapshot, label="target")) == [("target", "missing_column", "error")]


def test_thresholds_metric_and_severity_per_column_and_schema_wide(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(city=["Oslo"] * 32 + ["Lima"] * 68))
    shifted = snap(tmp_path, "now", **people(city=["Oslo"] * 89 + ["Lima"] * 11))

    def with_city(**update) -> DatasetSchema:
        columns = [c.model_copy(update=update) if c.name == "city" else c for c in SCHEMA.columns]
        return SCHEMA.model_copy(update={"columns": columns})

    loose = validate(shifted, with_city(distance=DistanceSpec(threshold=0.6)), baseline)
    assert loose.ok and loose.findings == [] and distance(loose, "city").threshold == 0.6

    warned = validate(shifted, with_city(distance=DistanceSpec(severity="warning")), baseline)
    assert warned.ok and rules(warned) == [("city", "drift", "warning")]

    ignored = validate(shifted, with_city(distance=DistanceSpec(severity="ignore")), baseline)
    assert ignored.ok and ignored.findings == [] and distance(ignored, "city").value == pytest.approx(0.57)

    schema_wide = SCHEMA.model_copy(update={"categorical_distance": DistanceSpec(threshold=0.6)})
    assert validate(shifted, schema_wide, baseline).ok
    # the column's own setting wins over the schema-wide one
    strict = schema_wide.model_copy(update={"columns": with_city(distance=DistanceSpec(threshold=0.5)).columns})
    assert rules(validate(shifted, strict, baseline)) == [("city", "drift", "error")]


def test_psi_on_request_and_numeric_thresholds_from_the_schema(tmp_path: Path) -> None:
    income = np.random.default_rng(3).normal(50, 10, 400).round(3)
    baseline = snap(tmp_path, "base", income=income.tolist())
    shifted = snap(tmp_path, "now", income=(income + 8).round(3).tolist())
    psi = DatasetSchema(columns=[ColumnSpec(name="income", dtype="float", distance=DistanceSpec(metric="psi"))])
    lenient = DatasetSchema(columns=[ColumnSpec(name="income", dtype="float")], numeric_distance={"threshold": 0.5})

    report = validate(shifted, psi, baseline)
    by_psi = distance(report, "income")

    assert (by_psi.metric, by_psi.threshold) == ("psi", 0.25)
    assert by_psi.value > 0.25 and ("income", "drift", "error") in rules(report)
    drift = next(f for f in report.findings if f.rule == "drift")
    assert drift.message.startswith(f"PSI {by_psi.value:.3f} above threshold 0.25: mean 50.34 → 58.34")
    assert not validate(shifted, baseline=baseline).ok
    assert validate(shifted, lenient, baseline).ok


def test_numeric_distance_metrics_need_a_numeric_column() -> None:
    with pytest.raises(ValueError, match=r"distance\.metric jensen_shannon needs an int or float column, city is"):
        ColumnSpec(name="city", dtype="string", distance=DistanceSpec(metric="jensen_shannon"))
    with pytest.raises(ValueError, match=r"categoricalDistance\.metric must be linf, not psi"):
        DatasetSchema(columns=[], categorical_distance=DistanceSpec(metric="psi"))


def test_a_numeric_column_with_stray_strings_is_an_error_naming_count_and_examples(tmp_path: Path) -> None:
    temperature = [str(20 + i % 10) for i in range(97)] + ["?", "12,5", "?"]
    snapshot = snap(tmp_path, "p", temperature=temperature, note=[f"n{i}" for i in range(100)])

    report = validate(snapshot)

    assert rules(report) == [("temperature", "mixed_type", "error")]
    assert report.findings[0].message.startswith(
        "3 of 100 values do not parse as numbers ('12,5', '?'), so the column was read as text"
    )
    assert type_findings(snapshot) == report.findings


def test_a_declared_schema_decides_the_type_of_a_column_with_stray_strings(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", temperature=[str(20 + i % 10) for i in range(98)] + ["?", "12,5"])
    as_float = DatasetSchema(columns=[ColumnSpec(name="temperature", dtype="float")])
    as_text = DatasetSchema(columns=[ColumnSpec(name="temperature", dtype="string")])

    report = validate(snapshot, as_float)

    assert [str(f) for f in report.findings] == [
        "ERROR  temperature  type_mismatch: declared float, found string: "
        "2 of 100 values do not parse as numbers ('12,5', '?')"
    ]
    assert validate(snapshot, as_text).ok and validate(snapshot, as_text).findings == []


def test_type_findings_work_on_a_plain_frame() -> None:
    frame = pd.DataFrame({"x": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "n/a"], "y": [None] * 10})

    assert [(f.column, f.rule, f.severity) for f in type_findings(frame)] == [
        ("x", "mixed_type", "error"),
        ("y", "all_null", "warning"),
    ]


def test_all_null_and_constant_columns_with_severities_from_the_schema(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", **people(), empty=[None] * 100, same=["x"] * 100, one=[None] + [7] * 99)
    declared = [
        ColumnSpec(name="empty", dtype="float", nullable=True, on_all_null="error"),
        ColumnSpec(name="same", dtype="string", on_constant="ignore"),
        ColumnSpec(name="one", dtype="int", nullable=True),
    ]
    schema = DatasetSchema(columns=[*SCHEMA.columns, *declared], on_constant="error")

    default = validate(snapshot)
    declared_report = validate(snapshot, schema)

    assert rules(default) == [
        ("empty", "all_null", "warning"),
        ("same", "constant", "warning"),
        ("one", "constant", "warning"),
    ]
    assert default.ok
    assert default.findings[1].message == (
        "every non-null value is 'x': the column carries no information (severity: onConstant)"
    )
    assert rules(declared_report) == [("empty", "all_null", "error"), ("one", "constant", "error")]


def test_a_snapshot_passes_its_inferred_schema(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", **people(), score=[None] + [i / 100 for i in range(99)])
    schema = infer_schema(snapshot)

    assert validate(snapshot, schema).findings == []
    assert [c.name for c in schema.columns] == ["age", "city", "label", "score"]
    assert schema.columns[3].nullable and not schema.columns[0].nullable
    assert (schema.columns[0].min, schema.columns[0].max) == (20, 59)


def test_a_clean_table_passes_the_declared_schema(tmp_path: Path) -> None:
    assert validate(snap(tmp_path, "p", **people()), SCHEMA).ok


def test_missing_column_is_an_error_naming_it(tmp_path: Path) -> None:
    columns = people()
    del columns["age"]

    report = validate(snap(tmp_path, "p", **columns), SCHEMA)

    assert not report.ok
    assert rules(report) == [("age", "missing_column", "error")]
    with pytest.raises(ValidationFailed, match="ERROR  age  missing_column: declared column is absent") as err:
        raise ValidationFailed(report)
    assert err.value.report is report
    assert isinstance(err.value, KubeloopError)


def test_a_word_in_a_numeric_column_is_a_type_mismatch(tmp_path: Path) -> None:
    report = validate(snap(tmp_path, "p", **people(age=["twelve", *range(20, 119)])), SCHEMA)

    assert rules(report) == [("age", "type_mismatch", "error")]
    assert str(report.findings[0]) == (
        "ERROR  age  type_mismatch: declared float, found string: 1 of 100 values do not parse as numbers ('twelve')"
    )


def test_int_data_is_fine_where_float_is_declared_but_not_the_reverse(tmp_path: Path) -> None:
    schema = DatasetSchema(columns=[ColumnSpec(name="x", dtype="int")])
    assert validate(snap(tmp_path, "i", x=[1, 2]), schema).ok
    report = validate(snap(tmp_path, "f", x=[1.5, 2.0]), schema)
    assert rules(report) == [("x", "type_mismatch", "error")]
    assert report.findings[0].message == "declared int, found float: 1 of 2 values are not whole numbers ('1.5')"


def test_values_outside_the_declared_range_are_counted(tmp_path: Path) -> None:
    report = validate(snap(tmp_path, "p", **people(age=[12, 15, 16, 120] + [30] * 96)), SCHEMA)

    assert report.to_text().splitlines()[1:] == [
        "ERROR  age  range: 3 values below declared min 18 (min seen 12)",
        "ERROR  age  range: 1 values above declared max 99 (max seen 120)",
    ]


def test_values_outside_the_declared_categories(tmp_path: Path) -> None:
    report = validate(snap(tmp_path, "p", **people(city=["Rome", "Rome", "Bern"] + ["Oslo"] * 97)), SCHEMA)

    assert rules(report) == [("city", "domain", "error")]
    assert report.findings[0].message == "3 values outside declared categories ('Bern', 'Rome')"


def test_null_rates_against_nullable_and_max_null_rate(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", a=[None, 1, 2, 3], b=[None, 1, 2, 3], c=[None, None, 2, 3])
    schema = DatasetSchema(
        columns=[
            ColumnSpec(name="a", dtype="int"),
            ColumnSpec(name="b", dtype="int", nullable=True),
            ColumnSpec(name="c", dtype="int", max_null_rate=0.3),
        ]
    )

    report = validate(snapshot, schema)

    assert [str(f) for f in report.findings] == [
        "ERROR  a  null_rate: 25.0% nulls, column is not nullable",
        "ERROR  c  null_rate: 50.0% nulls, above declared max 30.0%",
    ]


def test_extra_columns_are_errors_unless_allowed(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", **people(), note=[f"n{i}" for i in range(100)])

    assert rules(validate(snapshot, SCHEMA)) == [("note", "extra_column", "error")]
    assert validate(snapshot, SCHEMA.model_copy(update={"allow_extra_columns": True})).ok


def test_drift_against_the_baseline(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(), gone=list(range(100)), kind=list(range(100)))
    current = snap(
        tmp_path,
        "now",
        age=[20 + i % 40 for i in range(99)] + [70],  # baseline 20..59, widened: 16.1..62.9
        city=["Oslo"] * 95 + ["Rome"] * 5,
        label=["Yes"] * 50 + ["No"] * 50,
        kind=[f"k{i}" for i in range(100)],
        new=list(range(100)),
    )

    report = validate(current, baseline=baseline)

    assert rules(report) == [
        ("age", "range", "warning"),
        ("city", "domain", "error"),
        ("city", "drift", "error"),
        ("gone", "missing_column", "error"),
        ("kind", "type_mismatch", "error"),
        ("new", "extra_column", "warning"),
    ]
    assert report.findings[0].message == "1 values above baseline max 59 widened by 10% (max seen 70)"
    assert report.findings[1].message == "5 values (5.0% of rows) unseen in the baseline ('Rome')"
    assert report.findings[2].message == "L-infinity distance 0.500 above threshold 0.1: share of 'Lima' 50.0% → 0.0%"
    assert report.findings[4].message == (
        "baseline has int, found string: 100 of 100 values do not parse as numbers ('k0', 'k1', 'k10', 'k11', 'k12', …)"
    )
    assert [d.column for d in report.distances] == ["age", "city", "label"]


def test_rare_unseen_categories_and_small_null_increases_are_warnings_or_nothing(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(n=200, yes=100))
    city = ["Oslo" if i % 2 else "Lima" for i in range(199)] + ["Rome"]
    age = [None] * 9 + [20 + i % 40 for i in range(191)]
    current = snap(tmp_path, "now", **people(n=200, yes=100, city=city, age=age))

    assert rules(validate(current, baseline=baseline)) == [("city", "domain", "warning")]
    nulls = rules(validate(current, baseline=baseline, null_rate_tolerance=0.04))
    assert ("age", "null_rate", "error") in nulls


def test_int_turning_float_against_the_baseline_is_a_warning(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", x=list(range(100)))
    current = snap(tmp_path, "now", x=[0.5, *range(1, 100)])

    assert rules(validate(current, baseline=baseline)) == [("x", "type_mismatch", "warning")]
    assert validate(baseline, baseline=current).ok


def test_schema_loads_from_yaml_with_camel_case_or_snake_case(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(
        "label: y\nallowExtraColumns: true\nonConstant: error\n"
        "numericDistance: {metric: psi, threshold: 0.3}\n"
        "categoricalDistance: {severity: warning}\n"
        "columns:\n"
        "  - {name: a, dtype: float, maxNullRate: 0.2, min: 0, onAllNull: ignore,"
        " distance: {metric: jensen_shannon, threshold: 0.15, severity: warning}}\n"
        "  - {name: b, dtype: string, max_null_rate: 0.1, categories: [x, y], on_constant: warning}\n"
    )

    schema = DatasetSchema.from_yaml(path)

    assert schema.allow_extra_columns and schema.label == "y" and schema.on_constant == "error"
    assert [c.max_null_rate for c in schema.columns] == [0.2, 0.1]
    assert schema.columns[0].distance == DistanceSpec(metric="jensen_shannon", threshold=0.15, severity="warning")
    assert (schema.columns[0].on_all_null, schema.columns[1].on_constant) == ("ignore", "warning")
    assert schema.numeric_distance == DistanceSpec(metric="psi", threshold=0.3)
    assert schema.model_dump(by_alias=True)["allowExtraColumns"] is True
    path.write_text("columns:\n  - {name: a, dtype: decimal}\n")
    with pytest.raises(DataError, match=r"invalid dataset schema .*schema.yaml: columns\.0\.dtype: Input should"):
        DatasetSchema.from_yaml(path)
    path.write_text("columns:\n  - {name: a, dtype: string, distance: {metric: psi}}\n")
    with pytest.raises(DataError, match=r"columns\.0: Value error, distance\.metric psi needs an int or float"):
        DatasetSchema.from_yaml(path)


def test_the_schema_example_in_the_module_docs_loads(tmp_path: Path) -> None:
    example = validation.__doc__.split("::\n", 1)[1].split("\n\n")[0]
    (tmp_path / "schema.yaml").write_text(textwrap.dedent(example))

    schema = DatasetSchema.from_yaml(tmp_path / "schema.yaml")

    assert [c.name for c in schema.columns] == ["colour", "age", "note"] and schema.label == "released"


def test_report_serializes_in_camel_case_reads_back_and_the_failure_survives_pickling(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(yes=50))
    report = validate(snap(tmp_path, "shifted", **people(yes=70)), SCHEMA, baseline)

    data = json.loads(report.to_json())
    assert data["ok"] is False and data["baselineDigest"] == baseline.digest
    assert data["findings"][0]["rule"] == "label_balance"
    assert data["distances"][2] == {
        "column": "label",
        "metric": "linf",
        "value": pytest.approx(0.2),
        "threshold": 0.1,
        "severity": "error",
        "category": "Yes",
        "before": 0.5,
        "after": 0.7,
    }
    assert ValidationReport.model_validate_json(report.to_json()) == report
    restored = pickle.loads(pickle.dumps(ValidationFailed(report)))
    assert restored.report == report and str(restored) == str(report.findings[0])


def test_a_distance_above_an_error_threshold_fails_the_report_by_itself() -> None:
    over = FeatureDistance(column="x", metric="linf", value=0.3, threshold=0.1, severity="error")

    assert not ValidationReport(snapshot_digest="sha256:a", distances=[over]).ok
    assert ValidationReport(snapshot_digest="sha256:a", distances=[over.model_copy(update={"severity": "warning"})]).ok
