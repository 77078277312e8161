#!/usr/bin/env bash
# Builds, on a machine that reaches no image registry, the images a kind cluster of kubeloop runs, into the local
# Docker engine (platform/kind/docker.sh starts one):
#   kubeloop.local/debian:bookworm          Debian bookworm (debootstrap minbase, python3): the base of the others
#   kubeloop.local/kind-node:<k8s version>  a kind node: systemd, Debian's containerd/runc/CNI plugins, kind's own
#                                           node files, kubelet/kubeadm/kubectl, and, imported into its containerd,
#                                           registry.k8s.io/{kube-apiserver,kube-controller-manager,kube-scheduler,
#                                           kube-proxy,etcd,coredns/coredns,pause} built from Go modules and C
# The binaries come from platform/kind/build.sh (which this runs); an image already in Docker is kept, so a second
# run builds nothing (REBUILD=1 rebuilds them all). The debootstrap root is cached in ~/.cache/kubeloop.
#   kubeloop.local/{local-path-provisioner,kuberay-operator,kserve-manager,kserve-agent,registry,traefik,
#                   prometheus}:<v>         the stack's own builds, one static binary each
# Usage: images.sh [--print-node-image | --print-base-image | --print-provisioner-image | --print-kuberay-image |
#                   --print-registry-image | --print-kserve-image | --print-agent-image | --print-traefik-image |
#                   --print-prometheus-image]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../versions.sh
source "$HERE/../versions.sh"
load_versions "$HERE/versions.env" "$HERE/../dev-controlplane/versions.env" "$HERE/../versions.env"
CACHE=${KUBELOOP_CACHE:-$HOME/.cache/kubeloop}
OUT="$CACHE/kind-$K8S_VERSION"
BASE_IMAGE=kubeloop.local/debian:bookworm
NODE_IMAGE="kubeloop.local/kind-node:$K8S_VERSION"
PROVISIONER_IMAGE="kubeloop.local/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION"
KUBERAY_IMAGE="kubeloop.local/kuberay-operator:v$KUBERAY_VERSION"
REGISTRY_IMAGE="kubeloop.local/registry:$REGISTRY_VERSION"
KSERVE_IMAGE="kubeloop.local/kserve-manager:$KSERVE_VERSION"
AGENT_IMAGE="kubeloop.local/kserve-agent:$KSERVE_VERSION"
TRAEFIK_IMAGE="kubeloop.local/traefik:$TRAEFIK_VERSION"
PROMETHEUS_IMAGE="kubeloop.local/prometheus:$PROMETHEUS_VERSION"
case "${1:-}" in   # the names the cluster scripts use
    --print-node-image) echo "$NODE_IMAGE"; exit 0 ;;
    --print-base-image) echo "$BASE_IMAGE"; exit 0 ;;
    --print-provisioner-image) echo "$PROVISIONER_IMAGE"; exit 0 ;;
    --print-kuberay-image) echo "$KUBERAY_IMAGE"; exit 0 ;;
    --print-registry-image) echo "$REGISTRY_IMAGE"; exit 0 ;;
    --print-kserve-image) echo "$KSERVE_IMAGE"; exit 0 ;;
    --print-agent-image) echo "$AGENT_IMAGE"; exit 0 ;;
    --print-traefik-image) echo "$TRAEFIK_IMAGE"; exit 0 ;;
    --print-prometheus-image) echo "$PROMETHEUS_IMAGE"; exit 0 ;;
esac

bash "$HERE/docker.sh"
bash "$HERE/build.sh" >/dev/null
BIN="$OUT/bin"
CP_BIN=$(bash "$HERE/../dev-controlplane/build.sh" --print-bin-dir)
KIND_FILES="$CACHE/go/mod/sigs.k8s.io/kind@$KIND_VERSION/images/base/files"
[ -d "$KIND_FILES" ] || { echo "images.sh: kind's node files are missing at $KIND_FILES" >&2; exit 1; }
ETCD_TAG="${ETCD_VERSION#v}-0"                       # kubeadm's tag format for etcd: 3.6.16-0
START=$SECONDS

have() { [ "${REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
say() { echo "images.sh: $* ($((SECONDS - START)) s)"; }

# --- the base: debootstrap from the Debian mirror apt already uses, imported as an image ----------------------
if ! have "$BASE_IMAGE"; then
    rootfs="$OUT/rootfs/debian.tar"
    if [ ! -f "$rootfs" ]; then
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
        mirror=${mirror:-http://deb.debian.org/debian}
        say "debootstrap bookworm from $mirror"
        rm -rf "$OUT/rootfs/debian"; mkdir -p "$OUT/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
            "$OUT/rootfs/debian" "$mirror" >"$OUT/logs/debootstrap.log" 2>&1 \
            || { tail -20 "$OUT/logs/debootstrap.log" >&2; exit 1; }
        rm -rf "$OUT/rootfs/debian/var/cache/apt/archives/"*.deb "$OUT/rootfs/debian/var/lib/apt/lists/"*
        tar -C "$OUT/rootfs/debian" -cf "$rootfs.tmp" . && mv "$rootfs.tmp" "$rootfs" && rm -rf "$OUT/rootfs/debian"
    fi
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$rootfs" "$BASE_IMAGE-rootfs" >/dev/null
    # this machine's CA bundle and pip configuration, so that pip and uv in image builds reach the package index
    # the host reaches (through whatever TLS proxy the host trusts); uv reads SSL_CERT_FILE
    ctx=$(mktemp -d)
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
    if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$ctx/"; else touch "$ctx/pip.conf"; fi
    printf '%s\n' "FROM $BASE_IMAGE-rootfs" "COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt" \
        "COPY pip.conf /etc/pip.conf" "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" >"$ctx/Dockerfile"
    docker build -q -t "$BASE_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
    say "$BASE_IMAGE imported (with this machine's CA bundle and pip configuration)"
fi

# --- the control-plane images kubeadm runs as static pods, and the add-ons: one static binary each -------------
binary_image() {  # binary_image IMAGE BINARY [NAME]: an image holding only BINARY, as /usr/local/bin/NAME, its entrypoint
    local image=$1 binary=$2 name=${3:-$(basename "$2")} dir
    have "$image" && return 0
    dir=$(mktemp -d)
    mkdir -p "$dir/usr/local/bin" "$dir/tmp" "$dir/etc"
    chmod 1777 "$dir/tmp"
    cp "$binary" "$dir/usr/local/bin/$name"
    echo "root:x:0:0:root:/root:/usr/local/bin/nologin" >"$dir/etc/passwd"
    tar -C "$dir" -c . | docker import --change 'ENV PATH=/usr/local/bin' \
        --change "ENTRYPOINT [\"/usr/local/bin/$name\"]" - "$image" >/dev/null
    rm -rf "$dir"
    say "$image"
}
binary_image "registry.k8s.io/kube-apiserver:$K8S_VERSION" "$CP_BIN/kube-apiserver"
binary_image "registry.k8s.io/kube-controller-manager:$K8S_VERSION" "$CP_BIN/kube-controller-manager"
binary_image "registry.k8s.io/kube-scheduler:$K8S_VERSION" "$CP_BIN/kube-scheduler"
binary_image "registry.k8s.io/etcd:$ETCD_TAG" "$CP_BIN/etcd"
binary_image "registry.k8s.io/pause:$PAUSE_VERSION" "$BIN/pause"
# CoreDNS's Deployment passes only args: its entrypoint is the binary
binary_image "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" "$BIN/coredns-$COREDNS_VERSION" coredns
# kind's default storage (local-path; its helper pods run the base image) and the KubeRay operator
binary_image "$PROVISIONER_IMAGE" "$BIN/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION" local-path-provisioner
binary_image "$KUBERAY_IMAGE" "$CP_BIN/kuberay-operator-v$KUBERAY_VERSION" kuberay-operator
binary_image "$REGISTRY_IMAGE" "$BIN/registry-$REGISTRY_VERSION" registry
binary_image "$KSERVE_IMAGE" "$CP_BIN/kserve-manager-$KSERVE_VERSION" manager
binary_image "$AGENT_IMAGE" "$BIN/kserve-agent-$KSERVE_VERSION" agent
binary_image "$TRAEFIK_IMAGE" "$BIN/traefik-$TRAEFIK_VERSION" traefik
binary_image "$PROMETHEUS_IMAGE" "$BIN/prometheus-$PROMETHEUS_VERSION" prometheus

# kube-proxy programs iptables: the base plus Debian's iptables and conntrack
if ! have "registry.k8s.io/kube-proxy:$K8S_VERSION"; then
    ctx=$(mktemp -d)
    cp "$BIN/kube-proxy" "$ctx/"
    docker build -q -t "registry.k8s.io/kube-proxy:$K8S_VERSION" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -f "$HERE/kube-proxy.Dockerfile" "$ctx" >"$OUT/logs/kube-proxy-image.log" 2>&1 \
        || { tail -20 "$OUT/logs/kube-proxy-image.log" >&2; exit 1; }
    rm -rf "$ctx"
    say "registry.k8s.io/kube-proxy:$K8S_VERSION"
fi

# --- the node image: kind's base layout on bookworm, then the Kubernetes bits, as kind's own node build does ---
if ! have "$NODE_IMAGE"; then
    ctx=$(mktemp -d)
    cp -r "$KIND_FILES" "$ctx/files"
    chmod -R u+w "$ctx/files"
    cp "$BIN/kubelet" "$BIN/kubeadm" "$BIN/kubectl" "$ctx/"
    echo "$K8S_VERSION" >"$ctx/version"
    restrict=false   # without CAP_SYS_RESOURCE (see docker.sh) no process may lower its oom_score_adj
    capbnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
    (( (16#$capbnd >> 24 & 1) == 1 )) || restrict=true
    docker build -t "$NODE_IMAGE-base" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PAUSE_VERSION=$PAUSE_VERSION" \
        --build-arg "RESTRICT_OOM_SCORE_ADJ=$restrict" \
        -f "$HERE/node.Dockerfile" "$ctx" >"$OUT/logs/node-image.log" 2>&1 \
        || { tail -30 "$OUT/logs/node-image.log" >&2; exit 1; }
    rm -rf "$ctx"
    say "$NODE_IMAGE-base (systemd, containerd, kubelet)"

    # the component images go into the node's containerd unpacked by the kubelet at first use (kind does the same)
    images="registry.k8s.io/kube-apiserver:$K8S_VERSION registry.k8s.io/kube-controller-manager:$K8S_VERSION"
    images="$images registry.k8s.io/kube-scheduler:$K8S_VERSION registry.k8s.io/kube-proxy:$K8S_VERSION"
    images="$images registry.k8s.io/etcd:$ETCD_TAG registry.k8s.io/pause:$PAUSE_VERSION"
    images="$images registry.k8s.io/coredns/coredns:$COREDNS_VERSION $PROVISIONER_IMAGE $BASE_IMAGE"
    builder=$(docker run -d --entrypoint=sleep --security-opt seccomp=unconfined "$NODE_IMAGE-base" infinity)
    trap 'docker rm -f -v "$builder" >/dev/null 2>&1 || true' EXIT
    docker exec "$builder" bash -c 'nohup containerd >/dev/null 2>&1 & for i in $(seq 30); do
        [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1'
    # shellcheck disable=SC2086
    docker save $images | docker exec -i "$builder" ctr --namespace=k8s.io images import \
        --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >/dev/null
    docker exec "$builder" pkill containerd
    docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' "$builder" "$NODE_IMAGE" >/dev/null
    docker rm -f -v "$builder" >/dev/null
    trap - EXIT
    say "$NODE_IMAGE (with $(echo "$images" | wc -w) images in its containerd)"
fi
say "done"
