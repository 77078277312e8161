"""`kubeloop run -f`: run kubeloop resources on this machine the way the operators run them in a cluster."""

from __future__ import annotations

import time
from pathlib import Path

from kubeloop.api import BatchPrediction, ModelDeployment, Resource, TrainingJob, load_resources
from kubeloop.errors import GateFailed, SpecError
from kubeloop.in_cluster import publish, publish_result
from kubeloop.models_view import detail


def run_trainingjob(job: TrainingJob) -> None:
    from kubeloop.training.job import run_training_job

    outcome = run_training_job(job)
    record = outcome.model_version
    if outcome.tuning is not None:
        publish({"tuning.yaml": outcome.tuning.model_dump(mode="json", by_alias=True, exclude_none=True)})
    publish_result(record)
    print(detail(record))
    if outcome.tuning is not None:
        search = outcome.tuning
        print(
            f"search: {search.trials} trials ({search.completed} completed, {search.stopped} stopped early, "
            f"{search.failed} failed), {search.trial_epochs} trial-epochs; best {search.best_trial} "
            f"{search.metric} {search.best_metric:.4f} with {search.best_params}; every trial: {search.results_uri}"
        )
    if record.spec.gate and not record.spec.gate.passed:
        raise GateFailed(f"{record.metadata.name} did not pass the gate: " + "; ".join(record.spec.gate.reasons))


def run_batchprediction(prediction: BatchPrediction) -> None:
    from kubeloop.batch import run_batch_prediction

    status = run_batch_prediction(prediction).status
    print(
        f"{prediction.metadata.name}: {status.model_version} scored {status.rows_done - status.rows_rejected} of "
        f"{status.rows_done} rows into {status.output_uri}"
    )
    if status.rows_rejected:
        print(f"  rejected: {status.rows_rejected} rows in {status.output_uri}/_rejected (each with its reason)")
    if status.drift:
        moved = f" ({', '.join(status.drift.features)} moved)" if status.drift.features else ""
        print(
            f"  drift against the training data: {status.drift.state}{moved}, smallest corrected p-value "
            f"{status.drift.p_value:.3g}"
        )
    print(f"  lineage: {status.output_uri}/_lineage.json")


def serve_modeldeployment(deployment: ModelDeployment) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop every process; one that exits meanwhile is restarted."""
    from kubeloop.local_deployment import LocalDeployment

    with LocalDeployment(deployment) as local:
        endpoints = local.start()
        spec = deployment.spec
        print(f"{deployment.metadata.name}: {spec.model} v{spec.version} on {endpoints.url}")
        print(f"  predict: curl -s {endpoints.url}/v1/models/{spec.model}:predict -d '{{\"instances\": [...]}}'")
        for version, url in endpoints.servers.items():
            print(f"  server v{version}: {url}   metrics: {url}/metrics")
        if endpoints.splitter:
            print(f"  splitter: {endpoints.splitter} ({spec.canary.traffic_percent}% to v{spec.canary.version})")
        if endpoints.sidecar:
            print(f"  drift sidecar: {endpoints.sidecar}/status   metrics: {endpoints.sidecar}/metrics")
        print("Ctrl-C stops everything; a process that exits is restarted (kubeloop status shows restarts).")
        while True:
            time.sleep(3600)


def run_file(path: Path) -> int:
    resources: list[Resource] = load_resources(path)
    for resource in resources:
        if not isinstance(resource, TrainingJob | BatchPrediction | ModelDeployment):
            raise SpecError(
                f"{path}: {resource.kind} {resource.metadata.name}: kubeloop run takes TrainingJob, "
                "BatchPrediction and ModelDeployment resources (ModelVersions are written by training runs)"
            )
    for resource in resources:
        if isinstance(resource, TrainingJob):
            run_trainingjob(resource)
        elif isinstance(resource, BatchPrediction):
            run_batchprediction(resource)
        else:
            serve_modeldeployment(resource)
    return 0
