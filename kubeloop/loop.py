"""`kubeloop quickstart --loop`: the closed loop on this machine, no cluster.

serve v1 (KServe model server + drift sidecar) -> shifted traffic -> the detector flags drift -> the retrain policy
fires once drift is sustained -> a TrainingJob on the shifted data -> the evaluation gate -> v2 as a canary behind
the traffic splitter -> the analysis engine walks the steps (10 -> 25 -> 50 -> 100) on Prometheus signals ->
v2 Production; or, with a broken candidate (`break_candidate="errors"|"garbage"`), rolled back within
maxFailedChecks intervals and marked Rejected (never deleted). Every decision is printed with its reason.

Signals come from a real Prometheus (Debian's `prometheus`) scraping the processes every second when it is on PATH,
else from the processes' /metrics directly: the same `SignalSource` interface and PromQL-shaped queries. The
engine (`kubeloop.analysis`) is the one the operator runs.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Literal

import httpx
import pandas as pd
import yaml

from kubeloop import config
from kubeloop.analysis import AnalysisState, Decision, RetrainState, decide, decide_retrain
from kubeloop.analysis.prometheus import Scraped
from kubeloop.analysis.signals import duration_seconds
from kubeloop.api import ModelDeployment, TrainingJob, load_resources
from kubeloop.api.modeldeployment import CanaryAnalysis, CanaryChecks, DriftMonitor, InputPolicy, Retrain
from kubeloop.api.modelversion import ModelVersion
from kubeloop.data.snapshot import load_snapshot, read_frame
from kubeloop.errors import KubeloopError
from kubeloop.launch import drift_sidecar, model_server, traffic_splitter
from kubeloop.log import event
from kubeloop.processes import ProcessGroup, free_port
from kubeloop.registry import Registry
from kubeloop.traffic import payload, shifted

log = logging.getLogger(__name__)
# the sample resources ship inside the package (manifests/samples links here), so an installed kubeloop has them
SAMPLES = Path(str(files("kubeloop") / "samples"))
Broken = Literal["errors", "garbage"]


@dataclass
class LoopResult:
    outcome: Literal["promoted", "rolled-back", "no-drift", "gate-failed"]
    stable: int
    candidate: int | None = None
    decisions: list[Decision] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # the status.history entries a cluster would hold
    history_path: Path | None = None  # where they were written as they happened (JSON Lines)
    seconds_drift_to_full: float | None = None  # first drifted request -> candidate at 100%
    seconds_drift_to_detected: float | None = None
    seconds_to_rollback: float | None = None  # candidate serving -> rolled back
    intervals_to_rollback: int | None = None
    backend: str = ""


# ---- traffic ----------------------------------------------------------------------------------------------------


class TrafficPump:
    """Background traffic: batches of rows POSTed to the current URL by a few threads; the rows switch from the
    training distribution to the shifted one on `shift()`, which records the time of the first drifted request."""

    def __init__(self, url: str, model: str, data: pd.DataFrame, batch: int = 10, threads: int = 3) -> None:
        self.url, self.model, self.data, self.batch = url, model, data, batch
        self.shifted_data: pd.DataFrame | None = None
        self.first_shifted: float | None = None
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def start(self) -> TrafficPump:
        for thread in self._threads:
            thread.start()
        return self

    def shift(self, seed: int = 1) -> None:
        self.shifted_data = shifted(self.data, seed=seed)

    def _run(self, number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                frame = self.shifted_data if self.shifted_data is not None else self.data
                body = payload(frame.iloc[rng.sample(range(len(frame)), self.batch)])  # iid rows: the file is ordered
                if frame is self.shifted_data and self.first_shifted is None:
                    with self._lock:
                        self.first_shifted = self.first_shifted or time.monotonic()
                try:
                    code = client.post(f"{self.url}/v1/models/{self.model}:predict", json=body).status_code
                except httpx.HTTPError:
                    code = 0
                with self._lock:
                    self.sent += 1
                    self.failed += code != 200
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=35)


class FaultProxy:
    """The `errors` broken candidate: a reverse proxy in front of the candidate's model server that answers
    `rate` of the requests with HTTP 500 (the splitter counts them against the candidate, as a mesh would)."""

    def __init__(self, upstream: str, rate: float = 0.5, seed: int = 0) -> None:
        rng, lock = random.Random(seed), threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _forward(self, body: bytes | None) -> None:
                with lock:
                    fail = body is not None and rng.random() < rate
                if fail:
                    status, content = 500, b'{"error": "injected fault (kubeloop quickstart --loop --break errors)"}'
                else:
                    request = urllib.request.Request(upstream + self.path, data=body, method=self.command)
                    request.add_header("Content-Type", self.headers.get("Content-Type", "application/json"))
                    try:
                        with urllib.request.urlopen(request, timeout=30) as response:
                            status, content = response.status, response.read()
                    except urllib.error.HTTPError as error:
                        status, content = error.code, error.read()
                    except OSError as error:
                        status, content = 502, str(error).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def garbage_record(record: ModelVersion, directory: Path, seed: int = 0) -> Path:
    """The `garbage` broken candidate: a copy of the version's artifact with its weights scrambled and its output
    layer zeroed with a bias of -8 (every prediction ~0.0003, whatever the input), and a ModelVersion record
    pointing at it; the registry's copy is left intact."""
    import torch

    from kubeloop.artifact import WEIGHTS, local_path

    artifact = directory / "artifact"
    shutil.copytree(local_path(record.spec.artifact_uri), artifact)
    generator = torch.Generator().manual_seed(seed)
    state = torch.load(artifact / WEIGHTS, weights_only=True)
    state = {k: torch.randn(v.shape, generator=generator) * 4 if v.is_floating_point() else v for k, v in state.items()}
    weight, bias = [k for k in state if k.endswith(".weight")][-1], [k for k in state if k.endswith(".bias")][-1]
    state[weight], state[bias] = torch.zeros_like(state[weight]), torch.full_like(state[bias], -8.0)  # p ~ 0.0003
    torch.save(state, artifact / WEIGHTS)
    broken = record.model_copy(deep=True)
    broken.spec.artifact_uri = str(artifact)
    path = directory / "modelversion.yaml"
    path.write_text(yaml.safe_dump(broken.to_manifest(), sort_keys=False))
    return path


# ---- processes --------------------------------------------------------------------------------------------------


def _start_sidecar(group: ProcessGroup, name: str, records: list[Path], default: int, window: int) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    drift = DriftMonitor(window=window, reference_size=1000)
    launch = drift_sidecar([str(p) for p in records], default_version=default, drift=drift, host="127.0.0.1", port=port)
    group.start(name, launch.module, launch.args, url + launch.ready_path)
    return url


def _start_server(group: ProcessGroup, name: str, record: Path, endpoint: str, sidecar: str) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launch = model_server(
        str(record), host="127.0.0.1", port=port, endpoint=endpoint, inputs=InputPolicy(), logger_url=f"{sidecar}/"
    )
    group.start(name, launch.module, launch.args, url + launch.ready_path)
    return url


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_scraped(scraped: Scraped, model: str, version: int, timeout: float = 30) -> None:
    """Until the signal source sees the version's prediction histogram (Prometheus scraped the new targets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scraped.source.version_signals(model, version, 60).predicted > 0:
            return
        time.sleep(0.5)


# ---- the loop ---------------------------------------------------------------------------------------------------


def loop_analysis(interval: str, steps: list[int] | None = None, max_failed_checks: int = 2) -> CanaryAnalysis:
    """The loop's canary analysis: the API defaults, with thresholds that tolerate a loaded laptop's latency noise."""
    return CanaryAnalysis(
        steps=steps or [10, 25, 50, 100],
        interval=interval,
        max_failed_checks=max_failed_checks,
        checks=CanaryChecks(max_error_rate=0.05, max_p99_latency_ratio=4.0, max_prediction_shift=0.5),
    )


def run_loop(
    epochs: int = 2,
    workers: int = 2,
    *,
    interval: str = "5s",
    steps: list[int] | None = None,
    break_candidate: Broken | None = None,
    sustained_for: str = "3s",
    use_prometheus: bool | None = None,
    reuse_production: bool = False,
    drift_window: int = 100,
    registry: Registry | None = None,
    max_drift_wait: float = 120,
) -> LoopResult:
    """The whole loop; prints every decision with its reason and returns what happened (see LoopResult)."""
    from kubeloop.training import ray_runner
    from kubeloop.training.job import run_training_job

    registry = registry or Registry()
    # one Ray for both trainings: starting a second one next to the serving processes is slow on a small machine
    ray_started = ray_runner.connect(workers)
    analysis = loop_analysis(interval, steps)
    policy = Retrain(enabled=True, sustained_for=sustained_for, min_interval="10m", training_job="arrests-mlp")
    (job,) = load_resources(SAMPLES / "trainingjob.yaml")
    (sample,) = load_resources(SAMPLES / "modeldeployment.yaml")
    assert isinstance(job, TrainingJob) and isinstance(sample, ModelDeployment)
    job.spec.hyperparameters.epochs, job.spec.workers.replicas = epochs, workers
    model = job.spec.model.name

    stable = registry.production(model) if reuse_production else None
    if stable is None:
        _say(f"[loop] train the stable version of {model}: {workers} Ray workers, {epochs} epochs")
        stable = run_training_job(job, registry).model_version
        if stable.spec.stage == "Rejected":
            raise KubeloopError(f"{stable.metadata.name} did not pass the gate: {stable.spec.stage_reason}")
        if registry.production(model) is None or registry.production(model).spec.version != stable.spec.version:
            stable = registry.promote(model, stable.spec.version, "first version of the loop")
    v1 = stable.spec.version
    features = [f.name for f in stable.spec.signature.inputs]
    full = read_frame(load_snapshot(stable.spec.lineage.dataset_digest))
    result = LoopResult(outcome="no-drift", stable=v1)
    result.history_path = config.loops_dir() / f"{model}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl"
    result.history_path.parent.mkdir(parents=True, exist_ok=True)

    def keep(entry: dict) -> None:
        result.history.append(entry)
        with result.history_path.open("a") as out:  # type: ignore[union-attr]
            out.write(json.dumps(entry) + "\n")

    workdir = Path(tempfile.mkdtemp(prefix="kubeloop-loop-"))
    group, scraped, pump, proxy = ProcessGroup(), None, None, None

    def record(action: str, reason: str, **extra: object) -> None:
        entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "action": action, "reason": reason}
        keep(entry | extra)
        _say(f"[loop] {action.upper():8} {reason}")

    try:
        scraped = Scraped(use_prometheus)
        result.backend = scraped.backend
        _say(f"[loop] signals from {scraped.backend}")
        sidecar_a = _start_sidecar(group, "drift-sidecar", [registry.record_path(model, v1)], v1, drift_window)
        server_v1 = _start_server(group, f"server-v{v1}", registry.record_path(model, v1), "default", sidecar_a)
        scraped.scrape("stable", [server_v1, sidecar_a])
        _say(f"[loop] serving {model} v{v1} at {server_v1} (drift sidecar {sidecar_a})")
        pump = TrafficPump(server_v1, model, full[features]).start()
        time.sleep(3)
        if scraped.source.version_signals(model, v1, 30).drift:
            _say(f"[loop] warning: the detector flags v{v1} before the shift (the measured time starts anyway)")
        _say("[loop] traffic shifts: arrestees 15 years older, colour mix inverted, unemployment up")
        pump.shift()

        # -- sustained drift -> retrain
        state, deadline = RetrainState(), time.monotonic() + max_drift_wait
        while True:
            drifting = bool(scraped.source.version_signals(model, v1, 30).drift)
            if drifting and result.seconds_drift_to_detected is None and pump.first_shifted:
                result.seconds_drift_to_detected = time.monotonic() - pump.first_shifted
                _say(f"[loop] drift detected on v{v1} {result.seconds_drift_to_detected:.1f}s after the shift")
            retrain = decide_retrain(policy, state, drifting, datetime.now(UTC))
            state = retrain.state
            if retrain.start:
                record("retrain", retrain.reason, stable=v1)
                break
            if time.monotonic() > deadline:
                record("retrainFailed", f"no sustained drift within {max_drift_wait:.0f}s", stable=v1)
                return result
            time.sleep(0.5)

        fresh = shifted(full, seed=2)
        data_path = workdir / "arrests-shifted.csv"
        fresh.to_csv(data_path, index=False)
        retrain_job = job.model_copy(deep=True)
        retrain_job.metadata.name = f"{job.metadata.name}-retrain"
        retrain_job.spec.dataset.uri, retrain_job.spec.dataset.digest = str(data_path), None
        retrain_job.spec.dataset.baseline = "none"  # the point is that the data moved away from Production's
        _say(f"[loop] retraining on {len(fresh)} rows of the shifted data (TrainingJob {retrain_job.metadata.name})")
        candidate = run_training_job(retrain_job, registry).model_version
        v2 = candidate.spec.version
        result.candidate = v2
        gate = "; ".join(candidate.spec.gate.reasons) if candidate.spec.gate else ""
        if candidate.spec.stage == "Rejected":
            record("retrainFailed", f"v{v2} failed the evaluation gate: {candidate.spec.stage_reason}", candidate=v2)
            result.outcome = "gate-failed"
            return result
        auc = candidate.spec.metrics.overall.roc_auc
        _say(f"[loop] v{v2} passed the evaluation gate (AUC {auc:.3f}){f': {gate}' if gate else ''}")

        # -- canary
        candidate_record = registry.record_path(model, v2)
        if break_candidate == "garbage":
            candidate_record = garbage_record(candidate, workdir / "broken")
            _say(f"[loop] BROKEN CANDIDATE: v{v2} is served with scrambled weights (garbage predictions)")
        sidecar_b = _start_sidecar(group, "drift-sidecar-canary", [candidate_record], v2, drift_window)
        server_v2 = _start_server(group, f"server-v{v2}", candidate_record, "canary", sidecar_b)
        upstream = server_v2
        if break_candidate == "errors":
            proxy = FaultProxy(server_v2, rate=0.5)
            upstream = proxy.url
            _say(f"[loop] BROKEN CANDIDATE: half of v{v2}'s answers are HTTP 500 (fault proxy {proxy.url})")
        port = free_port()
        splitter = f"http://127.0.0.1:{port}"
        launch = traffic_splitter(
            host="127.0.0.1", port=port, percent=analysis.steps[0], stable=(v1, server_v1), candidate=(v2, upstream)
        )
        group.start("splitter", launch.module, launch.args, splitter + launch.ready_path)
        scraped.scrape("canary", [server_v2, sidecar_b, splitter])
        pump.url = splitter
        canary_started = time.monotonic()
        record("start", f"canary v{v2} at {analysis.steps[0]}% behind {splitter}", candidate=v2, stable=v1)
        _wait_scraped(scraped, model, v2)

        interval_s = duration_seconds(analysis.interval)
        analysis_state = AnalysisState()
        while True:
            scraped.source.tick()
            time.sleep(interval_s)
            decision = decide(
                analysis,
                analysis_state,
                scraped.source.version_signals(model, v1, interval_s),
                scraped.source.version_signals(model, v2, interval_s),
            )
            analysis_state = decision.state
            result.decisions.append(decision)
            keep(decision.record())
            _say(f"[loop] {decision.line()}")
            if decision.next_percent != decision.percent:
                httpx.post(f"{splitter}/admin/traffic", json={"percent": decision.next_percent}, timeout=10)
                if decision.next_percent == 100 and pump.first_shifted:
                    result.seconds_drift_to_full = time.monotonic() - pump.first_shifted
            if decision.action == "promote":
                registry.promote(model, v2, decision.reason)
                result.outcome = "promoted"
                _say(f"[loop] v{v2} is Production; v{v1} Archived")
                break
            if decision.action == "rollback":
                registry.reject(model, v2, decision.reason)
                result.outcome = "rolled-back"
                result.seconds_to_rollback = time.monotonic() - canary_started
                result.intervals_to_rollback = decision.state.intervals
                _say(f"[loop] 100% back on v{v1}; v{v2} Rejected (kept in the registry)")
                break
        return result
    finally:
        if pump is not None:
            pump.stop()
        if proxy is not None:
            proxy.stop()
        group.stop()
        if scraped is not None:
            scraped.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if ray_started:
            import ray

            ray.shutdown()
        event(log, "loop.done", outcome=result.outcome)


def report(result: LoopResult) -> str:
    lines = ["", "=== kubeloop quickstart --loop report ===", f"signals      {result.backend}"]
    if result.seconds_drift_to_detected is not None:
        lines.append(f"drift        detected {result.seconds_drift_to_detected:.1f}s after the first drifted request")
    if result.candidate is not None:
        lines.append(f"candidate    v{result.candidate} (retrained on the shifted data)")
    for decision in result.decisions:
        lines.append(f"  {decision.line()}")
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


def main_loop(epochs: int = 2, workers: int = 2, interval: str = "5s", break_candidate: Broken | None = None) -> int:
    """The CLI entry: run the loop, print the report; 0 when the outcome is the expected one."""
    result = run_loop(epochs, workers, interval=interval, break_candidate=break_candidate)
    print(report(result), flush=True)
    expected = "rolled-back" if break_candidate else "promoted"
    return 0 if result.outcome == expected else 1
