"""The model report: one self-contained HTML file (a model card) per ModelVersion, plots embedded as PNG data URIs.

`card_data.gather` collects what the card shows; the Jinja2 templates in kubeloop/report/templates/ (autoescaped:
names, classes, reasons and slice values come from data and are written as text) lay it out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import jinja2

import kubeloop
from kubeloop import config
from kubeloop.api.modelversion import ModelVersion
from kubeloop.log import event
from kubeloop.registry import Registry
from kubeloop.report.card_data import gather

log = logging.getLogger(__name__)

DASH = "\u2013"  # an en dash: "no value"
SECTIONS = (
    ("summary", "Summary"),
    ("data", "Data"),
    ("training", "Training"),
    ("evaluation", "Evaluation"),
    ("slices", "Slices and fairness"),
    ("gate", "Gate"),
    ("comparison", "Against Production"),
    ("history", "Stage history"),
    ("rollout", "Rollout"),
    ("drift", "Drift"),
)


def default_path(record: ModelVersion) -> Path:
    return config.home() / "reports" / f"{record.spec.model}-v{record.spec.version}.html"


def number(value: float | int | None, digits: int = 3) -> str:
    """A count with thousands separators, a float to `digits` decimals, a missing or non-finite value as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 3) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def utc(time: datetime) -> str:
    return time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@cache
def environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("kubeloop.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,  # the card ends in a newline; the section templates end in a block tag
    )
    environment.filters.update(num=number, signed=signed, fmt=format, json=json.dumps, utc=utc)
    environment.globals["DASH"] = DASH
    return environment


def render(record: ModelVersion, registry: Registry, sidecar: str | None = None) -> str:
    """The report's HTML (one string, no external resources)."""
    card = gather(record, registry, sidecar)
    template = environment().get_template("card.html.j2")
    return template.render(card=card, sections=SECTIONS, kubeloop_version=kubeloop.__version__)


def write_report(
    record: ModelVersion, registry: Registry | None = None, out: Path | None = None, *, sidecar: str | None = None
) -> Path:
    """Write the model card of `record` (default $KUBELOOP_HOME/reports/<model>-v<N>.html) and return its path.

    `sidecar`: the base URL of a running deployment's drift sidecar (adds its live drift state).
    """
    registry = registry or Registry()
    path = Path(out) if out is not None else default_path(record)
    document = render(record, registry, sidecar)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as stream:
        stream.write(document)
    os.chmod(stream.name, 0o644)  # a report is for reading (NamedTemporaryFile creates 0600)
    os.replace(stream.name, path)
    event(log, "report.written", model_version=record.metadata.name, path=str(path), bytes=len(document))
    return path
