"""Benchmark (not a test): 2-worker Ray Train DDP against plain torch.distributed (mp.spawn, gloo), measured in
the same run on the same data, epochs and training code (kubeloop.training.worker.train_epoch).

    ./dev kubeloop ... is not needed:  uv run --frozen python bench/ddp_vs_torch.py [--repeat-data 20 --epochs 5]

Reports Ray's start-up time, each side's training time and their ratio (Ray's own release bar: 1.15x).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from kubeloop.data.bundled import bundled_path
from kubeloop.training.models import build_model
from kubeloop.training.worker import train_epoch
from kubeloop.transform import TabularTransform

BUILDER, PARAMS = "kubeloop.training.models:mlp", {"hidden_units": [64, 32]}


def data(repeat: int) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.concat([pd.read_csv(bundled_path("arrests"))] * repeat, ignore_index=True)
    transform = TabularTransform.fit(frame, label="released", positive_class="Yes")
    return transform.transform(frame), transform.encode_label(frame)


def _torch_worker(rank: int, world: int, port: int, x: np.ndarray, y: np.ndarray, args, out: str) -> None:
    torch.set_num_threads(1)  # what Ray sets in its workers (OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(build_model(BUILDER, x.shape[1], PARAMS))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(args.epochs):
        loss, _ = train_epoch(
            model,
            optimizer,
            xt,
            yt,
            epoch=epoch,
            seed=args.seed,
            rank=rank,
            world=world,
            batch_size=args.batch_size,
            device=torch.device("cpu"),
        )
    if rank == 0:
        Path(out).write_text(f"{loss}")
    dist.destroy_process_group()


def run_torch(x: np.ndarray, y: np.ndarray, args) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp()
    started = time.perf_counter()
    mp.spawn(_torch_worker, args=(2, port, x, y, args, out), nprocs=2, join=True)
    return time.perf_counter() - started, float(Path(out).read_text())


def _ray_loop(config: dict) -> None:
    import ray.train
    from ray.train.torch import get_device, prepare_model

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])
    model = prepare_model(build_model(BUILDER, config["x"].shape[1], PARAMS))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(config["x"]), torch.from_numpy(config["y"])
    for epoch in range(config["epochs"]):
        loss, _ = train_epoch(
            model,
            optimizer,
            xt,
            yt,
            epoch=epoch,
            seed=config["seed"],
            rank=rank,
            world=world,
            batch_size=config["batch_size"],
            device=get_device(),
        )
        ray.train.report({"loss": loss})


def run_ray(x: np.ndarray, y: np.ndarray, args) -> tuple[float, float, float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.perf_counter()
    ray.init(
        num_cpus=max(2, os.cpu_count() or 1),
        include_dashboard=False,
        runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
    )
    startup = time.perf_counter() - started
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={
            "x": x,
            "y": y,
            "epochs": args.epochs,
            "seed": args.seed,
            "batch_size": args.batch_size,
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(storage_path=tempfile.mkdtemp()),
    )
    started = time.perf_counter()
    result = trainer.fit()
    elapsed = time.perf_counter() - started
    ray.shutdown()
    return startup, elapsed, result.metrics["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat-data", type=int, default=20, help="copies of the 5,226-row dataset")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y = data(args.repeat_data)
    print(f"data: {len(x)} rows x {x.shape[1]} features, {args.epochs} epochs, batch {args.batch_size}, 2 workers")
    torch_seconds, torch_loss = run_torch(x, y, args)
    ray_start, ray_seconds, ray_loss = run_ray(x, y, args)
    print(f"torch.distributed (mp.spawn, gloo): {torch_seconds:7.2f} s   final loss {torch_loss:.4f}")
    print(f"Ray Train TorchTrainer (gloo):      {ray_seconds:7.2f} s   final loss {ray_loss:.4f}")
    print(f"Ray start-up (ray.init):            {ray_start:7.2f} s")
    print(f"ratio Ray / torch (training only):  {ray_seconds / torch_seconds:7.2f}x   (Ray's release bar: 1.15x)")


if __name__ == "__main__":
    main()
