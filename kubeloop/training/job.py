"""A TrainingJob, end to end: snapshot → preflight (the spec against the data) → validate → transform → Ray DDP
training (or, with spec.tuning, a Ray Tune search whose best trial is the model) → evaluate → gate → register.

`run_training_job` runs for `kubeloop run -f trainingjob.yaml` on a laptop and as the RayJob entrypoint in a
cluster (there RAY_ADDRESS names the RayJob's cluster). It composes the public step functions below, which the
Kubeflow Pipelines components (pipelines/) call one per step: one implementation of each step.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

import kubeloop
from kubeloop import config, storage
from kubeloop.api.modelversion import (
    Evaluation,
    Feature,
    GateDecision,
    Lineage,
    ModelVersion,
    ModelVersionSpec,
    SearchLineage,
    Signature,
)
from kubeloop.api.trainingjob import TASK_METRICS, TrainingJob, TuningStatus
from kubeloop.artifact import ModelArtifact
from kubeloop.data.snapshot import Snapshot, ingest, load_snapshot, read_frame
from kubeloop.data.validation import DatasetSchema, ValidationFailed, ValidationReport, validate
from kubeloop.errors import DataError, SpecError
from kubeloop.evaluation import evaluate, gate
from kubeloop.log import event
from kubeloop.registry import Registry
from kubeloop.training import ray_runner
from kubeloop.training.models import build_model
from kubeloop.training.preflight import preflight
from kubeloop.training.split import split_rows
from kubeloop.transform import TabularTransform

if TYPE_CHECKING:
    from kubeloop.training.tuning import SearchOutcome

log = logging.getLogger(__name__)

# a search's every trial, beside the winning version's artifact (lineage.search.resultsUri)
SEARCH_RESULTS = "search.json"


@dataclass
class JobOutcome:
    model_version: ModelVersion
    snapshot: Snapshot
    validation: ValidationReport
    epochs: int
    tuning: TuningStatus | None = None  # with spec.tuning: the search, every trial in short


def code_version() -> str:
    """kubeloop's version, plus the git commit when running from a checkout (recorded in lineage)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(kubeloop.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{kubeloop.__version__}+g{commit}"
    except (OSError, subprocess.SubprocessError):
        return kubeloop.__version__


def resolve_gpus(job: TrainingJob) -> int:
    """GPUs per worker this machine can give the job: SpecError, or 0 with allowCpuFallback, when it has none."""
    asked = job.spec.workers.gpu
    if asked and not torch.cuda.is_available():
        if not job.spec.workers.allow_cpu_fallback:
            raise SpecError(
                f"spec.workers.gpu: {asked} GPU(s) per worker asked for, but this machine has none; "
                "set spec.workers.allowCpuFallback: true to train on CPU with gloo"
            )
        event(log, "train.cpu_fallback", reason="no CUDA device", gpus_asked=asked)
        return 0
    return asked


def snapshot_dataset(job: TrainingJob) -> Snapshot:
    """Ingest spec.dataset.uri into the snapshot store; DataError when it does not match spec.dataset.digest."""
    snapshot = ingest(job.spec.dataset.uri)
    expected = job.spec.dataset.digest
    if expected and snapshot.digest != expected:
        raise DataError(
            f"spec.dataset.digest: {job.spec.dataset.uri} has digest {snapshot.digest}, not {expected}; "
            "the data changed since the digest was recorded"
        )
    event(log, "data.snapshot", digest=snapshot.digest, rows=snapshot.rows, columns=len(snapshot.columns))
    return snapshot


def validate_snapshot(job: TrainingJob, snapshot: Snapshot, registry: Registry) -> ValidationReport:
    """Check the snapshot against spec.dataset.schemaUri and the Production version's snapshot.

    Raises ValidationFailed (its message lists the errors) when the report is not ok.
    """
    dataset = job.spec.dataset
    schema = None
    if dataset.schema_uri:
        path = Path(dataset.schema_uri)
        if not path.is_file():
            raise SpecError(f"spec.dataset.schemaUri: no such file: {path}")
        schema = DatasetSchema.from_yaml(path)
    baseline = None
    production = registry.production(job.spec.model.name) if dataset.baseline == "production" else None
    if production is not None:
        baseline = load_snapshot(production.spec.lineage.dataset_digest)
    report = validate(snapshot, schema, baseline, label=dataset.label)
    event(
        log,
        "data.validated",
        ok=report.ok,
        findings=len(report.findings),
        baseline=baseline.digest if baseline else "none",
    )
    if not report.ok:
        raise ValidationFailed(report)
    return report


def split_snapshot(job: TrainingJob, snapshot: Snapshot) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The snapshot's train and test rows: a seeded split, stratified by label (and slice), so the digest and the
    seed reproduce it."""
    return _split(job, read_frame(snapshot))


def _split(job: TrainingJob, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """frame's rows in two: spec.hyperparameters.testFraction of them held out, seeded and stratified by label (and
    slice)."""
    spec = job.spec
    kept, held_out = split_rows(
        frame,
        task=spec.task,
        label=spec.dataset.label,
        slice_column=spec.dataset.slice_column,
        test_fraction=spec.hyperparameters.test_fraction,
        seed=spec.hyperparameters.seed,
    )
    return frame.iloc[kept], frame.iloc[held_out]


def fit_transform(job: TrainingJob, train: pd.DataFrame) -> TabularTransform:
    """The feature transform, fitted on the training rows only."""
    dataset = job.spec.dataset
    return TabularTransform.fit(train, label=dataset.label, task=job.spec.task, positive_class=dataset.positive_class)


@dataclass
class TrainedModel:
    artifact: ModelArtifact
    history: list[dict[str, float]]
    epochs: int
    backend: str


def train_settings(job: TrainingJob, gpus: int, events_path: Path | None = None) -> ray_runner.TrainSettings:
    """How Ray Train runs the job: spec.workers.replicas workers of spec.workers.ray_cpus() CPUs and gpus GPUs each
    (what a RayJob worker pod offers Ray, see operators.rayjob), spec.maxFailures worker-group restarts."""
    spec = job.spec
    run_dir = config.runs_dir() / job.metadata.name
    return ray_runner.TrainSettings(
        name=job.metadata.name,
        builder=spec.model.builder,
        params=spec.model.params,
        epochs=spec.hyperparameters.epochs,
        batch_size=spec.hyperparameters.batch_size,
        learning_rate=spec.hyperparameters.learning_rate,
        seed=spec.hyperparameters.seed,
        workers=spec.workers.replicas,
        cpus_per_worker=spec.workers.ray_cpus(),
        gpus_per_worker=gpus,
        backend="nccl" if gpus and spec.resolved_backend() == "nccl" else "gloo",
        max_failures=spec.max_failures,
        checkpoint_every=spec.checkpoint.every_epochs,
        checkpoints_kept=spec.checkpoint.keep,
        storage=run_dir / "ray",
        events_path=events_path or run_dir / "events.jsonl",
        task=spec.task,
    )


def fresh_storage(settings: ray_runner.TrainSettings) -> None:
    """A rerun of the same job starts fresh: Ray would otherwise restore the old run from its storage."""
    settings.storage.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(settings.storage, ignore_errors=True)
    settings.events_path.unlink(missing_ok=True)


def train_model(
    job: TrainingJob,
    transform: TabularTransform,
    train: pd.DataFrame,
    test: pd.DataFrame,
    *,
    gpus: int | None = None,
    events_path: Path | None = None,
) -> TrainedModel:
    """Ray Train DDP on the transformed rows (joins RAY_ADDRESS's cluster or starts a local one)."""
    spec = job.spec
    settings = replace(
        train_settings(job, resolve_gpus(job) if gpus is None else gpus, events_path),
        outputs=transform.label_width,
        label_std=transform.label_std or 1.0,
    )
    backend = settings.backend
    fresh_storage(settings)
    event(
        log,
        "train.start",
        job=job.metadata.name,
        workers=settings.workers,
        backend=backend,
        epochs=settings.epochs,
        rows=len(train),
    )
    started_here = ray_runner.connect(settings.workers, settings.cpus_per_worker)
    try:
        output = ray_runner.fit(
            settings,
            transform.transform(train),
            transform.encode_label(train),
            transform.transform(test),
            transform.encode_label(test),
        )
    finally:
        if started_here:
            import ray

            ray.shutdown()

    model = build_model(spec.model.builder, transform.output_dim, spec.model.params, transform.label_width)
    model.load_state_dict(output.model_state)
    artifact = ModelArtifact(model, transform, spec.model.builder, spec.model.params)
    return TrainedModel(artifact=artifact, history=output.history, epochs=output.epochs, backend=backend)


@dataclass
class TunedModel:
    trained: TrainedModel  # the best trial's
    search: SearchOutcome


def validation_split(job: TrainingJob, train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training rows a search's trials fit on, and the validation rows that rank them: split as the snapshot
    is (seeded, stratified, spec.hyperparameters.testFraction of the rows), so the test rows stay unseen until the
    gate and the best-of-N choice does not flatter the gated metrics."""
    return _split(job, train)


def search_model(job: TrainingJob, transform: TabularTransform, train: pd.DataFrame, *, gpus: int) -> TunedModel:
    """spec.tuning's search (Ray Tune, each trial a Ray Train run of spec.workers); the best trial's weights."""
    from kubeloop.training.tuning import run_search, trial_settings

    spec, tuning = job.spec, job.spec.tuning
    assert tuning is not None
    settings = replace(train_settings(job, gpus), outputs=transform.label_width, label_std=transform.label_std or 1.0)
    fresh_storage(settings)
    fit, validation = validation_split(job, train)
    event(
        log,
        "train.split",
        fit_rows=len(fit),
        validation_rows=len(validation),
        reason="trials are ranked on validation rows held out of the training rows",
    )
    started_here = ray_runner.connect(settings.workers * tuning.parallelism, settings.cpus_per_worker)
    try:
        search = run_search(
            settings,
            tuning,
            tuning.resolved_metric(spec.task),
            tuning.resolved_mode(spec.task),
            (
                transform.transform(fit),
                transform.encode_label(fit),
                transform.transform(validation),
                transform.encode_label(validation),
            ),
        )
    finally:
        if started_here:
            import ray

            ray.shutdown()
    params = trial_settings(settings, search.best.params).params
    model = build_model(spec.model.builder, transform.output_dim, params, transform.label_width)
    model.load_state_dict(search.output.model_state)
    artifact = ModelArtifact(model, transform, spec.model.builder, params)
    trained = TrainedModel(
        artifact=artifact, history=search.output.history, epochs=search.output.epochs, backend=settings.backend
    )
    return TunedModel(trained=trained, search=search)


def evaluate_model(
    job: TrainingJob,
    artifact: ModelArtifact,
    test: pd.DataFrame,
    registry: Registry,
    history: list[dict[str, float]] | None = None,
) -> tuple[Evaluation, GateDecision]:
    """Metrics on the test rows (overall and per slice), and the gate against spec.gate and Production."""
    transform = artifact.transform
    slice_column = job.spec.dataset.slice_column
    evaluation = evaluate(
        transform.label_values(test),
        artifact.predict(test),
        slice_column,
        test[slice_column].to_numpy() if slice_column else None,
        per_epoch=history,
        task=job.spec.task,
        classes=transform.classes,
    )
    production = registry.production(job.spec.model.name)
    return evaluation, gate(evaluation, job.spec.gate, production, job.spec.task)


def register_model(
    job: TrainingJob,
    snapshot: Snapshot,
    artifact: ModelArtifact,
    evaluation: Evaluation,
    decision: GateDecision,
    backend: str,
    registry: Registry,
    validation: ValidationReport,
    image: str | None = None,
    search: SearchOutcome | None = None,
) -> ModelVersion:
    """A new version in the registry: Candidate when the gate passed, else Rejected (with the reasons).

    With search (the version is a search's best trial), every trial is written beside the artifact first, and
    the lineage names the search and holds the best trial's values."""
    spec = job.spec
    version, directory = registry.allocate(spec.model.name)
    artifact.save(directory / "artifact")
    hyperparameters: dict[str, Any] = spec.hyperparameters.model_dump(by_alias=True)
    search_lineage = None
    if search is not None:
        hyperparameters |= search.best.params
        search_lineage = SearchLineage(
            trials=len(search.trials),
            best_trial=search.best.trial,
            metric=search.metric,
            mode=search.mode,
            results_uri=search.write(directory / SEARCH_RESULTS),
        )
    record = registry.save(
        ModelVersionSpec(
            model=spec.model.name,
            version=version,
            artifact_uri=storage.store_artifact(directory / "artifact"),
            lineage=Lineage(
                dataset_uri=spec.dataset.uri,
                dataset_digest=snapshot.digest,
                dataset_rows=snapshot.rows,
                training_job=f"{job.metadata.namespace}/{job.metadata.name}",
                code_version=code_version(),
                builder=spec.model.builder,
                image=image,
                hyperparameters=hyperparameters,
                workers=spec.workers.replicas,
                backend=backend,
                search=search_lineage,
            ),
            metrics=evaluation,
            signature=Signature(
                inputs=[Feature(**feature) for feature in artifact.transform.input_features()],
                label=spec.dataset.label,
                task=spec.task,
                positive_class=spec.dataset.positive_class,
                classes=artifact.transform.classes,
            ),
            gate=decision,
            validation=validation,
            stage="Candidate" if decision.passed else "Rejected",
            stage_reason=None if decision.passed else "; ".join(decision.reasons),
        ),
        reason="gate passed" if decision.passed else "gate failed",
    )
    overall = evaluation.overall
    event(
        log,
        "registry.registered",
        model_version=record.metadata.name,
        stage=record.spec.stage,
        **{name: getattr(overall, name) for name in TASK_METRICS[spec.task]},
    )
    return record


def run_training_job(job: TrainingJob, registry: Registry | None = None, events_path: Path | None = None) -> JobOutcome:
    registry = registry or Registry()
    gpus = resolve_gpus(job)
    snapshot = snapshot_dataset(job)
    preflight(job, snapshot)
    report = validate_snapshot(job, snapshot, registry)
    train, test = split_snapshot(job, snapshot)
    transform = fit_transform(job, train)
    search = None
    if job.spec.tuning is not None:
        tuned = search_model(job, transform, train, gpus=gpus)
        trained, search = tuned.trained, tuned.search
    else:
        trained = train_model(job, transform, train, test, gpus=gpus, events_path=events_path)
    evaluation, decision = evaluate_model(job, trained.artifact, test, registry, trained.history)
    record = register_model(
        job, snapshot, trained.artifact, evaluation, decision, trained.backend, registry, report, search=search
    )
    tuning = None
    if search is not None:
        tuning = search.status(record.spec.lineage.search.results_uri if record.spec.lineage.search else None)
    return JobOutcome(model_version=record, snapshot=snapshot, validation=report, epochs=trained.epochs, tuning=tuning)
