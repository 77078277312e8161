"""Structured logs: `event name key=value ...` lines, one logger per module."""

from __future__ import annotations

import logging
import sys
from typing import Any


def setup(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("kubeloop")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def event(logger: logging.Logger, name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, " ".join([name, *(f"{key}={_format(value)}" for key, value in fields.items())]))
