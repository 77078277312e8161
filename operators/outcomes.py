"""status.outcomes: each served version's performance on ground truth, read from Prometheus on the watch timer.

Per version the deployment serves (the stable one, the canary, the shadow): the labelled rows its live metrics are
computed on, the live metrics themselves (the drift sidecar's join of feedback to what it served:
kubeloop_live_metric) and the estimates without labels with their 95% interval (kubeloop_estimated_metric). Values
are rounded to 3 decimals and the list is written only when it changed, so a steady deployment's status is not
rewritten every tick.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kubeloop.analysis import SignalSource
from kubeloop.analysis.signals import SignalError
from kubeloop.api import ModelDeployment
from kubeloop.kube import Kube
from operators import inferenceservice
from operators.canary import MODELDEPLOYMENT

log = logging.getLogger("operators.outcomes")

DECIMALS = 3


def outcomes(md: ModelDeployment, source: SignalSource) -> list[dict[str, Any]]:
    """status.outcomes now: one entry per served version with anything to say, in wanted_versions' order."""
    found = []
    for version in inferenceservice.wanted_versions(md):
        read = source.outcomes(md.spec.model, version, md.metadata.namespace)
        live = {metric: round(value, DECIMALS) for metric, value in read.live.items() if metric != "rows"}
        estimated = {
            metric: {bound: round(value, DECIMALS) for bound, value in bounds.items()}
            for metric, bounds in read.estimated.items()
        }
        if live or estimated or read.live.get("rows"):
            found.append(
                {"version": version, "labelled": int(read.live.get("rows", 0)), "live": live, "estimated": estimated}
            )
    return found


def tick(body: Mapping[str, Any], kube: Kube, source: SignalSource | None) -> bool:
    """Write status.outcomes when it changed; whether it was written."""
    if source is None:
        return False
    md = ModelDeployment.model_validate(dict(body))
    try:
        now = outcomes(md, source)
    except SignalError as error:
        log.warning("outcomes of %s/%s unreadable: %s", md.metadata.namespace, md.metadata.name, error)
        return False
    if now == ((body.get("status") or {}).get("outcomes") or []):
        return False
    patch = {"status": {"outcomes": now}}
    kube.patch(MODELDEPLOYMENT, md.metadata.namespace, md.metadata.name, patch, subresource="status")
    return True
