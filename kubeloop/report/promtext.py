"""Reading Prometheus' text exposition format (what every kubeloop process serves on /metrics), stdlib only.

Enough for kubeloop's own views (`kubeloop status`, the report's drift section): samples with their labels,
sums over label subsets, and quantiles from cumulative histogram buckets the way PromQL's histogram_quantile
computes them.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeloop.errors import KubeloopError

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """The samples of an exposition (comments and blank lines skipped); ValueError on a malformed line."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"line {number}: not a Prometheus sample: {line[:120]!r}")
        name, raw_labels, value = match.groups()
        labels: dict[str, str] = {}
        if raw_labels:
            body, position = raw_labels[1:-1], 0
            while position < len(body):
                label = _LABEL.match(body, position)
                if label is None:
                    raise ValueError(f"line {number}: malformed labels {raw_labels[:120]!r}")
                labels[label.group(1)] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], label.group(2))
                position = label.end()
        samples.append(Sample(name, labels, float(value)))
    return samples


def names(samples: Iterable[Sample]) -> set[str]:
    return {sample.name for sample in samples}


def select(samples: Iterable[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in select(samples, name, **labels))


def buckets(samples: Iterable[Sample], name: str, **labels: str) -> dict[float, float]:
    """Cumulative counts of histogram `name` (its _bucket series) by upper bound, summed over other labels."""
    out: dict[float, float] = {}
    for sample in select(samples, f"{name}_bucket", **labels):
        bound = float(sample.labels["le"])
        out[bound] = out.get(bound, 0.0) + sample.value
    return dict(sorted(out.items()))


def subtract(after: Mapping[float, float], before: Mapping[float, float]) -> dict[float, float]:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """PromQL's histogram_quantile: linear interpolation inside the bucket; None without observations.

    Like Prometheus, a quantile falling in the +Inf bucket is the highest finite bound.
    """
    bounds = sorted(cumulative)
    if not bounds or not math.isinf(bounds[-1]) or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def get(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the URLs kubeloop recorded or was given
            return response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as error:
        raise KubeloopError(f"GET {url}: {getattr(error, 'reason', error)}") from error


def scrape(base_url: str, timeout: float = 5.0) -> list[Sample]:
    return parse(get(f"{base_url.rstrip('/')}/metrics", timeout))


def get_json(url: str, timeout: float = 5.0) -> Any:
    return json.loads(get(url, timeout))
