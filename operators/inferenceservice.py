"""ModelDeployment -> KServe InferenceService (serving.kserve.io/v1beta1), and its status back.

Pure functions: a ModelDeployment (read from the cluster, with its uid) and the ModelVersions it names in, the
desired children out.

The predictor is an inlined pod spec (``containers``) so the drift detector can sit beside the model server:

- ``kserve-container``: kubeloop's serving image, ``python -m serving.server --model-version
  /etc/kubeloop/versions/v<N>.yaml`` on 0.0.0.0:8080. The ModelVersion manifests come from a ConfigMap
  ``<name>-model-versions`` (owned by the ModelDeployment, one key per version, copied from the ModelVersion
  resources); the artifact they point at (``file://`` under KUBELOOP_HOME) is on the kubeloop volume, mounted
  read-only. The artifact URI is also an annotation of the pod (``kubeloop.dev/artifact-uri``).
- ``drift-detector``: the monitoring image, ``python -m monitoring.sidecar`` on 127.0.0.1:<sidecarPort>, fed by
  the predictor's KServe payload logger (``logger.url: http://127.0.0.1:<sidecarPort>/``, mode all), which posts
  every request and response as a CloudEvent to it on the pod's loopback. Its read-only listener
  (``--metrics-port``: GET /metrics, /status, /healthz; events refused) is on 0.0.0.0:<sidecarMetricsPort>.

Metrics: both containers' ``/metrics`` are reachable from outside the pod on named container ports, ``http1``
(the server; ``SERVER_PORT_NAME``) and ``drift-metrics`` (the sidecar; ``SIDECAR_METRICS_PORT_NAME``), which the
chart's PodMonitor scrapes. Why these names: KServe (Standard) builds the predictor Service from the first
container's ports, naming the Service port after ``ports[0].name`` and treating a name with ``grpc`` or ``h2c`` as
gRPC; its agent (injected with the logger) forwards to ``ports[0].containerPort`` of ``kserve-container``; and
Knative accepts only ``http1``, ``h2c`` or no name on the serving port, one declared port per pod (so in Knative
mode the sidecar's port is not declared, and Knative renames the server's to ``user-port`` in the pod). For plain
Prometheus the pods carry ``prometheus.io/scrape|port|path`` naming the server's port; KServe's own
``serving.kserve.io/enable-prometheus-scraping`` is set to "false" because, when true, KServe's pod mutator
overwrites ``prometheus.io/port`` with queue-proxy's port (9091, or 9088 with metric aggregation), which only
Knative pods have and which never includes the sidecar.

Storage as KServe sees it: ``STORAGE_URI`` on ``kserve-container`` (``storage_uri``), because KServe refuses a
Standard-mode canary whose stable predictor has neither a model nor a storage URI, and acts on it: with the
kubeloop PVC configured it is ``pvc://<claim>/<artifact path under the home mount>``, which KServe's pod mutator
mounts read-only at /mnt/models (no init container) and rewrites the variable to; the server keeps loading the
artifact named by its ModelVersion manifest from the kubeloop volume. Without a PVC it is the artifact URI as it
is, which KServe's storage initializer downloads into /mnt/models before the server starts (so it must be a URI
the initializer can fetch, e.g. s3://; a ``file://`` path outside any volume fails the pod).

Deployment modes (annotation ``serving.kserve.io/deploymentMode``):

- Standard: autoscaled by an HPA (``serving.kserve.io/autoscalerClass: hpa``, cpu or memory); a canary is an
  entry of ``spec.canary[]`` (KServe >= 0.20) ``{trafficPercent, predictor: {name: v<N>, ...}}`` with the
  candidate's pod spec and no autoscaling fields (KServe sizes it from trafficPercent, but routes only to the
  stable: the weights are kubeloop's HTTPRoute, operators.httproute).
- Knative: ``autoscaling.knative.dev/class`` kpa (concurrency, rps, scale to zero) or hpa (cpu, memory); a canary
  is ``canaryTrafficPercent`` on the predictor, which then runs the candidate: KServe splits between the new
  revision and the last one rolled out at 100% (the stable). The operator therefore creates the stable alone
  first and adds the canary once KServe reports it rolled out (see ``with_canary``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from kubeloop.api import ModelDeployment, ModelVersion
from kubeloop.api.modeldeployment import rejected_versions, version_refusal
from kubeloop.launch import drift_sidecar, model_server
from operators import common
from operators.settings import Settings, current

ISVC_API_VERSION = "serving.kserve.io/v1beta1"
COMPONENT = "inference"
VERSIONS_MOUNT = "/etc/kubeloop/versions"
SERVER_CONTAINER = "kserve-container"  # KServe's name for the predictor's serving container
SIDECAR_CONTAINER = "drift-detector"
STORAGE_URI_ENV = "STORAGE_URI"  # KServe's storage URI of a custom container (CustomSpecStorageUriEnvVarKey)
SERVER_PORT_NAME = "http1"  # valid in both modes (Knative allows only http1 | h2c on the serving port)
SIDECAR_METRICS_PORT_NAME = "drift-metrics"
KNATIVE_SERVER_PORT_NAME = "user-port"  # what Knative renames the serving port to in the pods it creates
METRICS_PATH = "/metrics"
ANNOTATION_MODE = "serving.kserve.io/deploymentMode"
KSERVE_CANARY_CONDITION = "CanaryPredictorReady"
ANNOTATION_AUTOSCALER = "serving.kserve.io/autoscalerClass"
ANNOTATION_KNATIVE_CLASS = "autoscaling.knative.dev/class"
ANNOTATION_SCRAPE = "serving.kserve.io/enable-prometheus-scraping"
KNATIVE_KPA = "kpa.autoscaling.knative.dev"
KNATIVE_HPA = "hpa.autoscaling.knative.dev"
ADMITTED = "VersionAdmitted"  # the ModelDeployment condition saying whether the versions it names may be served


def isvc_name(md: ModelDeployment) -> str:
    return md.metadata.name


def shadow_isvc_name(md: ModelDeployment) -> str:
    """The InferenceService of the deployment's shadow (operators.shadow)."""
    return f"{md.metadata.name}-shadow"


def canary_predictor_name(version: int) -> str:
    """The name of a Standard-mode canary entry's predictor (KServe names its Deployment and Service after it)."""
    return f"v{version}"


def storage_uri(artifact_uri: str, settings: Settings) -> str:
    """The artifact as KServe sees it (module docstring): under the home mount of the kubeloop PVC,
    ``pvc://<claim>/<path relative to the mount>``; anything else, the artifact URI as it is."""
    if artifact_uri.startswith("file://"):
        path = unquote(urlparse(artifact_uri).path)
    elif artifact_uri.startswith("/"):
        path = artifact_uri
    else:
        return artifact_uri
    relative = posixpath.relpath(posixpath.normpath(path), posixpath.normpath(settings.home_mount_path))
    if not settings.storage_pvc or relative == ".." or relative.startswith("../"):
        return artifact_uri
    return f"pvc://{settings.storage_pvc}" if relative == "." else f"pvc://{settings.storage_pvc}/{relative}"


def versions_configmap_name(md: ModelDeployment) -> str:
    return f"{md.metadata.name}-model-versions"


def version_key(version: int) -> str:
    return f"v{version}.yaml"


def wanted_versions(md: ModelDeployment) -> list[int]:
    """The versions a ModelDeployment serves: the stable one, then the canary and the shadow (if any)."""
    out = [md.spec.version]
    if md.spec.canary is not None:
        out.append(md.spec.canary.version)
    if md.spec.shadow is not None:
        out.append(md.spec.shadow.version)
    return out


def child_labels(md: ModelDeployment) -> dict[str, str]:
    return {common.LABEL_MODELDEPLOYMENT: md.metadata.name, common.LABEL_MODEL: md.spec.model}


def desired_versions_configmap(md: ModelDeployment, versions: Mapping[int, ModelVersion]) -> dict[str, Any]:
    data = {}
    for version in wanted_versions(md):
        manifest = versions[version].to_manifest()
        meta = manifest.get("metadata", {})
        manifest["metadata"] = {"name": meta.get("name"), "namespace": meta.get("namespace", md.metadata.namespace)}
        manifest.pop("status", None)
        data[version_key(version)] = yaml.safe_dump(manifest, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": common.metadata(md, versions_configmap_name(md), COMPONENT, child_labels(md)),
        "data": data,
    }


def _volumes(md: ModelDeployment, settings: Settings) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "model-versions", "configMap": {"name": versions_configmap_name(md)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if settings.storage_pvc:
        volumes.append(
            {"name": "kubeloop-home", "persistentVolumeClaim": {"claimName": settings.storage_pvc, "readOnly": True}}
        )
    return volumes


def _mounts(settings: Settings) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "model-versions", "mountPath": VERSIONS_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if settings.storage_pvc:
        mounts.append({"name": "kubeloop-home", "mountPath": settings.home_mount_path, "readOnly": True})
    return mounts


def _env(settings: Settings) -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "KUBELOOP_HOME", "value": settings.home_mount_path},
    ]


def _server(md: ModelDeployment, version: int, endpoint: str, settings: Settings, service: str) -> dict[str, Any]:
    res = md.spec.resources
    launch = model_server(
        f"{VERSIONS_MOUNT}/{version_key(version)}",
        host="0.0.0.0",
        port=settings.server_port,
        endpoint=endpoint,
        inputs=md.spec.inputs,
        inference_service=service,
        namespace=md.metadata.namespace,
    )
    return {
        "name": SERVER_CONTAINER,
        "image": settings.serving_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": launch.command,
        "args": launch.args,
        # the only port, so KServe's Service and agent pick it (ports[0]); its number, not its name, in the probe:
        # KServe's agent copies the probe into its own env and cannot resolve a port name
        "ports": [{"name": SERVER_PORT_NAME, "containerPort": settings.server_port, "protocol": "TCP"}],
        "env": _env(settings),
        "resources": common.resources(res.cpu, res.memory, res.gpu),
        "readinessProbe": {
            "httpGet": {"path": launch.ready_path, "port": settings.server_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "volumeMounts": _mounts(settings),
        "securityContext": common.container_security_context(read_only_root=True),
    }


def _sidecar(md: ModelDeployment, version: int, settings: Settings) -> dict[str, Any]:
    """The drift detector of one predictor pod: its default version is the one this pod serves; it also knows
    the deployment's other version so events labelled with the other endpoint are attributed correctly."""
    launch = drift_sidecar(
        [f"{VERSIONS_MOUNT}/{version_key(v)}" for v in [version, *(v for v in wanted_versions(md) if v != version)]],
        default_version=version,
        drift=md.spec.drift,
        host="127.0.0.1",
        port=settings.sidecar_port,
        metrics_host="0.0.0.0",
        metrics_port=settings.sidecar_metrics_port,
    )
    container: dict[str, Any] = {
        "name": SIDECAR_CONTAINER,
        "image": settings.drift_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": launch.command,
        "args": launch.args,
        "env": _env(settings),
        "resources": common.resources(settings.sidecar_cpu, settings.sidecar_memory),
        "volumeMounts": _mounts(settings),
        "securityContext": common.container_security_context(read_only_root=True),
    }
    if md.spec.deployment_mode == "Standard":  # Knative refuses a second declared port in the pod
        container["ports"] = [
            {"name": SIDECAR_METRICS_PORT_NAME, "containerPort": settings.sidecar_metrics_port, "protocol": "TCP"}
        ]
        # the pod is not Ready (no traffic) until the detector listens: the payload logger drops the events it
        # cannot deliver, and loading the detector takes tens of seconds on a small node
        container["readinessProbe"] = {
            "httpGet": {"path": "/healthz", "port": settings.sidecar_metrics_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        }
    return container


def logger_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.sidecar_port}/"


def predictor_spec(
    md: ModelDeployment, version: int, mv: ModelVersion, endpoint: str, settings: Settings, service: str | None = None
) -> dict[str, Any]:
    """A predictor component (KServe PredictorSpec) running one model version, of InferenceService ``service``
    (default: the deployment's)."""
    server = _server(md, version, endpoint, settings, service or isvc_name(md))
    server["env"].append({"name": STORAGE_URI_ENV, "value": storage_uri(mv.spec.artifact_uri, settings)})
    containers = [server]
    if md.spec.drift.enabled:
        containers.append(_sidecar(md, version, settings))
    predictor: dict[str, Any] = {
        "labels": {
            **child_labels(md),
            common.LABEL_VERSION: str(version),
            "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/part-of": common.PART_OF,
        },
        "annotations": {
            "kubeloop.dev/artifact-uri": mv.spec.artifact_uri,
            # plain Prometheus (the kubernetes-pods job): the server's port; the sidecar's is the container port
            # named drift-metrics (monitoring/README.md has a scrape job for it)
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(settings.server_port),
            "prometheus.io/path": METRICS_PATH,
        },
        "securityContext": common.pod_security_context(settings.user_id),
        "containers": containers,
        "volumes": _volumes(md, settings),
        **common.gpu_scheduling(md.spec.resources.gpu, settings.gpu_node_selector, settings.gpu_toleration),
    }
    if md.spec.drift.enabled:
        predictor["logger"] = {"url": logger_url(settings), "mode": "all"}
    return predictor


def autoscaling(md: ModelDeployment) -> dict[str, Any]:
    scaling = md.spec.autoscaling
    return {
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "scaleMetric": scaling.metric,
        "scaleTarget": scaling.target,
    }


def _annotations(md: ModelDeployment) -> dict[str, str]:
    spec = md.spec
    annotations = {
        ANNOTATION_MODE: spec.deployment_mode,
        ANNOTATION_SCRAPE: "false",  # else KServe rewrites prometheus.io/port to queue-proxy's (module docstring)
        "kubeloop.dev/stable-version": str(spec.version),
    }
    if spec.deployment_mode == "Standard":
        annotations[ANNOTATION_AUTOSCALER] = "hpa"
    else:
        # KServe validates cpu/memory targets against Knative's HPA class, concurrency/rps against the KPA
        metric = spec.autoscaling.metric
        annotations[ANNOTATION_KNATIVE_CLASS] = KNATIVE_KPA if metric in ("concurrency", "rps") else KNATIVE_HPA
    if spec.canary is not None:
        annotations["kubeloop.dev/canary-version"] = str(spec.canary.version)
    return annotations


def traffic_split(md: ModelDeployment, with_canary: bool = True) -> list[dict[str, Any]]:
    """The split kubeloop asks KServe for (kubeloop.dev ModelDeployment status.traffic entries)."""
    spec = md.spec
    if spec.canary is None or not with_canary:
        return [{"version": spec.version, "percent": 100, "role": "stable"}]
    percent = spec.canary.traffic_percent
    return [
        {"version": spec.version, "percent": 100 - percent, "role": "stable"},
        {"version": spec.canary.version, "percent": percent, "role": "canary"},
    ]


def desired_inferenceservice(
    md: ModelDeployment,
    versions: Mapping[int, ModelVersion],
    settings: Settings | None = None,
    with_canary: bool = True,
) -> dict[str, Any]:
    """The InferenceService of a ModelDeployment.

    ``versions`` maps each version the deployment names (stable, canary) to its ModelVersion. ``with_canary``
    False leaves the canary out (Knative mode: the stable must be rolled out before KServe can split).
    """
    settings = settings or current()
    spec = md.spec
    canary = spec.canary if with_canary else None
    isvc_spec: dict[str, Any]
    if canary is not None and spec.deployment_mode == "Knative":
        predictor = predictor_spec(md, canary.version, versions[canary.version], "default", settings)
        predictor.update(autoscaling(md))
        predictor["canaryTrafficPercent"] = canary.traffic_percent
        isvc_spec = {"predictor": predictor}
    else:
        predictor = predictor_spec(md, spec.version, versions[spec.version], "default", settings)
        predictor.update(autoscaling(md))
        isvc_spec = {"predictor": predictor}
        if canary is not None:  # Standard: a named canary deployment beside the stable one
            candidate = predictor_spec(md, canary.version, versions[canary.version], "canary", settings)
            candidate["name"] = canary_predictor_name(canary.version)
            isvc_spec["canary"] = [{"trafficPercent": canary.traffic_percent, "predictor": candidate}]
    annotations = _annotations(md)
    if spec.canary is not None and canary is None:
        annotations["kubeloop.dev/canary-waiting"] = "stable not rolled out yet"
    return {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": common.metadata(md, isvc_name(md), COMPONENT, child_labels(md), annotations),
        "spec": isvc_spec,
    }


def stable_rolled_out(isvc: Mapping[str, Any] | None) -> bool:
    """Whether KServe (Knative mode) reports a revision rolled out at 100%, the one a canary splits against."""
    if not isvc:
        return False
    predictor = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
    return bool(predictor.get("latestRolledoutRevision"))


# --- status: InferenceService -> ModelDeployment -------------------------------------------------------------


def admission(md: ModelDeployment, versions: Mapping[int, ModelVersion]) -> dict[str, Any]:
    """The VersionAdmitted condition of a deployment naming these ModelVersions: False (VersionRejected) when it
    names a Rejected one without spec.allowRejected, and then nothing of this spec is applied; True (Admitted, or
    RejectedAllowed when spec.allowRejected lets a Rejected one be served) otherwise."""
    refusal = version_refusal(md.spec, versions)
    if refusal is not None:
        return common.condition(ADMITTED, False, "VersionRejected", refusal)
    rejected = rejected_versions(md.spec, versions)
    if rejected:
        message = "; ".join(map(str, rejected)) + ": served because spec.allowRejected is true (debugging)"
        if md.spec.canary is not None and md.spec.canary.analysis is not None:
            message += "; the canary analysis does not run while a Rejected version is served"
        return common.condition(ADMITTED, True, "RejectedAllowed", message)
    stages = [f"{md.spec.model}:{version} {versions[version].spec.stage}" for version in wanted_versions(md)]
    return common.condition(ADMITTED, True, "Admitted", ", ".join(stages))


def _admission_of(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ADMITTED), None)


def admitted(status: Mapping[str, Any]) -> bool:
    """Whether a ModelDeployment's status says its spec was applied (not refused for naming a Rejected version):
    while refused, the InferenceService still serves the last spec admitted."""
    cond = _admission_of(status)
    return cond is None or cond.get("status") != "False"


def analysable(status: Mapping[str, Any]) -> bool:
    """Whether the canary analysis may judge the deployment: its spec was admitted with no Rejected version in it
    (one served under spec.allowRejected is for debugging: the analysis must not promote it, nor judge against it)."""
    cond = _admission_of(status)
    return cond is None or (cond.get("status") == "True" and cond.get("reason") == "Admitted")


def _isvc_condition(isvc: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (isvc.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def modeldeployment_status(
    md: ModelDeployment,
    isvc: Mapping[str, Any] | None,
    old_status: Mapping[str, Any] | None = None,
    with_canary: bool = True,
    route_url: str | None = None,
) -> dict[str, Any]:
    """ModelDeployment status fields from its InferenceService (a merge patch for the status subresource).

    ``route_url``: the URL of kubeloop's HTTPRoute (operators.httproute) when it has one; the status URL then, since
    only that route splits the traffic between stable and canary. Else the InferenceService's own URL.
    """
    old = dict(old_status or {})
    generation = (md.metadata.model_extra or {}).get("generation")
    ready_cond = _isvc_condition(isvc, "Ready") if isvc else None
    ready: bool | None = None
    if ready_cond is not None:
        ready = ready_cond.get("status") == "True"
    conditions = [
        common.condition(
            "Ready",
            ready,
            (ready_cond or {}).get("reason") or ("InferenceServiceReady" if ready else "InferenceServiceNotReady")
            if ready_cond
            else "Reconciling",
            (ready_cond or {}).get("message") or f"InferenceService {isvc_name(md)}",
        )
    ]
    # KServe >= 0.20 (Standard mode): CanaryPredictorReady, True once every spec.canary[] Deployment is available
    canary_cond = _isvc_condition(isvc, KSERVE_CANARY_CONDITION) if isvc else None
    if md.spec.canary is not None and md.spec.deployment_mode == "Standard":
        conditions.append(
            common.condition(
                "CanaryReady",
                None if canary_cond is None else canary_cond.get("status") == "True",
                (canary_cond or {}).get("reason") or "Reconciling",
                (canary_cond or {}).get("message") or f"canary v{md.spec.canary.version}",
            )
        )
    status: dict[str, Any] = {
        "url": route_url or ((isvc or {}).get("status") or {}).get("url"),
        "ready": ready,
        "traffic": traffic_split(md, with_canary),
        "observedGeneration": int(generation) if generation is not None else None,
        "conditions": common.merge_conditions(old.get("conditions"), conditions, generation),
    }
    if md.spec.canary is not None:
        status["canaryPhase"] = "Progressing"
    elif old.get("canaryPhase") not in ("Promoted", "RolledBack"):
        status["canaryPhase"] = "None"
    if not old.get("drift"):
        status["drift"] = {"state": "Unknown"}  # the drift sidecar reports it; nothing has yet
    if not admitted(old):  # the InferenceService serves the last spec admitted: its split and generation stay
        for key in ("traffic", "canaryPhase", "observedGeneration"):
            status.pop(key, None)
    return {k: v for k, v in status.items() if v is not None}
