"""The search's parts without Ray running: the space, a trial's settings, its score, the records it writes, the
median rule that never pauses, the preflight of a space, and the card's search plots."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from ray.tune.schedulers import TrialScheduler

from kubeloop.api.trainingjob import Tuning
from kubeloop.config import runs_dir
from kubeloop.data.snapshot import ingest
from kubeloop.registry import Registry
from kubeloop.report import plots
from kubeloop.training import ray_runner
from kubeloop.training.job import run_training_job
from kubeloop.training.preflight import PreflightFailed, preflight
from kubeloop.training.tuning import (
    SearchOutcome,
    Trial,
    _first_error,
    scheduler,
    search_space,
    trial_settings,
)
from tests.unit.test_preflight import make_job, snap

SPACE = {
    "learningRate": {"logUniform": [0.001, 0.1]},
    "batchSize": {"intRange": [16, 18]},
    "params.dropout": {"uniform": [0.0, 0.3]},
    "params.hidden_units": {"choice": ["a", "b"]},
}


def tuning(**fields: Any) -> Tuning:
    return Tuning.model_validate({"space": SPACE} | fields)


def test_space_samples_within_the_bounds_int_ranges_inclusive():
    space = search_space(tuning())
    rng = np.random.default_rng(0)
    samples = {name: {domain.sample(random_state=rng) for _ in range(300)} for name, domain in space.items()}
    assert samples["batchSize"] == {16, 17, 18}
    assert all(0.001 <= value <= 0.1 for value in samples["learningRate"])
    assert min(samples["learningRate"]) < 0.003, "log-uniform: a third of the draws below 10^-2.5"
    assert all(0.0 <= value <= 0.3 for value in samples["params.dropout"])
    assert samples["params.hidden_units"] == {"a", "b"}


def test_trial_settings_set_the_hyperparameters_and_builder_keywords(tmp_path):
    settings = ray_runner.TrainSettings(
        name="job",
        builder="kubeloop.training.models:mlp",
        params={"hidden_units": [8], "dropout": 0.0},
        epochs=3,
        batch_size=256,
        learning_rate=0.01,
        seed=1,
        workers=1,
        cpus_per_worker=1,
        gpus_per_worker=0,
        backend="gloo",
        max_failures=0,
        checkpoint_every=1,
        checkpoints_kept=1,
        storage=tmp_path,
        events_path=tmp_path / "events.jsonl",
    )
    trial = trial_settings(settings, {"learningRate": 0.5, "batchSize": 64.0, "params.dropout": 0.2})
    assert (trial.learning_rate, trial.batch_size) == (0.5, 64)
    assert isinstance(trial.batch_size, int)
    assert trial.params == {"hidden_units": [8], "dropout": 0.2}
    assert settings.params == {"hidden_units": [8], "dropout": 0.0}, "the job's settings are left as they were"


def test_a_trial_scores_its_last_epoch_and_nan_is_no_score():
    trial = Trial("trial-0", {}, epochs=[{"epoch": 1, "val_auc": 0.9}, {"epoch": 2, "val_auc": 0.7}])
    assert trial.score("val_auc") == 0.7
    assert Trial("trial-1", {}, epochs=[{"epoch": 1, "val_auc": math.nan}]).score("val_auc") is None
    assert Trial("trial-2", {}, status="Failed", error="boom").score("val_auc") is None


def test_outcome_writes_every_trial_and_summarises_them(tmp_path):
    trials = [
        Trial("trial-0", {"learningRate": 0.01}, epochs=[{"epoch": e, "val_auc": 0.6 + e / 100} for e in (1, 2)]),
        Trial("trial-1", {"learningRate": 0.2}, status="Stopped", epochs=[{"epoch": 1, "val_auc": 0.55}]),
        Trial("trial-2", {"learningRate": 0.9}, status="Failed", error="ValueError: no"),
    ]
    output = ray_runner.TrainOutput(model_state={}, history=[], epochs=2)
    outcome = SearchOutcome(tuning(), "valAuc", "max", 2, trials, trials[0], output)
    uri = outcome.write(tmp_path / "search.json")
    results = json.loads((tmp_path / "search.json").read_text())
    assert uri == (tmp_path / "search.json").resolve().as_uri()
    assert results["bestTrial"] == "trial-0" and results["epochsPerTrial"] == 2
    assert [(t["status"], t["stoppedEarly"], t["epochs"]) for t in results["trials"]] == [
        ("Completed", False, 2),
        ("Stopped", True, 1),
        ("Failed", False, 0),
    ]
    assert results["trials"][0]["perEpoch"][1] == {"epoch": 2, "val_auc": 0.62}
    assert results["trials"][2]["error"] == "ValueError: no"

    status = outcome.status(uri)
    assert (status.trials, status.completed, status.stopped, status.failed, status.trial_epochs) == (3, 1, 1, 1, 3)
    assert (status.best_trial, status.best_metric, status.results_uri) == ("trial-0", 0.62, uri)
    assert [s.metric for s in status.summary] == [0.62, 0.55, None]


def test_first_error_names_the_lowest_rank_and_unwraps_ray():
    class Failed(Exception):
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    error = Failed({1: RuntimeError("rank 1"), 0: ValueError("dropout probability has to be between 0 and 1")})
    assert _first_error(error) == "ValueError: dropout probability has to be between 0 and 1"


class _Controller:
    def __init__(self, pending: list) -> None:
        self.pending = pending

    def get_live_trials(self) -> list:
        return self.pending


class _TrialStub:
    def __init__(self, trial_id: str, status: str = "RUNNING") -> None:
        self.trial_id, self.status = trial_id, status


def test_median_stopping_never_pauses_a_trial_it_cannot_compare_yet():
    rule = scheduler(tuning(scheduler="median", gracePeriod=1), epochs=4)
    rule.set_search_properties("val_auc", "max")
    controller = _Controller([_TrialStub("waiting", status="PENDING")])
    first = _TrialStub("first")
    # Ray's rule would PAUSE here (too few trials to compare, others pending); a paused Train run restarts
    assert rule.on_trial_result(controller, first, {"epoch": 1, "val_auc": 0.5}) == TrialScheduler.CONTINUE
    others = [_TrialStub(f"other-{i}") for i in range(3)]
    for other in others:
        rule.on_trial_result(controller, other, {"epoch": 1, "val_auc": 0.9})
        rule.on_trial_result(controller, other, {"epoch": 2, "val_auc": 0.9})
    assert rule.on_trial_result(controller, first, {"epoch": 2, "val_auc": 0.5}) == TrialScheduler.STOP


def search_job(space: dict[str, Any], **spec: Any):
    job = make_job(workers=1)
    data = job.model_dump(by_alias=True, exclude_none=True)
    data["spec"] |= {"tuning": {"space": space}} | spec
    return type(job).model_validate(data)


def test_preflight_names_each_bad_dimension(tmp_path):
    from tests.unit.test_preflight import rows

    job = search_job(
        {
            "learningRate": {"uniform": [0.0, 0.1]},
            "batchSize": {"logUniform": [16, 64]},
            "params.dropuot": {"choice": [0.1]},
            "params.hidden_units": {"choice": [8]},
        }
    )
    with pytest.raises(PreflightFailed) as failed:
        preflight(job, snap(tmp_path, **rows(60)))
    assert failed.value.problems == [
        "spec.tuning.space.learningRate: learning rates must be numbers above 0 and at most 10 (got [0.0, 0.1])",
        "spec.tuning.space.batchSize: a batch size is a whole number: use choice or intRange, not logUniform",
        "spec.tuning.space.params.dropuot: the builder kubeloop.training.models:mlp takes no keyword 'dropuot' "
        "(it takes hidden_units, dropout); did you mean params.dropout?",
    ]


def test_preflight_refuses_training_rows_too_few_to_split_validation_rows(tmp_path):
    # 3 rows of "yes": 1 goes to test and 2 stay for training, too few to spare a validation row
    data = pd.DataFrame({"x": range(30), "target": ["yes"] * 3 + ["no"] * 27})
    path = tmp_path / "data.csv"
    data.to_csv(path, index=False)
    job = search_job({"learningRate": {"choice": [0.01, 0.1]}})
    with pytest.raises(PreflightFailed) as failed:
        preflight(job, ingest(str(path)))
    assert len(failed.value.problems) == 1
    assert failed.value.problems[0].endswith(
        "the 24 training rows cannot spare them: classes with fewer than 3 training rows ('yes' (2 rows)); add rows "
        "or remove spec.tuning"
    )


def test_a_bad_space_fails_before_any_run_or_registration():
    job = search_job(
        {"params.dropuot": {"uniform": [0.0, 0.5]}},
        dataset={"uri": "bundled://arrests", "label": "released", "positiveClass": "Yes"},
    )
    with pytest.raises(PreflightFailed, match=r"spec.tuning.space.params.dropuot: .*did you mean params.dropout"):
        run_training_job(job)
    assert not (runs_dir() / job.metadata.name).exists(), "no Ray run was set up"
    assert Registry().list() == []


def test_search_plots_show_every_scored_trial_and_say_how_many_failed():
    trials = [
        {
            "trial": "trial-0",
            "params": {"learningRate": 0.01, "params.units": "a"},
            "status": "Completed",
            "metric": 0.7,
            "perEpoch": [{"epoch": 1, "val_auc": 0.6}, {"epoch": 2, "val_auc": 0.7}],
        },
        {
            "trial": "trial-1",
            "params": {"learningRate": 0.05, "params.units": "b"},
            "status": "Stopped",
            "metric": 0.5,
            "perEpoch": [{"epoch": 1, "val_auc": 0.5}],
        },
        {
            "trial": "trial-2",
            "params": {"learningRate": 3.0, "params.units": "b"},
            "status": "Failed",
            "metric": None,
            "perEpoch": [],
        },
    ]
    scatter = plots.search_trials(trials, {"learningRate": "logUniform", "params.units": "choice"}, "valAuc", "trial-0")
    assert scatter.png.startswith(b"\x89PNG")
    assert scatter.alt == "valAuc of 2 trials against learningRate, params.units; 1 failed trial(s) have no metric"
    curves = plots.trial_curves(trials, "val_auc", "valAuc", "trial-0")
    assert curves.png.startswith(b"\x89PNG") and "trial-0" in curves.alt
