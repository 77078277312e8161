"""Evaluation of a binary classifier (overall and per slice) and the gate a new model version must pass."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, precision_score, recall_score, roc_auc_score

from kubeloop.api.modelversion import Evaluation, GateDecision, Metrics, ModelVersion, SliceMetrics
from kubeloop.api.trainingjob import Gate

# logLoss is the one metric where lower is better.
LOWER_IS_BETTER = {"log_loss"}
GATED = ("accuracy", "precision", "recall", "roc_auc", "log_loss")


def metrics(labels: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> Metrics:
    labels = np.asarray(labels, dtype=int)
    predicted = (np.asarray(proba) >= threshold).astype(int)
    both_classes = 0 < labels.sum() < len(labels)
    return Metrics(
        rows=len(labels),
        positive_rate=float(labels.mean()) if len(labels) else 0.0,
        accuracy=float(accuracy_score(labels, predicted)),
        precision=float(precision_score(labels, predicted, zero_division=0)),
        recall=float(recall_score(labels, predicted, zero_division=0)),
        roc_auc=float(roc_auc_score(labels, proba)) if both_classes else None,
        log_loss=float(log_loss(labels, np.clip(proba, 1e-7, 1 - 1e-7), labels=[0, 1])),
    )


def evaluate(
    labels: np.ndarray,
    proba: np.ndarray,
    slice_column: str | None = None,
    slice_values: np.ndarray | None = None,
    per_epoch: list[dict[str, float]] | None = None,
) -> Evaluation:
    slices = None
    if slice_column is not None and slice_values is not None:
        values = np.asarray(slice_values).astype(str)
        slices = SliceMetrics(
            column=slice_column,
            values={value: metrics(labels[values == value], proba[values == value]) for value in sorted(set(values))},
        )
    return Evaluation(overall=metrics(labels, proba), slices=slices, per_epoch=per_epoch or [])


def gate(evaluation: Evaluation, spec: Gate, production: ModelVersion | None) -> GateDecision:
    """Fail below the declared thresholds, or worse than Production by more than the declared margin."""
    overall = evaluation.overall
    reasons: list[str] = []
    for name in GATED:
        value = getattr(overall, name)
        bound = getattr(spec.thresholds, name)
        if bound is None:
            continue
        if value is None:
            reasons.append(f"{name} is undefined (single-class test set); threshold {bound}")
        elif name in LOWER_IS_BETTER and value > bound:
            reasons.append(f"{name} {value:.4f} is above the threshold {bound} by {value - bound:.4f}")
        elif name not in LOWER_IS_BETTER and value < bound:
            reasons.append(f"{name} {value:.4f} is below the threshold {bound} by {bound - value:.4f}")
    compared_with = None
    if production is not None:
        compared_with = production.metadata.name
        reference = production.spec.metrics.overall
        for name in GATED:
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
    return GateDecision(passed=not reasons, reasons=reasons, compared_with=compared_with)
