"""`kubeloop quickstart`: the embedded default. Trains the sample TrainingJob on the bundled dataset with real
Ray workers, evaluates and gates it, registers it, and promotes it when no version is in Production yet."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kubeloop import config
from kubeloop.api import TrainingJob, load_resources
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from kubeloop.models_view import detail
from kubeloop.registry import Registry

log = logging.getLogger(__name__)
SAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "samples" / "trainingjob.yaml"


def quickstart(epochs: int, workers: int) -> int:
    from kubeloop.training.job import run_training_job

    if not SAMPLE.is_file():
        raise KubeloopError(f"{SAMPLE} is missing: run the quickstart from a kubeloop checkout")
    (job,) = load_resources(SAMPLE)
    assert isinstance(job, TrainingJob)
    job.spec.hyperparameters.epochs = epochs
    job.spec.workers.replicas = workers
    started = time.perf_counter()
    event(log, "quickstart.train", sample=str(SAMPLE), home=str(config.home()), workers=workers, epochs=epochs)
    outcome = run_training_job(job)
    record = outcome.model_version
    registry = Registry()
    if record.spec.stage == "Candidate" and registry.production(record.spec.model) is None:
        record = registry.promote(record.spec.model, record.spec.version, "first version to pass the gate")
    print()
    print(detail(record))
    print(f"\nregistry: {registry.root}   took {time.perf_counter() - started:.1f}s")
    print(f"next: kubeloop models list   |   kubeloop models show {record.spec.model}:{record.spec.version}")
    return 0 if record.spec.stage != "Rejected" else 1
