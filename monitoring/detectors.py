"""Drift tests on serving windows against a reference sample of the training snapshot, and training/serving skew.

``ks`` (the default): feature-wise two-sample tests with alibi-detect, Kolmogorov-Smirnov (``KSDrift``) for numeric
features and Chi-square (``ChiSquareDrift``) for categorical ones (null and never-seen values are categories of
their own), then ONE multiple-testing correction across all features together: Bonferroni by default (a window is
flagged when some feature's p-value is below ``alpha / K``, K = features tested), Benjamini-Hochberg FDR as an
option. ``mmd``: alibi-detect ``MMDDrift`` (pytorch backend, permutation test) on the numeric features
standardized by the reference plus one-hot categories.

The ``ks`` tests run on one of two backends with the same decisions (tests/unit/test_drift_backends.py compares
them window by window): ``alibi`` (alibi-detect, Business Source License 1.1: not free for production use without
Seldon's terms) or ``scipy`` (BSD-3-Clause). ``mmd`` exists on alibi only.

A flagged window is not yet an alarm. Against one fixed reference, feature-wise tests flag in-distribution windows
more often than their nominal level (the reference's own sampling error is shared by every window), so the
decision rule is: the model version is in Drift when the corrected test flagged at least ``k`` of the last ``m``
windows (2 of 3 by default). With a reference >= 5x the window, the declared rates below hold; both are tested
(tests/unit/drift/test_drift_detector.py, tests/integration/test_monitoring_sidecar.py) and measured
(bench/drift_calibration.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from scipy import stats

from kubeloop.data.snapshot import ColumnStats, Snapshot, read_frame
from kubeloop.log import event
from monitoring.schema import FeatureSpec, Schema

log = logging.getLogger(__name__)

Correction = Literal["bonferroni", "fdr"]
Backend = Literal["alibi", "scipy"]
State = Literal["Unknown", "NoDrift", "Drift"]

# ---- the decision rule and what it promises (declared, tested, measured) ---------------------------------------
DEFAULT_ALPHA = 0.05  # family-wise level of one window's test, after the correction across features
DEFAULT_CORRECTION: Correction = "bonferroni"
DEFAULT_BACKEND: Backend = "alibi"
ALARM_K = 2  # Drift when >= ALARM_K ...
ALARM_M = 3  # ... of the last ALARM_M evaluated windows were flagged
# In-distribution traffic: at most this share of evaluated windows may end in state Drift (1 of 20 windows).
DECLARED_FALSE_POSITIVE_RATE = 0.05
# A realistic shift (age +15 years with the colour mix inverted, or a >= 1 standard deviation mean shift of one
# numeric feature) is in state Drift by the DECLARED_DETECTION_WINDOWS-th window counted from the one in which
# the shift begins (that one may be only partly shifted). With k=2 of m=3 the earliest possible alarm is window 2.
DECLARED_DETECTION_WINDOWS = 3
# The declared rates assume the reference is this many times the window or more (warned about otherwise).
MIN_REFERENCE_PER_WINDOW = 5
MMD_REFERENCE_CAP = 1000  # MMD's permutation test is O((reference + window)^2): ~1 s per window at 1,000
MMD_PERMUTATIONS = 100


def _alibi() -> Any:
    """alibi_detect.cd, imported once per process (~5 s: it imports torch, transformers, sklearn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import alibi_detect.cd as cd
    return cd


# ---- reference ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """An encoded sample of the training snapshot, plus the snapshot's recorded statistics for skew."""

    schema: Schema
    columns: list[np.ndarray]
    stats: Mapping[str, ColumnStats]
    snapshot_rows: int
    digest: str = ""

    @property
    def size(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    @classmethod
    def from_frame(
        cls,
        schema: Schema,
        frame: pd.DataFrame,
        size: int,
        seed: int = 0,
        stats: Mapping[str, ColumnStats] | None = None,
        digest: str = "",
    ) -> Reference:
        """A seeded sample of ``size`` rows (all of them when the frame is smaller); stats default to the frame's."""
        frame = frame[schema.names]
        sample = frame.sample(n=size, random_state=seed) if len(frame) > size else frame
        if stats is None:
            from kubeloop.data.snapshot import column_stats

            stats = {name: column_stats(frame[name]) for name in schema.names}
        return cls(schema, schema.encode_frame(sample), stats, len(frame), digest)

    @classmethod
    def from_snapshot(cls, schema: Schema, snapshot: Snapshot, size: int, seed: int = 0) -> Reference:
        missing = [name for name in schema.names if name not in snapshot.columns]
        if missing:
            raise ValueError(f"snapshot {snapshot.digest} has no columns {missing} of the model's signature")
        frame = read_frame(snapshot, columns=schema.names)
        return cls.from_frame(schema, frame, size, seed, snapshot.stats, snapshot.digest)


# ---- results -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureTest:
    test: str  # ks | chi2 | mmd
    p_value: float
    distance: float
    adjusted_p_value: float  # after the correction across features (Bonferroni: min(1, p * K))
    # how far the feature moved, on one 0..1 scale for both tests: KS D, or Cramer's V of the reference/window
    # contingency table (sqrt(chi2 / rows of both)); None for mmd
    effect: float | None = None


@dataclass(frozen=True)
class WindowResult:
    detector: str
    rows: int
    features: dict[str, FeatureTest]  # the mmd detector reports one entry, "all"
    alpha: float
    correction: str
    threshold: float  # the largest raw p-value that flags (Bonferroni alpha / K; FDR the BH cut-off)
    flagged: bool
    seconds: float

    @property
    def min_p_value(self) -> float | None:
        return min((t.p_value for t in self.features.values()), default=None)

    def drifted_features(self) -> list[str]:
        return [name for name, t in self.features.items() if t.adjusted_p_value < self.alpha]

    def shares(self) -> dict[str, float]:
        """Each drifted feature's share of the shift: its effect over the sum of the drifted features' effects."""
        effects = {name: self.features[name].effect or 0.0 for name in self.drifted_features()}
        total = sum(effects.values())
        return {name: effect / total for name, effect in effects.items()} if total > 0 else {}


def correct(p_values: Sequence[float], alpha: float, method: Correction) -> tuple[list[float], bool, float]:
    """Adjusted p-values, whether any is significant at ``alpha``, and the raw-p threshold that applied."""
    k = len(p_values)
    if k == 0:
        return [], False, 0.0
    if method == "bonferroni":
        adjusted = [min(1.0, p * k) for p in p_values]
        return adjusted, any(a < alpha for a in adjusted), alpha / k
    if method != "fdr":
        raise ValueError(f"correction must be bonferroni or fdr, not {method!r}")
    adjusted = [float(a) for a in stats.false_discovery_control(p_values, method="bh")]
    order = sorted(range(k), key=lambda i: p_values[i])
    passing = [rank for rank in range(1, k + 1) if p_values[order[rank - 1]] <= alpha * rank / k]
    threshold = alpha * max(passing) / k if passing else alpha / k
    return adjusted, bool(passing), threshold


class Detector(Protocol):
    name: str

    def test(self, columns: Sequence[np.ndarray]) -> WindowResult: ...


class _AlibiTests:
    """The feature-wise tests through alibi-detect's KSDrift and ChiSquareDrift (BSL-1.1)."""

    def __init__(self, numeric: Mapping[int, np.ndarray], categorical: np.ndarray | None, alpha: float):
        cd = _alibi()
        # one 1-D detector per numeric feature, so nulls (NaN) drop out feature by feature
        self._ks = {i: cd.KSDrift(values.reshape(-1, 1), p_val=alpha) for i, values in numeric.items()}
        # categories per feature inferred from the reference codes; a window's unseen codes join at test time
        self._chi2 = cd.ChiSquareDrift(categorical, p_val=alpha) if categorical is not None else None
        self._lock = threading.Lock()  # alibi detectors keep state (counters): one test at a time

    def ks(self, i: int, values: np.ndarray) -> tuple[float, float]:
        with self._lock:
            p, d = self._ks[i].score(values.reshape(-1, 1))
        return float(p[0]), float(d[0])

    def chi2(self, window: np.ndarray) -> list[tuple[float, float]]:
        assert self._chi2 is not None
        with self._lock:
            p, d = self._chi2.score(window)
        return [(float(p[j]), float(d[j])) for j in range(window.shape[1])]


class _ScipyTests:
    """The same tests on scipy (BSD-3-Clause): the asymptotic two-sample KS, and Chi-square on the contingency
    table of reference and window counts over the union of their categories, as alibi-detect computes them."""

    def __init__(self, numeric: Mapping[int, np.ndarray], categorical: np.ndarray | None, alpha: float):
        self._numeric = dict(numeric)
        self._categorical = categorical

    def ks(self, i: int, values: np.ndarray) -> tuple[float, float]:
        result = stats.ks_2samp(self._numeric[i], values, method="asymp")
        return float(result.pvalue), float(result.statistic)

    def chi2(self, window: np.ndarray) -> list[tuple[float, float]]:
        assert self._categorical is not None
        scores = []
        for j in range(window.shape[1]):
            reference = self._categorical[:, j]
            categories = np.union1d(np.unique(reference), np.unique(window[:, j]))
            table = np.vstack([_counts(reference, categories), _counts(window[:, j], categories)])
            result = stats.chi2_contingency(table)
            scores.append((float(result.pvalue), float(result.statistic)))
        return scores


def _counts(codes: np.ndarray, categories: np.ndarray) -> np.ndarray:
    return (codes[:, None] == categories[None, :]).sum(axis=0)


BACKENDS: dict[str, type[_AlibiTests] | type[_ScipyTests]] = {"alibi": _AlibiTests, "scipy": _ScipyTests}


class FeatureWiseDrift:
    """KS (numeric) + Chi-square (categorical) per feature, one correction across all features; the tests run on
    alibi-detect or on scipy (``backend``), with the same decisions."""

    name = "ks"

    def __init__(
        self,
        reference: Reference,
        alpha: float = DEFAULT_ALPHA,
        correction: Correction = "bonferroni",
        backend: Backend = DEFAULT_BACKEND,
    ):
        if correction not in ("bonferroni", "fdr"):
            raise ValueError(f"correction must be bonferroni or fdr, not {correction!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {backend!r}")
        self.schema = reference.schema
        self.alpha = alpha
        self.correction = correction
        self.backend = backend
        numeric: dict[int, np.ndarray] = {}
        for i in self.schema.numeric():
            values = reference.columns[i]
            values = values[~np.isnan(values)]
            if len(values) == 0:
                name = self.schema.features[i].name
                event(log, "feature_untested", logging.WARNING, feature=name, reason="no non-null reference values")
                continue
            numeric[i] = values
        self._categorical = self.schema.categorical()
        x_ref = np.stack([reference.columns[i] for i in self._categorical], axis=1) if self._categorical else None
        self._tests = BACKENDS[backend](numeric, x_ref, alpha)
        self._reference_rows = reference.size
        self._numeric = list(numeric)

    def test(self, columns: Sequence[np.ndarray]) -> WindowResult:
        start = time.perf_counter()
        names: list[str] = []
        tests: list[str] = []
        scores: list[tuple[float, float]] = []
        for i in self._numeric:
            values = np.asarray(columns[i], dtype=np.float64)
            values = values[~np.isnan(values)]
            if len(values) == 0:
                continue
            names.append(self.schema.features[i].name)
            tests.append("ks")
            scores.append(self._tests.ks(i, values))
        if self._categorical:
            x = np.stack([np.asarray(columns[i], dtype=np.int64) for i in self._categorical], axis=1)
            names += [self.schema.features[i].name for i in self._categorical]
            tests += ["chi2"] * len(self._categorical)
            scores += self._tests.chi2(x)
        p_values = [p for p, _ in scores]
        adjusted, flagged, threshold = correct(p_values, self.alpha, self.correction)
        rows = len(columns[0]) if columns else 0
        features = {
            name: FeatureTest(test, p, d, a, d if test == "ks" else math.sqrt(d / (self._reference_rows + rows)))
            for name, test, (p, d), a in zip(names, tests, scores, adjusted, strict=True)
        }
        elapsed = time.perf_counter() - start
        return WindowResult("ks", rows, features, self.alpha, self.correction, threshold, flagged, elapsed)


class MMDDetector:
    """alibi-detect MMDDrift (pytorch, permutation test) on standardized numeric + one-hot categorical features."""

    name = "mmd"

    def __init__(
        self,
        reference: Reference,
        alpha: float = DEFAULT_ALPHA,
        n_permutations: int = MMD_PERMUTATIONS,
        reference_cap: int = MMD_REFERENCE_CAP,
        seed: int = 0,
    ) -> None:
        cd = _alibi()
        self.schema = reference.schema
        self.alpha = alpha
        self._mean: dict[int, float] = {}
        self._std: dict[int, float] = {}
        for i in self.schema.numeric():
            values = reference.columns[i]
            finite = values[~np.isnan(values)]
            self._mean[i] = float(finite.mean()) if len(finite) else 0.0
            std = float(finite.std()) if len(finite) else 0.0
            self._std[i] = std if std > 0 else 1.0
        x_ref = self.encode(reference.columns)
        if len(x_ref) > reference_cap:
            rng = np.random.default_rng(seed)
            x_ref = x_ref[rng.choice(len(x_ref), size=reference_cap, replace=False)]
        self.reference_rows = len(x_ref)
        self._mmd = cd.MMDDrift(x_ref, backend="pytorch", p_val=alpha, n_permutations=n_permutations, device="cpu")
        self._lock = threading.Lock()

    def encode(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        parts: list[np.ndarray] = []
        for i, spec in enumerate(self.schema.features):
            column = np.asarray(columns[i])
            if spec.kind == "numeric":
                scaled = (column.astype(np.float64) - self._mean[i]) / self._std[i]
                parts.append(np.nan_to_num(scaled, nan=0.0)[:, None])  # a null sits at the reference mean
            else:
                width = len(spec.categories) + 2
                parts.append(np.eye(width, dtype=np.float64)[column.astype(np.int64)])
        return np.concatenate(parts, axis=1).astype(np.float32)

    def test(self, columns: Sequence[np.ndarray]) -> WindowResult:
        start = time.perf_counter()
        with self._lock:
            result = self._mmd.predict(self.encode(columns))["data"]
        p, d = float(result["p_val"]), float(result["distance"])
        rows = len(columns[0]) if columns else 0
        feature = FeatureTest("mmd", p, d, p)
        elapsed = time.perf_counter() - start
        return WindowResult("mmd", rows, {"all": feature}, self.alpha, "none", self.alpha, p < self.alpha, elapsed)


def build_detector(
    kind: Literal["ks", "mmd"],
    reference: Reference,
    alpha: float = DEFAULT_ALPHA,
    correction: Correction = DEFAULT_CORRECTION,
    mmd_permutations: int = MMD_PERMUTATIONS,
    backend: Backend = DEFAULT_BACKEND,
) -> Detector:
    if kind == "ks":
        return FeatureWiseDrift(reference, alpha, correction, backend)
    if kind == "mmd":
        if backend != "alibi":
            raise ValueError(f"detector mmd runs on backend alibi only, not {backend!r}")
        return MMDDetector(reference, alpha, mmd_permutations)
    raise ValueError(f"detector must be ks or mmd, not {kind!r}")


# ---- the decision rule -------------------------------------------------------------------------------------------


@dataclass
class DriftTracker:
    """k-of-m over evaluated windows: Unknown before the first window, then Drift or NoDrift after each window."""

    k: int = ALARM_K
    m: int = ALARM_M
    recent: deque[bool] = field(default_factory=deque)
    state: State = "Unknown"
    windows: int = 0
    flagged_windows: int = 0
    drift_windows: int = 0  # windows that ended in state Drift

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.m:
            raise ValueError(f"the alarm rule needs 1 <= k <= m, got k={self.k} m={self.m}")
        self.recent = deque(self.recent, maxlen=self.m)

    def update(self, flagged: bool) -> State:
        self.recent.append(flagged)
        self.windows += 1
        self.flagged_windows += flagged
        self.state = "Drift" if sum(self.recent) >= self.k else "NoDrift"
        self.drift_windows += self.state == "Drift"
        return self.state


# ---- training/serving skew ---------------------------------------------------------------------------------------

SKEW_STATISTICS = {
    "numeric": ("mean_shift", "std_ratio", "null_rate_delta", "out_of_range"),
    "categorical": ("linf", "unseen_share", "null_rate_delta"),
}


def skew(reference: Reference, columns: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """Serving window statistics against the training snapshot's recorded statistics, per feature.

    numeric: ``mean_shift`` = (window mean - training mean) / training std (standardized difference),
    ``std_ratio`` = window std / training std, ``null_rate_delta`` = window null rate - training null rate,
    ``out_of_range`` = share of the window's values outside the training [min, max].
    categorical: ``linf`` = max over categories of |window share - training share| (shares of non-null values;
    TFDV's skew measure), ``unseen_share`` = share of values training never had, ``null_rate_delta``.
    """
    out: dict[str, dict[str, float]] = {}
    for i, spec in enumerate(reference.schema.features):
        stats = reference.stats.get(spec.name)
        if stats is None:
            continue
        column = np.asarray(columns[i])
        out[spec.name] = (
            _numeric_skew(column, stats)
            if spec.kind == "numeric"
            else _categorical_skew(spec, column, stats, reference)
        )
    return out


def _numeric_skew(column: np.ndarray, stats: ColumnStats) -> dict[str, float]:
    values = column.astype(np.float64)
    finite = values[~np.isnan(values)]
    null_rate = 1.0 - len(finite) / len(values) if len(values) else 0.0
    result = {"null_rate_delta": null_rate - stats.null_rate}
    if len(finite) and stats.mean is not None and stats.std is not None:
        mean, std = float(finite.mean()), float(finite.std())
        scale = stats.std if stats.std > 0 else 1.0
        result["mean_shift"] = (mean - stats.mean) / scale
        result["std_ratio"] = std / stats.std if stats.std > 0 else (0.0 if std == 0 else math.inf)
    if len(finite) and stats.min is not None and stats.max is not None:
        result["out_of_range"] = float(((finite < stats.min) | (finite > stats.max)).mean())
    return result


def _categorical_skew(
    spec: FeatureSpec, column: np.ndarray, stats: ColumnStats, reference: Reference
) -> dict[str, float]:
    codes = column.astype(np.int64)
    counts = np.bincount(codes, minlength=spec.other_code + 1)
    total = len(codes)
    non_null = total - int(counts[spec.null_code])
    null_rate = counts[spec.null_code] / total if total else 0.0
    result = {"null_rate_delta": float(null_rate) - stats.null_rate}
    train = stats.categories or {}
    train_total = reference.snapshot_rows * (1.0 - stats.null_rate) or float(sum(train.values()) or 1)
    window_share = {label: counts[c] / non_null if non_null else 0.0 for c, label in enumerate(spec.categories)}
    known = set(spec.categories)
    unseen = counts[spec.other_code] / non_null if non_null else 0.0
    gaps = [abs(window_share.get(label, 0.0) - train.get(label, 0) / train_total) for label in known | set(train)]
    # values outside the declared categories form one bucket: training's and the window's share of it
    train_other = sum(v for k, v in train.items() if k not in known) / train_total
    gaps.append(abs(unseen - train_other))
    result["linf"] = float(max(gaps))
    result["unseen_share"] = float(unseen)
    return result


def window_statistics(schema: Schema, columns: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """Plain statistics of a window (for /status): mean/std/null rate, or category shares."""
    out: dict[str, dict[str, float]] = {}
    for i, spec in enumerate(schema.features):
        column = np.asarray(columns[i])
        if spec.kind == "numeric":
            finite = column[~np.isnan(column)]
            out[spec.name] = {
                "mean": float(finite.mean()) if len(finite) else math.nan,
                "std": float(finite.std()) if len(finite) else math.nan,
                "null_rate": 1 - len(finite) / len(column) if len(column) else 0.0,
            }
        else:
            counts = np.bincount(column.astype(np.int64), minlength=spec.other_code + 1)
            total = max(len(column), 1)
            out[spec.name] = {label: float(c / total) for label, c in zip(spec.labels, counts, strict=True) if c}
    return out
