"""How registry records are shown on the terminal."""

from __future__ import annotations

import json

import yaml

from kubeloop.api.modelversion import Metrics, ModelVersion
from kubeloop.artifact import local_path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(records: list[ModelVersion]) -> str:
    if not records:
        return "no model versions registered (train one: kubeloop quickstart, or kubeloop run -f trainingjob.yaml)"
    rows = [("NAME", "STAGE", "AUC", "ACCURACY", "DATASET", "TRAINING JOB")]
    for mv in records:
        overall = mv.spec.metrics.overall
        rows.append(
            (
                mv.metadata.name,
                mv.spec.stage,
                _fmt(overall.roc_auc),
                _fmt(overall.accuracy),
                mv.spec.lineage.dataset_digest[:19],
                mv.spec.lineage.training_job,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def metrics_line(metrics: Metrics) -> str:
    return (
        f"rows={metrics.rows} auc={_fmt(metrics.roc_auc)} accuracy={_fmt(metrics.accuracy)} "
        f"precision={_fmt(metrics.precision)} recall={_fmt(metrics.recall)} log_loss={_fmt(metrics.log_loss)}"
    )


def detail(mv: ModelVersion) -> str:
    spec, lineage = mv.spec, mv.spec.lineage
    lines = [
        f"{mv.metadata.name}  stage={spec.stage}" + (f" ({spec.stage_reason})" if spec.stage_reason else ""),
        f"  artifact:   {local_path(spec.artifact_uri)}",
        f"  dataset:    {lineage.dataset_uri} {lineage.dataset_digest} rows={lineage.dataset_rows}",
        f"  trained by: {lineage.training_job} ({lineage.workers} workers, {lineage.backend})",
        f"  code:       {lineage.code_version}",
        f"  hyperparameters: {json.dumps(lineage.hyperparameters, sort_keys=True)}",
        f"  metrics:    {metrics_line(spec.metrics.overall)}",
    ]
    if spec.metrics.slices:
        for value, metrics in spec.metrics.slices.values.items():
            lines.append(f"    {spec.metrics.slices.column}={value}: {metrics_line(metrics)}")
    if spec.gate:
        verdict = "passed" if spec.gate.passed else "failed: " + "; ".join(spec.gate.reasons)
        against = f" (against {spec.gate.compared_with})" if spec.gate.compared_with else ""
        lines.append(f"  gate:       {verdict}{against}")
    lines.append("  inputs:     " + ", ".join(f"{f.name}:{f.dtype}" for f in spec.signature.inputs))
    return "\n".join(lines)


def dump(mv: ModelVersion, output: str) -> str:
    manifest = mv.to_manifest()
    return json.dumps(manifest, indent=2) if output == "json" else yaml.safe_dump(manifest, sort_keys=False)
