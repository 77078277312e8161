#!/usr/bin/env bash
# Bring up kubeloop's third-party stack on a kind cluster made from kind-config.yaml, at the versions of
# platform/versions.env: cert-manager, Envoy Gateway (Gateway API), KServe (Standard mode), the KubeRay operator,
# kube-prometheus-stack, Kubeflow Pipelines; then, with KUBELOOP=1, kubeloop's own chart.
#
#   platform/up.sh                      # everything
#   SKIP="kfp prometheus" platform/up.sh
#   KUBELOOP=1 platform/up.sh           # also helm install helm/kubeloop (images built and `kind load`ed first)
#   LOCAL=1 KUBELOOP=1 platform/up.sh   # on a machine that reaches no image registry (./dev e2e does this)
#   HELM_ARGS="--set ray.head.cpu=500m" ...  # more arguments for kubeloop's helm install
#
# Needs docker, kind, kubectl and helm; idempotent: re-running upgrades in place. LOCAL=1 needs none of them
# beforehand: the same stack from what platform/kind/ and platform/dev-controlplane/ build (Docker engine, kind,
# the node image, kubectl and helm; Traefik as the Gateway, KServe's and KubeRay's controllers, Prometheus with
# plain scrape jobs), in the same order. What is not built locally yet is said and skipped.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=versions.env
source "$HERE/versions.env"
CLUSTER=${KIND_CLUSTER:-kubeloop}
SKIP=${SKIP:-}
LOCAL=${LOCAL:-0}
START=$SECONDS

need() { command -v "$1" >/dev/null || { echo "up.sh: $1 is required" >&2; exit 1; }; }
wanted() { [[ " $SKIP " != *" $1 "* ]]; }
step() { printf '\n== %s (%d s)\n' "$*" "$((SECONDS - START))"; }
if [ "$LOCAL" = 1 ]; then   # not built for registry-less machines yet
    echo "up.sh: LOCAL=1 has no local build of cert-manager and KFP yet: skipped"
    SKIP="$SKIP cert-manager kfp"
fi

step "kind cluster $CLUSTER"
if [ "$LOCAL" = 1 ]; then
    KUBECONFIG=$(bash "$HERE/kind/create.sh" --name "$CLUSTER" | tail -1)
    export KUBECONFIG
    PATH="$(bash "$HERE/kind/build.sh" --print-bin-dir):$(bash "$HERE/dev-controlplane/build.sh" --print-bin-dir):$PATH"
    kubectl() { "$(bash "$HERE/kind/build.sh" --print-bin-dir)/kubectl" "$@"; }
    # shellcheck source=kind/versions.env
    source "$HERE/kind/versions.env"
    PYTHON=${PYTHON:-python3}   # with PyYAML (./dev e2e passes the project's)
    # images go to the cluster's local registry (create.sh), which every node pulls from: `kind load` would copy
    # each gigabyte-sized image whole into every node
    REGISTRY=${REGISTRY:-$(bash "$HERE/kind/create.sh" --print-registry)/kubeloop}
    publish() { docker tag "$1" "$2" && docker push -q "$2" >/dev/null; }   # publish IMAGE NAME: as NAME, pulled
else
    for tool in docker kind kubectl helm; do need "$tool"; done
    if ! kind get clusters | grep -qx "$CLUSTER"; then
        kind create cluster --name "$CLUSTER" --config "$ROOT/kind-config.yaml" --wait 120s
    fi
    kubectl config use-context "kind-$CLUSTER"
    publish() { docker tag "$1" "$2" && kind load docker-image --name "$CLUSTER" "$2"; }   # publish IMAGE NAME
fi

if wanted cert-manager; then
    step "cert-manager $CERT_MANAGER_VERSION"
    helm upgrade --install cert-manager cert-manager --repo https://charts.jetstack.io \
        --version "$CERT_MANAGER_VERSION" --namespace cert-manager --create-namespace \
        --set crds.enabled=true --wait --timeout 10m
fi

if wanted gateway && [ "$LOCAL" = 1 ]; then
    step "Traefik $TRAEFIK_VERSION, the Gateway (built from Go modules: platform/kind/traefik.yaml)"
    upstream="$(dirname "$(bash "$HERE/dev-controlplane/build.sh" --print-bin-dir)")/upstream/gateway-api-$GATEWAY_API_VERSION"
    kubectl apply --server-side --force-conflicts \
        $(printf -- '-f %s ' "$upstream"/config/crd/standard/gateway.networking.k8s.io_*.yaml) >/dev/null
    kubectl create namespace kserve --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    image="${REGISTRY%/*}/traefik:$TRAEFIK_VERSION"
    publish "$(bash "$HERE/kind/images.sh" --print-traefik-image)" "$image"
    sed "s#image: TRAEFIK_IMAGE#image: $image#" "$HERE/kind/traefik.yaml" | kubectl apply -f - >/dev/null
    kubectl -n traefik rollout status deployment/traefik --timeout=180s
elif wanted gateway; then
    step "Envoy Gateway $ENVOY_GATEWAY_VERSION (and the Gateway API CRDs)"
    helm upgrade --install eg oci://docker.io/envoyproxy/gateway-helm --version "$ENVOY_GATEWAY_VERSION" \
        --namespace envoy-gateway-system --create-namespace --wait --timeout 10m
    kubectl create namespace kserve --dry-run=client -o yaml | kubectl apply -f -
    kubectl apply -f "$HERE/gateway.yaml"
fi

if wanted kserve && [ "$LOCAL" = 1 ]; then
    step "KServe $KSERVE_VERSION controller, Standard mode (built from Go modules: platform/kind/kserve.py)"
    bin_dir=$(bash "$HERE/dev-controlplane/build.sh" --print-bin-dir)
    # shellcheck disable=SC2046
    kubectl apply --server-side --force-conflicts $(printf -- '-f %s ' $("$PYTHON" "$HERE/kind/kserve.py" "$bin_dir" crds)) >/dev/null
    kubectl create namespace kserve --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    image="${REGISTRY%/*}/kserve-manager:$KSERVE_VERSION" agent="${REGISTRY%/*}/kserve-agent:$KSERVE_VERSION"
    publish "$(bash "$HERE/kind/images.sh" --print-kserve-image)" "$image"
    publish "$(bash "$HERE/kind/images.sh" --print-agent-image)" "$agent"
    "$PYTHON" "$HERE/kind/kserve.py" "$bin_dir" controller "$image" "$agent" | kubectl apply -f - >/dev/null
    kubectl -n kserve rollout status deployment/kserve-controller-manager --timeout=180s
    "$PYTHON" "$HERE/kind/kserve.py" "$bin_dir" webhooks | kubectl apply -f - >/dev/null
elif wanted kserve; then
    step "KServe $KSERVE_VERSION, Standard mode, Gateway API"
    helm upgrade --install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd --version "$KSERVE_VERSION" \
        --namespace kserve --create-namespace --wait
    helm upgrade --install kserve oci://ghcr.io/kserve/charts/kserve-resources --version "$KSERVE_VERSION" \
        --namespace kserve \
        --set kserve.controller.deploymentMode=Standard \
        --set kserve.controller.gateway.ingressGateway.enableGatewayApi=true \
        --set kserve.controller.gateway.ingressGateway.kserveGateway=kserve/kserve-ingress-gateway \
        --wait --timeout 10m
fi

if wanted kuberay && [ "$LOCAL" = 1 ]; then
    step "KubeRay operator $KUBERAY_VERSION (built from Go modules: platform/kind/kuberay-operator.yaml)"
    upstream="$(dirname "$(bash "$HERE/dev-controlplane/build.sh" --print-bin-dir)")/upstream/kuberay-v$KUBERAY_VERSION"
    kubectl apply --server-side --force-conflicts -f "$upstream/config/crd/bases" >/dev/null
    kubectl apply -f "$upstream/config/rbac/role.yaml" >/dev/null
    kubectl create namespace ray-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    image="${REGISTRY%/*}/kuberay-operator:v$KUBERAY_VERSION"
    publish "$(bash "$HERE/kind/images.sh" --print-kuberay-image)" "$image"
    sed "s#image: KUBERAY_IMAGE#image: $image#" "$HERE/kind/kuberay-operator.yaml" | kubectl apply -f - >/dev/null
    kubectl -n ray-system rollout status deployment/kuberay-operator --timeout=180s
elif wanted kuberay; then
    step "KubeRay operator $KUBERAY_VERSION"
    helm upgrade --install kuberay-operator kuberay-operator --repo https://ray-project.github.io/kuberay-helm/ \
        --version "$KUBERAY_VERSION" --namespace ray-system --create-namespace --wait --timeout 10m
fi

if wanted prometheus && [ "$LOCAL" = 1 ]; then
    step "Prometheus $PROMETHEUS_VERSION (built from Go modules: platform/kind/prometheus.yaml)"
    image="${REGISTRY%/*}/prometheus:$PROMETHEUS_VERSION"
    publish "$(bash "$HERE/kind/images.sh" --print-prometheus-image)" "$image"
    sed "s#image: PROMETHEUS_IMAGE#image: $image#" "$HERE/kind/prometheus.yaml" | kubectl apply -f - >/dev/null
    kubectl -n monitoring rollout status deployment/prometheus --timeout=180s
    prometheus_url=http://prometheus.monitoring:9090
elif wanted prometheus; then
    step "kube-prometheus-stack $KUBE_PROMETHEUS_STACK_VERSION"
    # pick up every ServiceMonitor/PodMonitor/PrometheusRule, not only the chart's own
    helm upgrade --install kube-prometheus-stack kube-prometheus-stack \
        --repo https://prometheus-community.github.io/helm-charts --version "$KUBE_PROMETHEUS_STACK_VERSION" \
        --namespace monitoring --create-namespace \
        --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
        --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
        --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
        --wait --timeout 15m
    prometheus_url=http://prometheus-operated.monitoring:9090
fi

if wanted kfp; then
    step "Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
    kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
    kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
    kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
fi

if [[ "${KUBELOOP:-0}" == 1 ]]; then
    step "kubeloop images (images/build.sh), published to the cluster's nodes"
    registry=${REGISTRY:-ghcr.io/kubeloop}
    tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/helm/kubeloop/Chart.yaml")
    images=${IMAGES:-operator serving drift training}
    # shellcheck disable=SC2086
    if [ "$LOCAL" = 1 ]; then
        PYTHON_IMAGE=$(bash "$HERE/kind/images.sh" --print-base-image) REGISTRY=$registry bash "$ROOT/images/build.sh" $images
    else
        REGISTRY=$registry bash "$ROOT/images/build.sh" $images
    fi
    # each published under a tag naming its content, so that a rebuilt image reaches nodes that hold an older one
    tags=()
    for name in $images; do
        id=$(docker image inspect --format '{{.Id}}' "$registry/$name:$tag")
        id=${id#sha256:}
        publish "$registry/$name:$tag" "$registry/$name:$tag-${id:0:12}"
        case "$name" in
            operator) tags+=(--set "image.tag=$tag-${id:0:12}") ;;
            *) tags+=(--set "workloadImages.$name.tag=$tag-${id:0:12}") ;;
        esac
    done

    step "kubeloop (helm/kubeloop) and KUBELOOP_HOME in namespace default"
    # prometheus-operator's monitors where kube-prometheus-stack runs; the local Prometheus has scrape jobs instead
    monitors=false
    if wanted prometheus && [ "$LOCAL" != 1 ]; then monitors=true; fi
    helm upgrade --install kubeloop "$ROOT/helm/kubeloop" --namespace kubeloop-system --create-namespace \
        --set image.repository="$registry/operator" \
        --set workloadImages.training.repository="$registry/training" \
        --set workloadImages.serving.repository="$registry/serving" \
        --set workloadImages.drift.repository="$registry/drift" "${tags[@]}" \
        --set analysis.prometheusUrl="${prometheus_url:-}" \
        --set metrics.serviceMonitor.enabled="$monitors" --set metrics.prometheusRule.enabled="$monitors" \
        --set predictor.podMonitor.enabled="$monitors" \
        --set webhook.enabled="$(wanted cert-manager && echo true || echo false)" \
        ${HELM_ARGS:-} --wait --timeout 5m
    kubectl apply -n default -f "$HERE/kubeloop-home.yaml"
fi

step "done"
[ "$LOCAL" != 1 ] || echo "kubeconfig: $KUBECONFIG"
echo "KServe:  kubectl get inferenceservices -A     KubeRay: kubectl get rayjobs -A"
if [ "$LOCAL" = 1 ]; then
    echo "Prometheus: kubectl -n monitoring port-forward svc/prometheus 9090   (API only: no web UI in this build)"
    echo "Gateway: http://traefik.traefik in the cluster, Host <deployment>.<namespace>.example.com"
else
    echo "KFP UI:  kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80"
    echo "Grafana: kubectl -n monitoring port-forward svc/kube-prometheus-stack-grafana 3000:80"
fi
echo "kubeloop samples: kubectl apply -f manifests/samples/trainingjob.yaml"
