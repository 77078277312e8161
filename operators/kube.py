"""A small typed-by-path Kubernetes client for the handful of kinds the operator touches, and ``apply``.

``apply(kube, desired)`` is the operator's one way of writing a child: create it when missing; when present and
owned by the same parent, change it only if the desired fields are not already there (so re-running a handler
on a converged cluster writes nothing); refuse to touch an object of the same name another owner controls.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


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
        raise ValueError(f"the operator does not handle {kind} ({api_version})") from None


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
    """What the handlers need from an API client (the real one below; a dict-backed fake in the unit tests)."""

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None: ...

    def list(self, kind: Kind, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]: ...

    def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def replace(self, kind: Kind, namespace: str | None, name: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def patch(
        self, kind: Kind, namespace: str | None, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]: ...


class RestKube:
    """Kube over kubernetes.client.ApiClient: plain REST calls, no discovery, JSON in and out."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    @classmethod
    def from_environment(cls, connections: int) -> RestKube:
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
        return cls(client.ApiClient(configuration))

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
            from urllib.parse import quote

            path += f"?labelSelector={quote(label_selector)}"
        return list((self._call("GET", path) or {}).get("items") or [])

    def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", kind.path(namespace), dict(body))

    def replace(self, kind: Kind, namespace: str | None, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("PUT", kind.path(namespace, name), dict(body))

    def patch(
        self, kind: Kind, namespace: str | None, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        return self._call("PATCH", kind.path(namespace, name, subresource), dict(patch), "application/merge-patch+json")

    def delete(self, kind: Kind, namespace: str | None, name: str) -> None:
        try:
            self._call("DELETE", kind.path(namespace, name))
        except ApiError as error:
            if error.status != 404:
                raise


# --- apply --------------------------------------------------------------------------------------------------------


class Action(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class Conflict(Exception):
    """An object of the child's name exists and another controller owns it."""


def contains(existing: Any, desired: Any) -> bool:
    """Whether ``existing`` already holds everything ``desired`` says (fields the server added are ignored).

    Mappings: every desired key present with a contained value. Lists: the same length, element-wise contained
    (the server may default fields inside list items, e.g. a container's terminationMessagePath). Scalars: equal,
    with quantities compared as strings (``1`` and ``"1"``).
    """
    if isinstance(desired, Mapping):
        if not isinstance(existing, Mapping):
            return False
        return all(key in existing and contains(existing[key], value) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(existing, list) or len(existing) != len(desired):
            return False
        return all(contains(e, d) for e, d in zip(existing, desired, strict=True))
    if isinstance(desired, bool) or isinstance(existing, bool):
        return existing is desired
    if isinstance(desired, int | float) and isinstance(existing, int | float):
        return existing == desired
    return existing == desired or (existing is not None and str(existing) == str(desired))


APPLIED_HASH = "kubeloop.dev/applied-hash"


def desired_hash(desired: Mapping[str, Any]) -> str:
    """A digest of what kubeloop asks for: a changed digest means fields may have been removed, not only added."""
    meta = desired.get("metadata") or {}
    content = {
        "body": {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata", "status")},
        "labels": meta.get("labels") or {},
        "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_HASH},
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _owner_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def apply(
    kube: Kube,
    desired: Mapping[str, Any],
    mode: str = "replace",
    create_only: bool = False,
    create_first: bool = False,
) -> tuple[Action, dict[str, Any]]:
    """Create-or-update a child by name, converging without writes when nothing changed.

    ``mode``: ``replace`` puts the whole desired spec (fields kubeloop stopped setting disappear, e.g. a canary
    removed on promotion); ``merge`` sends a JSON merge patch of the desired fields (other writers' keys stay,
    e.g. the run's result in the TrainingJob ConfigMap). ``create_only``: never change an existing object's
    spec, only its labels and owner references (a RayJob cannot be changed once submitted).

    Unless ``create_only``, the object carries the digest of what was applied (annotation
    ``kubeloop.dev/applied-hash``): a field kubeloop no longer sets is removed even though the object still
    "contains" the desired fields.

    ``create_first``: create without reading first (one request instead of two, for a child that should not exist
    yet); an existing object is then left as it is and the ``ApiError`` 409 (AlreadyExists) propagates, for the
    caller to converge it on the reading path.
    """
    kind = kind_of(desired["apiVersion"], desired["kind"])
    if not create_only:
        desired = copy.deepcopy(dict(desired))
        desired["metadata"].setdefault("annotations", {})[APPLIED_HASH] = desired_hash(desired)
    meta = desired["metadata"]
    namespace, name = meta.get("namespace"), meta["name"]
    existing = None if create_first else kube.get(kind, namespace, name)
    if existing is None:
        try:
            return Action.CREATED, kube.create(kind, namespace, desired)
        except ApiError as error:
            if error.status != 409 or create_first:
                raise
            existing = kube.get(kind, namespace, name)  # created meanwhile (another worker, a restart): converge
            if existing is None:
                raise
    want_owner = _owner_uid(desired)
    have_owner = _owner_uid(existing)
    if want_owner and have_owner != want_owner:
        raise Conflict(
            f"{desired['kind']} {namespace}/{name} exists and is not controlled by this resource "
            f"(controller uid {have_owner or 'none'}); rename or delete it"
        )
    body_keys = [key for key in desired if key not in ("apiVersion", "kind", "metadata", "status")]
    meta_wanted = {k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta}
    meta_ok = contains(existing.get("metadata") or {}, meta_wanted)
    body_ok = create_only or all(contains(existing.get(key), desired[key]) for key in body_keys)
    if meta_ok and body_ok:
        return Action.UNCHANGED, existing
    if create_only or mode == "merge":
        patch: dict[str, Any] = {"metadata": meta_wanted}
        if not create_only:
            patch.update({key: desired[key] for key in body_keys})
        return Action.UPDATED, kube.patch(kind, namespace, name, patch)
    body = {key: value for key, value in existing.items() if key != "status"}
    merged_meta = dict(existing.get("metadata") or {})
    for key in ("labels", "annotations"):
        merged_meta[key] = {**(merged_meta.get(key) or {}), **(meta.get(key) or {})}
    merged_meta["ownerReferences"] = meta.get("ownerReferences", merged_meta.get("ownerReferences"))
    body["metadata"] = merged_meta
    for key in body_keys:
        body[key] = desired[key]
    return Action.UPDATED, kube.replace(kind, namespace, name, body)
