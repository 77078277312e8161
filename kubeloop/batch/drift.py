"""A batch's drift against its model's training data, from counts, so a batch of any size costs the same memory.

Each feature's values are counted into bins fixed from the training snapshot: a string feature's categories, a
numeric feature's histogram bins as the data layer draws them (kubeloop.data.validation: the distinct training
values when few, else the training deciles, plus a bin below the min and one above the max). The scoring actors
count their rows; the driver adds the counts up and tests each feature with a chi-square test of homogeneity
(training counts against batch counts), then ONE Bonferroni correction across the features.

With a million rows any difference is significant, so a feature moved when its corrected p-value is below
``ALPHA`` AND its distance to the training data is above the data layer's threshold for that kind of column (the
L-infinity distance of category shares above 0.1, the Jensen-Shannon distance of the histograms above 0.2): the
batch is in Drift when some feature moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency

from kubeloop.api.batchprediction import BatchDrift
from kubeloop.api.modelversion import Feature
from kubeloop.data.snapshot import Snapshot, read_frame
from kubeloop.data.validation import DEFAULT_THRESHOLDS, _bin_edges

ALPHA = 0.05  # family-wise level after the correction across features


@dataclass(frozen=True)
class Bins:
    """One feature's bins: ``edges`` of a numeric feature (counts have len(edges) + 1 entries), or the
    ``categories`` of a string or bool one (one count each)."""

    feature: str
    edges: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None

    def count(self, values: np.ndarray) -> np.ndarray:
        """Counts of the non-null values (NaN or None) per bin; values outside the categories are not counted."""
        if self.categories is not None:
            codes = pd.Index(self.categories).get_indexer(values)
            return np.bincount(codes[codes >= 0], minlength=len(self.categories))
        numbers = np.asarray(values, dtype=np.float64)
        numbers = numbers[~np.isnan(numbers)]
        return np.bincount(np.searchsorted(self.edges, numbers, side="right"), minlength=len(self.edges) + 1)


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    p_value: float
    corrected_p_value: float
    metric: str  # linf | jensen_shannon
    distance: float
    threshold: float

    @property
    def moved(self) -> bool:
        return self.corrected_p_value < ALPHA and self.distance > self.threshold


@dataclass(frozen=True)
class Reference:
    bins: list[Bins]
    counts: dict[str, np.ndarray]
    digest: str


def reference(snapshot: Snapshot, features: Sequence[Feature]) -> Reference:
    """The features' bins and training counts from the snapshot the version was trained on."""
    frame = read_frame(snapshot, columns=[f.name for f in features])
    bins, counts = [], {}
    for feature in features:
        series = frame[feature.name]
        if feature.dtype == "string" or feature.dtype == "bool":
            present = series.dropna().astype(str)
            bin_ = Bins(feature.name, categories=tuple(feature.categories or sorted(present.unique())))
            counts[feature.name] = bin_.count(present.to_numpy(dtype=object))
        else:
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            values = values[~np.isnan(values)]
            if not len(values):
                continue  # no training values to compare with
            bin_ = Bins(feature.name, edges=tuple(float(edge) for edge in _bin_edges(values)))
            counts[feature.name] = bin_.count(values)
        bins.append(bin_)
    return Reference(bins, counts, snapshot.digest)


def bool_text(values: np.ndarray) -> np.ndarray:
    """A bool feature's 0/1/NaN values as the snapshot's category names ('True', 'False', None)."""
    return np.where(np.isnan(values), None, np.where(values == 1.0, "True", "False")).astype(object)


def judge(ref: Reference, counts: Mapping[str, np.ndarray]) -> tuple[BatchDrift, list[FeatureDrift]]:
    tested = []
    for bins in ref.bins:
        before, after = ref.counts[bins.feature], counts.get(bins.feature)
        if after is None or not after.sum() or not before.sum():
            continue
        table = np.vstack([before, after])
        table = table[:, table.sum(axis=0) > 0]
        p_value = 1.0 if table.shape[1] < 2 else float(chi2_contingency(table, correction=False).pvalue)
        p, q = before / before.sum(), after / after.sum()
        if bins.categories is not None:
            metric, distance = "linf", float(np.abs(q - p).max())
        else:
            metric, distance = "jensen_shannon", float(np.nan_to_num(jensenshannon(p, q, base=2)))
        tested.append((bins.feature, p_value, metric, distance))
    features = [
        FeatureDrift(name, p, min(1.0, p * len(tested)), metric, distance, DEFAULT_THRESHOLDS[metric])
        for name, p, metric, distance in tested
    ]
    moved = [f.feature for f in features if f.moved]
    smallest = min((f.corrected_p_value for f in features), default=None)
    return BatchDrift(state="Drift" if moved else "NoDrift", p_value=smallest, features=moved), features
