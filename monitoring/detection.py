"""One window's test, on the detection thread: the detector, skew, window statistics, the version's k-of-m state
and history, the drift metrics and the logs of a change of state."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from kubeloop.log import event
from monitoring.config import LOG_EVERY_S
from monitoring.detectors import skew, window_statistics
from monitoring.metrics import Metrics
from monitoring.versions import VersionMonitor, _finite

log = logging.getLogger(__name__)


def evaluate_window(monitor: VersionMonitor, columns: list[list[Any]], metrics: Metrics) -> None:
    """Test one full window of `monitor` (the detection thread): the detector, skew and statistics, the k-of-m state,
    its history, metrics and logs."""
    schema = monitor.schema
    arrays = [
        np.asarray(col, dtype=np.float64 if spec.kind == "numeric" else np.int64)
        for col, spec in zip(columns, schema.features, strict=True)
    ]
    result = monitor.detector.test(arrays)
    skews = skew(monitor.reference, arrays)
    stats = window_statistics(schema, arrays)
    with monitor.lock:
        monitor.last_skew, monitor.last_stats = skews, stats
        previous = monitor.tracker.state
        state = monitor.tracker.update(result.flagged)
        monitor.last = result
        monitor.last_checked = datetime.now(UTC)
        monitor.history.append(
            {
                "time": monitor.last_checked.isoformat(),
                "pValues": {k: _finite(t.p_value) for k, t in result.features.items()},
                "flagged": result.flagged,
                "state": state,
            }
        )
    labels = monitor.labels
    metrics.seconds.labels(result.detector).observe(result.seconds)
    metrics.windows.labels(*labels, "drift" if result.flagged else "no_drift").inc()
    metrics.detected.labels(*labels).set(1 if state == "Drift" else 0)
    for feature, test in result.features.items():
        metrics.p_value.labels(*labels, feature).set(test.p_value)
        metrics.distance.labels(*labels, feature).set(test.distance)
        if test.effect is not None:
            metrics.effect.labels(*labels, feature).set(test.effect)
    shares = result.shares()
    for feature in result.features:
        metrics.share.labels(*labels, feature).set(shares.get(feature, 0.0))
    for feature, numbers in monitor.last_skew.items():
        for statistic, value in numbers.items():
            metrics.skew.labels(*labels, feature, statistic).set(value)
    if state != previous:  # every change of state, and flagged windows at most once per LOG_EVERY_S
        event(log, "drift_state", model=monitor.model, version=monitor.version, state=state, previous=previous)
    if result.flagged and time.monotonic() - monitor.last_flag_log >= LOG_EVERY_S:
        monitor.last_flag_log = time.monotonic()
        event(
            log,
            "drift_window",
            model=monitor.model,
            version=monitor.version,
            state=state,
            features=",".join(result.drifted_features()) or "-",
            min_p=result.min_p_value or 0.0,
            flagged_windows=monitor.tracker.flagged_windows,
        )
