"""Evaluation of a model on held-out rows (overall and per slice), per task, and the gate a new version must pass."""

from __future__ import annotations

import numpy as np
from pydantic.alias_generators import to_camel
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
    root_mean_squared_error,
)

from kubeloop.api.modelversion import Evaluation, GateDecision, Metrics, ModelVersion, SliceMetrics, Task
from kubeloop.api.trainingjob import TASK_METRICS, Gate, GateMetrics

LOWER_IS_BETTER = {"log_loss", "rmse", "mae"}
UNDEFINED = {"roc_auc": "single-class test set", "r2": "constant label in the test set"}


def metrics(
    labels: np.ndarray, outputs: np.ndarray, task: Task = "binary", classes: list[str] | None = None
) -> Metrics:
    """labels as TabularTransform.label_values gives them (0/1, class index, value); outputs as
    ModelArtifact.predict gives them (P(positive), class probabilities, value)."""
    if task == "binary":
        return _binary(np.asarray(labels, dtype=int), np.asarray(outputs, dtype=float))
    if task == "multiclass":
        return _multiclass(np.asarray(labels, dtype=int), np.asarray(outputs, dtype=float), classes or [])
    return _regression(np.asarray(labels, dtype=float), np.asarray(outputs, dtype=float))


def _binary(labels: np.ndarray, proba: np.ndarray) -> Metrics:
    predicted = (proba >= 0.5).astype(int)
    both_classes = 0 < labels.sum() < len(labels)
    return Metrics(
        rows=len(labels),
        positive_rate=float(labels.mean()) if len(labels) else 0.0,
        accuracy=float(accuracy_score(labels, predicted)),
        precision=float(precision_score(labels, predicted, zero_division=0)),
        recall=float(recall_score(labels, predicted, zero_division=0)),
        f1=float(f1_score(labels, predicted, zero_division=0)),
        roc_auc=float(roc_auc_score(labels, proba)) if both_classes else None,
        log_loss=float(log_loss(labels, np.clip(proba, 1e-7, 1 - 1e-7), labels=[0, 1])),
    )


def _multiclass(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> Metrics:
    every = list(range(proba.shape[1]))
    predicted = proba.argmax(axis=1)
    # macro over the classes among these rows (true or predicted): a slice without a class is not marked down for it
    macro = {"average": "macro", "zero_division": 0}
    # one-vs-rest AUC is defined only when every class is among the rows
    auc = roc_auc_score(labels, proba, multi_class="ovr", labels=every) if len(set(labels)) == len(every) else None
    counts = np.bincount(labels, minlength=len(every))
    return Metrics(
        rows=len(labels),
        class_rates={name: float(count / max(1, len(labels))) for name, count in zip(classes, counts, strict=True)},
        accuracy=float(accuracy_score(labels, predicted)),
        precision=float(precision_score(labels, predicted, **macro)),
        recall=float(recall_score(labels, predicted, **macro)),
        f1=float(f1_score(labels, predicted, **macro)),
        roc_auc=float(auc) if auc is not None else None,
        log_loss=float(log_loss(labels, proba / proba.sum(axis=1, keepdims=True), labels=every)),
    )


def _regression(values: np.ndarray, predicted: np.ndarray) -> Metrics:
    constant = len(values) < 2 or np.all(values == values[0])
    return Metrics(
        rows=len(values),
        label_mean=float(values.mean()) if len(values) else None,
        rmse=float(root_mean_squared_error(values, predicted)),
        mae=float(mean_absolute_error(values, predicted)),
        r2=None if constant else float(r2_score(values, predicted)),
    )


def evaluate(
    labels: np.ndarray,
    outputs: np.ndarray,
    slice_column: str | None = None,
    slice_values: np.ndarray | None = None,
    per_epoch: list[dict[str, float]] | None = None,
    *,
    task: Task = "binary",
    classes: list[str] | None = None,
) -> Evaluation:
    labels, outputs = np.asarray(labels), np.asarray(outputs)
    slices = None
    if slice_column is not None and slice_values is not None:
        values = np.asarray(slice_values).astype(str)
        slices = SliceMetrics(
            column=slice_column,
            values={
                value: metrics(labels[values == value], outputs[values == value], task, classes)
                for value in sorted(set(values))
            },
        )
    return Evaluation(overall=metrics(labels, outputs, task, classes), slices=slices, per_epoch=per_epoch or [])


def gate(evaluation: Evaluation, spec: Gate, production: ModelVersion | None, task: Task = "binary") -> GateDecision:
    """Fail below the declared thresholds, or worse than Production by more than the declared margin."""
    overall = evaluation.overall
    gated = TASK_METRICS[task]
    reasons: list[str] = []
    for name in gated:
        value = getattr(overall, name)
        bound = getattr(spec.thresholds, name)
        if bound is None:
            continue
        if value is None:
            reasons.append(f"{name} is undefined ({UNDEFINED.get(name, 'not computed')}); threshold {bound}")
        elif name in LOWER_IS_BETTER and value > bound:
            reasons.append(f"{name} {value:.4f} is above the threshold {bound} by {value - bound:.4f}")
        elif name not in LOWER_IS_BETTER and value < bound:
            reasons.append(f"{name} {value:.4f} is below the threshold {bound} by {bound - value:.4f}")
    compared_with = None
    # a Production version of another task (the model was redefined) is no reference for these metrics
    if production is not None and production.spec.signature.task == task:
        compared_with = production.metadata.name
        reference = production.spec.metrics.overall
        for name in gated:
            margin = getattr(spec.max_regression, name)
            value, before = getattr(overall, name), getattr(reference, name)
            if margin is None or value is None or before is None:
                continue
            worse = value - before if name in LOWER_IS_BETTER else before - value
            if worse > margin:
                reasons.append(
                    f"{name} {value:.4f} is worse than Production {compared_with} ({before:.4f}) by "
                    f"{worse:.4f}, more than the allowed {margin}"
                )
    return GateDecision(
        passed=not reasons,
        reasons=reasons,
        compared_with=compared_with,
        thresholds=_bounds(spec.thresholds),
        max_regression=_bounds(spec.max_regression),
    )


def _bounds(metrics: GateMetrics) -> dict[str, float]:
    """The bounds set, by the metrics' camelCase names as the spec writes them."""
    return {to_camel(name): getattr(metrics, name) for name in metrics.bounded()}
