"""A TrainingJob's hyperparameter search: Ray Tune over the same train function as a plain run.

Each trial is a Tune function trainable that launches a TorchTrainer (Ray Train V2) of train_loop_per_worker
with spec.workers workers; a Train callback hands rank 0's per-epoch report to Tune, so the scheduler (ASHA, median
stopping, or none) sees every epoch and may stop a trial after spec.tuning.gracePeriod epochs. Stopping a trial
ends its Tune actor, and with it the Train controller and worker group that actor owns; the search then removes
the trial's placement group (its CPUs) itself. `spec.tuning.parallelism` trials run at once; `spec.tuning.trials`
samples are drawn from the space with `spec.tuning.seed`. Every trial is ranked on the same validation rows.

A trial's score is its metric on its last reported epoch: that epoch's weights are the trial's latest checkpoint
(trials checkpoint every epoch, since the scheduler may stop one after any epoch), so the best trial's score is
the score of exactly the weights that become the candidate.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
from pydantic.alias_generators import to_snake
from ray import cloudpickle, tune
from ray._raylet import PlacementGroupID
from ray.train import Checkpoint
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from kubeloop.api.trainingjob import TrialSummary, Tuning, TuningStatus
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from kubeloop.training import ray_runner
from kubeloop.training.worker import train_loop_per_worker

log = logging.getLogger(__name__)

Status = Literal["Completed", "Stopped", "Failed"]
_DRIVER_MEMORY = 1 << 20
# what each reported epoch keeps in the results (Tune adds its own bookkeeping keys to each result)
_EPOCH_KEYS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_rmse", "epoch_seconds")


class SearchFailed(KubeloopError):
    """Every trial of a search failed: nothing to register."""


class _TrialCrashed(Exception):
    """A trial's training run failed: the message is the first worker's error, without Ray's wrapping."""


@dataclass
class Trial:
    """One trial: its sampled values, every epoch it reported, and how it ended."""

    trial: str
    params: dict[str, Any]
    status: Status = "Completed"
    epochs: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    checkpoint: str | None = None  # its latest checkpoint: the weights of its last reported epoch

    def score(self, metric: str) -> float | None:
        """The metric (val_*) on the last reported epoch; None when the trial reported none (or only NaN)."""
        if not self.epochs:
            return None
        value = self.epochs[-1].get(metric)
        return None if value is None or math.isnan(value) else float(value)

    def record(self, metric: str, total_epochs: int) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "params": self.params,
            "status": self.status,
            "stoppedEarly": self.status == "Stopped",
            "epochs": len(self.epochs),
            "ofEpochs": total_epochs,
            "metric": self.score(metric),
            "error": self.error,
            "perEpoch": self.epochs,
        }


@dataclass
class SearchOutcome:
    """The finished search: every trial, the best one and its trained weights (from its checkpoint)."""

    tuning: Tuning
    metric: str  # as the spec names it: valAuc, valLoss, ...
    mode: Literal["max", "min"]
    epochs: int  # spec.hyperparameters.epochs: a trial's budget
    trials: list[Trial]
    best: Trial
    output: ray_runner.TrainOutput

    @property
    def reported_metric(self) -> str:
        return to_snake(self.metric)

    def results(self) -> dict[str, Any]:
        """The full record (the JSON beside the artifact)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "scheduler": self.tuning.scheduler,
            "gracePeriod": self.tuning.grace_period,
            "seed": self.tuning.seed,
            "parallelism": self.tuning.parallelism,
            "space": {
                name: dimension.model_dump(by_alias=True, exclude_none=True)
                for name, dimension in self.tuning.space.items()
            },
            "epochsPerTrial": self.epochs,
            "bestTrial": self.best.trial,
            "trials": [trial.record(self.reported_metric, self.epochs) for trial in self.trials],
        }

    def write(self, path: Path) -> str:
        """Write results() as JSON to path; its file URI."""
        path.write_text(json.dumps(self.results(), indent=1, default=_plain) + "\n")
        return path.resolve().as_uri()

    def status(self, results_uri: str | None) -> TuningStatus:
        counts = {status: sum(trial.status == status for trial in self.trials) for status in Status.__args__}
        metric = self.reported_metric
        return TuningStatus(
            metric=self.metric,
            mode=self.mode,
            trials=len(self.trials),
            completed=counts["Completed"],
            stopped=counts["Stopped"],
            failed=counts["Failed"],
            trial_epochs=sum(len(trial.epochs) for trial in self.trials),
            best_trial=self.best.trial,
            best_metric=self.best.score(metric),
            best_params=self.best.params,
            results_uri=results_uri,
            summary=[
                TrialSummary(
                    trial=trial.trial,
                    params=trial.params,
                    status=trial.status,
                    epochs=len(trial.epochs),
                    metric=trial.score(metric),
                    error=trial.error,
                )
                for trial in self.trials
            ],
        )


def search_space(tuning: Tuning) -> dict[str, Any]:
    """Tune's sampling domain per dimension (intRange bounds inclusive, as the spec says)."""
    space: dict[str, Any] = {}
    for name, dimension in tuning.space.items():
        if dimension.choice is not None:
            space[name] = tune.choice(dimension.choice)
        elif dimension.uniform is not None:
            space[name] = tune.uniform(*dimension.uniform)
        elif dimension.log_uniform is not None:
            space[name] = tune.loguniform(*dimension.log_uniform)
        else:
            low, high = dimension.int_range
            space[name] = tune.randint(low, high + 1)
    return space


def trial_settings(settings: ray_runner.TrainSettings, params: dict[str, Any]) -> ray_runner.TrainSettings:
    """settings with a trial's values: learningRate, batchSize, params.NAME (a builder keyword argument)."""
    changes: dict[str, Any] = {}
    builder_params = dict(settings.params)
    for name, value in params.items():
        if name == "learningRate":
            changes["learning_rate"] = float(value)
        elif name == "batchSize":
            changes["batch_size"] = int(value)
        else:
            builder_params[name.removeprefix("params.")] = value
    return replace(settings, params=builder_params, **changes)


def scheduler(tuning: Tuning, epochs: int) -> TrialScheduler:
    """ASHA or median stopping on the reported epoch, never before gracePeriod epochs; FIFO for none."""
    if tuning.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=tuning.grace_period)
    if tuning.scheduler == "median":
        return _MedianStopping(time_attr="epoch", grace_period=tuning.grace_period)
    return FIFOScheduler()


class _MedianStopping(MedianStoppingRule):
    """Ray's median stopping rule, except that a trial compared with too few others continues: Ray's would
    pause it while trials are pending, and a paused trial's Train run could only restart from scratch."""

    def _on_insufficient_samples(self, tune_controller, trial, time) -> str:
        return TrialScheduler.CONTINUE


def run_search(
    settings: ray_runner.TrainSettings,
    tuning: Tuning,
    metric: str,
    mode: Literal["max", "min"],
    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> SearchOutcome:
    """Run tuning.trials trials of settings with sampled values on rows (x_fit, y_fit, x_validation,
    y_validation); SearchFailed, naming the first trial's error, when every trial fails.

    Needs a connected Ray with tuning.parallelism * settings.workers workers' CPUs.
    """
    reported = to_snake(metric)
    recorder = _Recorder(reported, settings.epochs, _trials_dir(settings))
    settings = replace(settings, checkpoint_every=1)
    driver = tune.with_resources(
        tune.with_parameters(_trial_driver, settings=settings, rows=rows),
        # the driver only waits on its Train run, whose workers hold the CPUs; Tune refuses a trial that asks
        # for nothing, so it asks for a token of memory (which also fits a RayJob's head of num-cpus 0)
        {"CPU": 0, "memory": _DRIVER_MEMORY},
    )
    event(
        log,
        "tune.start",
        job=settings.name,
        trials=tuning.trials,
        parallelism=tuning.parallelism,
        scheduler=tuning.scheduler,
        metric=metric,
        mode=mode,
    )
    tuner = tune.Tuner(
        driver,
        param_space=search_space(tuning),
        tune_config=tune.TuneConfig(
            metric=reported,
            mode=mode,
            num_samples=tuning.trials,
            scheduler=scheduler(tuning, settings.epochs),
            search_alg=BasicVariantGenerator(max_concurrent=tuning.parallelism, random_state=tuning.seed),
            trial_name_creator=_name_of,
            trial_dirname_creator=_name_of,
        ),
        run_config=tune.RunConfig(
            name="search",
            storage_path=str(settings.storage),
            callbacks=[recorder],
            verbose=0,
        ),
    )
    with _quiet_tune():
        tuner.fit()
    trials = sorted(recorder.trials.values(), key=lambda trial: int(trial.trial.rsplit("-", 1)[1]))
    ranked = [trial for trial in trials if trial.score(reported) is not None and trial.checkpoint]
    if not ranked:
        first = trials[0] if trials else None
        reason = f"the first, {first.trial} ({first.params}), failed with: {first.error}" if first else "none ran"
        raise SearchFailed(
            f"spec.tuning: all {len(trials)} trials failed, nothing registered; {reason}. Fix what the error names "
            "(a spec.tuning.space range the builder or optimizer refuses, say) and run again"
        )
    sign = 1 if mode == "max" else -1
    best = max(ranked, key=lambda trial: sign * trial.score(reported))
    output = ray_runner.load_output(Checkpoint(best.checkpoint))
    event(
        log,
        "tune.best",
        trial=best.trial,
        metric=f"{metric}={best.score(reported):.4f}",
        epochs=len(best.epochs),
        params=_short(best.params),
    )
    return SearchOutcome(tuning, metric, mode, settings.epochs, trials, best, output)


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Without Tune's tables and its traceback per failed trial: tune.trial lines say what each trial did."""
    # Tune's new console output prints its tables whatever the verbosity; the old one is silent at verbose 0
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    loggers = [logging.getLogger(name) for name in ("ray.tune.execution.tune_controller", "ray.tune.tune")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _trial_driver(
    config: dict[str, Any],
    settings: ray_runner.TrainSettings,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """One trial (a Tune function trainable): the train function on settings.workers Ray Train workers."""
    name = _trial_name(tune.get_context().get_trial_id())
    trial = replace(
        trial_settings(settings, config),
        name=name,
        storage=_trials_dir(settings),
        events_path=_trials_dir(settings) / f"{name}.events.jsonl",
    )
    trial.events_path.parent.mkdir(parents=True, exist_ok=True)
    run = ray_runner.trainer(
        trial, ray_runner.train_loop_config(trial, *rows), callbacks=[TuneReportCallback()], loop=_trial_loop
    )
    try:
        run.fit()
    except ray.train.TrainingFailedError as error:
        raise _TrialCrashed(_first_error(error)) from None


def _trials_dir(settings: ray_runner.TrainSettings) -> Path:
    return settings.storage / "trials"


def _trial_loop(config: dict[str, Any]) -> None:
    """train_loop_per_worker, once rank 0 has noted its worker group's placement group for the search's driver."""
    group = ray.util.get_current_placement_group()
    if group is not None and ray.train.get_context().get_world_rank() == 0:
        _placement_group_file(Path(config["events_path"])).write_text(group.id.hex())
    train_loop_per_worker(config)


def _placement_group_file(events_path: Path) -> Path:
    return events_path.with_name(events_path.name.split(".")[0] + ".placement-group")


def _release(events_path: Path) -> None:
    """Remove a finished trial's placement group when it is still there. A stopped trial's Train controller dies
    with its Tune actor, and Ray Train's own cleaner actor, which removes its placement group then, finds no
    cluster when two Ray instances run on the host (the state API's address lookup raises): the CPUs would stay
    reserved until the driver exits and starve the trials after it. (On a RayJob's nodes the file may be on
    another node: the cleaner, with one Ray there, does it.)"""
    path = _placement_group_file(events_path)
    if not path.is_file():
        return
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(path.read_text())))
    if placement_group_table(group).get("state") not in (None, "REMOVED"):
        remove_placement_group(group)


def _trial_name(trial_id: str) -> str:
    """trial-N, N the trial's number in the search (Tune's ids carry a random prefix)."""
    return f"trial-{int(trial_id.rsplit('_', 1)[1])}"


def _name_of(trial: Any) -> str:
    return _trial_name(trial.trial_id)


def _first_error(error: BaseException) -> str:
    """The root error of a failed run as `Type: message`: the lowest rank's, unwrapped from Ray's exceptions."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause
    if isinstance(error, _TrialCrashed):
        return str(error)
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[-1] if message else ''}".rstrip(": ")


class _Recorder(tune.Callback):
    """Collects every trial's epochs, checkpoint and end in the driver, and prints a line per finished trial."""

    def __init__(self, metric: str, epochs: int, trials_dir: Path) -> None:
        self.metric, self.total, self.trials_dir = metric, epochs, trials_dir
        self.trials: dict[str, Trial] = {}

    def _trial(self, trial: Any) -> Trial:
        name = _name_of(trial)
        if name not in self.trials:
            self.trials[name] = Trial(trial=name, params={k: _plain(v) for k, v in trial.config.items()})
        return self.trials[name]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        record = self._trial(trial)
        record.epochs.append({key: float(result[key]) for key in _EPOCH_KEYS if key in result})
        if result.get(CHECKPOINT_PATH_KEY):
            record.checkpoint = result[CHECKPOINT_PATH_KEY]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._trial(trial)
        record.status = "Completed" if len(record.epochs) >= self.total else "Stopped"
        self._finished(record)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._trial(trial)
        record.status = "Failed"
        record.error = _trial_error(trial)
        self._finished(record)

    def _finished(self, record: Trial) -> None:
        _release(self.trials_dir / f"{record.trial}.events.jsonl")
        score = record.score(self.metric)
        event(
            log,
            "tune.trial",
            trial=record.trial,
            status=record.status,
            epochs=f"{len(record.epochs)}/{self.total}",
            metric="-" if score is None else f"{score:.4f}",
            params=_short(record.params),
            **({"error": record.error} if record.error else {}),
        )


def _trial_error(trial: Any) -> str:
    """A failed trial's error, from the files Tune has just written in the trial's local directory (its storage
    copy comes later)."""
    pickled = trial.pickled_error_file
    if pickled and Path(pickled).is_file():
        return _first_error(cloudpickle.loads(Path(pickled).read_bytes()))
    text = trial.error_file
    if text and Path(text).is_file():
        lines = Path(text).read_text().strip().splitlines()
        return lines[-1] if lines else "no error text"
    return "no error recorded"


def _plain(value: Any) -> Any:
    """A sampled value as plain JSON (Tune samples numpy scalars)."""
    return value.item() if isinstance(value, np.generic) else value


def _short(params: dict[str, Any]) -> str:
    return " ".join(
        f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items()
    )
