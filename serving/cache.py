"""The optional prediction cache: static (precomputed for a declared key set), dynamic (LRU, computed on demand for
the long tail) or hybrid (both). A key is one row's validated feature values in signature order; its value is
the model's answer for the row: a number, or (multiclass) the list of its class probabilities."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

CacheMode = Literal["off", "static", "dynamic", "hybrid"]
MODES: tuple[str, ...] = ("off", "static", "dynamic", "hybrid")
Output = float | list[float]


def row_keys(columns: dict[str, np.ndarray], names: list[str]) -> list[tuple[Hashable, ...]]:
    """One hashable key per row; NaN becomes None so that null rows compare equal."""
    lists = []
    for name in names:
        values = columns[name].tolist()
        if columns[name].dtype.kind == "f":
            values = [None if v != v else v for v in values]
        lists.append(values)
    return list(zip(*lists, strict=True))


class PredictionCache:
    def __init__(self, mode: CacheMode, size: int = 10_000):
        if mode not in MODES or mode == "off":
            raise ValueError(f"cache mode must be one of static, dynamic, hybrid; got {mode!r}")
        self.mode = mode
        self.size = size
        self.static: dict[Hashable, Output] = {}
        self.dynamic: OrderedDict[Hashable, Output] = OrderedDict()
        self.hits = {"static": 0, "dynamic": 0}
        self.misses = 0

    @property
    def uses_dynamic(self) -> bool:
        return self.mode in ("dynamic", "hybrid")

    def preload(self, keys: list[tuple[Hashable, ...]], outputs: np.ndarray) -> None:
        self.static.update(zip(keys, outputs.tolist(), strict=True))

    def lookup(self, keys: list[tuple[Hashable, ...]]) -> tuple[list[Output | None], list[int]]:
        """Cached values (None where missing) and the indices of the misses."""
        found: list[Output | None] = []
        misses: list[int] = []
        static, dynamic = self.static, self.dynamic
        for i, key in enumerate(keys):
            value = static.get(key)
            if value is not None:
                self.hits["static"] += 1
            elif self.uses_dynamic and (value := dynamic.get(key)) is not None:
                dynamic.move_to_end(key)
                self.hits["dynamic"] += 1
            else:
                misses.append(i)
            found.append(value)
        self.misses += len(misses)
        return found, misses

    def store(self, keys: list[tuple[Hashable, ...]], outputs: list[Output]) -> None:
        if not self.uses_dynamic or self.size <= 0:
            return
        dynamic = self.dynamic
        for key, value in zip(keys, outputs, strict=True):
            if key in self.static:
                continue
            dynamic[key] = value
            dynamic.move_to_end(key)
        while len(dynamic) > self.size:
            dynamic.popitem(last=False)


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a cache key file: JSON lines of {feature: value} objects, a JSON list of them, or a CSV with a header."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        for record in frame.to_dict("records"):
            yield {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from json.loads(text)
        return
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)
