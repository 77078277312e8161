"""Real Ray Train runs with 2 gloo workers on the bundled dataset (CPU only: no GPU on this machine)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from kubeloop.api import TrainingJob
from kubeloop.data.bundled import bundled_path
from kubeloop.data.validation import ValidationFailed
from kubeloop.errors import SpecError
from kubeloop.registry import Registry
from kubeloop.training.job import run_training_job

pytestmark = pytest.mark.integration


def make_job(name: str, uri: str = "bundled://arrests", epochs: int = 3, **spec: object) -> TrainingJob:
    doc = {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "arrests", "params": {"hidden_units": [16]}},
            "dataset": {"uri": uri, "label": "released", "positiveClass": "Yes", "sliceColumn": "colour"},
            "hyperparameters": {"epochs": epochs, "batchSize": 128, "learningRate": 0.01, "seed": 3},
            "workers": {"replicas": 2},
            "maxFailures": 2,
        }
        | spec,
    }
    return TrainingJob.model_validate(doc)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ddp_allreduces_and_is_reproducible(ray_cluster, tmp_path):
    events = tmp_path / "events.jsonl"
    first = run_training_job(make_job("ddp"), events_path=events)
    log = read_events(events)

    starts = [e for e in log if e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert {(e["world_size"], e["backend"]) for e in starts} == {(2, "gloo")}
    assert len({e["pid"] for e in starts}) == 2, "two separate worker processes"
    epochs = [e for e in log if e["event"] == "epoch"]
    for epoch in (1, 2, 3):
        ranks = {e["rank"]: e for e in epochs if e["epoch"] == epoch}
        assert set(ranks) == {0, 1}
        # each rank trained on a different shard, yet their parameters are identical: gradients were all-reduced
        assert ranks[0]["shard"] != ranks[1]["shard"]
        assert ranks[0]["params"] == ranks[1]["params"]
    assert len({e["params"] for e in epochs}) == 3, "parameters moved every epoch"

    record = first.model_version
    assert record.spec.version == 1 and record.spec.stage == "Candidate"
    assert record.spec.lineage.dataset_digest == first.snapshot.digest
    assert record.spec.lineage.workers == 2 and record.spec.lineage.backend == "gloo"
    assert set(record.spec.metrics.slices.values) == {"Black", "White"}
    assert len(record.spec.metrics.per_epoch) == 3
    assert record.spec.metrics.overall.roc_auc > 0.6

    # the same seed and snapshot (from the lineage) give the same model and metrics
    second = run_training_job(make_job("ddp-again"))
    assert second.model_version.spec.version == 2
    assert second.model_version.spec.metrics.overall == record.spec.metrics.overall
    assert second.model_version.spec.metrics.slices == record.spec.metrics.slices


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, tmp_path):
    # 20 copies of the dataset make an epoch last long enough (seconds) to kill a worker inside one
    big = tmp_path / "arrests-x20.csv"
    pd.concat([pd.read_csv(bundled_path("arrests"))] * 20).to_csv(big, index=False)
    events = tmp_path / "events.jsonl"
    killed: list[int] = []

    def kill_rank_1_during_epoch_3() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = [e for e in read_events(events) if e["event"] == "epoch"] if events.exists() else []
            rank_1 = [e for e in done if e["rank"] == 1 and e["epoch"] == 2]
            if rank_1:
                # epoch 2 is reported (its checkpoint persisted); give Ray's controller, which polls every
                # 0.2 s, time to register it, then kill rank 1 while it trains epoch 3
                time.sleep(0.5)
                os.kill(rank_1[0]["pid"], signal.SIGKILL)
                killed.append(rank_1[0]["pid"])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_during_epoch_3)
    killer.start()
    outcome = run_training_job(make_job("killed", uri=str(big), epochs=5), events_path=events)
    killer.join()

    assert killed, "the worker was never killed"
    log = read_events(events)
    starts = [e for e in log if e["event"] == "start" and e["rank"] == 0]
    assert len(starts) == 2, f"expected one restart of the worker group, saw {starts}"
    assert starts[1]["resumed_from_epoch"] == 2
    executed = Counter(e["epoch"] for e in log if e["event"] == "epoch" and e["rank"] == 0)
    assert sorted(executed) == [1, 2, 3, 4, 5]
    assert sum(count - 1 for count in executed.values()) <= 1, executed
    assert outcome.epochs == 5
    assert [row["epoch"] for row in outcome.model_version.spec.metrics.per_epoch] == [1, 2, 3, 4, 5]


def test_bad_data_is_rejected_and_nothing_is_registered(ray_cluster, tmp_path):
    frame = pd.read_csv(bundled_path("arrests"))
    registry = Registry()

    # a baseline in Production first: a short real run on the bundled data
    baseline = run_training_job(make_job("baseline", epochs=1)).model_version
    registry.promote("arrests", baseline.spec.version)

    cases = {
        "missing column": (frame.drop(columns=["age"]), "age"),
        "string in a numeric column": (
            frame.assign(checks=frame["checks"].astype(str).where(frame.index % 7 != 0, "many")),
            "checks",
        ),
        "label balance shift": (
            pd.concat([frame[frame.released == "No"]] * 4 + [frame[frame.released == "Yes"]]),
            "label_balance",
        ),
    }
    for case, (data, named) in cases.items():
        path = tmp_path / f"{case.replace(' ', '-')}.csv"
        data.to_csv(path, index=False)
        with pytest.raises(ValidationFailed) as raised:
            run_training_job(make_job("bad", uri=str(path)))
        assert named in str(raised.value), (case, str(raised.value))

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for uri in (str(empty), str(tmp_path / "does-not-exist.csv")):
        with pytest.raises(Exception, match=r"empty|no such file") as raised:
            run_training_job(make_job("bad", uri=uri))
        assert uri in str(raised.value)

    assert [mv.spec.version for mv in registry.list("arrests")] == [baseline.spec.version]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's rejection")
def test_gpu_without_gpu_is_rejected_unless_fallback_allowed(tmp_path):
    with pytest.raises(SpecError, match=r"spec.workers.gpu: 1 GPU\(s\) per worker .*allowCpuFallback: true"):
        run_training_job(make_job("gpu", workers={"replicas": 2, "gpu": 1}))
    assert Registry().list() == []
