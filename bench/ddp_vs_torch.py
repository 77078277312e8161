"""Benchmark (not a test): 2-worker Ray Train DDP against plain torch.distributed (mp.spawn, gloo), measured in
the same run on the same data, epochs and training code (kubeloop.training.worker.train_epoch).

    .venv/bin/python -m bench.ddp_vs_torch [--repeat-data 20 --epochs 5]

Reports, for each side, the whole run (process start, process group, training) and the training loop alone
(rank 0, first step to last), their ratios (Ray's own release bar: 1.15x for training), and Ray's start-up.
"""

from __future__ import annotations

import argparse
import json
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


def train(model, rank: int, world: int, x: np.ndarray, y: np.ndarray, settings: dict, device) -> dict:
    """The loop both sides run; rank 0 returns the final loss and the loop's own time."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    started = time.perf_counter()
    for epoch in range(settings["epochs"]):
        loss, _ = train_epoch(
            model,
            optimizer,
            xt,
            yt,
            epoch=epoch,
            seed=settings["seed"],
            rank=rank,
            world=world,
            batch_size=settings["batch_size"],
            device=device,
        )
        settings["after_epoch"](loss)
    return {"loss": loss, "loop_seconds": time.perf_counter() - started}


def _torch_worker(rank: int, world: int, port: int, x: np.ndarray, y: np.ndarray, settings: dict) -> None:
    torch.set_num_threads(1)  # what Ray sets in its workers (OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(settings["seed"])
    model = DistributedDataParallel(build_model(BUILDER, x.shape[1], PARAMS))
    result = train(model, rank, world, x, y, settings | {"after_epoch": lambda loss: None}, torch.device("cpu"))
    if rank == 0:
        Path(settings["out"]).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_torch(x: np.ndarray, y: np.ndarray, settings: dict) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    mp.spawn(_torch_worker, args=(2, port, x, y, settings), nprocs=2, join=True)
    return json.loads(Path(settings["out"]).read_text()) | {"total_seconds": time.perf_counter() - started}


def _ray_loop(config: dict) -> None:
    import ray.train
    from ray.train.torch import get_device, prepare_model

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])
    model = prepare_model(build_model(BUILDER, config["x"].shape[1], PARAMS))
    # one report per epoch, as kubeloop's training does
    report = {"after_epoch": lambda loss: ray.train.report({"loss": loss})}
    result = train(model, rank, world, config["x"], config["y"], config | report, get_device())
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(result))  # Train V2 keeps metrics only with checkpoints


def run_ray(x: np.ndarray, y: np.ndarray, settings: dict) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.perf_counter()
    ray.init(
        num_cpus=max(2, os.cpu_count() or 1),
        runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
        log_to_driver=False,
    )
    startup = time.perf_counter() - started
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config=settings | {"x": x, "y": y},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(storage_path=tempfile.mkdtemp()),
    )
    started = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - started
    ray.shutdown()
    return json.loads(Path(settings["out"]).read_text()) | {"total_seconds": total, "startup_seconds": startup}


def main() -> None:
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as kubeloop.training does
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat-data", type=int, default=20, help="copies of the 5,226-row dataset")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y = data(args.repeat_data)
    settings = {"epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size}
    print(f"data: {len(x)} rows x {x.shape[1]} features, {args.epochs} epochs, batch {args.batch_size}, 2 workers")
    plain = run_torch(x, y, settings | {"out": tempfile.mktemp()})
    ray = run_ray(x, y, settings | {"out": tempfile.mktemp()})
    print(f"{'':28}{'whole run':>12}{'training loop':>16}{'final loss':>12}")
    for name, result in (("torch.distributed (spawn)", plain), ("Ray Train TorchTrainer", ray)):
        print(f"{name:28}{result['total_seconds']:11.2f}s{result['loop_seconds']:15.2f}s{result['loss']:12.4f}")
    print(f"Ray start-up (ray.init): {ray['startup_seconds']:.2f} s")
    print(
        f"ratio Ray / torch: training loop {ray['loop_seconds'] / plain['loop_seconds']:.2f}x "
        f"(Ray's release bar 1.15x), whole run {ray['total_seconds'] / plain['total_seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
