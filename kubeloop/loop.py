"""`kubeloop quickstart --loop`: the closed loop on this machine, no cluster.

serve v1 (KServe model server + drift sidecar) -> shifted traffic, with its labels sent back for half the requests
(ground-truth feedback) -> the detector flags drift (or the live ROC AUC falls) -> the retrain policy fires once
that is sustained -> a TrainingJob on the shifted data -> the evaluation gate -> v2 as a canary behind the traffic
splitter -> the analysis engine walks the steps (10 -> 25 -> 50 -> 100) on Prometheus signals with the API's
default checks for a retrained version (errors, p99 latency ratio, drift, and the labelled loss against the
stable's: a Welch test; the prediction shift recorded) -> v2 Production; or, with a broken candidate
(`break_candidate="errors"|"garbage"`) or one worse on labels but not broken (`"worse"`), rolled back within
maxFailedChecks intervals and marked Rejected (never deleted). With `shadow=True` v2 is a shadow first (every request
mirrored to it, its answers paired with the users' and never returned) and becomes the canary only after
SHADOW_WINDOWS passing windows, or is Rejected as a shadow. Every decision is printed with its reason.

The processes are a `LocalDeployment` (what `kubeloop run -f modeldeployment.yaml` starts), the canary added to it
at run time; the `errors` candidate is the splitter's injected fault rate. Signals come from a real Prometheus
scraping the processes every second (`Scraped`), read with the PromQL-shaped queries and the analysis engine
(`kubeloop.analysis`) the operator runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pandas as pd

from kubeloop import config
from kubeloop.analysis import (
    AnalysisState,
    Decision,
    PrometheusSource,
    RetrainState,
    VersionSignals,
    decide,
    decide_retrain,
    duration_seconds,
    underperforming,
)
from kubeloop.analysis.prometheus import Scraped
from kubeloop.analysis.shadow import ShadowDecision, ShadowState, decide_shadow
from kubeloop.api import ModelDeployment, TrainingJob
from kubeloop.api.modeldeployment import (
    Canary,
    CanaryAnalysis,
    PerformanceTrigger,
    Retrain,
    RetrainAnalysis,
    Shadow,
    ShadowAnalysis,
)
from kubeloop.api.modelversion import ModelVersion
from kubeloop.broken_candidates import garbage_record, worse_record
from kubeloop.data.snapshot import load_snapshot, read_frame
from kubeloop.errors import KubeloopError
from kubeloop.local_deployment import LocalDeployment
from kubeloop.log import event
from kubeloop.quickstart import sample
from kubeloop.registry import Registry
from kubeloop.traffic import TrafficPump, shifted

log = logging.getLogger(__name__)
Broken = Literal["errors", "garbage", "worse"]
FAULT_RATE = 0.5  # the `errors` candidate: the splitter answers this share of its requests with HTTP 500
LABEL_SHARE = 0.5  # share of the requests whose labels the traffic sends back
# the canary analysis interval: at 10% the candidate then gets ~150 requests (its p99 is not one slow request) and
# ~800 labelled rows (the labelled check needs 50) an interval, measured on a 2-core machine at ~160 requests/s
INTERVAL = "10s"
# A shadow's latency as each server times it (as in a cluster): the mirror's copies go out after the users' answers,
# in bursts when the shadow lags, so the splitter's clock for them counts a queue users never wait in
SERVED_LATENCY = 'kubeloop_request_duration_seconds_bucket{model="$model",version="$version"}'
SHADOW_WINDOWS = 2  # passing windows before a shadow becomes the canary (the API's default is 3 of 30s)
RETRAIN_AUC_DROP = 0.05  # retrain also when the stable's live ROC AUC falls this far below its evaluated one


@dataclass
class LoopResult:
    outcome: Literal["promoted", "rolled-back", "rejected-as-shadow", "no-drift", "gate-failed"]
    stable: int
    candidate: int | None = None
    decisions: list[Decision] = field(default_factory=list)
    shadow_decisions: list[ShadowDecision] = field(default_factory=list)  # with --shadow, before the canary
    history: list[dict] = field(default_factory=list)  # the status.history entries a cluster would hold
    history_path: Path | None = None  # where they were written as they happened (JSON Lines)
    seconds_drift_to_full: float | None = None  # first drifted request -> candidate at 100%
    seconds_drift_to_detected: float | None = None
    seconds_to_rollback: float | None = None  # candidate serving -> rolled back
    intervals_to_rollback: int | None = None
    backend: str = ""
    feedback_sent: int = 0  # requests whose labels the traffic sent back (accepted by the feedback endpoint)
    feedback_failed: int = 0
    requests_sent: int = 0  # by the traffic, and those a user got an error for
    requests_failed: int = 0
    live: dict[int, dict[str, float]] = field(default_factory=dict)  # per version, at the last decision


def _say(text: str) -> None:
    print(text, flush=True)


# ---- what the phases share --------------------------------------------------------------------------------------


def loop_analysis(interval: str, steps: list[int] | None = None, max_failed_checks: int = 2) -> CanaryAnalysis:
    """The loop's canary analysis: the API's defaults for a retrained version (judged on labelled performance, its
    prediction shift recorded)."""
    return RetrainAnalysis(steps=steps or [10, 25, 50, 100], interval=interval, max_failed_checks=max_failed_checks)


@dataclass
class Loop:
    """What the phases share: the registry, the TrainingJob to copy and the stable version's training rows, the
    deployment's processes, the traffic, the signals and the result so far (each history entry also appended to
    `result.history_path` as it happens)."""

    registry: Registry
    job: TrainingJob
    data: pd.DataFrame
    analysis: CanaryAnalysis
    result: LoopResult
    local: LocalDeployment
    pump: TrafficPump
    scraped: Scraped
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kubeloop-loop-")))

    @property
    def model(self) -> str:
        return self.local.deployment.spec.model

    def signals(self, version: int, window_s: float) -> VersionSignals:
        return self.scraped.source.version_signals(self.model, version, window_s)

    def scrape(self, job: str, *urls: str | None) -> None:
        """Have Prometheus scrape these processes (a drift sidecar is None when drift monitoring is off)."""
        self.scraped.scrape(job, [url for url in urls if url is not None])

    def keep(self, entry: dict) -> None:
        self.result.history.append(entry)
        with self.result.history_path.open("a") as out:  # type: ignore[union-attr]
            out.write(json.dumps(entry) + "\n")

    def record(self, action: str, reason: str, **extra: object) -> None:
        entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "action": action, "reason": reason}
        self.keep(entry | extra)
        _say(f"[loop] {action.upper():8} {reason}")

    def stop(self) -> None:
        self.pump.stop()
        self.result.feedback_sent, self.result.feedback_failed = self.pump.feedback_sent, self.pump.feedback_failed
        self.result.requests_sent, self.result.requests_failed = self.pump.sent, self.pump.failed
        self.local.stop()
        self.scraped.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def prepare(registry: Registry, job: TrainingJob, stable: ModelVersion, analysis: CanaryAnalysis, window: int) -> Loop:
    """The loop's state around a stable version: nothing started but the Prometheus it reads."""
    model, v1 = stable.spec.model, stable.spec.version
    result = LoopResult(outcome="no-drift", stable=v1)
    result.history_path = config.loops_dir() / f"{model}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl"
    result.history_path.parent.mkdir(parents=True, exist_ok=True)
    deployment = ModelDeployment.model_validate(
        {
            "metadata": {"name": f"{model}-loop"},
            "spec": {"model": model, "version": v1, "drift": {"window": window, "referenceSize": 1000}},
        }
    )
    data = read_frame(load_snapshot(stable.spec.lineage.dataset_digest))
    inputs = [f.name for f in stable.spec.signature.inputs]
    pump = TrafficPump(model, data[inputs], data[job.spec.dataset.label], label_share=LABEL_SHARE)
    scraped = Scraped()
    result.backend = scraped.backend
    return Loop(registry, job, data, analysis, result, LocalDeployment(deployment, registry), pump, scraped)


def retrain_policy(job: TrainingJob, stable: ModelVersion, sustained_for: str) -> Retrain:
    """Retrain on sustained drift or on the stable's live ROC AUC (on the labels the traffic sends back) falling
    RETRAIN_AUC_DROP below the one it was evaluated with, whichever comes first."""
    evaluated = stable.spec.metrics.overall.roc_auc
    if evaluated is None:
        raise KubeloopError(f"{stable.metadata.name} has no evaluated ROC AUC: the loop's model must be binary")
    return Retrain(
        enabled=True,
        on="both",
        performance=PerformanceTrigger(metric="rocAuc", threshold=round(evaluated - RETRAIN_AUC_DROP, 3)),
        sustained_for=sustained_for,
        min_interval="10m",
        training_job=job.metadata.name,
    )


# ---- the phases -------------------------------------------------------------------------------------------------


def train_stable(job: TrainingJob, registry: Registry, reuse_production: bool) -> ModelVersion:
    """The Production version to start from: the registry's when reused, else trained, gated and promoted."""
    from kubeloop.training.job import run_training_job

    model = job.spec.model.name
    stable = registry.production(model) if reuse_production else None
    if stable is not None:
        return stable
    _say(
        f"[loop] train the stable version of {model}: {job.spec.workers.replicas} Ray workers, "
        f"{job.spec.hyperparameters.epochs} epochs"
    )
    stable = run_training_job(job, registry).model_version
    if stable.spec.stage == "Rejected":
        raise KubeloopError(f"{stable.metadata.name} did not pass the gate: {stable.spec.stage_reason}")
    production = registry.production(model)
    if production is None or production.spec.version != stable.spec.version:
        stable = registry.promote(model, stable.spec.version, "first version of the loop")
    return stable


def deploy_stable(loop: Loop) -> None:
    """v1 served (model server + drift sidecar), scraped, with in-distribution traffic flowing for a few seconds."""
    v1 = loop.result.stable
    _say(f"[loop] signals from {loop.scraped.backend}")
    endpoints = loop.local.start()
    loop.scrape("stable", endpoints.servers[v1], endpoints.sidecar)
    _say(f"[loop] serving {loop.model} v{v1} at {endpoints.url} (drift sidecar {endpoints.sidecar})")
    loop.pump.start(endpoints.url)
    time.sleep(3)
    if loop.signals(v1, 30).drift:
        _say(f"[loop] warning: the detector flags v{v1} before the shift (the measured time starts anyway)")


def watch_for_drift(loop: Loop, policy: Retrain, max_wait: float) -> bool:
    """Shift the traffic and wait until the retrain policy fires on sustained drift (True) or max_wait passes."""
    v1, result = loop.result.stable, loop.result
    _say("[loop] traffic shifts: arrestees 15 years older, colour mix inverted, unemployment up")
    loop.pump.shift()
    state, deadline = RetrainState(), time.monotonic() + max_wait
    while True:
        signals = loop.signals(v1, 30)
        drifting = bool(signals.drift)
        if drifting and result.seconds_drift_to_detected is None and loop.pump.first_shifted:
            result.seconds_drift_to_detected = time.monotonic() - loop.pump.first_shifted
            _say(f"[loop] drift detected on v{v1} {result.seconds_drift_to_detected:.1f}s after the shift")
        performance = underperforming(policy, signals.live)
        retrain = decide_retrain(policy, state, drifting, datetime.now(UTC), performance=performance)
        state = retrain.state
        if retrain.start:
            loop.record("retrain", retrain.reason, stable=v1, live=signals.live)
            return True
        if time.monotonic() > deadline:
            loop.record("retrainFailed", f"no sustained drift within {max_wait:.0f}s", stable=v1)
            return False
        time.sleep(0.5)


def retrain(loop: Loop) -> ModelVersion | None:
    """A copy of the TrainingJob on fresh shifted data; the candidate when it passed the gate, else None."""
    from kubeloop.training.job import run_training_job

    # a seed of its own per stable version: the stable's data may be shifted data already, and the same seed would
    # pick the same rows to flip again (unemployment would not rise, so the candidate's own detector would flag it)
    fresh = shifted(loop.data, seed=2 * loop.result.stable)
    data_path = loop.workdir / "arrests-shifted.csv"
    fresh.to_csv(data_path, index=False)
    job = loop.job.model_copy(deep=True)
    job.metadata.name = f"{loop.job.metadata.name}-retrain"
    job.spec.dataset.uri, job.spec.dataset.digest = str(data_path), None
    job.spec.dataset.baseline = "none"  # the point is that the data moved away from Production's
    _say(f"[loop] retraining on {len(fresh)} rows of the shifted data (TrainingJob {job.metadata.name})")
    candidate = run_training_job(job, loop.registry).model_version
    v2 = loop.result.candidate = candidate.spec.version
    if candidate.spec.stage == "Rejected":
        loop.record("retrainFailed", f"v{v2} failed the evaluation gate: {candidate.spec.stage_reason}", candidate=v2)
        loop.result.outcome = "gate-failed"
        return None
    gate = "; ".join(candidate.spec.gate.reasons) if candidate.spec.gate else ""
    auc = candidate.spec.metrics.overall.roc_auc
    _say(f"[loop] v{v2} passed the evaluation gate (AUC {auc:.3f}){f': {gate}' if gate else ''}")
    return candidate


def served_candidate(loop: Loop, candidate: ModelVersion, broken: Broken | None) -> tuple[Path | None, float]:
    """What the candidate is served from (None: the registry's record, else a broken copy) and the splitter's
    fault rate for it."""
    v2 = candidate.spec.version
    if broken == "garbage":
        _say(f"[loop] BROKEN CANDIDATE: v{v2} is served with scrambled weights (garbage predictions)")
        return garbage_record(candidate, loop.workdir / "broken"), 0.0
    if broken == "worse":
        rows = read_frame(load_snapshot(candidate.spec.lineage.dataset_digest))
        _say(f"[loop] WORSE CANDIDATE: v{v2} is served with its output logit mirrored around its median (AUC -> 1-AUC)")
        return worse_record(candidate, loop.workdir / "worse", rows), 0.0
    if broken == "errors":
        _say(f"[loop] BROKEN CANDIDATE: the splitter answers {FAULT_RATE:.0%} of v{v2}'s requests with HTTP 500")
        return None, FAULT_RATE
    return None, 0.0


def start_canary(loop: Loop, candidate: ModelVersion, broken: Broken | None) -> float:
    """The candidate as a canary at the first step behind the splitter, the traffic moved there; when it started."""
    v1, v2, percent = loop.result.stable, candidate.spec.version, loop.analysis.steps[0]
    record, fault_rate = served_candidate(loop, candidate, broken)
    canary = Canary(version=v2, traffic_percent=percent, analysis=loop.analysis)
    endpoints = loop.local.add_canary(canary, record, fault_rate)
    loop.scrape("canary", endpoints.servers[v2], endpoints.canary_sidecar, endpoints.splitter)
    loop.pump.url = endpoints.url
    started = time.monotonic()
    loop.record("start", f"canary v{v2} at {percent}% behind {endpoints.url}", candidate=v2, stable=v1)
    _wait_scraped(loop, v2)
    return started


def shadow_first(loop: Loop, candidate: ModelVersion, broken: Broken | None) -> float | None:
    """The candidate as a shadow (every request the stable answers mirrored to it, its answers paired with the
    users'), judged window by window by the shadow analysis: when it passes, it becomes the canary at the first
    step and this returns when; when it fails, it is Rejected (kept in the registry) and this returns None."""
    result, model = loop.result, loop.model
    v1, v2 = result.stable, candidate.spec.version
    record, fault_rate = served_candidate(loop, candidate, broken)
    analysis = ShadowAnalysis(interval=loop.analysis.interval, windows=SHADOW_WINDOWS, canary=loop.analysis)
    endpoints = loop.local.add_shadow(Shadow(version=v2, percent=100, analysis=analysis), record, fault_rate)
    loop.scrape("shadow", endpoints.servers[v2], endpoints.shadow_sidecar, endpoints.splitter)
    loop.pump.url = endpoints.url
    loop.record("shadowStart", f"shadow v{v2} mirrored every request v{v1} answers", candidate=v2, stable=v1)
    _wait_scraped(loop, v2)
    interval_s, state, scraped = duration_seconds(analysis.interval), ShadowState(), loop.scraped.source
    source = PrometheusSource(scraped.url, replace(scraped.queries, latency_buckets=SERVED_LATENCY))
    while True:
        time.sleep(interval_s)
        stable, shadow = (source.version_signals(model, v, interval_s) for v in (v1, v2))
        decision = decide_shadow(analysis, state, stable, shadow, source.paired_signals(model, v2, interval_s))
        state = decision.state
        result.shadow_decisions.append(decision)
        loop.keep(decision.record())
        _say(f"[loop] {decision.action:13} v{v2}: {decision.reason}")
        if decision.action == "shadowPromote":
            percent = loop.analysis.steps[0]
            loop.local.promote_shadow(Canary(version=v2, traffic_percent=percent, analysis=loop.analysis))
            loop.record("start", f"canary v{v2} (was the shadow) at {percent}%", candidate=v2, stable=v1)
            return time.monotonic()
        if decision.action == "shadowReject":
            loop.local.remove_shadow()
            loop.registry.reject(model, v2, decision.reason)
            result.outcome = "rejected-as-shadow"
            _say(f"[loop] v{v2} Rejected as a shadow (kept in the registry); no user got one of its answers")
            return None


def _wait_scraped(loop: Loop, version: int, timeout: float = 30) -> None:
    """Until the signal source sees the version's prediction histogram (Prometheus scraped the new targets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if loop.signals(version, 60).predicted > 0:
            return
        time.sleep(0.5)


def promote_or_rollback(loop: Loop, canary_started: float) -> None:
    """One analysis per interval on that interval's signals, the split moved as decided, until the engine promotes
    the candidate (Production) or rolls it back (Rejected, kept in the registry)."""
    analysis, result, model = loop.analysis, loop.result, loop.model
    v1, v2 = result.stable, result.candidate
    assert v2 is not None
    interval_s = duration_seconds(analysis.interval)
    state = AnalysisState()
    while True:
        time.sleep(interval_s)
        stable, candidate = loop.signals(v1, interval_s), loop.signals(v2, interval_s)
        result.live = {v1: stable.live, v2: candidate.live}
        decision = decide(analysis, state, stable, candidate)
        state = decision.state
        result.decisions.append(decision)
        loop.keep(decision.record())
        _say(f"[loop] {decision.line()}")
        if decision.next_percent != decision.percent:
            loop.local.set_canary_percent(decision.next_percent)
            if decision.next_percent == 100 and loop.pump.first_shifted:
                result.seconds_drift_to_full = time.monotonic() - loop.pump.first_shifted
        if decision.action == "promote":
            loop.registry.promote(model, v2, decision.reason)
            result.outcome = "promoted"
            _say(f"[loop] v{v2} is Production; v{v1} Archived")
            return
        if decision.action == "rollback":
            loop.registry.reject(model, v2, decision.reason)
            result.outcome = "rolled-back"
            result.seconds_to_rollback = time.monotonic() - canary_started
            result.intervals_to_rollback = decision.state.intervals
            _say(f"[loop] 100% back on v{v1}; v{v2} Rejected (kept in the registry)")
            return


def run_loop(
    epochs: int = 2,
    workers: int = 2,
    *,
    interval: str = INTERVAL,
    steps: list[int] | None = None,
    break_candidate: Broken | None = None,
    shadow: bool = False,
    sustained_for: str = "3s",
    reuse_production: bool = False,
    drift_window: int = 100,
    registry: Registry | None = None,
    max_drift_wait: float = 120,
) -> LoopResult:
    """The whole loop; prints every decision with its reason and returns what happened (see LoopResult)."""
    from kubeloop.training import ray_runner

    registry = registry or Registry()
    job = sample("trainingjob.yaml")
    assert isinstance(job, TrainingJob)
    job.spec.hyperparameters.epochs, job.spec.workers.replicas = epochs, workers
    # one Ray for both trainings: starting a second one next to the serving processes is slow on a small machine
    ray_started = ray_runner.connect(workers)
    loop: Loop | None = None
    try:
        stable = train_stable(job, registry, reuse_production)
        policy = retrain_policy(job, stable, sustained_for)
        loop = prepare(registry, job, stable, loop_analysis(interval, steps), drift_window)
        deploy_stable(loop)
        if watch_for_drift(loop, policy, max_drift_wait):
            candidate = retrain(loop)
            if candidate is not None and shadow:
                started = shadow_first(loop, candidate, break_candidate)
                if started is not None:
                    promote_or_rollback(loop, started)
            elif candidate is not None:
                promote_or_rollback(loop, start_canary(loop, candidate, break_candidate))
        return loop.result
    finally:
        if loop is not None:
            loop.stop()
        if ray_started:
            import ray

            ray.shutdown()
        event(log, "loop.done", outcome=loop.result.outcome if loop is not None else "error")


def report(result: LoopResult) -> str:
    lines = ["", "=== kubeloop quickstart --loop report ===", f"signals      {result.backend}"]
    if result.seconds_drift_to_detected is not None:
        lines.append(f"drift        detected {result.seconds_drift_to_detected:.1f}s after the first drifted request")
    if result.candidate is not None:
        lines.append(f"candidate    v{result.candidate} (retrained on the shifted data)")
    if result.feedback_sent or result.feedback_failed:
        lines.append(
            f"labels       sent back for {result.feedback_sent} requests ({result.feedback_failed} failed), "
            f"{LABEL_SHARE:.0%} of those answered"
        )
    for shadow in result.shadow_decisions:
        lines.append(f"  [shadow] {shadow.action.upper():13} v{shadow.shadow}: {shadow.reason}")
        paired, agreement = shadow.report, shadow.report.get("agreement")
        if agreement is not None:
            lines.append(
                f"      paired: {paired['mirrored']} mirrored, the users' answer agreed on {agreement:.1%}, mean "
                f"score distance {paired.get('predictionDistance', 0):.3f}"
            )
    for decision in result.decisions:
        lines.append(f"  {decision.line()}")
        lines.extend(f"      labelledLoss {c.status}: {c.reason}" for c in decision.checks if c.name == "labelledLoss")
    for version, live in result.live.items():
        if "rocAuc" in live:
            lines.append(
                f"live         v{version}: ROC AUC {live['rocAuc']:.3f}, accuracy {live.get('accuracy', 0):.3f} on its "
                f"last {live.get('rows', 0):.0f} labelled rows"
            )
    lines.append(f"outcome      {result.outcome}")
    if result.history_path is not None:
        lines.append(f"history      {result.history_path} ({len(result.history)} decisions)")
    if result.seconds_drift_to_full is not None:
        lines.append(
            f"measured     {result.seconds_drift_to_full:.1f}s from the first drifted request to "
            f"v{result.candidate} taking 100% of traffic"
        )
    if result.seconds_to_rollback is not None:
        lines.append(
            f"rollback     after {result.intervals_to_rollback} interval(s), "
            f"{result.seconds_to_rollback:.1f}s after the canary started"
        )
    return "\n".join(lines)


def main_loop(
    epochs: int = 2,
    workers: int = 2,
    interval: str = INTERVAL,
    break_candidate: Broken | None = None,
    shadow: bool = False,
) -> int:
    """The CLI entry: run the loop, print the report; 0 when the outcome is the expected one (a broken candidate
    stopped where it was first judged: as a shadow, or as a canary)."""
    result = run_loop(epochs, workers, interval=interval, break_candidate=break_candidate, shadow=shadow)
    print(report(result), flush=True)
    expected = ("rejected-as-shadow" if shadow else "rolled-back") if break_candidate else "promoted"
    return 0 if result.outcome == expected else 1
