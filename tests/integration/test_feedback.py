"""Ground truth end to end on real processes: an arrests model served by the model server with its drift sidecar
(a LocalDeployment), requests answered with the id their events carry, labels posted to the server's feedback
endpoint hours-later style (in batches, out of order, some twice, some for ids never served, some never), and the
sidecar's live metrics and summed loss equal to a direct computation on the same joined rows, in /status and in
/metrics; and the closed loop's traffic pump labelling its share of the requests by the ids the server answered."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn import metrics as skm

from kubeloop.api import ModelDeployment
from kubeloop.local_deployment import Endpoints, LocalDeployment
from kubeloop.registry import Registry
from kubeloop.report.model_card import render
from kubeloop.traffic import TrafficPump
from tests.support.serving_fixtures import arrests_frame, home_with_shared_models, scrape

pytestmark = pytest.mark.integration

REQUESTS = 240
WINDOW = 60


@dataclass
class Served:
    endpoints: Endpoints
    home: Path  # the deployment's KUBELOOP_HOME (each test gets a home of its own)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    deployment = ModelDeployment.model_validate(
        {"metadata": {"name": "arrests"}, "spec": {"model": "arrests", "version": 1, "drift": {"window": WINDOW}}}
    )
    # the registry is read in the home the first context sets
    with (
        home_with_shared_models(tmp_path_factory, "feedback-home") as home,
        LocalDeployment(deployment, Registry()) as local,
    ):
        yield Served(local.start(), home)


def _sidecar_status(served: Served) -> dict:
    return httpx.get(f"{served.endpoints.sidecar}/status", timeout=10).json()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def test_labels_posted_later_are_joined_and_the_live_metrics_match_a_direct_computation(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = served.endpoints.servers[1]
    frame = arrests_frame().sample(REQUESTS, random_state=3)
    labels = frame.pop("released").tolist()
    answered: dict[str, tuple[float, str]] = {}
    with httpx.Client(timeout=10) as client:
        for i, row in enumerate(frame.to_dict("records")):
            # half the clients name their request (ce-id), the others learn the id the server gave it
            headers = {"ce-id": f"client-{i}"} if i % 2 else {}
            response = client.post(f"{server}/v1/models/arrests:predict", json={"instances": [row]}, headers=headers)
            assert response.status_code == 200
            request_id = response.headers["ce-id"]
            assert request_id == f"client-{i}" or i % 2 == 0
            answered[request_id] = (response.json()["predictions"][0], labels[i])
        _wait_for(lambda: _sidecar_status(served)["versions"]["1"]["events"]["response"] == REQUESTS, 60, "responses")

        # labels for 90% of the requests, shuffled, in batches of 50; 10% never labelled
        ids = list(answered)
        random.Random(5).shuffle(ids)
        labelled, never = ids[: int(REQUESTS * 0.9)], ids[int(REQUESTS * 0.9) :]
        for start in range(0, len(labelled), 50):
            body = {"feedback": [{"id": rid, "label": answered[rid][1]} for rid in labelled[start : start + 50]]}
            answer = client.post(f"{server}/v1/models/arrests:feedback", json=body)
            assert answer.status_code == 202 and answer.json()["accepted"] == len(body["feedback"])
        again = {
            "feedback": [
                {"id": labelled[0], "labels": [answered[labelled[0]][1]]},
                {"id": "never-served", "label": "No"},
            ]
        }
        assert client.post(f"{server}/v1/models/arrests:feedback", json=again).status_code == 202
        wrong = client.post(
            f"{server}/v1/models/arrests:feedback",
            json={"feedback": [{"id": never[0], "label": "Yes"}, {"id": never[1], "labels": [0.5]}]},
        )
        assert wrong.status_code == 400 and "feedback[1].labels[0]" in wrong.json()["error"]

    def joined() -> bool:
        return _sidecar_status(served)["feedback"].get("unknown", 0) == 1

    _wait_for(joined, 60, "every feedback event joined")
    status = _sidecar_status(served)
    assert status["feedback"] == {"joined": len(labelled), "duplicate": 1, "unknown": 1}
    outcomes = status["versions"]["1"]["outcomes"]
    # the live metrics are on the last WINDOW labelled rows, in the order their labels came
    window = labelled[-WINDOW:]
    scores = np.array([answered[rid][0] for rid in window])
    truth = np.array([answered[rid][1] == "Yes" for rid in window])
    assert outcomes["labelledTotal"] == len(labelled) and outcomes["live"]["rows"] == WINDOW
    assert outcomes["live"]["rocAuc"] == pytest.approx(skm.roc_auc_score(truth, scores))
    assert outcomes["live"]["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == truth))
    assert outcomes["live"]["positiveRate"] == pytest.approx(truth.mean())
    text = httpx.get(f"{served.endpoints.sidecar}/metrics", timeout=10).text
    assert scrape(text, "kubeloop_live_metric", model="arrests", version="1", metric="rocAuc") == pytest.approx(
        outcomes["live"]["rocAuc"]
    )
    assert scrape(text, "kubeloop_feedback_labels_total", model="arrests", result="joined") == len(labelled)
    assert scrape(text, "kubeloop_live_metric", model="arrests", version="1", metric="rows") == WINDOW
    # every labelled row's log loss summed (the canary analysis's Welch test reads these counters' increase)
    every = np.clip([answered[rid][0] for rid in labelled], 1e-7, 1 - 1e-7)
    every_truth = np.array([answered[rid][1] == "Yes" for rid in labelled], dtype=float)
    per_row = -(every_truth * np.log(every) + (1 - every_truth) * np.log(1 - every))
    version = {"model": "arrests", "version": "1"}
    assert scrape(text, "kubeloop_labelled_rows_total", **version) == len(labelled)
    loss_total = scrape(text, "kubeloop_labelled_loss_total", **version)
    assert loss_total == pytest.approx(skm.log_loss(every_truth, every) * len(labelled))
    assert scrape(text, "kubeloop_labelled_loss_squared_total", **version) == pytest.approx(np.sum(per_row**2))
    # the estimate without labels, refreshed with each drift window (REQUESTS = 4 windows): an interval
    estimated = outcomes["estimated"]["accuracy"]
    assert 0 <= estimated["low"] <= estimated["value"] <= estimated["high"] <= 1
    # the model card puts the served performance beside the evaluated one
    monkeypatch.setenv("KUBELOOP_HOME", str(served.home))
    registry = Registry()
    record = registry.resolve("arrests:1")
    card = render(record, registry, sidecar=served.endpoints.sidecar)
    section = card[card.index('id="served"') :]
    evaluated = record.spec.metrics.overall.roc_auc
    row = f"<td><code>rocAuc</code></td><td>{evaluated:.3f}</td><td>{outcomes['live']['rocAuc']:.3f}</td>"
    assert row in section, section[:2000]


def test_a_body_that_is_no_feedback_is_refused_saying_what_was_expected(served: Served) -> None:
    server = served.endpoints.servers[1]
    not_json = httpx.post(f"{server}/v1/models/arrests:feedback", content=b"{nope", timeout=10)
    assert not_json.status_code == 400 and "body: not JSON" in not_json.json()["error"]
    empty = httpx.post(f"{server}/v1/models/arrests:feedback", json={"labels": [1]}, timeout=10)
    assert empty.status_code == 400 and empty.json()["error"].startswith("feedback: expected")


def test_the_traffic_pump_labels_its_share_of_requests_by_the_id_the_server_answered(served: Served) -> None:
    before = _sidecar_status(served)
    joined_before = before["feedback"].get("joined", 0)
    responses_before = before["versions"]["1"]["events"]["response"]
    frame = arrests_frame()
    pump = TrafficPump("arrests", frame.drop(columns="released"), frame["released"], label_share=0.5)
    pump.start(served.endpoints.servers[1])
    time.sleep(4)
    pump.stop()
    assert pump.sent > 20 and pump.failed == 0
    assert pump.feedback_failed == 0 and 0.3 * pump.sent < pump.feedback_sent < 0.7 * pump.sent

    def joined() -> bool:
        return _sidecar_status(served)["feedback"].get("joined", 0) - joined_before == pump.feedback_sent

    _wait_for(joined, 30, "the pump's feedback joined")
    status = _sidecar_status(served)
    assert status["versions"]["1"]["events"]["response"] - responses_before == pump.sent
    assert status["feedback"].get("unknown", 0) == before["feedback"].get("unknown", 0)  # every id was one served
    assert (
        status["versions"]["1"]["outcomes"]["labelledTotal"] - before["versions"]["1"]["outcomes"]["labelledTotal"]
        == pump.feedback_sent * pump.batch
    )
