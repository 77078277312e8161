"""The model report of a really trained model, checked as HTML and rendered headless to PNG by Chromium.

Once per session (`trained_models`, shared with test_dashboards.py): v1, a quick in-process model made with the
TrainingJob's own step functions (snapshot, validation, split, transform, evaluation, gate, registry) and promoted
to Production, then v2, the sample TrainingJob run by `run_training_job` on 2 real Ray workers for 2 epochs, gated
against v1. The report of v2 has every section: curves on the recomputed held-out split, slices, the validation
re-run against v1's snapshot, the comparison with v1.
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
import tools
from html_structure import Structure, structure_of

from kubeloop.api.modelversion import ModelVersion

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
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
    from sklearn.metrics import roc_auc_score

    from kubeloop.artifact import ModelArtifact
    from kubeloop.training import job as pipeline
    from kubeloop.training.models import build_model

    snapshot = pipeline.snapshot_dataset(job)
    pipeline.validate_snapshot(job, snapshot, registry)
    train, test = pipeline.split_snapshot(job, snapshot)
    transform = pipeline.fit_transform(job, train)
    torch.manual_seed(job.spec.hyperparameters.seed)
    model = build_model(job.spec.model.builder, transform.output_dim, job.spec.model.params)
    x, y = torch.from_numpy(transform.transform(train)), torch.from_numpy(transform.encode_label(train))
    x_test, y_test = torch.from_numpy(transform.transform(test)), torch.from_numpy(transform.encode_label(test))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    history = []
    for epoch in range(1, steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logits = model(x_test).squeeze(1)
            val_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_test).item()
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss.item(),
                "val_loss": val_loss,
                "val_auc": float(roc_auc_score(y_test.numpy(), logits.numpy())),
                "epoch_seconds": time.perf_counter() - started,
            }
        )
    artifact = ModelArtifact(model.eval(), transform, job.spec.model.builder, job.spec.model.params)
    evaluation, decision = pipeline.evaluate_model(job, artifact, test, registry, history)
    return pipeline.register_model(job, snapshot, artifact, evaluation, decision, "gloo", registry)


def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """v1 (Production) and v2 (run_training_job on Ray), once per session; needs the ray_cluster fixture."""
    global _TRAINED
    if _TRAINED is None:
        from kubeloop.api import TrainingJob, load_resources
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
    assert f"Re-run against the snapshot of {trained.baseline.metadata.name}" in text
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
    from PIL import Image, ImageStat

    from kubeloop.registry import Registry
    from kubeloop.report import write_report

    chromium = tools.chromium()
    registry = Registry()
    path = write_report(registry.get("arrests", trained.model.spec.version), registry, tmp_path / "report.html")
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
