"""kubeloop.storage without a server: storage URIs parsed or refused naming the scheme, the embedded default, and
the content digest an artifact's key is made of."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeloop import storage
from kubeloop.artifact import local_path
from kubeloop.errors import KubeloopError


def test_storage_uris_parse_to_a_bucket_and_key_and_other_schemes_are_refused(monkeypatch) -> None:
    assert storage.parse("s3://models/runs/") == storage.S3Location("models", "runs")
    assert storage.parse("s3://models").child("a").child("b").uri == "s3://models/a/b"
    for unset in ("", "file:///var/lib/kubeloop"):
        monkeypatch.setenv("KUBELOOP_STORAGE", unset)
        assert storage.configured() is None  # the embedded default: file:// under KUBELOOP_HOME
    with pytest.raises(KubeloopError, match=r"'gs://b/p': kubeloop stores to s3://BUCKET\[/PREFIX\].*gs scheme"):
        storage.parse("gs://b/p")
    with pytest.raises(KubeloopError, match="no scheme is not one of file, s3"):
        storage.parse("models/runs")
    with pytest.raises(KubeloopError, match="kubeloop reads local paths, file:// and s3:// URIs"):
        local_path("gs://bucket/artifact")


def test_the_digest_is_of_names_and_bytes_not_of_where_or_when(tmp_path: Path) -> None:
    def artifact(name: str, files: dict[str, bytes]) -> Path:
        root = tmp_path / name
        for relative, data in files.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
        return root

    one = artifact("one", {"model.pt": b"w", "transform.json": b"{}"})
    same = artifact("same", {"transform.json": b"{}", "model.pt": b"w"})
    renamed = artifact("renamed", {"weights.pt": b"w", "transform.json": b"{}"})
    changed = artifact("changed", {"model.pt": b"x", "transform.json": b"{}"})
    assert storage.artifact_digest(one) == storage.artifact_digest(same)
    assert len({storage.artifact_digest(p) for p in (one, renamed, changed)}) == 3
