"""The training function every Ray Train worker runs: DDP over the shard of each epoch, a checkpoint per epoch.

Each completed (reported) epoch is also appended, one JSON line per rank, to an events file: the driver reads it to show
progress, and tests read it to prove allreduce (equal parameters across ranks) and resumption.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import get_device, prepare_model
from torch import nn

from kubeloop.training import tasks
from kubeloop.training.models import build_model

STATE_FILE = "state.pt"


def _digest(array: np.ndarray | torch.Tensor) -> str:
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()[:16]


def _params_digest(model: nn.Module) -> str:
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    return _digest(flat)


def _emit(path: str | None, event: dict[str, Any]) -> None:
    if path:
        # one short line per write with O_APPEND: lines from different ranks never interleave
        with open(path, "a") as stream:
            stream.write(json.dumps(event) + "\n")


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    batch_size: int,
    device: torch.device,
    task: str = "binary",
) -> tuple[float, np.ndarray]:
    """One epoch of this rank's shard; returns the mean loss over all ranks and the shard's row indices.

    batch_size is global: each of the `world` ranks takes batch_size // world rows per step.
    """
    # the same permutation on every rank, then a disjoint equal-sized shard each: equal step counts keep
    # DDP's collective calls in lockstep
    per_rank = len(x) // world
    order = np.random.default_rng(seed + epoch).permutation(len(x))
    shard = np.sort(order[rank::world][:per_rank])
    xs, ys = x[shard].to(device), y[shard].to(device)
    batch = max(1, batch_size // world)
    loss_fn = tasks.loss_function(task)
    total, steps = torch.zeros((), device=device), 0
    for start in range(0, per_rank, batch):
        optimizer.zero_grad()
        loss = loss_fn(tasks.fitted(task, model(xs[start : start + batch])), ys[start : start + batch])
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total) / (steps * world), shard


def train_loop_per_worker(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    seed = int(config["seed"])
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    task = config.get("task", "binary")
    x_train = torch.as_tensor(config["x_train"], dtype=torch.float32)
    y_train = tasks.targets(task, config["y_train"])
    x_test = torch.as_tensor(config["x_test"], dtype=torch.float32).to(device)
    y_test = tasks.targets(task, config["y_test"]).to(device)

    module = build_model(config["builder"], x_train.shape[1], config["params"], int(config.get("outputs", 1)))
    optimizer_state, start_epoch, history = None, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, weights_only=False)
        module.load_state_dict(state["model"])
        optimizer_state, start_epoch, history = state["optimizer"], state["epoch"], state["history"]
    model = prepare_model(module)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["learning_rate"]))
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)

    events = config.get("events_path")
    backend = dist.get_backend() if dist.is_initialized() else "none"
    _emit(
        events,
        {
            "event": "start",
            "rank": rank,
            "world_size": world,
            "backend": backend,
            "pid": os.getpid(),
            "resumed_from_epoch": start_epoch,
        },
    )

    epochs, every = int(config["epochs"]), int(config["checkpoint_every"])
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        train_loss, shard = train_epoch(
            model,
            optimizer,
            x_train,
            y_train,
            epoch=epoch,
            seed=seed,
            rank=rank,
            world=world,
            batch_size=int(config["batch_size"]),
            device=device,
            task=task,
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "epoch_seconds": time.perf_counter() - started,
        }
        if rank == 0:
            model.eval()
            with torch.no_grad():
                metrics |= tasks.validation_metrics(task, model(x_test), y_test, float(config.get("label_std", 1.0)))
            model.train()
            history.append(metrics)
        if rank == 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            with tempfile.TemporaryDirectory() as directory:
                unwrapped = model.module if hasattr(model, "module") else model
                torch.save(
                    {
                        "model": unwrapped.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                    },
                    Path(directory) / STATE_FILE,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        _emit(
            events,
            {
                "event": "epoch",
                "rank": rank,
                "pid": os.getpid(),
                "backend": backend,
                "world_size": world,
                "params": _params_digest(model),
                "shard": _digest(shard),
                **metrics,
            },
        )
