"""What `GET /status` tells of one model version: its drift state, windows, last window's tests, skew, serving
statistics, predictions and, for a version other than the default, the shift of its predictions."""

from __future__ import annotations

from typing import Any

from kubeloop.api.modeldeployment import DriftStatus
from monitoring.versions import VersionMonitor, _clean, _finite, _prediction_summary, prediction_shift


def version_status(m: VersionMonitor, default: VersionMonitor) -> dict[str, Any]:
    """`/status` of one version (`default`: the sidecar's default version, whose predictions others are compared
    with)."""
    with m.lock:
        return _version_status_locked(m, default)


def _version_status_locked(m: VersionMonitor, default: VersionMonitor) -> dict[str, Any]:
    last = m.last
    drift = DriftStatus(
        state=m.tracker.state,
        min_p_value=_finite(last.min_p_value) if last else None,
        events=m.requests,
        last_checked=m.last_checked,
    ).model_dump(mode="json", by_alias=True)
    out: dict[str, Any] = {
        "model": m.model,
        "version": m.version,
        "task": m.task,
        "drift": drift,
        "state": m.tracker.state,
        "referenceRows": m.reference.size,
        "referenceDigest": m.reference.digest,
        "events": {"request": m.requests, "response": m.responses},
        "rows": m.rows,
        "windowFill": m.filled,
        "windowsEvaluated": m.tracker.windows,
        "windowsFlagged": m.tracker.flagged_windows,
        "windowsInDrift": m.tracker.drift_windows,
        "windowsDropped": m.dropped_windows,
        "windowErrors": m.errors,
        "recentFlags": list(m.tracker.recent),
        "skew": _clean(m.last_skew),
        "serving": _clean(m.last_stats),
        "predictions": _prediction_summary(m),
        "history": list(m.history),
    }
    if last is not None:
        out["lastWindow"] = {
            "detector": last.detector,
            "rows": last.rows,
            "flagged": last.flagged,
            "threshold": last.threshold,
            "correction": last.correction,
            "seconds": round(last.seconds, 6),
            "driftedFeatures": last.drifted_features(),
            "pValues": {k: _finite(t.p_value) for k, t in last.features.items()},
            "adjustedPValues": {k: _finite(t.adjusted_p_value) for k, t in last.features.items()},
            "distances": {k: _finite(t.distance) for k, t in last.features.items()},
            "tests": {k: t.test for k, t in last.features.items()},
            # how far each feature moved (KS D, Cramer's V) and each drifted feature's share of the shift
            "effects": {k: _finite(t.effect) for k, t in last.features.items() if t.effect is not None},
            "shares": last.shares(),
        }
    if m is not default and len(m.predictions) and len(default.predictions):
        shift = prediction_shift(m, default)
        if shift is not None:
            out["predictionShift"] = shift
    return out
