"""The report's parts without training or model servers: Prometheus text and histogram buckets, the plots, and a
report whose snapshot and artifact are elsewhere (the status table and the state files: test_status_view.py).
"""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from kubeloop.report import promtext
from tests.support.html_structure import structure_of

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("summary", "data", "training", "evaluation", "slices", "gate", "comparison", "history", "rollout", "drift")


# ---- Prometheus text -----------------------------------------------------------------------------------------------


def test_parse_reads_labels_escapes_and_skips_comments() -> None:
    text = (
        "# HELP kubeloop_requests_total Inference requests.\n"
        "# TYPE kubeloop_requests_total counter\n"
        'kubeloop_requests_total{model="arrests",version="1",protocol="v1",code="200"} 90.0\n'
        'kubeloop_requests_total{model="arrests",version="1",protocol="v1",code="500"} 10\n'
        'odd{path="a\\"b\\\\c\\nd"} 1e3\n'
        "up 1 1700000000000\n"
    )
    samples = promtext.parse(text)
    assert [s.name for s in samples] == ["kubeloop_requests_total", "kubeloop_requests_total", "odd", "up"]
    assert samples[2].labels == {"path": 'a"b\\c\nd'} and samples[2].value == 1000
    assert promtext.total(samples, "kubeloop_requests_total", model="arrests") == 100
    assert promtext.total(samples, "kubeloop_requests_total", code="500") == 10
    with pytest.raises(ValueError, match="not the Prometheus text format"):
        promtext.parse("not a sample line at all {")


def test_histogram_buckets_are_summed_over_labels_and_subtracted() -> None:
    text = (
        "# TYPE request_predict_seconds histogram\n"
        'request_predict_seconds_bucket{model_name="a",le="0.01"} 3\n'
        'request_predict_seconds_bucket{model_name="a",le="+Inf"} 4\n'
        'request_predict_seconds_bucket{model_name="b",le="0.01"} 1\n'
        'request_predict_seconds_bucket{model_name="b",le="+Inf"} 6\n'
    )
    after = promtext.buckets(promtext.parse(text), "request_predict_seconds")
    assert after == [(0.01, 4.0), (float("inf"), 10.0)]
    assert promtext.buckets(promtext.parse(text), "request_predict_seconds", model_name="b") == [
        (0.01, 1.0),
        (float("inf"), 6.0),
    ]
    assert promtext.subtract(after, [(0.01, 1.0), (float("inf"), 2.0)]) == [(0.01, 3.0), (float("inf"), 8.0)]


# ---- plots and the report ------------------------------------------------------------------------------------------


def assert_png(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(io.BytesIO(data)).verify()
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def test_every_plot_is_a_png() -> None:
    from kubeloop.report import plots

    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.7).astype(int)
    proba = np.clip(0.5 * labels + 0.5 * rng.random(400), 0, 1)
    per_epoch = [
        {"epoch": e, "train_loss": 0.6 / e, "val_loss": 0.65 / e, "val_auc": 0.6 + e / 50, "epoch_seconds": 1.0}
        for e in (1, 2, 3)
    ]
    overall = {"roc_auc": 0.8, "accuracy": 0.75, "precision": 0.8, "recall": 0.9}
    classes = ["Adelie", "Chinstrap", "Gentoo"]
    class_labels = rng.integers(0, 3, 300)
    class_proba = rng.dirichlet(np.ones(3), 300) + np.eye(3)[class_labels]
    class_proba /= class_proba.sum(axis=1, keepdims=True)
    actual = rng.normal(10, 3, 500)
    predicted = actual + rng.normal(0, 1.5, 500)
    errors = {"rmse": 2.1, "mae": 1.6}
    figures = [
        plots.training_curves(per_epoch),
        plots.training_curves([{**row, "val_auc": None, "val_accuracy": 0.9} for row in per_epoch], "cross-entropy"),
        plots.training_curves([{"epoch": e, "train_loss": 1 / e, "val_rmse": 3 - e / 20} for e in range(1, 41)]),
        plots.roc_and_pr(labels, proba, float(labels.mean())),
        plots.calibration(labels.astype(float), proba)[0],
        plots.slices("colour", {"Black": overall, "White": {**overall, "roc_auc": None}}, overall),
        plots.slices("sex", {"F": errors, "I": {"rmse": 1.7, "mae": 1.2}}, errors),
        plots.confusion_matrix(np.array([[38, 1, 0], [0, 17, 0], [2, 0, 29]]), classes),
        plots.roc_one_vs_rest(class_labels, class_proba, classes),
        plots.class_balance(classes, {"train": np.array([114, 51, 93]), "held-out": np.array([38, 17, 31])}),
        plots.regression_fit(actual, predicted, "rings"),
        plots.residuals_by_slice("sex", {"F": actual[:200] - predicted[:200], "M": actual[200:] - predicted[200:]}),
        plots.p_values({"age": 1e-9, "colour": 0.4, "year": None}, 0.05 / 3, "last window"),
        plots.p_value_history(
            [{"pValues": {"age": 0.3, "colour": 0.01}, "flagged": False}, {"pValues": {"age": 1e-6}, "flagged": True}],
            0.05,
        ),
    ]
    for figure in figures:
        width, height = assert_png(figure.png)
        assert width >= 400 and height >= 200 and figure.alt
        assert figure.data_uri().startswith("data:image/png;base64,")


def test_report_of_a_version_whose_snapshot_and_artifact_are_elsewhere(kubeloop_home: Path) -> None:
    """A record copied from another machine: every section is there, and says what it could not show and why."""
    from kubeloop.api.modelversion import ModelVersion
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    sample = ModelVersion.model_validate(yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text()))
    registry = Registry()
    registry.allocate(sample.spec.model)
    record = registry.save(sample.spec.model_copy(update={"version": 1}), "copied")
    path = write_report(record, registry)
    assert path == kubeloop_home / "reports" / f"{record.spec.model}-v1.html"
    assert path.stat().st_mode & 0o777 == 0o644
    text = path.read_text()
    structure = structure_of(text)
    assert [i for i in structure.ids if i in SECTIONS] == list(SECTIONS)
    assert "the snapshot is not in this machine" in text and "no curves" in text
    assert "No earlier Production version" in text and "No running deployment was given" in text
    for src, _alt in structure.images:  # the training curves, drawn from the record alone
        assert_png(__import__("base64").b64decode(src.removeprefix("data:image/png;base64,")))
    assert "http://" not in text.replace("http://www.w3.org", "")  # nothing loaded from elsewhere


def test_report_of_multiclass_and_regression_records_from_elsewhere(kubeloop_home: Path) -> None:
    """Records of the other tasks copied from another machine: the card shows each task's metrics, label, gate
    and slices from the record alone, escapes what came from the data, and does not compare them with the binary
    Production version."""
    from kubeloop.api.modelversion import Evaluation, GateDecision, Metrics, ModelVersion, SliceMetrics
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    sample = ModelVersion.model_validate(yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text()))
    registry = Registry()
    registry.allocate(sample.spec.model)
    registry.save(sample.spec.model_copy(update={"version": 1}), "copied")
    registry.promote(sample.spec.model, 1, "copied")
    hostile = '<script>alert("x")</script>'
    tasks = {
        "multiclass": (
            Metrics(rows=40, accuracy=0.8, f1=0.75, precision=0.7, recall=0.72, log_loss=0.5),
            {"epoch": 1.0, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.7},
            "f1 0.7500 is below the threshold 0.8 by 0.0500",
        ),
        "regression": (
            Metrics(rows=40, rmse=2.25, mae=1.5, r2=0.52, label_mean=9.95),
            {"epoch": 1.0, "train_loss": 1.0, "val_loss": 0.9, "val_rmse": 2.5},
            "rmse 2.2500 is above the threshold 2.0 by 0.2500",
        ),
    }
    for version, (task, (overall, epoch, reason)) in enumerate(tasks.items(), start=2):
        registry.allocate(sample.spec.model)
        signature = sample.spec.signature.model_copy(
            update={
                "task": task,
                "positive_class": None,
                "classes": ["A&B", hostile] if task == "multiclass" else None,
            }
        )
        per_slice = overall.model_copy(update={"rows": 20, "class_rates": {"A&B": 0.5, hostile: 0.5}})
        record = registry.save(
            sample.spec.model_copy(
                update={
                    "version": version,
                    "signature": signature,
                    "metrics": Evaluation(
                        overall=overall.model_copy(update={"class_rates": {"A&B": 0.6, hostile: 0.4}}),
                        slices=SliceMetrics(column="colour", values={hostile: per_slice, "White": per_slice}),
                        per_epoch=[epoch],
                    ),
                    "gate": GateDecision(passed=False, reasons=[reason], compared_with=None),
                    "stage": "Rejected",
                }
            ),
            "copied",
        )
        text = write_report(record, registry).read_text()
        structure = structure_of(text)
        assert [i for i in structure.ids if i in SECTIONS] == list(SECTIONS)
        assert hostile not in text and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
        assert f"<th>task</th><td>{task}</td>" in text
        assert "is a binary model, this one " + task + ": their metrics do not compare" in text
        assert f"<li>{reason}</li>" in text
        assert len(structure.images) == 2  # the training curves and the slices, from the record alone
        for src, _alt in structure.images:
            assert_png(__import__("base64").b64decode(src.removeprefix("data:image/png;base64,")))
        if task == "multiclass":
            assert "<th>accuracy</th><td>0.800</td></tr><tr><th>F1 (macro)</th><td>0.750</td>" in text
            assert "in order: <code>A&amp;B</code>, <code>&lt;script&gt;" in text
            assert "<tr><td>F1 (macro)</td><td>0.750</td></tr>" in text  # the gate's table
            assert "<th>val_accuracy</th>" in text and "A&amp;B 50%" in text
        else:
            assert "<th>RMSE</th><td>2.250</td></tr><tr><th>R²</th><td>0.520</td>" in text
            assert "in the label's own units: mean 9.950 on the held-out rows" in text
            assert "<tr><td>R²</td><td>0.520</td><td>0.520</td></tr>" not in text  # nothing recomputed here
            assert "<tr><td>RMSE</td><td>2.250</td></tr>" in text and "<th>val_rmse</th>" in text


# ---- the drift section's prediction summary per task, from a real sidecar's /status and /metrics --------------------


def _serve_sidecar(app: object) -> ThreadingHTTPServer:
    """The in-process sidecar's /status and /metrics over HTTP on loopback (what its read-only listener answers)."""
    import json

    from prometheus_client import generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(app.status()).encode() if self.path == "/status" else generate_latest(app.registry)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_drift_predictions_text_per_task(task: str) -> None:
    """What the report says of the predictions the sidecar kept: P(positive) for binary, the confidence and the class
    shares for multiclass, values (not probabilities) for regression; and the shift from the default version."""
    import json
    from collections import deque

    import pandas as pd

    from kubeloop.api.modelversion import ModelVersion
    from kubeloop.data.bundled import bundled_path
    from kubeloop.histograms import value_buckets
    from kubeloop.report.drift import read_drift
    from monitoring import detectors
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.events import lower_headers
    from monitoring.schema import Schema
    from monitoring.versions import VersionMonitor
    from tests.support import traffic_events as traffic

    sample = ModelVersion.model_validate(yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text()))
    schema = Schema.from_signature(sample.spec.signature)
    frame = pd.read_csv(bundled_path("arrests"), dtype_backend="numpy_nullable")
    reference = detectors.Reference.from_frame(schema, frame, 200, seed=0)
    detector = detectors.FeatureWiseDrift(reference, alpha=0.05, correction="bonferroni")
    options = {
        "binary": {},
        "multiclass": {"classes": ("Adelie", "Chinstrap", "Gentoo")},
        "regression": {"prediction_buckets": value_buckets(1500.0, 400.0)},
    }[task]
    monitors = [
        VersionMonitor("m", v, schema, reference, detector, detectors.DriftTracker(), 50, deque(), task, **options)
        for v in (1, 2)
    ]
    app = DriftSidecar(monitors, SidecarConfig(window=50), default_version=1)
    predictions = {
        "binary": {1: [0.1, 0.2, 0.3, 0.4], 2: [0.6, 0.7, 0.8, 0.9]},
        "multiclass": {1: [[0.8, 0.1, 0.1]] * 3 + [[0.1, 0.7, 0.2]], 2: [[0.2, 0.2, 0.6]] * 4},
        "regression": {1: [1000.0, 1250.0, 1500.0, 1752.0], 2: [2000.0, 2250.0, 2500.0, 2752.0]},
    }[task]
    for version, rows in predictions.items():
        headers = lower_headers(traffic.event_headers("response", "r", version=version))
        assert app.ingest(headers, json.dumps({"predictions": rows}).encode()) == (200, "")
    server = _serve_sidecar(app)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stable, canary = read_drift(url, 1), read_drift(url, 2)
    finally:
        server.shutdown()
        server.server_close()
    assert stable.task == canary.task == task
    texts = {
        "binary": (
            "4 kept: mean P(positive) 0.250, p10 0.130, p50 0.250, p90 0.370",
            "4 kept: mean P(positive) 0.750, p10 0.630, p50 0.750, p90 0.870; shift from v1: KS distance 1.000",
        ),
        "multiclass": (
            "4 kept: mean confidence (the predicted class's probability) 0.775, p10 0.730, p50 0.800, p90 0.800; "
            "predicted classes: Adelie 75.0%, Chinstrap 25.0%, Gentoo 0.0%",
            "4 kept: mean confidence (the predicted class's probability) 0.600, p10 0.600, p50 0.600, p90 0.600; "
            "predicted classes: Adelie 0.0%, Chinstrap 0.0%, Gentoo 100.0%; shift from v1: KS distance 1.000 "
            "(largest on P(Gentoo))",
        ),
        "regression": (
            "4 kept: mean value 1375.5, p10 1075, p50 1375, p90 1676.4",
            "4 kept: mean value 2375.5, p10 2075, p50 2375, p90 2676.4; shift from v1: KS distance 1.000",
        ),
    }[task]
    assert (stable.predictions_text(), canary.predictions_text()) == texts
