"""The drift sidecar's parts in-process on the bundled arrests data: the signature of the ModelVersion sample, its
feature schema, a seeded reference, the feature-wise KS/chi-square detector, and a started sidecar of two versions.
alibi-detect is imported once for the session (it takes seconds)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kubeloop.api.modelversion import ModelVersion, Signature
from kubeloop.data.bundled import bundled_path
from monitoring import detectors
from monitoring.schema import Schema
from tests.support.drift_inputs import REFERENCE

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelversion.yaml"


@pytest.fixture(scope="session")
def signature() -> Signature:
    return ModelVersion.model_validate(yaml.safe_load(SAMPLE.read_text())).spec.signature


@pytest.fixture(scope="session")
def frame() -> pd.DataFrame:
    return pd.read_csv(bundled_path("arrests"), dtype_backend="numpy_nullable")


@pytest.fixture(scope="session")
def schema(signature: Signature) -> Schema:
    return Schema.from_signature(signature)


@pytest.fixture(scope="session")
def reference(schema: Schema, frame: pd.DataFrame) -> detectors.Reference:
    return detectors.Reference.from_frame(schema, frame, REFERENCE, seed=0)


@pytest.fixture(scope="session")
def detector(reference: detectors.Reference) -> detectors.FeatureWiseDrift:
    return detectors.FeatureWiseDrift(reference, alpha=0.05, correction="bonferroni")


@pytest.fixture
def app(schema, reference, detector):
    from monitoring.app import DriftSidecar
    from monitoring.config import SidecarConfig
    from monitoring.versions import VersionMonitor

    config = SidecarConfig(window=50, max_body_bytes=10_000)

    def monitor(version: int) -> VersionMonitor:
        return VersionMonitor(
            model="arrests",
            version=version,
            schema=schema,
            reference=reference,
            detector=detector,
            tracker=detectors.DriftTracker(),
            window=config.window,
            predictions=deque(maxlen=50),
        )

    sidecar = DriftSidecar([monitor(1), monitor(2)], config, default_version=1)
    sidecar.start()
    yield sidecar
    sidecar.stop()
