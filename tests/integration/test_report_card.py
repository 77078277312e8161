"""The model report of really trained models, checked as HTML and rendered headless to PNG by Chromium.

Binary, once per session (`trained_models`, shared with test_dashboards.py): v1, a quick in-process model made
with the TrainingJob's own step functions (snapshot, validation, split, transform, evaluation, gate, registry) and
promoted to Production, then v2, the sample TrainingJob run by `run_training_job` on 2 real Ray workers for 2
epochs, gated against v1. The report of v2 has every section: curves on the recomputed held-out split, slices, the
validation re-run against v1's snapshot, the comparison with v1.

Multiclass (penguins) and regression (abalone), once per module (`task_models`): v1 and v2 of each sample, both
quick in-process models, v1 Production; each card's numbers are checked against kubeloop.evaluation on the rows
the training job held out.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubeloop.api import TrainingJob
from kubeloop.api.modelversion import ModelVersion
from kubeloop.api.trainingjob import Gate, TrainingJobSpec
from tests.support import tools
from tests.support.html_structure import Structure, structure_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASH = "\u2013"  # the card's "no value"
SECTIONS = ("summary", "data", "training", "evaluation", "slices", "gate", "comparison", "history", "drift")


@dataclass
class Trained:
    home: Path
    baseline: ModelVersion  # v1, Production
    model: ModelVersion  # v2, from run_training_job


_TRAINED: Trained | None = None


def _quick_version(job, registry, steps: int = 4) -> ModelVersion:
    """A model version through the TrainingJob's step functions, trained in-process for a few full-batch steps."""
    import torch

    from kubeloop.artifact import ModelArtifact
    from kubeloop.training import job as pipeline
    from kubeloop.training import tasks
    from kubeloop.training.models import build_model

    task = job.spec.task
    snapshot = pipeline.snapshot_dataset(job)
    report = pipeline.validate_snapshot(job, snapshot, registry)
    train, test = pipeline.split_snapshot(job, snapshot)
    transform = pipeline.fit_transform(job, train)
    torch.manual_seed(job.spec.hyperparameters.seed)
    model = build_model(job.spec.model.builder, transform.output_dim, job.spec.model.params, transform.label_width)
    x, y = torch.from_numpy(transform.transform(train)), tasks.targets(task, transform.encode_label(train))
    x_test, y_test = torch.from_numpy(transform.transform(test)), tasks.targets(task, transform.encode_label(test))
    loss_function = tasks.loss_function(task)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    history = []
    for epoch in range(1, steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_function(tasks.fitted(task, model(x)), y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            validation = tasks.validation_metrics(task, model(x_test), y_test, transform.label_std or 1.0)
        history.append(
            {"epoch": epoch, "train_loss": loss.item(), **validation, "epoch_seconds": time.perf_counter() - started}
        )
    artifact = ModelArtifact(model.eval(), transform, job.spec.model.builder, job.spec.model.params)
    evaluation, decision = pipeline.evaluate_model(job, artifact, test, registry, history)
    return pipeline.register_model(job, snapshot, artifact, evaluation, decision, "gloo", registry, validation=report)


def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """v1 (Production) and v2 (run_training_job on Ray), once per session; needs the ray_cluster fixture."""
    global _TRAINED
    if _TRAINED is None:
        from kubeloop.api import load_resources
        from kubeloop.registry import Registry
        from kubeloop.training.job import run_training_job

        home = tmp_path_factory.mktemp("report-home")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KUBELOOP_HOME", str(home))
            (job,) = load_resources(REPO / "manifests/samples/trainingjob.yaml")
            assert isinstance(job, TrainingJob)
            registry = Registry()
            baseline = _quick_version(job, registry)
            baseline = registry.promote(baseline.spec.model, baseline.spec.version, "test baseline")
            job.spec.hyperparameters.epochs = 2
            job.spec.workers.replicas = 2
            model = run_training_job(job, registry).model_version
        _TRAINED = Trained(home, baseline, model)
    return _TRAINED


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return trained_models(tmp_path_factory)


@pytest.fixture
def home(trained: Trained, kubeloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBELOOP_HOME", str(trained.home))
    return trained.home


SAMPLES = {"multiclass": "trainingjob-multiclass.yaml", "regression": "trainingjob-regression.yaml"}


@dataclass
class TaskModel:
    job: TrainingJob
    baseline: ModelVersion  # v1, Production
    model: ModelVersion  # v2, gated against v1


@pytest.fixture(scope="module")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, TaskModel]]:
    """Per task of SAMPLES, in one home: v1 (a few steps, promoted) and v2 (more steps) of the sample job."""
    from kubeloop.api import load_resources
    from kubeloop.registry import Registry

    home = tmp_path_factory.mktemp("report-tasks-home")
    models = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBELOOP_HOME", str(home))
        registry = Registry()
        for task, sample in SAMPLES.items():
            (job,) = load_resources(REPO / "manifests/samples" / sample)
            assert isinstance(job, TrainingJob) and job.spec.task == task
            first = _quick_version(job.model_copy(deep=True, update={"spec": _ungated(job)}), registry, steps=3)
            baseline = registry.promote(first.spec.model, first.spec.version, "test baseline")
            models[task] = TaskModel(job, baseline, _quick_version(job, registry, steps=40))
    return home, models


def _ungated(job: TrainingJob) -> TrainingJobSpec:
    """The job's spec without gate bounds, so that a 3-step model passes and can be promoted."""
    return job.spec.model_copy(update={"gate": Gate()})


@pytest.fixture
def task_home(task_models: tuple[Path, dict[str, TaskModel]], monkeypatch: pytest.MonkeyPatch) -> dict[str, TaskModel]:
    home, models = task_models
    monkeypatch.setenv("KUBELOOP_HOME", str(home))
    return models


# ---- checking the HTML ---------------------------------------------------------------------------------------------


def assert_images(structure: Structure) -> list[tuple[int, int]]:
    """Every image is an embedded PNG that decodes; returns their sizes."""
    from PIL import Image

    sizes = []
    for src, alt in structure.images:
        assert src.startswith("data:image/png;base64,") and alt, src[:60]
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        Image.open(io.BytesIO(data)).verify()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200
            sizes.append(image.size)
    return sizes


# ---- the tests -----------------------------------------------------------------------------------------------------


def test_report_of_a_trained_model(home: Path, trained: Trained) -> None:
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    registry = Registry()
    record = registry.get("arrests", trained.model.spec.version)
    path = write_report(record, registry)
    assert path == home / "reports" / f"arrests-v{record.spec.version}.html"
    text = path.read_text()
    structure = structure_of(text)
    assert [i for i in structure.ids if i in SECTIONS] == list(SECTIONS)
    assert {"validation", "hyperparameters", "curves", "fairness"} <= set(structure.ids)
    # training curves, ROC + PR, calibration, slices: all embedded, all valid
    assert len(assert_images(structure)) == 4
    assert "the recorded metrics are reproduced" in text  # the split recomputed from the lineage is training's
    # the validation report recorded at training (as in the TrainingJob's status), with its distances to v1's data
    assert "as recorded when the version was trained" in text
    assert f"Baseline <code>{trained.baseline.spec.lineage.dataset_digest}</code>" in text
    assert "Distance of each column's distribution from the baseline's" in text
    assert "<th>threshold</th>" in text and "<th>allowed regression</th>" in text  # the gate's bounds
    assert f"against Production {trained.baseline.metadata.name}" in text  # the gate's decision
    assert "<th>v2</th><th>v1</th><th>delta</th>" in text  # the comparison with the previous Production version
    assert "Metrics per value of <code>colour</code>" in text and "demographic parity difference" in text
    assert "<td><code>epochs</code></td><td><code>2</code></td>" in text  # hyperparameters
    assert "http://" not in text.replace("http://www.w3.org", "")  # self-contained

    first = write_report(registry.get("arrests", trained.baseline.spec.version), registry, home / "v1.html")
    first_text = first.read_text()
    structure_of(first_text)
    assert "No earlier Production version: nothing to compare with." in first_text


def test_report_renders_headless_to_png(home: Path, trained: Trained, tmp_path: Path) -> None:
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    registry = Registry()
    path = write_report(registry.get("arrests", trained.model.spec.version), registry, tmp_path / "report.html")
    _assert_screenshot(path, tmp_path)


def _assert_screenshot(path: Path, tmp_path: Path) -> None:
    """Chromium renders the card: the page's CSS applies and the plots are drawn."""
    from PIL import Image, ImageStat

    chromium = tools.chromium()
    screenshot = tmp_path / "report.png"
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,6000", f"--screenshot={screenshot}",
        path.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and screenshot.is_file(), done.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1280, 6000)
        rgb = image.convert("RGB")
        assert rgb.getpixel((5, 5)) == (0x1D, 0x23, 0x30)  # the header band: the page's CSS applied
        # the plots are drawn: the page holds matplotlib's blue and orange, and is far from blank
        colours = {c for _, c in rgb.resize((320, 1500)).getcolors(1 << 20)}
        assert any(abs(r - 0x1F) < 24 and abs(g - 0x77) < 24 and abs(b - 0xB4) < 24 for r, g, b in colours)
        assert any(abs(r - 0xFF) < 24 and abs(g - 0x7F) < 24 and abs(b - 0x0E) < 24 for r, g, b in colours)
        assert max(ImageStat.Stat(rgb).stddev) > 20
    keep = os.environ.get("KUBELOOP_REPORT_SCREENSHOT")
    if keep:  # to look at it: KUBELOOP_REPORT_SCREENSHOT=/tmp/report.png pytest ...
        shutil.copy(screenshot, keep)


def _held_out(job: TrainingJob, record: ModelVersion) -> tuple:
    """What the training job held out of the record's snapshot (its own split function), scored by the artifact:
    the training rows' labels, the held-out labels and outputs (as kubeloop.evaluation takes them), the transform."""
    from kubeloop.artifact import ModelArtifact
    from kubeloop.data.snapshot import load_snapshot
    from kubeloop.training import job as pipeline

    train, test = pipeline.split_snapshot(job, load_snapshot(record.spec.lineage.dataset_digest))
    artifact = ModelArtifact.load(record.spec.artifact_uri)
    transform = artifact.transform
    return transform.label_values(train), transform.label_values(test), artifact.predict(test), transform


def _cells(*values: object) -> str:
    """A table row as the card writes it: floats to 3 decimals, None as an en dash."""
    return "".join(f"<td>{DASH if v is None else f'{v:.3f}' if isinstance(v, float) else v}</td>" for v in values)


def _card(task: str, models: dict[str, TaskModel]) -> tuple[ModelVersion, str, Structure]:
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    registry = Registry()
    record = registry.get(models[task].model.spec.model, models[task].model.spec.version)
    text = write_report(record, registry).read_text()
    structure = structure_of(text)
    assert [i for i in structure.ids if i in SECTIONS] == list(SECTIONS)
    assert "the recorded metrics are reproduced" in text  # the card's split is the training job's
    assert f"against Production {models[task].baseline.metadata.name}" in text
    assert "http://" not in text.replace("http://www.w3.org", "")
    return record, text, structure


def test_report_of_a_multiclass_model(task_home: dict[str, TaskModel]) -> None:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from kubeloop.evaluation import metrics

    trained = task_home["multiclass"]
    record, text, structure = _card("multiclass", task_home)
    assert {"curves", "per-class", "confusion", "class-balance"} <= set(structure.ids)
    assert not {"fairness", "residuals", "slice-errors"} & set(structure.ids)
    # training curves, confusion matrix, one-vs-rest ROC, class balance, slices
    assert len(assert_images(structure)) == 5
    alts = " | ".join(alt for _, alt in structure.images)
    assert "validation accuracy" in alts.lower() and "Confusion matrix over 3 classes" in alts
    assert "<th>val_accuracy</th>" in text and "<th>val_auc</th>" not in text

    train_labels, labels, proba, transform = _held_out(trained.job, record)
    classes = ["Adelie", "Chinstrap", "Gentoo"]
    assert transform.classes == record.spec.signature.classes == classes
    assert (
        "3 classes; the model answers a probability for each, in order: "
        + ", ".join(f"<code>{c}</code>" for c in classes)
        in text
    )
    expected = metrics(labels, proba, "multiclass", classes)
    assert f"<tr><td>rows</td>{_cells(len(labels), len(labels))}</tr>" in text
    for name, shown in (
        ("accuracy", "accuracy"),
        ("f1", "F1 (macro)"),
        ("precision", "precision (macro)"),
        ("recall", "recall (macro)"),
        ("roc_auc", "ROC AUC (macro)"),
        ("log_loss", "log loss"),
    ):
        value = getattr(expected, name)
        assert f"<tr><td>{shown}</td>{_cells(value, value)}</tr>" in text, name
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=[0, 1, 2])
    counts = confusion_matrix(labels, predicted, labels=[0, 1, 2])
    for i, name in enumerate(classes):
        per_class = _cells(int(support[i]), int((predicted == i).sum()), precision[i], recall[i], f1[i])
        assert f"<tr><td><code>{name}</code></td>{per_class}" in text, name
        assert f"<tr><td><code>{name}</code></td>{_cells(*counts[i])}</tr>" in text  # the confusion matrix
        train, test = int((train_labels == i).sum()), int((labels == i).sum())
        shares = f"{train / len(train_labels):.1%}", f"{test / len(labels):.1%}"
        assert f"<tr><td><code>{name}</code></td>{_cells(train, shares[0], test, shares[1])}</tr>" in text
    # the gate and the comparison: the task's metrics against Production v1
    before = trained.baseline.spec.metrics.overall
    assert f"<tr><td>F1 (macro)</td>{_cells(expected.f1, before.f1)}" in text
    assert "Metrics per value of <code>island</code>" in text and "Torgersen" in text


def test_report_of_a_regression_model(task_home: dict[str, TaskModel]) -> None:
    import numpy as np

    from kubeloop.evaluation import metrics

    trained = task_home["regression"]
    record, text, structure = _card("regression", task_home)
    assert {"curves", "residuals", "slice-errors"} <= set(structure.ids)
    assert not {"fairness", "per-class", "confusion", "class-balance"} & set(structure.ids)
    # training curves, predicted against actual with the residuals, slices, errors per slice
    assert len(assert_images(structure)) == 4
    alts = " | ".join(alt for _, alt in structure.images)
    assert "Validation RMSE" in alts and "Residuals per value of sex" in alts
    assert "<th>val_rmse</th>" in text and "mean squared error (standardized label)" in text

    _, labels, predicted, transform = _held_out(trained.job, record)
    assert transform.task == "regression" and labels.dtype == np.float64
    expected = metrics(labels, predicted, "regression")
    for name, shown in (("rmse", "RMSE"), ("mae", "MAE"), ("r2", "R²"), ("label_mean", "label mean")):
        value = getattr(expected, name)
        assert f"<tr><td>{shown}</td>{_cells(value, value)}</tr>" in text, name
    assert (
        f"on the held-out rows from {labels.min():.4g} to {labels.max():.4g}, mean {labels.mean():.4g}, "
        f"std {labels.std():.4g}" in text
    )
    residuals = labels - predicted.astype(float)
    assert f"<td>{residuals.mean():+.3f} (positive: predicts too low)</td>" in text
    assert f"<th>median absolute error</th>{_cells(float(np.median(np.abs(residuals))))}" in text
    before = trained.baseline.spec.metrics.overall
    assert f"<tr><td>RMSE</td>{_cells(expected.rmse, before.rmse)}" in text  # the gate's table
    assert "<th>label mean</th>" in text and "Metrics per value of <code>sex</code>" in text


@pytest.mark.parametrize("task", list(SAMPLES))
def test_task_reports_render_headless_to_png(task: str, task_home: dict[str, TaskModel], tmp_path: Path) -> None:
    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    registry = Registry()
    model = task_home[task].model
    path = write_report(registry.get(model.spec.model, model.spec.version), registry, tmp_path / "report.html")
    _assert_screenshot(path, tmp_path)
