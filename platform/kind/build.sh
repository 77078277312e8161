#!/usr/bin/env bash
# Builds what a kind cluster needs on a machine that reaches no image registry, from Go modules, Debian packages
# and the dev control plane's builds, and caches it outside the clone by version:
#   ${KUBELOOP_CACHE:-~/.cache/kubeloop}/kind-<k8s version>/bin/
#     kind-<v>                                  sigs.k8s.io/kind
#     kubelet kubeadm kubectl kube-proxy        the same Kubernetes release as the control plane (k8s.io/kubernetes)
#     coredns-<v>                               github.com/coredns/coredns
#     pause                                     build/pause/linux/pause.c of the same Kubernetes module, static
#     local-path-provisioner-<v>                github.com/rancher/local-path-provisioner (kind's default storage)
#     registry-<v>                              github.com/distribution/distribution (the nodes' image registry)
#     kserve-agent-<v>                          github.com/kserve/kserve/cmd/agent (the predictor's payload logger)
# The control plane's own binaries (kube-apiserver, etcd, the KServe and KubeRay controllers) come from
# platform/dev-controlplane/build.sh, which this runs first. Images and the node image: platform/kind/images.sh.
# Usage: build.sh [--print-bin-dir]    (versions: versions.env here and in platform/dev-controlplane/; env wins)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../versions.sh
source "$HERE/../versions.sh"
load_versions "$HERE/versions.env" "$HERE/../dev-controlplane/versions.env" "$HERE/../versions.env"

CACHE=${KUBELOOP_CACHE:-$HOME/.cache/kubeloop}
if [ "${1:-}" = "--print-bin-dir" ]; then echo "$CACHE/kind-$K8S_VERSION/bin"; exit 0; fi
bash "$HERE/../dev-controlplane/build.sh"

NAME=kind/build.sh OUT="$CACHE/kind-$K8S_VERSION" STEPS=10
# shellcheck source=../gobuild.sh
source "$HERE/../gobuild.sh"
total_start=$SECONDS
echo "kind/build.sh: kind $KIND_VERSION, node $K8S_VERSION, CoreDNS $COREDNS_VERSION -> $BIN"

run_step "kind-$KIND_VERSION" build_install "kind-$KIND_VERSION" "sigs.k8s.io/kind@$KIND_VERSION" "-s -w" kind

node_cmds="kubelet kubeadm kubectl kube-proxy"
for c in $node_cmds; do [ -x "$BIN/$c" ] || { k8s_module kubernetes-node $node_cmds; break; }; done
for c in $node_cmds; do run_step "$c" build_k8s kubernetes-node "$c"; done

run_step "coredns-$COREDNS_VERSION" build_install "coredns-$COREDNS_VERSION" \
    "github.com/coredns/coredns@$COREDNS_VERSION" "-s -w" coredns

build_pause() {
    local src
    src=$(module_dir "k8s.io/kubernetes@$K8S_VERSION")/build/pause/linux/pause.c
    gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-kubeloop" -o "$BIN/.pause.tmp" "$src" \
        && strip "$BIN/.pause.tmp" && mv "$BIN/.pause.tmp" "$BIN/pause"
}
run_step pause build_pause
run_step "local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION" build_install \
    "local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION" \
    "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION" "-s -w" local-path-provisioner
run_step "registry-$REGISTRY_VERSION" build_install "registry-$REGISTRY_VERSION" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" \
    "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" registry
run_step "kserve-agent-$KSERVE_VERSION" build_wrapped "kserve-agent-$KSERVE_VERSION" \
    github.com/kserve/kserve "$KSERVE_VERSION" github.com/kserve/kserve/cmd/agent
echo "kind/build.sh: done in $((SECONDS - total_start))s: $BIN"
