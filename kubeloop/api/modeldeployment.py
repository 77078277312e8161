"""ModelDeployment: which model version serves, with canary analysis, autoscaling, drift monitoring, retraining."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from itertools import pairwise
from typing import Annotated, ClassVar, Literal, NamedTuple

from pydantic import ConfigDict, Field, field_validator, model_validator

from kubeloop.api.common import Condition, DnsLabel, Duration, KubeModel, PrinterColumn, Quantity, Resource
from kubeloop.api.modelversion import ModelVersion
from kubeloop.api.trainingjob import TrainingJobName

DeploymentMode = Literal["Standard", "Knative"]
# KServe's HPA (Standard mode, and Knative's hpa class, which kubeloop picks for cpu and memory) takes the target as
# an average utilization percentage and refuses one above 100 (v0.20 validateScalingHPACompExtension).
UTILIZATION_METRICS = ("cpu", "memory")
MAX_UTILIZATION = 100
MODE_IMMUTABLE = (
    "deploymentMode cannot be changed: KServe refuses to switch an InferenceService's deployment mode; "
    "delete and re-create the ModelDeployment to serve it in the other mode"
)


class LabelledChecks(KubeModel):
    """Candidate against stable on the rows labelled (ground-truth feedback joined) in the same interval."""

    enabled: bool = True

    min_labels: Annotated[
        int, Field(ge=2, description="Labelled rows each version needs in the interval; fewer: the check is skipped.")
    ] = 50
    max_loss_increase: Annotated[
        float,
        Field(
            ge=0,
            description="How much higher the candidate's mean loss per row (log loss for classifiers, squared error "
            "for regression) may be than the stable's before it counts against the candidate.",
        ),
    ] = 0.0
    significance: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description="The candidate fails when a one-sided Welch test says its mean loss exceeds the stable's "
            "by more than maxLossIncrease with a p-value below this.",
        ),
    ] = 0.05


class CanaryChecks(KubeModel):
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_p99_latency_ratio: Annotated[float, Field(gt=0, description="Candidate p99 / stable p99.")] = 1.5
    max_prediction_shift: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="KS distance between candidate and stable prediction histograms; for multiclass, the larger "
            "of that and the largest gap between their predicted-class shares. 1: recorded, never fails (a model "
            "retrained on moved data predicts differently by design: judge it on labels).",
        ),
    ] = 0.2
    fail_on_drift: bool = True
    labelled: LabelledChecks = Field(
        default_factory=LabelledChecks,
        description="Labelled performance, candidate against stable (needs ground-truth feedback).",
    )


def retrain_checks() -> CanaryChecks:
    """What a retrained version is judged on by default: labelled performance; its prediction shift is recorded but
    never fails it."""
    return CanaryChecks(max_prediction_shift=1.0)


class CanaryAnalysis(KubeModel):
    steps: Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(min_length=1)] = Field(
        default_factory=lambda: [10, 25, 50, 100], description="Traffic percent to the candidate, in order."
    )
    interval: Duration = "30s"
    max_failed_checks: Annotated[int, Field(ge=1)] = 2
    checks: CanaryChecks = Field(default_factory=CanaryChecks)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError(f"steps must increase strictly, got {steps}")
        return steps


class RetrainAnalysis(CanaryAnalysis):
    """A canary analysis for a version retrained on moved data: judged on labels, not on prediction shift."""

    checks: CanaryChecks = Field(default_factory=retrain_checks)


class Canary(KubeModel):
    version: Annotated[int, Field(ge=1)]
    traffic_percent: Annotated[int, Field(ge=0, le=100)] = 10
    analysis: CanaryAnalysis | None = None


class Autoscaling(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxReplicas) || !has(self.minReplicas) || self.maxReplicas >= self.minReplicas",
                    "message": "maxReplicas must be >= minReplicas",
                    "fieldPath": ".maxReplicas",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": f"!has(self.target) || self.target <= {MAX_UTILIZATION} || "
                    "(has(self.metric) && self.metric in ['concurrency', 'rps'])",
                    "message": "spec.autoscaling.target is a utilization percentage for metric cpu or memory (the "
                    f"default cpu included): at most {MAX_UTILIZATION}, as KServe's HPA accepts",
                    "fieldPath": ".target",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    metric: Literal["cpu", "memory", "concurrency", "rps"] = "cpu"
    target: Annotated[
        int,
        Field(
            ge=1,
            description="cpu, memory: average utilization percent of the requests (1-100); concurrency: in-flight "
            "requests per replica; rps: requests per second per replica.",
        ),
    ] = 80

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"spec.autoscaling.maxReplicas ({self.max_replicas}) must be >= minReplicas ({self.min_replicas})"
            )
        if self.metric in UTILIZATION_METRICS and self.target > MAX_UTILIZATION:
            raise ValueError(
                f"spec.autoscaling.target ({self.target}) is a utilization percentage for metric {self.metric}: "
                f"at most {MAX_UTILIZATION}, as KServe's HPA accepts"
            )
        return self


class Resources(KubeModel):
    cpu: Quantity = 1
    memory: Quantity = "1Gi"
    gpu: Annotated[int, Field(ge=0, le=16)] = 0


class DriftMonitor(KubeModel):
    enabled: bool = True
    detector: Literal["ks", "mmd"] = Field(
        default="ks",
        description="ks: Kolmogorov-Smirnov (numeric) + Chi-square (categorical); mmd: multivariate.",
    )
    backend: Literal["alibi", "scipy"] = Field(
        default="alibi",
        description=(
            "What runs the ks tests, with the same decisions: alibi (alibi-detect, Business Source License 1.1, "
            "not free for production use) or scipy (BSD-3-Clause). mmd needs alibi."
        ),
    )
    window: Annotated[int, Field(ge=20, le=100_000, description="Requests per detection window.")] = 500
    p_value: Annotated[float, Field(gt=0, lt=1)] = 0.05
    reference_size: Annotated[int, Field(ge=50, le=1_000_000)] = 2000

    @model_validator(mode="after")
    def _backend_runs_detector(self) -> DriftMonitor:
        if self.detector == "mmd" and self.backend != "alibi":
            raise ValueError("spec.drift.detector mmd runs on backend alibi only: set spec.drift.backend: alibi")
        return self


class InputPolicy(KubeModel):
    out_of_range: Literal["count", "clip", "reject"] = Field(
        default="count",
        description=(
            "A numeric input outside the training rows' [min, max] (the ModelVersion's spec.signature.inputs): "
            "count answers as usual and counts it (kubeloop_feature_out_of_range_total), clip answers for the "
            "nearest bound, reject answers 400. Values too far out to compute in float32 are rejected whatever "
            "the policy."
        ),
    )


HIGHER_IS_BETTER = ("rocAuc", "accuracy")
LOWER_IS_BETTER = ("calibrationError", "mae", "rmse")


class PerformanceTrigger(KubeModel):
    metric: Literal["rocAuc", "accuracy", "calibrationError", "mae", "rmse"] = Field(
        description="A live metric of the stable version on its last labelled rows (kubeloop_live_metric)."
    )
    threshold: float = Field(
        description="Worse than this (below it for rocAuc and accuracy, above it for calibrationError, mae, rmse) "
        "triggers retraining once sustained."
    )
    min_labels: Annotated[int, Field(ge=1, description="Labelled rows the live metric needs before it is trusted.")] = (
        100
    )

    def worse(self, value: float) -> bool:
        return value < self.threshold if self.metric in HIGHER_IS_BETTER else value > self.threshold


class Retrain(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.enabled) || !self.enabled || has(self.trainingJob)",
                    "message": "retraining needs trainingJob: the TrainingJob to copy with fresh data",
                    "fieldPath": ".trainingJob",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "!has(self.on) || self.on == 'drift' || has(self.performance)",
                    "message": "retraining on performance needs performance: the live metric and its threshold",
                    "fieldPath": ".performance",
                    "reason": "FieldValueRequired",
                },
            ]
        }
    )

    enabled: bool = False
    on: Literal["drift", "performance", "both"] = Field(
        default="drift",
        description="What starts retraining once sustained: the drift detector's flag on the stable version, its "
        "live performance worse than spec.retrain.performance, or both (whichever holds).",
    )
    performance: PerformanceTrigger | None = None
    sustained_for: Duration = "5m"
    min_interval: Duration = "1h"
    training_job: TrainingJobName | None = Field(
        default=None, description="TrainingJob to copy (with fresh data) when the trigger persists."
    )
    analysis: RetrainAnalysis = Field(
        default_factory=RetrainAnalysis,
        description="The canary analysis a retrained version that passed its gate is rolled out with; by default "
        "judged on labelled performance, not on prediction shift.",
    )

    @model_validator(mode="after")
    def _needs_job(self) -> Retrain:
        if self.enabled and self.training_job is None:
            raise ValueError(
                "spec.retrain.trainingJob is required when retraining is enabled: name the TrainingJob to copy"
            )
        if self.on != "drift" and self.performance is None:
            raise ValueError(
                f"spec.retrain.on {self.on} needs spec.retrain.performance: the live metric and its threshold "
                "(for example {metric: rocAuc, threshold: 0.65})"
            )
        return self


class ShadowAnalysis(KubeModel):
    """When the shadow has seen enough, it becomes the canary (or is rejected)."""

    interval: Duration = "30s"
    windows: Annotated[int, Field(ge=1, description="Passing windows before the shadow becomes the canary.")] = 3
    max_failed_windows: Annotated[int, Field(ge=1)] = 2
    min_agreement: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Share of mirrored requests on which the shadow answers like the stable version (same "
            "predicted class; for regression within 10% of the stable's value).",
        ),
    ] = 0.0
    checks: CanaryChecks = Field(default_factory=retrain_checks)
    canary: RetrainAnalysis = Field(
        default_factory=RetrainAnalysis,
        description="The canary analysis the shadow is rolled out with once it passed.",
    )


class Shadow(KubeModel):
    version: Annotated[int, Field(ge=1, description="The version that receives mirrored traffic; never answers.")]
    percent: Annotated[int, Field(ge=1, le=100, description="Share of live requests mirrored to it.")] = 100
    analysis: ShadowAnalysis | None = Field(
        default=None, description="Promote the shadow to a canary when it passes; unset: it stays a shadow."
    )


class ModelDeploymentSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.canary) || self.canary.version != self.version",
                    "message": "canary.version must differ from the stable version",
                    "fieldPath": ".canary.version",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.shadow) || (self.shadow.version != self.version && "
                    "(!has(self.canary) || self.shadow.version != self.canary.version))",
                    "message": "shadow.version must differ from the stable and the canary version",
                    "fieldPath": ".shadow.version",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "self.deploymentMode == 'Knative' || !has(self.autoscaling) || "
                    "((!has(self.autoscaling.metric) || self.autoscaling.metric in ['cpu', 'memory']) && "
                    "(!has(self.autoscaling.minReplicas) || self.autoscaling.minReplicas >= 1))",
                    "message": "scaling on concurrency or rps, and scale to zero, need deploymentMode Knative",
                    "fieldPath": ".autoscaling",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    model: DnsLabel
    version: Annotated[int, Field(ge=1, description="The stable version.")]
    deployment_mode: Annotated[
        DeploymentMode,
        Field(
            description="KServe deployment mode. Standard: Deployments and an HPA, the canary split by a Gateway "
            "API HTTPRoute. Knative: needs Knative Serving installed in the cluster (platform/up.sh does not "
            "install it); scale to zero, concurrency and rps scaling, Knative's traffic split. Cannot be changed "
            "after creation (KServe refuses it): re-create the ModelDeployment to switch.",
            json_schema_extra={
                "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": MODE_IMMUTABLE, "reason": "FieldValueForbidden"}
                ]
            },
        ),
    ] = "Standard"
    canary: Canary | None = None
    shadow: Shadow | None = None
    allow_rejected: bool = Field(
        default=False,
        description="For debugging: serve spec.version or spec.canary.version even when its ModelVersion is "
        "Rejected (it failed its gate, or a canary analysis rolled it back). Without it such a deployment is "
        "refused: locally with exit code 2, in a cluster with condition VersionAdmitted False and a Warning Event.",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    resources: Resources = Field(default_factory=Resources)
    drift: DriftMonitor = Field(default_factory=DriftMonitor)
    inputs: InputPolicy = Field(default_factory=InputPolicy)
    retrain: Retrain = Field(default_factory=Retrain)

    @model_validator(mode="after")
    def _cross_field(self) -> ModelDeploymentSpec:
        if self.canary is not None and self.canary.version == self.version:
            raise ValueError("spec.canary.version must differ from the stable spec.version")
        if self.shadow is not None and self.shadow.version in (self.version, self.canary and self.canary.version):
            raise ValueError("spec.shadow.version must differ from the stable spec.version and spec.canary.version")
        if self.deployment_mode != "Knative":
            if self.autoscaling.metric in ("concurrency", "rps"):
                raise ValueError(f"spec.autoscaling.metric {self.autoscaling.metric} needs deploymentMode Knative")
            if self.autoscaling.min_replicas == 0:
                raise ValueError("spec.autoscaling.minReplicas 0 (scale to zero) needs deploymentMode Knative")
        return self


def update_problem(old: ModelDeploymentSpec, new: ModelDeploymentSpec) -> str | None:
    """Why new may not replace old (the transition rules of the CRD, for callers that see both), or None."""
    if new.deployment_mode != old.deployment_mode:
        return f"spec.{MODE_IMMUTABLE} (was {old.deployment_mode}, now {new.deployment_mode})"
    return None


class RejectedVersion(NamedTuple):
    field: str  # the spec field naming it: spec.version or spec.canary.version
    ref: str  # MODEL:VERSION
    reason: str  # the ModelVersion's stageReason

    def __str__(self) -> str:
        return f"{self.field}: {self.ref} is Rejected ({self.reason})"


def rejected_versions(spec: ModelDeploymentSpec, versions: Mapping[int, ModelVersion]) -> list[RejectedVersion]:
    """The versions the spec names (stable, canary, shadow) whose ModelVersion in ``versions`` is Rejected."""
    named = [("spec.version", spec.version)]
    if spec.canary is not None:
        named.append(("spec.canary.version", spec.canary.version))
    if spec.shadow is not None:
        named.append(("spec.shadow.version", spec.shadow.version))
    return [
        RejectedVersion(field, f"{spec.model}:{version}", mv.spec.stage_reason or "no reason recorded")
        for field, version in named
        if (mv := versions.get(version)) is not None and mv.spec.stage == "Rejected"
    ]


def version_refusal(spec: ModelDeploymentSpec, versions: Mapping[int, ModelVersion]) -> str | None:
    """Why the spec may not serve these versions (it names a Rejected one without spec.allowRejected), or None."""
    rejected = rejected_versions(spec, versions)
    if not rejected or spec.allow_rejected:
        return None
    return (
        "; ".join(map(str, rejected)) + ": serve a Candidate or Production version, or set spec.allowRejected: "
        "true to serve it anyway for debugging"
    )


class TrafficTarget(KubeModel):
    version: int
    percent: Annotated[int, Field(ge=0, le=100)]
    role: Literal["stable", "canary"]


class DriftStatus(KubeModel):
    state: Literal["Unknown", "NoDrift", "Drift"] = "Unknown"
    min_p_value: float | None = None
    events: int | None = None
    last_checked: datetime | None = None


class CheckRecord(KubeModel):
    name: str
    status: Literal["pass", "fail", "skip"]
    value: float | None = None
    threshold: float | None = None
    reason: str = ""


class MetricEstimate(KubeModel):
    value: float
    low: float
    high: float


class VersionOutcomes(KubeModel):
    """A version's performance on ground truth: live on its last labelled rows, and estimated without labels."""

    version: int
    labelled: Annotated[int, Field(ge=0, description="Labelled rows the live metrics are computed on.")] = 0
    live: dict[str, float] = Field(default_factory=dict)
    estimated: dict[str, MetricEstimate] = Field(
        default_factory=dict, description="What the model's own probabilities imply (if calibrated), 95% interval."
    )


class ShadowReport(KubeModel):
    """The shadow against the stable version over the last window of mirrored traffic."""

    version: int
    mirrored: Annotated[int, Field(ge=0, description="Requests mirrored to the shadow in the window.")] = 0
    agreement: float | None = Field(default=None, description="Share of paired answers that agree.")
    prediction_distance: float | None = Field(default=None, description="Mean |shadow - stable| score per row.")
    error_rate: float | None = None
    stable_error_rate: float | None = None
    p99_latency_ratio: float | None = None
    loss_increase: float | None = Field(default=None, description="Mean labelled loss, shadow minus stable.")
    passed_windows: int = 0
    failed_windows: int = 0
    last_checked: datetime | None = None
    checks: list[CheckRecord] = Field(default_factory=list)


class AnalysisRecord(KubeModel):
    """One entry of status.history: a canary analysis decision or a retrain decision, with its reason."""

    time: datetime
    action: Literal[
        "start",
        "advance",
        "hold",
        "promote",
        "rollback",
        "retrain",
        "retrainFailed",
        "shadowStart",
        "shadowHold",
        "shadowPromote",
        "shadowReject",
    ]
    reason: str
    candidate: int | None = None
    stable: int | None = None
    step: int | None = None
    traffic_percent: int | None = None
    next_traffic_percent: int | None = None
    failed_checks: int | None = None
    checks: list[CheckRecord] = Field(default_factory=list)


class CanaryAnalysisStatus(KubeModel):
    """Where the running analysis stands (the operator resumes from it after a restart)."""

    version: int
    step: Annotated[int, Field(ge=0)] = 0
    failed_checks: Annotated[int, Field(ge=0)] = 0
    intervals: Annotated[int, Field(ge=0)] = 0
    started: datetime | None = None
    last_checked: datetime | None = None


class RetrainStatus(KubeModel):
    triggered_since: datetime | None = Field(default=None, description="Since when the trigger holds, unbroken.")
    last_started: datetime | None = None
    training_job: str | None = None
    reason: str | None = None


class ModelDeploymentStatus(KubeModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    url: str | None = None
    ready: bool | None = None
    traffic: list[TrafficTarget] = Field(default_factory=list)
    canary_phase: Literal["None", "Progressing", "Promoted", "RolledBack"] | None = None
    drift: DriftStatus | None = None
    canary_analysis: CanaryAnalysisStatus | None = None
    retrain: RetrainStatus | None = None
    outcomes: list[VersionOutcomes] = Field(
        default_factory=list, description="Per served version: performance on ground-truth feedback."
    )
    shadow: ShadowReport | None = None
    history: list[AnalysisRecord] = Field(
        default_factory=list, description="Canary and retrain decisions with their reasons, newest last (capped)."
    )
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class ModelDeployment(Resource):
    KIND: ClassVar[str] = "ModelDeployment"
    PLURAL: ClassVar[str] = "modeldeployments"
    SHORT_NAMES: ClassVar[list[str]] = ["md"]
    PRINTER_COLUMNS: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Model", type="string", json_path=".spec.model"),
        PrinterColumn(name="Stable", type="integer", json_path=".spec.version"),
        PrinterColumn(name="Canary", type="integer", json_path=".spec.canary.version"),
        PrinterColumn(name="Traffic", type="integer", json_path=".spec.canary.trafficPercent"),
        PrinterColumn(name="Shadow", type="integer", json_path=".spec.shadow.version"),
        PrinterColumn(name="Drift", type="string", json_path=".status.drift.state"),
        PrinterColumn(name="Ready", type="boolean", json_path=".status.ready"),
        PrinterColumn(name="URL", type="string", json_path=".status.url"),
    ]

    kind: Literal["ModelDeployment"] = "ModelDeployment"
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None
