# syntax=docker/dockerfile:1
# kubeloop training image: the Ray head/worker image of a TrainingJob's RayJob (Ray Train + torch, the kubeloop CLI).
# Installs the "training" extra (and "pipelines": the KFP steps run in this image), at the versions of uv.lock,
# into the venv /opt/kubeloop. Build from the repository root (or with images/build.sh):
#   docker build -f images/training.Dockerfile -t ghcr.io/kubeloop/training:0.1.0 .
# PYTHON_IMAGE: any Debian-based image with python3 3.11 and its venv module (images/README.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# uv from PyPI, in a venv of its own (Debian's python3 has no pip outside one); it reads the system's CA store
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.8
ENV PATH=/opt/uv/bin:$PATH UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
# torch and its dependencies alone (uv.lock's versions, whatever the extra), computed alike in the serving, drift
# and training images: the final stages install it first, a layer Docker then stores once for the three
RUN uv tree --frozen --no-dev --universal --package torch --no-dedupe \
    | sed 's/^[^a-z0-9]*//; s/[[ ].*//' | sort -u > /tmp/torch.names \
 && uv export --frozen --no-dev --all-extras --no-emit-project --no-annotate --no-header \
    | awk 'NR == FNR {keep[$1]; next} /^[^ ]/ {name = $1; sub(/[=[;].*/, "", name); on = name in keep} on' \
        /tmp/torch.names - > /torch.txt \
 && grep -q '^torch==' /torch.txt
COPY kubeloop ./kubeloop
COPY operators ./operators
COPY serving ./serving
COPY monitoring ./monitoring
COPY pipelines ./pipelines
RUN uv export --quiet --frozen --no-dev --extra training --extra pipelines --no-emit-project --format requirements-txt -o /requirements.txt \
 && uv build --wheel --out-dir /dist

FROM ${PYTHON_IMAGE}

RUN groupadd --gid 10001 kubeloop && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home kubeloop \
 && python3 -m venv /opt/kubeloop
ENV PATH=/opt/kubeloop/bin:$PATH
# torch (from PyPI a CUDA build: several GB of nvidia-* wheels) first; keep everything up to here identical in
# serving.Dockerfile, drift.Dockerfile and training.Dockerfile, so that this layer is shared
COPY --from=build /torch.txt /tmp/torch.txt
RUN pip install --no-cache-dir --requirement /tmp/torch.txt && rm /tmp/torch.txt
# KubeRay probes Ray pods with wget and starts Ray through bash
RUN apt-get update \
 && apt-get install --yes --no-install-recommends wget \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# --no-deps: the export is the whole locked set, and pip would refuse uv.lock's pillow override (pyproject.toml)
COPY --from=build /requirements.txt /dist/ /tmp/install/
RUN pip install --no-cache-dir --no-deps --requirement /tmp/install/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/install/*.whl \
 && rm -rf /tmp/install
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
# KubeRay sets the command of Ray pods (ray start ...); the RayJob entrypoint runs `kubeloop run -f ...`.
