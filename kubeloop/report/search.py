"""The model card's search part, for a version that won a hyperparameter search (lineage.search): the trials
against each searched value, every trial's per-epoch curve with the best one's bold, and every trial in a table,
all from the search's results file (lineage.search.resultsUri)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import fsspec

from kubeloop.api.modelversion import ModelVersion, SearchLineage
from kubeloop.report import plots
from kubeloop.report.card_values import Figure


@dataclass
class TrialRow:
    trial: str
    best: bool
    params: list[str]  # the searched values, in SearchView.dimensions' order
    status: str
    epochs: int
    of_epochs: int
    metric: float | None
    error: str


@dataclass
class SearchView:
    search: SearchLineage
    error: str = ""  # why the results file could not be read; then nothing below is set
    counts: dict[str, int] = field(default_factory=dict)  # trials per status
    scheduler: str = ""
    grace_period: int = 0
    trial_epochs: int = 0  # epochs run over all trials
    of_trial_epochs: int = 0  # epochs all trials would have run to the end
    dimensions: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    trials: list[TrialRow] = field(default_factory=list)


def read_results(uri: str) -> dict[str, Any]:
    with fsspec.open(uri, "r") as stream:
        return json.load(stream)


def search_view(record: ModelVersion) -> SearchView | None:
    """The search part of the card's Training section; None for a version no search produced."""
    search = record.spec.lineage.search
    if search is None:
        return None
    try:
        results = read_results(search.results_uri)
    except (OSError, ValueError) as error:
        return SearchView(search, error=str(error))
    trials = results["trials"]
    dimensions = {name: next(iter(dimension)) for name, dimension in results["space"].items()}
    figures = []
    if any(t["metric"] is not None for t in trials):
        figures = [
            Figure(
                plots.search_trials(trials, dimensions, search.metric, search.best_trial),
                f"{search.metric} of each trial against each searched value (hollow: stopped early; star: best)",
            ),
            Figure(
                plots.trial_curves(trials, _reported(search.metric), search.metric, search.best_trial),
                f"{search.metric} per epoch of every trial; the best trial's curve bold",
            ),
        ]
    return SearchView(
        search,
        counts={status: sum(t["status"] == status for t in trials) for status in ("Completed", "Stopped", "Failed")},
        scheduler=results["scheduler"],
        grace_period=results["gracePeriod"],
        trial_epochs=sum(t["epochs"] for t in trials),
        of_trial_epochs=len(trials) * results["epochsPerTrial"],
        dimensions=list(dimensions),
        figures=figures,
        trials=[
            TrialRow(
                trial=t["trial"],
                best=t["trial"] == search.best_trial,
                params=[_value(t["params"].get(name)) for name in dimensions],
                status=t["status"],
                epochs=t["epochs"],
                of_epochs=t["ofEpochs"],
                metric=t["metric"],
                error=t["error"] or "",
            )
            for t in trials
        ],
    )


def _reported(metric: str) -> str:
    """valAuc -> val_auc: the key the per-epoch records use."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in metric)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
