"""Shadow analysis in the cluster: `decide_shadow` of kubeloop.analysis on Prometheus signals, on the watch timer.

The ModelDeployment timer (operators.deployment_handlers) calls `tick` for a deployment with spec.shadow whose
HTTPRoute mirrors to it (condition Shadow True, operators.shadow); `tick` acts once per window
(spec.shadow.analysis.interval, or the API's default without analysis):

- a new shadow: status.shadow starts at zero windows, a `shadowStart` history entry and a `ShadowStarted` Event;
- each window: the stable's and the shadow's signals over it (the paired agreement is skipped in a cluster: the
  Gateway discards the shadow's answers, so `Queries.cluster()` names no paired series), judged by `decide_shadow`;
  status.shadow is that window's report (ShadowReport);
- without spec.shadow.analysis that is all (report only: nothing is decided, no history);
- with it, every window is a history entry (`decision.record()`) and an Event: hold (`ShadowHolding`); promote
  (`ShadowPromoted`: spec.canary = the shadow version at the first step of spec.shadow.analysis.canary, spec.shadow
  removed, and operators.canary's analysis takes over; held while another canary is being analysed); reject
  (`ShadowRejected`: spec.shadow removed, then its ModelVersion marked Rejected with the reason, as a rolled-back
  canary is). The reconcile then drops the mirror and stops the shadow's InferenceService (operators.shadow).

Nothing is judged while the deployment serves a Rejected version (spec.allowRejected) or its spec was refused.
Where the analysis stands lives in status.shadow, so a restarted operator resumes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubeloop.analysis import SignalSource
from kubeloop.analysis.shadow import ShadowDecision, ShadowState, decide_shadow
from kubeloop.analysis.signals import SignalError, duration_seconds
from kubeloop.api import ModelDeployment
from kubeloop.api.modeldeployment import ShadowAnalysis
from kubeloop.kube import Kube
from operators import canary, common, inferenceservice, shadow

log = logging.getLogger("operators.shadow")

Emit = Callable[[Mapping[str, Any], str, str, str], None]
EVENTS = {"shadowHold": "ShadowHolding", "shadowPromote": "ShadowPromoted", "shadowReject": "ShadowRejected"}


def mirror_applied(status: Mapping[str, Any]) -> bool:
    """Whether the reconcile says the HTTPRoute mirrors to the shadow (condition Shadow True)."""
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == shadow.CONDITION), None)
    return cond is not None and cond.get("status") == "True"


def tick(
    body: Mapping[str, Any], kube: Kube, emit: Emit, source: SignalSource | None, now: datetime | None = None
) -> str | None:
    """One look at a deployment's shadow; returns the history action written (None: none)."""
    now = now or datetime.now(UTC)
    md = ModelDeployment.model_validate(dict(body))
    spec = md.spec.shadow
    status = dict(body.get("status") or {})
    if spec is None or not mirror_applied(status) or not inferenceservice.analysable(status):
        return None
    namespace, name = md.metadata.namespace, md.metadata.name
    history = list(status.get("history") or [])
    current = status.get("shadow") or {}
    analysis = spec.analysis or ShadowAnalysis()

    def write(report: dict[str, Any], entry: dict[str, Any] | None = None, spec_patch: dict | None = None) -> None:
        # status.shadow replaced, not merged: a value this window has none of (no labels yet, say) must go
        patch: dict[str, Any] = {"shadow": dict.fromkeys(current) | report}
        if entry is not None:
            patch["history"] = [*history, entry][-canary.HISTORY_LIMIT :]
        kube.patch(canary.MODELDEPLOYMENT, namespace, name, {"status": patch}, subresource="status")
        if spec_patch:
            kube.patch(canary.MODELDEPLOYMENT, namespace, name, {"spec": spec_patch})

    if current.get("version") != spec.version:
        judged = (
            f"judged every {analysis.interval}: {analysis.windows} passing windows make it the canary, "
            f"{analysis.max_failed_windows} failing ones reject it"
            if spec.analysis
            else "reported every window, never promoted (no spec.shadow.analysis)"
        )
        reason = f"v{spec.version} receives {spec.percent}% of v{md.spec.version}'s requests, mirrored; {judged}"
        report = {"version": spec.version, "mirrored": 0, "passedWindows": 0, "failedWindows": 0,
                  "lastChecked": common.iso(now)}  # fmt: skip
        entry = {"time": common.iso(now), "action": "shadowStart", "reason": reason, "candidate": spec.version,
                 "stable": md.spec.version}  # fmt: skip
        write(report, entry)
        emit(body, "Normal", "ShadowStarted", reason)
        return "shadowStart"

    last = common.parse_time(current.get("lastChecked")) or now
    if (now - last).total_seconds() < duration_seconds(analysis.interval):
        return None
    if source is None:
        write(current | {"lastChecked": common.iso(now)})
        emit(body, "Warning", "NoPrometheus", "the shadow analysis needs Prometheus (KUBELOOP_PROMETHEUS_URL; "
             "chart: analysis.prometheusUrl): nothing is judged")  # fmt: skip
        return None
    window = max((now - last).total_seconds(), 1.0)
    try:
        stable = source.version_signals(md.spec.model, md.spec.version, window, namespace)
        candidate = source.version_signals(md.spec.model, spec.version, window, namespace)
        paired = source.paired_signals(md.spec.model, spec.version, window, namespace)
    except SignalError as error:
        emit(body, "Warning", "SignalsUnavailable", str(error))
        return None
    state = ShadowState(int(current.get("passedWindows", 0)), int(current.get("failedWindows", 0)))
    decision = replace(decide_shadow(analysis, state, stable, candidate, paired), time=now)
    report = decision.report | {"lastChecked": common.iso(now)}
    if spec.analysis is None:
        write(report)
        return None
    if decision.action == "shadowPromote" and md.spec.canary is not None:
        waits = f"; v{md.spec.canary.version} is being analysed as the canary: v{spec.version} waits for it"
        decision = replace(decision, action="shadowHold", reason=decision.reason + waits)
    return _act(body, md, decision, report, write, kube, emit)


def _act(
    body: Mapping[str, Any], md: ModelDeployment, decision: ShadowDecision, report: dict[str, Any],
    write: Callable[..., None], kube: Kube, emit: Emit,
) -> str:  # fmt: skip
    spec = md.spec.shadow
    assert spec is not None and spec.analysis is not None
    entry = decision.record()
    if decision.action == "shadowPromote":
        then = spec.analysis.canary
        promoted = {
            "version": spec.version,
            "trafficPercent": then.steps[0],
            "analysis": then.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        write(report, entry, {"canary": promoted, "shadow": None})
        emit(body, "Normal", EVENTS[decision.action], decision.reason)
    elif decision.action == "shadowReject":
        # the spec first: a Rejected version the spec still names would stop the reconcile
        write(report, entry, {"shadow": None})
        canary.set_stage(kube, emit, body, md, spec.version, "Rejected", decision.reason)
        emit(body, "Warning", EVENTS[decision.action], decision.reason)
    else:
        write(report, entry)
        failed = any(check.status == "fail" for check in decision.checks)
        emit(body, "Warning" if failed else "Normal", EVENTS[decision.action], decision.reason)
    log.info("shadow %s/%s: %s", md.metadata.namespace, md.metadata.name, decision.reason)
    return decision.action
