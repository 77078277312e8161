# syntax=docker/dockerfile:1
# kubeloop serving image: the KServe model server (serving/), the predictor's kserve-container.
# Installs only the "serving" extra, at the versions of uv.lock. Build from the repository root:
#   docker build -f docker/serving.Dockerfile -t ghcr.io/kubeloop/serving:0.1.0 .
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
RUN uv export --frozen --no-dev --extra serving --no-emit-project --format requirements-txt -o /requirements.txt \
 && uv build --wheel --out-dir /dist

FROM ${PYTHON_IMAGE}

RUN groupadd --gid 10001 kubeloop && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home kubeloop
COPY --from=build /requirements.txt /dist/ /tmp/install/
RUN pip install --no-cache-dir --requirement /tmp/install/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/install/*.whl \
 && rm -rf /tmp/install
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
ENTRYPOINT ["python", "-m", "serving.server"]
