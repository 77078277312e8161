"""KServe's controller as a pod, for ``LOCAL=1 platform/up.sh``: what KServe's chart installs, rendered from the
module build.sh copied (through ../dev-controlplane/upstream.py, as the cluster tests read it) with a self-signed
webhook certificate in place of cert-manager's.

Usage: python3 kserve.py BIN_DIR crds                       # the CRD files (KServe's, KubeRay's, Gateway API's)
       python3 kserve.py BIN_DIR controller MANAGER_IMAGE AGENT_IMAGE   # SA, RBAC, config, certificate, Service,
                                                                          # Deployment
       python3 kserve.py BIN_DIR webhooks                   # the webhook configurations (once the manager is up)
The last two print one YAML stream for ``kubectl apply -f -``. Gateway API stays off in KServe's config: kubeloop's own
HTTPRoutes (on Traefik, platform/kind/traefik.yaml) carry the traffic, KServe's own route would add nothing.
"""

import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
NAMESPACE = "kserve"
NAME = "kserve-controller-manager"
SERVICE = "kserve-webhook-server-service"
CERT_SECRET = "kserve-webhook-server-cert"
_PKI = Path(tempfile.gettempdir()) / "kubeloop-kind-kserve-pki"


def _upstream() -> Any:
    spec = importlib.util.spec_from_file_location("kubeloop_dev_upstream", HERE.parent / "dev-controlplane/upstream.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rbac(kserve: Path) -> list[dict[str, Any]]:
    docs = []
    for name in ("service_account.yaml", "role.yaml", "role_binding.yaml"):
        for doc in yaml.safe_load_all((kserve / "config/rbac" / name).read_text()):
            if not doc:
                continue
            if doc["kind"] == "ServiceAccount":
                doc["metadata"]["namespace"] = NAMESPACE
            for subject in doc.get("subjects") or []:
                subject["namespace"] = NAMESPACE
            docs.append(doc)
    return docs


def controller(upstream: Any, kserve: Path, image: str, agent_image: str) -> list[dict[str, Any]]:
    certs = _PKI / "serving-certs"
    upstream.webhook_certificate(_PKI, f"DNS:{SERVICE}.{NAMESPACE}.svc", certs)
    labels = {"app.kubernetes.io/name": NAME}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": CERT_SECRET, "namespace": NAMESPACE},
        "stringData": {"tls.crt": (certs / "tls.crt").read_text(), "tls.key": (certs / "tls.key").read_text()},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {"selector": labels, "ports": [{"port": 443, "targetPort": 9443}]},
    }
    container = {
        "name": "manager",
        "image": image,
        "command": ["/usr/local/bin/manager"],
        "args": ["--metrics-addr=:8080", "--health-probe-addr=:8081", "--webhook-port=9443", "--leader-elect=false"],
        "env": [{"name": "POD_NAMESPACE", "value": NAMESPACE}],
        "ports": [{"name": "webhook", "containerPort": 9443}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8081}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8081}},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        "volumeMounts": [{"name": "cert", "mountPath": "/tmp/k8s-webhook-server/serving-certs", "readOnly": True}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": NAME,
                    "containers": [container],
                    "volumes": [{"name": "cert", "secret": {"secretName": CERT_SECRET}}],
                },
            },
        },
    }
    config = upstream.kserve_config(kserve)
    for key in ("agent", "logger", "batcher"):  # the agent image KServe injects into predictor pods (payload logger)
        if key in config["data"]:
            config["data"][key] = json.dumps(json.loads(config["data"][key]) | {"image": agent_image})
    return [*_rbac(kserve), config, secret, service, deployment]


def webhooks(upstream: Any, kserve: Path) -> list[dict[str, Any]]:
    ca = (_PKI / "ca.crt").read_bytes()
    service = {"name": SERVICE, "namespace": NAMESPACE, "port": 443}
    return upstream.kserve_webhooks(kserve, ca, lambda path: {"service": service | {"path": path}})


def main(argv: list[str]) -> int:
    usage = "usage: kserve.py BIN_DIR crds | controller MANAGER_IMAGE AGENT_IMAGE | webhooks"
    if (
        len(argv) < 3
        or argv[2] not in ("crds", "controller", "webhooks")
        or (argv[2] == "controller") != (len(argv) == 5)
    ):
        print(usage, file=sys.stderr)
        return 2
    upstream, bin_dir = _upstream(), Path(argv[1])
    kserve = upstream.manifests_dir(bin_dir)["kserve"]
    if argv[2] == "crds":
        print("\n".join(str(path) for path in upstream.crd_files(bin_dir)))
        return 0
    docs = controller(upstream, kserve, argv[3], argv[4]) if argv[2] == "controller" else webhooks(upstream, kserve)
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
