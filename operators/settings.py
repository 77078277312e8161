"""The operator's settings, in one place: read once from the environment (the chart sets these variables).

Every value has a default that works for ``python -m operators`` against a dev cluster; the Helm chart's values
map onto the ``KUBELOOP_*`` variables one to one (see helm/kubeloop/templates/deployment.yaml).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import kubeloop

DEFAULT_IMAGE_TAG = kubeloop.__version__
DEFAULT_REGISTRY = "ghcr.io/kubeloop"
# KServe's agent container (injected into a predictor pod that has a logger, as kubeloop's do) listens on this port
# (kserve pkg/constants InferenceServiceDefaultAgentPort); none of the predictor pod's own ports may take it
KSERVE_AGENT_PORT = 9081


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_GATEWAY = re.compile(rf"({_DNS_LABEL}/)?{_DNS_LABEL}(\.{_DNS_LABEL})*")  # [namespace/]name
_DOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def _json_map(value: Any) -> Any:
    """A JSON object of strings from the environment; empty means none."""
    if not isinstance(value, str):
        return value
    if value.strip() == "":
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"expected a JSON object of strings, got {value!r}") from None


class Settings(BaseSettings):
    """Each field is read from KUBELOOP_<FIELD NAME> (KUBELOOP_SERVING_IMAGE, KUBELOOP_GPU_NODE_SELECTOR, ...)."""

    model_config = SettingsConfigDict(env_prefix="KUBELOOP_", frozen=True, extra="ignore")

    # images of the workloads the operator creates
    training_image: str = f"{DEFAULT_REGISTRY}/training:{DEFAULT_IMAGE_TAG}"
    serving_image: str = f"{DEFAULT_REGISTRY}/serving:{DEFAULT_IMAGE_TAG}"
    drift_image: str = f"{DEFAULT_REGISTRY}/drift:{DEFAULT_IMAGE_TAG}"
    image_pull_policy: str = "IfNotPresent"

    # KUBELOOP_HOME in the cluster: a PersistentVolumeClaim of this name in the resource's namespace, mounted at
    # home_mount_path in the Ray pods (read-write: registry, snapshots, Ray Train checkpoints) and in the predictor
    # pods (read-only: the artifacts). Empty: no volume (an emptyDir on the Ray head; artifacts must be reachable
    # otherwise). For more than one Ray node it must be ReadWriteMany.
    storage_pvc: str = "kubeloop-home"
    home_mount_path: str = "/var/lib/kubeloop"

    user_id: int = 10001  # the images' user and group (images/*.Dockerfile); also the fsGroup of the volume
    ray_version: str = "2.60.0"  # the Ray in the training image (KubeRay picks the submit command by it)
    ray_ttl_seconds: int = 0  # keep the finished Ray cluster this long (0: delete it at once)

    # the Ray head: runs the driver (`kubeloop run -f …`: data loading, evaluation), Ray Train's controller, the GCS
    # and the dashboard KubeRay submits to, no training workers; at 2Gi Ray's memory monitor killed the sample's run
    ray_head_cpu: str = "1"
    ray_head_memory: str = "4Gi"
    # nodes for GPU pods (Ray workers and predictors asking for nvidia.com/gpu): a node selector and a toleration
    gpu_node_selector: Annotated[dict[str, str], NoDecode, BeforeValidator(_json_map)] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    gpu_toleration: bool = True

    # the predictor pod: the model server (KServe's kserve-container, /metrics on its port too), the drift sidecar's
    # ingest listener for the KServe logger's CloudEvents (on the pod's loopback only) and its read-only listener on
    # the pod network (/metrics, /status, /healthz) that Prometheus scrapes
    server_port: int = 8080
    sidecar_port: int = 8090
    sidecar_metrics_port: int = 8091
    sidecar_cpu: str = "250m"
    # importing the detector (alibi-detect, torch) alone takes ~0.95 GB: at 512Mi real pods were OOMKilled
    sidecar_memory: str = "2Gi"

    # Standard-mode traffic: an HTTPRoute per ModelDeployment (stable and canary weights) attached to this Gateway,
    # "namespace/name" ("name": a Gateway in the deployment's namespace; empty: no HTTPRoute, and a canary gets no
    # traffic), for the host <deployment>.<namespace>.<gateway_domain>
    gateway: str = "kserve/kserve-ingress-gateway"
    gateway_domain: str = "example.com"

    # drift, retraining and canary analysis: signals from Prometheus's HTTP API (none: no analysis), looked at every
    # analysis_tick_seconds per ModelDeployment; an empty query is kubeloop.analysis.Queries.cluster()'s selector
    prometheus_url: str = ""
    analysis_tick_seconds: int = 5
    query_requests: str = ""
    query_latency: str = ""
    query_predictions: str = ""
    query_predicted_classes: str = ""
    query_drift: str = ""

    # reconciling
    workers: int = 32  # threads running the (synchronous) handlers, mostly waiting on the apiserver
    retry_delay: int = 15  # seconds before retrying a reconcile that waits on something (a ModelVersion, say)
    progress_seconds: int = 5  # how often a running BatchPrediction's or search's report is read into its status
    metrics_port: int = 9090  # 0: no /metrics endpoint
    health_port: int = 8080  # kopf's liveness endpoint, /healthz; 0: none

    # the validating admission webhook (needs a TLS certificate: the chart gets one from cert-manager)
    webhook_enabled: bool = False
    webhook_port: int = 9443
    webhook_cert: str = "/etc/kubeloop/webhook/tls.crt"
    webhook_key: str = "/etc/kubeloop/webhook/tls.key"

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, value: str) -> str:
        value = value.strip()
        if value and not _GATEWAY.fullmatch(value):
            raise ValueError(f"{value!r}: expected the Gateway as namespace/name or name, or empty for none")
        return value

    @field_validator("gateway_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        value = value.strip()
        if not _DOMAIN.fullmatch(value):
            raise ValueError(f"{value!r}: expected a DNS domain (the routes' hosts are <name>.<namespace>.<domain>)")
        return value

    @model_validator(mode="after")
    def _ports(self) -> Settings:
        ports = {
            "server port (KUBELOOP_SERVER_PORT)": self.server_port,
            "sidecar port (KUBELOOP_SIDECAR_PORT)": self.sidecar_port,
            "sidecar metrics port (KUBELOOP_SIDECAR_METRICS_PORT)": self.sidecar_metrics_port,
        }
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} {port}: expected 1-65535")
            if port == KSERVE_AGENT_PORT:
                raise ValueError(
                    f"{name} {port}: KServe's agent takes that port in predictor pods with a logger; choose another"
                )
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"the predictor pod's ports must differ, got {ports}")
        return self

    @property
    def gateway_ref(self) -> tuple[str | None, str] | None:
        """The Gateway as (namespace, or None for the route's own; name); None when there is none."""
        if not self.gateway:
            return None
        namespace, _, name = self.gateway.rpartition("/")
        return namespace or None, name

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment; a ValueError naming each bad variable."""
        try:
            return cls()
        except ValidationError as error:
            problems = []
            for item in error.errors():
                variable = "KUBELOOP_" + str(item["loc"][0]).upper() if item["loc"] else "the operator's settings"
                problems.append(f"{variable}: {item['msg'].removeprefix('Value error, ')}")
            raise ValueError("; ".join(problems)) from None


_current: Settings | None = None


def current() -> Settings:
    """The settings of this process (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def configure_kopf(kopf_settings: Any, settings: Settings) -> None:
    """kopf's own settings: where it keeps its state, how it posts events, how it reaches the webhook."""
    import kopf

    # kopf's bookkeeping lives in annotations under kubeloop.dev (not in status: the status is the API's)
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubeloop.dev")
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubeloop.dev", key="last-handled-configuration"
    )
    kopf_settings.posting.level = logging.INFO  # kopf.info/warn/exception calls become Kubernetes Events
    kopf_settings.posting.reporting_component = "kubeloop-operator"
    kopf_settings.posting.event_name_prefix = "kubeloop-"
    kopf_settings.watching.server_timeout = 300  # re-list every 5 minutes at most: level-triggered catch-up
    kopf_settings.execution.max_workers = settings.workers
    # one replica (the chart runs exactly one, with the Recreate strategy): no peering CRDs, no peering RBAC
    kopf_settings.peering.standalone = True
    if settings.webhook_enabled:
        kopf_settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0",
            port=settings.webhook_port,
            certfile=settings.webhook_cert,
            pkeyfile=settings.webhook_key,
        )
        kopf_settings.admission.managed = None  # the chart owns the ValidatingWebhookConfiguration
