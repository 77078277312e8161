"""What the operator's handler tests share: the in-memory API installed as the handlers' client, samples, kopf's
status patch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from kubeloop.kube import kind_of
from operators import handlers
from operators.settings import Settings
from tests.support.fake_kube import FakeKube

REPO = Path(__file__).resolve().parents[2]


def installed_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    """A FakeKube as the handlers' client, default Settings, and the Events they post in ``fake.events``."""
    client = FakeKube()
    handlers.set_kube(client)
    events: list[tuple[str, str, str]] = []
    monkeypatch.setattr(handlers, "emit", lambda body, type_, reason, message: events.append((type_, reason, message)))
    monkeypatch.setattr(handlers, "settings", lambda: Settings())
    client.events = events  # type: ignore[attr-defined]
    yield client
    handlers.set_kube(None)


def sample(name: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / f"manifests/samples/{name}.yaml").read_text())
    doc["metadata"]["namespace"] = "ml"
    doc["spec"].update(spec)
    return doc


def apply_patch(fake: FakeKube, body: dict[str, Any], patch: kopf.Patch) -> dict[str, Any]:
    """What kopf does with the handler's ``patch``: merge it into the object's status."""
    if patch.get("status"):
        kind = kind_of(body["apiVersion"], body["kind"])
        fake.patch(kind, "ml", body["metadata"]["name"], {"status": dict(patch["status"])}, subresource="status")
    return fake.find(body["kind"], body["metadata"]["name"])  # type: ignore[return-value]
