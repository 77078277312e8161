"""A shadow of a broken candidate on real processes: arrests v1 serving, v2 with garbage weights mirrored every
request behind the embedded splitter (which also fails a share of the copies), a real Prometheus scraping the
splitter and the sidecars. Every answer a user gets is the stable server's own answer to the same body; the paired
report through decide_shadow names the failure; `kubeloop status` shows the shadow; labels sent through the splitter
reach the shadow's sidecar too; once removed, the shadow gets nothing more."""

from __future__ import annotations

import time

import httpx
import pytest

from kubeloop.analysis.prometheus import Scraped
from kubeloop.analysis.shadow import ShadowState, decide_shadow
from kubeloop.api import ModelDeployment
from kubeloop.api.modeldeployment import Shadow, ShadowAnalysis
from kubeloop.broken_candidates import garbage_record
from kubeloop.local_deployment import LocalDeployment
from kubeloop.registry import Registry
from kubeloop.status_view import status_table
from tests.support.clusterkit import wait_for
from tests.support.serving_fixtures import arrests_frame, register_shared, rows, scrape, shared_home

pytestmark = pytest.mark.integration

REQUESTS = 150
FAULT_RATE = 0.2
WINDOW_S = 600.0  # every sample since Prometheus started
PACE_S = 0.06  # between requests: traffic over ~10 scrapes, so that series first seen mid-way lose little to increase()


def test_a_broken_shadow_never_changes_an_answer_and_its_report_names_the_failure(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    register_shared(shared_home(tmp_path_factory), versions=(1, 2))
    registry = Registry()
    broken = garbage_record(registry.get("arrests", 2), tmp_path_factory.mktemp("broken"))
    deployment = ModelDeployment.model_validate(
        {"metadata": {"name": "shadowed"}, "spec": {"model": "arrests", "version": 1, "drift": {"window": 50}}}
    )
    frame = arrests_frame()
    scraped = Scraped()
    try:
        with LocalDeployment(deployment, registry, restart=None) as local, httpx.Client(timeout=30) as client:
            stable = local.start()
            endpoints = local.add_shadow(Shadow(version=2, percent=100), broken, fault_rate=FAULT_RATE)
            assert endpoints.url == endpoints.splitter and endpoints.shadow_sidecar not in (None, stable.sidecar)
            traffic = client.get(f"{endpoints.splitter}/admin/traffic").json()
            assert traffic["shadow"] | {"url": ""} == {
                "version": "2",
                "url": "",
                "faultRate": FAULT_RATE,
                "percent": 100,
                "task": "binary",
                "inFlight": 0,
            }
            assert "candidate" not in traffic
            scraped.scrape("shadowed", [endpoints.splitter, endpoints.sidecar, endpoints.shadow_sidecar])
            source = scraped.source

            def scraped_at_zero() -> bool:  # the series from 0 in Prometheus before the traffic: increase() sees all
                found = source.query('kubeloop_splitter_requests_total{version="2",code="200"}')
                return bool(found) and bool(source.query('kubeloop_shadow_pairs_total{version="2"}'))

            wait_for(scraped_at_zero, 60, "Prometheus's first scrape of the splitter")

            # every answer through the splitter is the stable server's own answer to the same body
            answered: dict[str, int] = {}  # request id -> rows
            for i in range(REQUESTS):
                body = {"instances": [] if i % 25 == 7 else rows(frame, 1 + i % 3, start=3 * i)}
                via = client.post(
                    f"{endpoints.url}/v1/models/arrests:predict", json=body, headers={"x-request-id": f"user-{i}"}
                )
                direct = client.post(f"{stable.servers[1]}/v1/models/arrests:predict", json=body)
                assert (via.status_code, via.json()) == (direct.status_code, direct.json()), i
                assert via.headers["x-kubeloop-version"] == "1" and via.headers["ce-id"] == f"user-{i}"
                if via.status_code == 200:
                    answered[f"user-{i}"] = len(body["instances"])
                time.sleep(PACE_S)

            def mirrored() -> float:
                return scrape(
                    client.get(f"{endpoints.splitter}/metrics").text, "kubeloop_splitter_requests_total", version="2"
                )

            wait_for(lambda: mirrored() == REQUESTS, 30, f"the shadow's answers to all {REQUESTS} mirrored requests")
            splitter_metrics = client.get(f"{endpoints.splitter}/metrics").text
            faults = scrape(splitter_metrics, "kubeloop_splitter_requests_total", version="2", code="500")
            assert 0.08 * REQUESTS <= faults <= 0.35 * REQUESTS
            pairs = scrape(splitter_metrics, "kubeloop_shadow_pairs_total", version="2")
            # a pair: both answered 200 (the user's 400s the shadow answers 400 too, or fails)
            assert pairs == scrape(splitter_metrics, "kubeloop_splitter_requests_total", version="2", code="200")
            assert len(answered) - faults <= pairs < len(answered)
            assert scrape(splitter_metrics, "kubeloop_shadow_dropped_total", version="2") == 0

            agreed = scrape(splitter_metrics, "kubeloop_shadow_pairs_total", version="2", agree="true")

            # the paired report from Prometheus (increase() extrapolates: close to the counts) names the failure
            def scraped_all() -> bool:
                return source.paired_signals("arrests", 2, WINDOW_S).pairs >= 0.95 * pairs

            wait_for(scraped_all, 30, "Prometheus scraped the last pairs")
            paired = source.paired_signals("arrests", 2, WINDOW_S)
            shadow_signals = source.version_signals("arrests", 2, WINDOW_S)
            stable_signals = source.version_signals("arrests", 1, WINDOW_S)
            assert shadow_signals.requests == pytest.approx(REQUESTS, rel=0.15) and paired.rows > paired.pairs
            assert paired.agreement == pytest.approx(agreed / pairs, abs=0.02)
            analysis = ShadowAnalysis(min_agreement=0.9, max_failed_windows=1)
            decision = decide_shadow(analysis, ShadowState(), stable_signals, shadow_signals, paired)
            failed = {check.name for check in decision.checks if check.status == "fail"}
            assert decision.action == "shadowReject" and {"agreement", "errorRate"} <= failed, decision.reason
            assert "paired answers" in decision.reason and "error rate" in decision.reason
            assert decision.report["agreement"] < 0.9
            # the 500s' series starts with the first fault: increase() counts it from its first scrape, a bit short
            assert 0.1 < decision.report["errorRate"] <= faults / REQUESTS + 0.02
            assert decision.report["predictionDistance"] > 0.3  # garbage scores ~0.0003 against the stable's

            # kubeloop status: the shadow's row and its paired answers
            table = status_table(interval=0.5)
            shadow_row = next(line for line in table.splitlines() if " v2 " in line)
            assert "shadow" in shadow_row.split() and "mirror 100%" in shadow_row
            assert f"shadowed v2 (shadow): agreed on {agreed:.0f} of {pairs:.0f} paired answers" in table

            # labels sent through the splitter reach the stable's sidecar and, for the copies, the shadow's
            feedback = [{"id": rid, "labels": ["Yes"] * n} for rid, n in list(answered.items())[:60]]
            answer = client.post(f"{endpoints.url}/v1/models/arrests:feedback", json={"feedback": feedback})
            assert answer.status_code == 202 and answer.json()["accepted"] == 60

            def results(sidecar: str | None) -> dict:
                return client.get(f"{sidecar}/status").json()["feedback"]

            wait_for(lambda: results(endpoints.sidecar).get("joined") == 60, 60, "the stable's labels joined")
            # the copies the splitter failed never reached the shadow's server: unknown there
            wait_for(lambda: sum(results(endpoints.shadow_sidecar).values()) == 60, 60, "the shadow's labels")
            assert results(endpoints.shadow_sidecar)["joined"] > 30

            # removed: nothing more is mirrored
            local.remove_shadow()
            assert client.get(f"{endpoints.splitter}/admin/traffic").json()["shadow"]["percent"] == 0
            assert all(" v2 " not in line for line in status_table(interval=0.2).splitlines())
            for i in range(10):
                client.post(f"{endpoints.url}/v1/models/arrests:predict", json={"instances": rows(frame, 1, start=i)})
            time.sleep(0.5)
            assert mirrored() == REQUESTS
    finally:
        scraped.stop()
