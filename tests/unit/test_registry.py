from __future__ import annotations

import threading

import pytest

from kubeloop.api import ModelVersion, load_resources
from kubeloop.errors import KubeloopError
from kubeloop.registry import Registry, parse_ref


def register(registry: Registry, model: str = "arrests") -> ModelVersion:
    (sample,) = load_resources("manifests/samples/modelversion.yaml")
    version, directory = registry.allocate(model)
    spec = sample.spec.model_copy(
        update={"model": model, "version": version, "artifact_uri": directory.as_uri(), "stage": "Candidate"}
    )
    return registry.save(spec, reason="test")


def test_versions_are_numbered_and_listed(tmp_path):
    registry = Registry(tmp_path)
    assert [register(registry).spec.version for _ in range(3)] == [1, 2, 3]
    assert [mv.metadata.name for mv in registry.list()] == ["arrests-v1", "arrests-v2", "arrests-v3"]
    assert registry.resolve("arrests").spec.version == 3
    assert registry.resolve("arrests:v2").spec.version == 2


def test_concurrent_registrations_never_share_a_version(tmp_path):
    registry = Registry(tmp_path)
    allocated: list[int] = []
    threads = [threading.Thread(target=lambda: allocated.append(registry.allocate("m")[0])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(allocated) == list(range(1, 9))


def test_promote_archives_the_previous_production_and_rollback_restores_it(tmp_path):
    registry = Registry(tmp_path)
    for _ in range(3):
        register(registry)
    registry.promote("arrests", 1)
    registry.promote("arrests", 2)
    assert [mv.spec.stage for mv in registry.list()] == ["Archived", "Production", "Candidate"]
    registry.promote("arrests", 3)
    restored = registry.rollback("arrests", reason="errors in canary")
    assert restored.spec.version == 2
    assert [mv.spec.stage for mv in registry.list()] == ["Archived", "Production", "Archived"]
    history = [change.stage for change in registry.get("arrests", 3).status.stage_history]
    assert history == ["Candidate", "Production", "Archived"]
    assert registry.get("arrests", 3).spec.stage_reason.startswith("errors in canary")


def test_rejected_versions_are_never_promoted_and_errors_are_clear(tmp_path):
    registry = Registry(tmp_path)
    register(registry)
    registry.reject("arrests", 1, "gate failed")
    with pytest.raises(KubeloopError, match="rejected"):
        registry.promote("arrests", 1)
    with pytest.raises(KubeloopError, match="no Production version"):
        registry.rollback("arrests")
    with pytest.raises(KubeloopError, match=r"no model named 'nope'.*models: arrests"):
        registry.get("nope")
    with pytest.raises(KubeloopError, match=r"has no version 9; versions: \[1\]"):
        registry.get("arrests", 9)
    with pytest.raises(KubeloopError, match="NAME:VERSION"):
        parse_ref("arrests:latest")
