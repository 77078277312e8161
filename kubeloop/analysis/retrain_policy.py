"""The retrain policy: pure. Retrain when the trigger spec.retrain.on names (the drift detector's flag on the stable
version, its live performance worse than a threshold, or either) has held for `sustainedFor`, at most once per
`minInterval`, and never while a canary is still being analysed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubeloop.analysis.signals import duration_seconds
from kubeloop.api.modeldeployment import Retrain


@dataclass(frozen=True)
class RetrainState:
    triggered_since: datetime | None = None  # when the current uninterrupted trigger began
    last_started: datetime | None = None  # when the last retraining started


@dataclass(frozen=True)
class RetrainDecision:
    start: bool
    reason: str
    state: RetrainState


def underperforming(policy: Retrain, live: dict[str, float]) -> str | None:
    """Why the stable version's live metrics (kubeloop_live_metric, `rows` included) are worse than
    spec.retrain.performance, or None (no trigger set, too few labelled rows, or good enough)."""
    trigger = policy.performance
    if trigger is None or live.get("rows", 0) < trigger.min_labels or trigger.metric not in live:
        return None
    value = live[trigger.metric]
    if not trigger.worse(value):
        return None
    return f"live {trigger.metric} {value:.3f} on {live['rows']:.0f} labelled rows is worse than {trigger.threshold:g}"


def decide_retrain(
    policy: Retrain,
    state: RetrainState,
    drifting: bool,
    now: datetime,
    *,
    canary_active: bool = False,
    performance: str | None = None,
) -> RetrainDecision:
    """Update the trigger's clock with the latest drift flag and performance finding (`underperforming`) and say
    whether to start retraining now."""
    causes = []
    if drifting and policy.on in ("drift", "both"):
        causes.append("drift")
    if performance is not None and policy.on in ("performance", "both"):
        causes.append(performance)
    since = (state.triggered_since or now) if causes else None
    current = RetrainState(triggered_since=since, last_started=state.last_started)
    if not policy.enabled:
        return RetrainDecision(False, "retraining is disabled (spec.retrain.enabled)", current)
    if since is None:
        return RetrainDecision(False, f"no trigger (spec.retrain.on: {policy.on})", current)
    cause = "; ".join(causes)
    sustained = (now - since).total_seconds()
    needed = duration_seconds(policy.sustained_for)
    if sustained < needed:
        return RetrainDecision(False, f"{cause} for {sustained:.0f}s of the {policy.sustained_for} required", current)
    if canary_active:
        return RetrainDecision(False, f"{cause} sustained, but a canary is being analysed", current)
    if state.last_started is not None:
        waited = (now - state.last_started).total_seconds()
        if waited < duration_seconds(policy.min_interval):
            return RetrainDecision(
                False,
                f"{cause} sustained, but the last retraining started {waited:.0f}s ago "
                f"(minInterval {policy.min_interval})",
                current,
            )
    reason = f"{cause} sustained for {sustained:.0f}s (>= {policy.sustained_for}): retraining"
    return RetrainDecision(True, reason, RetrainState(triggered_since=since, last_started=now))
