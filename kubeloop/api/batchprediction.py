"""BatchPrediction: score a dataset with a registered model version on Ray Data, validated against its signature."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from kubeloop.api.common import Condition, DnsLabel, KubeModel, PrinterColumn, Quantity, RayJobResource

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
DriftState = Literal["NoDrift", "Drift"]


class BatchWorkers(KubeModel):
    replicas: Annotated[int, Field(ge=1, le=512, description="Ray Data actors scoring batches in parallel.")] = 2
    cpu: Annotated[Quantity, Field(description="CPU of each worker pod (requests = limits); whole CPUs in Ray.")] = 1
    memory: Quantity = "2Gi"


class BatchPredictionSpec(KubeModel):
    model: DnsLabel
    version: Annotated[
        int | None, Field(ge=1, description="The ModelVersion to score with; default the model's Production one.")
    ] = None
    input: Annotated[
        str, Field(min_length=1, description="Path or fsspec URI of a CSV/Parquet file, or bundled://NAME.")
    ]
    output: Annotated[
        str,
        Field(
            min_length=1,
            description="Parquet directory (path or fsspec URI) for the scored rows, a relative path under "
            "KUBELOOP_HOME; bad rows go to OUTPUT/_rejected with their reason, the lineage to OUTPUT/_lineage.json.",
        ),
    ]
    carry: list[str] = Field(
        default_factory=list, description="Input columns copied to the output beside the predictions (ids, keys)."
    )
    batch_size: Annotated[int, Field(ge=1, le=1_000_000, description="Rows per map_batches batch.")] = 4096
    workers: BatchWorkers = Field(default_factory=BatchWorkers)
    drift: bool = Field(default=True, description="Test the input's drift against the training reference.")

    @field_validator("carry")
    @classmethod
    def _distinct(cls, carry: list[str]) -> list[str]:
        repeated = sorted({name for name in carry if carry.count(name) > 1})
        if repeated:
            raise ValueError(f"names a column more than once: {', '.join(repeated)}")
        return carry


class BatchDrift(KubeModel):
    state: DriftState
    p_value: float | None = Field(default=None, description="The smallest corrected p-value over the features.")
    features: list[str] = Field(default_factory=list, description="The features that moved.")


class BatchPredictionStatus(KubeModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    phase: Phase | None = None
    message: str | None = None
    model_version: str | None = None
    ray_job_name: str | None = None
    rows_total: int | None = None
    rows_done: int | None = None
    rows_rejected: int | None = None
    output_uri: str | None = None
    input_digest: str | None = None
    drift: BatchDrift | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class BatchPrediction(RayJobResource):
    KIND: ClassVar[str] = "BatchPrediction"
    NAME_EXAMPLE: ClassVar[str] = "arrests-scoring"
    PLURAL: ClassVar[str] = "batchpredictions"
    SHORT_NAMES: ClassVar[list[str]] = ["bp"]
    PRINTER_COLUMNS: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Model Version", type="string", json_path=".status.modelVersion"),
        PrinterColumn(name="Rows", type="integer", json_path=".status.rowsDone"),
        PrinterColumn(name="Rejected", type="integer", json_path=".status.rowsRejected"),
        PrinterColumn(name="Drift", type="string", json_path=".status.drift.state"),
        PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
    ]

    kind: Literal["BatchPrediction"] = "BatchPrediction"
    spec: BatchPredictionSpec
    status: BatchPredictionStatus | None = None


NAME_RULE = BatchPrediction.name_rule()
