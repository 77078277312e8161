"""Synthetic serving traffic for tests, benchmarks and demos: rows drawn from a table, shifts, and the
CloudEvents KServe's logger would send for them (binary mode, header casing as Go writes it or lower-case)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from kubeloop.api.modelversion import Feature
from monitoring.events import REQUEST_TYPE, RESPONSE_TYPE


def in_distribution(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows drawn with replacement: the traffic the model was trained for."""
    return frame.iloc[rng.integers(0, len(frame), size=n)].reset_index(drop=True)


def invert_mix(frame: pd.DataFrame, column: str, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows whose ``column`` category shares are reversed (most frequent gets the least share, ...)."""
    shares = frame[column].value_counts(normalize=True)
    reversed_shares = dict(zip(shares.index, shares.to_numpy()[::-1], strict=True))
    counts = rng.multinomial(n, [reversed_shares[c] for c in shares.index])
    parts = [
        in_distribution(frame[frame[column] == category], int(k), rng)
        for category, k in zip(shares.index, counts, strict=True)
        if k
    ]
    return pd.concat(parts).sample(frac=1.0, random_state=rng).reset_index(drop=True)


def shift_age_colour(frame: pd.DataFrame, n: int, rng: np.random.Generator, years: int = 15) -> pd.DataFrame:
    """The quickstart's realistic shift: arrestees ``years`` older and the colour mix inverted."""
    rows = invert_mix(frame, "colour", n, rng)
    rows["age"] = (rows["age"] + years).clip(upper=100)
    return rows


def shift_mean(frame: pd.DataFrame, n: int, rng: np.random.Generator, column: str, by: float) -> pd.DataFrame:
    """One numeric feature moved by ``by`` (in its own units), the rest untouched."""
    rows = in_distribution(frame, n, rng)
    rows[column] = rows[column] + type(rows[column].dropna().iloc[0])(by)
    return rows


def records(frame: pd.DataFrame, features: Sequence[str]) -> list[dict[str, Any]]:
    """JSON-ready rows (Python int/float/str/bool, null for missing values)."""
    return json.loads(frame[list(features)].to_json(orient="records"))


V2_TYPES = {"float": "FP32", "int": "INT64", "bool": "BOOL", "string": "BYTES"}


def v1_request(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps({"instances": rows}).encode()


def v2_request(rows: list[dict[str, Any]], signature: Sequence[Feature]) -> bytes:
    inputs = [
        {"name": f.name, "shape": [len(rows)], "datatype": V2_TYPES[f.dtype], "data": [r.get(f.name) for r in rows]}
        for f in signature
    ]
    return json.dumps({"inputs": inputs}).encode()


def v1_response(scores: Sequence[float]) -> bytes:
    return json.dumps({"predictions": list(scores)}).encode()


def v2_response(scores: Sequence[float]) -> bytes:
    return json.dumps(
        {"outputs": [{"name": "probability", "shape": [len(scores)], "datatype": "FP32", "data": list(scores)}]}
    ).encode()


def event_headers(
    kind: Literal["request", "response"],
    event_id: str,
    *,
    version: int | None = None,
    endpoint: str = "default",
    service: str = "arrests",
    casing: Literal["go", "lower"] = "go",
) -> dict[str, str]:
    """The headers KServe's logger sends (Go's canonical ``Ce-Id`` casing, or all lower-case)."""
    headers = {
        "Content-Type": "application/json",
        "Ce-Specversion": "1.0",
        "Ce-Type": REQUEST_TYPE if kind == "request" else RESPONSE_TYPE,
        "Ce-Id": event_id,
        "Ce-Source": f"http://localhost:9081/{service}",
        "Ce-Time": "2026-11-23T10:00:00Z",
        "Ce-Inferenceservicename": service,
        "Ce-Namespace": "default",
        "Ce-Component": "predictor",
        "Ce-Endpoint": endpoint,
        "Ce-Metadata": "{}",
    }
    if version is not None:
        headers["Ce-Modelversion"] = str(version)
    return {k.lower(): v for k, v in headers.items()} if casing == "lower" else headers
