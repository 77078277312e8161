"""The retrain policy: pure. Retrain when the drift detector has flagged the stable version for `sustainedFor`,
at most once per `minInterval`, and never while a canary is still being analysed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubeloop.analysis.signals import duration_seconds
from kubeloop.api.modeldeployment import Retrain


@dataclass(frozen=True)
class RetrainState:
    drift_since: datetime | None = None  # when the current uninterrupted Drift began
    last_started: datetime | None = None  # when the last retraining started


@dataclass(frozen=True)
class RetrainDecision:
    start: bool
    reason: str
    state: RetrainState


def decide_retrain(
    policy: Retrain, state: RetrainState, drifting: bool, now: datetime, *, canary_active: bool = False
) -> RetrainDecision:
    """Update the drift clock with the latest drift flag and say whether to start retraining now."""
    since = (state.drift_since or now) if drifting else None
    current = RetrainState(drift_since=since, last_started=state.last_started)
    if not policy.enabled:
        return RetrainDecision(False, "retraining is disabled (spec.retrain.enabled)", current)
    if since is None:
        return RetrainDecision(False, "no drift", current)
    sustained = (now - since).total_seconds()
    needed = duration_seconds(policy.sustained_for)
    if sustained < needed:
        return RetrainDecision(False, f"drift for {sustained:.0f}s of the {policy.sustained_for} required", current)
    if canary_active:
        return RetrainDecision(False, "drift sustained, but a canary is being analysed", current)
    if state.last_started is not None:
        waited = (now - state.last_started).total_seconds()
        if waited < duration_seconds(policy.min_interval):
            return RetrainDecision(
                False,
                f"drift sustained, but the last retraining started {waited:.0f}s ago "
                f"(minInterval {policy.min_interval})",
                current,
            )
    reason = f"drift sustained for {sustained:.0f}s (>= {policy.sustained_for}): retraining"
    return RetrainDecision(True, reason, RetrainState(drift_since=since, last_started=now))
