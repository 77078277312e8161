"""The report's figures: matplotlib (Agg, no display) rendered to PNG bytes, embedded as data URIs.

Each function takes plain numbers and returns a `Plot` (PNG bytes + alt text); none reads files or the registry.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubeloop.errors import KubeloopError

DPI = 100
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass(frozen=True)
class Plot:
    png: bytes
    alt: str

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise KubeloopError("the model report draws its plots with matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float = 6.0, height: float = 3.6, ncols: int = 1) -> tuple[Any, Any]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, axes


def _render(fig: Any, alt: str) -> Plot:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return Plot(buffer.getvalue(), alt)


def training_curves(per_epoch: Sequence[Mapping[str, float]]) -> Plot:
    """Loss (train and validation) and validation AUC per epoch, and the seconds each epoch took."""
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(per_epoch)]
    fig, (loss_ax, auc_ax) = _figure(9.0, 3.4, ncols=2)
    for key, label, colour in (("train_loss", "train loss", COLOURS[0]), ("val_loss", "validation loss", COLOURS[1])):
        values = [row.get(key) for row in per_epoch]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=label, color=colour)
    loss_ax.set(xlabel="epoch", ylabel="log loss", title="Loss")
    loss_ax.legend(loc="best", fontsize=8)
    loss_ax.grid(alpha=0.3)
    aucs = [row.get("val_auc") for row in per_epoch]
    if any(v is not None for v in aucs):
        auc_ax.plot(epochs, [np.nan if v is None else v for v in aucs], "o-", color=COLOURS[2], label="validation AUC")
    auc_ax.set(xlabel="epoch", ylabel="ROC AUC", title="Validation AUC")
    auc_ax.grid(alpha=0.3)
    seconds = [row.get("epoch_seconds") for row in per_epoch]
    if any(v is not None for v in seconds):
        time_ax = auc_ax.twinx()
        time_ax.bar(epochs, [0 if v is None else v for v in seconds], alpha=0.15, color=COLOURS[7], label="seconds")
        time_ax.set_ylabel("seconds per epoch", color=COLOURS[7])
        auc_ax.set_zorder(time_ax.get_zorder() + 1)
        auc_ax.patch.set_visible(False)
    for ax in (loss_ax, auc_ax):
        ax.set_xticks(epochs)
    return _render(fig, f"Training curves over {len(epochs)} epochs: loss and validation AUC")


def roc_and_pr(labels: np.ndarray, proba: np.ndarray, baseline_rate: float) -> Plot:
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fig, (roc_ax, pr_ax) = _figure(9.0, 3.8, ncols=2)
    fpr, tpr, _ = roc_curve(labels, proba)
    roc_ax.plot(fpr, tpr, color=COLOURS[0], label=f"model (AUC {auc(fpr, tpr):.3f})")
    roc_ax.plot([0, 1], [0, 1], "--", color=COLOURS[7], label="chance")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    roc_ax.legend(loc="lower right", fontsize=8)
    roc_ax.grid(alpha=0.3)
    precision, recall, _ = precision_recall_curve(labels, proba)
    pr_ax.plot(recall, precision, color=COLOURS[1], label=f"model (AP {_average_precision(labels, proba):.3f})")
    pr_ax.axhline(baseline_rate, ls="--", color=COLOURS[7], label=f"positive rate {baseline_rate:.2f}")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    pr_ax.legend(loc="lower left", fontsize=8)
    pr_ax.grid(alpha=0.3)
    return _render(fig, "ROC and precision-recall curves on the held-out test rows")


def _average_precision(labels: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, proba))


def calibration(labels: np.ndarray, proba: np.ndarray, bins: int = 10) -> tuple[Plot, float]:
    """Reliability diagram (observed positive share per predicted-probability bin) and the expected calibration
    error (ECE)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(proba, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    predicted = np.bincount(which, weights=proba, minlength=bins)
    observed = np.bincount(which, weights=labels, minlength=bins)
    filled = counts > 0
    mean_predicted = predicted[filled] / counts[filled]
    share = observed[filled] / counts[filled]
    ece = float(np.sum(counts[filled] * np.abs(share - mean_predicted)) / max(1, counts.sum()))
    fig, (ax, hist) = _figure(9.0, 3.6, ncols=2)
    ax.plot([0, 1], [0, 1], "--", color=COLOURS[7], label="perfectly calibrated")
    ax.plot(mean_predicted, share, "o-", color=COLOURS[0], label=f"model (ECE {ece:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed positive share", title="Calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.hist([proba[labels == 1], proba[labels == 0]], bins=edges, stacked=True, color=COLOURS[:2])
    hist.legend(["positive", "negative"], fontsize=8)
    hist.set(xlabel="predicted probability", ylabel="rows", title="Predictions by true class", xlim=(0, 1))
    return _render(fig, f"Calibration curve in {bins} bins, expected calibration error {ece:.3f}"), ece


def slices(column: str, rows: Mapping[str, Mapping[str, float | None]], overall: Mapping[str, float | None]) -> Plot:
    """Grouped bars per slice value for each metric, with the overall figure as a horizontal tick."""
    metrics = [name for name in ("roc_auc", "accuracy", "precision", "recall") if overall.get(name) is not None]
    values = list(rows)
    fig, ax = _figure(max(6.0, 1.6 * len(metrics) + 1), 3.6)
    width = 0.8 / max(1, len(values))
    x = np.arange(len(metrics))
    for i, value in enumerate(values):
        heights = [np.nan if rows[value].get(m) is None else rows[value][m] for m in metrics]
        ax.bar(x + (i - (len(values) - 1) / 2) * width, heights, width, label=f"{column}={value}", color=COLOURS[i % 8])
    for j, metric in enumerate(metrics):
        ax.hlines(overall[metric], j - 0.45, j + 0.45, colors="black", linestyles="--", linewidth=1.2)
    ax.set_xticks(x, [m.replace("_", " ") for m in metrics])
    ax.set(ylim=(0, 1.05), ylabel="value", title=f"Metrics per {column} (dashed: overall)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _render(fig, f"Metrics per value of {column} against the overall figure")


def p_values(p: Mapping[str, float | None], threshold: float | None, title: str) -> Plot:
    """Horizontal bars of -log10(p) per feature, the threshold as a line: a long bar is a drifted feature."""
    features = list(p)
    scores = [(-math.log10(max(v, 1e-300)) if v is not None else 0.0) for v in p.values()]
    fig, ax = _figure(6.5, max(2.4, 0.42 * len(features) + 1.2))
    limit = -math.log10(threshold) if threshold else None
    colours = [COLOURS[3] if limit is not None and s > limit else COLOURS[0] for s in scores]
    ax.barh(features, scores, color=colours)
    if limit is not None:
        ax.axvline(limit, ls="--", color="black", label=f"threshold p = {threshold:.3g}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set(xlabel="-log10(p-value)", title=title)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return _render(fig, title)


def p_value_history(history: Sequence[Mapping[str, Any]], threshold: float | None) -> Plot:
    """p-value per feature over the sidecar's recent windows (log scale), flagged windows shaded."""
    fig, ax = _figure(9.0, 3.8)
    x = np.arange(1, len(history) + 1)
    features = sorted({f for window in history for f in (window.get("pValues") or {})})
    for i, feature in enumerate(features):
        ys = [(window.get("pValues") or {}).get(feature) for window in history]
        ax.plot(
            x, [np.nan if y is None else max(y, 1e-300) for y in ys], "o-", ms=3, label=feature, color=COLOURS[i % 8]
        )
    for xi, window in zip(x, history, strict=True):
        if window.get("flagged"):
            ax.axvspan(xi - 0.5, xi + 0.5, color=COLOURS[3], alpha=0.12, lw=0)
    if threshold:
        ax.axhline(threshold, ls="--", color="black", label=f"threshold {threshold:.3g}")
    ax.set_yscale("log")
    ax.set(xlabel="window", ylabel="p-value", title="p-value per feature over time (shaded: flagged windows)")
    ax.legend(fontsize=7, ncols=2, loc="lower left")
    ax.grid(alpha=0.3)
    return _render(fig, f"p-values per feature over the last {len(history)} windows")
