"""ModelVersion: a registry entry produced by a training run, with its lineage, metrics and signature."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from kubeloop.api.common import Condition, DnsLabel, KubeModel, PrinterColumn, Resource
from kubeloop.api.validation import ValidationReport

Stage = Literal["Candidate", "Production", "Archived", "Rejected"]
Task = Literal["binary", "multiclass", "regression"]
FeatureType = Literal["float", "int", "bool", "string"]


class Metrics(KubeModel):
    """The metrics of one set of rows; each task fills its own (binary and multiclass: classification, with
    precision, recall, f1 and rocAuc macro-averaged over classes for multiclass; regression: rmse, mae, r2)."""

    rows: Annotated[int, Field(ge=0)]
    positive_rate: Annotated[float, Field(ge=0, le=1)] | None = Field(default=None, description="binary")
    class_rates: dict[str, float] | None = Field(default=None, description="multiclass: share of rows per class")
    accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    precision: Annotated[float, Field(ge=0, le=1)] | None = None
    recall: Annotated[float, Field(ge=0, le=1)] | None = None
    f1: Annotated[float, Field(ge=0, le=1)] | None = None
    roc_auc: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="Undefined (null) when the rows hold a single class."
    )
    log_loss: Annotated[float, Field(ge=0)] | None = None
    rmse: Annotated[float, Field(ge=0)] | None = None
    mae: Annotated[float, Field(ge=0)] | None = None
    r2: float | None = Field(default=None, description="Undefined (null) when the label is constant.")
    label_mean: float | None = Field(default=None, description="regression: mean of the label")


class SliceMetrics(KubeModel):
    column: str
    values: dict[str, Metrics]


class Evaluation(KubeModel):
    overall: Metrics
    slices: SliceMetrics | None = None
    per_epoch: list[dict[str, float]] = Field(
        default_factory=list, description="Training curves: one entry per epoch (loss, validation metrics)."
    )


class Feature(KubeModel):
    name: str
    dtype: FeatureType
    categories: list[str] | None = None
    nullable: bool = Field(
        default=True, description="Whether the training rows had nulls in this feature (if not, serving refuses them)."
    )
    min: float | None = Field(default=None, description="Numeric features: the smallest value in the training rows.")
    max: float | None = Field(default=None, description="Numeric features: the largest value in the training rows.")


class Signature(KubeModel):
    """What the model takes and answers: binary, P(positive_class) per row; multiclass, a probability per class
    in the order of ``classes``; regression, the predicted value of the label."""

    inputs: Annotated[list[Feature], Field(min_length=1)]
    label: str
    task: Task = "binary"
    positive_class: str | None = None
    classes: list[str] | None = Field(default=None, description="multiclass: the output order of the probabilities")


class SearchLineage(KubeModel):
    trials: Annotated[int, Field(ge=1)]
    best_trial: str
    metric: str
    mode: Literal["max", "min"]
    results_uri: str = Field(description="Every trial's parameters and per-epoch metrics (JSON).")


class Lineage(KubeModel):
    dataset_uri: str
    dataset_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    dataset_rows: Annotated[int, Field(ge=0)]
    training_job: str
    code_version: str
    builder: str
    image: str | None = None
    hyperparameters: Annotated[
        dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    ] = Field(default_factory=dict)
    workers: Annotated[int, Field(ge=1)]
    backend: Literal["gloo", "nccl"]
    search: SearchLineage | None = Field(default=None, description="The hyperparameter search this version won.")


class GateDecision(KubeModel):
    passed: bool
    reasons: list[str] = Field(default_factory=list)
    compared_with: str | None = Field(default=None, description="The Production version it was compared with.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="The bounds it was held to (the TrainingJob's spec.gate.thresholds)."
    )
    max_regression: dict[str, float] = Field(
        default_factory=dict, description="The regressions against Production it allowed (spec.gate.maxRegression)."
    )


class ModelVersionSpec(KubeModel):
    model: DnsLabel
    version: Annotated[int, Field(ge=1)]
    artifact_uri: Annotated[str, Field(min_length=1)]
    lineage: Lineage
    metrics: Evaluation
    signature: Signature
    gate: GateDecision | None = None
    validation: ValidationReport | None = Field(
        default=None, description="The training data's validation: findings, and distances to the baseline snapshot."
    )
    stage: Stage = "Candidate"
    stage_reason: str | None = None


class StageChange(KubeModel):
    stage: Stage
    time: datetime
    reason: str = ""


class ModelVersionStatus(KubeModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    stage_history: list[StageChange] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)


class ModelVersion(Resource):
    KIND: ClassVar[str] = "ModelVersion"
    PLURAL: ClassVar[str] = "modelversions"
    SHORT_NAMES: ClassVar[list[str]] = ["mv"]
    PRINTER_COLUMNS: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Model", type="string", json_path=".spec.model"),
        PrinterColumn(name="Version", type="integer", json_path=".spec.version"),
        PrinterColumn(name="Stage", type="string", json_path=".spec.stage"),
        PrinterColumn(name="Task", type="string", json_path=".spec.signature.task"),
        PrinterColumn(name="AUC", type="number", json_path=".spec.metrics.overall.rocAuc"),
        PrinterColumn(name="Dataset", type="string", json_path=".spec.lineage.datasetDigest", priority=1),
        PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
    ]

    kind: Literal["ModelVersion"] = "ModelVersion"
    spec: ModelVersionSpec
    status: ModelVersionStatus | None = None

    @staticmethod
    def resource_name(model: str, version: int) -> str:
        return f"{model}-v{version}"
