"""The model server safe on the wire: the repository extension off by default, the body limit before any body is
read on every route, versioned routes, absurd inputs refused, loopback only (servers: tests/integration/conftest.py).
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

from kubeloop.api.load import load_resources
from tests.support.serving_fixtures import launch_server, record_path, scrape, start_all, stop_all
from tests.support.serving_requests import GOOD, predict_v1, predict_v2, v1, v2_body

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- safe on the wire
def test_the_repository_extension_is_off_by_default(server, client):
    for action in ("unload", "load"):
        response = client.post(f"{server.url}/v2/repository/models/arrests/{action}")
        assert response.status_code == 403 and "--enable-repository" in response.json()["error"]
    assert client.get(f"{server.url}/v2").json()["extensions"] == []
    assert client.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert predict_v1(client, server, v1()).status_code == 200


def test_readiness_follows_the_model_when_the_repository_is_enabled(serving_home, tmp_path, client):
    """Opened on purpose: an unloaded model makes the server unready (503) instead of ready and answering 404."""
    server = start_all(
        launch_server(
            record_path(serving_home, 1), tmp_path / "repo.log", "--enable-repository",
            env={"KUBELOOP_HOME": str(serving_home)},
        )
    )[0]  # fmt: skip
    try:
        assert client.get(f"{server.url}/v2").json()["extensions"] == ["model_repository_extension"]
        assert client.get(f"{server.url}/v2/health/ready").status_code == 200
        assert client.post(f"{server.url}/v2/repository/models/arrests/unload").status_code == 200
        assert client.get(f"{server.url}/v2/health/ready").status_code == 503
        assert predict_v1(client, server, v1()).status_code == 404
    finally:
        stop_all(server)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/unknown/infer",
        "/v1/models/arrests:explain",
        "/v2/repository/models/arrests/load",
        "/v2/models/arrests/versions/1/infer",
    ],
)
def test_the_body_limit_holds_for_every_route_before_the_body_is_read(server, client, path):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # declares 200 MB, sends none of it
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {200 << 20}\r\n\r\n".encode()
        )
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"403", b"413"), status_line
    before = rss_kib(server.pid)
    chunk = b" " * (1 << 20)

    def body():  # 200 MiB without a content-length: the server must stop reading at the limit
        for _ in range(200):
            yield chunk

    try:
        streamed = client.post(f"{server.url}{path}", content=body(), headers={"content-type": "application/json"})
        assert streamed.status_code in (403, 413), streamed.text
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still writing
    assert rss_kib(server.pid) - before < 50 * 1024
    assert predict_v1(client, server, v1()).status_code == 200


def test_versioned_routes_answer_for_the_served_version(server, client, artifact):
    body = v2_body([GOOD])
    plain = predict_v2(client, server, body)
    versioned = client.post(f"{server.url}/v2/models/arrests/versions/1/infer", json=body)
    assert versioned.status_code == 200, versioned.text
    assert versioned.json()["outputs"] == plain.json()["outputs"]
    assert versioned.json()["model_version"] == "1"
    other = client.post(f"{server.url}/v2/models/arrests/versions/2/infer", json=body)
    assert other.status_code == 404
    assert "version 2 is not served here: this server serves version 1" in other.json()["error"]
    assert client.get(f"{server.url}/v2/models/arrests").json()["versions"] == ["1"]
    assert client.get(f"{server.url}/v2/models/arrests/versions/1").json()["versions"] == ["1"]
    assert client.get(f"{server.url}/v2/models/arrests/versions/1/ready").json()["ready"] is True


def test_inputs_outside_the_training_range_are_counted_and_absurd_ones_refused(server, client, serving_home):
    record = load_resources(record_path(serving_home, 1))[0]
    age = next(f for f in record.spec.signature.inputs if f.name == "age")
    assert age.nullable is False and age.min is not None and age.max is not None
    before = client.get(f"{server.url}/metrics").text
    beyond = predict_v1(client, server, v1(age=int(age.max) + 40))
    assert beyond.status_code == 200 and np.isfinite(beyond.json()["predictions"]).all()
    absurd = predict_v1(client, server, v1(age=10**200))
    assert absurd.status_code == 400, absurd.text
    assert absurd.json()["error"].startswith("instances[0].age: 1e+200 is more than")
    after = client.get(f"{server.url}/metrics").text
    labels = {"model": "arrests", "version": "1", "feature": "age"}
    assert (
        scrape(after, "kubeloop_feature_out_of_range_total", **labels)
        - scrape(before, "kubeloop_feature_out_of_range_total", **labels)
        == 1
    )
    assert scrape(after, "kubeloop_request_errors_total", reason="out_of_range") >= 1


def test_metrics_have_no_created_series_and_latency_by_code(server, client):
    assert predict_v1(client, server, v1(age="x")).status_code == 400
    metrics = client.get(f"{server.url}/metrics").text
    assert "_created" not in metrics
    base = {"model": "arrests", "version": "1", "protocol": "v1"}
    assert scrape(metrics, "kubeloop_request_duration_seconds_count", **base, code="400") >= 1
    assert scrape(metrics, "kubeloop_request_duration_seconds_count", **base, code="200") >= 1


# ---------------------------------------------------------------- binding
def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_listens_on_loopback_only(server):
    port = int(server.url.rsplit(":", 1)[1])
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex; not 00000000 (0.0.0.0)
    address = non_loopback_address()
    if address is not None:
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), timeout=5):
            pass
