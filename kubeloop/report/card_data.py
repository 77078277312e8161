"""Everything a model card shows, gathered before any HTML: `gather` reads the record, the registry, the snapshot
store, the artifact and (given its URL) a running deployment's drift sidecar, and returns a `Card`.

Sections: data (snapshot, columns, the validation report re-run against the previous Production version's
snapshot), lineage and hyperparameters, training curves, the evaluation on the held-out rows (recomputed: the
lineage's digest, test fraction and seed, with the task, label and slice column, give the same split training
used, and the artifact's predictions on it), metrics per slice with their gap to overall, the gate's decision,
the comparison with the previous Production version, the stage history, the rollout decisions (shadow windows
and canary steps, with their checks) and the drift sidecar's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic.alias_generators import to_camel

from kubeloop.api.modelversion import ModelVersion, StageChange
from kubeloop.api.trainingjob import TASK_METRICS
from kubeloop.api.validation import ValidationReport
from kubeloop.data.snapshot import ColumnStats, Snapshot, load_snapshot
from kubeloop.errors import KubeloopError
from kubeloop.evaluation import LOWER_IS_BETTER
from kubeloop.registry import Registry
from kubeloop.report import plots
from kubeloop.report.card_values import HEADLINE, LOSS, METRICS, Change, Figure, Notes, metric_name
from kubeloop.report.drift import DriftView, read_drift
from kubeloop.report.held_out import EvaluationView, HeldOut, SlicesView, evaluation, held_out, slices
from kubeloop.report.rollout import RolloutStep, rollout_steps
from kubeloop.report.search import SearchView, search_view


@dataclass
class Spread:
    """The label's values on the held-out rows (regression), in the label's own units."""

    min: float
    max: float
    mean: float
    std: float


@dataclass
class ColumnView:
    name: str
    dtype: str
    stats: ColumnStats
    top: list[tuple[str, float]] | None  # categorical: the 4 most frequent values and their share of the rows


@dataclass
class DataView:
    """The training snapshot as stored, and its validation report (`how`: recorded or re-run, against what)."""

    source: str
    created: str
    columns: list[ColumnView]
    report: ValidationReport
    how: str


@dataclass
class TrainingView:
    curves: Figure | None  # None: the record holds no per-epoch metrics
    epoch_keys: list[str]
    epochs: list[list[float | int | None]]
    search: SearchView | None


@dataclass
class GateRow:
    metric: str
    value: float | None
    bound: float | None
    lower_is_better: bool
    against: Change | None  # Production's value, when the gate compared with it
    allowed: float | None


@dataclass
class GateView:
    rows: list[GateRow]
    reference: ModelVersion | None  # the Production version the gate compared with, when it is in the registry


@dataclass
class SliceChange:
    value: str
    metric: str
    change: Change


@dataclass
class LineageRow:
    what: str
    mine: Any
    theirs: Any
    hyperparameter: bool  # shown as JSON; a lineage field as code

    @property
    def changed(self) -> bool:
        return self.mine != self.theirs


@dataclass
class Comparison:
    same_task: bool
    metrics: list[tuple[str, Change]]
    slice_column: str | None  # the slice column both versions share, else None
    slices: list[SliceChange]
    lineage: list[LineageRow]


@dataclass
class FeatureDrift:
    feature: str
    test: str
    p: float | None
    adjusted: float | None
    distance: float | None
    drifted: bool
    effect: float | None  # KS D or Cramer's V: how far it moved
    share: float | None  # of the window's shift, for a drifted feature


@dataclass
class DriftPart:
    """The drift sidecar's view of this version, with its figures: the p-values over time and in the last window."""

    view: DriftView
    history: Figure | None
    last: Figure | None  # None: no window evaluated yet
    features: list[FeatureDrift]  # the last window's test per feature
    skew_statistics: list[str]
    skew: list[tuple[str, list[float | None]]]  # per feature: its value of each statistic
    served: list[ServedMetric]  # performance on the labels that came back, beside the evaluation's


@dataclass
class ServedMetric:
    metric: str
    evaluated: float | None  # on the held-out split when the version was registered
    live: float | None  # on the last labelled rows served
    estimated: tuple[float, float, float] | None  # from the model's probabilities, no labels: value, low, high


@dataclass
class Card:
    record: ModelVersion
    previous: ModelVersion | None  # the Production version this one is measured against
    generated: str
    notes: Notes
    headline: list[tuple[str, float | None]]
    label_spread: Spread | None
    data: DataView | None  # None: the snapshot is not in this machine's store
    training: TrainingView
    evaluation: EvaluationView
    slices: SlicesView | None
    gate: GateView | None  # None: no gate decision recorded
    comparison: Comparison | None
    history: list[StageChange]
    rollout: list[RolloutStep]  # the shadow windows and canary steps that judged this version
    sidecar: str | None
    drift: DriftPart | None  # None: no sidecar given, or it could not be read (then a note says why)


def gather(record: ModelVersion, registry: Registry, sidecar: str | None = None) -> Card:
    """All the card shows of `record`; what cannot be read here (a snapshot, an artifact, the sidecar) becomes a
    note of its section."""
    notes = Notes()
    previous = previous_production(record, registry)
    test: HeldOut | None = None
    try:
        test = held_out(record)
    except (KubeloopError, OSError) as error:
        notes.add("evaluation", f"no curves: the held-out rows could not be scored here ({error})")
    task = record.spec.signature.task
    overall = record.spec.metrics.overall
    return Card(
        record=record,
        previous=previous,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        notes=notes,
        headline=[(metric_name(name, task), getattr(overall, name)) for name in HEADLINE[task]],
        label_spread=_spread(test) if task == "regression" else None,
        data=_data(record, previous, notes),
        training=_training(record),
        evaluation=evaluation(record, test),
        slices=slices(record, test),
        gate=_gate(record, previous),
        comparison=_comparison(record, previous) if previous is not None else None,
        history=record.status.stage_history if record.status else [],
        rollout=rollout_steps(record),
        sidecar=sidecar,
        drift=_drift(record, sidecar, notes),
    )


def previous_production(record: ModelVersion, registry: Registry) -> ModelVersion | None:
    """The Production version this one is measured against: the one its gate compared with, else the current
    Production version (when that is another version), else None."""
    others = [mv for mv in registry.list(record.spec.model) if mv.spec.version != record.spec.version]
    compared = record.spec.gate.compared_with if record.spec.gate else None
    if compared:
        found = next((mv for mv in others if mv.metadata.name == compared), None)
        if found is not None:
            return found
    return next((mv for mv in others if mv.spec.stage == "Production"), None)


def validation_report(record: ModelVersion, previous: ModelVersion | None) -> tuple[Snapshot, ValidationReport, str]:
    """The training snapshot and its validation report: the one recorded at training (spec.validation, the same
    as the TrainingJob's status), else (a version from before it was recorded) re-run against the previous
    Production version's snapshot. Raises KubeloopError when the snapshot is not in this machine's store."""
    from kubeloop.data.validation import validate

    snapshot = load_snapshot(record.spec.lineage.dataset_digest)
    if record.spec.validation is not None:
        return snapshot, record.spec.validation, "as recorded when the version was trained"
    baseline = load_snapshot(previous.spec.lineage.dataset_digest) if previous is not None else None
    report = validate(snapshot, None, baseline, label=record.spec.signature.label)
    against = (
        f"against the snapshot of {previous.metadata.name}"
        if baseline is not None and previous is not None
        else "without a baseline (no earlier Production version)"
    )
    return snapshot, report, f"re-run {against} (none was recorded for this version)"


def _spread(test: HeldOut | None) -> Spread | None:
    if test is None or not len(test.labels):
        return None
    values = test.labels.astype(float)
    return Spread(float(values.min()), float(values.max()), float(values.mean()), float(values.std()))


def _data(record: ModelVersion, previous: ModelVersion | None, notes: Notes) -> DataView | None:
    try:
        snapshot, report, how = validation_report(record, previous)
    except KubeloopError as error:
        notes.add("data", f"the snapshot is not in this machine's store ({error}); no column statistics or validation")
        return None
    columns = []
    for name, dtype in snapshot.columns.items():
        stats = snapshot.stats[name]
        top = None
        if stats.categories:
            ranked = sorted(stats.categories.items(), key=lambda kv: -kv[1])[:4]
            top = [(value, count / max(1, snapshot.rows)) for value, count in ranked]
        columns.append(ColumnView(name, dtype, stats, top))
    return DataView(snapshot.source, snapshot.created, columns, report, how)


def _training(record: ModelVersion) -> TrainingView:
    per_epoch = record.spec.metrics.per_epoch
    if not per_epoch:
        return TrainingView(None, [], [], search_view(record))
    loss = LOSS[record.spec.signature.task]
    curves = Figure(
        plots.training_curves(per_epoch, loss), f"Loss ({loss}) and validation metric per epoch (bars: seconds)"
    )
    recorded = {k for row in per_epoch for k in row}
    keys = ["epoch", "train_loss", "val_loss"]
    keys += [*sorted(recorded - {*keys, "epoch_seconds"}), "epoch_seconds"]
    rows = [
        [int(v) if k == "epoch" and v is not None else v for k, v in ((k, row.get(k)) for k in keys)]
        for row in per_epoch
    ]
    return TrainingView(curves, keys, rows, search_view(record))


def _gate(record: ModelVersion, previous: ModelVersion | None) -> GateView | None:
    """The gate's table, per metric of the task: the value, its bound and, when the gate compared with the previous
    Production version, that version's value and the regression allowed."""
    gate = record.spec.gate
    if gate is None:
        return None
    reference = previous if previous is not None and previous.metadata.name == gate.compared_with else None
    mine = record.spec.metrics.overall
    task = record.spec.signature.task
    rows = []
    for name in TASK_METRICS[task]:
        value = getattr(mine, name)
        before = None if reference is None else getattr(reference.spec.metrics.overall, name)
        rows.append(
            GateRow(
                metric=metric_name(name, task),
                value=value,
                bound=gate.thresholds.get(to_camel(name)),
                lower_is_better=name in LOWER_IS_BETTER,
                against=None if reference is None else Change(name, value, before),
                allowed=gate.max_regression.get(to_camel(name)),
            )
        )
    return GateView(rows, reference)


def _comparison(record: ModelVersion, previous: ModelVersion) -> Comparison:
    task = record.spec.signature.task
    same_task = task == previous.spec.signature.task
    mine, theirs = record.spec.metrics.overall, previous.spec.metrics.overall
    metrics, slice_changes, column = [], [], None
    if same_task:
        metrics = [(metric_name(n, task), Change(n, getattr(mine, n), getattr(theirs, n))) for n in METRICS[task]]
        a_slices, b_slices = record.spec.metrics.slices, previous.spec.metrics.slices
        if a_slices and b_slices and a_slices.column == b_slices.column:
            column = a_slices.column
            for value in sorted(set(a_slices.values) | set(b_slices.values)):
                a_m, b_m = a_slices.values.get(value), b_slices.values.get(value)
                for name in HEADLINE[task]:
                    a = getattr(a_m, name) if a_m else None
                    b = getattr(b_m, name) if b_m else None
                    slice_changes.append(SliceChange(value, metric_name(name, task), Change(name, a, b)))
    return Comparison(same_task, metrics, column, slice_changes, _lineage_rows(record, previous))


def _lineage_rows(record: ModelVersion, previous: ModelVersion) -> list[LineageRow]:
    a, b = record.spec.lineage, previous.spec.lineage
    rows = [
        LineageRow(what, mine, theirs, hyperparameter=False)
        for what, mine, theirs in (
            ("dataset digest", _short(a.dataset_digest), _short(b.dataset_digest)),
            ("rows", a.dataset_rows, b.dataset_rows),
            ("code", a.code_version, b.code_version),
            ("builder", a.builder, b.builder),
        )
    ]
    params_a, params_b = a.hyperparameters, b.hyperparameters
    for key in sorted(set(params_a) | set(params_b)):
        if params_a.get(key) != params_b.get(key):
            rows.append(LineageRow(f"hyperparameter {key}", params_a.get(key), params_b.get(key), hyperparameter=True))
    return rows


def _short(digest: str) -> str:
    return digest[:19] + "…" if len(digest) > 19 else digest


def _drift(record: ModelVersion, sidecar: str | None, notes: Notes) -> DriftPart | None:
    if sidecar is None:
        return None
    try:
        view = read_drift(sidecar, record.spec.version)
    except KubeloopError as error:
        notes.add("drift", f"the drift sidecar could not be read: {error}")
        return None
    return drift_part(view, record.spec.metrics.overall.model_dump(by_alias=True))


def drift_part(view: DriftView, evaluated: dict[str, float | None]) -> DriftPart:
    history = None
    if view.history:
        history = Figure(plots.p_value_history(view.history, view.threshold), "p-value per feature over time")
    last, features = view.last_window, []
    figure = None
    if last:
        title = f"Last window ({last.get('rows')} rows): {'flagged' if last.get('flagged') else 'not flagged'}"
        p_values = last.get("pValues") or {}
        figure = Figure(plots.p_values(p_values, view.threshold, title), title)
        features = [
            FeatureDrift(
                feature,
                (last.get("tests") or {}).get(feature, ""),
                p,
                (last.get("adjustedPValues") or {}).get(feature),
                (last.get("distances") or {}).get(feature),
                feature in (last.get("driftedFeatures") or []),
                (last.get("effects") or {}).get(feature),
                (last.get("shares") or {}).get(feature),
            )
            for feature, p in p_values.items()
        ]
    statistics = sorted({s for stats in view.skew.values() for s in stats})
    skew = [(feature, [stats.get(s) for s in statistics]) for feature, stats in view.skew.items()]
    return DriftPart(view, history, figure, features, statistics, skew, served_metrics(view, evaluated))


def served_metrics(view: DriftView, evaluated: dict[str, float | None]) -> list[ServedMetric]:
    """Each metric the labels that came back give, beside what the evaluation measured and what the probabilities
    imply without labels."""
    live = {k: v for k, v in (view.outcomes.get("live") or {}).items() if k != "rows"}
    estimated = view.outcomes.get("estimated") or {}
    names = list(dict.fromkeys([*live, *estimated]))
    return [
        ServedMetric(
            name,
            evaluated.get(name),
            live.get(name),
            (estimated[name]["value"], estimated[name]["low"], estimated[name]["high"]) if name in estimated else None,
        )
        for name in names
    ]
