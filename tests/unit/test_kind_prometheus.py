"""The Prometheus of a kind cluster made here (platform/kind/prometheus.yaml) scrapes the same predictor ports as the
chart's PodMonitor, with the labels the operator's queries select on. (Debian's promtool cannot check the file: its
build has no Kubernetes discovery; tests/e2e/test_serving.py reads the series it scrapes.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _config() -> str:
    docs = yaml.safe_load_all((REPO / "platform/kind/prometheus.yaml").read_text())
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return config_map["data"]["prometheus.yml"]


def test_the_predictor_job_keeps_the_ports_of_the_charts_podmonitor() -> None:
    template = (REPO / "helm/kubeloop/templates/podmonitor.yaml").read_text()
    podmonitor_ports = set(re.findall(r"- port: (\S+)", template))
    (job,) = [j for j in yaml.safe_load(_config())["scrape_configs"] if j["job_name"] == "kubeloop-predictors"]
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["source_labels"][-1] == "__meta_kubernetes_pod_container_port_name"
    ports = set(re.fullmatch(r"kubeloop;inference;true;\((.*)\)", keep["regex"]).group(1).split("|"))
    assert ports == podmonitor_ports == {"http1", "user-port", "drift-metrics"}
    labels = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert {"namespace", "pod", "container", "endpoint"} <= labels  # what a PodMonitor's scrape adds
