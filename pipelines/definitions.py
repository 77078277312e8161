"""The two pipelines.

training:   ingest -> validate -> transform -> train -> evaluate (gate) -> register
continuous: the same, then deploy as the ModelDeployment's canary only when the gate passed (dsl.If)

A run's TrainingJob is the `training_job` parameter (a TrainingJob manifest, default: the bundled arrests data)
with `dataset_uri` and `gate_thresholds` applied over it. KFP's cache is off for the steps that read or change
state outside their inputs (ingest re-reads the URI, validate and evaluate compare with Production, register and
deploy write); transform and train are pure functions of the pinned snapshot and the spec, and cacheable.
"""

from typing import Any, NamedTuple

from kfp import dsl

from pipelines import components as c
from pipelines.cluster import HOME_PVC, configure

DEFAULT_TRAINING_JOB: dict[str, Any] = {
    "apiVersion": "kubeloop.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "arrests-mlp"},
    "spec": {
        "model": {"name": "arrests", "builder": "kubeloop.training.models:mlp"},
        "dataset": {"uri": "bundled://arrests", "label": "released", "positiveClass": "Yes", "sliceColumn": "colour"},
        "hyperparameters": {"epochs": 8, "batchSize": 128, "learningRate": 0.01, "seed": 7},
        "workers": {"replicas": 2, "cpu": 1, "memory": "2Gi", "gpu": 0},
        "checkpoint": {"everyEpochs": 1},
        "maxFailures": 2,
        "gate": {"thresholds": {"rocAuc": 0.6, "accuracy": 0.7}, "maxRegression": {"rocAuc": 0.02}},
    },
}
NO_OVERRIDES: dict[str, Any] = {}
NO_TOLERATIONS: list[Any] = []
DEFAULT_DEPLOYMENT = "arrests"


class TrainingOutputs(NamedTuple):
    model_version: str
    stage: str
    dataset_digest: str


def _train_and_register(
    training_job: Any,
    dataset_uri: Any,
    gate_thresholds: Any,
    runner: Any,
    kubeloop_home_pvc: Any,
    gpu_node_selector: Any,
    gpu_tolerations: Any,
) -> tuple[dsl.PipelineTask, dsl.PipelineTask, dsl.PipelineTask]:
    """The steps both pipelines share; returns the ingest, evaluate and register tasks."""
    ingest = c.ingest(training_job=training_job, dataset_uri=dataset_uri, gate_thresholds=gate_thresholds)
    job = ingest.outputs["job"]
    validate = c.validate(training_job=job, dataset=ingest.outputs["dataset"])
    transform = c.transform(training_job=job, dataset=ingest.outputs["dataset"]).after(validate)
    train = c.train(training_job=job, runner=runner, transform=transform.outputs["transform"])
    evaluate = c.evaluate(training_job=job, model=train.outputs["model"])
    register = c.register(
        training_job=job,
        model=train.outputs["model"],
        evaluation=evaluate.outputs["evaluation"],
        report=validate.outputs["report"],
    )
    for task in (ingest, validate, evaluate, register):
        task.set_caching_options(False)
    configure(ingest, home_pvc=kubeloop_home_pvc, reads_data=True)
    for task in (validate, transform, register):
        configure(task, home_pvc=kubeloop_home_pvc)
    for task in (train, evaluate):
        configure(
            task, home_pvc=kubeloop_home_pvc, gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations
        )
    return ingest, evaluate, register


@dsl.pipeline(
    name="kubeloop-training",
    description="kubeloop: snapshot and validate the data, train on Ray, evaluate and gate, register the model.",
)
def training(
    training_job: dict = DEFAULT_TRAINING_JOB,
    dataset_uri: str = "",
    gate_thresholds: dict = NO_OVERRIDES,
    runner: str = "auto",
    kubeloop_home_pvc: str = HOME_PVC,
    gpu_node_selector: dict = NO_OVERRIDES,
    gpu_tolerations: list = NO_TOLERATIONS,
) -> TrainingOutputs:
    ingest, _, register = _train_and_register(
        training_job, dataset_uri, gate_thresholds, runner, kubeloop_home_pvc, gpu_node_selector, gpu_tolerations
    )
    return TrainingOutputs(
        model_version=register.outputs["model_version"],
        stage=register.outputs["stage"],
        dataset_digest=ingest.outputs["digest"],
    )


@dsl.pipeline(
    name="kubeloop-continuous",
    description="kubeloop: the training pipeline, then the new version as the ModelDeployment's canary "
    "when it passed the gate.",
)
def continuous(
    training_job: dict = DEFAULT_TRAINING_JOB,
    dataset_uri: str = "",
    gate_thresholds: dict = NO_OVERRIDES,
    runner: str = "auto",
    deployment: str = DEFAULT_DEPLOYMENT,
    canary_traffic_percent: int = 10,
    kubeloop_home_pvc: str = HOME_PVC,
    gpu_node_selector: dict = NO_OVERRIDES,
    gpu_tolerations: list = NO_TOLERATIONS,
) -> TrainingOutputs:
    ingest, evaluate, register = _train_and_register(
        training_job, dataset_uri, gate_thresholds, runner, kubeloop_home_pvc, gpu_node_selector, gpu_tolerations
    )
    # the gate's verdict is evaluate's single return value ("Output"): kfp.local's dsl.If resolves only that one,
    # not named outputs (it reads "pipelinechannel--evaluate-gate" as a pipeline parameter and skips the branch)
    with dsl.If(evaluate.outputs["Output"] == "passed", name="gate-passed"):
        deploy = c.deploy(
            deployment=deployment,
            model=register.outputs["model"],
            version=register.outputs["version"],
            traffic_percent=canary_traffic_percent,
            runner=runner,
        )
        deploy.set_caching_options(False)
        configure(deploy, home_pvc=kubeloop_home_pvc)
    return TrainingOutputs(
        model_version=register.outputs["model_version"],
        stage=register.outputs["stage"],
        dataset_digest=ingest.outputs["digest"],
    )


PIPELINES = {"training": training, "continuous": continuous}
