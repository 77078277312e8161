"""Benchmark (not a test): a BatchPrediction on Ray Data against a single-process pandas loop, same model, same data,
in the same run, at 1e5 and 1e6 rows.

    .venv/bin/python -m bench.batch [--rows 100000 1000000 --replicas 2 --batch-size 4096]

The model: the arrests MLP of tests/support/serving_fixtures.py, registered and promoted in a temporary
KUBELOOP_HOME. The data: the bundled arrests rows resampled to N rows, with a row id, as one Parquet file.

- pandas: what a user writes: read the Parquet file, `ModelArtifact.predict` over chunks of batch-size rows, the row
  id, colour and probability per row, one Parquet file written at the end; in a child process of its own (torch
  with its default threads), timed from the read to the written file; its peak RSS.
- BatchPrediction: `run_batch_prediction` of the same file (carry row_id and colour) in a Ray of its own with one
  CPU per actor, started beforehand (Ray's start-up is not a batch's cost, and the warm local Ray is shared with
  other runs); timed from the call to its return (actor start, signature check, scoring, writing, drift,
  lineage), and its steady rate (rows between the first and the last
  `batch.progress` event over the seconds between them); peak RSS of the driver plus the scoring actors together
  (sampled every 0.1 s).

Goals (issue 18): rows per second of the BatchPrediction >= 1.7x the pandas loop's on 2 cores; memory flat in the
number of rows (peak RSS at 1e6 rows within 1.5x of 1e5).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]

SPEEDUP_GOAL, MEMORY_GOAL = 1.7, 1.5


def register(home: Path):
    from kubeloop.data.snapshot import ingest
    from kubeloop.registry import Registry
    from tests.support.serving_fixtures import register_model

    record = register_model(home)
    lineage = record.spec.lineage.model_copy(update={"dataset_digest": ingest("bundled://arrests").digest})
    registry = Registry(home / "registry")
    registry.save(record.spec.model_copy(update={"lineage": lineage}), reason="bench")
    return registry.promote("arrests", record.spec.version)


def write_input(rows: int, path: Path) -> None:
    from tests.support.serving_fixtures import arrests_frame

    frame = arrests_frame().sample(n=rows, replace=True, random_state=0).reset_index(drop=True)
    frame.insert(0, "row_id", np.arange(rows))
    frame.to_parquet(path, index=False)


def pandas_loop(artifact_uri: str, source: str, target: str, batch_size: int, out: multiprocessing.Queue) -> None:
    from kubeloop.artifact import ModelArtifact

    artifact = ModelArtifact.load(artifact_uri)
    started = time.perf_counter()
    frame = pd.read_parquet(source)
    parts = []
    for start in range(0, len(frame), batch_size):
        chunk = frame.iloc[start : start + batch_size]
        parts.append(chunk[["row_id", "colour"]].assign(probability=artifact.predict(chunk)))
    pd.concat(parts).to_parquet(target, index=False)
    seconds = time.perf_counter() - started
    out.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def run_pandas(artifact_uri: str, source: Path, target: Path, batch_size: int) -> tuple[float, int]:
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=pandas_loop, args=(artifact_uri, str(source), str(target), batch_size, queue)
    )
    child.start()
    result = queue.get()
    child.join()
    return result


class PeakRss(threading.Thread):
    """Peak RSS of this process plus Ray's BatchScorer actors, summed per sample."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.1):
            total = me.memory_info().rss
            for process in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                if "BatchScorer" in cmdline and process.info["memory_info"]:
                    total += process.info["memory_info"].rss
            self.peak = max(self.peak, total)


class ProgressTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("batch.progress"):
            rows = int(message.split("rows_done=")[1].split()[0])
            self.events.append((time.perf_counter(), rows))


def run_batch(source: Path, replicas: int, batch_size: int) -> tuple[float, float | None, int]:
    from kubeloop.api import BatchPrediction
    from kubeloop.batch import run_batch_prediction

    prediction = BatchPrediction.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "model": "arrests",
                "input": str(source),
                "output": f"bench/{source.stem}",
                "carry": ["row_id", "colour"],
                "batchSize": batch_size,
                "workers": {"replicas": replicas},
            },
        }
    )
    progress = ProgressTimes()
    logging.getLogger("kubeloop.batch").addHandler(progress)
    sampler = PeakRss()
    sampler.start()
    started = time.perf_counter()
    try:
        outcome = run_batch_prediction(prediction)
    finally:
        seconds = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        logging.getLogger("kubeloop.batch").removeHandler(progress)
    assert outcome.status.rows_rejected == 0, outcome.status
    steady = None
    if len(progress.events) >= 2:
        (t0, r0), (t1, r1) = progress.events[0], progress.events[-1]
        steady = (r1 - r0) / (t1 - t0) if t1 > t0 else None
    return seconds, steady, sampler.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()

    import ray

    from kubeloop import log as kubeloop_log

    kubeloop_log.setup()
    with tempfile.TemporaryDirectory(prefix="kubeloop-bench-batch-") as tmp:
        home = Path(tmp)
        os.environ["KUBELOOP_HOME"] = str(home)
        record = register(home)
        # a Ray of its own, started before the timing: the warm local Ray is shared with other runs
        ray.init(num_cpus=args.replicas, log_to_driver=False)
        rows_memory: dict[int, int] = {}
        print(f"cores {os.cpu_count()}, {args.replicas} actors, batch {args.batch_size} rows", flush=True)
        print(
            f"{'rows':>9} {'pandas s':>9} {'pandas r/s':>11} {'batch s':>8} {'batch r/s':>10} {'steady r/s':>11} "
            f"{'ratio':>6} {'steady':>7} {'pandas MiB':>10} {'batch MiB':>10}"
        )
        ratios = []
        try:
            for rows in args.rows:
                source = home / f"input-{rows}.parquet"
                write_input(rows, source)
                pandas_s, pandas_rss = run_pandas(
                    record.spec.artifact_uri, source, home / "pandas.parquet", args.batch_size
                )
                batch_s, steady, batch_rss = run_batch(source, args.replicas, args.batch_size)
                rows_memory[rows] = batch_rss
                ratio = pandas_s / batch_s
                steady_ratio = steady / (rows / pandas_s) if steady else float("nan")
                ratios.append(ratio)
                print(
                    f"{rows:>9} {pandas_s:>9.2f} {rows / pandas_s:>11,.0f} {batch_s:>8.2f} {rows / batch_s:>10,.0f} "
                    f"{steady or float('nan'):>11,.0f} {ratio:>5.2f}x {steady_ratio:>6.2f}x "
                    f"{pandas_rss / 2**20:>10.0f} {batch_rss / 2**20:>10.0f}",
                    flush=True,
                )
        finally:
            ray.shutdown()
    small, large = min(rows_memory), max(rows_memory)
    growth = rows_memory[large] / rows_memory[small]
    best = ratios[-1]
    print(
        f"speedup at {large} rows {best:.2f}x (goal >= {SPEEDUP_GOAL}x): {'PASS' if best >= SPEEDUP_GOAL else 'FAIL'}"
    )
    print(
        f"peak RSS {large} / {small} rows {growth:.2f}x (goal <= {MEMORY_GOAL}x): "
        f"{'PASS' if growth <= MEMORY_GOAL else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
