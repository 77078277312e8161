"""Artifacts on a real S3 server (SeaweedFS `weed mini`, tests/support/s3_server.py) through kubeloop.storage: the
upload is content addressed and idempotent, a reader fetches it once, the model server serves a version whose
artifact is in the bucket with the same answers as from file://, and each bad input (no such bucket, refused
credentials, read-only credentials, an unfinished upload) fails naming the bucket or key and what to fix, with no
secret in the message (a scheme kubeloop does not speak: tests/unit/test_storage.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeloop import storage
from kubeloop.api import TrainingJob
from kubeloop.artifact import ModelArtifact, local_path
from kubeloop.errors import KubeloopError
from kubeloop.registry import Registry
from kubeloop.training.job import run_training_job
from tests.support.s3_server import BUCKET, READER, WRITER, S3Server, s3_server
from tests.support.serving_fixtures import arrests_frame, home_with_shared_models, rows, start_server, stop_all

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as running:
        yield running


@pytest.fixture
def writer(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    for key, value in server.env(WRITER).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBELOOP_HOME", str(tmp_path / "home"))  # an empty fetch cache
    return server


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with home_with_shared_models(tmp_path_factory, "s3-models"):
        yield local_path(Registry().get("arrests", 1).spec.artifact_uri)


def test_an_artifact_goes_to_the_bucket_once_and_comes_back_byte_for_byte(writer: S3Server, artifact: Path) -> None:
    base = storage.parse(f"s3://{BUCKET}/runs")
    uri = storage.upload_artifact(artifact, base)
    assert uri == f"s3://{BUCKET}/runs/artifacts/sha256-{storage.artifact_digest(artifact)}"
    assert storage.upload_artifact(artifact, base) == uri  # a retried upload finds it done
    fetched = local_path(uri)
    files = sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file())
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == sorted(
        [*files, storage.COMPLETE]
    )
    assert all((fetched / name).read_bytes() == (artifact / name).read_bytes() for name in files)
    frame = arrests_frame().head(50)
    assert (ModelArtifact.load(uri).predict(frame) == ModelArtifact.load(str(artifact)).predict(frame)).all()


def test_the_model_server_serves_a_version_from_the_bucket_as_from_disk(
    writer: S3Server, artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBELOOP_STORAGE", f"s3://{BUCKET}/served")
    uri = storage.store_artifact(artifact)
    assert uri.startswith(f"s3://{BUCKET}/served/artifacts/sha256-")
    on_disk = artifact.parent / "modelversion.yaml"
    in_bucket = tmp_path / "modelversion.yaml"  # the same record, naming the bucket's copy
    in_bucket.write_text(on_disk.read_text().replace(artifact.resolve().as_uri(), uri))
    assert uri in in_bucket.read_text()
    body = {"instances": rows(arrests_frame(), 20)}
    servers = [start_server(on_disk, tmp_path / "disk.log"), start_server(in_bucket, tmp_path / "s3.log")]
    try:
        answers = [httpx.post(f"{s.url}/v1/models/arrests:predict", json=body, timeout=30) for s in servers]
    finally:
        stop_all(*servers)
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["predictions"] == answers[1].json()["predictions"]
    assert WRITER[1] not in (tmp_path / "s3.log").read_text()


@pytest.mark.parametrize(
    ("uri", "keys", "says"),
    [
        ("s3://no-such-bucket/x", WRITER, "bucket 'no-such-bucket' does not exist: create it"),
        (f"s3://{BUCKET}/x", ("kubeloop-writer", "wrong-secret"), "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        (f"s3://{BUCKET}/x", ("nobody", "nothing"), "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        (f"s3://{BUCKET}/readonly", READER, "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and"),
    ],
    ids=["missing-bucket", "wrong-secret", "unknown-key", "read-only"],
)
def test_bad_storage_fails_naming_the_bucket_and_what_to_fix(
    server: S3Server,
    artifact: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    uri: str,
    keys: tuple[str, str],
    says: str,
) -> None:
    for key, value in server.env(keys).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBELOOP_HOME", str(tmp_path))
    with pytest.raises(KubeloopError) as failed:
        storage.upload_artifact(artifact, storage.parse(uri))
    message = str(failed.value)
    assert says in message and keys[1] not in message, message
    if keys == READER:
        assert message.startswith(f"cannot write s3://{BUCKET}/readonly/artifacts/sha256-")


def test_an_unfinished_upload_is_never_taken_for_an_artifact(writer: S3Server, artifact: Path) -> None:
    from pyarrow import fs

    s3 = storage.filesystem()
    partial = storage.parse(f"s3://{BUCKET}/crashed/artifacts/sha256-{'0' * 64}")
    with s3.open_output_stream(partial.child("model.pt").path) as out:  # the files, but never the COMPLETE marker
        out.write((artifact / "model.pt").read_bytes())
    assert s3.get_file_info(partial.child("model.pt").path).type == fs.FileType.File
    with pytest.raises(KubeloopError, match="no COMPLETE marker under it, so its upload never finished"):
        local_path(partial.uri)


def test_a_training_job_registers_a_version_whose_artifact_is_in_the_bucket(
    writer: S3Server, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBELOOP_STORAGE", f"s3://{BUCKET}/trained")
    job = TrainingJob.model_validate(
        {
            "metadata": {"name": "to-the-bucket"},
            "spec": {
                "model": {"name": "arrests", "params": {"hidden_units": [8]}},
                "dataset": {"uri": "bundled://arrests", "label": "released", "positiveClass": "Yes"},
                "hyperparameters": {"epochs": 1, "batchSize": 256, "seed": 3},
                "workers": {"replicas": 2},
            },
        }
    )
    record = run_training_job(job).model_version
    assert record.spec.artifact_uri.startswith(f"s3://{BUCKET}/trained/artifacts/sha256-")
    assert Registry().get("arrests", record.spec.version).spec.artifact_uri == record.spec.artifact_uri
    assert ModelArtifact.load(record.spec.artifact_uri).predict(arrests_frame().head(10)).shape == (10,)
