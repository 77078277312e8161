"""What the apiserver refuses before the operator sees it: the CRD schemas (naming the field) and the operator's
validating webhook (what a schema cannot express)."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from operators import admission
from tests.cluster.operator_checks import running_operator
from tests.support.clusterkit import Cluster, wait_for
from tests.support.operatorkit import (
    GROUP,
    VERSION,
    OperatorProcess,
    create,
    free_port,
    modelversion_doc,
    sample,
)

operator = pytest.fixture(running_operator, scope="module", name="operator")  # one operator process per module

# --- rejected by the apiserver --------------------------------------------------------------------------------------


def _tj(**spec: Any) -> dict[str, Any]:
    doc = sample("trainingjob")
    doc["metadata"]["name"] = "bad"
    for path, value in spec.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


def _md(**spec: Any) -> dict[str, Any]:
    doc = sample("modeldeployment")
    doc["metadata"]["name"] = "bad"
    doc["spec"].update(spec)
    return doc


def _mv(**spec: Any) -> dict[str, Any]:
    doc = modelversion_doc(1)
    doc["metadata"]["name"] = "bad"
    for path, value in spec.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return doc


INVALID = [
    (_tj(workers__replicas=0), "spec.workers.replicas"),
    (_tj(workers__gpu=17), "spec.workers.gpu"),
    (_tj(workers__memory="2 GB"), "spec.workers.memory"),
    (_tj(backend="nccl"), "spec.backend"),
    (_tj(hyperparameters__learningRate=0), "spec.hyperparameters.learningRate"),
    (_tj(dataset__digest="md5:abc"), "spec.dataset.digest"),
    (_tj(model__name="Bad_Name"), "spec.model.name"),
    (_tj(dataset=None), "spec.dataset"),
    (_tj(maxFailures=-1), "spec.maxFailures"),
    ({**_tj(), "metadata": {"name": "1bad"}}, "metadata.name"),  # not DNS-1035: KubeRay refuses the RayJob
    ({**_tj(), "metadata": {"name": "bad." + "x" * 20}}, "metadata.name"),
    ({**_tj(), "metadata": {"name": "x" * 48}}, "metadata.name"),  # KubeRay's RayJob names stop at 47
    (_md(autoscaling={"minReplicas": 3, "maxReplicas": 2}), "spec.autoscaling.maxReplicas"),
    (_md(canary={"version": 1, "trafficPercent": 10}), "spec.canary.version"),
    (_md(autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "rps"}), "spec.autoscaling"),
    (_md(canary={"version": 2, "trafficPercent": 150}), "spec.canary.trafficPercent"),
    (_md(drift={"detector": "chi2"}), "spec.drift.detector"),
    (_md(deploymentMode="Serverless"), "spec.deploymentMode"),
    (_md(retrain={"enabled": True}), "spec.retrain.trainingJob"),
    (_md(retrain={"enabled": True, "trainingJob": "x" * 48}), "spec.retrain.trainingJob"),
    (_md(autoscaling={"target": 101}), "spec.autoscaling.target"),  # KServe's HPA takes 1-100 percent
    (_md(autoscaling={"metric": "memory", "target": 150}), "spec.autoscaling.target"),
    (_mv(lineage__datasetDigest="sha256:xyz"), "spec.lineage.datasetDigest"),
    (_mv(stage="Live"), "spec.stage"),
]


@pytest.mark.parametrize(("doc", "field"), INVALID, ids=[f"{d['kind']}:{f}" for d, f in INVALID])
def test_invalid_resources_are_rejected_naming_the_field(
    chart: str, api: client.CustomObjectsApi, namespace: str, doc: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as error:
        create(api, namespace, doc)
    assert error.value.status == 422, error.value.body
    assert field in json.loads(error.value.body)["message"], error.value.body


def test_unknown_fields_are_rejected_by_strict_validation(chart: str, kubeconfig: Path, namespace: str) -> None:
    doc = _tj()
    doc["spec"]["workers"]["cpus"] = 2  # a typo of cpu
    doc["metadata"]["namespace"] = namespace
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", "-"],
        input=yaml.safe_dump(doc), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert 'unknown field "spec.workers.cpus"' in done.stderr


# --- the validating webhook ---------------------------------------------------------------------------------------


@pytest.fixture
def webhook(
    cluster: Cluster, operator: OperatorProcess, operator_kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[None]:
    """The operator with its admission webhook on (self-signed TLS on 127.0.0.1), registered for one namespace."""
    if not cluster.dev:
        pytest.skip("the apiserver must reach the webhook on this machine's loopback")
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    with_webhook = OperatorProcess(
        operator_kubeconfig,
        tmp_path / "operator-webhook.log",
        {
            "KUBELOOP_WEBHOOK_ENABLED": "true",
            "KUBELOOP_WEBHOOK_PORT": str(port),
            "KUBELOOP_WEBHOOK_CERT": str(crt),
            "KUBELOOP_WEBHOOK_KEY": str(key),
        },
    )
    ca = base64.b64encode(crt.read_bytes()).decode()
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": f"kubeloop-test-{namespace}"},
        "webhooks": [
            {
                "name": f"{plural}.validate.kubeloop.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "resources": [plural],
                        "operations": ["CREATE", "UPDATE"],
                    }
                ],
                "clientConfig": {"url": f"https://127.0.0.1:{port}/validate-{plural}", "caBundle": ca},
            }
            for plural in admission.PLURALS
        ],
    }
    admission_api = client.AdmissionregistrationV1Api(cluster.client())
    operator.stop()
    with_webhook.start()
    try:
        with_webhook.wait_healthy()
        admission_api.create_validating_webhook_configuration(config)
        yield
    finally:
        with contextlib.suppress(ApiException):
            admission_api.delete_validating_webhook_configuration(config["metadata"]["name"])
        with_webhook.stop()
        operator.start()
        operator.wait_healthy()


def test_the_webhook_rejects_what_the_schema_cannot_and_warns_of_missing_versions(
    webhook: None, api: client.CustomObjectsApi, kubeconfig: Path, namespace: str
) -> None:
    doc = sample("modeldeployment")
    doc["spec"]["canary"] = {"version": 2, "trafficPercent": 10, "analysis": {"steps": [50, 10]}}

    def rejected() -> str | None:
        try:
            create(api, namespace, doc)
        except ApiException as error:
            body = json.loads(error.body)
            return body["message"] if "denied the request" in body["message"] else None
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modeldeployments", "arrests")
        return None

    message = wait_for(rejected, 30, "the webhook to deny decreasing canary steps")
    assert "spec.canary.analysis.steps" in message and "steps must increase strictly" in message
    doc["spec"]["canary"]["analysis"]["steps"] = [10, 50]
    doc["metadata"]["namespace"] = namespace
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", "-"],
        input=yaml.safe_dump(doc), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no ModelVersion arrests-v1, arrests-v2 yet" in done.stderr  # admitted, with a warning


def test_the_webhook_refuses_a_batchprediction_the_schema_admits(
    webhook: None, api: client.CustomObjectsApi, namespace: str
) -> None:
    doc = sample("batchprediction")
    doc["spec"]["carry"] = ["year", "colour", "year"]  # a list the schema cannot make unique

    def rejected() -> str | None:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, "batchpredictions", doc)
        except ApiException as error:
            body = json.loads(error.body)
            return body["message"] if "denied the request" in body["message"] else None
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, "batchpredictions", "arrests-scoring")
        return None

    message = wait_for(rejected, 30, "the webhook to deny a repeated carry column")
    assert "spec.carry" in message and "year" in message
