"""The train/test split of a snapshot: stratified, and seeded so that lineage (digest + seed) reproduces it.

Rows are grouped twice. The outer groups are the label's classes (binary, multiclass) or the label's quantile bins
(regression, REGRESSION_BINS at most, about two expected test rows per bin or more): each gets its share of the test
rows, so class rates (or the label's distribution) in test and train match the whole data's. Within each outer
group, when spec.dataset.sliceColumn is set, the group's test rows are shared out over the slice values in
proportion: the class totals are fixed first, so stratifying by slice costs the label stratification nothing. A
slice value of at least 2 rows that this leaves without a test row takes one from a larger slice of the same class
(or, when none can spare one, the test set takes one row more), so every slice is evaluated.

Shares are rounded by largest remainder, so the test set is round(rows * testFraction) rows except where the
per-class minimums below need more: a class of at least 2 rows gets MIN_TEST_ROWS_PER_CLASS test rows, and keeps
MIN_TRAIN_ROWS_PER_CLASS training rows when it has MIN_ROWS_PER_CLASS rows or more (preflight refuses fewer).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kubeloop.api.modelversion import Task

MIN_TEST_ROWS_PER_CLASS = 1
MIN_TRAIN_ROWS_PER_CLASS = 2
MIN_ROWS_PER_CLASS = MIN_TEST_ROWS_PER_CLASS + MIN_TRAIN_ROWS_PER_CLASS
REGRESSION_BINS = 10


def held_out_rows(rows: int, test_fraction: float) -> int:
    """round(rows * test_fraction), leaving at least one row on each side when there are two or more."""
    return max(0, min(max(1, round(rows * test_fraction)), rows - 1))


def split_rows(
    frame: pd.DataFrame,
    *,
    task: Task,
    label: str,
    slice_column: str | None,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) row positions of frame (for ``frame.iloc``), each sorted.

    The same frame, task, label, slice column, fraction and seed always give the same split.
    """
    rows = len(frame)
    outer = _label_groups(frame[label], task, held_out_rows(rows, test_fraction))
    inner = _codes(frame[slice_column]) if slice_column else np.zeros(rows, dtype=np.int64)
    # a random rank per row: each stratum sends its lowest-ranked rows to test
    rank = np.empty(rows, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(rows)] = np.arange(rows)

    sizes = np.zeros((outer.max(initial=-1) + 1, inner.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(sizes, (outer, inner), 1)
    taken = _test_counts(sizes, held_out_rows(rows, test_fraction))

    in_test = np.zeros(rows, dtype=bool)
    order = np.lexsort((rank, inner, outer))
    starts = np.concatenate(([0], np.cumsum(sizes.ravel())))
    for stratum, count in enumerate(taken.ravel()):
        in_test[order[starts[stratum] : starts[stratum] + count]] = True
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def _codes(series: pd.Series) -> np.ndarray:
    """A group number per row, nulls a group of their own."""
    return pd.factorize(series.astype(object).map(str, na_action="ignore"), use_na_sentinel=False, sort=True)[0]


def _label_groups(series: pd.Series, task: Task, test_rows: int) -> np.ndarray:
    if task != "regression":
        return _codes(series)
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    bins = max(1, min(REGRESSION_BINS, test_rows // 2))
    # ranks, not values, so that ties and skew still give bins of equal size; nulls get a bin of their own
    ranked = values.rank(method="first").to_numpy()
    present = ~np.isnan(ranked)
    groups = np.full(len(values), bins, dtype=np.int64)
    groups[present] = ((ranked[present] - 1) * bins // max(1, present.sum())).astype(np.int64)
    return groups


def _test_counts(sizes: np.ndarray, total: int) -> np.ndarray:
    """Test rows per stratum (outer group, slice value): outer totals first, then shared over the slices."""
    per_group = sizes.sum(axis=1)
    low = np.minimum(MIN_TEST_ROWS_PER_CLASS, np.maximum(per_group - 1, 0))
    high = per_group - np.minimum(MIN_TRAIN_ROWS_PER_CLASS, per_group - low)
    group_counts = _allocate(per_group, total, low, high)
    counts = np.stack(
        [_allocate(row, count, np.zeros_like(row), row) for row, count in zip(sizes, group_counts, strict=True)]
    )
    _cover_small_slices(sizes, counts, high)
    return counts


def _allocate(sizes: np.ndarray, total: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Integers within [low, high], summing to total where the bounds allow, each as close to its share of total
    (in proportion to sizes) as they allow: largest remainder, ties to the first."""
    if sizes.sum() == 0:
        return np.zeros_like(sizes)
    quota = sizes * total / sizes.sum()
    counts = np.clip(np.floor(quota).astype(np.int64), low, high)
    while counts.sum() < total and (room := counts < high).any():
        counts[np.argmax(np.where(room, quota - counts, -np.inf))] += 1
    while counts.sum() > total and (spare := counts > low).any():
        counts[np.argmin(np.where(spare, quota - counts, np.inf))] -= 1
    return counts


def _cover_small_slices(sizes: np.ndarray, counts: np.ndarray, high: np.ndarray) -> None:
    """Give each slice value of at least 2 rows a test row: moved from another slice of the same outer group (one
    that keeps a test row of its own), so the outer totals stay; else one more test row, from a group that can
    spare a training row."""
    for value in np.flatnonzero((sizes.sum(axis=0) >= 2) & (counts.sum(axis=0) == 0)):
        slice_tests = counts.sum(axis=0)
        holders = [group for group in np.argsort(-sizes[:, value], kind="stable") if sizes[group, value]]
        for group in holders:
            donors = (counts[group] > 0) & (slice_tests >= 2)
            if donors.any():
                donor = np.argmax(np.where(donors, counts[group] / np.maximum(sizes[group], 1), -np.inf))
                counts[group, donor] -= 1
                counts[group, value] += 1
                break
        else:
            spare = next((group for group in holders if counts[group].sum() < high[group]), None)
            if spare is not None:
                counts[spare, value] += 1
