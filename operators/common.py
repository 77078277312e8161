"""Pieces every desired child shares: labels, owner references, conditions, pod security defaults."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import kubeloop
from kubeloop.api import API_VERSION, Resource

MANAGED_BY = "kubeloop-operator"
PART_OF = "kubeloop"
LABEL_TRAININGJOB = "kubeloop.dev/trainingjob"
LABEL_MODELDEPLOYMENT = "kubeloop.dev/modeldeployment"
LABEL_MODEL = "kubeloop.dev/model"
LABEL_VERSION = "kubeloop.dev/version"
LABEL_ROLE = "kubeloop.dev/role"  # on a shadow's InferenceService: "shadow"


def labels(owner: Resource, component: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The standard app.kubernetes.io/* labels of a child, plus kubeloop's own."""
    out = {
        "app.kubernetes.io/name": "kubeloop",
        "app.kubernetes.io/instance": owner.metadata.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/version": kubeloop.__version__,
    }
    out.update(extra or {})
    return out


def owner_reference(owner: Resource) -> dict[str, Any]:
    """The controller owner reference to a kubeloop resource (it needs the uid the apiserver gave it)."""
    uid = (owner.metadata.model_extra or {}).get("uid")
    if not uid:
        raise ValueError(f"{owner.kind} {owner.metadata.name} has no metadata.uid: read it from the cluster first")
    return {
        "apiVersion": API_VERSION,
        "kind": owner.kind,
        "name": owner.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    owner: Resource,
    name: str,
    component: str,
    extra_labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.metadata.namespace,
        "labels": labels(owner, component, extra_labels),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its ownerReference with controller: true), None when it has none."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref.get("uid") for ref in refs if ref.get("controller")), None)


# --- Pod Security "restricted" ---------------------------------------------------------------------------


def pod_security_context(user_id: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if user_id is not None:
        out.update({"runAsUser": user_id, "runAsGroup": user_id, "fsGroup": user_id})
    return out


def container_security_context(read_only_root: bool) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def gpu_scheduling(gpus: int, node_selector: Mapping[str, str], toleration: bool) -> dict[str, Any]:
    """nodeSelector/tolerations for a pod asking for GPUs (empty when it asks for none)."""
    if gpus <= 0:
        return {}
    out: dict[str, Any] = {}
    if node_selector:
        out["nodeSelector"] = dict(node_selector)
    if toleration:
        out["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return out


def resources(cpu: int | str, memory: int | str, gpus: int = 0) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS, what Ray and model servers want); GPUs as limits."""
    amounts: dict[str, Any] = {"cpu": str(cpu), "memory": str(memory)}
    limits = dict(amounts)
    if gpus > 0:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": amounts, "limits": limits}


# --- conditions (metav1.Condition) -------------------------------------------------------------------------


def now() -> str:
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """A status timestamp (RFC 3339, UTC, seconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """A status timestamp back as a datetime (None when absent)."""
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None


def condition(type_: str, status: bool | None, reason: str, message: str = "") -> dict[str, Any]:
    value = "Unknown" if status is None else ("True" if status else "False")
    return {"type": type_, "status": value, "reason": reason, "message": message}


def merge_conditions(
    old: Iterable[Mapping[str, Any]] | None,
    new: Iterable[Mapping[str, Any]],
    generation: int | None = None,
    timestamp: str | None = None,
) -> list[dict[str, Any]]:
    """The new conditions, keeping each one's lastTransitionTime while its status does not change.

    Conditions of types not in ``new`` are kept as they were (another writer owns them).
    """
    previous = {c.get("type"): dict(c) for c in old or ()}
    stamp = timestamp or now()
    merged: dict[str, dict[str, Any]] = dict(previous)
    for cond in new:
        item = dict(cond)
        before = previous.get(item["type"])
        if before is not None and before.get("status") == item["status"] and before.get("lastTransitionTime"):
            item["lastTransitionTime"] = before["lastTransitionTime"]
        else:
            item["lastTransitionTime"] = stamp
        if generation is not None:
            item["observedGeneration"] = generation
        merged[item["type"]] = item
    return list(merged.values())


def strip_times(conditions: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Conditions without timestamps: to compare what they say, not when they were written."""
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or ()]
