"""Run a BatchPrediction: resolve the version, check the input's columns, score on Ray Data, test drift, commit.

The same function runs in `kubeloop run -f` and as the entrypoint of the operator's RayJob; there it also
publishes its status (progress every few seconds, then the outcome) into the RayJob's result ConfigMap.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from kubeloop.api.batchprediction import BatchPrediction, BatchPredictionStatus
from kubeloop.api.common import quantity_value
from kubeloop.api.modelversion import ModelVersion
from kubeloop.batch import drift
from kubeloop.batch.output import StagedOutput
from kubeloop.batch.scorer import REJECTED_DIR, BatchScorer, output_columns, prediction_columns
from kubeloop.batch.signature_check import check_schema
from kubeloop.batch.source import Source, open_source
from kubeloop.data.snapshot import load_snapshot
from kubeloop.errors import DataError, KubeloopError
from kubeloop.in_cluster import publish
from kubeloop.log import event
from kubeloop.registry import Registry
from kubeloop.training.job import code_version
from kubeloop.training.ray_runner import connect

log = logging.getLogger(__name__)

LINEAGE = "_lineage.json"
RESULT_KEY = "batchprediction.yaml"
PUBLISH_EVERY_S = 5.0
LOG_EVERY_S = 1.0


@dataclass
class Tally:
    """What the summaries of the scored batches add up to."""

    rows: int = 0
    scored: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    out_of_range: Counter[str] = field(default_factory=Counter)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)

    def add(self, summary: dict[str, Any]) -> None:
        self.rows += summary["rows"]
        self.scored += summary["scored"]
        self.reasons.update(json.loads(summary["reasons"]))
        self.out_of_range.update(json.loads(summary["out_of_range"]))
        for name, counts in json.loads(summary["counts"]).items():
            self.counts[name] = self.counts.get(name, 0) + np.asarray(counts, dtype=np.int64)
        self.files.update(name for name in (summary["part"], summary["rejected_part"]) if name)

    @property
    def rejected(self) -> int:
        return self.rows - self.scored


@dataclass
class BatchOutcome:
    status: BatchPredictionStatus
    lineage: dict[str, Any]


def resolve_version(prediction: BatchPrediction) -> ModelVersion:
    spec, registry = prediction.spec, Registry()
    if spec.version is not None:
        try:
            return registry.get(spec.model, spec.version)
        except KubeloopError as e:
            raise KubeloopError(f"spec.model {spec.model}, spec.version {spec.version}: {e}") from None
    record = registry.production(spec.model)
    if record is None:
        known = ", ".join(f"v{mv.spec.version} {mv.spec.stage}" for mv in registry.list(spec.model)) or "none"
        raise KubeloopError(
            f"spec.model {spec.model} has no Production version (versions: {known}) in the registry at "
            f"{registry.root}: set spec.version, or promote one (kubeloop models promote {spec.model}:N)"
        )
    return record


def run_batch_prediction(prediction: BatchPrediction) -> BatchOutcome:
    """Score the input; raises (after publishing phase Failed in a RayJob) on any error."""
    status = BatchPredictionStatus(phase="Running", start_time=datetime.now(UTC))
    try:
        return _run(prediction, status)
    except Exception as e:
        status.phase, status.message, status.completion_time = "Failed", str(e), datetime.now(UTC)
        _publish(status, final=False)  # the error itself matters more than a failed report of it
        raise


def _run(prediction: BatchPrediction, status: BatchPredictionStatus) -> BatchOutcome:
    spec, name = prediction.spec, prediction.metadata.name
    record = resolve_version(prediction)
    signature = record.spec.signature
    status.model_version = record.metadata.name
    features = list(signature.inputs)
    collisions = sorted(set(spec.carry) & set(output_columns(signature)))
    if collisions:
        raise KubeloopError(f"spec.carry: {collisions} would collide with the prediction's columns: rename them")
    source = open_source(spec.input, features)
    check_schema(source.schema, features, spec.carry, f"spec.input {spec.input}")
    status.rows_total, status.input_digest = source.rows, source.digest
    reference = _reference(record) if spec.drift else None
    output = StagedOutput(spec.output)
    event(
        log,
        "batch.start",
        name=name,
        version=record.metadata.name,
        input=spec.input,
        rows=source.rows,
        digest=source.digest,
        output=output.uri,
    )
    _publish(status, final=False)
    output.create(REJECTED_DIR)
    try:
        tally = _score(prediction, record, source, output, reference, status)
        output.keep_only(tally.files)
        if tally.scored == 0:
            _write_empty(output, source.schema, spec.carry, signature)
        tests = None
        if reference is not None:
            status.drift, tests = drift.judge(reference, tally.counts)
        lineage = _lineage(prediction, record, source, output, tally, status, tests)
        output.write_json(LINEAGE, lineage)  # last: a staged output with lineage is complete
        output.commit()
    except BaseException:
        output.discard()
        raise
    status.phase, status.completion_time = "Succeeded", datetime.now(UTC)
    status.rows_total, status.rows_done, status.rows_rejected = tally.rows, tally.rows, tally.rejected
    status.output_uri = output.uri
    _publish(status, final=True)
    event(
        log,
        "batch.done",
        name=name,
        rows=tally.rows,
        scored=tally.scored,
        rejected=tally.rejected,
        drift=status.drift.state if status.drift else "untested",
    )
    return BatchOutcome(status, lineage)


def _score(
    prediction: BatchPrediction,
    record: ModelVersion,
    source: Source,
    output: StagedOutput,
    reference: drift.Reference | None,
    status: BatchPredictionStatus,
) -> Tally:
    spec = prediction.spec
    replicas, cpus = spec.workers.replicas, max(1, math.ceil(quantity_value(spec.workers.cpu)))
    connected = connect(replicas, cpus)
    tally = Tally()
    try:
        dataset = source.dataset(spec.batch_size, replicas).map_batches(
            BatchScorer,
            batch_size=spec.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_cpus=cpus,
            fn_constructor_kwargs={
                "artifact_uri": record.spec.artifact_uri,
                "signature": record.spec.signature.model_dump(),
                "carry": spec.carry,
                "staging": output.staging_uri,
                "bins": reference.bins if reference else [],
            },
        )
        dataset.context.enable_progress_bars = False
        logged = published = time.monotonic()
        for summaries in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for summary in summaries.to_pylist():
                tally.add(summary)
            now = time.monotonic()
            if now - logged >= LOG_EVERY_S:
                event(log, "batch.progress", rows_done=tally.rows, rows_total=source.rows or "?")
                logged = now
            if now - published >= PUBLISH_EVERY_S:
                status.rows_done = tally.rows
                _publish(status, final=False)
                published = now
    finally:
        if connected:
            ray.shutdown()
    return tally


def _reference(record: ModelVersion) -> drift.Reference | None:
    digest = record.spec.lineage.dataset_digest
    try:
        snapshot = load_snapshot(digest)
    except DataError as e:
        event(log, "batch.drift_untested", logging.WARNING, reason=str(e))
        return None
    return drift.reference(snapshot, list(record.spec.signature.inputs))


def _write_empty(output: StagedOutput, schema: pa.Schema, carry: list[str], signature: Any) -> None:
    """Every row was rejected: one empty part with the output's columns, so OUTPUT still reads as a table."""
    empty = np.zeros((0, len(signature.classes or [])) if signature.task == "multiclass" else 0, dtype=np.float32)
    columns = {name: pa.array([], _known(schema.field(name).type)) for name in carry}
    columns |= prediction_columns(signature, empty)
    with output.fs.open(f"{output.staging}/part-empty.parquet", "wb") as stream:
        pq.write_table(pa.table(columns), stream)


def _known(kind: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_null(kind) else kind


def _lineage(
    prediction: BatchPrediction,
    record: ModelVersion,
    source: Source,
    output: StagedOutput,
    tally: Tally,
    status: BatchPredictionStatus,
    tests: list[drift.FeatureDrift] | None,
) -> dict[str, Any]:
    signature = record.spec.signature
    return {
        "batchPrediction": prediction.metadata.name,
        "modelVersion": record.metadata.name,
        "model": record.spec.model,
        "version": record.spec.version,
        "artifactUri": record.spec.artifact_uri,
        "input": {"uri": source.uri, "digest": source.digest, "digestOf": "file bytes"},
        "output": {
            "uri": output.uri,
            "columns": [*prediction.spec.carry, *output_columns(signature)],
            "rejected": f"{output.uri}/{REJECTED_DIR}",
        },
        "task": signature.task,
        "positiveClass": signature.positive_class,
        "classes": signature.classes,
        "rows": {
            "total": tally.rows,
            "scored": tally.scored,
            "rejected": tally.rejected,
            "rejectedByReason": dict(sorted(tally.reasons.items())),
            "outOfTrainingRange": dict(sorted(tally.out_of_range.items())),
        },
        "drift": None
        if tests is None
        else {
            "reference": record.spec.lineage.dataset_digest,
            "state": status.drift.state,
            "pValue": status.drift.p_value,
            "features": [
                {
                    "feature": t.feature,
                    "pValue": t.p_value,
                    "correctedPValue": t.corrected_p_value,
                    "metric": t.metric,
                    "distance": t.distance,
                    "threshold": t.threshold,
                    "moved": t.moved,
                }
                for t in tests
            ],
        },
        "startTime": status.start_time.isoformat(timespec="seconds") if status.start_time else None,
        "completionTime": datetime.now(UTC).isoformat(timespec="seconds"),
        "codeVersion": code_version(),
    }


def _publish(status: BatchPredictionStatus, final: bool) -> None:
    """Into the RayJob's result ConfigMap (nothing outside a RayJob); only the outcome's failure fails the run."""
    document = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    try:
        publish({RESULT_KEY: document})
    except OSError as e:
        if final:
            raise
        event(log, "batch.publish_failed", logging.WARNING, phase=status.phase, error=str(e))
