"""The model card's vocabulary: which metrics each task shows where, their display names, and the small values the
card's sections are made of (a metric against another value, a figure with its caption, the notes a section adds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kubeloop.api.modelversion import Task
from kubeloop.evaluation import LOWER_IS_BETTER
from kubeloop.report.plots import Plot

# per task: every metric the record holds, the summary's headline, the slice table's and the slice plot's
METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "accuracy", "precision", "recall", "f1", "log_loss", "positive_rate"),
    "multiclass": ("accuracy", "f1", "precision", "recall", "roc_auc", "log_loss"),
    "regression": ("rmse", "mae", "r2", "label_mean"),
}
HEADLINE = {"binary": ("roc_auc", "accuracy"), "multiclass": ("accuracy", "f1"), "regression": ("rmse", "r2")}
SLICE_METRICS = {
    "binary": ("roc_auc", "accuracy", "precision", "recall", "log_loss"),
    "multiclass": ("accuracy", "f1", "precision", "recall", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}
SLICE_PLOT = {
    "binary": ("roc_auc", "accuracy", "precision", "recall"),
    "multiclass": ("accuracy", "f1", "precision", "recall"),
    "regression": ("rmse", "mae"),
}
LOSS = {"binary": "log loss", "multiclass": "cross-entropy", "regression": "mean squared error (standardized label)"}
NAMES = {
    "roc_auc": "ROC AUC",
    "log_loss": "log loss",
    "positive_rate": "positive rate",
    "f1": "F1",
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R²",
    "label_mean": "label mean",
}
MACRO = {"precision", "recall", "f1", "roc_auc"}  # multiclass: averaged over the classes
NEUTRAL = {"positive_rate", "label_mean"}  # descriptive: neither better nor worse when they move


def metric_name(metric: str, task: Task) -> str:
    name = NAMES.get(metric, metric.replace("_", " "))
    return f"{name} (macro)" if task == "multiclass" and metric in MACRO else name


@dataclass(frozen=True)
class Change:
    """A metric's value against another (the overall value, Production's): shown as a coloured delta."""

    metric: str
    value: float | None
    other: float | None

    @property
    def delta(self) -> float | None:
        return None if self.value is None or self.other is None else self.value - self.other

    @property
    def direction(self) -> str:
        """The CSS class of the delta: better, worse, or empty (a descriptive metric, no change, nothing to compare)."""
        delta = self.delta
        if self.metric in NEUTRAL or delta is None or not math.isfinite(delta) or abs(delta) < 1e-12:
            return ""
        better = delta < 0 if self.metric in LOWER_IS_BETTER else delta > 0
        return "better" if better else "worse"


@dataclass(frozen=True)
class Figure:
    plot: Plot
    caption: str


@dataclass
class Notes:
    """What a section could not show, and why (a missing snapshot, an artifact elsewhere): said in the report."""

    items: dict[str, list[str]] = field(default_factory=dict)

    def add(self, section: str, text: str) -> None:
        self.items.setdefault(section, []).append(text)

    def of(self, section: str) -> list[str]:
        return self.items.get(section, [])
