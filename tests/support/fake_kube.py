"""One in-memory Kubernetes API for the unit tests: kubeloop's `Kube` protocol (kubeloop.kube) over a dict, with
RFC 7386 merge patches, status as a subresource, resourceVersion preconditions, 409 on a second create, and
server-side apply as far as the tests need it.

Apply is modelled for one field manager: create when missing, else merge the intent into the object, less the
fields the previous intent set and this one does not; no change, no write (the resourceVersion stays). Field
ownership across managers (conflicts, shared fields, list merge keys) is not modelled: the cluster tier
(tests/cluster) checks the operator against a real apiserver's server-side apply."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from kubeloop import kube


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def dropped(previous: Any, intent: Any) -> dict[str, Any]:
    """A merge patch removing what the previous intent set and ``intent`` no longer does (lists are atomic)."""
    if not isinstance(previous, dict) or not isinstance(intent, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in previous.items():
        if key not in intent:
            out[key] = None
        elif inner := dropped(value, intent[key]):
            out[key] = inner
    return out


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.intents: dict[tuple[str, str | None, str], dict[str, Any]] = {}  # the last apply of each object
        self.writes: list[tuple[str, str, str]] = []
        self.patches: list[tuple[str, str, str | None, Any]] = []  # (kind, name, subresource, patch) as sent
        self._ids = itertools.count(1)

    def _key(self, kind: kube.Kind, namespace: str | None, name: str) -> tuple[str, str | None, str]:
        return (kind.plural, namespace, name)

    def get(self, kind: kube.Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.objects.get(self._key(kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: kube.Kind, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]:
        assert not label_selector, "the fake lists without selectors"
        return [
            copy.deepcopy(o) for (plural, ns, _), o in self.objects.items() if plural == kind.plural and ns == namespace
        ]

    def create(self, kind: kube.Kind, namespace: str | None, body: Any) -> dict[str, Any]:
        key = self._key(kind, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise kube.ApiError(409, "AlreadyExists", {"message": "exists"})
        obj = copy.deepcopy(dict(body))
        obj["metadata"].update(uid=f"uid-{next(self._ids)}", resourceVersion=str(next(self._ids)), generation=1)
        obj["metadata"].setdefault("namespace", namespace)
        self.objects[key] = obj
        self.writes.append(("create", kind.kind, obj["metadata"]["name"]))
        return copy.deepcopy(obj)

    def patch(self, kind: kube.Kind, namespace: str | None, name: str, patch: Any, subresource: str | None = None):
        key = self._key(kind, namespace, name)
        old = self.objects[key]
        self.patches.append((kind.kind, name, subresource, copy.deepcopy(patch)))
        sent = (patch.get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != old["metadata"].get("resourceVersion"):  # a precondition, as the apiserver
            raise kube.ApiError(409, "Conflict", {"message": "the object has been modified"})
        if subresource == "status":
            new = dict(old)
            new["status"] = merge_patch(old.get("status"), patch["status"])
        else:
            patch = {k: v for k, v in patch.items() if k != "status"}
            new = merge_patch(old, patch)
        new["metadata"]["resourceVersion"] = str(next(self._ids))
        self.objects[key] = new
        self.writes.append(("patch" + (f"/{subresource}" if subresource else ""), kind.kind, name))
        return copy.deepcopy(new)

    def apply(self, kind: kube.Kind, namespace: str | None, body: Any) -> dict[str, Any]:
        name = body["metadata"]["name"]
        key = self._key(kind, namespace, name)
        intent = copy.deepcopy(dict(body))
        old = self.objects.get(key)
        previous, self.intents[key] = self.intents.get(key, {}), intent
        if old is None:
            return self.create(kind, namespace, intent)
        new = merge_patch(merge_patch(old, dropped(previous, intent)), intent)
        if new == old:
            return copy.deepcopy(old)
        new["metadata"]["resourceVersion"] = str(next(self._ids))
        self.objects[key] = new
        self.writes.append(("apply", kind.kind, name))
        return copy.deepcopy(new)

    # test helpers
    def put(self, doc: dict[str, Any]) -> dict[str, Any]:
        kind = kube.kind_of(doc["apiVersion"], doc["kind"])
        created = self.create(kind, doc["metadata"].get("namespace"), doc)
        self.writes.clear()
        return created

    def find(self, kind: str, name: str, namespace: str = "ml") -> dict[str, Any] | None:
        """The stored object itself (a test may change it, as another writer would)."""
        return next(
            (o for (_, ns, n), o in self.objects.items() if o["kind"] == kind and n == name and ns == namespace),
            None,
        )

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects.values() if o["kind"] == kind]
