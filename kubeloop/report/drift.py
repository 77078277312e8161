"""A running drift sidecar's view of one model version: its /status JSON and /metrics, read over HTTP.

`history` is the list of recent windows when the sidecar's /status gives one per version (key ``history``:
``[{"time", "pValues": {feature: p}, "flagged", "state"}, ...]``); without it the report shows the last window.

The kept predictions' summary depends on the version's task (``task`` in /status): P(positive) for binary, the
predicted class's probability (confidence) plus each class's share for multiclass, the predicted value for regression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubeloop.errors import KubeloopError
from kubeloop.report import promtext


@dataclass
class DriftView:
    url: str
    version: int
    task: str
    detector: str
    window: int
    threshold: float | None
    rule: str
    state: str
    windows_evaluated: int
    windows_flagged: int
    windows_in_drift: int
    windows_dropped: int
    window_fill: int
    rows: int
    recent_flags: list[bool]
    events_received: float
    received_by_type: dict[str, float]
    events_malformed: float
    events_dropped: float
    last_window: dict[str, Any] | None
    skew: dict[str, dict[str, float | None]]
    predictions: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    prediction_shift: dict[str, Any] | None = None  # against the sidecar's default version; absent for that one
    outcomes: dict[str, Any] = field(default_factory=dict)  # labels joined to predictions: live and estimated metrics

    def predictions_text(self) -> str:
        p = self.predictions or {}
        if not p.get("count"):
            return "none seen yet"
        digits = ".6g" if self.task == "regression" else ".3f"  # a value in the label's unit, or a probability
        what = {"binary": "P(positive)", "multiclass": "confidence (the predicted class's probability)"}
        text = f"{p['count']} kept: mean {what.get(self.task, 'value')} {p['mean']:{digits}}, " + ", ".join(
            f"{q} {p[q]:{digits}}" for q in ("p10", "p50", "p90")
        )
        shares = p.get("classShares")
        if shares:
            text += "; predicted classes: " + ", ".join(f"{label} {share:.1%}" for label, share in shares.items())
        shift = self.prediction_shift
        if shift and shift.get("ksDistance") is not None:
            text += f"; shift from v{shift.get('against', '?')}: KS distance {shift['ksDistance']:.3f}"
            by_class = shift.get("byClass") or {}
            if by_class:
                largest = max(by_class, key=lambda label: by_class[label] or 0.0)
                text += f" (largest on P({largest}))"
        return text


def read_drift(url: str, version: int, timeout: float = 5.0) -> DriftView:
    base = url.rstrip("/")
    status = promtext.get_json(f"{base}/status", timeout)
    samples = promtext.scrape(base, timeout)
    versions = status.get("versions", {})
    mine = versions.get(str(version))
    if mine is None:
        raise KubeloopError(
            f"the sidecar at {base} does not monitor version {version} (it monitors {sorted(versions)})"
        )
    received = {
        s.labels.get("type", ""): s.value for s in promtext.select(samples, "kubeloop_drift_events_received_total")
    }
    rule = status.get("rule", {})
    last = mine.get("lastWindow")
    return DriftView(
        url=base,
        version=version,
        task=str(mine.get("task", "binary")),
        detector=str(status.get("detector", "?")),
        window=int(status.get("window", 0)),
        threshold=(last or {}).get("threshold", rule.get("alpha")),
        rule=str(rule.get("alarm", "")),
        state=str(mine.get("state", "Unknown")),
        windows_evaluated=int(mine.get("windowsEvaluated", 0)),
        windows_flagged=int(mine.get("windowsFlagged", 0)),
        windows_in_drift=int(mine.get("windowsInDrift", 0)),
        windows_dropped=int(mine.get("windowsDropped", 0)),
        window_fill=int(mine.get("windowFill", 0)),
        rows=int(mine.get("rows", 0)),
        recent_flags=[bool(f) for f in mine.get("recentFlags", [])],
        events_received=sum(received.values()),
        received_by_type=received,
        events_malformed=promtext.total(samples, "kubeloop_drift_events_malformed_total"),
        events_dropped=promtext.total(samples, "kubeloop_drift_events_dropped_total"),
        last_window=last,
        skew=mine.get("skew") or {},
        predictions=mine.get("predictions") or {},
        history=list(mine.get("history") or []),
        prediction_shift=mine.get("predictionShift"),
        outcomes=mine.get("outcomes") or {},
    )
