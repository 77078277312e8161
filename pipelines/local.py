"""Run a pipeline on this machine with kfp.local: each step a subprocess of this Python, no cluster, no Docker.

The steps run with runner=local: the train step runs Ray training in its own process (a local Ray cluster, or
RAY_ADDRESS's), and the deploy step rewrites a ModelDeployment YAML file (the `deployment` parameter) instead of
patching the resource, since there is no API server here. KFP's platform config (volumes, secrets, node
selectors) and the steps' container environment do not apply locally: KUBELOOP_HOME is this process's.

kfp.local has no task cache: on a second run every step runs again. What a second run on unchanged data reuses is
kubeloop's snapshot store (ingest finds the snapshot already stored under the same digest): the run says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeloop import config
from kubeloop.errors import KubeloopError, SpecError
from pipelines.steps import RECORD_ENV

STEPS = ("ingest", "validate", "transform", "train", "evaluate", "register", "deploy")


class PipelineFailed(KubeloopError):
    """A step failed: the message is the step's own error (e.g. the validation findings)."""

    def __init__(self, pipeline: str, step: str, message: str, steps: dict[str, dict[str, Any]]) -> None:
        super().__init__(f"pipeline {pipeline} stopped at step {step}: {message}")
        self.pipeline, self.step, self.message, self.steps = pipeline, step, message, steps

    def __reduce__(self):
        return type(self), (self.pipeline, self.step, self.message, self.steps)


@dataclass
class LocalRun:
    pipeline: str
    outputs: dict[str, Any]
    # what each step that ran reported, by step name (a step missing here did not run)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)

    @property
    def snapshot_reused(self) -> bool:
        return bool(self.steps.get("ingest", {}).get("reused"))


def run_local(name: str, *, pipeline_root: Path | None = None, **params: Any) -> LocalRun:
    """Run pipeline `name` (training | continuous) with kfp.local; params are the pipeline's parameters.

    Prints a summary (steps run, snapshot store and cache reuse, the registered version, the deployment) and
    returns it; raises PipelineFailed naming the step and its error when a step fails.
    """
    kfp_local = _import_kfp_local()

    from pipelines.definitions import PIPELINES

    if name not in PIPELINES:
        raise SpecError(f"unknown pipeline {name!r}: known are {', '.join(PIPELINES)}")
    known = set(PIPELINES[name].component_spec.inputs or {})
    unknown = sorted(set(params) - known)
    if unknown:
        raise SpecError(
            f"pipeline {name} has no parameter {', '.join(unknown)}: its parameters are {', '.join(sorted(known))}"
        )
    params.setdefault("runner", "local")
    root = Path(pipeline_root or config.home() / "pipelines").resolve()
    root.mkdir(parents=True, exist_ok=True)
    records = Path(tempfile.mkdtemp(prefix=f".{name}-steps-", dir=root))
    previous = os.environ.get(RECORD_ENV)
    os.environ[RECORD_ENV] = str(records)
    try:
        kfp_local.init(runner=kfp_local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
        with warnings.catch_warnings():
            # the image is kubeloop's training image, which locally is this very environment
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*", category=RuntimeWarning)
            try:
                task = PIPELINES[name](**params)
            except RuntimeError as error:
                steps = _read_records(records)
                failed = next((s for s in steps.values() if not s["ok"]), None)
                if failed is None:
                    raise KubeloopError(f"pipeline {name} failed: {error}") from None
                raise PipelineFailed(name, failed["step"], failed["error"], steps) from None
        steps = _read_records(records)
    finally:
        if previous is None:
            os.environ.pop(RECORD_ENV, None)
        else:
            os.environ[RECORD_ENV] = previous
        shutil.rmtree(records, ignore_errors=True)
    run = LocalRun(pipeline=name, outputs=dict(task.outputs), steps=steps)
    run.summary = summarize(run)
    print("\n".join(run.summary))
    return run


def _import_kfp_local() -> Any:
    import kfp.local

    _evaluate_cel_conditions()
    return kfp.local


_CEL_PARAMETER = re.compile(r"inputs\.parameter_values\['([^']+)'\]")


def _evaluate_cel_conditions() -> None:
    """Make kfp.local's dsl.If evaluate the conditions that kfp's compiler writes.

    The compiler writes `inputs.parameter_values['pipelinechannel--evaluate-Output'] == 'passed'`; kfp.local
    2.16 substitutes the channel's value inside the brackets, fails to evaluate the result, and skips the branch
    whatever the value (kfp 2.17 reads these references). Where the installed kfp.local fails that probe, each
    reference is reduced to its bare channel name, which kfp.local's own evaluator resolves.
    """
    from kfp.local.orchestrator.enhanced_dag_orchestrator import ConditionEvaluator

    class Probe:
        def get_task_output(self, task: str, key: str) -> str:
            return "yes"

        def get_parent_input(self, name: str) -> str:
            return "yes"

    evaluate = ConditionEvaluator.evaluate_condition
    logging.disable(logging.WARNING)
    try:
        works = evaluate("inputs.parameter_values['pipelinechannel--probe-Output'] == 'yes'", Probe())
    finally:
        logging.disable(logging.NOTSET)
    if works:
        return

    def evaluate_condition(condition: str, io_store: Any) -> bool:
        return evaluate(_CEL_PARAMETER.sub(r"\1", condition), io_store)

    ConditionEvaluator.evaluate_condition = staticmethod(evaluate_condition)


def params_from_cli(training_job_file: str | None = None, assignments: list[str] | None = None) -> dict[str, Any]:
    """Pipeline parameters from `kubeloop pipeline run NAME [-f trainingjob.yaml] [-p KEY=VALUE ...]`.

    -f gives the training_job parameter (a TrainingJob YAML); each VALUE is read as JSON when it parses
    (gate_thresholds='{"rocAuc": 0.9}', canary_traffic_percent=25), else taken as a string (dataset_uri=data.csv).
    """
    params: dict[str, Any] = {}
    if training_job_file:
        from kubeloop.api import TrainingJob
        from kubeloop.api.load import load_resources

        resources = load_resources(training_job_file)
        if len(resources) != 1 or not isinstance(resources[0], TrainingJob):
            raise SpecError(
                f"{training_job_file}: expected exactly one TrainingJob, found {[r.kind for r in resources]}"
            )
        params["training_job"] = resources[0].to_manifest()
    for assignment in assignments or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise SpecError(f"pipeline parameter {assignment!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _read_records(directory: Path) -> dict[str, dict[str, Any]]:
    found = {path.stem: json.loads(path.read_text()) for path in directory.glob("*.json")}
    return {step: found[step] for step in STEPS if step in found}


def summarize(run: LocalRun) -> list[str]:
    steps = run.steps
    lines = [f"pipeline {run.pipeline}: ran " + ", ".join(steps)]
    ingest = steps.get("ingest", {})
    if ingest:
        if ingest.get("reused"):
            lines.append(
                f"snapshot store: reused {ingest['digest']} (the data is unchanged: stored by an earlier run, "
                "not written again)"
            )
        else:
            lines.append(f"snapshot store: stored new snapshot {ingest['digest']} ({ingest['rows']} rows)")
    lines.append(
        "kfp cache: not used (kfp.local has no task cache, so every step ran; in a KFP cluster transform and train "
        "are served from KFP's cache when the snapshot and spec are unchanged)"
    )
    register = steps.get("register")
    if register:
        lines.append(
            f"registered {register['model_version']} ({register['stage']}), "
            f"lineage: dataset {register['dataset_digest']}"
        )
    evaluate = steps.get("evaluate", {})
    if "deploy" in steps:
        deploy = steps["deploy"]
        lines.append(
            f"deployed: {deploy['deployment']} canary = {deploy['model_version']} at {deploy['traffic_percent']}%"
        )
    elif run.pipeline == "continuous" and evaluate.get("gate") == "failed":
        lines.append("not deployed: the gate failed: " + "; ".join(evaluate.get("reasons", [])))
    return lines
