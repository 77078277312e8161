"""Automated canary analysis and the retrain policy: one engine for the operator and the embedded mode.

- `signals`: what a step is judged on (`VersionSignals` per version), read through a `SignalSource`: Prometheus's
  HTTP query API (`PrometheusSource`, PromQL) or the processes' own `/metrics` (`MetricsSource`), same queries.
- `engine`: pure decisions. Given the analysis spec, where the canary stands and the signals of one interval, run
  the checks and decide: advance to the next step, hold, promote or roll back, with the reason.
- `retrain`: pure decision to start retraining on sustained drift, rate-limited.
- `prometheus`: a real Prometheus server for the embedded mode (Debian's `prometheus`), scraping loopback targets.
"""

from kubeloop.analysis.engine import AnalysisState, CheckResult, Decision, decide, run_checks
from kubeloop.analysis.retrain_policy import RetrainDecision, RetrainState, decide_retrain
from kubeloop.analysis.signals import (
    MetricsSource,
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
    "MetricsSource",
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
]
