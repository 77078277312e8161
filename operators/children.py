"""How the operator writes a child: server-side apply, as field manager ``kubeloop-operator``, of its own objects only.

``apply(kube, desired)`` reads the child first: an object of that name another controller owns (or none does) is
refused (``Conflict``), before anything is written. Otherwise the desired object is server-side applied (forced:
kubeloop's intent wins over what another writer set on the same fields): the apiserver creates it when missing,
removes the fields kubeloop applied before and no longer sets (a canary removed on promotion), leaves other
writers' fields alone (the run's reports in its ConfigMap) and, when nothing changed, writes nothing (the
resourceVersion stays). ``Action.UNCHANGED``: the object is what it was before the apply, status aside (another
controller may write that meanwhile).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from kubeloop.kube import Kube, kind_of
from operators import common

FIELD_MANAGER = common.MANAGED_BY


class Action(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class Conflict(Exception):
    """An object of the child's name exists and this resource does not control it."""


def apply(kube: Kube, desired: Mapping[str, Any], create_only: bool = False) -> tuple[Action, dict[str, Any]]:
    """Create or converge one child (its metadata names its controller in ``ownerReferences``).

    ``create_only``: an existing object is left as it is, labels included (a RayJob cannot be changed once
    submitted).
    """
    kind = kind_of(desired["apiVersion"], desired["kind"])
    meta = desired["metadata"]
    namespace, name = meta.get("namespace"), meta["name"]
    existing = kube.get(kind, namespace, name)
    if existing is not None:
        wanted, controller = common.controller_uid(desired), common.controller_uid(existing)
        if controller != wanted:
            raise Conflict(
                f"{desired['kind']} {namespace}/{name} exists and is not controlled by this resource "
                f"(controller uid {controller or 'none'}); rename or delete it"
            )
        if create_only:
            return Action.UNCHANGED, existing
    applied = kube.apply(kind, namespace, desired)
    if existing is None:
        return Action.CREATED, applied
    return (Action.UNCHANGED if _content(applied) == _content(existing) else Action.UPDATED), applied


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object less what moves without a change of it: status, resourceVersion, managedFields."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "managedFields")}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}
