"""The upstream controllers kubeloop builds on, run as processes against a dev ControlPlane.

What platform/up.sh installs on a real cluster, at the same versions (../versions.env), from what build.sh
compiled and copied out of the Go module zips:

- the CRDs of KServe (config/crd/full), KubeRay (config/crd/bases) and Gateway API (config/crd/standard);
- the KubeRay operator (RayJob -> RayCluster + submitter Job, its status machine);
- KServe's manager in Standard mode with its webhooks on (defaulting, validation, the pod mutator), served over
  TLS with a certificate made here and registered with ``clientConfig.url`` on 127.0.0.1.

Pods stay kwok's: nothing is pulled or run, so what cannot happen is whatever needs a container (the Ray
dashboard answering KubeRay, a model server answering a probe). Nothing here dials a pod or a Service address:
KubeRay reaches the Ray dashboard by its cluster DNS name, which does not resolve on this machine.

    upstream = Upstream(plane)      # plane: a started controlplane.ControlPlane
    upstream.start()                # CRDs, KubeRay, KServe + webhooks; stopped with the plane
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
KSERVE_NAMESPACE = "kserve"
KSERVE_CONFIGMAP = "inferenceservice-config"


def versions() -> dict[str, str]:
    """KSERVE_VERSION, KUBERAY_VERSION, GATEWAY_API_VERSION from ../versions.env (the environment wins)."""
    pinned: dict[str, str] = {}
    for line in (HERE.parent / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pinned[key] = os.environ.get(key) or value
    return pinned


def binaries() -> tuple[str, str]:
    """The file names build.sh gives the two controllers in the control plane's bin directory."""
    v = versions()
    return f"kserve-manager-{v['KSERVE_VERSION']}", f"kuberay-operator-v{v['KUBERAY_VERSION']}"


def manifests_dir(bin_dir: Path) -> dict[str, Path]:
    """Where build.sh copied each project's manifests (beside the bin directory)."""
    v, root = versions(), bin_dir.parent / "upstream"
    return {
        "kserve": root / f"kserve-{v['KSERVE_VERSION']}",
        "kuberay": root / f"kuberay-v{v['KUBERAY_VERSION']}",
        "gateway-api": root / f"gateway-api-{v['GATEWAY_API_VERSION']}",
    }


def is_built(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in binaries()) and all(
        (path / ".ok").exists() for path in manifests_dir(bin_dir).values()
    )


def crd_files(bin_dir: Path) -> list[Path]:
    """The CRDs the stack installs: KServe's served kinds (its config/crd/full kustomization, without the
    LLM and local-model caches kubeloop does not use), all of KubeRay's, Gateway API's standard channel."""
    dirs = manifests_dir(bin_dir)
    kserve = dirs["kserve"] / "config/crd/full"
    files = sorted(kserve.glob("serving.kserve.io_*.yaml"))
    files += sorted((kserve / "clusterstoragecontainer").glob("*.yaml"))
    files = [f for f in files if f.name != "kustomization.yaml"]
    files += sorted((dirs["kuberay"] / "config/crd/bases").glob("ray.io_*.yaml"))
    files += sorted((dirs["gateway-api"] / "config/crd/standard").glob("gateway.networking.k8s.io_*.yaml"))
    return files


def kserve_config(kserve_dir: Path, gateway_api: bool = False) -> dict[str, Any]:
    """KServe's own inferenceservice-config, in Standard mode; without gateway_api, with Ingress objects (no
    Gateway API route of KServe's: kubeloop's HTTPRoute carries the split)."""
    configmap = yaml.safe_load((kserve_dir / "config/configmap/inferenceservice.yaml").read_text())
    data = configmap["data"]
    data.pop("_example", None)
    data["deploy"] = json.dumps({"defaultDeploymentMode": "Standard"})
    ingress = json.loads(data["ingress"])
    ingress["enableGatewayApi"] = gateway_api
    data["ingress"] = json.dumps(ingress)
    configmap["metadata"] = {"name": KSERVE_CONFIGMAP, "namespace": KSERVE_NAMESPACE}
    return configmap


def webhook_certificate(pki: Path, san: str, out: Path) -> bytes:
    """A CA and a serving certificate for ``san`` (``IP:…`` or ``DNS:…``), what cert-manager makes on a cluster:
    tls.crt and tls.key written into ``out``; returns the CA certificate (PEM)."""
    pki.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (pki / "san.ext").write_text(f"subjectAltName={san}\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca_crt, csr = str(pki / "ca.key"), str(pki / "ca.crt"), str(pki / "tls.csr")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=kubeloop-dev-webhook-ca", "-keyout", ca_key, "-out", ca_crt)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={san.split(':', 1)[1]}",
            "-keyout", str(out / "tls.key"), "-out", csr)  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-extfile", str(pki / "san.ext"), "-out", str(out / "tls.crt"))  # fmt: skip
    return (pki / "ca.crt").read_bytes()


def kserve_webhooks(kserve_dir: Path, ca: bytes, client_config: Any) -> list[dict[str, Any]]:
    """KServe's webhook configurations as released, each hook's clientConfig replaced by ``client_config(path)``
    (a URL or a Service) with ``ca`` as its caBundle."""
    bundle = base64.b64encode(ca).decode()
    configs = []
    for doc in yaml.safe_load_all((kserve_dir / "config/webhook/manifests.yaml").read_text()):
        if not doc:
            continue
        config = copy.deepcopy(doc)
        for hook in config.get("webhooks") or []:
            hook["clientConfig"] = client_config(hook["clientConfig"]["service"]["path"]) | {"caBundle": bundle}
        configs.append(config)
    return configs


class UpstreamError(RuntimeError):
    pass


class Upstream:
    """KubeRay and KServe (with webhooks) on a started ControlPlane; their processes join its process group,
    so ``plane.stop()`` stops them first."""

    def __init__(self, plane: Any) -> None:
        self.plane = plane
        self.dirs = manifests_dir(plane.binaries)
        self.kserve_bin, self.kuberay_bin = binaries()
        self.workdir = Path(plane.workdir) / "upstream"
        self.ports: dict[str, int] = {}
        self.startup_seconds = 0.0

    def start(self, timeout: float = 180.0) -> Upstream:
        if not is_built(self.plane.binaries):
            raise UpstreamError(
                f"KServe/KubeRay binaries or manifests missing beside {self.plane.binaries}: run {HERE / 'build.sh'}"
            )
        began = time.monotonic()
        deadline = began + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        free_port = sys.modules[type(self.plane).__module__].free_port  # controlplane.py, loaded by path
        self.ports = {name: free_port() for name in ("kuberay-probe", "kserve-probe", "kserve-webhook")}
        self._install_crds(deadline)
        self._start_kuberay()
        self._start_kserve(deadline)
        self._wait_ready("KubeRay operator", self.ports["kuberay-probe"], deadline)
        self.startup_seconds = time.monotonic() - began
        return self

    # --- CRDs ----------------------------------------------------------------------------------------------
    def _install_crds(self, deadline: float) -> None:
        names = []
        for path in crd_files(self.plane.binaries):
            for crd in yaml.safe_load_all(path.read_text()):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue  # Gateway API ships a ValidatingAdmissionPolicy beside its CRDs
                self._create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
                names.append(crd["metadata"]["name"])
        for name in names:
            self._wait(deadline, f"CRD {name} Established", lambda n=name: self._established(n))

    def _established(self, name: str) -> bool:
        status, crd = self.plane.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = (crd.get("status") or {}).get("conditions") or [] if status == 200 else []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    # --- KubeRay -------------------------------------------------------------------------------------------
    def _start_kuberay(self) -> None:
        self.plane._start(
            self.kuberay_bin,
            [
                "--metrics-addr=0",
                f"--health-probe-bind-address=127.0.0.1:{self.ports['kuberay-probe']}",
                "--enable-leader-election=false",
                "--log-stdout-encoder=console",
            ],
            env={"KUBECONFIG": str(self.plane.kubeconfig)},
        )

    # --- KServe --------------------------------------------------------------------------------------------
    def _start_kserve(self, deadline: float) -> None:
        self._create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kserve"}})
        self._create(f"/api/v1/namespaces/{KSERVE_NAMESPACE}/configmaps", kserve_config(self.dirs["kserve"]))
        ca = self._webhook_certificate()
        self.plane._start(
            self.kserve_bin,
            [
                "--metrics-addr=0",
                f"--health-probe-addr=127.0.0.1:{self.ports['kserve-probe']}",
                f"--webhook-port={self.ports['kserve-webhook']}",
                "--leader-elect=false",
            ],
            # controller-runtime's webhook server reads $TMPDIR/k8s-webhook-server/serving-certs/tls.{crt,key}
            env={
                "KUBECONFIG": str(self.plane.kubeconfig),
                "POD_NAMESPACE": KSERVE_NAMESPACE,
                "TMPDIR": str(self.workdir / "kserve-tmp"),
            },
        )
        self._wait_ready("KServe manager", self.ports["kserve-probe"], deadline)
        self._register_webhooks(ca)

    def _webhook_certificate(self) -> bytes:
        """A CA and a serving certificate for 127.0.0.1 where the manager reads them; returns the CA."""
        certs = self.workdir / "kserve-tmp" / "k8s-webhook-server" / "serving-certs"
        return webhook_certificate(self.workdir / "pki", "IP:127.0.0.1", certs)

    def _register_webhooks(self, ca: bytes) -> None:
        """KServe's webhook configurations as released, each pointed at the manager on 127.0.0.1."""
        base = f"https://127.0.0.1:{self.ports['kserve-webhook']}"
        for config in kserve_webhooks(self.dirs["kserve"], ca, lambda path: {"url": base + path}):
            plural = f"{config['kind'].lower()}s"  # mutatingwebhookconfigurations, validatingwebhookconfigurations
            self._create(f"/apis/admissionregistration.k8s.io/v1/{plural}", config)

    # --- helpers -------------------------------------------------------------------------------------------
    def _create(self, path: str, body: dict[str, Any]) -> None:
        status, answer = self.plane.api("POST", path, body)
        if status not in (200, 201, 409):
            raise UpstreamError(f"POST {path} ({body.get('kind')} {body['metadata'].get('name')}): {status} {answer}")

    def _wait_ready(self, what: str, port: int, deadline: float) -> None:
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                return response.status == 200

        self._wait(deadline, f"{what} /readyz", ready)

    def _wait(self, deadline: float, what: str, check: Any) -> None:
        self.plane._wait(deadline, what, check)
