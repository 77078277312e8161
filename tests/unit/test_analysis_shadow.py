"""kubeloop.analysis.shadow.decide_shadow: a shadow judged window by window against the stable version on the canary
checks plus the paired agreement, held, promoted to a canary after its passing windows, or rejected."""

from __future__ import annotations

from kubeloop.analysis import VersionSignals
from kubeloop.analysis.shadow import ShadowState, agreement_check, decide_shadow
from kubeloop.analysis.signals import PairedSignals
from kubeloop.api.modeldeployment import ShadowAnalysis

LATENCY = [(0.01, 90.0), (0.05, 100.0), (float("inf"), 100.0)]
SLOW = [(0.01, 0.0), (0.05, 10.0), (float("inf"), 100.0)]  # p99 in +Inf: the highest finite bound, 0.05 s
PREDICTIONS = [(0.5, 80.0), (float("inf"), 100.0)]


def signals(version: int, requests: float = 100.0, errors: float = 0.0, latency=LATENCY) -> VersionSignals:
    return VersionSignals(version, requests, errors, list(latency), list(PREDICTIONS), False)


def analysis(**fields: object) -> ShadowAnalysis:
    return ShadowAnalysis.model_validate({"windows": 2, "maxFailedWindows": 2, **fields})


AGREEING = PairedSignals(pairs=100, agreed=97, distance_sum=3.0, rows=150)


def test_a_window_with_too_few_mirrored_requests_holds_without_counting() -> None:
    state = ShadowState(passed_windows=1, failed_windows=1)
    decision = decide_shadow(analysis(), state, signals(1), signals(3, requests=4), PairedSignals())
    assert decision.action == "shadowHold" and decision.state == state
    assert decision.reason == "only 4 mirrored requests in the window (need 5): still a shadow"
    assert decision.report["mirrored"] == 4 and "agreement" not in decision.report


def test_passing_windows_promote_the_shadow_to_the_canary_at_its_first_step() -> None:
    spec = analysis(minAgreement=0.9, canary={"steps": [20, 100]})
    first = decide_shadow(spec, ShadowState(), signals(1), signals(3), AGREEING)
    assert first.action == "shadowHold" and first.state == ShadowState(1, 0)
    assert first.reason == (
        "passed window 1 of 2 (errorRate, p99LatencyRatio, predictionShift, drift, agreement): still a shadow"
    )
    second = decide_shadow(spec, first.state, signals(1), signals(3), AGREEING)
    assert second.action == "shadowPromote" and second.state == ShadowState(2, 0)
    assert second.reason.endswith(": v3 becomes the canary at 20%")
    assert (second.shadow, second.stable) == (3, 1)


def test_failing_windows_reject_the_shadow_at_max_failed_windows() -> None:
    spec = analysis()
    broken = signals(3, errors=30)
    first = decide_shadow(spec, ShadowState(passed_windows=1), signals(1), broken, AGREEING)
    assert first.action == "shadowHold" and first.state == ShadowState(1, 1)
    assert first.reason == "error rate 30.0% of 100 requests > 1.0% (failed window 1 of 2): still a shadow"
    second = decide_shadow(spec, first.state, signals(1), broken, AGREEING)
    assert second.action == "shadowReject" and second.state == ShadowState(1, 2)
    assert second.reason.endswith("(failed window 2 of 2): rejecting v3")
    record = second.record()
    assert (record["action"], record["candidate"], record["stable"], record["failedChecks"]) == (
        "shadowReject",
        3,
        1,
        2,
    )
    assert {c["name"]: c["status"] for c in record["checks"]}["errorRate"] == "fail"


def test_the_agreement_check_skips_without_pairs_passes_and_fails_on_min_agreement() -> None:
    spec = analysis(minAgreement=0.9)
    skipped = agreement_check(spec, PairedSignals())
    assert (skipped.status, skipped.value, skipped.reason) == ("skip", None, "only 0 paired answers (need 5)")
    # a window's first few pairs judge nothing: one disagreement of three is not a failing shadow
    few = agreement_check(spec, PairedSignals(pairs=3, agreed=2))
    assert (few.status, few.reason) == ("skip", "only 3 paired answers (need 5)")
    passed = agreement_check(spec, AGREEING)
    assert (passed.status, passed.value) == ("pass", 0.97)
    assert passed.reason == "agreed on 97 of 100 paired answers (97.0%)"
    failed = agreement_check(spec, PairedSignals(pairs=200, agreed=150))
    assert (failed.status, failed.value, failed.threshold) == ("fail", 0.75, 0.9)
    assert failed.reason == "agreed on 150 of 200 paired answers (75.0%) < 90.0%"
    # minAgreement 0 (the default): any agreement passes; the check still reports it
    assert agreement_check(analysis(), PairedSignals(pairs=10, agreed=0)).status == "pass"


def test_a_disagreeing_shadow_fails_its_window_on_agreement_alone() -> None:
    decision = decide_shadow(
        analysis(minAgreement=0.9), ShadowState(), signals(1), signals(3), PairedSignals(pairs=100, agreed=40)
    )
    assert decision.action == "shadowHold" and decision.state == ShadowState(0, 1)
    assert decision.reason.startswith("agreed on 40 of 100 paired answers (40.0%) < 90.0% (failed window 1 of 2)")
    failing = [c.name for c in decision.checks if c.status == "fail"]
    assert failing == ["agreement"]


def test_the_report_is_status_shadow() -> None:
    decision = decide_shadow(
        analysis(checks={"maxP99LatencyRatio": 10}),
        ShadowState(),
        signals(1, errors=1),
        signals(3, requests=50, latency=SLOW),
        AGREEING,
    )
    report = dict(decision.report)
    assert report.pop("lastChecked").endswith("Z")
    checks = report.pop("checks")
    assert report == {
        "version": 3,
        "mirrored": 50,
        "agreement": 0.97,
        "predictionDistance": 0.02,
        "errorRate": 0.0,
        "stableErrorRate": 0.01,
        "p99LatencyRatio": 0.05 / LATENCY_P99,
        "passedWindows": 1,
        "failedWindows": 0,
    }
    assert [c["name"] for c in checks] == [
        "errorRate",
        "p99LatencyRatio",
        "predictionShift",
        "labelledLoss",
        "drift",
        "agreement",
    ]


LATENCY_P99 = 0.01 + (0.05 - 0.01) * (99 - 90) / (100 - 90)  # PromQL's interpolation inside the (0.01, 0.05] bucket
