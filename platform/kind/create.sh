#!/usr/bin/env bash
# Creates the kind cluster of kind-config.yaml on a machine that reaches no image registry: the node image of
# images.sh, the additions of local_config.py (no kindnetd, the local etcd/CoreDNS tags, cgroup v1), then the pod
# network kindnetd would have made: a ptp + host-local CNI config per node on its podCIDR (Debian's plugins) and a
# route on every node to every other node's podCIDR; and a local image registry (distribution, as a container on
# kind's network, 127.0.0.1:5001 on the host, localhost:5001 in the nodes) that up.sh pushes kubeloop's images to:
# the nodes pull what they run, once per node, instead of `kind load` copying gigabytes into every node.
# A user with internet runs `kind create cluster --config
# kind-config.yaml` instead; platform/up.sh does one or the other.
# Usage: create.sh [--name NAME] [--print-kubeconfig]   (default name: KIND_CLUSTER or kubeloop). Prints the
# kubeconfig's path last; --print-kubeconfig only prints it, --print-registry the registry pods name images by.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER=${KIND_CLUSTER:-kubeloop}
[ "${1:-}" != "--name" ] || { CLUSTER=$2; shift 2; }
# shellcheck source=../versions.sh
source "$HERE/../versions.sh"
load_versions "$HERE/versions.env" "$HERE/../dev-controlplane/versions.env" "$HERE/../versions.env"
CACHE=${KUBELOOP_CACHE:-$HOME/.cache/kubeloop}
BIN="$CACHE/kind-$K8S_VERSION/bin"
KIND="$BIN/kind-$KIND_VERSION"
KUBECONFIG_FILE="$CACHE/kind-$K8S_VERSION/kubeconfig-$CLUSTER"
REGISTRY_NAME=kubeloop-registry REGISTRY_PORT=5001
[ "${1:-}" != "--print-kubeconfig" ] || { echo "$KUBECONFIG_FILE"; exit 0; }
[ "${1:-}" != "--print-registry" ] || { echo "localhost:$REGISTRY_PORT"; exit 0; }
PYTHON=${PYTHON:-python3}
START=$SECONDS
say() { echo "create.sh: $* ($((SECONDS - START)) s)"; }

bash "$HERE/images.sh"
NODE_IMAGE=$(bash "$HERE/images.sh" --print-node-image)
kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "cluster $CLUSTER exists"
else
    config=$(mktemp --suffix .yaml)
    "$PYTHON" "$HERE/local_config.py" "$ROOT/kind-config.yaml" "${ETCD_VERSION#v}-0" "$COREDNS_VERSION" >"$config"
    say "creating cluster $CLUSTER from kind-config.yaml with $NODE_IMAGE"
    "$KIND" create cluster --name "$CLUSTER" --config "$config" --image "$NODE_IMAGE" \
        --kubeconfig "$KUBECONFIG_FILE" ${KIND_RETAIN:+--retain}
    rm -f "$config"
fi

# the pod network: every node's CNI config on its own podCIDR, and routes to the others' through their node IPs
nodes=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
while read -r name cidr _; do
    [ -n "$cidr" ] || { echo "create.sh: node $name has no podCIDR" >&2; exit 1; }
    docker exec -i "$name" sh -c 'mkdir -p /etc/cni/net.d && cat >/etc/cni/net.d/10-kubeloop.conflist' <<JSON
{"cniVersion": "0.3.1", "name": "kubeloop", "plugins": [
  {"type": "ptp", "ipMasq": false, "mtu": 1500,
   "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state", "routes": [{"dst": "0.0.0.0/0"}],
            "ranges": [[{"subnet": "$cidr"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
    while read -r other other_cidr other_ip; do
        [ "$other" = "$name" ] || docker exec "$name" ip route replace "$other_cidr" via "$other_ip"
    done <<<"$nodes"
done <<<"$nodes"
# the registry, on kind's network so the nodes reach it by name
if [ -z "$(docker ps -q --filter "name=^$REGISTRY_NAME\$")" ]; then
    docker rm -f "$REGISTRY_NAME" >/dev/null 2>&1 || true
    mkdir -p "$CACHE/kind-$K8S_VERSION/registry"
    docker run -d --restart=always --name "$REGISTRY_NAME" -p "127.0.0.1:$REGISTRY_PORT:5000" \
        -v "$CACHE/kind-$K8S_VERSION/registry:/var/lib/registry" -v "$HERE/registry.yml:/etc/distribution/config.yml:ro" \
        "$(bash "$HERE/images.sh" --print-registry-image)" serve /etc/distribution/config.yml >/dev/null
fi
docker network connect kind "$REGISTRY_NAME" 2>/dev/null || true
while read -r name _; do
    docker exec "$name" mkdir -p "/etc/containerd/certs.d/localhost:$REGISTRY_PORT"
    printf '[host."http://%s:5000"]\n' "$REGISTRY_NAME" \
        | docker exec -i "$name" tee "/etc/containerd/certs.d/localhost:$REGISTRY_PORT/hosts.toml" >/dev/null
done <<<"$nodes"
say "pod network: $(echo "$nodes" | wc -l) nodes, $(echo "$nodes" | awk '{print $1 "=" $2}' | tr '\n' ' ')"

# kind's default storage as its node image would install it: rancher's local-path provisioner (its own manifest,
# our images), the default StorageClass; kind's fallback "standard" class has no provisioner running
manifest="$CACHE/go/mod/github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION/deploy/local-path-storage.yaml"
[ -f "$manifest" ] || { echo "create.sh: $manifest missing (platform/kind/build.sh downloads it)" >&2; exit 1; }
kubectl delete storageclass standard --ignore-not-found >/dev/null
sed -e "s#image: rancher/local-path-provisioner:.*#image: $(bash "$HERE/images.sh" --print-provisioner-image)#" \
    -e "s#image: busybox#image: $(bash "$HERE/images.sh" --print-base-image)#" "$manifest" | kubectl apply -f - >/dev/null
kubectl annotate --overwrite storageclass local-path storageclass.kubernetes.io/is-default-class=true >/dev/null

kubectl wait --for=condition=Ready nodes --all --timeout=180s >/dev/null
kubectl -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null
kubectl -n local-path-storage rollout status deployment/local-path-provisioner --timeout=180s >/dev/null
say "cluster $CLUSTER ready: $(kubectl get nodes --no-headers | wc -l) nodes Ready, CoreDNS and local-path storage available"
echo "$KUBECONFIG_FILE"
