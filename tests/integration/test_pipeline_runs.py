"""The pipelines run locally with kfp.local (a subprocess per step, real Ray training with 2 workers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kubeloop.api import ModelDeployment
from kubeloop.data.bundled import ARRESTS, bundled_path
from kubeloop.data.snapshot import ingest
from kubeloop.registry import Registry
from pipelines.definitions import DEFAULT_TRAINING_JOB
from pipelines.local import PipelineFailed, run_local

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

DEPLOYMENT = """\
apiVersion: kubeloop.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: arrests
spec:
  model: arrests
  version: 1
"""


def small_job(**dataset: str) -> dict:
    job = copy.deepcopy(DEFAULT_TRAINING_JOB)
    job["metadata"]["name"] = "arrests-pipeline"
    job["spec"]["hyperparameters"]["epochs"] = 2
    job["spec"]["model"]["params"] = {"hidden_units": [16]}
    job["spec"]["dataset"].update(dataset)
    return job


def executor_output(root: Path, pipeline: str, task: str) -> dict:
    (path,) = sorted(root.glob(f"kubeloop-{pipeline}-*/{task}/executor_output.json"))[-1:]
    return json.loads(path.read_text())


@pytest.fixture
def deployment_file(tmp_path: Path) -> Path:
    path = tmp_path / "modeldeployment.yaml"
    path.write_text(DEPLOYMENT)
    return path


def test_training_registers_with_lineage_and_a_rerun_reuses_the_snapshot_and_deploys(tmp_path, deployment_file, capsys):
    root = tmp_path / "kfp"
    first = run_local("training", pipeline_root=root, training_job=small_job())
    out = capsys.readouterr().out
    digest = ingest("bundled://arrests").digest
    assert "snapshot store: stored new snapshot " + digest in out
    assert list(first.steps) == ["ingest", "validate", "transform", "train", "evaluate", "register"]

    registry = Registry()
    (version,) = registry.list("arrests")
    assert version.metadata.name == "arrests-v1" and version.spec.stage == "Candidate"
    assert version.spec.lineage.dataset_digest == digest == first.outputs["dataset_digest"]
    assert version.spec.lineage.dataset_uri == "bundled://arrests"
    assert first.outputs["model_version"] == "arrests-v1"
    # lineage on the KFP artifacts: the registered model names the dataset digest and the ModelVersion
    (registered,) = executor_output(root, "training", "register")["artifacts"]["registered"]["artifacts"]
    assert registered["metadata"]["dataset_digest"] == digest
    assert registered["metadata"]["model_version"] == "arrests-v1"
    (trained,) = executor_output(root, "training", "train")["artifacts"]["model"]["artifacts"]
    assert trained["metadata"]["dataset_digest"] == digest
    # the evaluation metrics as a KFP Metrics artifact (what the dashboard shows), equal to the registry's
    (metrics,) = executor_output(root, "training", "evaluate")["artifacts"]["metrics"]["artifacts"]
    assert metrics["metadata"]["rocAuc"] == pytest.approx(version.spec.metrics.overall.roc_auc)
    assert {"colour=Black/rocAuc", "colour=White/rocAuc"} <= set(metrics["metadata"])

    # a second run on unchanged data: kfp.local has no cache, kubeloop's snapshot store is reused, and says so
    second = run_local("continuous", pipeline_root=root, training_job=small_job(), deployment=str(deployment_file))
    out = capsys.readouterr().out
    assert second.snapshot_reused
    assert f"snapshot store: reused {digest} (the data is unchanged" in out
    assert "kfp cache: not used (kfp.local has no task cache" in out
    assert list(second.steps)[-1] == "deploy"
    candidate = registry.get("arrests", 2)
    assert candidate.spec.stage == "Candidate" and candidate.spec.lineage.dataset_digest == digest
    deployed = ModelDeployment.model_validate(yaml.safe_load(deployment_file.read_text()))
    assert deployed.spec.version == 1
    assert deployed.spec.canary.version == 2 and deployed.spec.canary.traffic_percent == 10
    assert f"deployed: {deployment_file} canary = arrests-v2 at 10%" in out


def test_continuous_stops_at_validate_and_registers_and_deploys_nothing(tmp_path, deployment_file):
    schema = tmp_path / "arrests-schema.yaml"
    schema.write_text(yaml.safe_dump(ARRESTS.schema.model_dump(mode="json", by_alias=True, exclude_none=True)))
    frame = pd.read_csv(bundled_path("arrests"))
    bad = tmp_path / "arrests-bad.csv"
    frame.assign(checks=frame["checks"].astype(str).where(frame.index % 7 != 0, "many")).to_csv(bad, index=False)

    with pytest.raises(PipelineFailed) as failed:
        run_local(
            "continuous",
            pipeline_root=tmp_path / "kfp",
            training_job=small_job(schemaUri=str(schema)),
            dataset_uri=str(bad),
            deployment=str(deployment_file),
        )
    assert failed.value.step == "validate"
    assert "checks  type_mismatch: declared int, found string: 747 of 5226 values do not parse as numbers ('many')" in (
        failed.value.message
    )
    assert str(failed.value).startswith("pipeline continuous stopped at step validate: ERROR  checks  type_mismatch")
    assert list(failed.value.steps) == ["ingest", "validate"]
    assert Registry().list() == []
    assert deployment_file.read_text() == DEPLOYMENT


def test_continuous_deploys_nothing_when_the_gate_fails(tmp_path, deployment_file, capsys):
    run = run_local(
        "continuous",
        pipeline_root=tmp_path / "kfp",
        training_job=small_job(),
        gate_thresholds={"rocAuc": 0.999},
        deployment=str(deployment_file),
    )
    out = capsys.readouterr().out
    assert "deploy" not in run.steps and run.steps["evaluate"]["gate"] == "failed"
    assert "not deployed: the gate failed: roc_auc" in out
    (version,) = Registry().list("arrests")
    assert version.spec.stage == "Rejected" and "below the threshold 0.999" in version.spec.stage_reason
    assert run.outputs["stage"] == "Rejected"
    assert deployment_file.read_text() == DEPLOYMENT
