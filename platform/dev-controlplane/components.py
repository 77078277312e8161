"""What controlplane.py starts each component with: the command-line flags of etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok, the service-account key pair and CA file they read, and the fake
nodes kwok runs pods on. Stdlib only, loaded by path like controlplane.py (platform/ is no package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"


def etcd_args(workdir: Path, client: str, peer: str) -> list[str]:
    return [
        "--name=default",
        f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync=true",  # a throw-away dev store: don't wait on the disk
        "--log-level=warn",
    ]


def apiserver_args(pki: Path, etcd_port: int, port: int) -> list[str]:
    return [
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={pki}",  # self-signed serving cert + its CA, written on start
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--authorization-mode=RBAC",
        f"--token-auth-file={pki / 'tokens.csv'}",
        "--endpoint-reconciler-type=none",  # 127.0.0.1 is not a valid endpoint for the kubernetes Service
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ]


def _secure_serving_args(kubeconfig: Path, port: int, cert_dir: Path) -> list[str]:
    """What kube-controller-manager and kube-scheduler share: the admin kubeconfig (for the API, and to authenticate
    and authorize requests to their own HTTPS port), that port on loopback with a self-signed certificate written to
    `cert_dir`, and no leader election."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
    ]


def controller_manager_args(pki: Path, kubeconfig: Path, port: int) -> list[str]:
    return [
        *_secure_serving_args(kubeconfig, port, pki / "kcm"),
        "--use-service-account-credentials=true",  # each controller acts as its own RBAC-bound identity
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--controllers=*",
        "--concurrent-gc-syncs=5",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_args(pki: Path, kubeconfig: Path, port: int) -> list[str]:
    return [*_secure_serving_args(kubeconfig, port, pki / "scheduler"), "--profiling=false", "--v=1"]


def kwok_args(workdir: Path, kubeconfig: Path, port: int) -> list[str]:
    return [
        f"--config={workdir / 'kwok.yaml'}",
        f"--kubeconfig={kubeconfig}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
        f"--cidr={POD_CIDR}",
        "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{port}",
        "--node-lease-duration-seconds=40",  # kwok renews the nodes' Leases, so they stay Ready
    ]


def kwok_node(index: int) -> dict[str, Any]:
    """Fake node `kwok-node-INDEX` for kwok to run: 32 CPU, 128Gi, 110 pods; node 1 also offers 4 (fake) GPUs, so
    GPU requests can be scheduled."""
    name = f"kwok-node-{index}"
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    if index == 1:
        capacity["nvidia.com/gpu"] = "4"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubeloop.dev/fake-node": "kwok",
                "type": "kwok",
            },
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def split_ca(serving: Path, ca: Path) -> bool:
    """kube-apiserver's self-signed --cert-dir file holds the serving cert followed by the CA that signed it:
    write the CA alone to ``ca`` (kubeconfigs and --root-ca-file want the CA, not the leaf)."""
    if not serving.exists():
        return False
    marker = "-----END CERTIFICATE-----"
    blocks = [block.strip() + "\n" + marker + "\n" for block in serving.read_text().split(marker) if block.strip()]
    if len(blocks) < 2:
        return False  # not written yet, or only partly
    ca.write_text("".join(blocks[1:]))
    return True


def generate_rsa_key_pair(private: Path, public: Path) -> None:
    """The service-account signing key pair: openssl when present, else the `cryptography` package."""
    openssl = shutil.which("openssl")
    if openssl:
        subprocess.run([openssl, "genrsa", "-out", str(private), "2048"], check=True, capture_output=True)
        subprocess.run(
            [openssl, "rsa", "-in", str(private), "-pubout", "-out", str(public)], check=True, capture_output=True
        )
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    private.chmod(0o600)
