"""Shadow analysis: pure decisions on a shadow version that receives mirrored traffic and never answers a user.

Each window the shadow is judged against the stable version on the same checks as a canary (error rate, p99 latency
ratio, prediction shift, drift, labelled loss: `engine.run_checks`) plus the paired comparison only a mirror gives:
the share of mirrored requests on which both answered and agreed (`minAgreement`; the embedded splitter pairs the
answers, a Gateway's RequestMirror discards the shadow's, so in a cluster it is skipped). A window with too few
mirrored requests holds without counting. `windows` passing windows promote the shadow to a canary; at
`maxFailedWindows` failing ones it is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from kubeloop.analysis.engine import MIN_PREDICTIONS, MIN_REQUESTS, CheckResult, run_checks
from kubeloop.analysis.signals import PairedSignals, VersionSignals
from kubeloop.api.modeldeployment import ShadowAnalysis

ShadowAction = Literal["shadowHold", "shadowPromote", "shadowReject"]


@dataclass(frozen=True)
class ShadowState:
    passed_windows: int = 0
    failed_windows: int = 0


@dataclass(frozen=True)
class ShadowDecision:
    action: ShadowAction
    reason: str
    shadow: int
    stable: int
    checks: list[CheckResult]
    report: dict  # status.shadow (camelCase, as the API writes it)
    state: ShadowState = field(default_factory=ShadowState)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def record(self) -> dict:
        """The status.history entry."""
        return {
            "time": self.time.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "action": self.action,
            "reason": self.reason,
            "candidate": self.shadow,
            "stable": self.stable,
            "failedChecks": self.state.failed_windows,
            "checks": [c.record() for c in self.checks],
        }


def agreement_check(analysis: ShadowAnalysis, paired: PairedSignals, min_pairs: int = MIN_REQUESTS) -> CheckResult:
    agreement = paired.agreement
    if agreement is None or paired.pairs < min_pairs:
        why = f"only {paired.pairs:.0f} paired answers (need {min_pairs})"
        return CheckResult("agreement", "skip", agreement, analysis.min_agreement, why)
    status = "fail" if agreement < analysis.min_agreement else "pass"
    why = f"agreed on {paired.agreed:.0f} of {paired.pairs:.0f} paired answers ({agreement:.1%})"
    if status == "fail":
        why += f" < {analysis.min_agreement:.1%}"
    return CheckResult("agreement", status, agreement, analysis.min_agreement, why)


def report(
    shadow: VersionSignals, stable: VersionSignals, paired: PairedSignals, checks: list[CheckResult], state: ShadowState
) -> dict:
    """status.shadow for this window."""
    p99_shadow, p99_stable = shadow.p99(), stable.p99()
    loss_shadow, loss_stable = shadow.loss(), stable.loss()
    found = {
        "version": shadow.version,
        "mirrored": int(shadow.requests),
        "agreement": paired.agreement,
        "predictionDistance": paired.distance,
        "errorRate": shadow.error_rate,
        "stableErrorRate": stable.error_rate,
        "p99LatencyRatio": p99_shadow / p99_stable if p99_shadow is not None and p99_stable else None,
        "lossIncrease": loss_shadow[0] - loss_stable[0] if loss_shadow and loss_stable else None,
        "passedWindows": state.passed_windows,
        "failedWindows": state.failed_windows,
        "lastChecked": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "checks": [c.record() for c in checks],
    }
    return {k: v for k, v in found.items() if v is not None}


def decide_shadow(
    analysis: ShadowAnalysis,
    state: ShadowState,
    stable: VersionSignals,
    shadow: VersionSignals,
    paired: PairedSignals,
    *,
    min_requests: int = MIN_REQUESTS,
    min_predictions: int = MIN_PREDICTIONS,
) -> ShadowDecision:
    """Judge the window that just ended: hold, promote the shadow to a canary, or reject it."""
    checks = run_checks(analysis.checks, stable, shadow, min_requests=min_requests, min_predictions=min_predictions)
    checks.append(agreement_check(analysis, paired, min_requests))
    failed = [c for c in checks if c.status == "fail"]
    v_shadow, v_stable = shadow.version, stable.version
    if failed:
        after = ShadowState(state.passed_windows, state.failed_windows + 1)
        why = "; ".join(c.reason for c in failed) + f" (failed window {after.failed_windows} of "
        why += f"{analysis.max_failed_windows})"
        if after.failed_windows >= analysis.max_failed_windows:
            action: ShadowAction = "shadowReject"
            reason = f"{why}: rejecting v{v_shadow}"
        else:
            action = "shadowHold"
            reason = f"{why}: still a shadow"
    elif shadow.requests < min_requests:
        after = state
        action = "shadowHold"
        reason = f"only {shadow.requests:.0f} mirrored requests in the window (need {min_requests}): still a shadow"
    else:
        after = ShadowState(state.passed_windows + 1, state.failed_windows)
        passed = ", ".join(c.name for c in checks if c.status == "pass") or "no check applicable"
        if after.passed_windows >= analysis.windows:
            action = "shadowPromote"
            reason = (
                f"passed {after.passed_windows} windows ({passed}): v{v_shadow} becomes the canary at "
                f"{analysis.canary.steps[0]}%"
            )
        else:
            action = "shadowHold"
            reason = f"passed window {after.passed_windows} of {analysis.windows} ({passed}): still a shadow"
    return ShadowDecision(
        action, reason, v_shadow, v_stable, checks, report(shadow, stable, paired, checks, after), after
    )
