"""The data validation report: findings and per-feature distances against a baseline snapshot.

A part of the kubeloop.dev/v1alpha1 API (camelCase on the wire) so the same report can be embedded in a
ModelVersion and a TrainingJob status; ``kubeloop.data.validation`` computes it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, computed_field, model_validator

from kubeloop.api.common import KubeModel

Rule = Literal[
    "missing_column",
    "extra_column",
    "type_mismatch",
    "mixed_type",
    "all_null",
    "constant",
    "null_rate",
    "range",
    "domain",
    "drift",
    "label_balance",
    "empty",
]
Severity = Literal["error", "warning"]
# what a schema may ask of a check: a finding of that severity, or none
Policy = Literal["error", "warning", "ignore"]
Metric = Literal["linf", "jensen_shannon", "psi"]

METRIC_NAMES: dict[Metric, str] = {
    "linf": "L-infinity distance",
    "jensen_shannon": "Jensen-Shannon distance",
    "psi": "PSI",
}


class Finding(KubeModel):
    column: str | None = None
    rule: Rule
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}  {self.column or '-'}  {self.rule}: {self.message}"


class FeatureDistance(KubeModel):
    """How far one column's distribution moved from the baseline's, and what moved."""

    column: str
    metric: Metric
    value: float = Field(ge=0)
    threshold: float = Field(ge=0)
    severity: Policy = Field(description="what a value above the threshold is: an error, a warning or nothing")
    category: str | None = Field(default=None, description="linf: the category whose share moved most")
    before: float | None = Field(default=None, description="linf: the category's share in the baseline, else its mean")
    after: float | None = Field(default=None, description="linf: the category's share now, else the mean now")

    @property
    def exceeded(self) -> bool:
        return self.value > self.threshold

    def moved(self) -> str:
        """What moved, in words: "share of 'Oslo' 32.0% → 89.0%" or "mean 39.5 → 51.3"."""
        if self.before is None or self.after is None:
            return ""
        if self.metric == "linf":
            return f"share of {self.category!r} {self.before:.1%} → {self.after:.1%}"
        return f"mean {self.before:.4g} → {self.after:.4g}"

    def __str__(self) -> str:
        compared = ">" if self.exceeded else "≤"
        return f"{self.column}: {self.metric} {self.value:.3f} {compared} {self.threshold:g} ({self.moved()})"


class ValidationReport(KubeModel):
    snapshot_digest: str
    baseline_digest: str | None = None
    findings: list[Finding] = Field(default_factory=list)
    distances: list[FeatureDistance] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # `ok` is written out (JSON, a stored manifest) but always recomputed: reading it back must not fail
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key != "ok"}
        return data

    @computed_field
    @property
    def ok(self) -> bool:
        drifted = any(d.exceeded and d.severity == "error" for d in self.distances)
        return not self.errors and not drifted

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)

    def to_text(self) -> str:
        against = f" against baseline {self.baseline_digest}" if self.baseline_digest else ""
        warnings = len(self.findings) - len(self.errors)
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"{self.snapshot_digest}{against}: {verdict} ({len(self.errors)} errors, {warnings} warnings)"]
        lines += map(str, self.findings)
        if self.distances:
            lines.append("distances to the baseline:")
            lines += (f"  {d}" for d in self.distances)
        return "\n".join(lines)
