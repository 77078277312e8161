"""How each serving component is started: one command line per component, built here and used by the embedded
deployment (`kubeloop.local_deployment`, which the closed loop `kubeloop.loop` runs on) and the operator's predictor
pods (`operators.inferenceservice`), so they cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubeloop.api.modeldeployment import DriftMonitor, InputPolicy
from kubeloop.api.modelversion import Task


@dataclass(frozen=True)
class Launch:
    module: str  # run as `python -m MODULE ARGS`
    args: list[str]
    ready_path: str  # GET this on its HTTP port answers 200 once it serves

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.module]


def model_server(
    record: str,
    *,
    host: str,
    port: int,
    endpoint: str,
    inputs: InputPolicy,
    inference_service: str | None = None,
    namespace: str | None = None,
    logger_url: str | None = None,
) -> Launch:
    """The KServe model server of one ModelVersion record; payload events go to logger_url when given."""
    args = ["--model-version", record, "--host", host, "--http-port", str(port), "--endpoint", endpoint]
    if inference_service is not None:
        args += ["--inference-service", inference_service]
    if namespace is not None:
        args += ["--namespace", namespace]
    args += ["--out-of-range", inputs.out_of_range]
    if logger_url is not None:
        args += ["--logger-url", logger_url]
    return Launch("serving.server", args, "/v2/health/ready")


def drift_sidecar(
    records: Sequence[str],
    *,
    default_version: int,
    drift: DriftMonitor,
    host: str,
    port: int,
    metrics_host: str | None = None,
    metrics_port: int | None = None,
) -> Launch:
    """The drift sidecar watching the given ModelVersion records (events without a version go to default_version);
    with metrics_port, a read-only listener for Prometheus beside the ingest one."""
    args = ["--host", host, "--port", str(port)]
    if metrics_port is not None:
        args += ["--metrics-host", metrics_host or "0.0.0.0", "--metrics-port", str(metrics_port)]
    for record in records:
        args += ["--model-version", record]
    args += ["--default-version", str(default_version), "--detector", drift.detector, "--backend", drift.backend]
    args += ["--window", str(drift.window)]
    args += ["--p-value", str(drift.p_value), "--reference-size", str(drift.reference_size)]
    return Launch("monitoring.sidecar", args, "/healthz")


def traffic_splitter(
    *,
    host: str,
    port: int,
    percent: int,
    stable: tuple[int, str],
    candidate: tuple[int, str] | None = None,
    candidate_fault_rate: float = 0.0,
    shadow: tuple[int, str] | None = None,
    shadow_percent: int = 100,
    shadow_fault_rate: float = 0.0,
    task: Task = "binary",
) -> Launch:
    """The embedded canary split: percent of requests to the candidate (version, url), the rest to the stable;
    with a shadow (version, url), shadow_percent of the stable's inference requests mirrored to it and its answers
    paired with the users' by the model's task. A fault rate > 0 makes the splitter fail that share of the
    candidate's (shadow's) inference requests (a rollback drill)."""
    args = ["--host", host, "--port", str(port), "--percent", str(percent)]
    args += ["--stable", stable[1], "--stable-version", str(stable[0])]
    if candidate is not None:
        args += ["--candidate", candidate[1], "--candidate-version", str(candidate[0])]
    if candidate_fault_rate:
        args += ["--candidate-fault-rate", str(candidate_fault_rate)]
    if shadow is not None:
        args += ["--shadow", shadow[1], "--shadow-version", str(shadow[0]), "--shadow-percent", str(shadow_percent)]
        args += ["--task", task]
    if shadow_fault_rate:
        args += ["--shadow-fault-rate", str(shadow_fault_rate)]
    return Launch("serving.splitter", args, "/v2/health/ready")
