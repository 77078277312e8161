"""Model artifacts on object storage: `s3://bucket/prefix` through pyarrow's S3 filesystem (no S3 code of ours).

`KUBELOOP_STORAGE=s3://bucket/prefix` sends each registered artifact to the bucket, content addressed:
`prefix/artifacts/sha256-<digest of its files>/`, the files first and a `COMPLETE` marker last, so an upload cut
short is never taken for an artifact and a retried one writes the same key again (or finds it done). A reader
fetches an `s3://` artifact once into `$KUBELOOP_HOME/cache/artifacts/` and uses it from there. Unset, artifacts
stay `file://` under KUBELOOP_HOME (the embedded default).

Credentials and the endpoint come from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`, `AWS_ENDPOINT_URL` for a server other than AWS); they never appear in a URI, a record or a message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kubeloop import config
from kubeloop.errors import KubeloopError

COMPLETE = "COMPLETE"  # written last: an artifact key without it is an upload that did not finish
SCHEMES = ("file", "s3")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # no leading or trailing slash; "" for the bucket's root

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def path(self) -> str:  # pyarrow's name for it
        return f"{self.bucket}/{self.key}" if self.key else self.bucket


def configured() -> S3Location | None:
    """Where KUBELOOP_STORAGE sends artifacts; None for the local default."""
    uri = os.environ.get("KUBELOOP_STORAGE", "")
    if not uri or uri.startswith("file://"):
        return None
    return parse(uri, "KUBELOOP_STORAGE")


def parse(uri: str, what: str = "storage URI") -> S3Location:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise KubeloopError(
            f"{what} {uri!r}: kubeloop stores to s3://BUCKET[/PREFIX] or file:// (the default under KUBELOOP_HOME); "
            f"{parsed.scheme or 'no'} scheme is not one of {', '.join(SCHEMES)}"
        )
    return S3Location(parsed.netloc, parsed.path.strip("/"))


def filesystem():  # -> pyarrow.fs.S3FileSystem
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    options: dict = {"region": os.environ.get("AWS_REGION", "us-east-1"), "allow_bucket_creation": False}
    if endpoint:
        parsed = urlparse(endpoint)
        options |= {"endpoint_override": parsed.netloc or endpoint, "scheme": parsed.scheme or "https"}
    return fs.S3FileSystem(**options)


def artifact_digest(directory: Path) -> str:
    """sha256 over the artifact's files: each relative name and its bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def store_artifact(directory: Path) -> str:
    """The URI a registered version names its artifact by: the bucket's copy when KUBELOOP_STORAGE is set (written
    before the record that names it), else the local directory's file:// URI."""
    base = configured()
    return upload_artifact(directory, base) if base is not None else directory.resolve().as_uri()


def upload_artifact(directory: Path, base: S3Location) -> str:
    """The artifact's files under base/artifacts/sha256-<digest>/, COMPLETE last; its s3:// URI. Idempotent."""
    target = base.child("artifacts").child(f"sha256-{artifact_digest(directory)}")
    s3 = filesystem()
    _require_bucket(s3, target)  # some servers (SeaweedFS) would create a missing one on the first write
    if _exists(s3, target.child(COMPLETE), target):
        return target.uri
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        _call(lambda p=path: _put(s3, p, target.child(p.relative_to(directory).as_posix())), target, "write")
    _call(lambda: _write(s3, target.child(COMPLETE), b""), target, "write")
    return target.uri


def fetch_artifact(uri: str) -> Path:
    """A local copy of an s3:// artifact, fetched once into the cache (by its content-addressed key)."""
    source = parse(uri, "artifact URI")
    cached = config.home() / "cache" / "artifacts" / source.bucket / source.key
    if (cached / COMPLETE).is_file():
        return cached
    s3 = filesystem()
    if not _exists(s3, source.child(COMPLETE), source):
        raise KubeloopError(
            f"artifact {uri}: no {COMPLETE} marker under it, so its upload never finished (or the key is wrong); "
            "register the version again"
        )
    from pyarrow import fs

    infos = _call(lambda: s3.get_file_info(fs.FileSelector(source.path, recursive=True)), source, "list")
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cached.parent))
    try:
        for info in infos:
            if info.type == fs.FileType.File:
                local = staging / info.path[len(source.path) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(_call(lambda i=info: _read(s3, i.path), source, "read"))
        if not cached.exists():  # else another reader fetched it meanwhile: the same bytes
            os.replace(staging, cached)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def _put(s3, path: Path, target: S3Location) -> None:
    with path.open("rb") as source, s3.open_output_stream(target.path) as out:
        shutil.copyfileobj(source, out, 1 << 20)


def _write(s3, target: S3Location, data: bytes) -> None:
    with s3.open_output_stream(target.path) as out:
        out.write(data)


def _read(s3, path: str) -> bytes:
    with s3.open_input_stream(path) as source:
        return source.read()


def _require_bucket(s3, where: S3Location) -> None:
    from pyarrow import fs

    if _call(lambda: s3.get_file_info(where.bucket), where, "read").type == fs.FileType.NotFound:
        raise KubeloopError(
            f"cannot write {where.uri}: bucket {where.bucket!r} does not exist: create it, or set KUBELOOP_STORAGE "
            "to one that does"
        )


def _exists(s3, marker: S3Location, where: S3Location) -> bool:
    from pyarrow import fs

    return _call(lambda: s3.get_file_info(marker.path), where, "read").type == fs.FileType.File


def _call(action, where: S3Location, doing: str):
    """Run a pyarrow S3 call; its errors as what was wrong with the bucket or key, and what to do about it."""
    try:
        return action()
    except OSError as error:
        text = str(error)
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            why = f"bucket {where.bucket!r} does not exist: create it, or set KUBELOOP_STORAGE to one that does"
        elif any(code in text for code in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
            why = "the credentials were refused (an unknown key or a wrong secret): check AWS_ACCESS_KEY_ID and "
            why += "AWS_SECRET_ACCESS_KEY"
        elif "ACCESS_DENIED" in text:  # a HEAD request's refusal has no body: wrong keys look the same
            why = f"access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may {doing} it "
            why += "(the bucket's policy)"
        elif "NETWORK_CONNECTION" in text or "curlCode" in text:
            why = "the S3 endpoint did not answer: check AWS_ENDPOINT_URL"
        else:
            why = text.splitlines()[0][:300]
        raise KubeloopError(f"cannot {doing} {where.uri}: {why}") from error
