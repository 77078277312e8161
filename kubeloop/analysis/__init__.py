"""Automated canary analysis and the retrain policy: one engine for the operator and the embedded mode.

- `signals`: what a step is judged on (`VersionSignals` per version), read from Prometheus's HTTP query API
  (`PrometheusSource`, PromQL) through the `SignalSource` interface; PromQL's histogram_quantile.
- `engine`: pure decisions. Given the analysis spec, where the canary stands and the signals of one interval, run
  the checks and decide: advance to the next step, hold, promote or roll back, with the reason.
- `shadow`: pure decisions on a shadow (mirrored traffic, never answering): the canary's checks plus the paired
  answers' agreement, per window; promote it to a canary after enough passing windows, or reject it.
- `retrain_policy`: pure decision to start retraining on sustained drift, rate-limited.
- `prometheus`: a real Prometheus server for the embedded mode (Debian's `prometheus`), scraping loopback targets;
  `Scraped`, the embedded mode's signal source on it.
"""

from kubeloop.analysis.engine import AnalysisState, CheckResult, Decision, decide, run_checks
from kubeloop.analysis.retrain_policy import RetrainDecision, RetrainState, decide_retrain, underperforming
from kubeloop.analysis.signals import (
    PrometheusSource,
    Queries,
    SignalSource,
    VersionSignals,
    duration_seconds,
)

__all__ = [
    "AnalysisState",
    "CheckResult",
    "Decision",
    "PrometheusSource",
    "Queries",
    "RetrainDecision",
    "RetrainState",
    "SignalSource",
    "VersionSignals",
    "decide",
    "decide_retrain",
    "duration_seconds",
    "run_checks",
    "underperforming",
]
