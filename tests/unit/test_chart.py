"""The Helm chart: lint --strict, what it renders (labels, Pod Security, least-privilege RBAC, values schema, the
Grafana dashboards behind a value), and the kustomize base in manifests/ generated from it (up to date, equal to the
chart's defaults).

Needs helm ($KUBELOOP_HELM, PATH, or the dev control plane's build, which `./dev test` makes before pytest starts),
promtool and kubectl; a test fails saying how to get one that is missing (tests/support/tools.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop import chart
from operators import admission
from operators.settings import Settings
from tests.support import dashboards, tools

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm/kubeloop"

ALL_ON = [
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "webhook.enabled=true",
]  # fmt: skip

# What the operator does (operators/*handlers.py, operators/children.py, kubeloop/kube.py) and therefore all the
# chart may grant.
EXPECTED_RULES = [
    {"apiGroups": ["kubeloop.dev"], "resources": ["trainingjobs", "modeldeployments", "batchpredictions"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["kubeloop.dev"], "resources": ["trainingjobs"], "verbs": ["create"]},
    {"apiGroups": ["kubeloop.dev"],
     "resources": ["trainingjobs/status", "modeldeployments/status", "batchpredictions/status"], "verbs": ["patch"]},
    {"apiGroups": ["kubeloop.dev"], "resources": ["modelversions"], "verbs": ["get", "list", "create", "patch"]},
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
     "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]  # fmt: skip


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([tools.helm(), *args], capture_output=True, text=True, timeout=120, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "kubeloop", str(CHART_DIR), "--namespace", "kubeloop-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def test_lint_strict_default_and_everything_on() -> None:
    helm("lint", "--strict", str(CHART_DIR))
    helm("lint", "--strict", str(CHART_DIR), *ALL_ON)


def test_default_objects_and_standard_labels() -> None:
    docs = render()
    assert sorted(doc["kind"] for doc in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    for doc in render(*ALL_ON):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubeloop", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == "kubeloop"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/component"] == "operator"
        assert labels["app.kubernetes.io/part-of"] == "kubeloop"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "kubeloop-0.1.0"


def test_deployment_is_pod_security_restricted() -> None:
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # kopf standalone: never two
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == "ghcr.io/kubeloop/operator:0.1.0"
    assert container["command"] == ["python", "-m", "operators"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == "kubeloop-operator"
    assert set(spec["selector"]["matchLabels"].items()) <= set(spec["template"]["metadata"]["labels"].items())


def test_deployment_env_matches_the_operator_settings() -> None:
    """Every KUBELOOP_* variable the chart sets is one operators/settings.py reads, and each setting is set."""
    read = {"KUBELOOP_" + name.upper() for name in Settings.model_fields}
    (container,) = one(render(*ALL_ON), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) == read
    assert env["KUBELOOP_TRAINING_IMAGE"] == "ghcr.io/kubeloop/training:0.1.0"
    assert json.loads(env["KUBELOOP_GPU_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    defaults = {
        e["name"]: e["value"] for e in one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert defaults["KUBELOOP_WEBHOOK_ENABLED"] == "false"
    off = one(render("--set", "metrics.enabled=false"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in off["env"]}["KUBELOOP_METRICS_PORT"] == "0"


def test_rbac_is_exactly_what_the_operator_uses() -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    assert role["rules"] == EXPECTED_RULES
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(rule["verbs"])
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubeloop-operator", "namespace": "kubeloop-system"}
    ]
    assert not [doc for doc in render("--set", "rbac.create=false") if doc["kind"].startswith("ClusterRole")]


def test_monitoring_and_webhook_are_off_by_default_and_render_when_on() -> None:
    kinds = {doc["kind"] for doc in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ValidatingWebhookConfiguration", "Certificate"}
    docs = render(*ALL_ON)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"KubeloopOperatorDown", "KubeloopReconcileErrors", "KubeloopReconcileSlow"}
    webhook = one(docs, "ValidatingWebhookConfiguration")
    paths = {w["clientConfig"]["service"]["path"] for w in webhook["webhooks"]}
    assert paths == {f"/validate-{plural}" for plural in admission.PLURALS}  # kopf serves /<handler id>
    assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "kubeloop-system/kubeloop-webhook"
    certificate = one(docs, "Certificate")
    assert "kubeloop-operator.kubeloop-system.svc" in certificate["spec"]["dnsNames"]
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]


def test_prometheus_rules_are_valid(tmp_path: Path) -> None:
    rule = one(render(*ALL_ON), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run([tools.promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "bad",
    [
        "image.pullPolicy=Sometimes",
        "notAValue=1",
        "storage.mountPath=relative/path",
        "predictor.sidecarPort=70000",
        "metrics.serviceMonitor.interval=soon",
        "webhook.failurePolicy=Maybe",
    ],
)
def test_values_schema_rejects(bad: str) -> None:
    done = helm("template", "kubeloop", str(CHART_DIR), "--set", bad, check=False)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr


def test_chart_crds_are_the_generated_ones() -> None:
    chart_crds = sorted((CHART_DIR / "crds").glob("*.yaml"))
    assert [p.name for p in chart_crds] == sorted(p.name for p in (REPO / "manifests/crds").glob("*.yaml"))
    for path in chart_crds:
        assert path.read_text() == (REPO / "manifests/crds" / path.name).read_text()


def test_kustomize_base_is_up_to_date() -> None:
    assert chart.check(REPO, tools.helm()) == []


def test_kustomize_base_equals_the_chart_defaults() -> None:
    command = [tools.kubectl(), "kustomize", str(REPO / "manifests")]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    built = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    crds = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "manifests/crds").glob("*.yaml"))]
    expected = chart.kustomize_objects(render()) + crds

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(map(key, built)) == sorted(map(key, expected))
    by_key = {key(doc): doc for doc in built}
    for doc in expected:
        assert by_key[key(doc)] == doc, key(doc)


# --- the Grafana dashboards (monitoring/dashboards, generated into the chart) ---------------------------------------


def configmaps(*args: str) -> list[dict[str, Any]]:
    return [doc for doc in render(*args) if doc["kind"] == "ConfigMap"]


def test_chart_ships_the_dashboards_behind_a_value() -> None:
    boards = dashboards.load()
    assert configmaps() == []
    (cm,) = configmaps("--set", "dashboards.enabled=true")
    meta = cm["metadata"]
    assert meta["name"] == "kubeloop-dashboards" and meta["namespace"] == "kubeloop-system"
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/component"] == "dashboards"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "kubeloop"
    assert meta["annotations"] == {"grafana_folder": "kubeloop"}
    assert sorted(cm["data"]) == sorted(boards)
    for name, board in boards.items():
        assert json.loads(cm["data"][name]) == board  # Grafana's {{legend}} templates survive Helm
    (moved,) = configmaps(
        "--set", "dashboards.enabled=true", "--set", "dashboards.namespace=monitoring",
        "--set", "dashboards.label=grafana_dashboards", "--set", "dashboards.labelValue=kubeloop",
        "--set", "dashboards.folder=",
    )  # fmt: skip
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["labels"]["grafana_dashboards"] == "kubeloop"
    assert "annotations" not in moved["metadata"]
    helm("lint", "--strict", str(CHART_DIR), "--set", "dashboards.enabled=true")
    bad = helm("template", "k", str(CHART_DIR), "--set", "dashboards.enable=true", check=False)
    assert bad.returncode != 0 and "enable" in bad.stderr


# --- the predictor pods' metrics: a PodMonitor behind a value -------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        matched = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": key not in labels or labels[key] not in values,
        }[operator]
        if not matched:
            return False
    return True


def _predictor_pod_labels() -> list[dict[str, str]]:
    """The labels of the predictor pods of a ModelDeployment with a canary, as KServe builds them from what the
    operator writes: the InferenceService's labels, then the predictor's (which win), then KServe's own."""
    from kubeloop.api import parse_resource
    from operators import inferenceservice as isvc

    md_doc = yaml.safe_load((REPO / "manifests/samples/modeldeployment.yaml").read_text())
    md_doc["metadata"].update(namespace="ml", uid="md-uid")
    md_doc["spec"].update(canary={"version": 2, "trafficPercent": 10}, drift={"enabled": True})
    versions = {}
    for n in (1, 2):
        mv_doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
        mv_doc["metadata"].update(name=f"arrests-v{n}", namespace="ml")
        mv_doc["spec"]["version"] = n
        versions[n] = parse_resource(mv_doc)
    obj = isvc.desired_inferenceservice(parse_resource(md_doc), versions)
    kserve = {"serving.kserve.io/inferenceservice": obj["metadata"]["name"], "component": "predictor"}
    components = [obj["spec"]["predictor"], *(entry["predictor"] for entry in obj["spec"]["canary"])]
    assert len(components) == 2
    return [{**obj["metadata"]["labels"], **component["labels"], **kserve} for component in components]


def test_podmonitor_scrapes_the_operators_predictor_pods_on_both_named_ports() -> None:
    from operators import inferenceservice as isvc
    from operators import rayjob

    assert not [doc for doc in render() if doc["kind"] == "PodMonitor"]  # off by default
    docs = render("--set", "predictor.podMonitor.enabled=true", "--set", "predictor.podMonitor.labels.release=kps")
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    meta = monitor["metadata"]
    assert (meta["name"], meta["namespace"]) == ("kubeloop-predictors", "kubeloop-system")
    assert meta["labels"]["release"] == "kps" and meta["labels"]["app.kubernetes.io/part-of"] == "kubeloop"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}  # ModelDeployments live in any namespace
    for pod in _predictor_pod_labels():  # stable and canary
        assert _selects(spec["selector"], pod), pod
    # not the operator's own pod, not a training job's Ray pods (part-of kubeloop as well)
    operator_pod = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(spec["selector"], operator_pod)
    job = rayjob.desired_rayjob(_trainingjob(), Settings())
    ray_head = {
        **job["metadata"]["labels"],
        **job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"],
    }
    assert not _selects(spec["selector"], ray_head)
    # every metrics port the operator declares (and Knative's name for the server's), at the servers' path
    endpoints = spec["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {
        isvc.SERVER_PORT_NAME,
        isvc.KNATIVE_SERVER_PORT_NAME,
        isvc.SIDECAR_METRICS_PORT_NAME,
    }
    assert {(e["path"], e["interval"]) for e in endpoints} == {(isvc.METRICS_PATH, "10s")}
    assert not any("honorLabels" in e or "relabelings" in e for e in endpoints)  # model, version as exported
    helm("lint", "--strict", str(CHART_DIR), "--set", "predictor.podMonitor.enabled=true")
    bad = helm("template", "k", str(CHART_DIR), "--set", "predictor.podMonitor.interval=often", check=False)
    assert bad.returncode != 0 and "values don't meet the specifications of the schema" in bad.stderr


def _trainingjob() -> Any:
    from kubeloop.api import parse_resource

    doc = yaml.safe_load((REPO / "manifests/samples/trainingjob.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="tj-uid")
    return parse_resource(doc)


def test_predictor_port_defaults_are_the_operators() -> None:

    (container,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    defaults = Settings()
    assert env["KUBELOOP_SERVER_PORT"] == str(defaults.server_port)
    assert env["KUBELOOP_SIDECAR_PORT"] == str(defaults.sidecar_port)
    assert env["KUBELOOP_SIDECAR_METRICS_PORT"] == str(defaults.sidecar_metrics_port)
    moved = one(render("--set", "predictor.sidecarMetricsPort=9100"), "Deployment")
    env = {e["name"]: e["value"] for e in moved["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBELOOP_SIDECAR_METRICS_PORT"] == "9100"
    bad = helm("template", "k", str(CHART_DIR), "--set", "predictor.sidecarMetricsPort=0", check=False)
    assert bad.returncode != 0 and "values don't meet the specifications of the schema" in bad.stderr
