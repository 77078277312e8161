"""Benchmark (not a test): the same hyperparameter search with ASHA and with plain random search (scheduler none),
in one run: the same space, trials, epochs and seed (so the same sampled values), each search a real TrainingJob
with spec.tuning through kubeloop.training.job.run_training_job, in a Ray instance of its own.

    .venv/bin/python -m bench.tuning [--trials 8 --epochs 12 --parallelism 2 --repeat-data 4]

Reports, per search, the best validation ROC AUC (the candidate's trial, on the validation rows split from the
training rows), the test ROC AUC of the registered candidate, and the compute spent: trial-epochs (epochs run over
all trials), the CPU seconds of the Ray process tree (raylet, GCS, the trials' actors and workers, sampled with
psutil) and of this process, and the wall time. Goal (issue 18): ASHA within 0.005
AUC of random search for at most half its compute.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import ray

from kubeloop.api import TrainingJob
from kubeloop.data.bundled import bundled_path
from kubeloop.registry import Registry
from kubeloop.training.job import run_training_job

SPACE = {
    "learningRate": {"logUniform": [0.0001, 0.1]},
    "batchSize": {"choice": [64, 128, 256]},
    "params.dropout": {"uniform": [0.0, 0.5]},
}


def job(name: str, uri: str, args: argparse.Namespace, scheduler: str) -> TrainingJob:
    return TrainingJob.model_validate(
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"name": name, "params": {"hidden_units": [32, 16]}},
                "dataset": {"uri": uri, "label": "released", "positiveClass": "Yes"},
                "hyperparameters": {"epochs": args.epochs, "seed": args.seed},
                "workers": {"replicas": 1},
                "maxFailures": 0,
                "tuning": {
                    "space": SPACE,
                    "trials": args.trials,
                    "parallelism": args.parallelism,
                    "scheduler": scheduler,
                    "gracePeriod": args.grace_period,
                    "seed": args.seed,
                },
            },
        }
    )


class TreeCpu(threading.Thread):
    """CPU seconds of this process's descendants (the Ray instance started here: raylet, GCS, every trial's
    actors and workers), sampled every 0.2 s: each process counts with its last sample (Ray's processes live
    seconds at least; rusage would lose the workers the raylet kills at shutdown)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[tuple[int, float], float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()

    def sample(self) -> None:
        for process in psutil.Process().children(recursive=True):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    self.seen[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                continue

    def stop(self) -> float:
        self.sample()
        self.done.set()
        self.join()
        return sum(self.seen.values())


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def search(name: str, uri: str, args: argparse.Namespace, scheduler: str) -> dict:
    """One search in a Ray instance of its own, started here so that its processes are this one's descendants."""
    tree, own, started = TreeCpu(), own_cpu(), time.perf_counter()
    tree.start()
    ray.init(
        num_cpus=max(os.cpu_count() or 1, args.parallelism),
        runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
        log_to_driver=False,
    )
    try:
        outcome = run_training_job(job(name, uri, args, scheduler), Registry())
        ray_cpu = tree.stop()
    finally:
        ray.shutdown()
    status = outcome.tuning
    return {
        "best": status.best_metric,
        "test": outcome.model_version.spec.metrics.overall.roc_auc,
        "trial_epochs": status.trial_epochs,
        "stopped": status.stopped,
        "ray_cpu": ray_cpu,
        "own_cpu": own_cpu() - own,
        "wall": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--repeat-data", type=int, default=4, help="copies of the 5,226-row dataset (epoch cost)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as home:
        os.environ["KUBELOOP_HOME"] = home
        data = Path(home) / "arrests.csv"
        pd.concat([pd.read_csv(bundled_path("arrests"))] * args.repeat_data, ignore_index=True).to_csv(data)
        print(
            f"{args.trials} trials x {args.epochs} epochs, {args.parallelism} at a time, 1 worker each, "
            f"{5226 * args.repeat_data} rows, space {', '.join(SPACE)}, seed {args.seed}"
        )
        results = {
            "random (none)": search("random", str(data), args, "none"),
            "ASHA": search("asha", str(data), args, "asha"),
        }
    header = f"{'':14}{'best val AUC':>13}{'test AUC':>10}{'trial-epochs':>14}{'stopped':>9}"
    print(header + f"{'Ray CPU s':>11}{'driver CPU s':>14}{'wall s':>9}")
    for name, r in results.items():
        print(
            f"{name:14}{r['best']:13.4f}{r['test']:10.4f}{r['trial_epochs']:14d}{r['stopped']:9d}"
            f"{r['ray_cpu']:11.1f}{r['own_cpu']:14.1f}{r['wall']:9.1f}"
        )
    random, asha = results["random (none)"], results["ASHA"]
    gap = random["best"] - asha["best"]
    epochs = asha["trial_epochs"] / random["trial_epochs"]
    cpu = (asha["ray_cpu"] + asha["own_cpu"]) / (random["ray_cpu"] + random["own_cpu"])
    verdict = {True: "PASS", False: "FAIL"}
    print(
        f"ASHA: {gap:+.4f} AUC behind random search (goal <= 0.005: {verdict[gap <= 0.005]}), {epochs:.2f}x its "
        f"trial-epochs (goal <= 0.5: {verdict[epochs <= 0.5]}), {cpu:.2f}x its CPU seconds (goal <= 0.5: "
        f"{verdict[cpu <= 0.5]})"
    )


if __name__ == "__main__":
    main()
