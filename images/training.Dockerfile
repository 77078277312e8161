# syntax=docker/dockerfile:1
# kubeloop training image: the Ray head/worker image of a TrainingJob's RayJob (Ray Train + torch, the kubeloop CLI).
# Installs the "training" extra (and "pipelines": the KFP steps run in this image), at the versions of uv.lock. Build from the repository root:
#   docker build -f docker/training.Dockerfile -t ghcr.io/kubeloop/training:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY kubeloop ./kubeloop
COPY operators ./operators
COPY serving ./serving
COPY monitoring ./monitoring
COPY pipelines ./pipelines
RUN uv export --frozen --no-dev --extra training --extra pipelines --no-emit-project --format requirements-txt -o /requirements.txt \
 && uv build --wheel --out-dir /dist

FROM ${PYTHON_IMAGE}

# KubeRay probes Ray pods with wget and starts Ray through bash
RUN apt-get update \
 && apt-get install --yes --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 kubeloop && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home kubeloop
COPY --from=build /requirements.txt /dist/ /tmp/install/
RUN pip install --no-cache-dir --requirement /tmp/install/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/install/*.whl \
 && rm -rf /tmp/install
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
# KubeRay sets the command of Ray pods (ray start ...); the RayJob entrypoint runs `kubeloop run -f ...`.
