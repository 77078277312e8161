"""The Ray side of a training run: connect to (or start) a Ray cluster and run the TorchTrainer."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.callback import UserCallback

from kubeloop.errors import SpecError
from kubeloop.log import event
from kubeloop.training.worker import STATE_FILE, train_loop_per_worker

log = logging.getLogger(__name__)

# Ray Train polls its workers at this interval; each report() waits up to one interval. Ray's 2 s default
# doubles a short local run's time; 0.2 s is what its own tests use.
_HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@dataclass
class TrainSettings:
    name: str
    builder: str
    params: dict[str, Any]
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    workers: int
    cpus_per_worker: int  # TrainingJob spec.workers.ray_cpus(): a RayJob worker pod offers exactly this many
    gpus_per_worker: int
    backend: str
    max_failures: int
    checkpoint_every: int
    checkpoints_kept: int
    storage: Path
    events_path: Path
    task: str = "binary"
    outputs: int = 1  # the network's outputs: TabularTransform.label_width
    label_std: float = 1.0  # regression: validation RMSE is reported in the label's units


@dataclass
class TrainOutput:
    model_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    epochs: int


def connect(workers: int, cpus_per_worker: int = 1) -> bool:
    """Join the cluster named by RAY_ADDRESS (in a RayJob), or start a local one. True when we started it.

    A local Ray is given at least the CPUs the workers reserve (Ray's CPUs are scheduling units, so a laptop may
    run 2 workers of 2 CPUs on 2 cores); one started before (by the loop, a test) must already have them, or the
    run would wait forever for resources: SpecError then, naming spec.workers.
    """
    needed = workers * cpus_per_worker
    if ray.is_initialized():
        have = int(ray.cluster_resources().get("CPU", 0))
        # in a RayJob the worker pods may still be joining: only a local Ray's size is final
        if not os.environ.get("RAY_ADDRESS") and have < needed:
            raise SpecError(
                f"spec.workers: {workers} workers of {cpus_per_worker} CPU(s) need {needed} Ray CPUs, but the "
                f"running local Ray has {have}: lower spec.workers.replicas or spec.workers.cpu"
            )
        return False
    env = dict(_HEALTH_CHECK_ENV) | {k: v for k, v in os.environ.items() if k in _HEALTH_CHECK_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return False
    cpus = max(os.cpu_count() or 1, needed)
    event(log, "ray.start", cpus=cpus)
    # worker output stays in Ray's session logs: progress comes from the events file, errors from fit()
    # ray.init replaces the SIGTERM handler with its own sys.exit(15): the command's own (cleanup as on Ctrl-C) stays
    on_sigterm = signal.getsignal(signal.SIGTERM)
    # no dashboard: nothing local submits jobs to it (a RayJob's head runs one for KubeRay; the training extra
    # installs ray[default] for that), and it costs every local start seconds and memory
    ray.init(num_cpus=cpus, runtime_env={"env_vars": env}, log_to_driver=False, include_dashboard=False)
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    return True


class _Progress(threading.Thread):
    """Prints rank 0's epoch lines and worker-group restarts from the events file while fit() blocks."""

    def __init__(self, path: Path, epochs: int) -> None:
        super().__init__(daemon=True)
        self.path, self.epochs, self.done = path, epochs, threading.Event()

    def run(self) -> None:
        offset = 0
        while not self.done.wait(0.25):
            offset = self._drain(offset)
        self._drain(offset)

    def _drain(self, offset: int) -> int:
        if not self.path.exists():
            return offset
        with self.path.open() as stream:
            stream.seek(offset)
            for line in stream:
                if not line.endswith("\n"):
                    break
                offset += len(line)
                item = json.loads(line)
                if item["rank"] != 0:
                    continue
                if item["event"] == "start":
                    event(
                        log,
                        "train.workers",
                        world_size=item["world_size"],
                        backend=item["backend"],
                        resumed_from_epoch=item["resumed_from_epoch"],
                    )
                else:
                    validation = {key: value for key, value in item.items() if key.startswith("val_")}
                    event(
                        log,
                        "train.epoch",
                        epoch=f"{item['epoch']}/{self.epochs}",
                        train_loss=item["train_loss"],
                        **validation,
                        seconds=item["epoch_seconds"],
                    )
        return offset


def scaling_config(settings: TrainSettings) -> ScalingConfig:
    """settings.workers workers, each reserving settings.cpus_per_worker CPUs (and its GPUs)."""
    resources: dict[str, float] = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        resources["GPU"] = settings.gpus_per_worker
    return ScalingConfig(
        num_workers=settings.workers, use_gpu=settings.gpus_per_worker > 0, resources_per_worker=resources
    )


def run_config(settings: TrainSettings, callbacks: list[UserCallback] | None = None) -> RunConfig:
    """Checkpoints in settings.storage; a failed worker restarts the worker group from the latest one, up to
    settings.max_failures times (the TrainingJob's only retry layer)."""
    return RunConfig(
        name=settings.name,
        storage_path=str(settings.storage),
        failure_config=FailureConfig(max_failures=settings.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoints_kept),
        callbacks=callbacks,
    )


def train_loop_config(
    settings: TrainSettings, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """What train_loop_per_worker reads: the rows (validation metrics are computed on the x_test rows) and
    settings."""
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "builder": settings.builder,
        "params": settings.params,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "checkpoint_every": settings.checkpoint_every,
        "events_path": str(settings.events_path),
        "task": settings.task,
        "outputs": settings.outputs,
        "label_std": settings.label_std,
    }


def trainer(
    settings: TrainSettings,
    loop_config: dict[str, Any],
    callbacks: list[UserCallback] | None = None,
    loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
) -> TorchTrainer:
    """The TorchTrainer of one training run: loop (train_loop_per_worker, or a wrapper of it) on settings.workers
    workers."""
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=settings.backend),
        scaling_config=scaling_config(settings),
        run_config=run_config(settings, callbacks),
    )


def fit(
    settings: TrainSettings, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> TrainOutput:
    run = trainer(settings, train_loop_config(settings, x_train, y_train, x_test, y_test))
    progress = _Progress(settings.events_path, settings.epochs)
    progress.start()
    try:
        result = run.fit()
    finally:
        progress.done.set()
        progress.join()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {settings.name} ended without a checkpoint: {result.error}")
    return load_output(result.checkpoint)


def load_output(checkpoint: Checkpoint) -> TrainOutput:
    """The weights, per-epoch history and epoch count rank 0 saved in checkpoint."""
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=False)
    return TrainOutput(model_state=state["model"], history=state["history"], epochs=state["epoch"])
