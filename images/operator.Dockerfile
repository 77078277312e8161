# syntax=docker/dockerfile:1
# kubeloop operator image: the kopf operator (operators/): TrainingJob -> RayJob, ModelDeployment -> InferenceService.
# Installs only the "operators" extra, at the versions of uv.lock,
# into the venv /opt/kubeloop. Build from the repository root (or with images/build.sh):
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubeloop/operator:0.1.0 .
# PYTHON_IMAGE: any Debian-based image with python3 3.11 and its venv module (images/README.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# uv from PyPI, in a venv of its own (Debian's python3 has no pip outside one); it reads the system's CA store
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.8
ENV PATH=/opt/uv/bin:$PATH UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY kubeloop ./kubeloop
COPY operators ./operators
COPY serving ./serving
COPY monitoring ./monitoring
COPY pipelines ./pipelines
RUN uv export --quiet --frozen --no-dev --extra operators --no-emit-project --format requirements-txt -o /requirements.txt \
 && uv build --wheel --out-dir /dist

FROM ${PYTHON_IMAGE}

RUN groupadd --gid 10001 kubeloop && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home kubeloop \
 && python3 -m venv /opt/kubeloop
ENV PATH=/opt/kubeloop/bin:$PATH
# --no-deps: the export is the whole locked set, and pip would refuse uv.lock's pillow override (pyproject.toml)
COPY --from=build /requirements.txt /dist/ /tmp/install/
RUN pip install --no-cache-dir --no-deps --requirement /tmp/install/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/install/*.whl \
 && rm -rf /tmp/install
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
ENTRYPOINT ["python", "-m", "operators"]
