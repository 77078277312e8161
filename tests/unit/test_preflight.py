from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kubeloop.api.trainingjob import TrainingJob
from kubeloop.config import registry_dir
from kubeloop.data.snapshot import Snapshot, ingest
from kubeloop.errors import SpecError
from kubeloop.training.preflight import PreflightFailed, preflight


def make_job(task: str | None = None, workers: int = 2, test_fraction: float = 0.2, **dataset: Any) -> TrainingJob:
    dataset = {"uri": "data.csv", "label": "target"} | dataset
    if task in (None, "binary"):
        dataset.setdefault("positiveClass", "yes")
    spec: dict[str, Any] = {
        "model": {"name": "demo"},
        "dataset": dataset,
        "workers": {"replicas": workers},
        "hyperparameters": {"testFraction": test_fraction, "seed": 3},
    }
    if task is not None:
        spec["task"] = task
    return TrainingJob.model_validate({"metadata": {"name": "demo"}, "spec": spec})


def snap(tmp_path: Path, **columns: list) -> Snapshot:
    path = tmp_path / "data.csv"
    pd.DataFrame(columns).to_csv(path, index=False)
    return ingest(str(path))


def rows(n: int = 30, target: list | None = None, **overrides: list) -> dict[str, list]:
    columns = {
        "age": [20 + i % 40 for i in range(n)],
        "city": ["Oslo", "Lima", "Pune"] * (n // 3) + ["Oslo"] * (n % 3),
        "target": target if target is not None else ["yes" if i % 3 == 0 else "no" for i in range(n)],
    }
    return columns | overrides


def problems(job: TrainingJob, snapshot: Snapshot) -> list[str]:
    with pytest.raises(PreflightFailed) as failed:
        preflight(job, snapshot)
    assert not registry_dir().exists()
    return failed.value.problems


def only_problem(job: TrainingJob, snapshot: Snapshot) -> str:
    found = problems(job, snapshot)
    assert len(found) == 1, found
    return found[0]


def test_a_job_that_fits_its_data_passes(tmp_path: Path) -> None:
    preflight(make_job(sliceColumn="city"), snap(tmp_path, **rows()))
    arrests = TrainingJob.model_validate(
        {
            "metadata": {"name": "arrests-mlp"},
            "spec": {
                "model": {"name": "arrests"},
                "dataset": {
                    "uri": "bundled://arrests",
                    "label": "released",
                    "positiveClass": "Yes",
                    "sliceColumn": "colour",
                },
            },
        }
    )
    preflight(arrests, ingest("bundled://arrests"))


def test_a_label_that_is_not_a_column_names_the_columns_and_the_close_match(tmp_path: Path) -> None:
    message = only_problem(make_job(label="Target"), snap(tmp_path, **rows()))

    assert message.startswith("spec.dataset.label: the data has no column 'Target'; did you mean 'target'?")
    assert "'age', 'city', 'target'" in message


def test_label_nulls_are_counted(tmp_path: Path) -> None:
    target = ["yes" if i % 3 == 0 else "no" for i in range(30)]
    target[4] = target[7] = None

    message = only_problem(make_job(), snap(tmp_path, **rows(target=target)))

    assert message == "spec.dataset.label: column 'target' has 2 nulls in 30 rows: drop or fill those rows"


def test_three_classes_with_task_binary_suggest_multiclass(tmp_path: Path) -> None:
    target = ["a"] * 12 + ["b"] * 10 + ["c"] * 8

    message = only_problem(make_job(positiveClass="a"), snap(tmp_path, **rows(target=target)))

    assert message.startswith("spec.task: binary (the default), but label column 'target' holds 3 classes")
    assert "'a' (12 rows), 'b' (10 rows), 'c' (8 rows)" in message
    assert "set spec.task: multiclass and remove spec.dataset.positiveClass" in message


def test_many_label_values_are_listed_with_their_count(tmp_path: Path) -> None:
    target = [f"k{i % 7}" for i in range(35)]

    message = only_problem(make_job(task="binary", positiveClass="k1"), snap(tmp_path, **rows(35, target=target)))

    assert message.startswith("spec.task: binary, but label column 'target' holds 7 classes")
    assert "… 7 values in all" in message


def test_a_positive_class_not_in_the_data_lists_the_values(tmp_path: Path) -> None:
    message = only_problem(make_job(positiveClass="maybe"), snap(tmp_path, **rows()))

    assert message == (
        "spec.dataset.positiveClass: 'maybe' is not a value of label column 'target' "
        "(it holds 'no' (20 rows), 'yes' (10 rows))"
    )


@pytest.mark.parametrize(
    ("written", "target", "spelled"),
    [
        (1, [1.0 if i % 3 == 0 else 0.0 for i in range(30)], "'1.0'"),
        ("Yes", ["yes" if i % 3 == 0 else "no" for i in range(30)], "'yes'"),
        ("yse", ["yes" if i % 3 == 0 else "no" for i in range(30)], "'yes'"),
    ],
)
def test_a_positive_class_spelled_differently_names_the_spelling_of_the_data(
    tmp_path: Path, written: Any, target: list, spelled: str
) -> None:
    message = only_problem(make_job(positiveClass=written), snap(tmp_path, **rows(target=target)))

    assert message.startswith(f"spec.dataset.positiveClass: {str(written)!r} is not a value of label column 'target'")
    assert spelled in message
    if written == 1:
        assert "the data writes it '1.0' (float column): set positiveClass: '1.0'" in message
    if written == "yse":
        assert message.endswith("did you mean 'yes'?")


def test_a_label_of_one_value_cannot_train_a_classifier(tmp_path: Path) -> None:
    message = only_problem(make_job(), snap(tmp_path, **rows(target=["yes"] * 30)))

    assert message == (
        "spec.dataset.label: column 'target' holds one value, 'yes', in all 30 rows: task binary needs at least two "
        "classes"
    )


def test_one_value_that_is_not_the_positive_class_is_two_problems(tmp_path: Path) -> None:
    found = problems(make_job(), snap(tmp_path, **rows(target=["no"] * 30)))

    assert found[0].startswith("spec.dataset.label: column 'target' holds one value, 'no'")
    assert found[1].startswith("spec.dataset.positiveClass: 'yes' is not a value of label column 'target'")


def test_multiclass_takes_two_classes_or_more(tmp_path: Path) -> None:
    preflight(make_job(task="multiclass"), snap(tmp_path, **rows()))
    target = ["a"] * 12 + ["b"] * 10 + ["c"] * 8
    preflight(make_job(task="multiclass"), snap(tmp_path, **rows(target=target)))

    message = only_problem(make_job(task="multiclass"), snap(tmp_path, **rows(target=["a"] * 30)))
    assert "holds one value, 'a', in all 30 rows: task multiclass needs at least two classes" in message


def test_a_numeric_label_of_many_values_suggests_regression(tmp_path: Path) -> None:
    price = [round(10 + i * 0.37, 2) for i in range(150)]

    message = only_problem(make_job(task="multiclass"), snap(tmp_path, **rows(150, target=price)))

    assert message.startswith("spec.task: multiclass, but label column 'target' holds 150 distinct values")
    assert "more than the 100 classes kubeloop trains: for a numeric target set spec.task: regression" in message


def test_a_class_too_small_to_split(tmp_path: Path) -> None:
    target = ["a"] * 14 + ["b"] * 14 + ["c"] * 2

    message = only_problem(make_job(task="multiclass"), snap(tmp_path, **rows(target=target)))

    assert message == (
        "spec.dataset.label: column 'target' has 1 class of fewer than 3 rows ('c' (2 rows)): each class needs 1 "
        "to test and 2 to train; add rows of those classes or drop them"
    )


def test_a_regression_label_with_stray_text_names_the_values(tmp_path: Path) -> None:
    target = [str(1.5 * i) for i in range(30)]
    target[3], target[9], target[20] = "?", "12,5", "?"

    message = only_problem(make_job(task="regression"), snap(tmp_path, **rows(target=target)))

    assert message == (
        "spec.dataset.label: column 'target' must hold numbers for task regression, but 3 values of 30 are not "
        "('?' (2 rows), '12,5' (1 row)): fix or drop those rows"
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["low", "high", "mid"] * 10, "column 'target' holds text ('high' (10 rows), 'low' (10 rows)"),
        ([True, False] * 15, "column 'target' is true/false: set spec.task: binary"),
        ([4.5] * 30, "spec.dataset.label: column 'target' holds one value, 4.5, in all 30 rows"),
    ],
)
def test_a_regression_label_must_be_numbers_that_vary(tmp_path: Path, target: list, expected: str) -> None:
    message = only_problem(make_job(task="regression"), snap(tmp_path, **rows(target=target)))

    assert expected in message


def test_a_slice_column_that_does_not_exist(tmp_path: Path) -> None:
    message = only_problem(make_job(sliceColumn="cty"), snap(tmp_path, **rows()))

    assert message.startswith("spec.dataset.sliceColumn: the data has no column 'cty'; did you mean 'city'?")


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("target", "spec.dataset.sliceColumn: 'target' is the label: slice by a feature column"),
        ("weight", "spec.dataset.sliceColumn: column 'weight' has 60 distinct values ('0.5' (1 row)"),
    ],
)
def test_a_slice_column_must_be_a_feature_of_few_values(tmp_path: Path, column: str, expected: str) -> None:
    data = rows(60, weight=[0.5 + i for i in range(60)])

    message = only_problem(make_job(sliceColumn=column), snap(tmp_path, **data))

    assert message.startswith(expected)
    if column == "weight":
        assert "… 60 values in all), more than the 50 slices" in message


def test_a_schema_file_that_is_missing_invalid_or_names_another_label(tmp_path: Path) -> None:
    snapshot = snap(tmp_path, **rows())
    missing = tmp_path / "nope.yaml"
    assert (
        only_problem(make_job(schemaUri=str(missing)), snapshot) == f"spec.dataset.schemaUri: no such file: {missing}"
    )

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("columns:\n  - name: age\n    dtype: decimal\n")
    message = only_problem(make_job(schemaUri=str(invalid)), snapshot)
    assert message.startswith(f"spec.dataset.schemaUri: invalid dataset schema {invalid}: columns.0.dtype")

    other = tmp_path / "other.yaml"
    other.write_text("label: outcome\nallowExtraColumns: true\ncolumns:\n  - name: age\n    dtype: int\n")
    assert only_problem(make_job(schemaUri=str(other)), snapshot) == (
        f"spec.dataset.schemaUri: {other} names the label 'outcome', spec.dataset.label is 'target': make them the same"
    )


@pytest.mark.parametrize(
    ("task", "n", "expected"),
    [
        (
            None,
            1,
            "spec.dataset.uri: the data has 1 row; task binary needs at least 6 (two classes of 3 rows: "
            "1 to test, 2 to train)",
        ),
        (
            "regression",
            3,
            "spec.dataset.uri: the data has 3 rows; task regression needs at least 4 (2 to test, 2 to train)",
        ),
    ],
)
def test_too_few_rows_names_the_count_and_the_minimum(tmp_path: Path, task: str | None, n: int, expected: str) -> None:
    target = [float(i) for i in range(n)] if task == "regression" else ["yes"] * n

    assert only_problem(make_job(task=task), snap(tmp_path, **rows(n, target=target))) == expected


def test_a_regression_split_needs_two_test_rows(tmp_path: Path) -> None:
    data = rows(6, target=[1.0, 2.5, 3.0, 4.5, 5.0, 7.5])

    message = only_problem(make_job(task="regression", test_fraction=0.1), snap(tmp_path, **data))

    assert message == (
        "spec.hyperparameters.testFraction: 6 rows at spec.hyperparameters.testFraction 0.1 leave 1 test row; "
        "task regression needs at least 2: raise testFraction or add rows"
    )
    preflight(make_job(task="regression", test_fraction=0.34), snap(tmp_path, **data))


def test_each_worker_needs_training_rows(tmp_path: Path) -> None:
    data = rows(9, target=["yes", "no", "yes", "no", "yes", "no", "yes", "no", "no"])

    message = only_problem(make_job(workers=8), snap(tmp_path, **data))

    assert message == (
        "spec.workers.replicas: 8 workers each train on an equal share of the training rows, but 9 rows at "
        "spec.hyperparameters.testFraction 0.2 leave 7: set replicas to at most 7 or add rows"
    )


def test_the_label_alone_is_no_training_data(tmp_path: Path) -> None:
    message = only_problem(make_job(), snap(tmp_path, target=rows()["target"]))

    assert (
        message == "spec.dataset.uri: the data's only column is the label 'target': a model needs at least one feature"
    )


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    job = make_job(label="Target", sliceColumn="town", schemaUri=str(tmp_path / "schema.yaml"))

    with pytest.raises(SpecError) as failed:
        preflight(job, snap(tmp_path, **rows()))

    lines = str(failed.value).splitlines()
    assert lines[0].startswith("TrainingJob demo does not fit its data (snapshot sha256:")
    assert lines[0].endswith("30 rows, from " + str(tmp_path / "data.csv") + "): 3 problems, nothing trained")
    assert [line.strip().split(":")[0] for line in lines[1:]] == [
        "spec.dataset.schemaUri",
        "spec.dataset.label",
        "spec.dataset.sliceColumn",
    ]
    copy = pickle.loads(pickle.dumps(failed.value))
    assert isinstance(copy, PreflightFailed) and copy.problems == failed.value.problems
    assert str(copy) == str(failed.value)
    assert not registry_dir().exists()
