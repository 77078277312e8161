"""ModelDeployment -> InferenceService, field by field; the status mapping back.

Upstream fields checked (read from the KServe sources with the search tool, not guessed):

kserve/kserve ``pkg/apis/serving/v1beta1/inference_service.go``: InferenceServiceSpec ``predictor``,
  ``transformer``, ``explainer``; LoggerSpec ``url``, ``mode`` (all | request | response).
kserve/kserve ``pkg/apis/serving/v1beta1/predictor.go``: PredictorSpec inlines ``PodSpec`` (``containers``,
  ``volumes``, ``nodeSelector``, ``tolerations``, ``securityContext``…) and ``ComponentExtensionSpec``.
kserve/kserve ``pkg/apis/serving/v1beta1/component.go``: ComponentExtensionSpec ``minReplicas``,
  ``maxReplicas``, ``scaleTarget``, ``scaleMetric`` (cpu | memory | concurrency | rps), ``canaryTrafficPercent``,
  ``logger``, ``batcher``, ``labels``, ``annotations`` (added to the component pod).
kserve/kserve ``pkg/apis/serving/v1beta1/predictor_custom.go`` + ``pkg/constants/constants.go``: the predictor
  container of an inlined pod spec is the one named ``kserve-container`` (InferenceServiceContainerName);
  ``STORAGE_URI`` on it is its storage URI (``GetStorageUri``).
kserve/kserve v0.20.0 ``pkg/apis/serving/v1beta1/inference_service_validation.go`` (validateCanarySpecs): a
  ``spec.canary`` needs a stable predictor whose implementation has a storage URI, or a ``model``.
  ``pkg/webhook/admission/pod/storage_initializer_injector.go``: a ``pvc://<claim>/<path>`` storage URI is mounted
  from the claim at /mnt/models (subPath <path>, no init container), any other gets a storage-initializer init
  container downloading it there; ``STORAGE_URI`` is then rewritten to /mnt/models.
kserve/kserve ``pkg/constants/constants.go``: annotations ``serving.kserve.io/deploymentMode`` (Standard |
  Knative; RawDeployment / Serverless are the deprecated names), ``serving.kserve.io/autoscalerClass`` (hpa |
  keda | external | none), ``serving.kserve.io/enable-prometheus-scraping``.
kserve/kserve v0.20.0 ``pkg/controller/v1beta1/inferenceservice/reconcilers/service/service_reconciler.go``
  (createDefaultSvc): the Standard-mode predictor Service takes the ports of the first container (or of
  ``transformer-container``): ``ports[0]`` becomes Service port 80 named ``ports[0].name`` (target: the agent's 9081
  when a logger or batcher is set), the others keep their numbers; a name containing ``grpc`` or ``h2c`` makes
  it gRPC (appProtocol kubernetes.io/h2c; ``reconcilers/ingress/httproute_reconciler.go`` picks the REST port as
  the first other one). ``pkg/webhook/admission/pod/agent_injector.go``: the agent (port 9081, ``agent-port``)
  forwards to ``ports[0].containerPort`` of ``kserve-container`` and copies Containers[0]'s readiness probe.
``pkg/webhook/admission/pod/metrics_aggregate_injector.go``: with ``serving.kserve.io/enable-prometheus-scraping``
  "true" the pod mutator sets ``prometheus.io/port`` to 9091 (queue-proxy) or 9088 (queue-proxy's aggregation),
  ports only Knative pods have; absent, the inferenceservice-config ``metricsAggregator`` default applies.
knative/serving ``pkg/apis/serving/k8s_validation.go``: one declared container port in the whole pod, named
  ``http1``, ``h2c`` or nothing; ``pkg/reconciler/revision/resources/deploy.go`` renames it ``user-port``.
kserve/kserve ``pkg/apis/serving/v1beta1/inference_service_validation.go`` (validateAutoScalingCompExtension):
  in Knative mode cpu/memory scale metrics are validated against the HPA class (annotation
  ``autoscaling.knative.dev/class: hpa.autoscaling.knative.dev``), otherwise against the KPA (concurrency, rps).
kserve/kserve pull request #5672 (merged, KServe v0.20; ``inference_service.go`` and ``predictor.go``):
  ``spec.canary`` is a list of CanarySpec ``{trafficPercent (0-100), predictor (PredictorSpec, name required)}``,
  Standard mode only, names unique, trafficPercent sum <= 100, no autoscaling fields on a canary; PredictorSpec
  gained ``name``; changing ``predictor.name`` requires a changed storage URI (so kubeloop names only canaries);
  status ``canaryStatuses`` and a ``CanaryPredictorReady`` condition. Knative canary: ``canaryTrafficPercent`` splits
  between the latest revision and the last one rolled out at 100%
  (``status.components.predictor.latestRolledoutRevision``), docs/samples/v1beta1/rollout/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop.api import ModelDeployment, ModelVersion, parse_resource
from operators import inferenceservice as isvc
from operators.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings()


def deployment(**spec: Any) -> ModelDeployment:
    doc = yaml.safe_load((REPO / "manifests/samples/modeldeployment.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="md-uid", generation=2)
    doc["spec"].update(spec)
    md = parse_resource(doc)
    assert isinstance(md, ModelDeployment)
    return md


def version(n: int, uri: str | None = None) -> ModelVersion:
    doc = yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text())
    doc["metadata"].update(name=f"arrests-v{n}", namespace="ml")
    doc["spec"]["version"] = n
    doc["spec"]["artifactUri"] = uri or f"file:///var/lib/kubeloop/registry/arrests/v{n}/artifact"
    mv = parse_resource(doc)
    assert isinstance(mv, ModelVersion)
    return mv


VERSIONS = {1: version(1), 2: version(2)}


def containers(component: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in component["containers"]}


def arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def test_identity_owner_labels_and_standard_annotations() -> None:
    obj = isvc.desired_inferenceservice(deployment(), VERSIONS, SETTINGS)
    assert (obj["apiVersion"], obj["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    meta = obj["metadata"]
    assert (meta["name"], meta["namespace"]) == ("arrests", "ml")
    (ref,) = meta["ownerReferences"]
    assert ref == {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "arrests",
        "uid": "md-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert meta["labels"]["app.kubernetes.io/component"] == "inference"
    assert meta["labels"]["kubeloop.dev/modeldeployment"] == "arrests"
    assert meta["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert meta["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert "autoscaling.knative.dev/class" not in meta["annotations"]
    assert set(obj["spec"]) == {"predictor"}


def test_autoscaling_from_the_spec() -> None:
    md = deployment(autoscaling={"minReplicas": 2, "maxReplicas": 7, "metric": "memory", "target": 70})
    predictor = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 7)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("memory", 70)
    assert "canaryTrafficPercent" not in predictor


def test_server_container_runs_the_model_version() -> None:
    predictor = isvc.desired_inferenceservice(deployment(), VERSIONS, SETTINGS)["spec"]["predictor"]
    server = containers(predictor)["kserve-container"]
    assert predictor["containers"][0]["name"] == "kserve-container"  # KServe's predictor container comes first
    assert server["image"] == SETTINGS.serving_image
    assert server["command"] == ["python", "-m", "serving.server"]
    assert arg(server, "--model-version") == "/etc/kubeloop/versions/v1.yaml"
    assert arg(server, "--host") == "0.0.0.0"
    assert arg(server, "--http-port") == "8080"
    assert arg(server, "--endpoint") == "default"
    assert arg(server, "--inference-service") == "arrests"
    assert arg(server, "--namespace") == "ml"
    assert "--logger-url" not in server["args"]  # KServe's logger posts the CloudEvents in a cluster
    assert server["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert server["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "500m", "memory": "1Gi"},
    }
    assert predictor["annotations"]["kubeloop.dev/artifact-uri"] == VERSIONS[1].spec.artifact_uri
    assert predictor["labels"]["kubeloop.dev/version"] == "1"


def test_drift_sidecar_and_logger_wiring() -> None:
    md = deployment(drift={"enabled": True, "detector": "mmd", "window": 300, "pValue": 0.01, "referenceSize": 900})
    predictor = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)["spec"]["predictor"]
    sidecar = containers(predictor)["drift-detector"]
    assert sidecar["image"] == SETTINGS.drift_image
    assert sidecar["command"] == ["python", "-m", "monitoring.sidecar"]
    assert arg(sidecar, "--host") == "127.0.0.1"
    assert arg(sidecar, "--port") == str(SETTINGS.sidecar_port)
    assert arg(sidecar, "--model-version") == "/etc/kubeloop/versions/v1.yaml"
    assert arg(sidecar, "--default-version") == "1"
    assert arg(sidecar, "--detector") == "mmd" and arg(sidecar, "--backend") == "alibi"
    assert arg(sidecar, "--window") == "300"
    scipy = isvc.desired_inferenceservice(deployment(drift={"backend": "scipy"}), VERSIONS, SETTINGS)["spec"]
    assert arg(containers(scipy["predictor"])["drift-detector"], "--backend") == "scipy"
    assert arg(sidecar, "--p-value") == "0.01"
    assert arg(sidecar, "--reference-size") == "900"
    # the ingest listener on loopback (only the logger in the pod posts to it), the read-only one on the pod network
    assert arg(sidecar, "--host") == "127.0.0.1" and arg(sidecar, "--metrics-host") == "0.0.0.0"
    assert arg(sidecar, "--metrics-port") == str(SETTINGS.sidecar_metrics_port)
    assert sidecar["ports"] == [{"name": "drift-metrics", "containerPort": 8091, "protocol": "TCP"}]
    assert predictor["logger"] == {"url": f"http://127.0.0.1:{SETTINGS.sidecar_port}/", "mode": "all"}


def test_no_sidecar_and_no_logger_without_drift_monitoring() -> None:
    predictor = isvc.desired_inferenceservice(deployment(drift={"enabled": False}), VERSIONS, SETTINGS)["spec"][
        "predictor"
    ]
    assert list(containers(predictor)) == ["kserve-container"]
    assert "logger" not in predictor


def test_volumes_mounts_and_security() -> None:
    predictor = isvc.desired_inferenceservice(deployment(), VERSIONS, SETTINGS)["spec"]["predictor"]
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes["model-versions"] == {"name": "model-versions", "configMap": {"name": "arrests-model-versions"}}
    assert volumes["kubeloop-home"]["persistentVolumeClaim"] == {"claimName": SETTINGS.storage_pvc, "readOnly": True}
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in predictor["containers"]:
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model-versions"]["readOnly"] is True
        assert mounts["kubeloop-home"] == {
            "name": "kubeloop-home",
            "mountPath": SETTINGS.home_mount_path,
            "readOnly": True,
        }
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}


def test_gpus_and_node_selector() -> None:
    md = deployment(resources={"cpu": 2, "memory": "8Gi", "gpu": 1})
    predictor = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)["spec"]["predictor"]
    c = containers(predictor)
    assert c["kserve-container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["kserve-container"]["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert "nvidia.com/gpu" not in c["drift-detector"]["resources"]["limits"]
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    no_gpu = isvc.desired_inferenceservice(deployment(), VERSIONS, SETTINGS)["spec"]["predictor"]
    assert "nodeSelector" not in no_gpu and "tolerations" not in no_gpu


def test_standard_canary_is_a_named_spec_canary_entry() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 25})
    obj = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)
    spec = obj["spec"]
    stable = spec["predictor"]
    assert arg(containers(stable)["kserve-container"], "--model-version") == "/etc/kubeloop/versions/v1.yaml"
    assert "canaryTrafficPercent" not in stable and "name" not in stable
    (entry,) = spec["canary"]
    assert entry["trafficPercent"] == 25
    candidate = entry["predictor"]
    assert candidate["name"] == "v2"
    for field in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "canaryTrafficPercent"):
        assert field not in candidate
    server = containers(candidate)["kserve-container"]
    assert arg(server, "--model-version") == "/etc/kubeloop/versions/v2.yaml"
    assert arg(server, "--endpoint") == "canary"
    sidecar = containers(candidate)["drift-detector"]
    assert arg(sidecar, "--default-version") == "2"
    assert sidecar["args"].count("--model-version") == 2
    assert candidate["logger"]["url"] == isvc.logger_url(SETTINGS)
    assert candidate["annotations"]["kubeloop.dev/artifact-uri"] == VERSIONS[2].spec.artifact_uri
    # the stable pod's sidecar knows the canary version too
    assert containers(stable)["drift-detector"]["args"].count("--model-version") == 2
    assert obj["metadata"]["annotations"]["kubeloop.dev/canary-version"] == "2"
    assert isvc.traffic_split(md) == [
        {"version": 1, "percent": 75, "role": "stable"},
        {"version": 2, "percent": 25, "role": "canary"},
    ]


def test_knative_canary_uses_canary_traffic_percent() -> None:
    md = deployment(deploymentMode="Knative", canary={"version": 2, "trafficPercent": 10})
    obj = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)
    assert "canary" not in obj["spec"]
    predictor = obj["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert arg(containers(predictor)["kserve-container"], "--model-version") == "/etc/kubeloop/versions/v2.yaml"
    annotations = obj["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Knative"
    assert annotations["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"  # metric cpu
    assert "serving.kserve.io/autoscalerClass" not in annotations


def test_knative_canary_waits_for_the_stable_rollout() -> None:
    md = deployment(deploymentMode="Knative", canary={"version": 2, "trafficPercent": 10})
    obj = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS, with_canary=False)
    predictor = obj["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor
    assert arg(containers(predictor)["kserve-container"], "--model-version") == "/etc/kubeloop/versions/v1.yaml"
    assert "kubeloop.dev/canary-waiting" in obj["metadata"]["annotations"]
    assert isvc.traffic_split(md, with_canary=False) == [{"version": 1, "percent": 100, "role": "stable"}]
    assert not isvc.stable_rolled_out(None)
    assert not isvc.stable_rolled_out({"status": {"components": {"predictor": {}}}})
    rolled = {"status": {"components": {"predictor": {"latestRolledoutRevision": "arrests-predictor-00001"}}}}
    assert isvc.stable_rolled_out(rolled)


@pytest.mark.parametrize(
    ("metric", "klass"), [("concurrency", "kpa"), ("rps", "kpa"), ("cpu", "hpa"), ("memory", "hpa")]
)
def test_knative_autoscaler_class_follows_the_metric(metric: str, klass: str) -> None:
    md = deployment(deploymentMode="Knative", autoscaling={"minReplicas": 0, "maxReplicas": 4, "metric": metric})
    obj = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)
    assert obj["metadata"]["annotations"]["autoscaling.knative.dev/class"] == f"{klass}.autoscaling.knative.dev"
    assert obj["spec"]["predictor"]["minReplicas"] == 0


def test_storage_uri_of_every_predictor_names_the_artifact_on_the_pvc() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 10})
    spec = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)["spec"]
    stable, candidate = spec["predictor"], spec["canary"][0]["predictor"]
    for component, n in ((stable, 1), (candidate, 2)):
        server = containers(component)["kserve-container"]
        env = {e["name"]: e["value"] for e in server["env"]}
        assert env["STORAGE_URI"] == f"pvc://kubeloop-home/registry/arrests/v{n}/artifact"
        assert env["KUBELOOP_HOME"] == SETTINGS.home_mount_path  # the server still reads the artifact there
        sidecar = containers(component)["drift-detector"]
        assert "STORAGE_URI" not in {e["name"] for e in sidecar["env"]}  # KServe reads kserve-container's only
    knative = isvc.desired_inferenceservice(deployment(deploymentMode="Knative"), VERSIONS, SETTINGS)["spec"]
    server = containers(knative["predictor"])["kserve-container"]
    assert {"name": "STORAGE_URI", "value": "pvc://kubeloop-home/registry/arrests/v1/artifact"} in server["env"]


@pytest.mark.parametrize(
    ("uri", "pvc", "expected"),
    [
        ("file:///kl/registry/arrests/v1/artifact", "home", "pvc://home/registry/arrests/v1/artifact"),
        ("/kl/registry/arrests/v1/artifact", "home", "pvc://home/registry/arrests/v1/artifact"),
        ("file:///kl/a%20b/./artifact", "home", "pvc://home/a b/artifact"),
        ("file:///kl", "home", "pvc://home"),
        ("file:///kl/../other/artifact", "home", "file:///kl/../other/artifact"),  # not on the volume
        ("file:///kl-old/artifact", "home", "file:///kl-old/artifact"),
        ("s3://models/arrests/v1", "home", "s3://models/arrests/v1"),
        # no PVC: the URI as it is, for KServe's storage initializer to download (issue 16 moves artifacts to s3://)
        ("file:///kl/registry/arrests/v1/artifact", "", "file:///kl/registry/arrests/v1/artifact"),
    ],
)
def test_storage_uri(uri: str, pvc: str, expected: str) -> None:
    assert isvc.storage_uri(uri, Settings(storage_pvc=pvc, home_mount_path="/kl")) == expected


def test_versions_configmap_holds_each_model_version() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 10})
    cm = isvc.desired_versions_configmap(md, VERSIONS)
    assert cm["metadata"]["name"] == "arrests-model-versions"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "md-uid"
    assert set(cm["data"]) == {"v1.yaml", "v2.yaml"}
    for n in (1, 2):
        again = parse_resource(yaml.safe_load(cm["data"][f"v{n}.yaml"]))
        assert isinstance(again, ModelVersion)
        assert again.spec == VERSIONS[n].spec
    only_stable = isvc.desired_versions_configmap(deployment(), VERSIONS)
    assert set(only_stable["data"]) == {"v1.yaml"}


# --- status ---------------------------------------------------------------------------------------------------------


def test_status_from_a_ready_inferenceservice() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 25})
    obj = {
        "metadata": {"name": "arrests"},
        "status": {
            "url": "http://arrests.ml.example.com",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "", "message": ""},
                {"type": "CanaryPredictorReady", "status": "False", "reason": "CanariesNotReady", "severity": "Info"},
            ],
        },
    }
    status = isvc.modeldeployment_status(md, obj)
    assert status["url"] == "http://arrests.ml.example.com"
    assert status["ready"] is True
    assert status["traffic"] == isvc.traffic_split(md)
    assert status["canaryPhase"] == "Progressing"
    assert status["drift"] == {"state": "Unknown"}
    assert status["observedGeneration"] == 2
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert (conditions["CanaryReady"]["status"], conditions["CanaryReady"]["reason"]) == ("False", "CanariesNotReady")


def test_status_url_is_the_routes_when_kubeloop_routes() -> None:
    obj = {"metadata": {"name": "arrests"}, "status": {"url": "http://arrests-ml.example.com"}}
    routed = isvc.modeldeployment_status(deployment(), obj, route_url="http://arrests.ml.example.com")
    assert routed["url"] == "http://arrests.ml.example.com"
    assert isvc.modeldeployment_status(deployment(), obj)["url"] == "http://arrests-ml.example.com"


def test_status_before_kserve_reports_anything() -> None:
    status = isvc.modeldeployment_status(deployment(), {"metadata": {"name": "arrests"}})
    assert "ready" not in status and "url" not in status
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "Unknown", "Reconciling")
    assert status["canaryPhase"] == "None"


def test_status_keeps_what_other_writers_own() -> None:
    old = {"drift": {"state": "Drift", "minPValue": 0.001}, "canaryPhase": "Promoted"}
    status = isvc.modeldeployment_status(deployment(), None, old)
    assert "drift" not in status  # the sidecar's report stays
    assert "canaryPhase" not in status  # the canary controller's verdict stays


def rejected(n: int, reason: str) -> ModelVersion:
    mv = version(n)
    mv.spec.stage, mv.spec.stage_reason = "Rejected", reason
    return mv


ANALYSIS = {"steps": [10, 100]}


@pytest.mark.parametrize(
    ("spec", "versions", "expected"),
    [
        ({}, {1: version(1)}, ("True", "Admitted", "arrests:1 Production")),
        (
            {"canary": {"version": 2}},
            {1: version(1), 2: rejected(2, "rocAuc 0.55 < 0.6")},
            ("False", "VersionRejected", "spec.canary.version: arrests:2 is Rejected (rocAuc 0.55 < 0.6): serve a "
             "Candidate or Production version, or set spec.allowRejected: true to serve it anyway for debugging"),
        ),
        (
            {"canary": {"version": 2}},
            {1: rejected(1, "a"), 2: rejected(2, "b")},
            ("False", "VersionRejected", "spec.version: arrests:1 is Rejected (a); spec.canary.version: arrests:2 is "
             "Rejected (b): serve a Candidate or Production version, or set spec.allowRejected: true to serve it "
             "anyway for debugging"),
        ),
        (
            {"allowRejected": True, "canary": {"version": 2, "analysis": ANALYSIS}},
            {1: version(1), 2: rejected(2, "b")},
            ("True", "RejectedAllowed", "spec.canary.version: arrests:2 is Rejected (b): served because "
             "spec.allowRejected is true (debugging); the canary analysis does not run while a Rejected version is "
             "served"),
        ),
        ({"allowRejected": True}, {1: version(1)}, ("True", "Admitted", "arrests:1 Production")),
    ],
)  # fmt: skip
def test_admission_refuses_a_rejected_version_the_spec_does_not_allow(
    spec: dict[str, Any], versions: dict[int, ModelVersion], expected: tuple[str, str, str]
) -> None:
    cond = isvc.admission(deployment(**spec), versions)
    assert (cond["type"], cond["status"], cond["reason"], cond["message"]) == ("VersionAdmitted", *expected)
    status = {"conditions": [cond]}
    assert isvc.admitted(status) is (expected[0] == "True")
    assert isvc.analysable(status) is (expected[1] == "Admitted")


def test_status_of_a_refused_spec_keeps_the_split_the_inferenceservice_serves() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 25})
    refused = isvc.admission(md, {1: version(1), 2: rejected(2, "rolled back")})
    obj = {"metadata": {"name": "arrests"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    status = isvc.modeldeployment_status(md, obj, {"conditions": [refused]})
    assert status["ready"] is True
    assert not {"traffic", "canaryPhase", "observedGeneration"} & set(status)  # the refused spec is not what serves
    assert {c["type"]: c["status"] for c in status["conditions"]}["VersionAdmitted"] == "False"
    assert isvc.admitted({}) and isvc.analysable({})  # written before the condition existed: as admitted


# --- metrics: named container ports and scrape annotations ----------------------------------------------------------

IANA_SVC_NAME = r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$"  # k8s validation.IsValidPortName


def predictors(md: ModelDeployment) -> list[dict[str, Any]]:
    spec = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)["spec"]
    return [spec["predictor"], *(entry["predictor"] for entry in spec.get("canary", []))]


def test_stable_and_canary_pods_name_the_server_and_sidecar_metrics_ports() -> None:
    md = deployment(drift={"enabled": True}, canary={"version": 2, "trafficPercent": 10})
    for predictor in predictors(md):
        ports = [(c["name"], p) for c in predictor["containers"] for p in c.get("ports", [])]
        assert [(name, p["name"], p["containerPort"]) for name, p in ports] == [
            ("kserve-container", isvc.SERVER_PORT_NAME, SETTINGS.server_port),
            ("drift-detector", isvc.SIDECAR_METRICS_PORT_NAME, SETTINGS.sidecar_metrics_port),
        ]
        for _, port in ports:
            assert re.match(IANA_SVC_NAME, port["name"]), port
            # KServe treats a Service port whose name holds grpc or h2c as gRPC: the REST port must not look like one
            assert "grpc" not in port["name"] and "h2c" not in port["name"]
        # KServe's Service and agent take the first container's first port: the model server's
        assert predictor["containers"][0]["ports"][0]["containerPort"] == SETTINGS.server_port
        # the ingest port stays undeclared: it is bound to the pod's loopback
        assert SETTINGS.sidecar_port not in [p["containerPort"] for _, p in ports]


def test_knative_pods_declare_only_the_server_port() -> None:
    md = deployment(deploymentMode="Knative", drift={"enabled": True})
    (predictor,) = predictors(md)
    ports = [p for c in predictor["containers"] for p in c.get("ports", [])]
    assert ports == [{"name": "http1", "containerPort": SETTINGS.server_port, "protocol": "TCP"}]
    sidecar = containers(predictor)["drift-detector"]
    assert arg(sidecar, "--metrics-port") == str(SETTINGS.sidecar_metrics_port)  # still listening, undeclared


def test_scrape_annotations_name_the_server_port_and_keep_kserve_from_rewriting_them() -> None:
    md = deployment(canary={"version": 2, "trafficPercent": 10})
    obj = isvc.desired_inferenceservice(md, VERSIONS, SETTINGS)
    assert obj["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "false"
    for predictor in predictors(md):
        annotations = predictor["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(SETTINGS.server_port)
        assert annotations["prometheus.io/path"] == "/metrics"
    moved = Settings(server_port=8000, sidecar_metrics_port=9100)
    predictor = isvc.desired_inferenceservice(md, VERSIONS, moved)["spec"]["predictor"]
    assert predictor["annotations"]["prometheus.io/port"] == "8000"
    assert containers(predictor)["drift-detector"]["ports"][0]["containerPort"] == 9100


@pytest.mark.parametrize(
    ("ports", "problem"),
    [
        ({"sidecar_metrics_port": 8090}, "must differ"),
        ({"server_port": 9081}, "KServe's agent"),
        ({"sidecar_metrics_port": 0}, "expected 1-65535"),
    ],
)
def test_predictor_ports_are_checked(ports: dict[str, int], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings(**ports)
