"""What a model's serving stack exports to Prometheus, played on loopback for the cluster tests.

No KServe data plane, model server or drift sidecar runs on the dev control plane, so this exporter stands in for
them: it exports the series the operator's queries read by default (kubeloop.analysis.Queries.cluster(): the model
server's requests by code, latency and prediction histograms, the drift sidecar's flag, its live metrics on labels and
its estimates without labels) for traffic generated at `rate` requests per second and split by the weights of the
HTTPRoute the operator owns for the deployment (the stable predictor Service ``<isvc>-predictor``, a canary's
``<isvc>-v<N>-predictor``), as a Gateway would split it; a RequestMirror filter on the route (a shadow) copies its
``percent`` of the requests to the shadow's version, whose answers nobody sees.
What each version does (error rate, latency, predictions, drift, outcomes) is set by the test.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubeloop.analysis.prometheus import EmbeddedPrometheus
from tests.support.clusterkit import wait_for
from tests.support.operatorkit import GROUP, VERSION, free_port, get, owned_by, routed

GOLDEN = 0.6180339887498949  # low-discrepancy predictions: two versions with the same spread look the same at once
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PREDICTION_BUCKETS = tuple(i / 10 for i in range(1, 10))


@dataclass
class Behaviour:
    error_rate: float = 0.0  # share of requests answered 500
    latency_s: float = 0.02
    prediction_low: float = 0.1  # predictions spread evenly over [low, high]
    prediction_high: float = 0.9
    drift: bool | None = False  # None: no detector reports this version
    live: dict[str, float] = field(default_factory=dict)  # kubeloop_live_metric by metric, `rows` included
    estimated: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # metric -> (value, low, high)


Split = dict[int, int]  # version -> percent of the traffic


def split_of(api: Any, namespace: str, name: str) -> Split:
    """How a Gateway splits ModelDeployment ``name``'s traffic: its HTTPRoute's weights, per model version."""
    md = get(api, GROUP, VERSION, "modeldeployments", namespace, name)
    isvc = get(api, "serving.kserve.io", "v1beta1", "inferenceservices", namespace, name)
    weights = routed(api, namespace, md["metadata"]["uid"]) if md else None
    if not weights or not isvc:
        return {}
    stable = int(isvc["metadata"]["annotations"]["kubeloop.dev/stable-version"])
    split: Split = {}
    for service, weight in weights.items():
        found = re.fullmatch(rf"{re.escape(name)}-v(\d+)-predictor", service)
        split[int(found.group(1)) if found else stable] = weight
    return split


def mirror_of(api: Any, namespace: str, name: str) -> tuple[int, int] | None:
    """What a Gateway mirrors of ModelDeployment ``name``'s traffic: (the shadow's version, percent), from the
    RequestMirror filter of its HTTPRoute and the shadow InferenceService it names; None without one."""
    md = get(api, GROUP, VERSION, "modeldeployments", namespace, name)
    items = api.list_namespaced_custom_object("gateway.networking.k8s.io", "v1", namespace, "httproutes")["items"]
    routes = owned_by(items, md["metadata"]["uid"]) if md else []
    filters = [f for route in routes for rule in route["spec"]["rules"] for f in rule.get("filters") or []]
    mirror = next((f["requestMirror"] for f in filters if f["type"] == "RequestMirror"), None)
    shadow = get(api, "serving.kserve.io", "v1beta1", "inferenceservices", namespace, f"{name}-shadow")
    if mirror is None or shadow is None:
        return None
    return int(shadow["metadata"]["annotations"]["kubeloop.dev/shadow-version"]), mirror.get("percent", 100)


class ServingExporter:
    def __init__(
        self, model: str, route: Callable[[], Split], rate: float = 200.0,
        mirror: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:  # fmt: skip
        self.model, self.route, self.rate, self.mirror = model, route, rate, mirror
        self.behaviour: dict[int, Behaviour] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubeloop_requests", "Requests by code.", ["model", "version", "protocol", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "kubeloop_request_duration_seconds", "Request latency.", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.predictions = Histogram(
            "kubeloop_prediction", "Predicted probability.", ["model", "version"],
            buckets=PREDICTION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.drift = Gauge("kubeloop_drift_detected", "Drift flag.", ["model", "version"], registry=self.registry)
        self.live = Gauge(
            "kubeloop_live_metric", "Live metrics on labels.", ["model", "version", "metric"], registry=self.registry
        )
        self.estimated = Gauge(
            "kubeloop_estimated_metric", "Estimates without labels.", ["model", "version", "metric", "bound"],
            registry=self.registry,
        )  # fmt: skip
        self.mirrors_seen: list[tuple[int, int]] = []
        self.served: dict[int, int] = {}
        self.splits_seen: list[Split] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def start(self, port: int) -> str:
        self.port = port
        self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._thread.start()
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.shutdown()

    def _serve(self) -> None:
        request, step, routed = 0, 0.1, 0.0
        split: Split = {}
        mirror: tuple[int, int] | None = None
        while not self._stop.wait(step):
            if time.monotonic() - routed >= 0.5:  # KServe picks up a new split within about half a second
                routed = time.monotonic()
                with contextlib.suppress(Exception):  # the apiserver unreachable for a moment: route as before
                    split, mirror = self.route(), self.mirror()
                if split and (not self.splits_seen or self.splits_seen[-1] != split):
                    self.splits_seen.append(dict(split))
                if mirror and (not self.mirrors_seen or self.mirrors_seen[-1] != mirror):
                    self.mirrors_seen.append(mirror)
            for version, behaviour in list(self.behaviour.items()):
                self._gauges(version, behaviour)
            for _ in range(int(self.rate * step)):
                request += 1
                self._one(request, split, mirror)

    def _gauges(self, version: int, behaviour: Behaviour) -> None:
        label = str(version)
        if behaviour.drift is not None:
            self.drift.labels(self.model, label).set(1.0 if behaviour.drift else 0.0)
        for metric, value in behaviour.live.items():
            self.live.labels(self.model, label, metric).set(value)
        for metric, bounds in behaviour.estimated.items():
            for bound, value in zip(("value", "low", "high"), bounds, strict=True):
                self.estimated.labels(self.model, label, metric, bound).set(value)

    def _one(self, request: int, split: Split, mirror: tuple[int, int] | None) -> None:
        if not split:
            return
        bucket, acc, version = request % 100, 0, next(iter(split))
        for candidate, percent in sorted(split.items(), key=lambda item: item[1]):
            acc += percent
            if bucket < acc:
                version = candidate
                break
        self._answer(version)
        if mirror is not None and (request * GOLDEN) % 1.0 < mirror[1] / 100:
            self._answer(mirror[0])

    def _answer(self, version: int) -> None:
        behaviour = self.behaviour.setdefault(version, Behaviour())
        n = self.served[version] = self.served.get(version, 0) + 1
        failed = (n * GOLDEN) % 1.0 < behaviour.error_rate
        label = str(version)
        self.requests.labels(self.model, label, "v2", "500" if failed else "200").inc()
        self.latency.labels(self.model, label).observe(behaviour.latency_s)
        if not failed:
            spread = behaviour.prediction_high - behaviour.prediction_low
            self.predictions.labels(self.model, label).observe(behaviour.prediction_low + spread * ((n * GOLDEN) % 1))


def scraped(api: Any, prometheus: EmbeddedPrometheus, namespace: str, name: str = "arrests") -> ServingExporter:
    """A started exporter for ModelDeployment ``name`` (model ``arrests``) whose traffic follows its HTTPRoute,
    mirror included, scraped by ``prometheus`` with the namespace as a target label (as Kubernetes service discovery
    would add it). The caller stops it."""
    served = ServingExporter(
        "arrests", lambda: split_of(api, namespace, name), mirror=lambda: mirror_of(api, namespace, name)
    )
    url = served.start(free_port())
    prometheus.scrape("serving", [url], labels={"namespace": namespace})
    wait_for(
        lambda: any(t["health"] == "up" and str(served.port) in t["scrapeUrl"] for t in prometheus.active_targets()),
        30, "Prometheus scraping the exporter",
    )  # fmt: skip
    return served
