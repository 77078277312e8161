from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import pytest

from kubeloop.data.bundled import ARRESTS
from kubeloop.data.snapshot import Snapshot, ingest
from kubeloop.data.validation import (
    ColumnSpec,
    DatasetSchema,
    ValidationFailed,
    infer_schema,
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


def test_bundled_arrests_passes_its_own_schema_and_its_own_baseline() -> None:
    snapshot = ingest(ARRESTS.uri)

    report = validate(snapshot, ARRESTS.schema, snapshot)

    assert report.ok and report.findings == []
    assert report.to_text().endswith("OK (0 errors, 0 warnings)")


def test_a_snapshot_passes_its_inferred_schema(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, "p", **people(), score=[None] + [0.5] * 99)
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


def test_a_string_in_a_numeric_column_is_a_type_mismatch(tmp_path: Path) -> None:
    report = validate(snap(tmp_path, "p", **people(age=["twelve", *range(20, 119)])), SCHEMA)

    assert rules(report) == [("age", "type_mismatch", "error")]
    assert str(report.findings[0]) == "ERROR  age  type_mismatch: declared float, found string (e.g. 'twelve')"


def test_int_data_is_fine_where_float_is_declared_but_not_the_reverse(tmp_path: Path) -> None:
    schema = DatasetSchema(columns=[ColumnSpec(name="x", dtype="int")])
    assert validate(snap(tmp_path, "i", x=[1, 2]), schema).ok
    assert rules(validate(snap(tmp_path, "f", x=[1.5, 2.0]), schema)) == [("x", "type_mismatch", "error")]


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
    snapshot = snap(tmp_path, "p", **people(), note=["x"] * 100)

    assert rules(validate(snapshot, SCHEMA)) == [("note", "extra_column", "error")]
    assert validate(snapshot, SCHEMA.model_copy(update={"allow_extra_columns": True})).ok


def test_label_balance_shift_is_an_error(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(yes=50))
    shifted = snap(tmp_path, "shifted", **people(yes=70))
    nudged = snap(tmp_path, "nudged", **people(yes=53))

    report = validate(shifted, SCHEMA, baseline)

    assert rules(report) == [("label", "label_balance", "error")]
    assert "moved from 50.0% to 70.0% (tolerance 10.0%)" in report.findings[0].message
    assert validate(nudged, SCHEMA, baseline).ok
    assert validate(shifted, baseline=baseline).ok  # no label known: nothing to compare
    assert not validate(shifted, baseline=baseline, label="label").ok
    assert validate(shifted, SCHEMA, baseline, balance_tolerance=0.25).ok


def test_a_numeric_label_is_compared_too(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", x=list(range(100)), y=[1] * 50 + [0] * 50)
    shifted = snap(tmp_path, "shifted", x=list(range(100)), y=[1] * 80 + [0] * 20)

    assert rules(validate(shifted, baseline=baseline, label="y")) == [("y", "label_balance", "error")]


def test_drift_against_the_baseline(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(), gone=[1] * 100, kind=[1] * 100)
    current = snap(
        tmp_path,
        "now",
        age=[20 + i % 40 for i in range(99)] + [70],  # baseline 20..59, widened: 16.1..62.9
        city=["Oslo"] * 95 + ["Rome"] * 5,
        label=["Yes"] * 50 + ["No"] * 50,
        kind=["one"] * 100,
        new=[None] * 100,
    )

    report = validate(current, baseline=baseline)

    assert rules(report) == [
        ("age", "range", "warning"),
        ("city", "domain", "error"),
        ("gone", "missing_column", "error"),
        ("kind", "type_mismatch", "error"),
        ("new", "extra_column", "warning"),
    ]
    assert report.findings[0].message == "1 values above baseline max 59 widened by 10% (max seen 70)"
    assert report.findings[1].message == "5 values (5.0% of rows) unseen in the baseline ('Rome')"


def test_rare_unseen_categories_and_small_null_increases_are_warnings_or_nothing(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(n=200, yes=100))
    city = ["Oslo"] * 199 + ["Rome"]
    age = [None] * 9 + [30] * 191
    current = snap(tmp_path, "now", **people(n=200, yes=100, city=city, age=age))

    assert rules(validate(current, baseline=baseline)) == [("city", "domain", "warning")]
    nulls = rules(validate(current, baseline=baseline, null_rate_tolerance=0.04))
    assert ("age", "null_rate", "error") in nulls


def test_int_turning_float_against_the_baseline_is_a_warning(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", x=[1, 2, 3])
    current = snap(tmp_path, "now", x=[1.5, 2.0, 3.0])

    assert rules(validate(current, baseline=baseline)) == [("x", "type_mismatch", "warning")]
    assert validate(baseline, baseline=current).ok


def test_schema_loads_from_yaml_with_camel_case_or_snake_case(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(
        "label: y\nallowExtraColumns: true\ncolumns:\n"
        "  - {name: a, dtype: float, maxNullRate: 0.2, min: 0}\n"
        "  - {name: b, dtype: string, max_null_rate: 0.1, categories: [x, y]}\n"
    )

    schema = DatasetSchema.from_yaml(path)

    assert schema.allow_extra_columns and schema.label == "y"
    assert [c.max_null_rate for c in schema.columns] == [0.2, 0.1]
    assert schema.model_dump(by_alias=True)["allowExtraColumns"] is True
    path.write_text("columns:\n  - {name: a, dtype: decimal}\n")
    with pytest.raises(DataError, match=r"invalid dataset schema .*schema.yaml: columns\.0\.dtype: Input should"):
        DatasetSchema.from_yaml(path)


def test_report_serializes_and_the_failure_survives_pickling(tmp_path: Path) -> None:
    baseline = snap(tmp_path, "base", **people(yes=50))
    report = validate(snap(tmp_path, "shifted", **people(yes=70)), SCHEMA, baseline)

    data = json.loads(report.to_json())
    assert data["ok"] is False and data["baseline_digest"] == baseline.digest
    assert data["findings"][0]["rule"] == "label_balance"
    restored = pickle.loads(pickle.dumps(ValidationFailed(report)))
    assert restored.report == report and str(restored) == str(report.findings[0])
