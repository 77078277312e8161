"""Canaries on real pods: version 2 beside version 1, traffic through the Gateway (Traefik, weighted by the
operator's HTTPRoute), the operator's analysis judging each interval from Prometheus. A good candidate: every step's
share as the client measured it within 5 points of the step, then promoted, every request answered by version 2. A
broken one (its weights scrambled, kubeloop.broken_candidates): rolled back within two judged intervals, its
ModelVersion Rejected and kept, every request answered by version 1 again. The loop: drifted traffic, status.drift
Drift, the operator's retraining TrainingJob, its version rolled out as the canary and promoted."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client

from operators.settings import Settings
from tests.e2e.workloads import (
    GATEWAY,
    client_log,
    finished_client,
    finished_training,
    image,
    ready_predictor,
    start_client,
    train,
    trainingjob,
)  # fmt: skip
from tests.support.clusterkit import wait_for
from tests.support.operatorkit import GROUP, VERSION, create, kubeloop_obj, sample
from tests.support.serving_requests import GOOD, v2_body

pytestmark = pytest.mark.timeout(1800)  # two trainings, two predictors, the analysis' intervals
INTERVAL_S = 20
STEPS = [20, 50, 100]
# latency and prediction shift loose for the good candidate (a 2-core machine runs the whole cluster; the split is
# what that test measures); the broken one is judged on the default prediction shift (0.2)
LOOSE = {"maxErrorRate": 0.05, "maxP99LatencyRatio": 10, "maxPredictionShift": 1, "failOnDrift": False}
STRICT = {"maxErrorRate": 0.05, "maxP99LatencyRatio": 10, "failOnDrift": False}
# one v2 request at a time, ~25 a second, counted per second by the version that answered
TRAFFIC = """
import json, sys, time, urllib.error, urllib.request
url, host, body, seconds = sys.argv[1], sys.argv[2], sys.argv[3].encode(), float(sys.argv[4])
end, second, counts = time.time() + seconds, int(time.time()), {}
while time.time() < end:
    sent = time.time()
    request = urllib.request.Request(url, body, {"content-type": "application/json", "host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            key = "v" + json.load(answer)["model_version"]
    except urllib.error.HTTPError as error:
        key = f"http{error.code}"
    except OSError:
        key = "error"
    if int(sent) != second:
        print(json.dumps({"t": second, **counts}), flush=True)
        second, counts = int(sent), {}
    counts[key] = counts.get(key, 0) + 1
    time.sleep(max(0.0, 0.04 - (time.time() - sent)))
"""


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _seconds(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


# the broken candidate: version 1's artifact with its weights scrambled, written beside the registry on the
# KUBELOOP_HOME volume by a pod of the training image; its ModelVersion printed (JSON) for the test to create
GARBAGE = """
import json, sys, yaml
from pathlib import Path
from kubeloop.api.modelversion import ModelVersion
from kubeloop.broken_candidates import garbage_record
record = ModelVersion.model_validate(json.loads(sys.argv[1]))
print(json.dumps(yaml.safe_load(garbage_record(record, Path(sys.argv[2])).read_text())))
"""


def _md(api: client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    return kubeloop_obj(api, "modeldeployments", namespace, "arrests") or {}


def _analysis(checks: dict[str, Any]) -> dict[str, Any]:
    return {"steps": STEPS, "interval": f"{INTERVAL_S}s", "maxFailedChecks": 2, "checks": checks}


def _serve_v1_with_traffic(
    core: client.CoreV1Api, api: client.CustomObjectsApi, namespace: str, image: str, row: dict[str, Any] = GOOD,
    **spec: Any,
) -> None:  # fmt: skip
    """The sample ModelDeployment at version 1 (spec fields replaced by ``spec``), and the traffic pod sending v2
    requests of ``row`` through the Gateway."""
    doc = sample("modeldeployment")
    # both predictors mount the ReadWriteOnce KUBELOOP_HOME, so share one 2-core node: a quarter CPU each server
    doc["spec"]["resources"]["cpu"] = "250m"
    doc["spec"].update(spec)
    create(api, namespace, doc)
    ready_predictor(core, namespace, "serving.kserve.io/inferenceservice=arrests")
    host = f"arrests.{namespace}.{Settings().gateway_domain}"
    url = f"{GATEWAY}/v2/models/arrests/infer"
    start_client(core, namespace, "traffic", image, TRAFFIC, url, host, json.dumps(v2_body([row])), "1800")
    wait_for(lambda: len(_seconds(client_log(core, namespace, "traffic"))) >= 3, 300, "the traffic pod's first seconds")


def _rolled_out(api: client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    """The ModelDeployment's status once its canary is Promoted or RolledBack."""
    return wait_for(
        lambda: (_md(api, namespace).get("status") or {}).get("canaryPhase") in ("Promoted", "RolledBack")
        and _md(api, namespace)["status"],
        900, "the canary Promoted or RolledBack", 5,
    )  # fmt: skip


def _canary_to_the_end(api: client.CustomObjectsApi, namespace: str, checks: dict[str, Any]) -> dict[str, Any]:
    """Set version 2 as the canary and return the ModelDeployment's status once Promoted or RolledBack."""
    patch = {"spec": {"canary": {"version": 2, "trafficPercent": STEPS[0], "analysis": _analysis(checks)}}}
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "modeldeployments", "arrests", patch)
    return _rolled_out(api, namespace)


def _all_answered_by(core: client.CoreV1Api, namespace: str, version: str) -> None:
    def only() -> bool:
        last = _seconds(client_log(core, namespace, "traffic"))[-3:]
        return len(last) == 3 and all(set(s) - {"t"} == {version} for s in last)

    wait_for(only, 300, f"every request answered by {version}", 2)


def _judged(history: list[dict[str, Any]], seconds: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int, int]]:
    """Each decision after the canary's start that judged traffic, with the requests v1 and v2 answered inside its
    interval (as the client counted them); the interval before KServe reports the canary ready is left out."""
    start = next(e for e in history if e["action"] == "start" and e["candidate"] == 2)
    out = []
    for entry in history[history.index(start) + 1 :]:
        if entry["action"] not in ("hold", "advance", "promote", "rollback"):
            continue  # not the canary analysis' (drift, retraining)
        end = _time(entry["time"])
        # the interval judged ends at the entry; its first and last seconds can straddle a change of weights
        window = [s for s in seconds if end - INTERVAL_S + 2 <= s["t"] <= end - 2]
        v1, v2 = sum(s.get("v1", 0) for s in window), sum(s.get("v2", 0) for s in window)
        failed = sum(n for s in window for k, n in s.items() if k not in ("t", "v1", "v2"))
        if {c["name"]: c["status"] for c in entry["checks"]}.get("errorRate") == "skip":
            assert v2 == 0 and entry["action"] == "hold", (entry, v1, v2)  # no share given yet
            continue
        assert v1 + v2 >= 100 and failed == 0, (entry["time"], v1, v2, failed)
        out.append((entry, v1, v2))
        if entry["action"] in ("promote", "rollback"):
            break
    return out


def _split_within_5_points(
    history: list[dict[str, Any]], seconds: list[dict[str, Any]]
) -> list[tuple[int, float, int]]:
    """(step %, share % the client measured, requests) of each judged interval, each share within 5 points of its
    step, and every step below 100 judged on measured traffic."""
    measured = []
    for entry, v1, v2 in _judged(history, seconds):
        share = 100 * v2 / (v1 + v2)
        measured.append((entry["trafficPercent"], round(share, 1), v1 + v2))
        assert abs(share - entry["trafficPercent"]) <= 5, (entry, v1, v2)
    assert set(STEPS[:-1]) <= {m[0] for m in measured}, measured
    return measured


def test_a_canary_moves_through_its_steps_at_the_measured_split_and_is_promoted(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, chart_values: dict[str, Any]
) -> None:
    assert train(api, namespace, trainingjob())["spec"]["version"] == 1
    assert train(api, namespace, trainingjob("arrests-mlp-seed8", seed=8))["spec"]["version"] == 2
    _serve_v1_with_traffic(
        core, api, namespace, f"{chart_values['image']['repository']}:{chart_values['image']['tag']}"
    )

    started = time.time()
    status = _canary_to_the_end(api, namespace, LOOSE)
    assert status["canaryPhase"] == "Promoted", json.dumps(status.get("history"), indent=1)
    promoted = time.time()
    _all_answered_by(core, namespace, "v2")  # KServe rolls the stable predictor over to version 2
    at_100 = time.time() - started
    seconds = _seconds(client_log(core, namespace, "traffic"))
    core.delete_namespaced_pod("traffic", namespace, grace_period_seconds=0)

    measured = _split_within_5_points(status["history"], seconds)
    spec = _md(api, namespace)["spec"]
    assert spec["version"] == 2 and "canary" not in spec, spec
    print(
        f"\ne2e canary: (step %, measured %, requests) {measured}; promoted {promoted - started:.0f} s after the "
        f"canary was set, every request on version 2 after {at_100:.0f} s"
    )


def test_a_broken_canary_is_rolled_back_within_two_intervals_and_rejected(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, chart_values: dict[str, Any]
) -> None:
    v1 = train(api, namespace, trainingjob())
    home = chart_values["storage"]["mountPath"]
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="garbage"),
        spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[client.V1Container(
                name="client", image=image(chart_values, "training"),
                command=["python", "-c", GARBAGE, json.dumps(v1), f"{home}/broken/arrests-v2"],
                volume_mounts=[client.V1VolumeMount(name="home", mount_path=home)],
            )],
            volumes=[client.V1Volume(name="home", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                claim_name=chart_values["storage"]["pvcName"]))],
            security_context=client.V1PodSecurityContext(fs_group=chart_values["storage"]["userId"]),
        ),
    ))  # fmt: skip
    record = json.loads(finished_client(core, namespace, "garbage", timeout=600).strip().splitlines()[-1])
    broken = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelVersion",
        "metadata": {"name": "arrests-v2", "labels": {"kubeloop.dev/model": "arrests", "kubeloop.dev/version": "2"}},
        "spec": {**record["spec"], "version": 2},
    }  # fmt: skip
    create(api, namespace, broken)
    _serve_v1_with_traffic(
        core, api, namespace, f"{chart_values['image']['repository']}:{chart_values['image']['tag']}"
    )

    started = time.time()
    status = _canary_to_the_end(api, namespace, STRICT)
    history = status.get("history") or []
    assert status["canaryPhase"] == "RolledBack", json.dumps(history, indent=1)
    _all_answered_by(core, namespace, "v1")
    back = time.time() - started
    seconds = _seconds(client_log(core, namespace, "traffic"))
    core.delete_namespaced_pod("traffic", namespace, grace_period_seconds=0)

    judged = _judged(history, seconds)
    assert [e["action"] for e, _, _ in judged] == ["hold", "rollback"], [e["reason"] for e, _, _ in judged]
    assert all(e["trafficPercent"] == STEPS[0] for e, _, _ in judged)
    for entry, _, _ in judged:  # each judged interval failed on the scrambled predictions, and on nothing else
        failed = sorted(c["name"] for c in entry["checks"] if c["status"] == "fail")
        assert failed == ["predictionShift"], entry
    mv = kubeloop_obj(api, "modelversions", namespace, "arrests-v2")
    assert mv is not None and mv["spec"]["stage"] == "Rejected", mv  # kept, never deleted
    spec = _md(api, namespace)["spec"]
    assert spec["version"] == 1 and "canary" not in spec, spec
    print(
        f"\ne2e rollback: {[(e['action'], e['trafficPercent'], v2) for e, _, v2 in judged]} (action, %, v2 "
        f"requests); rolled back and every request on version 1 {back:.0f} s after the canary was set"
    )


def test_drifted_traffic_retrains_and_the_retrained_version_is_rolled_out(
    api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, chart_values: dict[str, Any]
) -> None:
    # the retraining's Ray pods start beside the serving predictor, on the node of KUBELOOP_HOME: a quarter CPU per
    # worker (the copy keeps arrests-mlp's spec) leaves room for both on its 2 cores
    assert train(api, namespace, trainingjob(cpu="250m"))["spec"]["version"] == 1
    retrain = {"enabled": True, "sustainedFor": "20s", "minInterval": "1h", "trainingJob": "arrests-mlp",
               "analysis": _analysis(LOOSE)}  # fmt: skip
    shifted = {**GOOD, "age": GOOD["age"] + 25}  # every request 25 years older than its training row
    _serve_v1_with_traffic(core, api, namespace, image(chart_values), shifted, retrain=retrain)
    first = time.time()

    def status() -> dict[str, Any]:
        return _md(api, namespace).get("status") or {}

    wait_for(lambda: (status().get("drift") or {}).get("state") == "Drift", 300, "status.drift Drift", 2)
    drifted = time.time() - first
    retraining = wait_for(lambda: (status().get("retrain") or {}).get("trainingJob"), 300, "the retraining job", 2)
    triggered = time.time() - first
    trained = finished_training(api, namespace, retraining)
    assert trained["phase"] == "Succeeded", trained
    assert kubeloop_obj(api, "modelversions", namespace, trained["modelVersion"])["spec"]["version"] == 2
    retrained = time.time() - first
    final = _rolled_out(api, namespace)
    assert final["canaryPhase"] == "Promoted", json.dumps(final.get("history"), indent=1)
    promoted = time.time() - first
    _all_answered_by(core, namespace, "v2")
    at_100 = time.time() - first
    seconds = _seconds(client_log(core, namespace, "traffic"))
    core.delete_namespaced_pod("traffic", namespace, grace_period_seconds=0)

    measured = _split_within_5_points(final["history"], seconds)
    print(
        f"\ne2e loop, seconds from the first drifted request: status.drift Drift {drifted:.0f}, retraining job "
        f"{retraining} created {triggered:.0f}, version 2 registered {retrained:.0f}, promoted {promoted:.0f}, "
        f"every request on version 2 {at_100:.0f}; (step %, measured %, requests) {measured}"
    )
