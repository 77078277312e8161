#!/usr/bin/env bash
# Builds the dev control plane from Go modules (no Docker, no prebuilt downloads) and caches it outside the clone:
#   ${KUBELOOP_CACHE:-~/.cache/kubeloop}/controlplane-<k8s version>/bin/
#     kube-apiserver kube-controller-manager kube-scheduler   one Kubernetes release (k8s.io/kubernetes)
#     etcd                                                     go.etcd.io/etcd/server/v3 (etcdmain)
#     kwok                                                     sigs.k8s.io/kwok/cmd/kwok
#     helm                                                     helm.sh/helm/v3/cmd/helm
#     kserve-manager-<v>      KServe's controller + webhooks   github.com/kserve/kserve/cmd/manager (a wrapper module)
#     kuberay-operator-<v>    the KubeRay operator             github.com/ray-project/kuberay/ray-operator
#     weed-<v>                SeaweedFS (the tests' S3 server)  github.com/seaweedfs/seaweedfs/weed (a wrapper module)
#   ${CACHE}/controlplane-<k8s version>/upstream/{kserve,kuberay,gateway-api}-<v>/   their CRDs, webhook and config
#     manifests, copied from the same module zips
# Binaries already there are skipped, so a second run does nothing. Go's module and build caches live under
# ${KUBELOOP_CACHE}/go/ so a rebuild (or another version) reuses what was downloaded and compiled.
# Usage: build.sh [--print-bin-dir]     (versions: versions.env beside this script for the control plane and
#   ../versions.env for KServe, KubeRay and Gateway API, the versions platform/up.sh installs; the env wins)
# Needs: Go >= the go directive of k8s.io/kubernetes (1.26 for v1.37) on PATH or at /usr/local/go/bin/go, and
# the Go module proxy. Set GOMAXPROCS / run under nice to share a machine.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
while IFS='=' read -r key value; do
    case "$key" in ''|'#'*) continue ;; esac
    [ -n "${!key:-}" ] || export "$key=$value"     # the environment wins over versions.env
done < <(cat "$HERE/versions.env" "$HERE/../versions.env")

CACHE=${KUBELOOP_CACHE:-$HOME/.cache/kubeloop}
CP="$CACHE/controlplane-$K8S_VERSION"
BIN="$CP/bin"
if [ "${1:-}" = "--print-bin-dir" ]; then echo "$BIN"; exit 0; fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[ -x "$GO" ] || { echo "build.sh: no Go toolchain found (set GO=/path/to/go)" >&2; exit 1; }
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
export GOPATH="$CACHE/go/path"
mkdir -p "$BIN" "$CP/src" "$CP/logs" "$GOMODCACHE" "$GOCACHE"

# One build at a time per version (two pytest sessions may both find the cache empty).
exec 9>"$CP/.build.lock"
if ! flock -n 9; then
    echo "build.sh: another build of $CP is running; waiting for it" >&2
    flock 9
fi

K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
STAGING_VERSION="v0.${K8S_VERSION#v1.}"   # v1.37.2 -> v0.37.2
ALL="kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm kserve-manager-$KSERVE_VERSION"
ALL="$ALL kuberay-operator-v$KUBERAY_VERSION weed-$SEAWEEDFS_VERSION"
STEPS=9
total_start=$SECONDS
step=0
echo "build.sh: control plane $K8S_VERSION (etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION," \
    "KServe $KSERVE_VERSION, KubeRay v$KUBERAY_VERSION, Gateway API $GATEWAY_API_VERSION) -> $BIN"
echo "build.sh: $("$GO" version), GOMAXPROCS=${GOMAXPROCS:-all}, caches in $CACHE/go"

fail() {  # fail LOG MESSAGE
    echo "build.sh: $2 failed; last lines of $1:" >&2
    tail -n 40 "$1" >&2
    exit 1
}

# run_step NAME CMD...: print progress and time, log output to $CP/logs/NAME.log
run_step() {
    local name=$1; shift
    local log="$CP/logs/$name.log" start=$SECONDS
    step=$((step + 1))
    if [ -x "$BIN/$name" ]; then
        echo "  [$step/$STEPS] $name: cached"
        return 0
    fi
    echo "  [$step/$STEPS] $name: building ..."
    "$@" >"$log" 2>&1 || fail "$log" "$name"
    echo "  [$step/$STEPS] $name: built in $((SECONDS - start))s"
}

# --- Kubernetes: a wrapper module, since k8s.io/kubernetes requires its staging modules at v0.0.0 ---------------
k8s_module() {
    local dir="$CP/src/kubernetes"
    if [ -f "$dir/.tidy-ok" ]; then return 0; fi
    mkdir -p "$dir"
    echo "  [k8s] resolving k8s.io/kubernetes@$K8S_VERSION and its staging modules at $STAGING_VERSION ..."
    local start=$SECONDS modfile
    modfile=$(cd "$dir" && GOFLAGS=-mod=mod "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    [ -f "$modfile" ] || { echo "build.sh: could not download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
    local godir godebug staging
    godir=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$modfile")
    godebug=$(grep -E '^godebug ' "$modfile" || true)
    # every k8s.io/<module> that Kubernetes requires at v0.0.0 lives in its staging/ tree: pin it to v0.Y.Z
    staging=$(sed -n -E 's#^[[:space:]]+(k8s\.io/[^[:space:]]+) v0\.0\.0([[:space:]].*)?$#\1#p' "$modfile" | sort -u)
    [ -n "$staging" ] || { echo "build.sh: found no staging modules in $modfile" >&2; exit 1; }
    {
        echo "// Generated by platform/dev-controlplane/build.sh: builds Kubernetes $K8S_VERSION components."
        echo "module kubeloop.dev/dev-controlplane/kubernetes"
        echo
        echo "go $godir"
        [ -z "$godebug" ] || { echo; echo "$godebug"; }
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "tool ("
        echo "	k8s.io/kubernetes/cmd/kube-apiserver"
        echo "	k8s.io/kubernetes/cmd/kube-controller-manager"
        echo "	k8s.io/kubernetes/cmd/kube-scheduler"
        echo ")"
        echo
        echo "replace ("
        for m in $staging; do echo "	$m => $m $STAGING_VERSION"; done
        echo ")"
    } >"$dir/go.mod"
    rm -f "$dir/go.sum"
    (cd "$dir" && "$GO" mod tidy) >"$CP/logs/k8s-mod.log" 2>&1 || fail "$CP/logs/k8s-mod.log" "go mod tidy (kubernetes)"
    touch "$dir/.tidy-ok"
    echo "  [k8s] module graph ready in $((SECONDS - start))s ($(echo "$staging" | wc -w) staging modules replaced)"
}

build_k8s() {  # build_k8s CMD
    local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
    ld="$ld -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$K8S_MINOR"
    ld="$ld -X k8s.io/component-base/version.gitTreeState=clean"
    (cd "$CP/src/kubernetes" && "$GO" build -trimpath -ldflags "$ld" -o "$BIN/.$1.tmp" "k8s.io/kubernetes/cmd/$1") \
        && mv "$BIN/.$1.tmp" "$BIN/$1"
}

need_k8s=0
for c in kube-apiserver kube-controller-manager kube-scheduler; do [ -x "$BIN/$c" ] || need_k8s=1; done
[ "$need_k8s" = 0 ] || k8s_module
run_step kube-apiserver build_k8s kube-apiserver
run_step kube-controller-manager build_k8s kube-controller-manager
run_step kube-scheduler build_k8s kube-scheduler

# --- etcd: a wrapper main around etcdmain ---------------------------------------------------------------------
build_etcd() {
    local dir="$CP/src/etcd"
    mkdir -p "$dir"
    cat >"$dir/go.mod" <<MOD
// Generated by platform/dev-controlplane/build.sh: etcd $ETCD_VERSION.
module kubeloop.dev/dev-controlplane/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
    cat >"$dir/main.go" <<'SRC'
// Command etcd runs the etcd server (go.etcd.io/etcd/server/v3/etcdmain) for kubeloop's dev control plane.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
SRC
    rm -f "$dir/go.sum"
    (cd "$dir" && "$GO" mod tidy && "$GO" build -trimpath -ldflags "-s -w" -o "$BIN/.etcd.tmp" .) \
        && mv "$BIN/.etcd.tmp" "$BIN/etcd"
}
run_step etcd build_etcd

# --- kwok and helm: plain `go install module@version` (their go.mod files have no replaces) --------------------
build_install() {  # build_install NAME PKG@VERSION LDFLAGS [INSTALLED-NAME]
    local tmp="$CP/src/gobin-$1"
    rm -rf "$tmp"; mkdir -p "$tmp"
    GOBIN="$tmp" "$GO" install -trimpath -ldflags "$3" "$2" && mv "$tmp/${4:-$1}" "$BIN/$1" && rm -rf "$tmp"
}
run_step kwok build_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
    "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
run_step helm build_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"

# --- upstream controllers the cluster tests run as processes: KServe's manager, the KubeRay operator -----------
module_dir() {  # module_dir MODULE@VERSION -> the unpacked module in GOMODCACHE
    (cd "$CP/src" && GOFLAGS=-mod=mod "$GO" mod download -json "$1") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

build_wrapped() {  # build_wrapped NAME MODULE VERSION PACKAGE: a wrapper module that requires MODULE@VERSION
    # a module whose go.mod has replaces (KServe's pin k8s.io/* and controller-runtime) cannot be `go install`ed:
    # the wrapper repeats its replaces and excludes, and builds PACKAGE as a tool of its own
    local name=$1 module=$2 version=$3 package=$4 dir="$CP/src/$1" src
    src=$(module_dir "$module@$version")
    [ -d "$src" ] || { echo "could not download $module@$version"; return 1; }
    mkdir -p "$dir"
    {
        echo "// Generated by platform/dev-controlplane/build.sh: $package at $version."
        echo "module kubeloop.dev/dev-controlplane/$name"
        echo
        sed -n 's/^go \([0-9.]*\)$/go \1/p' "$src/go.mod"
        echo
        echo "require $module $version"
        echo
        awk '/^replace \($/ {block=1; print; next} block {print; if ($0 == ")") block=0; next}
             /^replace / {print}' "$src/go.mod"
        grep -E '^exclude ' "$src/go.mod" || true
        echo
        echo "tool $package"
    } >"$dir/go.mod"
    rm -f "$dir/go.sum"
    (cd "$dir" && "$GO" mod tidy && "$GO" build -trimpath -ldflags "-s -w" -o "$BIN/.$name.tmp" "$package") \
        && mv "$BIN/.$name.tmp" "$BIN/$name"
}

run_step "kserve-manager-$KSERVE_VERSION" build_wrapped "kserve-manager-$KSERVE_VERSION" \
    github.com/kserve/kserve "$KSERVE_VERSION" github.com/kserve/kserve/cmd/manager

run_step "kuberay-operator-v$KUBERAY_VERSION" build_install "kuberay-operator-v$KUBERAY_VERSION" \
    "github.com/ray-project/kuberay/ray-operator@v$KUBERAY_VERSION" "-s -w" ray-operator

# --- an S3 server for the object-storage tests: SeaweedFS (Apache-2.0), `weed mini` is master+volume+filer+S3 -----
run_step "weed-$SEAWEEDFS_VERSION" build_wrapped "weed-$SEAWEEDFS_VERSION" \
    github.com/seaweedfs/seaweedfs "$SEAWEEDFS_VERSION" github.com/seaweedfs/seaweedfs/weed

# their CRDs and manifests, from the same module zips (read by upstream.py). From the zip itself: `go mod download`
# unpacks a module only when this Go satisfies its go directive (gateway-api v1.7.0 asks for Go 1.27).
copy_upstream() {  # copy_upstream NAME MODULE@VERSION PATH...
    local name=$1 module=$2 zip out
    shift 2
    out="$CP/upstream/$name"
    [ -f "$out/.ok" ] && return 0
    zip=$( (cd "$CP/src" && GOFLAGS=-mod=mod "$GO" mod download -json "$module" || true) \
        | sed -n 's/^[[:space:]]*"Zip": "\(.*\)",$/\1/p')
    [ -f "$zip" ] || { echo "build.sh: could not download $module" >&2; exit 1; }
    rm -rf "$out"; mkdir -p "$out"
    python3 - "$zip" "$module" "$out" "$@" <<'PY'
import sys, zipfile
from pathlib import Path
archive, module, out, wanted = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
prefix = f"{module}/"
with zipfile.ZipFile(archive) as z:
    for member in z.namelist():
        rel = member[len(prefix):]
        if any(rel == w or rel.startswith(w.rstrip("/") + "/") for w in wanted) and not member.endswith("/"):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(z.read(member))
PY
    for path in "$@"; do [ -e "$out/$path" ] || { echo "build.sh: $module has no $path" >&2; exit 1; }; done
    touch "$out/.ok"
    echo "  [upstream] $name: $* copied"
}
copy_upstream "kserve-$KSERVE_VERSION" "github.com/kserve/kserve@$KSERVE_VERSION" \
    config/crd/full config/webhook/manifests.yaml config/configmap/inferenceservice.yaml config/rbac
copy_upstream "kuberay-v$KUBERAY_VERSION" "github.com/ray-project/kuberay/ray-operator@v$KUBERAY_VERSION" \
    config/crd/bases config/webhook config/rbac
copy_upstream "gateway-api-$GATEWAY_API_VERSION" "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" config/crd/standard

cat >"$CP/versions.txt" <<TXT
kubernetes=$K8S_VERSION
etcd=$ETCD_VERSION
kwok=$KWOK_VERSION
helm=$HELM_VERSION
kserve=$KSERVE_VERSION
kuberay=v$KUBERAY_VERSION
gateway-api=$GATEWAY_API_VERSION
seaweedfs=$SEAWEEDFS_VERSION
go=$("$GO" env GOVERSION)
TXT
echo "build.sh: done in $((SECONDS - total_start))s: $BIN"
for b in $ALL; do [ -x "$BIN/$b" ] || { echo "build.sh: $b missing" >&2; exit 1; }; done
