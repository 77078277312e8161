"""What kubeloop's own views (`kubeloop status`, the report's drift section) read from a process's /metrics, on top
of prometheus_client's parser: the samples, sums over label subsets and a histogram's cumulative buckets (their
quantile: `kubeloop.analysis.signals.histogram_quantile`, the one PromQL's histogram_quantile semantics).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kubeloop.analysis.signals import Buckets
from kubeloop.errors import KubeloopError


def parse(text: str) -> list[Sample]:
    """The samples of a text exposition, every family's in order; ValueError when it is not that format."""
    try:
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    except ValueError as error:
        raise ValueError(f"not the Prometheus text format: {error}") from error


def select(samples: Iterable[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in select(samples, name, **labels))


def buckets(samples: Iterable[Sample], name: str, **labels: str) -> Buckets:
    """Cumulative counts of histogram `name` (its _bucket series) by upper bound, summed over other labels."""
    out: dict[float, float] = {}
    for sample in select(samples, f"{name}_bucket", **labels):
        bound = float(sample.labels["le"])
        out[bound] = out.get(bound, 0.0) + sample.value
    return sorted(out.items())


def subtract(after: Buckets, before: Buckets) -> Buckets:
    """The observations between two reads of the same histogram."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def get(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the URLs kubeloop recorded or was given
            return response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as error:
        raise KubeloopError(f"GET {url}: {getattr(error, 'reason', error)}") from error


def scrape(base_url: str, timeout: float = 5.0) -> list[Sample]:
    url = f"{base_url.rstrip('/')}/metrics"
    try:
        return parse(get(url, timeout))
    except ValueError as error:
        raise KubeloopError(f"GET {url}: {error}") from error


def get_json(url: str, timeout: float = 5.0) -> Any:
    return json.loads(get(url, timeout))
