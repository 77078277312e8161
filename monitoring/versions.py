"""What the drift sidecar keeps per model version (its windows, reference, detector, last results), how it is
built from a ModelVersion, and how its predictions are summarized for /status and canary analysis."""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from kubeloop.api.modelversion import ModelVersion, Signature, Task
from kubeloop.data.snapshot import ColumnStats
from kubeloop.histograms import value_buckets
from kubeloop.log import event
from monitoring.config import HISTORY, PREDICTION_BUCKETS, SidecarConfig
from monitoring.detectors import (
    MIN_REFERENCE_PER_WINDOW,
    Detector,
    DriftTracker,
    Reference,
    WindowResult,
    build_detector,
)
from monitoring.events import (
    RequestParser,
)
from monitoring.schema import Schema

log = logging.getLogger(__name__)


@dataclass
class VersionMonitor:
    model: str
    version: int
    schema: Schema
    reference: Reference
    detector: Detector
    tracker: DriftTracker
    window: int
    predictions: deque[Any]  # the last predictions: numbers, or (multiclass) lists of class probabilities
    task: Task = "binary"
    classes: tuple[str, ...] = ()  # multiclass: the order of the probabilities (spec.signature.classes)
    signature: Signature | None = None  # what feedback labels are decoded by
    prediction_buckets: tuple[float, ...] = PREDICTION_BUCKETS
    parser: RequestParser = field(init=False)
    # the event loop's side: the window being filled
    columns: list[list[Any]] = field(init=False)
    filled: int = 0
    window_events: int = 0
    requests: int = 0
    responses: int = 0
    rows: int = 0
    # the detection thread's side: results of the last window
    last: WindowResult | None = None
    last_skew: dict[str, dict[str, float]] = field(default_factory=dict)
    last_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    last_checked: datetime | None = None
    errors: int = 0
    dropped_windows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards the detection results
    last_flag_log: float = -math.inf
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def __post_init__(self) -> None:
        self._labels = (self.model, str(self.version))
        self.parser = RequestParser(self.schema)
        self.columns = [[] for _ in self.schema.features]

    @property
    def labels(self) -> tuple[str, str]:
        return self._labels


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _clean(nested: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {k: {s: _finite(v) for s, v in stats.items()} for k, stats in nested.items()}


def _prediction_summary(monitor: VersionMonitor) -> dict[str, Any]:
    """Count, mean and p10/p50/p90 of the kept predictions: of the score (binary), the value (regression), the
    predicted class's probability (multiclass, which adds each class's share of the predictions)."""
    if not monitor.predictions:
        return {"count": 0}
    values = np.array(monitor.predictions, dtype=np.float64)
    scores = values.max(axis=1) if values.ndim == 2 else values
    q10, q50, q90 = np.quantile(scores, [0.1, 0.5, 0.9])
    summary: dict[str, Any] = {
        "count": len(scores),
        "mean": float(scores.mean()),
        "p10": float(q10),
        "p50": float(q50),
        "p90": float(q90),
    }
    if values.ndim == 2:
        shares = np.bincount(values.argmax(axis=1), minlength=len(monitor.classes)) / len(values)
        summary["classShares"] = dict(zip(monitor.classes, shares.tolist(), strict=True))
    return summary


def prediction_shift(monitor: VersionMonitor, default: VersionMonitor) -> dict[str, Any] | None:
    """How far a version's kept predictions are from the default version's: the two-sample KS distance of the
    scores or values; multiclass, the largest over the classes of the KS distance of that class's probability
    (``byClass`` lists them), which moves with the predicted-class mix and with the confidence alike. None when the
    two versions' outputs do not compare (another task, other classes)."""
    if (monitor.task, monitor.classes) != (default.task, default.classes):
        return None
    ours, theirs = np.array(monitor.predictions, dtype=np.float64), np.array(default.predictions, dtype=np.float64)
    if ours.ndim == 1:
        return {"against": default.version, "ksDistance": _ks_statistic(ours, theirs)}
    by_class = {label: _ks_statistic(ours[:, i], theirs[:, i]) for i, label in enumerate(monitor.classes)}
    return {"against": default.version, "ksDistance": max(by_class.values()), "byClass": by_class}


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic of two prediction samples (the p-value is not used)."""
    return float(stats.ks_2samp(a, b, method="asymp").statistic)


# ---- building it -------------------------------------------------------------------------------------------------


def read_model_version(ref: str) -> ModelVersion:
    """A ModelVersion from a YAML file, or from the local registry as NAME:VERSION."""
    from kubeloop.api.load import load_resources
    from kubeloop.errors import KubeloopError

    path = Path(ref)
    if path.is_file():
        found = [r for r in load_resources(path) if isinstance(r, ModelVersion)]
        if len(found) != 1:
            raise KubeloopError(f"{path}: expected exactly one ModelVersion, found {len(found)}")
        return found[0]
    if ":" in ref and "/" not in ref:
        from kubeloop.registry import Registry

        return Registry().resolve(ref)
    raise KubeloopError(f"no such ModelVersion file: {ref} (or give NAME:VERSION from the local registry)")


def build_monitor(record: ModelVersion, config: SidecarConfig) -> VersionMonitor:
    from kubeloop.data.snapshot import load_snapshot
    from kubeloop.errors import KubeloopError

    spec = record.spec
    signature = spec.signature
    if signature.task == "multiclass" and not signature.classes:
        raise KubeloopError(
            f"{record.metadata.name}: spec.signature.classes is empty: a multiclass ModelVersion names its classes, "
            "the order of its probabilities"
        )
    snapshot = load_snapshot(spec.lineage.dataset_digest)
    schema = Schema.from_signature(spec.signature, snapshot.stats)
    reference = Reference.from_snapshot(schema, snapshot, config.reference_size, config.seed)
    if reference.size < MIN_REFERENCE_PER_WINDOW * config.window:
        event(
            log,
            "small_reference",
            logging.WARNING,
            version=spec.version,
            reference=reference.size,
            window=config.window,
            advice=f"the declared false-positive rate assumes reference >= {MIN_REFERENCE_PER_WINDOW}x window",
        )
    detector = build_detector(
        config.detector,
        reference,
        config.p_value,
        config.correction,
        mmd_permutations=config.mmd_permutations,
        backend=config.backend,
    )
    event(
        log,
        "monitoring",
        model=spec.model,
        version=spec.version,
        detector=config.detector,
        features=len(schema.features),
        reference=reference.size,
        snapshot=snapshot.digest[:19],
        window=config.window,
    )
    return VersionMonitor(
        model=spec.model,
        version=spec.version,
        schema=schema,
        reference=reference,
        detector=detector,
        tracker=DriftTracker(config.alarm_k, config.alarm_m),
        window=config.window,
        predictions=deque(maxlen=config.prediction_window or config.window),
        task=signature.task,
        classes=tuple(signature.classes or ()),
        signature=signature,
        prediction_buckets=_prediction_buckets(signature.task, snapshot.stats.get(signature.label)),
    )


def _prediction_buckets(task: Task, label: ColumnStats | None) -> tuple[float, ...]:
    """Probabilities: tenths. Values: round steps over the training snapshot's label mean -3..+3 std, the bounds
    the model server's own histogram takes from the training split (so they most often coincide)."""
    if task != "regression":
        return PREDICTION_BUCKETS
    return value_buckets(label.mean, label.std) if label is not None else value_buckets(None, None)
