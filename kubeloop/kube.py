"""kubeloop's one Kubernetes API client: the handful of kinds it touches, addressed by path, JSON in and out.

The operator (its children: server-side apply) and the pipeline steps (a TrainingJob created and waited for, a
ModelDeployment patched) write through the ``Kube`` protocol; ``RestKube`` is it over kubernetes' ApiClient, the unit
tests' in-memory fake (tests/support/fake_kube.py) another. ``RestKube`` needs the ``kubernetes`` package (the
``operators`` and ``pipelines`` extras install it), imported when a client is made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def base(self) -> str:
        return f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        parts = [self.base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
            if subresource:
                parts.append(subresource)
        return "/".join(parts)


KINDS: dict[tuple[str, str], Kind] = {
    (k.api_version, k.kind): k
    for k in (
        Kind("v1", "ConfigMap", "configmaps"),
        Kind("v1", "ServiceAccount", "serviceaccounts"),
        Kind("v1", "Pod", "pods"),
        Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
        Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
        Kind("ray.io/v1", "RayJob", "rayjobs"),
        Kind("serving.kserve.io/v1beta1", "InferenceService", "inferenceservices"),
        Kind("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
        Kind("kubeloop.dev/v1alpha1", "TrainingJob", "trainingjobs"),
        Kind("kubeloop.dev/v1alpha1", "ModelVersion", "modelversions"),
        Kind("kubeloop.dev/v1alpha1", "ModelDeployment", "modeldeployments"),
        Kind("kubeloop.dev/v1alpha1", "BatchPrediction", "batchpredictions"),
    )
}


def kind_of(api_version: str, kind: str) -> Kind:
    try:
        return KINDS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"kubeloop does not handle {kind} ({api_version}): add it to kubeloop.kube.KINDS") from None


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: Any = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body = status, reason, body

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and self.body.get("message"):
            return str(self.body["message"])
        return str(self)


class Kube(Protocol):
    """What kubeloop needs from an API client (``RestKube``; a dict-backed fake in the unit tests)."""

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None: ...

    def list(self, kind: Kind, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]: ...

    def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def patch(
        self, kind: Kind, namespace: str | None, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386)."""
        ...

    def apply(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply of ``body`` as this client's field manager, forced: created when missing; the fields
        this manager applied before and ``body`` no longer sets are removed; an unchanged intent writes nothing."""
        ...


class RestKube:
    """Kube over kubernetes.client.ApiClient: plain REST calls, no discovery. Every write is made as
    ``field_manager`` (the object's metadata.managedFields name it)."""

    def __init__(self, api_client: Any, field_manager: str) -> None:
        self.api_client = api_client
        self.field_manager = field_manager

    @classmethod
    def from_environment(cls, field_manager: str, connections: int = 1) -> RestKube:
        """In a pod: the ServiceAccount's credentials; elsewhere: $KUBECONFIG or ~/.kube/config.

        ``connections``: kept-alive connections to the apiserver, one per thread that calls it. (urllib3 does not
        wait for a free one: past the pool size each request opens, and then drops, a new TLS connection.)
        """
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = connections
        return cls(client.ApiClient(configuration), field_manager)

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api_client.call_api(
                path,
                method,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
            )
        except ApiException as error:
            try:
                payload = json.loads(error.body) if error.body else None
            except ValueError:
                payload = error.body
            raise ApiError(error.status, error.reason or "", payload) from None
        data = response.data
        return json.loads(data) if data else None

    def _written(self, path: str, **params: str) -> str:
        return f"{path}?{urlencode({'fieldManager': self.field_manager, **params})}"

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", kind.path(namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, kind: Kind, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]:
        path = kind.path(namespace)
        if label_selector:
            path += f"?{urlencode({'labelSelector': label_selector})}"
        return list((self._call("GET", path) or {}).get("items") or [])

    def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", self._written(kind.path(namespace)), dict(body))

    def patch(
        self, kind: Kind, namespace: str | None, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        path = self._written(kind.path(namespace, name, subresource))
        return self._call("PATCH", path, dict(patch), "application/merge-patch+json")

    def apply(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        path = self._written(kind.path(namespace, body["metadata"]["name"]), force="true")
        return self._call("PATCH", path, dict(body), "application/apply-patch+yaml")  # JSON is YAML
