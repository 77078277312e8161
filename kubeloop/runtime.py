"""`kubeloop run -f`: run kubeloop resources on this machine the way the operators run them in a cluster."""

from __future__ import annotations

from pathlib import Path

from kubeloop.api import TrainingJob, load_resources
from kubeloop.errors import GateFailed, SpecError
from kubeloop.models_view import detail


def run_trainingjob(job: TrainingJob) -> None:
    from kubeloop.training.job import run_training_job

    outcome = run_training_job(job)
    record = outcome.model_version
    print(detail(record))
    if record.spec.gate and not record.spec.gate.passed:
        raise GateFailed(f"{record.metadata.name} did not pass the gate: " + "; ".join(record.spec.gate.reasons))


def run_file(path: Path) -> int:
    resources = load_resources(path)
    for resource in resources:
        if not isinstance(resource, TrainingJob):
            raise SpecError(
                f"{path}: {resource.kind} {resource.metadata.name}: running this kind locally is not built yet; "
                "kubeloop run takes TrainingJob resources"
            )
    for resource in resources:
        run_trainingjob(resource)
    return 0
