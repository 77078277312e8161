"""The held-out rows the training run evaluated on, scored again by the artifact, and what the card's Evaluation and
Slices sections compute from them.

The evaluation follows spec.signature.task: binary, ROC / precision-recall and calibration, and group fairness per
slice; multiclass, metrics per class, the confusion matrix, one-vs-rest ROC curves and the class balance of train and
test; regression, predicted against actual, the residuals, and the errors per slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kubeloop.api.modelversion import Metrics, ModelVersion, Task
from kubeloop.report import plots
from kubeloop.report.card_values import METRICS, SLICE_METRICS, SLICE_PLOT, Change, Figure, metric_name


@dataclass
class HeldOut:
    """The artifact's outputs on the held-out rows the training run evaluated on, labels and outputs as
    kubeloop.evaluation takes them; and the training rows' labels (the class balance of train and test)."""

    frame: pd.DataFrame
    labels: np.ndarray
    outputs: np.ndarray
    train_labels: np.ndarray | None
    task: Task
    classes: list[str]
    how: str

    def metrics(self) -> Metrics:
        from kubeloop.evaluation import metrics

        return metrics(self.labels, self.outputs, self.task, self.classes)

    def groups(self, column: str) -> np.ndarray:
        return self.frame[column].astype("string").fillna("(null)").to_numpy()


def held_out(record: ModelVersion) -> HeldOut:
    """Recompute the test split from the lineage (snapshot digest, testFraction, seed) and the record's task, label
    and slice column, with the training job's split function, and predict on it."""
    from kubeloop.artifact import local_path
    from kubeloop.data.snapshot import load_snapshot, read_frame
    from kubeloop.training.split import split_rows

    spec = record.spec
    lineage = spec.lineage
    local_path(spec.artifact_uri)  # fetched (s3://) or refused (another scheme) before reading anything
    frame = read_frame(load_snapshot(lineage.dataset_digest))
    from kubeloop.artifact import ModelArtifact  # torch from here on

    params = lineage.hyperparameters
    fraction = params.get("testFraction", params.get("test_fraction"))
    seed = params.get("seed")
    artifact = ModelArtifact.load(spec.artifact_uri)
    transform = artifact.transform
    train = None
    if fraction is not None and seed is not None:
        slice_column = spec.metrics.slices.column if spec.metrics.slices else None
        train_rows, test_rows = split_rows(
            frame,
            task=spec.signature.task,
            label=spec.signature.label,
            slice_column=slice_column,
            test_fraction=float(fraction),
            seed=int(seed),
        )
        train, test = frame.iloc[train_rows], frame.iloc[test_rows]
        strata = f"{spec.signature.label}" + (f" and {slice_column}" if slice_column else "")
        how = (
            f"{len(test)} held-out rows (test fraction {fraction}, seed {seed}, stratified by {strata}) "
            f"of snapshot {lineage.dataset_digest[:19]}"
        )
    else:
        test = frame
        how = f"all {len(frame)} rows of the snapshot (the lineage records no testFraction and seed)"
    return HeldOut(
        frame=test,
        labels=transform.label_values(test),
        outputs=artifact.predict(test),
        train_labels=None if train is None else transform.label_values(train),
        task=transform.task,
        classes=transform.classes or [],
        how=how,
    )


# ---- Evaluation ----------------------------------------------------------------------------------------------------


@dataclass
class BinaryCurves:
    roc: Figure | None  # None: the held-out rows hold a single class
    calibration: Figure


@dataclass
class ClassRow:
    name: str
    rows: int
    predicted: int
    precision: float
    recall: float
    f1: float
    roc_auc: float | None  # None: the class is absent from (or alone in) the held-out rows


@dataclass
class PerClass:
    classes: list[str]
    rows: list[ClassRow]
    confusion: list[tuple[str, list[int]]]  # per true class: the rows predicted as each class
    confusion_figure: Figure
    roc: Figure
    sets: list[str]  # the sets of rows the class balance counts: train (when known) and held-out
    balance: list[tuple[str, list[tuple[int, float]]]]  # per class: its rows and share in each set
    balance_figure: Figure

    @property
    def balance_headers(self) -> list[str]:
        return [f"{name} {what}" for name in self.sets for what in ("rows", "share")]


@dataclass
class Residuals:
    mean: float
    std: float
    median_error: float
    p90_error: float
    max_error: float
    figure: Figure


@dataclass
class EvaluationView:
    rows: list[tuple[str, float | None, float | None]]  # metric, recorded, recomputed (None: not recomputed)
    recomputed: bool
    how: str = ""
    differ: list[str] = field(default_factory=list)  # the metrics whose recomputed value is not the recorded one
    curves: BinaryCurves | None = None
    per_class: PerClass | None = None
    residuals: Residuals | None = None


def evaluation(record: ModelVersion, test: HeldOut | None) -> EvaluationView:
    overall = record.spec.metrics.overall
    task = record.spec.signature.task
    names = ("rows", *METRICS[task])
    if test is None:
        return EvaluationView([(metric_name(n, task), getattr(overall, n), None) for n in names], recomputed=False)
    recomputed = test.metrics()
    return EvaluationView(
        [(metric_name(n, task), getattr(overall, n), getattr(recomputed, n)) for n in names],
        recomputed=True,
        how=test.how,
        differ=[metric_name(n, task) for n in names if not _same(getattr(overall, n), getattr(recomputed, n))],
        curves=_binary_curves(test) if task == "binary" else None,
        per_class=_per_class(test) if task == "multiclass" else None,
        residuals=_residuals(test, record.spec.signature.label) if task == "regression" else None,
    )


def _same(recorded: float | None, recomputed: float | None) -> bool:
    if recorded is None or recomputed is None:
        return recorded is None and recomputed is None
    return math.isclose(recorded, recomputed, rel_tol=1e-6, abs_tol=1e-4)


def _binary_curves(test: HeldOut) -> BinaryCurves:
    roc = None
    if 0 < test.labels.sum() < len(test.labels):
        roc = Figure(plots.roc_and_pr(test.labels, test.outputs, float(test.labels.mean())), "ROC and precision-recall")
    plot, ece = plots.calibration(test.labels.astype(float), test.outputs)
    return BinaryCurves(roc, Figure(plot, f"Calibration (expected calibration error {ece:.3f})"))


def _per_class(test: HeldOut) -> PerClass:
    """Multiclass: precision, recall, F1, support and one-vs-rest AUC per class, the confusion matrix, the ROC
    curves and the class balance of the training and held-out rows."""
    from sklearn import metrics as sk

    classes, labels, proba = test.classes, test.labels, test.outputs
    every = list(range(len(classes)))
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predicted, labels=every, zero_division=0
    )
    predicted_counts = np.bincount(predicted, minlength=len(classes))
    rows = []
    for i, name in enumerate(classes):
        positive = labels == i
        auc = float(sk.roc_auc_score(positive, proba[:, i])) if 0 < positive.sum() < len(labels) else None
        scores = float(precision[i]), float(recall[i]), float(f1[i])
        rows.append(ClassRow(name, int(support[i]), int(predicted_counts[i]), *scores, auc))
    counts = sk.confusion_matrix(labels, predicted, labels=every)
    sets = {"held-out": np.bincount(labels, minlength=len(classes))}
    if test.train_labels is not None:
        sets = {"train": np.bincount(test.train_labels, minlength=len(classes)), **sets}
    return PerClass(
        classes=classes,
        rows=rows,
        confusion=[(name, [int(c) for c in row]) for name, row in zip(classes, counts, strict=True)],
        confusion_figure=Figure(
            plots.confusion_matrix(counts, classes), "Held-out rows by true class (rows) and predicted class"
        ),
        roc=Figure(plots.roc_one_vs_rest(labels, proba, classes), "ROC curves, each class against the rest"),
        sets=list(sets),
        balance=[
            (name, [(int(values[i]), values[i] / max(1, values.sum())) for values in sets.values()])
            for i, name in enumerate(classes)
        ],
        balance_figure=Figure(plots.class_balance(classes, sets), "Share of each class in " + " and ".join(sets)),
    )


def _residuals(test: HeldOut, label: str) -> Residuals:
    """Regression: how far off the predictions are, which way, and where."""
    actual, predicted = test.labels.astype(float), test.outputs.astype(float)
    residuals = actual - predicted
    errors = np.abs(residuals)
    return Residuals(
        mean=float(residuals.mean()),
        std=float(residuals.std()),
        median_error=float(np.median(errors)),
        p90_error=float(np.quantile(errors, 0.9)),
        max_error=float(errors.max()),
        figure=Figure(plots.regression_fit(actual, predicted, label), "Predicted against actual, and the residuals"),
    )


# ---- Slices and fairness -------------------------------------------------------------------------------------------


@dataclass
class SliceRow:
    value: str
    rows: int | None
    described: float | dict[str, float] | None  # positive rate, class shares or label mean, by task
    changes: list[Change]  # each slice metric against its overall value


@dataclass
class GroupRates:
    group: str
    rows: int
    selection: float
    tpr: float
    fpr: float


@dataclass
class Fairness:
    groups: list[GroupRates]
    parity: float  # the spread of the selection rates
    impact: float  # min/max selection rate
    opportunity: float  # the spread of the true positive rates
    odds: float  # the larger of the TPR and FPR spreads


@dataclass
class SlicesView:
    column: str
    described: str  # the heading of SliceRow.described
    metrics: list[str]
    rows: list[SliceRow]
    figure: Figure
    fairness: Fairness | None = None  # binary
    errors: Figure | None = None  # regression: the residuals per slice value


# per task: the heading and the Metrics field of the column that describes each slice
DESCRIBED = {
    "binary": ("positive rate", "positive_rate"),
    "multiclass": ("classes", "class_rates"),
    "regression": ("label mean", "label_mean"),
}


def slices(record: ModelVersion, test: HeldOut | None) -> SlicesView | None:
    """None when the training run declared no slice column."""
    sliced = record.spec.metrics.slices
    if sliced is None:
        return None
    overall = record.spec.metrics.overall
    task = record.spec.signature.task
    described, attribute = DESCRIBED[task]
    rows = [
        SliceRow(
            value,
            metrics.rows,
            getattr(metrics, attribute) if task != "multiclass" else metrics.class_rates or {},
            [Change(n, getattr(metrics, n), getattr(overall, n)) for n in SLICE_METRICS[task]],
        )
        for value, metrics in sliced.values.items()
    ]
    plotted = SLICE_PLOT[task]
    figure = Figure(
        plots.slices(
            sliced.column,
            {v: {metric_name(n, task): getattr(m, n) for n in plotted} for v, m in sliced.values.items()},
            {metric_name(n, task): getattr(overall, n) for n in plotted},
        ),
        f"Metrics per {sliced.column}",
    )
    view = SlicesView(sliced.column, described, [metric_name(n, task) for n in SLICE_METRICS[task]], rows, figure)
    if test is not None and sliced.column in test.frame.columns:
        if task == "binary":
            view.fairness = _fairness(sliced.column, test)
        elif task == "regression":
            view.errors = _slice_errors(sliced.column, test)
    return view


def _slice_errors(column: str, test: HeldOut) -> Figure:
    """Regression: the residuals of each slice value's held-out rows, as boxes."""
    groups = test.groups(column)
    residuals = test.labels.astype(float) - test.outputs.astype(float)
    by_group = {group: residuals[groups == group] for group in sorted(set(groups))}
    return Figure(plots.residuals_by_slice(column, by_group), f"Residuals (actual - predicted) per {column}")


def _fairness(column: str, test: HeldOut) -> Fairness:
    """Group fairness at threshold 0.5 on the held-out rows: selection rate, TPR and FPR per group."""
    groups = test.groups(column)
    predicted = test.outputs >= 0.5
    rates = []
    for group in sorted(set(groups)):
        mask = groups == group
        labels, chosen = test.labels[mask] == 1, predicted[mask]
        rates.append(
            GroupRates(
                group,
                int(mask.sum()),
                float(chosen.mean()) if mask.any() else float("nan"),
                float(chosen[labels].mean()) if labels.any() else float("nan"),
                float(chosen[~labels].mean()) if (~labels).any() else float("nan"),
            )
        )
    selection = [r.selection for r in rates]
    finite_selection = [v for v in selection if math.isfinite(v)]
    impact = (
        min(finite_selection) / max(finite_selection)
        if finite_selection and max(finite_selection) > 0
        else float("nan")
    )
    tprs, fprs = _spread([r.tpr for r in rates]), _spread([r.fpr for r in rates])
    return Fairness(rates, _spread(selection), impact, tprs, max(tprs, fprs))


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) - min(finite) if finite else float("nan")
