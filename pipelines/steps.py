"""What each Kubeflow Pipelines component does: thin calls into the same kubeloop functions the CLI runs.

The components (`pipelines.components`) are one line each: they hand their KFP parameters and artifacts to the
functions here. Every step's logic is kubeloop's own (`kubeloop.training.job`, `kubeloop.data`, the registry);
this module only moves state between steps through KFP artifacts and, in a cluster, talks to the API server
(`pipelines.cluster_steps`). Artifacts are duck-typed (`.path`, `.metadata`, `.log_metric`), so tests can call these
functions directly.

State shared by the steps: the snapshot store and the registry under KUBELOOP_HOME (in a cluster, the
`kubeloop-home` PersistentVolumeClaim that every step mounts), addressed by the dataset digest that `ingest`
pins into the TrainingJob spec passed downstream.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml
from pydantic import ValidationError

from kubeloop.api import ModelDeployment, TrainingJob
from kubeloop.api.load import format_validation_error, load_resources, parse_resource
from kubeloop.api.modelversion import Evaluation, GateDecision, ModelVersion
from kubeloop.api.trainingjob import TASK_METRICS
from kubeloop.config import snapshots_dir
from kubeloop.data.snapshot import Snapshot, load_snapshot
from kubeloop.data.validation import ValidationFailed, ValidationReport
from kubeloop.errors import KubeloopError, SpecError
from kubeloop.log import event, setup
from kubeloop.registry import Registry

log = logging.getLogger("kubeloop.pipelines")

RUNNERS = ("auto", "local", "cluster")
# "auto" resolves through this variable first, then to "cluster" inside a Kubernetes pod, else "local"
RUNNER_ENV = "KUBELOOP_PIPELINE_RUNNER"
# set by pipelines.local.run_local: each step writes <step>.json there (what it did, or the error that stopped it)
RECORD_ENV = "KUBELOOP_PIPELINE_RECORDS"
# set on every component in the compiled pipeline: the image, recorded in the ModelVersion's lineage
IMAGE_ENV = "KUBELOOP_IMAGE"
TRAINING_FILE = "training.json"
EVALUATION_FILE = "evaluation.json"
RECORD_FILE = "modelversion.yaml"


class ArtifactLike(Protocol):
    path: str
    metadata: dict[str, Any]


class MetricsLike(ArtifactLike, Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


F = TypeVar("F", bound=Callable[..., Any])


def step(name: str) -> Callable[[F], F]:
    """Logs kubeloop events to stderr (the task's log) and records a step's failure for `run_local`."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            setup()
            try:
                return function(*args, **kwargs)
            except Exception as error:
                record(name, ok=False, error=str(error), error_type=type(error).__name__)
                raise

        return run  # type: ignore[return-value]

    return decorate


def record(name: str, ok: bool = True, **fields: Any) -> None:
    directory = os.environ.get(RECORD_ENV)
    if directory:
        path = Path(directory) / f"{name}.json"
        path.write_text(json.dumps({"step": name, "ok": ok, **fields}, indent=2, default=str) + "\n")


def resolve_runner(runner: str) -> str:
    """local: Ray training in the step's own process; cluster: a TrainingJob resource and kube API calls."""
    if runner not in RUNNERS:
        raise SpecError(f"runner: {runner!r} is not one of {', '.join(RUNNERS)}")
    if runner == "auto":
        runner = os.environ.get(RUNNER_ENV) or ("cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "local")
        if runner not in RUNNERS[1:]:
            raise SpecError(f"{RUNNER_ENV}: {runner!r} is not local or cluster")
    return runner


def resolve_job(
    training_job: dict[str, Any], dataset_uri: str = "", gate_thresholds: dict[str, Any] | None = None
) -> TrainingJob:
    """The pipeline's TrainingJob: the `training_job` parameter with the run's overrides applied."""
    doc = copy.deepcopy(training_job)
    spec = doc.setdefault("spec", {})
    if dataset_uri:
        dataset = spec.setdefault("dataset", {})
        dataset["uri"] = dataset_uri
        dataset.pop("digest", None)  # a digest recorded for another URI
    if gate_thresholds:
        gate = spec.setdefault("gate", {})
        gate["thresholds"] = {**gate.get("thresholds", {}), **gate_thresholds}
    resource = parse_resource(doc, "pipeline parameter training_job")
    if not isinstance(resource, TrainingJob):
        raise SpecError(f"pipeline parameter training_job: expected kind TrainingJob, got {resource.kind}")
    return resource


def _job(doc: dict[str, Any]) -> tuple[TrainingJob, Snapshot]:
    job = TrainingJob.model_validate(doc)
    if not job.spec.dataset.digest:
        raise SpecError("training_job: spec.dataset.digest is not set: the ingest step pins it")
    return job, load_snapshot(job.spec.dataset.digest)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


@step("ingest")
def ingest(
    training_job: dict[str, Any], dataset_uri: str, gate_thresholds: dict[str, Any], dataset: ArtifactLike
) -> tuple[dict[str, Any], str, bool]:
    """Snapshot the data; returns the TrainingJob manifest with spec.dataset.digest pinned to the snapshot."""
    from kubeloop.training.job import snapshot_dataset

    job = resolve_job(training_job, dataset_uri, gate_thresholds)
    root = snapshots_dir()
    stored_before = {p.name for p in root.iterdir()} if root.is_dir() else set()
    snapshot = snapshot_dataset(job)
    reused = snapshot.hex in stored_before
    job.spec.dataset.digest = snapshot.digest
    _write_json(Path(dataset.path), snapshot.model_dump(mode="json"))
    dataset.metadata.update(
        digest=snapshot.digest, rows=snapshot.rows, columns=len(snapshot.columns), source=snapshot.source
    )
    if reused:
        print(f"snapshot store: {snapshot.digest} was already stored (unchanged data): reused, not written again")
    else:
        print(f"snapshot store: stored new snapshot {snapshot.digest} ({snapshot.rows} rows)")
    record("ingest", digest=snapshot.digest, rows=snapshot.rows, reused=reused)
    return job.to_manifest(), snapshot.digest, reused


@step("validate")
def validate(training_job: dict[str, Any], report: ArtifactLike) -> None:
    """The spec against the data (preflight), then schema and baseline checks; the step fails (and the run stops)
    naming the fields or the validation errors."""
    from kubeloop.training.job import validate_snapshot
    from kubeloop.training.preflight import preflight

    job, snapshot = _job(training_job)
    preflight(job, snapshot)
    try:
        result = validate_snapshot(job, snapshot, Registry())
    except ValidationFailed as failed:
        print(failed.report.to_text(), file=sys.stderr)
        Path(report.path).write_text(failed.report.to_json() + "\n")
        raise
    print(result.to_text())
    Path(report.path).write_text(result.to_json() + "\n")
    report.metadata.update(ok=result.ok, findings=len(result.findings), baseline=result.baseline_digest or "none")
    record("validate", findings=len(result.findings), baseline=result.baseline_digest)


@step("transform")
def transform(training_job: dict[str, Any], transform: ArtifactLike) -> None:
    """Fit the feature transform on the training split (saved as transform.json, as inside a model artifact)."""
    from kubeloop.training.job import fit_transform, split_snapshot

    job, snapshot = _job(training_job)
    train, test = split_snapshot(job, snapshot)
    fitted = fit_transform(job, train)
    fitted.save(Path(transform.path))
    transform.metadata.update(
        dataset_digest=snapshot.digest,
        features=fitted.feature_names,
        output_dim=fitted.output_dim,
        train_rows=len(train),
        test_rows=len(test),
    )
    record("transform", features=len(fitted.features), train_rows=len(train), test_rows=len(test))


@step("train")
def train(training_job: dict[str, Any], runner: str, transform: ArtifactLike, model: ArtifactLike) -> None:
    """local: Ray Train DDP in this process. cluster: a TrainingJob resource, waited for (Ray on KubeRay).

    The cluster's TrainingJob runs `run_training_job` on the pinned snapshot: the same split and transform
    functions, the same gate, and it registers the version, which the register step then adopts.
    """
    job, snapshot = _job(training_job)
    resolved = resolve_runner(runner)
    directory = Path(model.path)
    if resolved == "local":
        from kubeloop.training.job import split_snapshot, train_model
        from kubeloop.transform import TabularTransform

        train_rows, test_rows = split_snapshot(job, snapshot)
        trained = train_model(job, TabularTransform.load(Path(transform.path)), train_rows, test_rows)
        trained.artifact.save(directory)
        info = {"history": trained.history, "epochs": trained.epochs, "backend": trained.backend}
    else:
        from pipelines import cluster_steps

        finished = cluster_steps.run_trainingjob(job)
        registered = cluster_steps.registered_version(finished)
        _copy_artifact(registered, directory)
        info = {
            "history": registered.spec.metrics.per_epoch,
            "epochs": len(registered.spec.metrics.per_epoch),
            "backend": registered.spec.lineage.backend,
            # the TrainingJob registered it already: the register step adopts this version
            "model_version": registered.metadata.name,
            "trainingjob": f"{finished['metadata']['namespace']}/{finished['metadata']['name']}",
        }
    _write_json(directory / TRAINING_FILE, info)
    model.metadata.update(
        dataset_digest=snapshot.digest,
        dataset_uri=job.spec.dataset.uri,
        training_job=f"{job.metadata.namespace}/{job.metadata.name}",
        builder=job.spec.model.builder,
        epochs=info["epochs"],
        backend=info["backend"],
        runner=resolved,
        **({"model_version": info["model_version"]} if "model_version" in info else {}),
    )
    record("train", runner=resolved, epochs=info["epochs"], backend=info["backend"])


def parse_version_name(name: str) -> tuple[str, int]:
    """ "arrests-v3" (ModelVersion.resource_name) -> ("arrests", 3)."""
    model, _, number = name.rpartition("-v")
    if not model or not number.isdigit():
        raise KubeloopError(f"{name!r} is not a ModelVersion name (MODEL-vN)")
    return model, int(number)


def _copy_artifact(version: ModelVersion, directory: Path) -> None:
    from kubeloop.artifact import local_path

    shutil.copytree(local_path(version.spec.artifact_uri), directory, dirs_exist_ok=True)


@step("evaluate")
def evaluate(training_job: dict[str, Any], model: ArtifactLike, evaluation: ArtifactLike, metrics: MetricsLike) -> str:
    """Metrics on the test split (KFP Metrics for the dashboard) and the gate: returns "passed" or "failed"."""
    from kubeloop.artifact import ModelArtifact
    from kubeloop.training.job import evaluate_model, split_snapshot

    job, snapshot = _job(training_job)
    info = json.loads((Path(model.path) / TRAINING_FILE).read_text())
    _, test = split_snapshot(job, snapshot)
    result, decision = evaluate_model(job, ModelArtifact.load(model.path), test, Registry(), info["history"])
    _write_json(
        Path(evaluation.path),
        {
            "evaluation": result.model_dump(mode="json", by_alias=True, exclude_none=True),
            "gate": decision.model_dump(mode="json", by_alias=True, exclude_none=True),
        },
    )
    for name, value in _metric_values(result).items():
        metrics.log_metric(name, value)
    verdict = "passed" if decision.passed else "failed"
    evaluation.metadata.update(gate=verdict, reasons=decision.reasons, compared_with=decision.compared_with or "none")
    print(f"gate {verdict}" + (": " + "; ".join(decision.reasons) if decision.reasons else ""))
    headline = {name: getattr(result.overall, name) for name in TASK_METRICS[job.spec.task]}
    record("evaluate", gate=verdict, reasons=decision.reasons, **headline)
    return verdict


def _metric_values(result: Evaluation) -> dict[str, float]:
    """Flat metric names for the KFP dashboard: overall (rocAuc, …) and per slice (colour=Black/rocAuc, …)."""
    values: dict[str, float] = {}

    def add(prefix: str, metrics: Any) -> None:
        for name, value in metrics.model_dump(by_alias=True).items():
            if isinstance(value, dict):  # classRates: one series per class
                values.update({f"{prefix}{name}/{key}": float(share) for key, share in value.items()})
            elif value is not None:  # rocAuc is undefined on a single-class test set; each task fills its own
                values[prefix + name] = float(value)

    add("", result.overall)
    if result.slices is not None:
        for value, metrics in result.slices.values.items():
            add(f"{result.slices.column}={value}/", metrics)
    return values


@step("register")
def register(
    training_job: dict[str, Any],
    model: ArtifactLike,
    evaluation: ArtifactLike,
    report: ArtifactLike,
    registered: ArtifactLike,
) -> tuple[str, str, int, str]:
    """A ModelVersion with lineage (Candidate, or Rejected when the gate failed): returns its name and stage."""
    from kubeloop.artifact import ModelArtifact
    from kubeloop.training.job import register_model

    job, snapshot = _job(training_job)
    registry = Registry()
    info = json.loads((Path(model.path) / TRAINING_FILE).read_text())
    evaluated = json.loads(Path(evaluation.path).read_text())
    decision = GateDecision.model_validate(evaluated["gate"])
    if info.get("model_version"):
        # trained by a TrainingJob in the cluster, which registered it: adopt that version, with this gate's verdict
        name, version = parse_version_name(info["model_version"])
        version_record = registry.get(name, version)
        if not decision.passed and version_record.spec.stage != "Rejected":
            version_record = registry.reject(name, version, "; ".join(decision.reasons))
    else:
        version_record = register_model(
            job,
            snapshot,
            ModelArtifact.load(model.path),
            Evaluation.model_validate(evaluated["evaluation"]),
            decision,
            info["backend"],
            registry,
            ValidationReport.model_validate_json(Path(report.path).read_text()),
            image=os.environ.get(IMAGE_ENV),
        )
    spec = version_record.spec
    directory = Path(registered.path)
    _copy_artifact(version_record, directory / "artifact")
    (directory / RECORD_FILE).write_text(yaml.safe_dump(version_record.to_manifest(), sort_keys=False))
    registered.metadata.update(
        model_version=version_record.metadata.name,
        model=spec.model,
        version=spec.version,
        stage=spec.stage,
        dataset_digest=spec.lineage.dataset_digest,
        dataset_uri=spec.lineage.dataset_uri,
        training_job=spec.lineage.training_job,
        registry_uri=spec.artifact_uri,
    )
    print(f"registered {version_record.metadata.name} ({spec.stage}) from dataset {spec.lineage.dataset_digest}")
    record(
        "register",
        model_version=version_record.metadata.name,
        stage=spec.stage,
        dataset_digest=spec.lineage.dataset_digest,
    )
    return version_record.metadata.name, spec.model, spec.version, spec.stage


@step("deploy")
def deploy(deployment: str, model: str, version: int, traffic_percent: int, runner: str) -> str:
    """Make `version` the ModelDeployment's canary (the operator, or `kubeloop run`, then rolls it out).

    cluster: `deployment` is NAME or NAMESPACE/NAME of a ModelDeployment resource, patched through the API.
    local: `deployment` is the path of a ModelDeployment YAML file, rewritten with the canary block.
    """
    registered = Registry().get(model, version)
    if registered.spec.stage == "Rejected":
        raise KubeloopError(f"{registered.metadata.name} is Rejected ({registered.spec.stage_reason}): not deploying")
    if resolve_runner(runner) == "cluster":
        from pipelines import cluster_steps

        target = cluster_steps.set_canary(deployment, model, version, traffic_percent)
    else:
        target = set_canary_in_file(Path(deployment), model, version, traffic_percent)
    print(f"{target}: canary is now {registered.metadata.name} at {traffic_percent}% of traffic")
    record("deploy", deployment=target, model_version=registered.metadata.name, traffic_percent=traffic_percent)
    return target


def with_canary(deployment: ModelDeployment, model: str, version: int, traffic_percent: int) -> ModelDeployment:
    """The deployment with `version` as its canary (its canary analysis settings kept): validated as a whole."""
    spec = deployment.spec
    if spec.model != model:
        raise SpecError(
            f"ModelDeployment {deployment.metadata.name} serves model {spec.model!r}, not {model!r}: not deploying"
        )
    if spec.version == version:
        raise SpecError(f"ModelDeployment {deployment.metadata.name} already serves {model} v{version} as stable")
    manifest = deployment.to_manifest()
    analysis = manifest["spec"].get("canary", {}).get("analysis")
    manifest["spec"]["canary"] = {"version": version, "trafficPercent": traffic_percent}
    if analysis is not None:
        manifest["spec"]["canary"]["analysis"] = analysis
    try:
        return ModelDeployment.model_validate(manifest)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, f"ModelDeployment {deployment.metadata.name}")) from None


def set_canary_in_file(path: Path, model: str, version: int, traffic_percent: int) -> str:
    """Local stand-in for patching the resource: rewrite the ModelDeployment YAML file (comments are not kept)."""
    resources = load_resources(path)
    if len(resources) != 1 or not isinstance(resources[0], ModelDeployment):
        raise SpecError(f"{path}: expected exactly one ModelDeployment, found {[r.kind for r in resources]}")
    updated = with_canary(resources[0], model, version, traffic_percent)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump(updated.to_manifest(), sort_keys=False))
    temporary.replace(path)
    event(log, "deploy.canary", file=path, model=model, version=version, traffic_percent=traffic_percent)
    return str(path)
