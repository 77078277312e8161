"""The canary analysis engine and the retrain policy (pure), and the signal math (PromQL's histogram_quantile, the
KS distance of two histograms, class shares). The signals read from a real Prometheus: test_analysis_prometheus.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubeloop.analysis import (
    AnalysisState,
    CheckResult,
    RetrainState,
    VersionSignals,
    decide,
    decide_retrain,
    run_checks,
)
from kubeloop.analysis.engine import labelled_check
from kubeloop.analysis.signals import duration_seconds, histogram_quantile, ks_distance, share_gap
from kubeloop.api.modeldeployment import AnalysisRecord, CanaryAnalysis, CanaryChecks, LabelledChecks, Retrain

ANALYSIS = CanaryAnalysis(steps=[10, 25, 50, 100], interval="5s", max_failed_checks=2)
LAT_FAST = [(0.01, 90.0), (0.05, 100.0), (float("inf"), 100.0)]
LAT_SLOW = [(0.01, 0.0), (0.05, 10.0), (0.5, 100.0), (float("inf"), 100.0)]
PRED_LOW = [(0.25, 80.0), (0.5, 95.0), (0.75, 100.0), (float("inf"), 100.0)]
PRED_HIGH = [(0.25, 0.0), (0.5, 5.0), (0.75, 20.0), (float("inf"), 100.0)]


def signals(
    version: int,
    requests=100.0,
    errors=0.0,
    latency=LAT_FAST,
    predictions=PRED_LOW,
    drift=False,
    classes=None,
    losses=(0.2, 0.6) * 50,
):
    """One version's signals; `losses` are the per-row losses of the rows labelled in the interval."""
    return VersionSignals(
        version,
        requests,
        errors,
        list(latency),
        list(predictions),
        drift,
        dict(classes or {}),
        labelled=len(losses),
        loss_sum=sum(losses),
        loss_squared_sum=sum(x * x for x in losses),
    )


def test_durations() -> None:
    assert duration_seconds("30s") == 30
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("500ms") == 0.5
    with pytest.raises(ValueError):
        duration_seconds("5 minutes")


def test_histogram_quantile_is_promqls() -> None:
    # 100 observations: 90 in (0, 0.01], 10 in (0.01, 0.05]: p50 at 0.01*50/90, p99 at 0.01 + 0.04*9/10
    assert histogram_quantile(0.5, LAT_FAST) == pytest.approx(0.01 * 50 / 90)
    assert histogram_quantile(0.99, LAT_FAST) == pytest.approx(0.046)
    cumulative = [(0.1, 10.0), (0.5, 60.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, cumulative) == pytest.approx(0.1 + 0.4 * 40 / 50)
    assert histogram_quantile(0.99, cumulative) == pytest.approx(0.5 + 0.5 * 39 / 40)
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 5.0)]) == 0.1  # +Inf bucket: highest finite bound
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1
    assert histogram_quantile(0.5, [(-1.0, 5.0), (float("inf"), 10.0)]) == -1.0  # first bucket's bound <= 0
    # PromQL's NaN: no observations, no buckets, no +Inf bucket
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.5, [(0.1, 1.0), (0.5, 2.0)]) is None


def test_ks_distance_of_histograms() -> None:
    assert ks_distance(PRED_LOW, PRED_LOW) == 0
    assert ks_distance(PRED_LOW, PRED_HIGH) == pytest.approx(0.9)
    assert ks_distance(PRED_LOW, []) is None


def test_share_gap_is_the_largest_class_share_difference() -> None:
    assert share_gap({"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.5, "c": 0.3}) == (pytest.approx(0.3), "a")
    assert share_gap({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == (0.0, "a")
    assert signals(1).class_shares() is None  # not multiclass
    assert signals(1, classes={"a": 0.0}).class_shares() is None  # no rows
    assert signals(1, classes={"a": 30.0, "b": 10.0}).class_shares() == {"a": 0.75, "b": 0.25}


def walk(analysis, stable, candidate, intervals):
    state, decisions = AnalysisState(), []
    for _ in range(intervals):
        decision = decide(analysis, state, stable, candidate)
        decisions.append(decision)
        state = decision.state
        if decision.final:
            break
    return decisions


def test_healthy_candidate_walks_the_steps_and_is_promoted() -> None:
    decisions = walk(ANALYSIS, signals(1), signals(2), 10)
    assert [(d.action, d.percent, d.next_percent) for d in decisions] == [
        ("advance", 10, 25),
        ("advance", 25, 50),
        ("advance", 50, 100),
        ("promote", 100, 100),
    ]
    assert "promoting v2" in decisions[-1].reason
    assert all(c.status == "pass" for c in decisions[0].checks)


def test_labelled_check_fails_a_candidate_whose_loss_is_higher_beyond_noise() -> None:
    checks = LabelledChecks(min_labels=50, significance=0.05)
    worse = labelled_check(checks, signals(1), signals(2, losses=(0.3, 0.7) * 50))
    assert worse.status == "fail" and worse.value == pytest.approx(0.1)
    assert "p=" in worse.reason and "100 / 100 labelled rows" in worse.reason
    # the same increase on a handful of rows is noise: it passes
    noisy = labelled_check(checks, signals(1, losses=(0.0, 1.0) * 30), signals(2, losses=(0.1, 1.1) * 30))
    assert noisy.status == "pass"
    # a margin tolerates a known increase
    tolerated = labelled_check(LabelledChecks(max_loss_increase=0.15), signals(1), signals(2, losses=(0.3, 0.7) * 50))
    assert tolerated.status == "pass"
    better = labelled_check(checks, signals(1), signals(2, losses=(0.1, 0.3) * 50))
    assert better.status == "pass" and better.value < 0


def test_labelled_check_skips_below_min_labels_and_a_worse_candidate_is_rolled_back() -> None:
    skipped = labelled_check(LabelledChecks(min_labels=50), signals(1), signals(2, losses=(0.9,) * 49))
    assert skipped.status == "skip" and "49 candidate / 100 stable labelled rows (need 50)" in skipped.reason
    decisions = walk(ANALYSIS, signals(1), signals(2, losses=(0.5, 0.9) * 50), 10)
    assert [d.action for d in decisions] == ["hold", "rollback"]
    assert "labelledLoss" not in [c.name for c in decisions[-1].checks if c.status != "fail"]
    assert "mean loss 0.7000 vs stable 0.4000" in decisions[-1].reason
    assert "labelledLoss 0.3 significantly > 0" in decisions[-1].line()
    # a passing window's line does not claim the increase was under the margin, only that it was not significant
    noisy = walk(ANALYSIS, signals(1, losses=(0.0, 1.0) * 30), signals(2, losses=(0.1, 1.1) * 30), 1)
    assert "labelledLoss 0.1 not significantly > 0" in noisy[0].line()


def test_a_retrained_version_is_judged_on_labels_its_prediction_shift_only_recorded() -> None:
    checks = Retrain().analysis.checks
    found = {c.name: c for c in run_checks(checks, signals(1), signals(2, predictions=PRED_HIGH))}
    assert found["predictionShift"].status == "pass" and found["predictionShift"].value == pytest.approx(0.9)
    assert found["labelledLoss"].status == "pass"
    custom = Retrain.model_validate({"analysis": {"steps": [50, 100]}}).analysis.checks
    assert custom == checks  # a retrain analysis given without checks keeps the retrain defaults


@pytest.mark.parametrize(
    ("candidate", "failing"),
    [
        (signals(2, errors=20), "errorRate"),
        (signals(2, latency=LAT_SLOW), "p99LatencyRatio"),
        (signals(2, predictions=PRED_HIGH), "predictionShift"),
        (signals(2, drift=True), "drift"),
    ],
)
def test_each_check_can_fail_and_two_failures_roll_back(candidate: VersionSignals, failing: str) -> None:
    decisions = walk(ANALYSIS, signals(1), candidate, 10)
    assert [d.action for d in decisions] == ["hold", "rollback"]  # within two intervals
    assert decisions[-1].next_percent == 0
    assert [c.name for c in decisions[-1].checks if c.status == "fail"] == [failing]
    assert "rolling back to v1" in decisions[-1].reason and "failed check 2 of 2" in decisions[-1].reason


STABLE_MIX = {"Adelie": 34.0, "Chinstrap": 33.0, "Gentoo": 33.0}


def prediction_shift_check(decision) -> CheckResult:
    (check,) = [c for c in decision.checks if c.name == "predictionShift"]
    return check


def test_a_multiclass_canary_predicting_another_class_mix_at_the_same_confidence_fails() -> None:
    """Same confidence histogram, so a KS distance of 0; but the candidate predicts Adelie for 80% of the rows where
    the stable version does for 34%: the class-share gap decides."""
    stable = signals(1, classes=STABLE_MIX)
    candidate = signals(2, classes={"Adelie": 80.0, "Chinstrap": 10.0, "Gentoo": 10.0})
    assert ks_distance(candidate.predictions, stable.predictions) == 0
    decisions = walk(ANALYSIS, stable, candidate, 10)
    assert [d.action for d in decisions] == ["hold", "rollback"]
    check = prediction_shift_check(decisions[-1])
    assert check.status == "fail" and check.value == pytest.approx(0.46)
    assert check.reason == (
        "predicted-class share gap 0.460 (class 'Adelie': 80.0% of the candidate's predictions, 34.0% of the "
        "stable's) > KS distance 0.000 of the confidence histograms"
    )
    assert check.reason in decisions[-1].reason and "predictionShift 0.46 > 0.2" in decisions[-1].line()


def test_a_multiclass_canary_with_the_same_class_mix_and_confidence_passes() -> None:
    candidate = signals(2, classes={label: count * 3 for label, count in STABLE_MIX.items()})  # 3x the traffic
    decision = decide(ANALYSIS, AnalysisState(), signals(1, classes=STABLE_MIX), candidate)
    check = prediction_shift_check(decision)
    assert decision.action == "advance" and check.status == "pass" and check.value == 0
    assert check.reason.startswith("KS distance 0.000 of the confidence histograms >= predicted-class share gap 0.000")


def test_a_multiclass_canary_less_confident_on_the_same_mix_fails_on_the_histogram() -> None:
    stable = signals(1, classes=STABLE_MIX)
    candidate = signals(2, predictions=PRED_HIGH, classes={"Adelie": 30.0, "Chinstrap": 35.0, "Gentoo": 35.0})
    check = prediction_shift_check(decide(ANALYSIS, AnalysisState(), stable, candidate))
    assert check.status == "fail" and check.value == pytest.approx(0.9)
    assert check.reason.startswith("KS distance 0.900 of the confidence histograms >= predicted-class share gap 0.040")


def test_binary_and_regression_prediction_shift_is_the_histogram_ks_distance() -> None:
    check = prediction_shift_check(decide(ANALYSIS, AnalysisState(), signals(1), signals(2, predictions=PRED_HIGH)))
    assert check.status == "fail" and check.value == pytest.approx(0.9)
    assert check.reason == "KS distance 0.900 between candidate and stable predictions"


def test_no_candidate_traffic_holds_without_counting_a_failure() -> None:
    decision = decide(ANALYSIS, AnalysisState(step=1), signals(1), signals(2, requests=0, predictions=[]))
    assert decision.action == "hold" and decision.state.failed_checks == 0 and decision.next_percent == 25


def test_comparisons_are_skipped_when_stable_gets_no_traffic() -> None:
    stable = signals(1, requests=0, latency=[], predictions=[], losses=())
    decision = decide(ANALYSIS, AnalysisState(step=3), stable, signals(2))
    assert decision.action == "promote"
    assert {c.name: c.status for c in decision.checks} == {
        "errorRate": "pass",
        "p99LatencyRatio": "skip",
        "predictionShift": "skip",
        "labelledLoss": "skip",
        "drift": "pass",
    }


def test_failures_accumulate_across_steps_and_thresholds_come_from_the_spec() -> None:
    analysis = CanaryAnalysis(steps=[50, 100], max_failed_checks=3, checks=CanaryChecks(max_error_rate=0.5))
    decision = decide(analysis, AnalysisState(step=0, failed_checks=2), signals(1), signals(2, errors=20))
    assert decision.action == "advance"  # 20% errors is within 50%
    decision = decide(analysis, decision.state, signals(1), signals(2, errors=60))
    assert decision.action == "rollback" and decision.state.failed_checks == 3


def test_decision_record_is_a_valid_status_history_entry() -> None:
    decision = decide(ANALYSIS, AnalysisState(), signals(1), signals(2, errors=20))
    entry = AnalysisRecord.model_validate(decision.record())
    assert entry.action == "hold" and entry.traffic_percent == 10 and entry.checks[0].status == "fail"
    assert "errorRate 0.2 > 0.01" in decision.line()


def test_retrain_needs_sustained_drift_and_is_rate_limited() -> None:
    policy = Retrain(enabled=True, sustained_for="5m", min_interval="1h", training_job="t")
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    first = decide_retrain(policy, RetrainState(), True, t0)
    assert not first.start and first.state.triggered_since == t0
    blip = decide_retrain(policy, first.state, False, t0 + timedelta(minutes=2))
    assert blip.state.triggered_since is None  # drift must be uninterrupted
    state = decide_retrain(policy, blip.state, True, t0 + timedelta(minutes=3)).state
    assert not decide_retrain(policy, state, True, t0 + timedelta(minutes=7)).start
    go = decide_retrain(policy, state, True, t0 + timedelta(minutes=8))
    assert go.start and "sustained for 300s" in go.reason and go.state.last_started == t0 + timedelta(minutes=8)
    storm = decide_retrain(policy, go.state, True, t0 + timedelta(minutes=30))
    assert not storm.start and "minInterval 1h" in storm.reason
    assert decide_retrain(policy, go.state, True, t0 + timedelta(minutes=69)).start
    assert not decide_retrain(policy, state, True, t0 + timedelta(minutes=9), canary_active=True).start
    assert not decide_retrain(Retrain(enabled=False), state, True, t0 + timedelta(hours=2)).start
