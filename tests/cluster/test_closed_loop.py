"""The closed loop in the cluster: drift (or live performance on labels) -> retraining -> the gate -> canary
analysis -> promotion or rollback.

Real: the kube-apiserver (dev control plane), the operator (``python -m operators`` as the chart's ServiceAccount,
RBAC enforced, its default queries) and a Prometheus server (Debian's binary, started by
kubeloop.analysis.prometheus) scraping a loopback exporter every second with the test's namespace as a target label
(as Kubernetes service discovery would); the operator reads its signals through Prometheus's HTTP API only.

Real too, from the ``upstream`` fixture: the KubeRay operator (the retraining RayJob becomes a RayCluster) and KServe
(its webhooks admit each InferenceService the analysis writes, its controller makes the canary Deployments).

Played by the test, because it cannot run here: the serving stack's metrics (serving_exporter.ServingExporter, whose
traffic follows the weights of the HTTPRoute the operator writes), and the training run: the run's result in its
ConfigMap and the Ray job's final status, which KubeRay would read from the Ray dashboard (test_operator.py proves
the run's side).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import yaml
from kubernetes import client
from serving_exporter import Behaviour, ServingExporter, scraped, split_of

from kubeloop.analysis.prometheus import EmbeddedPrometheus
from operators import rayjob as rj
from tests.cluster import operator_checks
from tests.support.clusterkit import Cluster, wait_for
from tests.support.operatorkit import (
    OperatorProcess,
    create,
    kubeloop_obj,
    modelversion_doc,
    rayjob,
    sample,
)

INTERVAL_S = 3
ANALYSIS = {"steps": [10, 25, 50, 100], "interval": f"{INTERVAL_S}s", "maxFailedChecks": 2}


prometheus = pytest.fixture(operator_checks.real_prometheus, scope="module", name="prometheus")
analysing_operator = pytest.fixture(operator_checks.analysing_operator, scope="module", name="analysing_operator")


@pytest.fixture
def exporter(
    cluster: Cluster, prometheus: EmbeddedPrometheus, namespace: str, kubeloop_home: str
) -> Iterator[ServingExporter]:
    """The serving stack's metrics for deployment ``arrests``; its predictor pods (KServe's, on kwok nodes) mount
    ``kubeloop_home``, so they run and KServe reports a canary ready, which the route waits for."""
    served = scraped(client.CustomObjectsApi(cluster.client()), prometheus, namespace)
    yield served
    served.stop()


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def waited_then_judged(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the analysis' decisions after its start: the canary's first requests reach Prometheus a scrape or two
    after the route gives it its share, so the first interval may hold with no candidate requests (no failed check:
    "0 candidate requests"); at most one such interval, then the judged ones."""
    waiting = [e for e in entries if {c["name"]: c["status"] for c in e["checks"]}.get("errorRate") == "skip"]
    assert len(waiting) <= 1 and entries[: len(waiting)] == waiting, entries
    assert all(e["action"] == "hold" and e["failedChecks"] == 0 for e in waiting), waiting
    return waiting, entries[len(waiting) :]


def deployment(**spec: Any) -> dict[str, Any]:
    doc = sample("modeldeployment")
    doc["spec"].update(spec)
    return doc


def md_of(api: client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    return kubeloop_obj(api, "modeldeployments", namespace, "arrests") or {}


def history(api: client.CustomObjectsApi, namespace: str) -> list[dict[str, Any]]:
    return (md_of(api, namespace).get("status") or {}).get("history") or []


def reasons(core: client.CoreV1Api, namespace: str) -> set[str]:
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=arrests").items
    return {e.reason for e in events}


def finish_training_run(api: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, tj: str, version: int):
    """The run, played: it publishes version `version` into its ConfigMap, and the Ray job succeeds (the status
    KubeRay would read from the Ray dashboard, written into the RayJob that the real KubeRay is running)."""
    wait_for(lambda: rayjob(api, namespace, tj), 60, f"the RayJob of {tj}")
    result = modelversion_doc(version)
    result["spec"]["lineage"]["trainingJob"] = f"{namespace}/{tj}"
    result["spec"]["stage"] = "Candidate"
    result["spec"]["gate"] = {"passed": True, "reasons": [], "comparedWith": "arrests-v1"}
    core.patch_namespaced_config_map(
        f"{tj}-trainingjob", namespace, {"data": {rj.RESULT_KEY: yaml.safe_dump(result, sort_keys=False)}}
    )
    api.patch_namespaced_custom_object_status(
        "ray.io", "v1", namespace, "rayjobs", tj,
        {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-23T10:00:00Z"}},
    )  # fmt: skip


def test_sustained_drift_retrains_and_the_canary_walks_the_steps_to_promotion(
    analysing_operator: OperatorProcess, exporter: ServingExporter, api: client.CustomObjectsApi,
    core: client.CoreV1Api, namespace: str,
) -> None:  # fmt: skip
    v1 = modelversion_doc(1)
    v1["spec"]["stage"] = "Production"
    create(api, namespace, v1)
    create(api, namespace, sample("trainingjob"))  # the job that trained v1: what retraining copies
    retrain = {"enabled": True, "sustainedFor": "2s", "minInterval": "1h", "trainingJob": "arrests-mlp"}
    create(api, namespace, deployment(retrain={**retrain, "analysis": ANALYSIS}))
    exporter.behaviour[1] = Behaviour(drift=False)

    wait_for(lambda: (md_of(api, namespace).get("status") or {}).get("drift", {}).get("state") == "NoDrift",
             30, "status.drift NoDrift from Prometheus")  # fmt: skip
    exporter.behaviour[1].drift = True
    wait_for(lambda: (md_of(api, namespace).get("status") or {}).get("drift", {}).get("state") == "Drift",
             30, "status.drift Drift")  # fmt: skip

    # sustained drift -> a TrainingJob copied from arrests-mlp onto fresh data, owned by the deployment
    retrain_status = wait_for(
        lambda: (md_of(api, namespace).get("status") or {}).get("retrain", {}).get("trainingJob") and
        md_of(api, namespace)["status"]["retrain"],
        30, "a retraining TrainingJob",
    )  # fmt: skip
    name = retrain_status["trainingJob"]
    tj = kubeloop_obj(api, "trainingjobs", namespace, name)
    template = kubeloop_obj(api, "trainingjobs", namespace, "arrests-mlp")["spec"]
    assert "digest" not in tj["spec"]["dataset"] and tj["spec"]["dataset"]["baseline"] == "none"
    fresh = {k: v for k, v in tj["spec"]["dataset"].items() if k not in ("digest", "baseline")}
    assert fresh == {k: v for k, v in template["dataset"].items() if k not in ("digest", "baseline")}
    assert {k: v for k, v in tj["spec"].items() if k != "dataset"} == {
        k: v for k, v in template.items() if k != "dataset"
    }
    (ref,) = tj["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"]) == ("ModelDeployment", "arrests")
    assert tj["metadata"]["labels"]["kubeloop.dev/retrain-of"] == "arrests-mlp"
    assert history(api, namespace)[-1]["action"] == "retrain"
    assert "drift sustained" in history(api, namespace)[-1]["reason"]

    # the run registers v2 (gate passed) -> v2 becomes the canary, at the first step
    exporter.behaviour[2] = Behaviour(drift=False)
    finish_training_run(api, core, namespace, name, 2)
    # 60 s timed out once in a full .ci/run (the first cluster test, 2 busy cores); alone it takes seconds
    canary = wait_for(lambda: md_of(api, namespace)["spec"].get("canary"), 120, "the canary of v2")
    assert canary["version"] == 2 and canary["trafficPercent"] == 10
    assert canary["analysis"]["steps"] == ANALYSIS["steps"]

    # the analysis walks 10 -> 25 -> 50 -> 100 on Prometheus's signals, and promotes
    wait_for(lambda: md_of(api, namespace)["spec"]["version"] == 2, 8 * INTERVAL_S + 30, "v2 promoted")
    seen = [split.get(2) for split in exporter.splits_seen if 2 in split]
    assert [p for p in (10, 25, 50, 100) if p in seen] == [10, 25, 50, 100], exporter.splits_seen
    assert seen == sorted(seen), f"traffic to v2 only ever grew: {exporter.splits_seen}"
    md = md_of(api, namespace)
    assert "canary" not in md["spec"] and md["status"]["canaryPhase"] == "Promoted"
    entries = history(api, namespace)
    actions = [entry["action"] for entry in entries]
    started = actions.index("start")
    assert actions[actions.index("retrain") : started + 1] == ["retrain", "start"]
    _, judged = waited_then_judged(entries[started + 1 :])
    assert [entry["action"] for entry in judged] == ["advance", "advance", "advance", "promote"], entries
    for entry in history(api, namespace)[-4:]:
        assert {c["name"]: c["status"] for c in entry["checks"]}["errorRate"] == "pass", entry
    # the registry is updated before the deployment moves: seeing v2 stable means it is Production already
    assert kubeloop_obj(api, "modelversions", namespace, "arrests-v2")["spec"]["stage"] == "Production"
    assert kubeloop_obj(api, "modelversions", namespace, "arrests-v1")["spec"]["stage"] == "Archived"
    wait_for(lambda: split_of(api, namespace, "arrests") == {2: 100}, 30, "v2 at 100%")
    expected = {"Retraining", "RetrainedVersionReady", "CanaryStarted", "CanaryAdvanced", "CanaryPromoted"}
    wait_for(lambda: expected <= reasons(core, namespace), 30, f"Events {sorted(expected)}")  # posted asynchronously


def test_failing_metrics_roll_the_canary_back_within_two_intervals(
    analysing_operator: OperatorProcess, exporter: ServingExporter, api: client.CustomObjectsApi,
    core: client.CoreV1Api, namespace: str,
) -> None:  # fmt: skip
    for version in (1, 3):
        create(api, namespace, modelversion_doc(version))
    exporter.behaviour[1] = Behaviour()
    exporter.behaviour[3] = Behaviour(error_rate=0.3)  # a broken candidate: 30% of its requests fail
    create(api, namespace, deployment(canary={"version": 3, "trafficPercent": 10, "analysis": copy.deepcopy(ANALYSIS)}))

    started = wait_for(
        lambda: next((e for e in history(api, namespace) if e["action"] == "start"), None), 30, "the canary started"
    )
    wait_for(lambda: "canary" not in md_of(api, namespace)["spec"], 4 * INTERVAL_S + 20, "the rollback")
    entries = history(api, namespace)
    after_start = entries[entries.index(started) + 1 :]
    waiting, judged = waited_then_judged(after_start)
    assert [e["action"] for e in judged] == ["hold", "rollback"], judged
    assert all(e["trafficPercent"] == 10 for e in judged)
    # counted from the opening of the first window judged (the analysis waits, unjudged, while KServe readies the
    # canary and the route holds its share back)
    opened = _time(after_start[0]["time"]) - timedelta(seconds=INTERVAL_S)
    took = (_time(judged[-1]["time"]) - opened).total_seconds()
    limit = (2 + len(waiting)) * INTERVAL_S + 3
    assert took <= limit, f"rolled back {took:.0f}s after the canary got traffic: more than two judged intervals"
    assert "error rate" in judged[-1]["reason"] and "rolling back to v1" in judged[-1]["reason"]
    failed = {c["name"]: c for c in judged[-1]["checks"]}["errorRate"]
    assert failed["status"] == "fail" and failed["value"] == pytest.approx(0.3, abs=0.05)

    md = md_of(api, namespace)
    assert md["spec"]["version"] == 1 and md["status"]["canaryPhase"] == "RolledBack"

    def rejected() -> dict[str, Any] | None:  # marked right after the spec stops naming it; never deleted
        mv = kubeloop_obj(api, "modelversions", namespace, "arrests-v3")
        return mv if mv and mv["spec"]["stage"] == "Rejected" else None

    v3 = wait_for(rejected, 10, "v3 Rejected")
    assert "error rate" in v3["spec"]["stageReason"]
    wait_for(lambda: split_of(api, namespace, "arrests") == {1: 100}, 30, "100% back to v1")
    wait_for(lambda: "CanaryRolledBack" in reasons(core, namespace), 30, "the CanaryRolledBack Event")


def test_live_performance_below_its_threshold_retrains(
    analysing_operator: OperatorProcess, exporter: ServingExporter, api: client.CustomObjectsApi,
    core: client.CoreV1Api, namespace: str,
) -> None:  # fmt: skip
    """spec.retrain.on performance: the stable version's live metric on labels (kubeloop_live_metric, read through
    Prometheus), not its drift, starts the retraining."""
    v1 = modelversion_doc(1)
    v1["spec"]["stage"] = "Production"
    create(api, namespace, v1)
    create(api, namespace, sample("trainingjob"))
    exporter.behaviour[1] = Behaviour(drift=True, live={"rows": 80.0, "rocAuc": 0.6})  # drifting: not the trigger
    performance = {"metric": "rocAuc", "threshold": 0.7, "minLabels": 100}
    retrain = {"enabled": True, "on": "performance", "performance": performance, "sustainedFor": "2s",
               "minInterval": "1h", "trainingJob": "arrests-mlp"}  # fmt: skip
    create(api, namespace, deployment(retrain=retrain))

    wait_for(lambda: (md_of(api, namespace).get("status") or {}).get("drift", {}).get("state") == "Drift",
             30, "status.drift Drift")  # fmt: skip
    assert "retrain" not in md_of(api, namespace)["status"]  # 80 labelled rows: too few to trust the metric
    exporter.behaviour[1].live = {"rows": 400.0, "rocAuc": 0.6}
    wait_for(lambda: (md_of(api, namespace).get("status") or {}).get("retrain", {}).get("trainingJob"),
             30, "a retraining TrainingJob")  # fmt: skip
    (entry,) = [e for e in history(api, namespace) if e["action"] == "retrain"]
    assert entry["reason"].startswith("live rocAuc 0.600 on 400 labelled rows is worse than 0.7 sustained for")
    wait_for(lambda: {"RetrainTriggered", "Retraining"} <= reasons(core, namespace), 30, "the retrain Events")
