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


# the per-epoch validation metric each task records, with its axis label and title
VALIDATION = {
    "val_auc": ("ROC AUC", "Validation AUC"),
    "val_accuracy": ("accuracy", "Validation accuracy"),
    "val_rmse": ("RMSE (label units)", "Validation RMSE"),
}


def training_curves(per_epoch: Sequence[Mapping[str, float]], loss: str = "log loss") -> Plot:
    """Loss (train and validation, `loss` naming it) and the validation metric the history holds (val_auc,
    val_accuracy or val_rmse) per epoch, and the seconds each epoch took."""
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(per_epoch)]
    fig, (loss_ax, val_ax) = _figure(9.0, 3.4, ncols=2)
    for key, label, colour in (("train_loss", "train loss", COLOURS[0]), ("val_loss", "validation loss", COLOURS[1])):
        values = [row.get(key) for row in per_epoch]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=label, color=colour)
    loss_ax.set(xlabel="epoch", ylabel=loss, title="Loss")
    loss_ax.legend(loc="best", fontsize=8)
    loss_ax.grid(alpha=0.3)
    key = next((k for k in VALIDATION if any(row.get(k) is not None for row in per_epoch)), None)
    ylabel, title = VALIDATION[key] if key else ("", "No validation metric recorded")
    if key:
        values = [row.get(key) for row in per_epoch]
        val_ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", color=COLOURS[2], label=title)
    val_ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    val_ax.grid(alpha=0.3)
    seconds = [row.get("epoch_seconds") for row in per_epoch]
    if any(v is not None for v in seconds):
        time_ax = val_ax.twinx()
        time_ax.bar(epochs, [0 if v is None else v for v in seconds], alpha=0.15, color=COLOURS[7], label="seconds")
        time_ax.set_ylabel("seconds per epoch", color=COLOURS[7])
        val_ax.set_zorder(time_ax.get_zorder() + 1)
        val_ax.patch.set_visible(False)
    for ax in (loss_ax, val_ax):
        if len(epochs) <= 15:
            ax.set_xticks(epochs)
        else:  # a tick per epoch would overlap
            ax.xaxis.set_major_locator(_pyplot().MaxNLocator(10, integer=True))
    return _render(fig, f"Training curves over {len(epochs)} epochs: loss; {title}")


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
    """Grouped bars per slice value for each metric of `overall` that has a value, the overall figure as a
    horizontal tick. Metrics within [0, 1] (classification) share the axis 0 to 1; others (RMSE, MAE) scale to fit."""
    metrics = [name for name, value in overall.items() if value is not None]
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
    drawn = [v for row in rows.values() for m in metrics if (v := row.get(m)) is not None]
    drawn += [overall[m] for m in metrics]
    top = max(drawn, default=1.0)
    ax.set(ylim=(0, 1.05 if top <= 1 else top * 1.15), ylabel="value", title=f"Metrics per {column} (dashed: overall)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _render(fig, f"Metrics per value of {column} against the overall figure")


def confusion_matrix(counts: np.ndarray, classes: Sequence[str]) -> Plot:
    """Rows of the held-out set by true class (rows) and predicted class (columns), the count in each cell;
    shaded by the share of the true class, so that a small class's errors show as clearly as a large one's."""
    k = len(classes)
    side = max(4.5, 0.6 * k + 2.5)
    fig, ax = _figure(side + 1.2, side)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                colour = "white" if shares[i, j] > 0.6 else "black"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=9, color=colour)
    ax.set_xticks(range(k), list(classes), rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), list(classes))
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (held-out rows)")
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    return _render(fig, f"Confusion matrix over {k} classes: held-out rows by true and predicted class")


def roc_one_vs_rest(labels: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> Plot:
    """One ROC curve per class (that class against all others), for each class both present and absent among
    the rows."""
    from sklearn.metrics import auc, roc_curve

    fig, ax = _figure(6.5, 4.2)
    for i, name in enumerate(classes):
        positive = labels == i
        if not 0 < positive.sum() < len(labels):
            continue
        fpr, tpr, _ = roc_curve(positive, proba[:, i])
        style = "-" if i < len(COLOURS) else "--"
        ax.plot(fpr, tpr, style, color=COLOURS[i % len(COLOURS)], label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ":", color=COLOURS[7], label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one class against the rest")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8, ncols=1 if len(classes) <= 8 else 2)
    ax.grid(alpha=0.3)
    return _render(fig, f"One-vs-rest ROC curves for {len(classes)} classes on the held-out rows")


def class_balance(classes: Sequence[str], counts: Mapping[str, np.ndarray]) -> Plot:
    """Each class's share of the rows in each named set (train, test), side by side."""
    fig, ax = _figure(max(6.0, 0.9 * len(classes) + 2), 3.4)
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(counts))
    for i, (name, values) in enumerate(counts.items()):
        shares = values / max(1, values.sum())
        ax.bar(
            x + (i - (len(counts) - 1) / 2) * width,
            shares,
            width,
            color=COLOURS[i % 8],
            label=f"{name} ({int(values.sum())} rows)",
        )
    ax.set_xticks(x, list(classes), rotation=45 if len(classes) > 6 else 0)
    ax.set(ylabel="share of rows", title="Class balance", ylim=(0, 1.05))
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _render(fig, f"Share of each of {len(classes)} classes in {' and '.join(counts)}")


def regression_fit(actual: np.ndarray, predicted: np.ndarray, label: str) -> Plot:
    """Predicted against actual values (the diagonal is a perfect model) and the histogram of the residuals
    (actual minus predicted)."""
    fig, (scatter, hist) = _figure(9.0, 3.8, ncols=2)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    scatter.scatter(actual, predicted, s=8, alpha=0.4, color=COLOURS[0], edgecolors="none", label="held-out rows")
    scatter.plot([low, high], [low, high], "--", color=COLOURS[1], label="predicted = actual")
    scatter.set(xlabel=f"actual {label}", ylabel=f"predicted {label}", title="Predicted against actual")
    scatter.legend(loc="upper left", fontsize=8)
    scatter.grid(alpha=0.3)
    residuals = actual - predicted
    hist.hist(residuals, bins=min(40, max(10, len(residuals) // 20)), color=COLOURS[0])
    hist.axvline(0, ls="--", color=COLOURS[1], label="no error")
    hist.axvline(float(residuals.mean()), color="black", label=f"mean {residuals.mean():+.3f}")
    hist.set(xlabel=f"residual (actual - predicted {label})", ylabel="rows", title="Residuals")
    hist.legend(loc="upper right", fontsize=8)
    hist.grid(alpha=0.3)
    return _render(fig, f"Predicted against actual {label} and the residuals on {len(actual)} held-out rows")


def residuals_by_slice(column: str, residuals: Mapping[str, np.ndarray]) -> Plot:
    """A box of the residuals (actual minus predicted) per slice value: where the model errs, and which way."""
    names = list(residuals)
    fig, ax = _figure(max(6.0, 0.9 * len(names) + 2), 3.6)
    ax.boxplot(
        [residuals[name] for name in names],
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": COLOURS[0], "alpha": 0.5},
        medianprops={"color": COLOURS[1]},
    )
    ax.set_xticks(range(1, len(names) + 1), [f"{name}\n({len(residuals[name])} rows)" for name in names])
    ax.axhline(0, ls="--", color="black", linewidth=1)
    ax.set(xlabel=column, ylabel="residual (actual - predicted)", title=f"Errors per {column} (boxes: quartiles)")
    ax.grid(axis="y", alpha=0.3)
    return _render(fig, f"Residuals per value of {column} on the held-out rows")


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


def search_trials(
    trials: Sequence[Mapping[str, Any]], dimensions: Mapping[str, str], metric: str, best: str | None
) -> Plot:
    """A search's trials: the metric (on each trial's last epoch) against each searched value, one panel per
    dimension (`dimensions`: name -> its kind; logUniform on a log axis), Stopped trials hollow, the best starred."""
    names = list(dimensions)
    fig, axes = _figure(max(4.0, 3.2 * len(names)), 3.2, ncols=len(names))
    axes = np.atleast_1d(axes)
    scored = [trial for trial in trials if trial.get("metric") is not None]
    for ax, name in zip(axes, names, strict=True):
        categorical = dimensions[name] == "choice" and any(isinstance(t["params"].get(name), str) for t in scored)
        levels = sorted({str(t["params"].get(name)) for t in scored})
        for status, marker, face in (("Completed", "o", COLOURS[0]), ("Stopped", "o", "none")):
            group = [t for t in scored if t["status"] == status]
            x = [levels.index(str(t["params"][name])) if categorical else t["params"][name] for t in group]
            ax.scatter(
                x,
                [t["metric"] for t in group],
                marker=marker,
                facecolors=face,
                edgecolors=COLOURS[0],
                label=status.lower(),
            )
        winner = next((t for t in scored if t["trial"] == best), None)
        if winner is not None:
            x = levels.index(str(winner["params"][name])) if categorical else winner["params"][name]
            ax.scatter([x], [winner["metric"]], marker="*", s=180, color=COLOURS[1], label=f"best ({best})", zorder=3)
        if categorical:
            ax.set_xticks(range(len(levels)), levels)
        if dimensions[name] == "logUniform":
            ticker = _pyplot().matplotlib.ticker
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels of a narrow range overlap
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.set(xlabel=name, ylabel=metric)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    failed = sum(t["status"] == "Failed" for t in trials)
    note = f"; {failed} failed trial(s) have no metric" if failed else ""
    return _render(fig, f"{metric} of {len(scored)} trials against {', '.join(names)}{note}")


def trial_curves(trials: Sequence[Mapping[str, Any]], key: str, metric: str, best: str | None) -> Plot:
    """Each trial's per-epoch metric (`key`, e.g. val_auc), the best trial's bold: where the scheduler stopped
    the others."""
    fig, ax = _figure(6.0, 3.4)
    for trial in trials:
        rows = [row for row in trial.get("perEpoch", []) if row.get(key) is not None]
        if not rows:
            continue
        winner = trial["trial"] == best
        ax.plot(
            [row["epoch"] for row in rows],
            [row[key] for row in rows],
            "o-" if winner else ".-",
            color=COLOURS[1] if winner else COLOURS[7],
            alpha=1.0 if winner else 0.5,
            linewidth=2.4 if winner else 1.0,
            label=f"best ({best})" if winner else None,
            zorder=3 if winner else 2,
        )
    ax.set(xlabel="epoch", ylabel=metric, title="Trials per epoch")
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(10, integer=True))
    ax.grid(alpha=0.3)
    if best:
        ax.legend(loc="best", fontsize=8)
    return _render(fig, f"{metric} per epoch of every trial; the best trial, {best}, bold")
