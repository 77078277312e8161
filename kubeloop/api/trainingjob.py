"""TrainingJob: train a model on a dataset snapshot with Ray Train (DDP allreduce), then evaluate and gate it."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubeloop.api.common import (
    DNS1035_LABEL,
    RAYJOB_NAME_MAX_LENGTH,
    Condition,
    DnsLabel,
    KubeModel,
    PrinterColumn,
    Quantity,
    RayJobResource,
    quantity_value,
    rayjob_name_is_valid,
)
from kubeloop.api.modelversion import Task
from kubeloop.api.validation import ValidationReport

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
Backend = Literal["auto", "gloo", "nccl"]

# The gate metrics each task defines (camelCase as in the spec); any other bound is refused before anything runs.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"),
    "multiclass": ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}


def _class_value(value: Any) -> Any:
    """A label value as the data's text: YAML reads `positiveClass: 1` as an integer, which means the class "1"."""
    if isinstance(value, bool):
        raise ValueError(
            f"got the YAML boolean {str(value).lower()}: quote the label value as it appears in the data "
            '(positiveClass: "yes")'
        )
    if isinstance(value, int):
        return str(value)
    return value


# A label value: a string in the data's spelling, or an integer for integer labels (int-or-string in the CRD).
ClassValue = Annotated[
    str,
    BeforeValidator(_class_value),
    Field(min_length=1),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]

NAME_MAX_LENGTH = RAYJOB_NAME_MAX_LENGTH
name_is_valid = rayjob_name_is_valid  # whether a name may name a TrainingJob (and so its RayJob)
# A reference to a TrainingJob by name (same rule as the TrainingJob's own name).
TrainingJobName = Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=DNS1035_LABEL)]


class ModelSpec(KubeModel):
    name: Annotated[DnsLabel, Field(description="Registry name of the model; versions are numbered under it.")]
    builder: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
            description="module:function that returns a torch.nn.Module given (input_dim, params).",
        ),
    ] = "kubeloop.training.models:mlp"
    params: Annotated[
        dict[str, Any],
        Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
    ] = Field(default_factory=dict, description="Passed to the builder as keyword arguments.")


class DatasetSpec(KubeModel):
    uri: Annotated[str, Field(min_length=1, description="Path or fsspec URI of a CSV/Parquet file, or bundled://NAME.")]
    digest: Annotated[
        str | None,
        Field(
            pattern=r"^sha256:[0-9a-f]{64}$",
            description="Expected content digest; the run fails on mismatch.",
        ),
    ] = None
    label: Annotated[str, Field(min_length=1)]
    positive_class: ClassValue | None = Field(
        default=None,
        description="task binary: the label value that counts as positive (required there, refused otherwise).",
    )
    slice_column: str | None = Field(default=None, description="Categorical column to evaluate metrics per value.")
    schema_uri: str | None = Field(default=None, description="YAML DatasetSchema the data must satisfy.")
    baseline: Literal["production", "none"] = Field(
        default="production",
        description="Validate against the training snapshot of the model's Production version.",
    )


class Hyperparameters(KubeModel):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.01
    seed: Annotated[int, Field(ge=0)] = 0
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2


class Workers(KubeModel):
    replicas: Annotated[int, Field(ge=1, le=512, description="Ray Train workers (DDP ranks), one per worker pod.")] = 2
    cpu: Annotated[
        Quantity,
        Field(
            description="CPU of each worker pod (requests = limits). Each Ray Train worker reserves it in whole "
            "CPUs, rounded up (500m -> 1), and each worker pod offers exactly that many to Ray: one worker per pod."
        ),
    ] = 1
    memory: Quantity = "2Gi"
    gpu: Annotated[int, Field(ge=0, le=16, description="nvidia.com/gpu per worker.")] = 0
    allow_cpu_fallback: bool = Field(
        default=False, description="Run on CPU (gloo) when GPUs are asked for but none is present."
    )

    def ray_cpus(self) -> int:
        """The CPUs one Ray Train worker reserves, and one worker pod offers Ray (``ray start --num-cpus``):
        ``cpu`` rounded up to whole CPUs, as Ray counts a node's CPUs (and as KubeRay derives num-cpus from a
        container's limit), at least 1. Reserving all of its pod's CPUs keeps each worker in a pod of its own."""
        return max(1, math.ceil(quantity_value(self.cpu)))


class Checkpointing(KubeModel):
    every_epochs: Annotated[int, Field(ge=1)] = 1
    keep: Annotated[int, Field(ge=1, le=100)] = 2


class GateMetrics(KubeModel):
    """Bounds on evaluation metrics: a floor for accuracy/precision/recall/f1/rocAuc/r2, a ceiling for
    logLoss/rmse/mae. Classification (binary, multiclass: precision, recall, f1 and rocAuc macro-averaged over
    the classes, rocAuc one-vs-rest) and regression (rmse, mae, r2) each take only their own."""

    accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    precision: Annotated[float, Field(ge=0, le=1)] | None = None
    recall: Annotated[float, Field(ge=0, le=1)] | None = None
    f1: Annotated[float, Field(ge=0, le=1)] | None = None
    roc_auc: Annotated[float, Field(ge=0, le=1)] | None = None
    log_loss: Annotated[float, Field(ge=0)] | None = None
    rmse: Annotated[float, Field(ge=0)] | None = None
    mae: Annotated[float, Field(ge=0)] | None = None
    r2: Annotated[float, Field(le=1)] | None = None

    def bounded(self) -> list[str]:
        """The metrics this sets a bound on (snake_case)."""
        return [name for name, value in self if value is not None]


class Gate(KubeModel):
    thresholds: GateMetrics = Field(default_factory=GateMetrics)
    max_regression: GateMetrics = Field(
        default_factory=GateMetrics,
        description="How much worse than the Production version each metric may be (absolute).",
    )


# What a search may vary: the spec.hyperparameters fields a trial can change, and params.NAME for the builder's
# keyword arguments (spec.model.params). epochs is the budget of a trial (the scheduler stops trials early), not a
# dimension; the seed and the split stay fixed so every trial is scored on the same validation rows.
TUNABLE_HYPERPARAMETERS = ("learningRate", "batchSize")
# The per-epoch validation metrics a search ranks trials by (ray_runner reports them as val_*), per task.
TUNING_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("valAuc", "valLoss"),
    "multiclass": ("valAccuracy", "valLoss"),
    "regression": ("valRmse", "valLoss"),
}
_MAXIMIZED = ("valAuc", "valAccuracy")

# A choice's values are numbers, strings or booleans: any scalar in the CRD (no single structural type fits).
SearchValue = Annotated[
    StrictBool | StrictInt | StrictFloat | StrictStr,
    Field(union_mode="left_to_right"),
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]


class SearchDimension(KubeModel):
    """One dimension of the search: exactly one of choice, uniform, logUniform, intRange (bounds inclusive)."""

    choice: Annotated[list[SearchValue], Field(min_length=1, max_length=100)] | None = None
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    log_uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    int_range: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None

    def kind(self) -> str:
        """The one distribution set: choice, uniform, logUniform or intRange."""
        (name,) = [to_camel(name) for name, value in self if value is not None]
        return name

    @model_validator(mode="after")
    def _one_distribution(self) -> SearchDimension:
        given = [to_camel(name) for name, value in self if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of choice, uniform, logUniform, intRange (got {', '.join(given) or 'none'})"
            )
        bounds = self.uniform or self.log_uniform or self.int_range
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise ValueError(f"{given[0]}: the low bound {low} must be below the high bound {high}")
            if self.log_uniform is not None and low <= 0:
                raise ValueError(f"logUniform: bounds must be positive (got {low})")
        return self


class Tuning(KubeModel):
    """A hyperparameter search with Ray Tune over the same training function: each trial trains with
    spec.workers, the scheduler stops poor trials early, and the best trial becomes the candidate version."""

    space: Annotated[
        dict[str, SearchDimension],
        Field(
            min_length=1,
            description="Dimension per name: learningRate, batchSize, or params.NAME (a builder keyword argument).",
        ),
    ]
    metric: Literal["valAuc", "valAccuracy", "valRmse", "valLoss"] | None = Field(
        default=None,
        description="Validation metric that ranks trials; default the task's headline (valAuc, valAccuracy, valRmse).",
    )
    mode: Literal["max", "min"] | None = Field(
        default=None, description="Whether a higher metric is better; default max for valAuc and valAccuracy."
    )
    trials: Annotated[int, Field(ge=1, le=1000)] = 8
    parallelism: Annotated[int, Field(ge=1, le=64, description="Trials run at once (each with spec.workers).")] = 1
    scheduler: Literal["asha", "median", "none"] = Field(
        default="asha", description="Early stopping: ASHA, median stopping, or none (every trial runs all epochs)."
    )
    grace_period: Annotated[
        int, Field(ge=1, description="Epochs every trial runs before the scheduler may stop it.")
    ] = 1
    seed: Annotated[int, Field(ge=0, description="Seed of the search's sampling (trials are reproducible).")] = 0

    def resolved_metric(self, task: str) -> str:
        return self.metric or TUNING_METRICS[task][0]

    def resolved_mode(self, task: str) -> Literal["max", "min"]:
        if self.mode is not None:
            return self.mode
        return "max" if self.resolved_metric(task) in _MAXIMIZED else "min"


class TrainingJobSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.backend) || self.backend != 'nccl' || "
                    "(has(self.workers) && has(self.workers.gpu) && self.workers.gpu > 0)",
                    "message": "backend nccl needs GPUs: set spec.workers.gpu >= 1, or use backend auto or gloo",
                    "fieldPath": ".backend",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "(has(self.task) && self.task != 'binary') || has(self.dataset.positiveClass)",
                    "message": "task binary needs spec.dataset.positiveClass, the label value that counts as "
                    "positive; with more than two classes set spec.task: multiclass",
                    "fieldPath": ".dataset.positiveClass",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "!has(self.task) || self.task == 'binary' || !has(self.dataset.positiveClass)",
                    "message": "spec.dataset.positiveClass is only for task binary: remove it",
                    "fieldPath": ".dataset.positiveClass",
                    "reason": "FieldValueForbidden",
                },
            ]
        }
    )

    task: Task = Field(
        default="binary",
        description="binary (P(positive) per row), multiclass (a probability per class) or regression (a value).",
    )
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    workers: Workers = Field(default_factory=Workers)
    backend: Backend = Field(default="auto", description="Allreduce backend; auto is nccl with GPUs, else gloo.")
    checkpoint: Checkpointing = Field(default_factory=Checkpointing)
    max_failures: Annotated[
        int,
        Field(
            ge=0,
            le=100,
            description="Worker failures survived: Ray Train restarts the worker group from the latest checkpoint, "
            "inside the same Ray cluster, up to this many times. The only retry layer: the RayJob itself is never "
            "retried (backoffLimit 0), so a failed driver or Ray cluster fails the TrainingJob.",
        ),
    ] = 1
    gate: Gate = Field(default_factory=Gate)
    tuning: Tuning | None = Field(
        default=None, description="Search spec.hyperparameters with Ray Tune; the best trial is the candidate."
    )

    @model_validator(mode="after")
    def _tuning_space(self) -> TrainingJobSpec:
        if self.tuning is None:
            return self
        for name in self.tuning.space:
            if name not in TUNABLE_HYPERPARAMETERS and not (name.startswith("params.") and len(name) > 7):
                allowed = ", ".join(TUNABLE_HYPERPARAMETERS)
                raise ValueError(f"spec.tuning.space.{name}: not tunable; use {allowed} or params.NAME")
        metric = self.tuning.resolved_metric(self.task)
        if metric not in TUNING_METRICS[self.task]:
            names = ", ".join(TUNING_METRICS[self.task])
            raise ValueError(f"spec.tuning.metric: {metric} is not reported for task {self.task}; use {names}")
        if self.tuning.grace_period > self.hyperparameters.epochs:
            raise ValueError(
                f"spec.tuning.gracePeriod: {self.tuning.grace_period} epochs is more than spec.hyperparameters."
                f"epochs ({self.hyperparameters.epochs}), the most a trial runs"
            )
        return self

    @model_validator(mode="after")
    def _nccl_needs_gpu(self) -> TrainingJobSpec:
        if self.backend == "nccl" and self.workers.gpu == 0:
            raise ValueError("spec.backend: nccl needs GPUs: set spec.workers.gpu >= 1, or use backend auto or gloo")
        return self

    @model_validator(mode="after")
    def _fields_of_the_task(self) -> TrainingJobSpec:
        if self.task == "binary" and self.dataset.positive_class is None:
            raise ValueError(
                "spec.dataset.positiveClass: task binary needs the label value that counts as positive "
                '(e.g. positiveClass: "Yes"); with more than two classes set spec.task: multiclass'
            )
        if self.task != "binary" and self.dataset.positive_class is not None:
            raise ValueError(f"spec.dataset.positiveClass: only for task binary, not {self.task}: remove it")
        allowed = TASK_METRICS[self.task]
        for field, bounds in (("thresholds", self.gate.thresholds), ("maxRegression", self.gate.max_regression)):
            for name in bounds.bounded():
                if name not in allowed:
                    camel = to_camel(name)
                    names = ", ".join(map(to_camel, allowed))
                    raise ValueError(f"spec.gate.{field}.{camel}: not a {self.task} metric; use {names}")
        return self

    def resolved_backend(self) -> Literal["gloo", "nccl"]:
        if self.backend == "auto":
            return "nccl" if self.workers.gpu > 0 else "gloo"
        return self.backend


class TrialSummary(KubeModel):
    trial: str
    params: Annotated[dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})]
    status: Literal["Completed", "Stopped", "Failed"] = Field(
        description="Completed all epochs, Stopped early by the scheduler, or Failed (error set)."
    )
    epochs: Annotated[int, Field(ge=0)]
    metric: float | None = None
    error: str | None = None


class TuningStatus(KubeModel):
    """A search's outcome: the best trial and every trial in short; the full per-epoch records are at resultsUri."""

    metric: str
    mode: Literal["max", "min"]
    trials: Annotated[int, Field(ge=0)]
    completed: Annotated[int, Field(ge=0)]
    stopped: Annotated[int, Field(ge=0)]
    failed: Annotated[int, Field(ge=0)]
    trial_epochs: Annotated[int, Field(ge=0, description="Epochs run over all trials: the search's compute.")]
    best_trial: str | None = None
    best_metric: float | None = None
    best_params: Annotated[dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})] = (
        Field(default_factory=dict)
    )
    results_uri: str | None = None
    summary: list[TrialSummary] = Field(default_factory=list)


class TrainingJobStatus(KubeModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    phase: Phase | None = None
    message: str | None = None
    ray_job_name: str | None = None
    job_status: str | None = None
    job_deployment_status: str | None = None
    dashboard_url: str | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    epochs_completed: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    validation: ValidationReport | None = Field(
        default=None, description="The training data's validation (findings, distances to the baseline)."
    )
    model_version: str | None = None
    tuning: TuningStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class TrainingJob(RayJobResource):
    KIND: ClassVar[str] = "TrainingJob"
    NAME_EXAMPLE: ClassVar[str] = "arrests-mlp"
    PLURAL: ClassVar[str] = "trainingjobs"
    SHORT_NAMES: ClassVar[list[str]] = ["tj"]
    PRINTER_COLUMNS: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Task", type="string", json_path=".spec.task"),
        PrinterColumn(name="Workers", type="integer", json_path=".spec.workers.replicas"),
        PrinterColumn(name="GPUs", type="integer", json_path=".spec.workers.gpu"),
        PrinterColumn(name="Model Version", type="string", json_path=".status.modelVersion"),
        PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
    ]

    kind: Literal["TrainingJob"] = "TrainingJob"
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None


NAME_RULE = TrainingJob.name_rule()
