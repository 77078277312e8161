"""Print kind-config.yaml with what only a registry-less machine needs, for platform/kind/create.sh.

The user's file stays the user's: this adds, never rewrites, and only
- ``networking.disableDefaultCNI``: kind's kindnetd image is not buildable here; create.sh wires the pod network
  with Debian's CNI plugins instead;
- kubeadm image tags for the etcd and CoreDNS that build.sh compiles (kubeadm's defaults name other releases);
- on a cgroup v1 host, the kubelet's ``failCgroupV1: false`` (1.35+ refuses cgroup v1 unless told);
- containerd's registry ``config_path``, where create.sh points ``localhost:5001`` at the local registry (kind's
  documented local-registry set-up).

Usage: python3 local_config.py KIND_CONFIG ETCD_TAG COREDNS_TAG
"""

import sys
from pathlib import Path

import yaml


def cgroup_v1() -> bool:
    return not Path("/sys/fs/cgroup/cgroup.controllers").exists()


def local_config(config: dict, etcd_tag: str, coredns_tag: str, cgroup_v1: bool) -> dict:
    derived = dict(config)
    networking = dict(derived.get("networking") or {})
    networking["disableDefaultCNI"] = True
    derived["networking"] = networking
    patches = list(derived.get("kubeadmConfigPatches") or [])
    patches.append(
        yaml.safe_dump(
            {
                "kind": "ClusterConfiguration",
                "etcd": {"local": {"imageTag": etcd_tag}},
                "dns": {"imageTag": coredns_tag},
            }
        )
    )
    if cgroup_v1:
        patches.append(yaml.safe_dump({"kind": "KubeletConfiguration", "failCgroupV1": False}))
    derived["kubeadmConfigPatches"] = patches
    derived["containerdConfigPatches"] = [
        *(derived.get("containerdConfigPatches") or []),
        '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n',
    ]
    return derived


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    config = yaml.safe_load(Path(argv[1]).read_text())
    print(yaml.safe_dump(local_config(config, argv[2], argv[3], cgroup_v1()), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
