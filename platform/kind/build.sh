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
#     traefik-<v>                               github.com/traefik/traefik/v3 (the Gateway API implementation)
#     prometheus-<v>                            github.com/prometheus/prometheus (Debian's has no Kubernetes discovery)
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

NAME=kind/build.sh OUT="$CACHE/kind-$K8S_VERSION" STEPS=12
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

# Traefik's own dynamic/ext module is not in its zip (a nested module). Its ACME DNS-challenge providers (lego) need
# 14 modules the proxy here refuses, and its basic-auth fork's newest commit is refused too: the wrapper takes lego
# with its provider registry emptied (a cluster on kind gets no ACME certificates) and the fork's previous commit,
# whose API Traefik's middlewares use unchanged.
lego_without_dns_providers() {  # -> the path of a copy of lego whose providers/dns registers no provider
    local src copy="$OUT/src/lego-$LEGO_VERSION-no-dns-providers"
    if [ ! -f "$copy/.ready" ]; then
        src=$(module_dir "github.com/go-acme/lego/v5@$LEGO_VERSION")
        rm -rf "$copy" && cp -r "$src" "$copy" && chmod -R u+w "$copy"
        rm -f "$copy"/providers/dns/*.go
        cat >"$copy/providers/dns/providers.go" <<'GO'
// Package dns is emptied by kubeloop's platform/kind/build.sh: this Traefik build has no ACME DNS providers.
package dns

import (
	"fmt"

	"github.com/go-acme/lego/v5/challenge"
)

// NewDNSChallengeProviderByName refuses every name.
func NewDNSChallengeProviderByName(name string) (challenge.Provider, error) {
	return nil, fmt.Errorf("DNS provider %q: this Traefik build (kubeloop, kind) has no ACME DNS providers", name)
}
GO
        touch "$copy/.ready"
    fi
    echo "$copy"
}
traefik_dynamic_ext() {  # -> Traefik's dynamic/ext: a nested module (absent from the zip), two empty types
    local dir="$OUT/src/traefik-dynamic-ext"
    mkdir -p "$dir"
    printf 'module github.com/traefik/traefik/dynamic/ext\n\ngo 1.24.0\n' >"$dir/go.mod"
    cat >"$dir/ext.go" <<'GO'
// Package ext is where Traefik's builds add fields to its dynamic configuration; this build adds none.
package ext

// HTTP adds nothing to dynamic.HTTPConfiguration.
type HTTP struct{}

// Router adds nothing to dynamic.Router.
type Router struct{}
GO
    echo "$dir"
}
build_traefik() {
    build_wrapped "traefik-$TRAEFIK_VERSION" github.com/traefik/traefik/v3 "$TRAEFIK_VERSION" \
        github.com/traefik/traefik/v3/cmd/traefik \
        "-X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
        "github.com/traefik/traefik/dynamic/ext=$(traefik_dynamic_ext)
         github.com/go-acme/lego/v5=$(lego_without_dns_providers)
         github.com/abbot/go-http-auth=github.com/containous/go-http-auth@$GO_HTTP_AUTH_VERSION"
}
run_step "traefik-$TRAEFIK_VERSION" build_traefik
# module v0.3XX.Y is Prometheus 3.XX.Y; its web UI is not in the module (built with npm): the API and /metrics serve
prometheus_release="3.${PROMETHEUS_VERSION#v0.3}"
run_step "prometheus-$PROMETHEUS_VERSION" build_install "prometheus-$PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
    "-s -w -X github.com/prometheus/common/version.Version=$prometheus_release" prometheus
echo "kind/build.sh: done in $((SECONDS - total_start))s: $BIN"
