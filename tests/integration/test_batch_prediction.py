"""BatchPrediction end to end on real Ray: 50,000 resampled arrests rows with a few bad ones, drift, reruns, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubeloop.api import BatchPrediction
from kubeloop.artifact import ModelArtifact
from kubeloop.batch import run_batch_prediction
from kubeloop.data.snapshot import ingest
from kubeloop.errors import DataError, KubeloopError
from kubeloop.registry import Registry
from tests.support.serving_fixtures import arrests_frame, register_model

ROWS = 50_000
# row id -> (column, value written to the CSV, the reason it is rejected)
BAD = {
    11: ("age", "", "null_value: age"),
    222: ("colour", "Purple", "unseen_category: colour"),
    3333: ("age", "abc", "wrong_type: age"),
    4444: ("checks", "2.5", "wrong_type: checks"),
    5555: ("age", "1e12", "out_of_range: age"),
}
OUTSIDE_TRAINING_RANGE = 777  # age 80: outside the training ages, scored and counted as the server does


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch-home")


@pytest.fixture(autouse=True)
def shared_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One registry and snapshot store for the module: the model is trained once."""
    monkeypatch.setenv("KUBELOOP_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def model(home: Path):
    """The arrests model, Production, its lineage naming the ingested snapshot of the bundled data."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBELOOP_HOME", str(home))
        record = register_model(home)
        snapshot = ingest("bundled://arrests")
        registry = Registry(home / "registry")
        spec = record.spec.model_copy(
            update={"lineage": record.spec.lineage.model_copy(update={"dataset_digest": snapshot.digest})}
        )
        registry.save(spec, reason="test: lineage names the snapshot")
        return registry.promote("arrests", record.spec.version)


@pytest.fixture(scope="module")
def batch(home: Path) -> tuple[Path, pd.DataFrame]:
    """The CSV input (row_id first) and the frame it was written from, bad rows included."""
    frame = arrests_frame().sample(n=ROWS, replace=True, random_state=1).reset_index(drop=True)
    frame.insert(0, "row_id", np.arange(ROWS))
    frame = frame.astype({"age": object, "checks": object})
    for row, (column, value, _) in BAD.items():
        frame.loc[row, column] = value
    frame.loc[OUTSIDE_TRAINING_RANGE, "age"] = 80
    path = home / "batch.csv"
    frame.to_csv(path, index=False)
    return path, frame


def prediction(input_uri: str, output: str = "batch/arrests", **spec) -> BatchPrediction:
    return BatchPrediction.model_validate(
        {
            "metadata": {"name": "arrests-scoring"},
            "spec": {"model": "arrests", "input": input_uri, "output": output, "carry": ["row_id", "colour"]} | spec,
        }
    )


def test_scores_the_valid_rows_and_sets_the_bad_ones_aside(model, batch, home: Path, ray_cluster) -> None:
    path, frame = batch
    outcome = run_batch_prediction(prediction(str(path), batchSize=4096, carry=["row_id", "year", "colour"]))
    output = home / "batch" / "arrests"

    scored = pd.read_parquet(output).sort_values("row_id").reset_index(drop=True)
    assert list(scored.columns) == ["row_id", "year", "colour", "probability", "prediction"]
    assert scored["year"].dtype == "int64"  # a feature carried from a CSV: the checked number, not its text
    good = frame.drop(index=list(BAD)).astype({"age": "int64", "checks": "int64"})
    assert scored["row_id"].tolist() == good["row_id"].tolist()
    assert scored["year"].tolist() == good["year"].tolist()
    expected = ModelArtifact.load(model.spec.artifact_uri).predict(good)
    np.testing.assert_allclose(scored["probability"].to_numpy(), expected, atol=1e-6)
    assert (scored["prediction"] == (scored["probability"] >= 0.5)).all()

    rejected = pd.read_parquet(output / "_rejected").sort_values("row_id")
    assert rejected["row_id"].tolist() == sorted(BAD)
    assert rejected["reason"].tolist() == [BAD[row][2] for row in sorted(BAD)]

    lineage = json.loads((output / "_lineage.json").read_text())
    assert lineage["modelVersion"] == "arrests-v1"
    assert lineage["artifactUri"] == model.spec.artifact_uri
    assert lineage["input"]["digest"] == outcome.status.input_digest
    assert lineage["rows"] == {
        "total": ROWS,
        "scored": ROWS - len(BAD),
        "rejected": len(BAD),
        "rejectedByReason": {
            "null_value: age": 1,
            "out_of_range: age": 1,
            "unseen_category: colour": 1,
            "wrong_type: age": 1,
            "wrong_type: checks": 1,
        },
        "outOfTrainingRange": {"age": 1},
    }
    status = outcome.status
    assert (status.phase, status.rows_done, status.rows_rejected) == ("Succeeded", ROWS, len(BAD))
    assert status.model_version == "arrests-v1" and status.output_uri == output.as_uri()
    assert status.drift is not None and status.drift.state == "NoDrift" and status.drift.features == []


def test_a_shifted_batch_drifts_and_a_rerun_replaces_the_output(model, home: Path, ray_cluster) -> None:
    frame = arrests_frame().sample(n=20_000, replace=True, random_state=2).reset_index(drop=True)
    frame.insert(0, "row_id", np.arange(len(frame)))
    frame["age"] = (frame["age"] + 15).clip(upper=66)  # older arrestees, within the training range
    frame["colour"] = frame["colour"].map({"Black": "White", "White": "Black"})
    path = home / "shifted.parquet"
    frame.to_parquet(path, index=False)
    output = home / "batch" / "arrests"
    (output / "stale.parquet").parent.mkdir(parents=True, exist_ok=True)
    (output / "stale.parquet").write_bytes(b"from an earlier run")

    status = run_batch_prediction(prediction(str(path))).status

    assert status.drift is not None and status.drift.state == "Drift"
    assert set(status.drift.features) == {"age", "colour"}
    assert status.drift.p_value is not None and status.drift.p_value < 0.05
    assert not (output / "stale.parquet").exists()
    assert len(pd.read_parquet(output)) == len(frame)
    assert list((output / "_rejected").glob("*.parquet")) == []
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_missing_feature_column_is_an_error_before_anything_runs(model, batch, home: Path) -> None:
    frame = arrests_frame().drop(columns=["age", "checks"])
    path = home / "no-age.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"lacks the feature columns \['age', 'checks'\]"):
        run_batch_prediction(prediction(str(path), output="batch/no-age"))
    with pytest.raises(DataError, match=r"spec\.carry: .* has no columns \['row_id'\]"):
        run_batch_prediction(prediction("bundled://arrests", output="batch/no-age"))
    assert not (home / "batch" / "no-age").exists()


def test_a_missing_version_is_an_error_naming_it(model, home: Path) -> None:
    with pytest.raises(KubeloopError, match=r"spec\.model arrests, spec\.version 7: arrests has no version 7"):
        run_batch_prediction(prediction("bundled://arrests", version=7))
    with pytest.raises(KubeloopError, match=r"spec\.model churn has no Production version"):
        run_batch_prediction(
            BatchPrediction.model_validate(
                {"metadata": {"name": "x"}, "spec": {"model": "churn", "input": "bundled://arrests", "output": "b"}}
            )
        )
