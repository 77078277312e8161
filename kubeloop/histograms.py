"""Histogram bounds that the model server and the drift sidecar share, so their series compare bucket by bucket."""

from __future__ import annotations

import math

import numpy as np


def value_buckets(mean: float | None, std: float | None) -> tuple[float, ...]:
    """Bucket bounds for a regression model's predicted values: multiples of a round step (1, 2, 2.5 or 5 times a
    power of ten, the first at least half the training label's std) from its mean - 3 std to mean + 3 std.

    Bounds on a grid of round multiples coincide for two versions trained on similar data, so their histograms
    compare bucket by bucket (the canary analysis's KS distance). A non-negative mean gets no bounds below 0, as in
    `feature_buckets`.
    """
    if mean is None or std is None or not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        return (0.0,)
    exponent = math.floor(math.log10(std / 2))
    step = next(m * 10.0**exponent for m in (1, 2, 2.5, 5, 10) if m * 10.0**exponent >= std / 2)
    low, high = math.floor((mean - 3 * std) / step), math.ceil((mean + 3 * std) / step)
    bounds = {round(k * step, 1 - exponent) + 0.0 for k in range(low, high + 1)}  # + 0.0: no -0.0
    if mean >= 0:
        bounds = {max(bound, 0.0) for bound in bounds}
    return tuple(sorted(bounds))
