"""A real S3 server for the object-storage tests: SeaweedFS's `weed mini` (master, volume, filer and S3 gateway in one
process, Apache-2.0), built from Go modules by platform/dev-controlplane/build.sh into the control plane's bin dir.

Two identities: `kubeloop` may do everything, `reader` may only read and list. Every port is a free one, the data
lives in a temporary directory, and the process goes when the context ends.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kubeloop.processes import free_port
from tests.support.clusterkit import load_controlplane
from tests.support.tools import require_tool

BUCKET = "kubeloop"
WRITER = ("kubeloop-writer", "kubeloop-writer-secret")
READER = ("kubeloop-reader", "kubeloop-reader-secret")


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    def env(self, keys: tuple[str, str] = WRITER) -> dict[str, str]:
        """The standard AWS environment a client of this server runs with."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": keys[0],
            "AWS_SECRET_ACCESS_KEY": keys[1],
            "AWS_REGION": "us-east-1",
        }


def weed() -> str:
    controlplane = load_controlplane()
    binary = controlplane.bin_dir() / f"weed-{controlplane.versions()['SEAWEEDFS_VERSION']}"
    return require_tool(
        "weed",
        "`./dev test` builds SeaweedFS with the dev control plane (platform/dev-controlplane/build.sh)",
        str(binary) if binary.is_file() else None,
    )


@contextmanager
def s3_server(directory: Path) -> Iterator[S3Server]:
    config = directory / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "writer",
                        "credentials": [{"accessKey": WRITER[0], "secretKey": WRITER[1]}],
                        "actions": ["Admin", "Read", "List", "Write", "Tagging"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    data = directory / "data"
    data.mkdir()
    s3_port = free_port()
    ports = {
        "master.port": free_port(),
        "volume.port": free_port(),
        "filer.port": free_port(),
        "s3.port": s3_port,
    }
    command = [weed(), "mini", f"-dir={data}", f"-s3.config={config}", f"-bucket={BUCKET}", "-ip=127.0.0.1"]
    command += [f"-{flag}={port}" for flag, port in ports.items()]
    # what the S3 tests do not use, off: its fixed default ports could be taken on a shared machine
    command += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = (directory / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{s3_port}")
    try:
        _wait_ready(server, process, directory / "weed.log")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_ready(server: S3Server, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until the S3 gateway answers and the bucket exists (`weed mini` creates it after the gateway is up)."""
    from pyarrow import fs

    key, secret = WRITER
    s3 = fs.S3FileSystem(
        access_key=key, secret_key=secret, endpoint_override=server.endpoint.removeprefix("http://"), scheme="http"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if s3.get_file_info(BUCKET).type == fs.FileType.Directory:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"weed mini's S3 bucket was not there within {timeout:.0f}s:\n{log.read_text()[-3000:]}")
