"""The model report: one self-contained HTML file (a model card) per ModelVersion, plots embedded as PNG data URIs.

Sections: data (snapshot, columns, the validation report re-run against the previous Production version's
snapshot), lineage and hyperparameters, training curves, the evaluation on the held-out rows (recomputed: the
lineage's digest, test fraction and seed, with the task, label and slice column, give the same split training
used, and the artifact's predictions on it), metrics per slice with their gap to overall, the gate's decision,
the comparison with the previous Production version, the stage history and, given the URL of a running
deployment's drift sidecar, its drift state.

The evaluation and slices sections follow spec.signature.task: binary, ROC / precision-recall and calibration, and
group fairness per slice; multiclass, metrics per class, the confusion matrix, one-vs-rest ROC curves and the class
balance of train and test; regression, predicted against actual, the residuals, and the errors per slice.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic.alias_generators import to_camel

import kubeloop
from kubeloop import config
from kubeloop.api.modelversion import Metrics, ModelVersion, Signature, Task
from kubeloop.api.trainingjob import TASK_METRICS
from kubeloop.api.validation import ValidationReport
from kubeloop.errors import KubeloopError
from kubeloop.evaluation import LOWER_IS_BETTER
from kubeloop.log import event
from kubeloop.registry import Registry
from kubeloop.report import plots
from kubeloop.report.drift import DriftView, read_drift

log = logging.getLogger(__name__)

DASH = "\u2013"  # an en dash: "no value"
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
SECTIONS = (
    ("summary", "Summary"),
    ("data", "Data"),
    ("training", "Training"),
    ("evaluation", "Evaluation"),
    ("slices", "Slices and fairness"),
    ("gate", "Gate"),
    ("comparison", "Against Production"),
    ("history", "Stage history"),
    ("drift", "Drift"),
)


def default_path(record: ModelVersion) -> Path:
    return config.home() / "reports" / f"{record.spec.model}-v{record.spec.version}.html"


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


@dataclass
class Notes:
    """What a section could not show, and why (a missing snapshot, an artifact elsewhere): said in the report."""

    items: dict[str, list[str]] = field(default_factory=dict)

    def add(self, section: str, text: str) -> None:
        self.items.setdefault(section, []).append(text)

    def html(self, section: str) -> str:
        return "".join(f'<p class="note">{html.escape(t)}</p>' for t in self.items.get(section, []))


# ---- gathering -----------------------------------------------------------------------------------------------------


def previous_production(record: ModelVersion, registry: Registry) -> ModelVersion | None:
    """The Production version this one is measured against: the one its gate compared with, else the current
    Production version (when that is another version), else None."""
    others = [mv for mv in registry.list(record.spec.model) if mv.spec.version != record.spec.version]
    compared = record.spec.gate.compared_with if record.spec.gate else None
    if compared:
        found = next((mv for mv in others if mv.metadata.name == compared), None)
        if found is not None:
            return found
    return next((mv for mv in others if mv.spec.stage == "Production"), None)


def held_out(record: ModelVersion) -> HeldOut:
    """Recompute the test split from the lineage (snapshot digest, testFraction, seed) and the record's task, label
    and slice column, with the training job's split function, and predict on it."""
    from kubeloop.artifact import local_path
    from kubeloop.data.snapshot import load_snapshot, read_frame
    from kubeloop.training.split import split_rows

    spec = record.spec
    lineage = spec.lineage
    local_path(spec.artifact_uri)  # an artifact elsewhere (s3://...): say so before reading anything
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


def validation_report(record: ModelVersion, previous: ModelVersion | None) -> tuple[Any, ValidationReport, str]:
    """The training snapshot and its validation report: the one recorded at training (spec.validation, the same
    as the TrainingJob's status), else (a version from before it was recorded) re-run against the previous
    Production version's snapshot. Raises KubeloopError when the snapshot is not in this machine's store."""
    from kubeloop.data.snapshot import load_snapshot
    from kubeloop.data.validation import validate

    snapshot = load_snapshot(record.spec.lineage.dataset_digest)
    if record.spec.validation is not None:
        return snapshot, record.spec.validation, "as recorded when the version was trained"
    baseline = load_snapshot(previous.spec.lineage.dataset_digest) if previous is not None else None
    report = validate(snapshot, None, baseline, label=record.spec.signature.label)
    against = (
        f"against the snapshot of {_e(previous.metadata.name)}"
        if baseline is not None and previous is not None
        else "without a baseline (no earlier Production version)"
    )
    return snapshot, report, f"re-run {against} (none was recorded for this version)"


# ---- HTML helpers --------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float | int | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _figure(plot: plots.Plot, caption: str) -> str:
    return f'<figure><img src="{plot.data_uri()}" alt="{_e(plot.alt)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _short(digest: str) -> str:
    return digest[:19] + "…" if len(digest) > 19 else digest


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{_e(text)}</span>'


def _gap(name: str, delta: float | None) -> str:
    return f'<span class="gap {_delta_class(name, delta)}">{_signed(delta)}</span>'


def _delta_class(name: str, delta: float | None) -> str:
    if name in NEUTRAL or delta is None or not math.isfinite(delta) or abs(delta) < 1e-12:
        return ""
    better = delta < 0 if name in LOWER_IS_BETTER else delta > 0
    return "better" if better else "worse"


def _name(metric: str, task: Task) -> str:
    name = NAMES.get(metric, metric.replace("_", " "))
    return f"{name} (macro)" if task == "multiclass" and metric in MACRO else name


def _same(recorded: float | None, recomputed: float | None) -> bool:
    if recorded is None or recomputed is None:
        return recorded is None and recomputed is None
    return math.isclose(recorded, recomputed, rel_tol=1e-6, abs_tol=1e-4)


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _codes(values: Iterable[str]) -> str:
    return ", ".join(f"<code>{_e(v)}</code>" for v in values)


# ---- sections ------------------------------------------------------------------------------------------------------


def _summary(record: ModelVersion, previous: ModelVersion | None, test: HeldOut | None) -> str:
    spec, overall = record.spec, record.spec.metrics.overall
    task = spec.signature.task
    gate = spec.gate
    verdict = "no gate recorded" if gate is None else ("gate passed" if gate.passed else "gate failed")
    rows = [
        ("model", f"<code>{_e(spec.model)}</code> version {spec.version}"),
        ("stage", _badge(spec.stage, spec.stage.lower()) + (f" {_e(spec.stage_reason)}" if spec.stage_reason else "")),
        ("task", _e(task)),
        *((_name(name, task), _num(getattr(overall, name))) for name in HEADLINE[task]),
        ("gate", _badge(verdict, "passed" if gate and gate.passed else "failed" if gate else "none")),
        ("compared with", _e(previous.metadata.name) if previous else "no earlier Production version"),
        ("artifact", f"<code>{_e(spec.artifact_uri)}</code>"),
        ("inputs", ", ".join(f"<code>{_e(f.name)}</code>:{_e(f.dtype)}" for f in spec.signature.inputs)),
        ("label", _label(spec.signature, overall, test)),
    ]
    return _kv(rows)


def _label(signature: Signature, overall: Metrics, test: HeldOut | None) -> str:
    """What the label is: the positive class (binary), the classes in output order (multiclass), the value's
    range in the label's own units (regression)."""
    label = f"<code>{_e(signature.label)}</code>"
    if signature.task == "binary":
        return f"{label} (positive class {_e(signature.positive_class)}; the model answers P(positive))"
    if signature.task == "multiclass":
        classes = signature.classes or []
        return (
            f"{label} ({len(classes)} classes; the model answers a probability for each, in order: {_codes(classes)})"
        )
    if test is not None and len(test.labels):
        values = test.labels.astype(float)
        spread = (
            f"on the held-out rows from {values.min():.4g} to {values.max():.4g}, "
            f"mean {values.mean():.4g}, std {values.std():.4g}"
        )
    else:
        spread = f"mean {_num(overall.label_mean)} on the held-out rows"
    return f"{label} (the model answers its value, in the label's own units: {spread})"


def _data(record: ModelVersion, previous: ModelVersion | None, notes: Notes) -> str:
    lineage = record.spec.lineage
    parts = [
        _kv(
            [
                ("dataset", f"<code>{_e(lineage.dataset_uri)}</code>"),
                ("digest", f"<code>{_e(lineage.dataset_digest)}</code>"),
                ("rows", _num(lineage.dataset_rows)),
            ]
        )
    ]
    try:
        snapshot, report, how = validation_report(record, previous)
    except KubeloopError as error:
        notes.add("data", f"the snapshot is not in this machine's store ({error}); no column statistics or validation")
        return "".join(parts) + notes.html("data")
    parts.append(f"<p>Snapshot stored from <code>{_e(snapshot.source)}</code> on {_e(snapshot.created)}.</p>")
    rows = []
    for name, dtype in snapshot.columns.items():
        stats = snapshot.stats[name]
        if stats.categories:
            top = sorted(stats.categories.items(), key=lambda kv: -kv[1])[:4]
            shape = ", ".join(f"{_e(k)} {v / max(1, snapshot.rows):.0%}" for k, v in top)
        else:
            shape = (
                f"mean {_num(stats.mean, 2)} ± {_num(stats.std, 2)}, range [{_num(stats.min, 2)}, {_num(stats.max, 2)}]"
            )
        rows.append((f"<code>{_e(name)}</code>", _e(dtype), f"{stats.null_rate:.1%}", shape))
    parts.append(_table(["column", "dtype", "nulls", "distribution"], rows))
    baseline = f" Baseline <code>{_e(report.baseline_digest)}</code>." if report.baseline_digest else ""
    verdict = _badge("OK" if report.ok else "FAILED", "passed" if report.ok else "failed")
    parts.append(f'<h3 id="validation">Validation report</h3><p>{verdict} {how}.{baseline}</p>')
    if report.findings:
        parts.append(
            _table(
                ["severity", "column", "rule", "finding"],
                [
                    (
                        _badge(f.severity, "failed" if f.severity == "error" else "warning"),
                        _e(f.column or DASH),
                        _e(f.rule),
                        _e(f.message),
                    )
                    for f in report.findings
                ],
            )
        )
    else:
        parts.append("<p>No findings.</p>")
    if report.distances:
        parts.append(
            "<p>Distance of each column's distribution from the baseline's (L-infinity over category shares, "
            "Jensen-Shannon or PSI over numeric bins), against its threshold:</p>"
            + _table(
                ["column", "metric", "distance", "threshold", "over it is", "what moved"],
                [
                    (
                        f"<code>{_e(d.column)}</code>",
                        _e(d.metric),
                        _badge(_num(d.value), "failed" if d.exceeded and d.severity == "error" else "passed")
                        if d.exceeded
                        else _num(d.value),
                        _num(d.threshold),
                        _e(d.severity),
                        _e(d.moved() or DASH),
                    )
                    for d in report.distances
                ],
            )
        )
    parts.append(f"<details><summary>as text</summary><pre>{_e(report.to_text())}</pre></details>")
    return "".join(parts)


def _training(record: ModelVersion) -> str:
    lineage = record.spec.lineage
    parts = [
        _kv(
            [
                ("training job", _e(lineage.training_job)),
                ("builder", f"<code>{_e(lineage.builder)}</code>"),
                ("workers", f"{lineage.workers} ({_e(lineage.backend)})"),
                ("code", f"<code>{_e(lineage.code_version)}</code>"),
                ("image", f"<code>{_e(lineage.image)}</code>" if lineage.image else DASH),
            ]
        ),
        '<h3 id="hyperparameters">Hyperparameters</h3>',
        _table(
            ["name", "value"],
            [
                (f"<code>{_e(k)}</code>", f"<code>{_e(json.dumps(v))}</code>")
                for k, v in sorted(lineage.hyperparameters.items())
            ],
            "narrow",
        ),
        '<h3 id="curves">Training curves</h3>',
    ]
    per_epoch = record.spec.metrics.per_epoch
    if per_epoch:
        loss = LOSS[record.spec.signature.task]
        parts.append(
            _figure(
                plots.training_curves(per_epoch, loss), f"Loss ({loss}) and validation metric per epoch (bars: seconds)"
            )
        )
        recorded = {k for row in per_epoch for k in row}
        keys = ["epoch", "train_loss", "val_loss"]
        keys += [*sorted(recorded - {*keys, "epoch_seconds"}), "epoch_seconds"]
        table = _table(
            keys,
            [
                [
                    _num(int(v)) if k == "epoch" and v is not None else _num(v, 4)
                    for k, v in ((k, row.get(k)) for k in keys)
                ]
                for row in per_epoch
            ],
        )
        long = len(per_epoch) > 12
        parts.append(f"<details><summary>{len(per_epoch)} epochs</summary>{table}</details>" if long else table)
    else:
        parts.append('<p class="note">The record holds no per-epoch metrics.</p>')
    from kubeloop.report.search import search_html  # imports this module's helpers

    parts.append(search_html(record))
    return "".join(parts)


def _evaluation(record: ModelVersion, test: HeldOut | None, notes: Notes) -> str:
    overall = record.spec.metrics.overall
    task = record.spec.signature.task
    names = ("rows", *METRICS[task])
    recomputed = test.metrics() if test is not None else None
    headers = ["metric", "recorded"] + (["recomputed on the held-out rows"] if recomputed else [])
    rows = [
        (
            _e(_name(name, task)),
            _num(getattr(overall, name)),
            *([_num(getattr(recomputed, name))] if recomputed else []),
        )
        for name in names
    ]
    parts = [_table(headers, rows, "narrow")]
    if task == "multiclass":
        parts.append(
            "<p>Precision, recall, F1 and ROC AUC (each class against the rest) are macro averages over the "
            "classes.</p>"
        )
    if test is None or recomputed is None:
        return "".join(parts) + notes.html("evaluation")
    differ = [name for name in names if not _same(getattr(overall, name), getattr(recomputed, name))]
    check = (
        "the recorded metrics are reproduced"
        if not differ
        else f"the recomputed {', '.join(_name(n, task) for n in differ)} are NOT the recorded figures"
    )
    parts.append(f"<p>Evaluated on {_e(test.how)}; {_e(check)}.</p>")
    if task == "binary":
        parts.append(_binary_curves(test))
    elif task == "multiclass":
        parts.append(_per_class(test))
    else:
        parts.append(_residuals(test, record.spec.signature.label))
    return "".join(parts)


def _binary_curves(test: HeldOut) -> str:
    parts = []
    if 0 < test.labels.sum() < len(test.labels):
        parts.append(
            _figure(plots.roc_and_pr(test.labels, test.outputs, float(test.labels.mean())), "ROC and precision-recall")
        )
    else:
        parts.append('<p class="note">The held-out rows hold a single class: no ROC or precision-recall curve.</p>')
    figure, ece = plots.calibration(test.labels.astype(float), test.outputs)
    parts.append(_figure(figure, f"Calibration (expected calibration error {ece:.3f})"))
    return "".join(parts)


def _per_class(test: HeldOut) -> str:
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
        rows.append(
            (
                f"<code>{_e(name)}</code>",
                _num(int(support[i])),
                _num(int(predicted_counts[i])),
                _num(float(precision[i])),
                _num(float(recall[i])),
                _num(float(f1[i])),
                _num(auc),
            )
        )
    counts = sk.confusion_matrix(labels, predicted, labels=every)
    parts = [
        '<h3 id="per-class">Per class</h3>',
        _table(["class", "rows", "predicted", "precision", "recall", "F1", "ROC AUC (vs rest)"], rows),
        '<h3 id="confusion">Confusion matrix</h3>',
        _figure(plots.confusion_matrix(counts, classes), "Held-out rows by true class (rows) and predicted class"),
        "<details><summary>as a table</summary>"
        + _table(
            ["true \\ predicted", *classes],
            [
                (f"<code>{_e(name)}</code>", *(_num(int(c)) for c in row))
                for name, row in zip(classes, counts, strict=True)
            ],
        )
        + "</details>",
        _figure(plots.roc_one_vs_rest(labels, proba, classes), "ROC curves, each class against the rest"),
    ]
    sets = {"held-out": np.bincount(labels, minlength=len(classes))}
    if test.train_labels is not None:
        sets = {"train": np.bincount(test.train_labels, minlength=len(classes)), **sets}
    balance = []
    for i, name in enumerate(classes):
        cells = [f"<code>{_e(name)}</code>"]
        for values in sets.values():
            cells += [_num(int(values[i])), f"{values[i] / max(1, values.sum()):.1%}"]
        balance.append(cells)
    parts += [
        '<h3 id="class-balance">Class balance</h3>',
        _table(["class", *(f"{name} {what}" for name in sets for what in ("rows", "share"))], balance),
        _figure(plots.class_balance(classes, sets), "Share of each class in " + " and ".join(sets)),
    ]
    return "".join(parts)


def _residuals(test: HeldOut, label: str) -> str:
    """Regression: how far off the predictions are, which way, and where."""
    actual, predicted = test.labels.astype(float), test.outputs.astype(float)
    residuals = actual - predicted
    errors = np.abs(residuals)
    summary = _kv(
        [
            ("mean residual (actual - predicted)", _signed(float(residuals.mean())) + " (positive: predicts too low)"),
            ("residual standard deviation", _num(float(residuals.std()))),
            ("median absolute error", _num(float(np.median(errors)))),
            ("90th percentile absolute error", _num(float(np.quantile(errors, 0.9)))),
            ("largest absolute error", _num(float(errors.max()))),
        ]
    )
    return (
        '<h3 id="residuals">Predictions and residuals</h3>'
        + summary
        + _figure(plots.regression_fit(actual, predicted, label), "Predicted against actual, and the residuals")
    )


def _slices(record: ModelVersion, test: HeldOut | None) -> str:
    sliced = record.spec.metrics.slices
    if sliced is None:
        return "<p>The training run declared no slice column (spec.dataset.sliceColumn).</p>"
    overall = record.spec.metrics.overall
    task = record.spec.signature.task
    names = SLICE_METRICS[task]
    described, describe = {
        "binary": ("positive rate", lambda m: _num(m.positive_rate)),
        "multiclass": ("classes", lambda m: ", ".join(f"{_e(c)} {r:.0%}" for c, r in (m.class_rates or {}).items())),
        "regression": ("label mean", lambda m: _num(m.label_mean)),
    }[task]
    rows = []
    for value, metrics in sliced.values.items():
        cells = [f"<code>{_e(value)}</code>", _num(metrics.rows), describe(metrics)]
        for name in names:
            mine = getattr(metrics, name)
            cells.append(f"{_num(mine)} {_gap(name, _delta(mine, getattr(overall, name)))}")
        rows.append(cells)
    plotted = SLICE_PLOT[task]
    parts = [
        f"<p>Metrics per value of <code>{_e(sliced.column)}</code>; small figures: the gap to the overall value "
        "(green better, red worse).</p>",
        _table(["value", "rows", described, *(_name(n, task) for n in names)], rows),
        _figure(
            plots.slices(
                sliced.column,
                {v: {_name(n, task): getattr(m, n) for n in plotted} for v, m in sliced.values.items()},
                {_name(n, task): getattr(overall, n) for n in plotted},
            ),
            f"Metrics per {sliced.column}",
        ),
    ]
    if test is not None and sliced.column in test.frame.columns:
        if task == "binary":
            parts.append(_fairness(sliced.column, test))
        elif task == "regression":
            parts.append(_slice_errors(sliced.column, test))
    return "".join(parts)


def _groups(test: HeldOut, column: str) -> np.ndarray:
    return test.frame[column].astype("string").fillna("(null)").to_numpy()


def _slice_errors(column: str, test: HeldOut) -> str:
    """Regression: the residuals of each slice value's held-out rows, as boxes."""
    groups = _groups(test, column)
    residuals = test.labels.astype(float) - test.outputs.astype(float)
    by_group = {group: residuals[groups == group] for group in sorted(set(groups))}
    return '<h3 id="slice-errors">Errors per slice on the held-out rows</h3>' + _figure(
        plots.residuals_by_slice(column, by_group), f"Residuals (actual - predicted) per {column}"
    )


def _fairness(column: str, test: HeldOut) -> str:
    """Group fairness at threshold 0.5 on the held-out rows: selection rate, TPR and FPR per group."""
    groups = _groups(test, column)
    predicted = test.outputs >= 0.5
    rows, selection, tprs, fprs = [], [], [], []
    for group in sorted(set(groups)):
        mask = groups == group
        labels, chosen = test.labels[mask] == 1, predicted[mask]
        rate = float(chosen.mean()) if mask.any() else float("nan")
        tpr = float(chosen[labels].mean()) if labels.any() else float("nan")
        fpr = float(chosen[~labels].mean()) if (~labels).any() else float("nan")
        selection.append(rate)
        tprs.append(tpr)
        fprs.append(fpr)
        rows.append((f"<code>{_e(group)}</code>", _num(int(mask.sum())), _num(rate), _num(tpr), _num(fpr)))

    def spread(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return max(finite) - min(finite) if finite else float("nan")

    finite_sel = [v for v in selection if math.isfinite(v)]
    impact = min(finite_sel) / max(finite_sel) if finite_sel and max(finite_sel) > 0 else float("nan")
    summary = _kv(
        [
            ("demographic parity difference", _num(spread(selection))),
            (
                "disparate impact ratio (min/max selection rate)",
                _num(impact) + (" (below the 0.8 rule of thumb)" if impact < 0.8 else ""),
            ),
            ("equal opportunity difference (TPR spread)", _num(spread(tprs))),
            ("equalized odds difference (max of TPR, FPR spread)", _num(max(spread(tprs), spread(fprs)))),
        ]
    )
    return (
        '<h3 id="fairness">Group fairness on the held-out rows (threshold 0.5)</h3>'
        + _table([column, "rows", "selection rate", "true positive rate", "false positive rate"], rows)
        + summary
    )


def _gate(record: ModelVersion, previous: ModelVersion | None) -> str:
    gate = record.spec.gate
    if gate is None:
        return "<p>No gate decision is recorded for this version.</p>"
    task = record.spec.signature.task
    verdict = _badge("passed" if gate.passed else "failed", "passed" if gate.passed else "failed")
    against = (
        f" against Production {_e(gate.compared_with)}"
        if gate.compared_with
        else " (no Production version to compare with)"
    )
    reasons = (
        "".join(f"<li>{_e(r)}</li>" for r in gate.reasons) or "<li>every threshold and regression margin held</li>"
    )
    reference = previous if previous is not None and previous.metadata.name == gate.compared_with else None
    mine = record.spec.metrics.overall
    headers = ["metric", f"v{record.spec.version}", "threshold"]
    if reference is not None:
        headers += [f"Production v{reference.spec.version}", "delta", "allowed regression"]
    rows = []
    for name in TASK_METRICS[task]:
        value = getattr(mine, name)
        bound = gate.thresholds.get(to_camel(name))
        side = "≤" if name in LOWER_IS_BETTER else "≥"
        cells = [_e(_name(name, task)), _num(value), f"{side} {_num(bound)}" if bound is not None else DASH]
        if reference is not None:
            before = getattr(reference.spec.metrics.overall, name)
            allowed = gate.max_regression.get(to_camel(name))
            cells += [_num(before), _gap(name, _delta(value, before)), _num(allowed) if allowed is not None else DASH]
        rows.append(cells)
    return (
        f"<p>{verdict} The gate{against}, on the {_e(task)} metrics of the held-out rows (bounds: the training "
        "job's spec.gate.thresholds, and spec.gate.maxRegression against Production).</p>"
        f"<ul>{reasons}</ul>" + _table(headers, rows, "narrow")
    )


def _comparison(record: ModelVersion, previous: ModelVersion | None) -> str:
    if previous is None:
        return "<p>No earlier Production version: nothing to compare with.</p>"
    task, theirs = record.spec.signature.task, previous.spec.signature.task
    if task == theirs:
        parts = [
            f"<p>Recorded metrics of v{record.spec.version} against {_e(previous.metadata.name)} "
            f"({_e(previous.spec.stage)}); each on its own held-out rows.</p>",
            _metric_comparison(record, previous),
        ]
    else:
        parts = [
            f"<p>{_e(previous.metadata.name)} ({_e(previous.spec.stage)}) is a {_e(theirs)} model, this one "
            f"{_e(task)}: their metrics do not compare. Lineage only.</p>"
        ]
    parts.append(_lineage_comparison(record, previous))
    return "".join(parts)


def _metric_comparison(record: ModelVersion, previous: ModelVersion) -> str:
    task = record.spec.signature.task
    mine, theirs = record.spec.metrics.overall, previous.spec.metrics.overall
    rows = []
    for name in METRICS[task]:
        a, b = getattr(mine, name), getattr(theirs, name)
        rows.append((_e(_name(name, task)), _num(a), _num(b), _gap(name, _delta(a, b))))
    parts = [_table(["metric", f"v{record.spec.version}", f"v{previous.spec.version}", "delta"], rows)]
    a_slices, b_slices = record.spec.metrics.slices, previous.spec.metrics.slices
    if a_slices and b_slices and a_slices.column == b_slices.column:
        slice_rows = []
        for value in sorted(set(a_slices.values) | set(b_slices.values)):
            a_m, b_m = a_slices.values.get(value), b_slices.values.get(value)
            for name in HEADLINE[task]:
                a = getattr(a_m, name) if a_m else None
                b = getattr(b_m, name) if b_m else None
                slice_rows.append(
                    (f"<code>{_e(value)}</code>", _e(_name(name, task)), _num(a), _num(b), _gap(name, _delta(a, b)))
                )
        parts.append(
            _table(
                [a_slices.column, "metric", f"v{record.spec.version}", f"v{previous.spec.version}", "delta"], slice_rows
            )
        )
    return "".join(parts)


def _lineage_comparison(record: ModelVersion, previous: ModelVersion) -> str:
    lineage_rows = []
    for label, a, b in (
        ("dataset digest", _short(record.spec.lineage.dataset_digest), _short(previous.spec.lineage.dataset_digest)),
        ("rows", record.spec.lineage.dataset_rows, previous.spec.lineage.dataset_rows),
        ("code", record.spec.lineage.code_version, previous.spec.lineage.code_version),
        ("builder", record.spec.lineage.builder, previous.spec.lineage.builder),
    ):
        lineage_rows.append((label, f"<code>{_e(a)}</code>", f"<code>{_e(b)}</code>", "same" if a == b else "changed"))
    params_a, params_b = record.spec.lineage.hyperparameters, previous.spec.lineage.hyperparameters
    for key in sorted(set(params_a) | set(params_b)):
        if params_a.get(key) != params_b.get(key):
            lineage_rows.append(
                (
                    f"hyperparameter {_e(key)}",
                    _e(json.dumps(params_a.get(key))),
                    _e(json.dumps(params_b.get(key))),
                    "changed",
                )
            )
    return _table(["lineage", f"v{record.spec.version}", f"v{previous.spec.version}", ""], lineage_rows)


def _history(record: ModelVersion) -> str:
    changes = record.status.stage_history if record.status else []
    if not changes:
        return "<p>No stage changes recorded.</p>"
    return _table(
        ["time (UTC)", "stage", "reason"],
        [
            (_e(c.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")), _badge(c.stage, c.stage.lower()), _e(c.reason))
            for c in changes
        ],
    )


def _drift(record: ModelVersion, sidecar: str | None, notes: Notes) -> str:
    if sidecar is None:
        return (
            "<p>No running deployment was given. For a live drift view: "
            "<code>kubeloop models report NAME:VERSION</code> while <code>kubeloop run</code> or the quickstart serves "
            "it (or with <code>--sidecar URL</code>).</p>"
        )
    try:
        view = read_drift(sidecar, record.spec.version)
    except KubeloopError as error:
        notes.add("drift", f"the drift sidecar could not be read: {error}")
        return notes.html("drift")
    return drift_section(view)


def drift_section(view: DriftView) -> str:
    state = view.state
    parts = [
        _kv(
            [
                ("sidecar", f"<code>{_e(view.url)}</code> ({_e(view.detector)}, window {view.window} rows)"),
                ("state", _badge(state, {"Drift": "failed", "NoDrift": "passed"}.get(state, "none"))),
                ("rule", _e(view.rule)),
                (
                    "windows",
                    f"{view.windows_evaluated} evaluated, {view.windows_flagged} flagged, "
                    f"{view.windows_in_drift} in Drift, {view.windows_dropped} dropped",
                ),
                (
                    "recent windows",
                    "".join(_badge("\u25a0", "failed" if f else "passed") for f in view.recent_flags) or DASH,
                ),
                (
                    "events received",
                    f"{_num(int(view.events_received))} "
                    f"({', '.join(f'{k} {_num(int(v))}' for k, v in sorted(view.received_by_type.items()))})",
                ),
                ("events malformed", _num(int(view.events_malformed))),
                ("events dropped", _num(int(view.events_dropped)) + " (windows the detector had no room for)"),
                ("rows this version", _num(view.rows)),
                ("predictions", _e(view.predictions_text())),
            ]
        )
    ]
    if view.history:
        parts.append(_figure(plots.p_value_history(view.history, view.threshold), "p-value per feature over time"))
    last = view.last_window
    if last:
        title = f"Last window ({last.get('rows')} rows): {'flagged' if last.get('flagged') else 'not flagged'}"
        parts.append(_figure(plots.p_values(last.get("pValues") or {}, view.threshold, title), title))
        rows = []
        for feature, p in (last.get("pValues") or {}).items():
            adjusted = (last.get("adjustedPValues") or {}).get(feature)
            drifted = feature in (last.get("driftedFeatures") or [])
            rows.append(
                (
                    f"<code>{_e(feature)}</code>",
                    _e((last.get("tests") or {}).get(feature, "")),
                    _num(p, 4),
                    _num(adjusted, 4),
                    _num((last.get("distances") or {}).get(feature), 4),
                    _badge("drift", "failed") if drifted else "",
                )
            )
        parts.append(_table(["feature", "test", "p-value", "adjusted p", "distance", ""], rows))
    else:
        parts.append(f'<p class="note">No window evaluated yet ({view.window_fill} of {view.window} rows filled).</p>')
    if view.skew:
        statistics = sorted({s for stats in view.skew.values() for s in stats})
        parts.append('<h3 id="skew">Training/serving skew (last window)</h3>')
        parts.append(
            _table(
                ["feature", *statistics],
                [
                    (f"<code>{_e(f)}</code>", *(_num(stats.get(s)) for s in statistics))
                    for f, stats in view.skew.items()
                ],
            )
        )
    return "".join(parts)


# ---- the document --------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:14px;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 32px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#c8cdd6;font-size:13px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #dde1e7;font-size:13px}
nav a{margin-right:14px;color:#2458b3;text-decoration:none}
main{padding:8px 32px 40px;max-width:1100px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:4px 20px 16px;margin:16px 0}
h2{font-size:19px;border-bottom:1px solid #eceef2;padding-bottom:6px}h3{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{padding:4px 10px;border-bottom:1px solid #eceef2;
text-align:left;vertical-align:top}thead th{background:#f0f2f5}table.kv th{font-weight:600;color:#4a5263;width:220px}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eceef2}figcaption{font-size:12px;color:#5b6374}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;background:#e4e7ec}
.badge.passed,.badge.production{background:#d6f0dc;color:#17652c}.badge.failed,.badge.rejected{background:#f9d9d9;color:#8f1d1d}
.badge.warning,.badge.candidate{background:#fcefd0;color:#7a5200}.badge.archived{background:#e4e7ec;color:#4a5263}
.gap{font-size:11px;color:#5b6374}.gap.better{color:#17652c}.gap.worse{color:#b02020}
.note{color:#7a5200;background:#fff8e6;padding:6px 10px;border-radius:4px;font-size:13px}
pre{background:#f0f2f5;padding:8px;font-size:12px;overflow-x:auto}
"""


def render(record: ModelVersion, registry: Registry, sidecar: str | None = None) -> str:
    """The report's HTML (one string, no external resources)."""
    notes = Notes()
    previous = previous_production(record, registry)
    test: HeldOut | None = None
    try:
        test = held_out(record)
    except (KubeloopError, OSError) as error:
        notes.add("evaluation", f"no curves: the held-out rows could not be scored here ({error})")
    bodies = {
        "summary": _summary(record, previous, test),
        "data": _data(record, previous, notes),
        "training": _training(record),
        "evaluation": _evaluation(record, test, notes),
        "slices": _slices(record, test),
        "gate": _gate(record, previous),
        "comparison": _comparison(record, previous),
        "history": _history(record),
        "drift": _drift(record, sidecar, notes),
    }
    spec = record.spec
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{_e(title)}</h2>{bodies[key]}</section>' for key, title in SECTIONS)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(record.metadata.name)} · kubeloop model report</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
        f"<header><h1>{_e(spec.model)} v{spec.version} <small>{_badge(spec.stage, spec.stage.lower())}</small></h1>"
        f"<p>kubeloop {kubeloop.__version__} model report · generated {generated} · "
        f"trained by {_e(spec.lineage.training_job)}</p></header>"
        f"<nav>{nav}</nav><main>{sections}</main></body></html>\n"
    )


def write_report(
    record: ModelVersion, registry: Registry | None = None, out: Path | None = None, *, sidecar: str | None = None
) -> Path:
    """Write the model card of `record` (default $KUBELOOP_HOME/reports/<model>-v<N>.html) and return its path.

    `sidecar`: the base URL of a running deployment's drift sidecar (adds its live drift state).
    """
    registry = registry or Registry()
    path = Path(out) if out is not None else default_path(record)
    document = render(record, registry, sidecar)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as stream:
        stream.write(document)
    os.chmod(stream.name, 0o644)  # a report is for reading (NamedTemporaryFile creates 0600)
    os.replace(stream.name, path)
    event(log, "report.written", model_version=record.metadata.name, path=str(path), bytes=len(document))
    return path
