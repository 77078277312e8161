"""The canary analysis engine: pure decisions, no I/O. The operator's timer and the embedded loop both call `decide`.

Each interval the candidate serves the current step's share of traffic; at the interval's end the checks run on the
signals of that interval:

- error rate of the candidate <= maxErrorRate;
- p99 latency of the candidate / p99 of the stable version <= maxP99LatencyRatio (skipped while one side has no
  traffic, e.g. at 100%);
- prediction shift <= maxPredictionShift (skipped while one side has too few predictions): the KS
  distance between the candidate's and the stable version's prediction histograms (P(positive), the predicted
  class's probability, or the value, per task); for a multiclass model the larger of that and the L-infinity gap
  between the two versions' predicted-class shares, since a changed class mix at the same confidence leaves the
  histogram as is;
- no drift flagged on the candidate (failOnDrift);
- labelled performance (labelled): on the rows labelled in the interval, the candidate's mean loss per row is not
  higher than the stable's by more than maxLossIncrease at the significance level (one-sided Welch test; skipped
  while either side has fewer than minLabels labelled rows).

All passing: advance to the next step, or promote after the last one. A failing interval counts one failed check;
at maxFailedChecks the canary is rolled back. Too little candidate traffic to judge: hold (not counted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from kubeloop.analysis.signals import VersionSignals, ks_distance, share_gap
from kubeloop.api.modeldeployment import CanaryAnalysis, CanaryChecks, LabelledChecks

Action = Literal["advance", "hold", "promote", "rollback"]
Status = Literal["pass", "fail", "skip"]

MIN_REQUESTS = 5  # candidate requests an interval needs before it can be judged
MIN_PREDICTIONS = 20  # predictions each side needs for the prediction-shift check


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    value: float | None
    threshold: float | None
    reason: str

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class AnalysisState:
    """Where a canary stands: the index of its current step and the failed intervals so far."""

    step: int = 0
    failed_checks: int = 0
    intervals: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    candidate: int
    stable: int
    percent: int  # the candidate's share during the interval judged
    next_percent: int  # its share from now on (0 after a rollback, 100 after a promotion)
    checks: list[CheckResult] = field(default_factory=list)
    state: AnalysisState = field(default_factory=AnalysisState)  # the state after this decision
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def final(self) -> bool:
        return self.action in ("promote", "rollback")

    def line(self) -> str:
        """One terminal line: what was decided and why."""
        judged = ", ".join(_judged(c) for c in self.checks)
        return f"[{self.percent:>3}%] {self.action.upper():8} v{self.candidate}: {self.reason}" + (
            f"  ({judged})" if judged else ""
        )

    def record(self) -> dict:
        """The status.history entry (camelCase, as the API writes it)."""
        return {
            "time": self.time.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "candidate": self.candidate,
            "stable": self.stable,
            "step": self.state.step,
            "trafficPercent": self.percent,
            "nextTrafficPercent": self.next_percent,
            "action": self.action,
            "reason": self.reason,
            "failedChecks": self.state.failed_checks,
            "checks": [c.record() for c in self.checks],
        }


def _judged(check: CheckResult) -> str:
    if check.status == "skip":
        return f"{check.name} skipped"
    if check.name == "labelledLoss":  # a test, not a bound: the increase can exceed the threshold and still pass
        verdict = "significantly >" if check.status == "fail" else "not significantly >"
        return f"labelledLoss {_fmt(check.value)} {verdict} {_fmt(check.threshold)}"
    return f"{check.name} {_fmt(check.value)} {'>' if check.status == 'fail' else '<='} {_fmt(check.threshold)}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def run_checks(
    checks: CanaryChecks,
    stable: VersionSignals,
    candidate: VersionSignals,
    *,
    min_requests: int = MIN_REQUESTS,
    min_predictions: int = MIN_PREDICTIONS,
) -> list[CheckResult]:
    out: list[CheckResult] = []
    rate = candidate.error_rate
    if candidate.requests < min_requests or rate is None:
        out.append(
            CheckResult(
                "errorRate", "skip", rate, checks.max_error_rate, f"{candidate.requests:.0f} candidate requests"
            )
        )
    elif rate > checks.max_error_rate:
        out.append(
            CheckResult(
                "errorRate",
                "fail",
                rate,
                checks.max_error_rate,
                f"error rate {rate:.1%} of {candidate.requests:.0f} requests > {checks.max_error_rate:.1%}",
            )
        )
    else:
        out.append(CheckResult("errorRate", "pass", rate, checks.max_error_rate, f"error rate {rate:.1%}"))

    p99_candidate, p99_stable = candidate.p99(), stable.p99()
    if p99_candidate is None or not p99_stable:
        out.append(CheckResult("p99LatencyRatio", "skip", None, checks.max_p99_latency_ratio, "no latency to compare"))
    else:
        ratio = p99_candidate / p99_stable
        status: Status = "fail" if ratio > checks.max_p99_latency_ratio else "pass"
        out.append(
            CheckResult(
                "p99LatencyRatio",
                status,
                ratio,
                checks.max_p99_latency_ratio,
                f"p99 {p99_candidate * 1000:.1f} ms vs stable {p99_stable * 1000:.1f} ms",
            )
        )

    if candidate.predicted < min_predictions or stable.predicted < min_predictions:
        out.append(
            CheckResult(
                "predictionShift",
                "skip",
                None,
                checks.max_prediction_shift,
                f"{candidate.predicted:.0f} candidate / {stable.predicted:.0f} stable predictions",
            )
        )
    else:
        shift, why = prediction_shift(stable, candidate)
        status = "fail" if shift > checks.max_prediction_shift else "pass"
        out.append(CheckResult("predictionShift", status, shift, checks.max_prediction_shift, why))

    if checks.labelled.enabled:
        out.append(labelled_check(checks.labelled, stable, candidate))
    if checks.fail_on_drift:
        if candidate.drift is None:
            out.append(CheckResult("drift", "skip", None, None, "no detector reports the candidate"))
        elif candidate.drift:
            out.append(CheckResult("drift", "fail", 1.0, 0.0, "the drift detector flags the candidate"))
        else:
            out.append(CheckResult("drift", "pass", 0.0, 0.0, "no drift on the candidate"))
    return out


def labelled_check(checks: LabelledChecks, stable: VersionSignals, candidate: VersionSignals) -> CheckResult:
    """The candidate's mean loss on its labelled rows of the interval against the stable's: fails when a one-sided
    Welch test finds it higher by more than maxLossIncrease at the significance level."""
    ours, theirs = candidate.loss(), stable.loss()
    if candidate.labelled < checks.min_labels or stable.labelled < checks.min_labels or ours is None or theirs is None:
        why = f"{candidate.labelled:.0f} candidate / {stable.labelled:.0f} stable labelled rows"
        why += f" (need {checks.min_labels})"
        return CheckResult("labelledLoss", "skip", None, checks.max_loss_increase, why)
    (mean_c, var_c), (mean_s, var_s) = ours, theirs
    increase = mean_c - mean_s
    spread = math.sqrt(var_c / candidate.labelled + var_s / stable.labelled)
    excess = increase - checks.max_loss_increase
    p_value = 0.5 * math.erfc(excess / spread / math.sqrt(2)) if spread > 0 else (0.0 if excess > 0 else 1.0)
    worse = p_value < checks.significance
    why = (
        f"mean loss {mean_c:.4f} vs stable {mean_s:.4f} on {candidate.labelled:.0f} / {stable.labelled:.0f} labelled "
        f"rows (increase {increase:+.4f}, p={p_value:.3g}{' <' if worse else ' >='} {checks.significance:g})"
    )
    return CheckResult("labelledLoss", "fail" if worse else "pass", increase, checks.max_loss_increase, why)


def prediction_shift(stable: VersionSignals, candidate: VersionSignals) -> tuple[float, str]:
    """The candidate's prediction shift from the stable version, and in words what decided it (named first)."""
    ks = ks_distance(candidate.predictions, stable.predictions) or 0.0
    ours, theirs = candidate.class_shares(), stable.class_shares()
    if ours is None or theirs is None:
        return ks, f"KS distance {ks:.3f} between candidate and stable predictions"
    gap, label = share_gap(ours, theirs)
    histogram = f"KS distance {ks:.3f} of the confidence histograms"
    mix = (
        f"predicted-class share gap {gap:.3f} (class {label!r}: {ours.get(label, 0.0):.1%} of the candidate's "
        f"predictions, {theirs.get(label, 0.0):.1%} of the stable's)"
    )
    return (gap, f"{mix} > {histogram}") if gap > ks else (ks, f"{histogram} >= {mix}")


def decide(
    analysis: CanaryAnalysis,
    state: AnalysisState,
    stable: VersionSignals,
    candidate: VersionSignals,
    *,
    min_requests: int = MIN_REQUESTS,
    min_predictions: int = MIN_PREDICTIONS,
    now: datetime | None = None,
) -> Decision:
    """Judge the interval that just ended at `analysis.steps[state.step]` percent."""
    steps = analysis.steps
    step = min(state.step, len(steps) - 1)
    percent = steps[step]
    checks = run_checks(analysis.checks, stable, candidate, min_requests=min_requests, min_predictions=min_predictions)
    failed = [c for c in checks if c.status == "fail"]
    common = {
        "candidate": candidate.version,
        "stable": stable.version,
        "percent": percent,
        "checks": checks,
        "time": now or datetime.now(UTC),
    }
    intervals = state.intervals + 1
    if failed:
        count = state.failed_checks + 1
        why = "; ".join(c.reason for c in failed)
        after = AnalysisState(step=step, failed_checks=count, intervals=intervals)
        if count >= analysis.max_failed_checks:
            reason = f"{why} (failed check {count} of {analysis.max_failed_checks}): rolling back to v{stable.version}"
            return Decision("rollback", reason, next_percent=0, state=after, **common)
        reason = f"{why} (failed check {count} of {analysis.max_failed_checks}): holding at {percent}%"
        return Decision("hold", reason, next_percent=percent, state=after, **common)
    if candidate.requests < min_requests:
        reason = f"only {candidate.requests:.0f} candidate requests in the interval (need {min_requests}): holding"
        return Decision("hold", reason, next_percent=percent, state=replace(state, intervals=intervals), **common)
    passed = ", ".join(c.name for c in checks if c.status == "pass") or "no check applicable"
    if step + 1 < len(steps):
        after = AnalysisState(step=step + 1, failed_checks=state.failed_checks, intervals=intervals)
        reason = f"checks passed at {percent}% ({passed}): advancing to {steps[step + 1]}%"
        return Decision("advance", reason, next_percent=steps[step + 1], state=after, **common)
    after = AnalysisState(step=step, failed_checks=state.failed_checks, intervals=intervals)
    reason = f"checks passed at the last step {percent}% ({passed}): promoting v{candidate.version}"
    return Decision("promote", reason, next_percent=100, state=after, **common)
