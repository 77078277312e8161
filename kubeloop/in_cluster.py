"""What a run does differently inside a kubeloop RayJob: hand its results to the operator.

The operator gives the RayJob's head the name of a ConfigMap it owns (KUBELOOP_RESULT_CONFIGMAP) and a service
account allowed to patch only that ConfigMap; the run writes its results there as YAML documents, one per key (a
training run: the ModelVersion manifest under KUBELOOP_RESULT_KEY and its search under `tuning.yaml`; a batch
prediction: its progress and outcome under `batchprediction.yaml`), and the operator turns them into resources
and status (the operator stays the only writer of kubeloop.dev resources).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubeloop.api import ModelVersion

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def publish_result(record: ModelVersion) -> bool:
    """Patch the result ConfigMap with the record; False when not running in a kubeloop RayJob."""
    return publish({os.environ.get("KUBELOOP_RESULT_KEY", "modelversion.yaml"): record.to_manifest()})


def publish(documents: Mapping[str, Any]) -> bool:
    """Merge documents (ConfigMap key -> YAML-able value) into the result ConfigMap; False outside a RayJob."""
    name = os.environ.get("KUBELOOP_RESULT_CONFIGMAP")
    if not name:
        return False
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    url = f"https://{host}:{port}/api/v1/namespaces/{os.environ['KUBELOOP_NAMESPACE']}/configmaps/{name}"
    data = {key: yaml.safe_dump(value, sort_keys=False) for key, value in documents.items()}
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="PATCH",
        headers={
            "Authorization": f"Bearer {(SERVICE_ACCOUNT / 'token').read_text()}",
            "Content-Type": "application/merge-patch+json",
        },
    )
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=30):
        return True
