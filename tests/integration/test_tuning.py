"""Real Ray Tune searches over the real train function (Ray Train workers, gloo) on the bundled data.

A trial costs its Ray processes' start (~25 s on 2 busy cores: the Tune trial actor, its Train controller, the
report queue and the workers each import torch), not its epochs (~0.03 s each here): searches stay at 2-3 trials.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from ray.util.placement_group import placement_group_table

from kubeloop.api import TrainingJob
from kubeloop.artifact import ModelArtifact
from kubeloop.config import runs_dir
from kubeloop.registry import Registry
from kubeloop.report.model_card import render
from kubeloop.training.job import run_training_job
from kubeloop.training.tuning import SearchFailed

pytestmark = pytest.mark.integration


def search_job(name: str, tuning: dict, epochs: int = 4) -> TrainingJob:
    return TrainingJob.model_validate(
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"name": "arrests", "params": {"hidden_units": [16]}},
                "dataset": {"uri": "bundled://arrests", "label": "released", "positiveClass": "Yes"},
                "hyperparameters": {"epochs": epochs, "batchSize": 128, "seed": 3},
                "workers": {"replicas": 1},
                "maxFailures": 0,
                "tuning": tuning,
            },
        }
    )


def worker_epochs(job: str, trial: str) -> int:
    """Epochs the trial's workers finished (their events file), whatever Tune saw."""
    path = runs_dir() / job / "ray" / "trials" / f"{trial}.events.jsonl"
    return sum(json.loads(line)["event"] == "epoch" for line in path.read_text().splitlines())


def test_asha_search_registers_the_best_trial_and_stops_the_poor_ones(ray_cluster):
    job = search_job(
        "search",
        {
            "space": {"learningRate": {"logUniform": [0.0003, 0.05]}, "params.dropout": {"uniform": [0.0, 0.3]}},
            "trials": 3,
            "parallelism": 1,  # one at a time: ASHA's decisions then follow the trials' order
            "scheduler": "asha",
            "gracePeriod": 1,
            "seed": 1,
        },
    )
    outcome = run_training_job(job)
    record = outcome.model_version
    assert record.spec.stage == "Candidate"

    search = record.spec.lineage.search
    results_path = Path(urlparse(search.results_uri).path)
    assert results_path.parent == Path(urlparse(record.spec.artifact_uri).path).parent, "beside the artifact"
    results = json.loads(results_path.read_text())
    trials = results["trials"]
    assert [t["trial"] for t in trials] == ["trial-0", "trial-1", "trial-2"]
    assert (search.trials, search.metric, search.mode) == (3, "valAuc", "max")
    for trial in trials:
        assert trial["status"] in ("Completed", "Stopped") and trial["error"] is None
        assert [row["epoch"] for row in trial["perEpoch"]] == list(range(1, trial["epochs"] + 1))
        assert all(0.5 < row["val_auc"] <= 1 and row["val_loss"] > 0 for row in trial["perEpoch"])
        assert trial["metric"] == trial["perEpoch"][-1]["val_auc"]
        assert (trial["epochs"] == 4) == (trial["status"] == "Completed")
    stopped = [t for t in trials if t["status"] == "Stopped"]
    assert stopped, "ASHA stopped a trial worse than the first at epoch 1"
    for trial in stopped:
        # Train runs at most a report or two ahead of Tune: a stopped trial's workers end before its last epoch
        assert trial["epochs"] <= worker_epochs("search", trial["trial"]) < 4
    held = [group for group in placement_group_table().values() if group["state"] != "REMOVED"]
    assert held == [], "every trial's workers gave their CPUs back"

    best = max(trials, key=lambda t: t["metric"])
    assert search.best_trial == results["bestTrial"] == best["trial"]
    assert record.spec.lineage.hyperparameters["learningRate"] == best["params"]["learningRate"]
    assert record.spec.lineage.hyperparameters["params.dropout"] == best["params"]["params.dropout"]
    artifact = ModelArtifact.load(record.spec.artifact_uri)
    assert artifact.params == {"hidden_units": [16], "dropout": best["params"]["params.dropout"]}
    # the candidate's weights are the best trial's, from its last epoch's checkpoint
    assert [row["val_auc"] for row in record.spec.metrics.per_epoch] == [row["val_auc"] for row in best["perEpoch"]]

    status = outcome.tuning
    assert (status.trials, status.completed + status.stopped, status.failed) == (3, 3, 0)
    assert status.best_trial == best["trial"] and status.best_metric == best["metric"]
    assert status.trial_epochs == sum(t["epochs"] for t in trials) < 12
    assert status.results_uri == search.results_uri
    assert [s.trial for s in status.summary] == [t["trial"] for t in trials]

    card = render(record, Registry())
    search_part = card[card.index('<h3 id="search">') :]
    assert search_part.count("<figure>") >= 2, "the trials' scatter and their per-epoch curves"
    assert f"<code>{best['trial']}</code> ★" in search_part


def test_a_crashing_trial_is_recorded_failed_and_the_search_goes_on(ray_cluster):
    job = search_job(
        "crash",
        # torch refuses a dropout of 2.0 when the network is built, in the trial's worker
        # seed 2 draws 2.0 then 0.1: the first trial fails, the second must still run
        {
            "space": {"params.dropout": {"choice": [0.1, 2.0]}},
            "trials": 2,
            "parallelism": 2,
            "scheduler": "none",
            "seed": 2,
        },
        epochs=2,
    )
    outcome = run_training_job(job)
    by_status = {s.status: s for s in outcome.tuning.summary}
    assert [s.status for s in outcome.tuning.summary] == ["Failed", "Completed"]
    failed = by_status["Failed"]
    assert failed.params == {"params.dropout": 2.0} and failed.epochs == 0 and failed.metric is None
    assert failed.error == "ValueError: dropout probability has to be between 0 and 1, but got 2.0"
    assert by_status["Completed"].epochs == 2
    assert outcome.model_version.spec.lineage.search.best_trial == by_status["Completed"].trial


def test_a_search_whose_every_trial_fails_names_the_first_error_and_registers_nothing(ray_cluster):
    job = search_job(
        "all-fail",
        {"space": {"params.dropout": {"choice": [2.0, 3.0]}}, "trials": 2, "parallelism": 2, "scheduler": "none"},
        epochs=2,
    )
    with pytest.raises(SearchFailed) as failed:
        run_training_job(job)
    message = str(failed.value)
    assert message.startswith("spec.tuning: all 2 trials failed, nothing registered; the first, trial-0")
    assert "ValueError: dropout probability has to be between 0 and 1, but got" in message
    assert Registry().list() == []
