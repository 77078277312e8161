#!/usr/bin/env bash
# Builds kubeloop's images from the repository root: ${REGISTRY:-ghcr.io/kubeloop}/NAME:${TAG}, TAG by default the
# chart's appVersion; PYTHON_IMAGE, when set, replaces the Dockerfiles' base (python:3.11-slim-bookworm).
# Usage: [REGISTRY=...] [TAG=...] [PYTHON_IMAGE=...] images/build.sh [operator serving drift training]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REGISTRY=${REGISTRY:-ghcr.io/kubeloop}
TAG=${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/helm/kubeloop/Chart.yaml")}
: "${TAG:?build.sh: no appVersion in helm/kubeloop/Chart.yaml}"
args=()
[ -z "${PYTHON_IMAGE:-}" ] || args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
[ $# -gt 0 ] || set -- operator serving drift training
for name in "$@"; do
    [ -f "$ROOT/images/$name.Dockerfile" ] || { echo "build.sh: no images/$name.Dockerfile" >&2; exit 2; }
done
summary=()
for name in "$@"; do
    image="$REGISTRY/$name:$TAG"
    start=$SECONDS
    docker build -f "$ROOT/images/$name.Dockerfile" -t "$image" "${args[@]}" "$ROOT"
    size=$(docker image inspect --format '{{.Size}}' "$image")
    summary+=("$image: built in $((SECONDS - start)) s, $((size / 1000000)) MB")
    echo "build.sh: ${summary[-1]}"
done
printf 'build.sh: %s\n' "${summary[@]}"
