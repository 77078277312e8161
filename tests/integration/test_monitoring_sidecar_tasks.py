"""The drift sidecar as a real process for multiclass (penguins) and regression (abalone) models: ModelVersion
records on bundled snapshots (no training), one sidecar per model monitoring v1 and v2; the prediction summaries,
class shares, the shift between versions and the prediction metrics, checked by promtool.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from kubeloop.api.modelversion import ModelVersion
from tests.support import tools
from tests.support import traffic_events as traffic
from tests.support.drift_sidecar import ROWS_PER_EVENT, SAMPLE, WINDOW, Sidecar, launch_sidecar

pytestmark = pytest.mark.integration


TASK_MODELS = {"penguins": ("species", "multiclass"), "abalone": ("rings", "regression")}
TASK_ROWS = WINDOW + 10  # one drift window of requests per version, and the predictions of their responses


def _task_record(home: Path, snapshot: Any, model: str, version: int) -> Path:
    """A ModelVersion record of a multiclass or regression model on a bundled snapshot (no training needed: the
    sidecar reads the signature and the snapshot)."""
    from kubeloop.registry import Registry

    label, task = TASK_MODELS[model]
    doc = yaml.safe_load(SAMPLE.read_text())
    spec = doc["spec"]
    spec["model"] = model
    spec["lineage"].update(datasetUri=f"bundled://{model}", datasetDigest=snapshot.digest, datasetRows=snapshot.rows)
    spec["metrics"] = {"overall": {"rows": snapshot.rows}}
    spec["gate"] = None
    spec["signature"] = {
        "inputs": [{"name": name, "dtype": dtype} for name, dtype in snapshot.columns.items() if name != label],
        "label": label,
        "task": task,
        "classes": sorted(snapshot.stats[label].categories) if task == "multiclass" else None,
    }
    registry = Registry(home / "registry")
    allocated, _ = registry.allocate(model)
    assert allocated == version
    record = ModelVersion.model_validate(doc).spec.model_copy(update={"version": version})
    registry.save(record, "test record: no training")
    return registry.root / model / f"v{version}" / "modelversion.yaml"


@pytest.fixture(scope="module")
def task_sidecars(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sidecar]]:
    """One sidecar per model (started side by side), each monitoring its v1 (the default) and v2."""
    home = tmp_path_factory.mktemp("monitoring-tasks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBELOOP_HOME", str(home))
        from kubeloop.data.snapshot import ingest, read_frame

        snapshots = {model: ingest(f"bundled://{model}") for model in TASK_MODELS}
        paths = {model: [_task_record(home, snapshots[model], model, v) for v in (1, 2)] for model in TASK_MODELS}
        frames = {model: read_frame(snapshot) for model, snapshot in snapshots.items()}
    launched = {model: launch_sidecar(home, paths[model], home / f"{model}.stderr") for model in TASK_MODELS}
    running: dict[str, Sidecar] = {}
    try:
        for model, process in launched.items():
            inputs = ModelVersion.model_validate(yaml.safe_load(paths[model][0].read_text())).spec.signature.inputs
            running[model] = Sidecar(process.popen, process.ready(), process.stderr, frames[model], inputs)
        yield running
    finally:
        for model, process in launched.items():
            if model in running:
                running[model].stop()
            elif process.popen.poll() is None:
                process.popen.kill()


def _send_task_events(sidecar: Sidecar, rows: pd.DataFrame, answers: list[Any], *, version: int, v2: bool) -> None:
    """Request events of `rows` and response events of `answers` (one per row), ROWS_PER_EVENT rows an event; v1 is
    the default version (no ce-modelversion, KServe's header casing), v2 says its version and sends v2 bodies."""
    features = [f.name for f in sidecar.signature]
    records = traffic.records(rows, features)
    for i in range(0, len(records), ROWS_PER_EVENT):
        event_id = f"t{version}-{i}"
        headers = {
            kind: traffic.event_headers(kind, event_id, version=version if v2 else None, casing="lower" if v2 else "go")
            for kind in ("request", "response")
        }
        batch, outputs = records[i : i + ROWS_PER_EVENT], answers[i : i + ROWS_PER_EVENT]
        request = traffic.v2_request(batch, sidecar.signature) if v2 else traffic.v1_request(batch)
        assert sidecar.post(headers["request"], request).status_code == 200
        if v2:
            width = len(outputs[0]) if isinstance(outputs[0], list) else 0
            name, shape = ("probabilities", [len(outputs), width]) if width else ("value", [len(outputs)])
            flat = [p for row in outputs for p in row] if width else outputs
            body = {"outputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": flat}]}
        else:
            body = {"predictions": outputs}
        response = sidecar.post(headers["response"], json.dumps(body).encode())
        assert response.status_code == 200, response.text


def _promtool_clean(text: str) -> None:
    done = subprocess.run([tools.promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_multiclass_predictions_class_shares_and_the_shift_between_versions(task_sidecars) -> None:
    sidecar = task_sidecars["penguins"]
    classes = ["Adelie", "Chinstrap", "Gentoo"]
    rows = traffic.in_distribution(sidecar.frame, TASK_ROWS, np.random.default_rng(11))  # nulls among them
    species = rows["species"].tolist()
    stable = [[0.9 if c == s else 0.05 for c in classes] for s in species]  # a confident, right model
    canary = [[0.25, 0.25, 0.5]] * TASK_ROWS  # Gentoo for everything, half sure
    _send_task_events(sidecar, rows, stable, version=1, v2=False)
    _send_task_events(sidecar, rows, canary, version=2, v2=True)
    v1, v2 = sidecar.wait_windows(1, 1), sidecar.wait_windows(2, 1)
    assert v1["task"] == v2["task"] == "multiclass" and v1["state"] != "Unknown"
    kept = species[-WINDOW:]  # the prediction window holds the last WINDOW rows
    assert v1["predictions"]["count"] == WINDOW
    assert v1["predictions"]["classShares"] == pytest.approx({c: kept.count(c) / WINDOW for c in classes})
    assert v1["predictions"]["mean"] == pytest.approx(0.9)
    assert v2["predictions"]["classShares"] == {"Adelie": 0.0, "Chinstrap": 0.0, "Gentoo": 1.0}
    assert v2["predictions"]["p50"] == pytest.approx(0.5)
    shift = v2["predictionShift"]
    assert shift["against"] == 1 and set(shift["byClass"]) == set(classes)
    assert shift["ksDistance"] == max(shift["byClass"].values()) > 0.5
    metrics = sidecar.metrics()
    for label in classes:
        stable_count = f'kubeloop_drift_predicted_class_total{{class="{label}",model="penguins",version="1"}}'
        assert f"{stable_count} {species.count(label)}.0" in metrics
    assert f'kubeloop_drift_predicted_class_total{{class="Gentoo",model="penguins",version="2"}} {TASK_ROWS}.0' in (
        metrics
    )
    assert f'kubeloop_drift_prediction_bucket{{le="0.5",model="penguins",version="2"}} {TASK_ROWS}.0' in metrics
    _promtool_clean(metrics)


def test_regression_values_summary_and_the_shift_between_versions(task_sidecars) -> None:
    from kubeloop.data.snapshot import column_stats
    from kubeloop.histograms import value_buckets

    sidecar = task_sidecars["abalone"]
    rows = traffic.in_distribution(sidecar.frame, TASK_ROWS, np.random.default_rng(12))
    rings = rows["rings"].astype(float).tolist()  # a perfect model, then one that adds four years
    _send_task_events(sidecar, rows, rings, version=1, v2=False)
    _send_task_events(sidecar, rows, [r + 4.0 for r in rings], version=2, v2=True)
    v1, v2 = sidecar.wait_windows(1, 1), sidecar.wait_windows(2, 1)
    assert v1["task"] == "regression" and "classShares" not in v1["predictions"]
    kept = np.asarray(rings[-WINDOW:])
    assert v1["predictions"]["mean"] == pytest.approx(kept.mean())
    assert v1["predictions"]["p50"] == pytest.approx(np.quantile(kept, 0.5))
    assert v2["predictions"]["mean"] == pytest.approx(kept.mean() + 4.0)
    assert v2["predictionShift"]["against"] == 1 and v2["predictionShift"]["ksDistance"] > 0.3
    metrics = sidecar.metrics()
    stats = column_stats(sidecar.frame["rings"])  # the snapshot's statistics of the label
    bounds = value_buckets(stats.mean, stats.std)
    assert bounds[0] == 0.0 and bounds[-1] >= 19.0  # rings: mean 9.9, std 3.2
    exported = re.findall(r'kubeloop_drift_prediction_bucket\{le="([^"]+)",model="abalone",version="1"\}', metrics)
    assert exported == [*(str(b) for b in bounds), "+Inf"]
    assert f'kubeloop_drift_prediction_sum{{model="abalone",version="1"}} {sum(rings)}' in metrics
    assert "kubeloop_drift_predicted_class" not in metrics
    _promtool_clean(metrics)
