"""The model card's search part, for a version that won a hyperparameter search (lineage.search): the trials
against each searched value, every trial's per-epoch curve with the best one's bold, and every trial in a table,
all from the search's results file (lineage.search.resultsUri)."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from kubeloop.api.modelversion import ModelVersion
from kubeloop.report import plots
from kubeloop.report.model_card import _e, _figure, _kv, _num, _table


def read_results(uri: str) -> dict[str, Any]:
    with fsspec.open(uri, "r") as stream:
        return json.load(stream)


def search_html(record: ModelVersion) -> str:
    """The search part of the card's Training section; empty for a version no search produced."""
    search = record.spec.lineage.search
    if search is None:
        return ""
    parts = ['<h3 id="search">Hyperparameter search</h3>']
    try:
        results = read_results(search.results_uri)
    except (OSError, ValueError) as error:
        return "".join([*parts, f'<p class="note">The search\'s results could not be read here ({_e(error)}).</p>'])
    trials = results["trials"]
    counts = {status: sum(t["status"] == status for t in trials) for status in ("Completed", "Stopped", "Failed")}
    parts.append(
        _kv(
            [
                ("trials", ", ".join(f"{n} {status.lower()}" for status, n in counts.items())),
                ("ranked by", f"{_e(search.metric)} ({_e(search.mode)}), on each trial's last epoch"),
                ("scheduler", f"{_e(results['scheduler'])}, grace period {results['gracePeriod']} epoch(s)"),
                ("trial-epochs", f"{sum(t['epochs'] for t in trials)} of {len(trials) * results['epochsPerTrial']}"),
                ("best trial", f"<code>{_e(search.best_trial)}</code>"),
                ("results", f"<code>{_e(search.results_uri)}</code>"),
            ]
        )
    )
    dimensions = {name: next(iter(dimension)) for name, dimension in results["space"].items()}
    if any(t["metric"] is not None for t in trials):
        parts.append(
            _figure(
                plots.search_trials(trials, dimensions, search.metric, search.best_trial),
                f"{search.metric} of each trial against each searched value (hollow: stopped early; star: best)",
            )
        )
        parts.append(
            _figure(
                plots.trial_curves(trials, _reported(search.metric), search.metric, search.best_trial),
                f"{search.metric} per epoch of every trial; the best trial's curve bold",
            )
        )
    names = list(dimensions)
    rows = [
        [
            f"<code>{_e(t['trial'])}</code>" + (" ★" if t["trial"] == search.best_trial else ""),
            *(_e(_value(t["params"].get(name))) for name in names),
            _e(t["status"]),
            f"{t['epochs']}/{t['ofEpochs']}",
            _num(t["metric"], 4),
            _e(t["error"] or ""),
        ]
        for t in trials
    ]
    parts.append(_table(["trial", *names, "status", "epochs", search.metric, "error"], rows))
    return "".join(parts)


def _reported(metric: str) -> str:
    """valAuc -> val_auc: the key the per-epoch records use."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in metric)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
