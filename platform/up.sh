#!/usr/bin/env bash
# Bring up kubeloop's third-party stack on a kind cluster made from kind-config.yaml, at the versions of
# platform/versions.env: cert-manager, Envoy Gateway (Gateway API), KServe (Standard mode), the KubeRay operator,
# kube-prometheus-stack, Kubeflow Pipelines; then, with KUBELOOP=1, kubeloop's own chart.
#
#   platform/up.sh                      # everything
#   SKIP="kfp prometheus" platform/up.sh
#   KUBELOOP=1 platform/up.sh           # also helm install helm/kubeloop (images built and `kind load`ed first)
#
# Needs docker, kind, kubectl and helm. Idempotent: re-running upgrades in place. Not runnable where there is no
# Docker engine (the project's CI uses the dev control plane of platform/dev-controlplane/ instead).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=versions.env
source "$HERE/versions.env"
CLUSTER=${KIND_CLUSTER:-kubeloop}
SKIP=${SKIP:-}

need() { command -v "$1" >/dev/null || { echo "up.sh: $1 is required" >&2; exit 1; }; }
wanted() { [[ " $SKIP " != *" $1 "* ]]; }
step() { printf '\n== %s\n' "$*"; }
for tool in docker kind kubectl helm; do need "$tool"; done

step "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config "$ROOT/kind-config.yaml" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER"

if wanted cert-manager; then
    step "cert-manager $CERT_MANAGER_VERSION"
    helm upgrade --install cert-manager cert-manager --repo https://charts.jetstack.io \
        --version "$CERT_MANAGER_VERSION" --namespace cert-manager --create-namespace \
        --set crds.enabled=true --wait --timeout 10m
fi

if wanted gateway; then
    step "Envoy Gateway $ENVOY_GATEWAY_VERSION (and the Gateway API CRDs)"
    helm upgrade --install eg oci://docker.io/envoyproxy/gateway-helm --version "$ENVOY_GATEWAY_VERSION" \
        --namespace envoy-gateway-system --create-namespace --wait --timeout 10m
    kubectl create namespace kserve --dry-run=client -o yaml | kubectl apply -f -
    kubectl apply -f "$HERE/gateway.yaml"
fi

if wanted kserve; then
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

if wanted kuberay; then
    step "KubeRay operator $KUBERAY_VERSION"
    helm upgrade --install kuberay-operator kuberay-operator --repo https://ray-project.github.io/kuberay-helm/ \
        --version "$KUBERAY_VERSION" --namespace ray-system --create-namespace --wait --timeout 10m
fi

if wanted prometheus; then
    step "kube-prometheus-stack $KUBE_PROMETHEUS_STACK_VERSION"
    # pick up every ServiceMonitor/PodMonitor/PrometheusRule, not only the chart's own
    helm upgrade --install kube-prometheus-stack kube-prometheus-stack \
        --repo https://prometheus-community.github.io/helm-charts --version "$KUBE_PROMETHEUS_STACK_VERSION" \
        --namespace monitoring --create-namespace \
        --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
        --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
        --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
        --wait --timeout 15m
fi

if wanted kfp; then
    step "Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
    kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
    kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
    kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
fi

if [[ "${KUBELOOP:-0}" == 1 ]]; then
    step "kubeloop (helm/kubeloop) and KUBELOOP_HOME in namespace default"
    helm upgrade --install kubeloop "$ROOT/helm/kubeloop" --namespace kubeloop-system --create-namespace \
        --set metrics.serviceMonitor.enabled="$(wanted prometheus && echo true || echo false)" \
        --set metrics.prometheusRule.enabled="$(wanted prometheus && echo true || echo false)" \
        --set predictor.podMonitor.enabled="$(wanted prometheus && echo true || echo false)" \
        --set webhook.enabled="$(wanted cert-manager && echo true || echo false)" \
        --wait --timeout 5m
    kubectl apply -n default -f "$HERE/kubeloop-home.yaml"
fi

step "done"
cat <<TXT
KServe:  kubectl get inferenceservices -A     KubeRay: kubectl get rayjobs -A
KFP UI:  kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80
Grafana: kubectl -n monitoring port-forward svc/kube-prometheus-stack-grafana 3000:80
kubeloop samples: kubectl apply -f manifests/samples/trainingjob.yaml
TXT
