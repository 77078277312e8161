"""The drift sidecar's settings and limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubeloop.api.modeldeployment import DriftMonitor
from monitoring.detectors import (
    ALARM_K,
    ALARM_M,
    DEFAULT_BACKEND,
    DEFAULT_CORRECTION,
    MMD_PERMUTATIONS,
    Backend,
    Correction,
)

LOG_EVERY_S = 10.0  # malformed events: at most one log line per reason in this many seconds
DEFAULT_MAX_BODY = 4 * 1024 * 1024
DETECTOR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREDICTION_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
HISTORY = 50  # recent windows kept per version for /status (p-values, flag, state)


@dataclass(frozen=True)
class SidecarConfig:
    detector: Literal["ks", "mmd"] = "ks"
    backend: Backend = DEFAULT_BACKEND
    window: int = 500  # rows (inference instances) per detection window
    p_value: float = 0.05  # family-wise alpha of one window's test
    reference_size: int = 2000
    correction: Correction = DEFAULT_CORRECTION
    alarm_k: int = ALARM_K
    alarm_m: int = ALARM_M
    seed: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY
    detection_queue: int = 8  # full windows waiting for the detector
    prediction_window: int = 0  # predictions kept per version (0: the drift window's size)
    mmd_permutations: int = MMD_PERMUTATIONS

    @classmethod
    def from_monitor(cls, monitor: DriftMonitor, **overrides: Any) -> SidecarConfig:
        return cls(
            detector=monitor.detector,
            backend=monitor.backend,
            window=monitor.window,
            p_value=monitor.p_value,
            reference_size=monitor.reference_size,
            **overrides,
        )
