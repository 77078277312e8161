"""Automated canary analysis in the cluster: the same engine as the embedded loop (kubeloop.analysis), on
Prometheus signals.

A kopf timer (registered in operators.deployment_handlers) calls `tick` every analysis tick
(settings.analysis_tick_seconds) for each ModelDeployment with `spec.canary.analysis`; `tick` acts once per
`analysis.interval`:

- a new candidate: record the start in status.canaryAnalysis and set `spec.canary.trafficPercent` to the first step;
- while the HTTPRoute holds the canary's share back (KServe has not reported it ready, operators.httproute): move
  the interval's start along, so the first interval judged is one in which the canary had its share;
- otherwise read both versions' signals over the last interval, `decide`, and write the decision to
  status.history and an Event;
- advance: `spec.canary.trafficPercent` = next step (the reconcile handler carries it to the InferenceService);
- promote: `spec.version` = the candidate, `spec.canary` removed, its ModelVersion Production (the old one Archived);
- rollback: `spec.canary` removed (100% to stable), its ModelVersion Rejected with the reason, never deleted.

Nothing is judged while the reconcile refused the spec for naming a Rejected version (condition VersionAdmitted
False), nor while spec.allowRejected serves one (reason RejectedAllowed): a version that failed its gate is never
promoted. Where the analysis stands lives in status.canaryAnalysis, so an operator restart resumes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubeloop.analysis import AnalysisState, PrometheusSource, SignalSource, decide
from kubeloop.analysis.signals import Queries, SignalError, duration_seconds
from kubeloop.api import ModelDeployment, ModelVersion
from kubeloop.kube import ApiError, Kind, Kube, kind_of
from operators import common, httproute, inferenceservice
from operators.settings import Settings

log = logging.getLogger("operators.canary")

MODELDEPLOYMENT = kind_of("kubeloop.dev/v1alpha1", "ModelDeployment")
MODELVERSION = kind_of("kubeloop.dev/v1alpha1", "ModelVersion")
HISTORY_LIMIT = 50

Emit = Callable[[Mapping[str, Any], str, str, str], None]


def prometheus_source(settings: Settings) -> SignalSource | None:
    """Prometheus at settings.prometheus_url (e.g. http://prometheus-operated.monitoring:9090); None when unset.
    Queries: the model servers' own series per namespace (`Queries.cluster()`), each replaceable in settings."""
    if not settings.prometheus_url:
        return None
    defaults = Queries.cluster()
    queries = replace(
        defaults,
        requests=settings.query_requests or defaults.requests,
        latency_buckets=settings.query_latency or defaults.latency_buckets,
        prediction_buckets=settings.query_predictions or defaults.prediction_buckets,
        predicted_classes=settings.query_predicted_classes or defaults.predicted_classes,
        drift=settings.query_drift or defaults.drift,
    )
    return PrometheusSource(settings.prometheus_url, queries)


def tick(
    body: Mapping[str, Any], kube: Kube, emit: Emit, source: SignalSource | None, now: datetime | None = None
) -> str | None:
    """One look at a ModelDeployment's canary; returns the action taken (None: nothing due)."""
    now = now or datetime.now(UTC)
    md = ModelDeployment.model_validate(dict(body))
    canary = md.spec.canary
    status = dict(body.get("status") or {})
    if canary is None or canary.analysis is None or not inferenceservice.analysable(status):
        return None
    analysis = canary.analysis
    namespace, name = md.metadata.namespace, md.metadata.name
    history = list(status.get("history") or [])
    current = status.get("canaryAnalysis") or {}

    def write(spec_patch: dict | None, status_patch: dict, entry: dict) -> None:
        status_patch["history"] = [*history, entry][-HISTORY_LIMIT:]
        kube.patch(MODELDEPLOYMENT, namespace, name, {"status": status_patch}, subresource="status")
        if spec_patch:
            kube.patch(MODELDEPLOYMENT, namespace, name, {"spec": spec_patch})

    if current.get("version") != canary.version:
        first = analysis.steps[0]
        reason = f"canary v{canary.version} starts at {first}% against v{md.spec.version}; steps {analysis.steps}"
        reason += f", every {analysis.interval}"
        entry = {"time": common.iso(now), "action": "start", "reason": reason, "candidate": canary.version}
        entry |= {"stable": md.spec.version, "step": 0, "trafficPercent": first}
        state = {"version": canary.version, "step": 0, "failedChecks": 0, "intervals": 0}
        state |= {"started": common.iso(now), "lastChecked": common.iso(now)}
        spec_patch = {"canary": {"trafficPercent": first}} if canary.traffic_percent != first else None
        write(spec_patch, {"canaryAnalysis": state, "canaryPhase": "Progressing"}, entry)
        emit(body, "Normal", "CanaryStarted", reason)
        return "start"

    if httproute.canary_waiting(status):
        kube.patch(MODELDEPLOYMENT, namespace, name, {"status": {"canaryAnalysis": {"lastChecked": common.iso(now)}}},
                   subresource="status")  # fmt: skip
        return None
    last = common.parse_time(current.get("lastChecked")) or now
    if (now - last).total_seconds() < duration_seconds(analysis.interval):
        return None
    if source is None:
        message = "canary analysis needs Prometheus (KUBELOOP_PROMETHEUS_URL; chart: analysis.prometheusUrl); holding"
        emit(body, "Warning", "NoPrometheus", message)
        return None
    window = max((now - last).total_seconds(), 1.0)
    try:
        stable = source.version_signals(md.spec.model, md.spec.version, window, namespace)
        candidate = source.version_signals(md.spec.model, canary.version, window, namespace)
    except SignalError as error:
        emit(body, "Warning", "SignalsUnavailable", str(error))
        return None
    state = AnalysisState(
        step=int(current.get("step", 0)),
        failed_checks=int(current.get("failedChecks", 0)),
        intervals=int(current.get("intervals", 0)),
    )
    decision = decide(analysis, state, stable, candidate, now=now)
    entry = decision.record()
    after = dict(current) | {
        "step": decision.state.step,
        "failedChecks": decision.state.failed_checks,
        "intervals": decision.state.intervals,
        "lastChecked": common.iso(now),
    }
    kind = "Warning" if decision.action in ("hold", "rollback") and decision.state.failed_checks else "Normal"
    if decision.action == "promote":
        # the registry first: whoever sees the deployment on the new version finds it Production (and a restart
        # in between judges the same interval again, which sets the same stages)
        set_stage(kube, emit, body, md, md.spec.version, "Archived", f"superseded by v{canary.version}")
        set_stage(kube, emit, body, md, canary.version, "Production", decision.reason)
        write({"version": canary.version, "canary": None}, {"canaryAnalysis": None, "canaryPhase": "Promoted"}, entry)
        emit(body, "Normal", "CanaryPromoted", decision.line())
    elif decision.action == "rollback":
        # traffic first; the candidate is marked Rejected once no spec names it (a Rejected version named by the
        # spec would stop the reconcile)
        write({"canary": None}, {"canaryAnalysis": None, "canaryPhase": "RolledBack"}, entry)
        set_stage(kube, emit, body, md, canary.version, "Rejected", decision.reason)
        emit(body, "Warning", "CanaryRolledBack", decision.line())
    else:
        spec_patch = {"canary": {"trafficPercent": decision.next_percent}}
        write(spec_patch if decision.next_percent != canary.traffic_percent else None, {"canaryAnalysis": after}, entry)
        emit(body, kind, "CanaryAdvanced" if decision.action == "advance" else "CanaryHolding", decision.line())
    log.info("canary %s/%s: %s", namespace, name, decision.line())
    return decision.action


def set_stage(kube: Kube, emit: Emit, body: Mapping[str, Any], md: ModelDeployment, version: int, stage: str,
               reason: str) -> None:  # fmt: skip
    name = ModelVersion.resource_name(md.spec.model, version)
    kind: Kind = MODELVERSION
    try:
        if kube.get(kind, md.metadata.namespace, name) is None:
            return
        kube.patch(kind, md.metadata.namespace, name, {"spec": {"stage": stage, "stageReason": reason[:1000]}})
    except ApiError as error:
        emit(body, "Warning", "ModelVersionStage", f"could not mark {name} {stage}: {error}")
