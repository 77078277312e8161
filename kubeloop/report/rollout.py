"""The rollout decisions a version went through, for its model card: each shadow window and canary step that named
it as the candidate, with the checks it was judged on (the paired report of a shadow included), read from the
embedded loop's histories (`$KUBELOOP_HOME/loops/MODEL-*.jsonl`, the status.history entries a cluster would hold)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kubeloop import config
from kubeloop.api.modelversion import ModelVersion
from kubeloop.log import event

log = logging.getLogger(__name__)


@dataclass
class JudgedCheck:
    name: str
    status: str
    value: float | None
    threshold: float | None
    reason: str


@dataclass
class RolloutStep:
    time: str
    action: str
    percent: int | None  # the candidate's share of traffic in the interval judged (None for a shadow window)
    reason: str
    checks: list[JudgedCheck]


def rollout_steps(record: ModelVersion, directory: Path | None = None) -> list[RolloutStep]:
    """The decisions naming `record` as the candidate, oldest first; unreadable lines are logged and skipped."""
    directory = directory or config.loops_dir()
    steps = []
    for path in sorted(directory.glob(f"{record.spec.model}-*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                event(log, "report.rollout_unreadable", level=logging.WARNING, path=str(path), line=number,
                      error=str(error))  # fmt: skip
                continue
            if entry.get("candidate") != record.spec.version or "checks" not in entry:
                continue
            steps.append(
                RolloutStep(
                    time=entry.get("time", ""),
                    action=entry.get("action", ""),
                    percent=entry.get("trafficPercent"),
                    reason=entry.get("reason", ""),
                    checks=[
                        JudgedCheck(c["name"], c["status"], c.get("value"), c.get("threshold"), c.get("reason", ""))
                        for c in entry["checks"]
                    ],
                )
            )
    return sorted(steps, key=lambda step: step.time)
