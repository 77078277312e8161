"""A TrainingJob's spec against its data, before anything is fitted, Ray starts or the registry is touched.

`preflight` collects every problem at once (label, positive class, task, slice column, schema file, feature
columns, rows per class and per split) and raises one PreflightFailed that lists them, each under the field path
to change and with what the data holds instead.

Minimums: each class needs MIN_ROWS_PER_CLASS rows (kubeloop.training.split gives every such class a test row and
two training rows); regression needs MIN_TEST_ROWS_REGRESSION test rows (r2 needs two) and MIN_TRAIN_ROWS_REGRESSION
training rows; and every Ray worker trains on an equal shard of the training rows, so there must be at least
spec.workers.replicas of them. A search (spec.tuning) also needs a space its values fit (positive learning rates,
whole batch sizes, params.NAME the builder takes) and training rows that split again into validation rows.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path

import pandas as pd

from kubeloop.api.trainingjob import DatasetSpec, TrainingJob
from kubeloop.data.snapshot import Snapshot, dtype_of, read_frame
from kubeloop.data.validation import DatasetSchema
from kubeloop.errors import DataError, SpecError
from kubeloop.log import event
from kubeloop.training.models import resolve_builder
from kubeloop.training.split import (
    MIN_ROWS_PER_CLASS,
    MIN_TEST_ROWS_PER_CLASS,
    MIN_TRAIN_ROWS_PER_CLASS,
    split_rows,
)

log = logging.getLogger(__name__)

MAX_CLASSES = 100
MAX_SLICE_VALUES = 50
MIN_TEST_ROWS_REGRESSION = 2
MIN_TRAIN_ROWS_REGRESSION = 2
# a text label with at least this share of values that parse as numbers is a numeric label with stray values
NUMERIC_SHARE = 0.5
_EXAMPLES = 5
_COLUMNS_SHOWN = 20


class PreflightFailed(SpecError):
    """The spec does not fit the data: one line per problem, each starting with the field path to change."""

    def __init__(self, header: str, problems: list[str]) -> None:
        super().__init__("\n  ".join([header, *problems]))
        self.header = header
        self.problems = problems

    def __reduce__(self):  # the default would rebuild from the message alone
        return type(self), (self.header, self.problems)


def preflight(job: TrainingJob, snapshot: Snapshot) -> None:
    """Raise PreflightFailed listing every way job's spec does not fit the snapshot; return when it fits."""
    problems = find_problems(job, read_frame(snapshot))
    event(log, "train.preflight", job=job.metadata.name, digest=snapshot.digest, problems=len(problems))
    if problems:
        raise PreflightFailed(
            f"TrainingJob {job.metadata.name} does not fit its data (snapshot {snapshot.digest}, "
            f"{_plural(snapshot.rows, 'row')}, from {snapshot.source}): {_plural(len(problems), 'problem')}, "
            "nothing trained",
            problems,
        )


def find_problems(job: TrainingJob, frame: pd.DataFrame) -> list[str]:
    """Every problem of job's spec against frame (a snapshot's table): schema file, label and task, slice column,
    then the split's sizes (once the label is sound)."""
    spec, dataset = job.spec, job.spec.dataset
    problems = _schema_problems(dataset) + _search_problems(job)
    slice_problems = _slice_problems(dataset, frame)
    label = dataset.label
    if label not in frame.columns:
        return [*problems, _no_column("spec.dataset.label", label, frame), *slice_problems]
    if len(frame.columns) == 1:
        problems.append(
            f"spec.dataset.uri: the data's only column is the label {label!r}: a model needs at least one feature"
        )
    nulls = int(frame[label].isna().sum())
    if nulls:
        problems.append(
            f"spec.dataset.label: column {label!r} has {_plural(nulls, 'null')} in {len(frame)} rows: "
            "drop or fill those rows"
        )
    minimum = (
        MIN_TEST_ROWS_REGRESSION + MIN_TRAIN_ROWS_REGRESSION if spec.task == "regression" else 2 * MIN_ROWS_PER_CLASS
    )
    if len(frame) < minimum:
        problems.append(
            f"spec.dataset.uri: the data has {_plural(len(frame), 'row')}; task {spec.task} needs at least {minimum} "
            f"({_minimum_reason(spec.task)})"
        )
        return problems + slice_problems
    values = frame[label].dropna()
    if values.empty:
        return problems + slice_problems
    label_problems = _regression_problems(job, values) if spec.task == "regression" else _class_problems(job, values)
    problems += label_problems + slice_problems
    if not label_problems:
        problems += _split_problems(job, frame, None if slice_problems else dataset.slice_column)
    return problems


def _minimum_reason(task: str) -> str:
    if task == "regression":
        return f"{MIN_TEST_ROWS_REGRESSION} to test, {MIN_TRAIN_ROWS_REGRESSION} to train"
    per_class = f"{MIN_TEST_ROWS_PER_CLASS} to test, {MIN_TRAIN_ROWS_PER_CLASS} to train"
    return f"two classes of {MIN_ROWS_PER_CLASS} rows: {per_class}"


def _schema_problems(dataset: DatasetSpec) -> list[str]:
    if not dataset.schema_uri:
        return []
    path = Path(dataset.schema_uri)
    if not path.is_file():
        return [f"spec.dataset.schemaUri: no such file: {path}"]
    try:
        schema = DatasetSchema.from_yaml(path)
    except DataError as error:
        return [f"spec.dataset.schemaUri: {error}"]
    if schema.label and schema.label != dataset.label:
        return [
            f"spec.dataset.schemaUri: {path} names the label {schema.label!r}, spec.dataset.label is "
            f"{dataset.label!r}: make them the same"
        ]
    return []


def _slice_problems(dataset: DatasetSpec, frame: pd.DataFrame) -> list[str]:
    column = dataset.slice_column
    if column is None:
        return []
    if column not in frame.columns:
        return [_no_column("spec.dataset.sliceColumn", column, frame)]
    if column == dataset.label:
        return [f"spec.dataset.sliceColumn: {column!r} is the label: slice by a feature column, or remove sliceColumn"]
    values = _as_text(frame[column].dropna()).value_counts()
    if len(values) > MAX_SLICE_VALUES:
        return [
            f"spec.dataset.sliceColumn: column {column!r} has {len(values)} distinct values ({_listing(values)}), "
            f"more than the {MAX_SLICE_VALUES} slices evaluation reports: pick a column with fewer values, or add one "
            "that groups these into a few"
        ]
    return []


def _class_problems(job: TrainingJob, values: pd.Series) -> list[str]:
    spec = job.spec
    label = spec.dataset.label
    counts = _counts(values)
    numeric = pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)
    if len(counts) < 2:
        problems = [
            f"spec.dataset.label: column {label!r} holds one value, {counts.index[0]!r}, in all {len(values)} rows: "
            f"task {spec.task} needs at least two classes"
        ]
    elif len(counts) > MAX_CLASSES:
        hint = "for a numeric target set spec.task: regression" if numeric else "group the rare classes into one"
        problems = [
            f"spec.task: {spec.task}, but label column {label!r} holds {len(counts)} distinct values "
            f"({_listing(counts)}), more than the {MAX_CLASSES} classes kubeloop trains: {hint}"
        ]
    elif spec.task == "binary" and len(counts) > 2:
        default = "" if "task" in spec.model_fields_set else " (the default)"
        problems = [
            f"spec.task: binary{default}, but label column {label!r} holds {len(counts)} classes "
            f"({_listing(counts)}): set spec.task: multiclass and remove spec.dataset.positiveClass"
        ]
    else:
        problems = []
    if spec.task == "binary" and len(counts) <= 2 and spec.dataset.positive_class not in counts.index:
        problems.append(_positive_class_problem(spec.dataset.positive_class or "", label, values, counts))
    if problems:
        return problems
    small = counts[counts < MIN_ROWS_PER_CLASS]
    if len(small):
        return [
            f"spec.dataset.label: column {label!r} has {_plural(len(small), 'class')} of fewer than "
            f"{MIN_ROWS_PER_CLASS} rows ({_listing(small)}): each class needs {MIN_TEST_ROWS_PER_CLASS} to test and "
            f"{MIN_TRAIN_ROWS_PER_CLASS} to train; add rows of those classes or drop them"
        ]
    return []


def _positive_class_problem(positive: str, label: str, values: pd.Series, counts: pd.Series) -> str:
    same = [value for value in counts.index if _same_value(positive, value)]
    if same:
        hint = f"; the data writes it {same[0]!r} ({dtype_of(values)} column): set positiveClass: {same[0]!r}"
    else:
        close = difflib.get_close_matches(positive, list(counts.index), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"spec.dataset.positiveClass: {positive!r} is not a value of label column {label!r} "
        f"(it holds {_listing(counts)}){hint}"
    )


def _same_value(written: str, value: str) -> bool:
    """Whether the spec's text and a value of the data mean the same class: 1 and 1.0, yes and Yes."""
    if written.casefold() == value.casefold():
        return True
    try:
        return float(written) == float(value)
    except ValueError:
        return False


def _regression_problems(job: TrainingJob, values: pd.Series) -> list[str]:
    label = job.spec.dataset.label
    if pd.api.types.is_bool_dtype(values.dtype):
        return [
            f"spec.task: regression needs a numeric label, but column {label!r} is true/false: set spec.task: binary "
            "and spec.dataset.positiveClass"
        ]
    if not pd.api.types.is_numeric_dtype(values.dtype):
        parsed = pd.to_numeric(values, errors="coerce")
        bad = _counts(values[parsed.isna()])
        if len(values) - bad.sum() >= NUMERIC_SHARE * len(values):
            return [
                f"spec.dataset.label: column {label!r} must hold numbers for task regression, but "
                f"{_plural(int(bad.sum()), 'value')} of {len(values)} are not ({_listing(bad)}): fix or drop those rows"
            ]
        return [
            f"spec.task: regression needs a numeric label, but column {label!r} holds text "
            f"({_listing(_counts(values))}): for classes set spec.task: multiclass (or binary)"
        ]
    if values.nunique() < 2:
        return [
            f"spec.dataset.label: column {label!r} holds one value, {values.iloc[0]}, in all {len(values)} rows: "
            "task regression needs a label that varies"
        ]
    return []


def _split_problems(job: TrainingJob, frame: pd.DataFrame, slice_column: str | None) -> list[str]:
    spec = job.spec
    fraction = spec.hyperparameters.test_fraction
    train, test = split_rows(
        frame,
        task=spec.task,
        label=spec.dataset.label,
        slice_column=slice_column,
        test_fraction=fraction,
        seed=spec.hyperparameters.seed,
    )
    split = f"{len(frame)} rows at spec.hyperparameters.testFraction {fraction:g}"
    problems = []
    if spec.task == "regression" and len(test) < MIN_TEST_ROWS_REGRESSION:
        problems.append(
            f"spec.hyperparameters.testFraction: {split} leave {_plural(len(test), 'test row')}; task regression "
            f"needs at least {MIN_TEST_ROWS_REGRESSION}: raise testFraction or add rows"
        )
    if spec.task == "regression" and len(train) < MIN_TRAIN_ROWS_REGRESSION:
        problems.append(
            f"spec.hyperparameters.testFraction: {split} leave {_plural(len(train), 'training row')}; task "
            f"regression needs at least {MIN_TRAIN_ROWS_REGRESSION}: lower testFraction or add rows"
        )
    replicas = spec.workers.replicas
    if spec.tuning is not None and not problems:
        problems += _validation_problems(job, frame.iloc[train])
    if len(train) < replicas:
        problems.append(
            f"spec.workers.replicas: {replicas} workers each train on an equal share of the training rows, but "
            f"{split} leave {len(train)}: set replicas to at most {max(1, len(train))} or add rows"
        )
    return problems


def _search_problems(job: TrainingJob) -> list[str]:
    """spec.tuning.space against what it varies: learningRate positive, batchSize whole numbers from 1, params.NAME
    a keyword argument the builder takes."""
    if job.spec.tuning is None:
        return []
    problems = []
    for name, dimension in job.spec.tuning.space.items():
        field = f"spec.tuning.space.{name}"
        values = dimension.choice or dimension.uniform or dimension.log_uniform or dimension.int_range or []
        numbers = all(isinstance(value, int | float) and not isinstance(value, bool) for value in values)
        if name == "learningRate" and not (numbers and min(values) > 0 and max(values) <= 10):
            problems.append(f"{field}: learning rates must be numbers above 0 and at most 10 (got {values})")
        elif name == "batchSize" and dimension.int_range is None and dimension.choice is None:
            problems.append(f"{field}: a batch size is a whole number: use choice or intRange, not {dimension.kind()}")
        elif name == "batchSize" and not (
            numbers and all(float(value).is_integer() for value in values) and min(values) >= 1
        ):
            problems.append(f"{field}: batch sizes must be whole numbers from 1 (got {values})")
        elif name.startswith("params."):
            problems += _builder_keyword_problems(job.spec.model.builder, field, name.removeprefix("params."))
    return problems


def _builder_keyword_problems(reference: str, field: str, keyword: str) -> list[str]:
    try:
        parameters = inspect.signature(resolve_builder(reference)).parameters
    except SpecError as error:
        return [str(error)]
    except (TypeError, ValueError):  # a callable without a signature: its call will tell
        return []
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return []
    # the first parameter is the input width, which kubeloop passes
    accepted = [
        name
        for name, parameter in list(parameters.items())[1:]
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name != "outputs"  # kubeloop passes it (the network's outputs)
    ]
    if keyword in accepted:
        return []
    close = difflib.get_close_matches(keyword, accepted, n=1)
    hint = f"; did you mean params.{close[0]}?" if close else ""
    return [f"{field}: the builder {reference} takes no keyword {keyword!r} (it takes {', '.join(accepted)}){hint}"]


def _validation_problems(job: TrainingJob, train: pd.DataFrame) -> list[str]:
    """A search ranks its trials on validation rows split from the training rows as the test rows are from the
    data: that second split needs the same minimums."""
    spec = job.spec
    label = spec.dataset.label
    values = train[label].dropna()
    fraction = spec.hyperparameters.test_fraction
    if spec.task == "regression":
        minimum = MIN_TEST_ROWS_REGRESSION + MIN_TRAIN_ROWS_REGRESSION
        short = f"{len(values)} training rows, fewer than {minimum}" if len(values) < minimum else ""
    else:
        small = _counts(values)[lambda counts: counts < MIN_ROWS_PER_CLASS]
        short = f"classes with fewer than {MIN_ROWS_PER_CLASS} training rows ({_listing(small)})" if len(small) else ""
    if short:
        return [
            f"spec.tuning: a search ranks its trials on validation rows split from the training rows as the test "
            f"rows are from the data (testFraction {fraction:g}), and the {len(train)} training rows cannot spare "
            f"them: {short}; add rows or remove spec.tuning"
        ]
    fit, _ = split_rows(
        train,
        task=spec.task,
        label=label,
        slice_column=None,
        test_fraction=fraction,
        seed=spec.hyperparameters.seed,
    )
    if len(fit) < spec.workers.replicas:
        return [
            f"spec.workers.replicas: a search's trials train on {len(fit)} rows (the training rows less the "
            f"validation rows): set replicas to at most {max(1, len(fit))} or add rows"
        ]
    return []


def _no_column(field: str, name: str, frame: pd.DataFrame) -> str:
    columns = [str(column) for column in frame.columns]
    match = next((column for column in columns if column.casefold() == name.casefold()), None)
    match = match or next(iter(difflib.get_close_matches(name, columns, n=1)), None)
    hint = f"; did you mean {match!r}?" if match else ""
    shown = ", ".join(map(repr, columns[:_COLUMNS_SHOWN]))
    more = f", … ({len(columns)} in all)" if len(columns) > _COLUMNS_SHOWN else ""
    return f"{field}: the data has no column {name!r}{hint} (its columns: {shown}{more})"


def _as_text(values: pd.Series) -> pd.Series:
    """Values as the text kubeloop.transform compares labels with: 1.0 for a float column, True for a bool."""
    return values.astype(object).map(str, na_action="ignore")


def _counts(values: pd.Series) -> pd.Series:
    """Rows per distinct value (as text), most frequent first, ties by value."""
    return _as_text(values).value_counts().sort_index().sort_values(ascending=False, kind="stable")


def _listing(counts: pd.Series) -> str:
    shown = ", ".join(f"{value!r} ({_plural(int(count), 'row')})" for value, count in counts.head(_EXAMPLES).items())
    return shown + (f", … {len(counts)} values in all" if len(counts) > _EXAMPLES else "")


def _plural(count: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{count} {noun if count == 1 else plural}"
