"""KFP v2 components, one per step of the loop: each hands its inputs to `pipelines.steps` and nothing else.

They are lightweight Python components on kubeloop's training image, which holds kubeloop, this package, kfp,
torch and Ray: nothing is pip-installed when a step starts (install_kfp_package=False). The compiled YAML embeds
only these short bodies, so a step's logic lives in kubeloop alone. `from __future__ import annotations` is left
out on purpose: KFP reads the parameter and artifact types from the annotations at decoration time.
"""

import functools
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

import kubeloop

# kubeloop's training image (docker build of the `training` extra), tagged with kubeloop's version
TRAINING_IMAGE = f"ghcr.io/kubeloop/training:{kubeloop.__version__}"

component = functools.partial(dsl.component, base_image=TRAINING_IMAGE, install_kfp_package=False)


@component
def ingest(
    training_job: dict,
    dataset_uri: str,
    gate_thresholds: dict,
    dataset: Output[Dataset],
) -> NamedTuple("IngestOutputs", [("job", dict), ("digest", str), ("reused", bool)]):
    """Snapshot the dataset into the versioned store; pins its digest into the TrainingJob passed on."""
    from pipelines import steps

    return steps.ingest(training_job, dataset_uri, gate_thresholds, dataset)


@component
def validate(training_job: dict, dataset: Input[Dataset], report: Output[Artifact]):
    """Schema and baseline validation: fails the run with the validation errors."""
    from pipelines import steps

    steps.validate(training_job, report)


@component
def transform(training_job: dict, dataset: Input[Dataset], transform: Output[Artifact]):
    """Fit the feature transform on the training split."""
    from pipelines import steps

    steps.transform(training_job, transform)


@component
def train(training_job: dict, runner: str, transform: Input[Artifact], model: Output[Model]):
    """Ray Train DDP: in this process (runner local) or as a TrainingJob resource (runner cluster)."""
    from pipelines import steps

    steps.train(training_job, runner, transform, model)


@component
def evaluate(
    training_job: dict,
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    """Metrics overall and per slice, and the gate: the output is "passed" or "failed"."""
    from pipelines import steps

    return steps.evaluate(training_job, model, evaluation, metrics)


@component
def register(
    training_job: dict,
    model: Input[Model],
    evaluation: Input[Artifact],
    report: Input[Artifact],
    registered: Output[Model],
) -> NamedTuple("RegisterOutputs", [("model_version", str), ("model", str), ("version", int), ("stage", str)]):
    """Register the ModelVersion (Candidate, or Rejected by the gate) with its lineage and data validation."""
    from pipelines import steps

    return steps.register(training_job, model, evaluation, report, registered)


@component
def deploy(deployment: str, model: str, version: int, traffic_percent: int, runner: str) -> str:
    """Set the ModelDeployment's canary to the new version."""
    from pipelines import steps

    return steps.deploy(deployment, model, version, traffic_percent, runner)
