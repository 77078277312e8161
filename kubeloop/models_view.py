"""How registry records are shown on the terminal."""

from __future__ import annotations

import json

import yaml

from kubeloop.api.modelversion import Metrics, ModelVersion
from kubeloop.api.trainingjob import TASK_METRICS
from kubeloop.artifact import local_path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(records: list[ModelVersion]) -> str:
    if not records:
        return "no model versions registered (train one: kubeloop quickstart, or kubeloop run -f trainingjob.yaml)"
    rows = [("NAME", "STAGE", "TASK", "HEADLINE", "DATASET", "TRAINING JOB")]
    for mv in records:
        rows.append(
            (
                mv.metadata.name,
                mv.spec.stage,
                mv.spec.signature.task,
                headline(mv),
                mv.spec.lineage.dataset_digest[:19],
                mv.spec.lineage.training_job,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def headline(mv: ModelVersion) -> str:
    """The task's two headline metrics: AUC and accuracy (binary), accuracy and macro F1 (multiclass), RMSE and R²
    (regression)."""
    overall = mv.spec.metrics.overall
    names = HEADLINE[mv.spec.signature.task]
    return " ".join(f"{LABELS[name]}={_fmt(getattr(overall, name))}" for name in names)


HEADLINE = {"binary": ("roc_auc", "accuracy"), "multiclass": ("accuracy", "f1"), "regression": ("rmse", "r2")}
LABELS = {"roc_auc": "auc", "log_loss": "log_loss"}
LABELS |= {name: name for name in ("accuracy", "precision", "recall", "f1", "rmse", "mae", "r2")}


def metrics_line(metrics: Metrics, task: str = "binary") -> str:
    names = TASK_METRICS[task]
    return f"rows={metrics.rows} " + " ".join(f"{LABELS[name]}={_fmt(getattr(metrics, name))}" for name in names)


def detail(mv: ModelVersion) -> str:
    spec, lineage = mv.spec, mv.spec.lineage
    remote = spec.artifact_uri.startswith("s3://")  # shown as it is: not fetched to be listed
    lines = [
        f"{mv.metadata.name}  stage={spec.stage}" + (f" ({spec.stage_reason})" if spec.stage_reason else ""),
        f"  artifact:   {spec.artifact_uri if remote else local_path(spec.artifact_uri)}",
        f"  dataset:    {lineage.dataset_uri} {lineage.dataset_digest} rows={lineage.dataset_rows}",
        f"  trained by: {lineage.training_job} ({lineage.workers} workers, {lineage.backend})",
        f"  code:       {lineage.code_version}",
        f"  hyperparameters: {json.dumps(lineage.hyperparameters, sort_keys=True)}",
        f"  task:       {spec.signature.task}" + _answers(mv),
        f"  metrics:    {metrics_line(spec.metrics.overall, spec.signature.task)}",
    ]
    if spec.metrics.slices:
        for value, metrics in spec.metrics.slices.values.items():
            lines.append(f"    {spec.metrics.slices.column}={value}: {metrics_line(metrics, spec.signature.task)}")
    if spec.gate:
        verdict = "passed" if spec.gate.passed else "failed: " + "; ".join(spec.gate.reasons)
        against = f" (against {spec.gate.compared_with})" if spec.gate.compared_with else ""
        lines.append(f"  gate:       {verdict}{against}")
    lines.append("  inputs:     " + ", ".join(f"{f.name}:{f.dtype}" for f in spec.signature.inputs))
    return "\n".join(lines)


def _answers(mv: ModelVersion) -> str:
    signature = mv.spec.signature
    if signature.task == "binary":
        return f" (answers P({signature.label} = {signature.positive_class!r}))"
    if signature.task == "multiclass":
        return f" (answers P(class) for {signature.label} in this order: {', '.join(signature.classes or [])})"
    return f" (answers {signature.label})"


def dump(mv: ModelVersion, output: str) -> str:
    manifest = mv.to_manifest()
    return json.dumps(manifest, indent=2) if output == "json" else yaml.safe_dump(manifest, sort_keys=False)
