"""`kubeloop status` (kubeloop/status_view.py) against small real HTTP endpoints: rates, errors, p99, traffic, drift,
labelled rows and live metrics per version, a shadow with its paired answers, a server that is down, and the
deployments' state files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubeloop.status_view import (
    DeploymentEndpoints,
    collect,
    record_deployment,
    render,
    running_deployments,
    sidecar_for,
    status_table,
)
from tests.support.metrics_endpoint import MetricsEndpoint


def _server(version: int, per_scrape: int, failing: int) -> Callable[[int], str]:
    """A model server: `per_scrape` more requests (of which `failing` answered 500) at every scrape, all fast."""

    def text(n: int) -> str:
        ok, failed = n * (per_scrape - failing), n * failing
        labels = f'model="arrests",version="{version}"'
        return (
            "# TYPE kubeloop_requests_total counter\n"
            f'kubeloop_requests_total{{{labels},protocol="v1",code="200"}} {ok}\n'
            f'kubeloop_requests_total{{{labels},protocol="v1",code="500"}} {failed}\n'
            "# TYPE request_predict_seconds histogram\n"
            f'request_predict_seconds_bucket{{model_name="arrests",le="0.005"}} {n * per_scrape * 0.5}\n'
            f'request_predict_seconds_bucket{{model_name="arrests",le="0.01"}} {n * per_scrape}\n'
            f'request_predict_seconds_bucket{{model_name="arrests",le="+Inf"}} {n * per_scrape}\n'
            f'request_predict_seconds_count{{model_name="arrests"}} {n * per_scrape}\n'
        )

    return text


def _sidecar(_: int) -> str:
    return (
        "# TYPE kubeloop_drift_detected gauge\n"
        'kubeloop_drift_detected{model="arrests",version="1"} 0\n'
        'kubeloop_drift_detected{model="arrests",version="2"} 1\n'
        "# TYPE kubeloop_drift_windows_total counter\n"
        'kubeloop_drift_windows_total{model="arrests",version="1",result="drift"} 1\n'
        'kubeloop_drift_windows_total{model="arrests",version="1",result="no_drift"} 7\n'
        'kubeloop_drift_windows_total{model="arrests",version="2",result="drift"} 3\n'
        'kubeloop_drift_windows_total{model="arrests",version="2",result="no_drift"} 1\n'
        "# TYPE kubeloop_labelled_rows_total counter\n"
        'kubeloop_labelled_rows_total{model="arrests",version="1"} 120\n'
        'kubeloop_labelled_rows_total{model="arrests",version="2"} 0\n'
        "# TYPE kubeloop_live_metric gauge\n"
        'kubeloop_live_metric{model="arrests",version="1",metric="accuracy"} 0.8\n'
        'kubeloop_live_metric{model="arrests",version="1",metric="rocAuc"} 0.8125\n'
        'kubeloop_live_metric{model="arrests",version="1",metric="rows"} 120\n'
    )


@pytest.fixture
def live() -> Iterator[dict[str, MetricsEndpoint]]:
    endpoints = {
        "v1": MetricsEndpoint(_server(1, per_scrape=50, failing=5)),
        "v2": MetricsEndpoint(_server(2, per_scrape=20, failing=0)),
        "sidecar": MetricsEndpoint(_sidecar),
        "splitter": MetricsEndpoint(
            lambda _: "# TYPE kubeloop_splitter_candidate_percent gauge\nkubeloop_splitter_candidate_percent 25\n"
        ),
    }
    yield endpoints
    for endpoint in endpoints.values():
        endpoint.close()


def test_status_table_reads_rates_errors_p99_traffic_and_drift(live: dict[str, MetricsEndpoint]) -> None:
    state = DeploymentEndpoints(
        name="arrests",
        model="arrests",
        stable=1,
        canary=2,
        canary_percent=10,  # declared at start; the splitter's gauge (25) is what it does now
        servers={1: live["v1"].url, 2: live["v2"].url},
        sidecar=live["sidecar"].url,
        splitter=live["splitter"].url,
    )
    stable, canary = collect([state], interval=0.2)
    assert (stable.version, stable.role, stable.traffic) == (1, "stable", "75%")
    assert (canary.version, canary.role, canary.traffic) == (2, "canary", "25%")
    assert stable.error_rate == pytest.approx(0.1) and canary.error_rate == 0
    assert 0 < stable.requests_per_s <= 50 / 0.2 and 0 < canary.requests_per_s <= 20 / 0.2
    assert stable.p99_ms == pytest.approx(5 + 5 * (0.99 - 0.5) / 0.5)  # ms: inside the (5, 10] ms bucket
    assert stable.drift == "NoDrift (1/8 flagged)" and canary.drift == "Drift (3/4 flagged)"
    assert (stable.labelled, stable.live) == (120, ("rocAuc", 0.8125))  # rocAuc first of the live metrics
    assert (canary.labelled, canary.live) == (0, None)
    text = render([stable, canary], 0.2)
    header, first, second = text.splitlines()[:3]
    assert header.split() == [
        *("DEPLOYMENT", "MODEL", "VERSION", "ROLE", "TRAFFIC", "REQ/S", "ERRORS", "P99", "DRIFT", "LABELLED", "LIVE")
    ]
    assert first.split()[:5] == ["arrests", "arrests", "v1", "stable", "75%"] and "10.00%" in first
    assert "Drift (3/4 flagged)" in second and "9.9ms" in first
    assert first.split()[-2:] == ["120", "rocAuc=0.812"] and second.split()[-2:] == ["0", "-"]


def _shadow_sidecar(_: int) -> str:
    return (
        "# TYPE kubeloop_labelled_rows_total counter\n"
        'kubeloop_labelled_rows_total{model="arrests",version="3"} 40\n'
        "# TYPE kubeloop_live_metric gauge\n"
        'kubeloop_live_metric{model="arrests",version="3",metric="rmse"} 2.5\n'
    )


def _shadow_splitter(_: int) -> str:
    return (
        "# TYPE kubeloop_splitter_shadow_percent gauge\n"
        "kubeloop_splitter_shadow_percent 50\n"
        "# TYPE kubeloop_shadow_pairs_total counter\n"
        'kubeloop_shadow_pairs_total{version="3",agree="true"} 45\n'
        'kubeloop_shadow_pairs_total{version="3",agree="false"} 5\n'
        "# TYPE kubeloop_shadow_rows_total counter\n"
        'kubeloop_shadow_rows_total{version="3"} 100\n'
        "# TYPE kubeloop_shadow_distance_total counter\n"
        'kubeloop_shadow_distance_total{version="3"} 4.2\n'
    )


def test_status_table_shows_a_shadow_with_its_own_sidecar_and_its_paired_answers(
    live: dict[str, MetricsEndpoint],
) -> None:
    with MetricsEndpoint(_shadow_sidecar) as sidecar, MetricsEndpoint(_shadow_splitter) as splitter:
        state = DeploymentEndpoints(
            name="arrests",
            model="arrests",
            stable=1,
            shadow=3,
            shadow_percent=100,  # declared at start; the splitter's gauge (50) is what it does now
            servers={1: live["v1"].url, 3: live["v2"].url},
            sidecar=live["sidecar"].url,
            sidecars={3: sidecar.url},
            splitter=splitter.url,
        )
        stable, shadow = collect([state], interval=0.1)
    assert (stable.role, stable.traffic, stable.agreement) == ("stable", "100%", None)
    assert (shadow.role, shadow.traffic, shadow.drift) == ("shadow", "mirror 50%", "not monitored")
    assert (shadow.labelled, shadow.live) == (40, ("rmse", 2.5))
    assert shadow.agreement == "agreed on 45 of 50 paired answers (90.0%), mean distance 0.042"
    text = render([stable, shadow], 0.1)
    assert "arrests v3 (shadow): agreed on 45 of 50 paired answers (90.0%), mean distance 0.042" in text
    assert text.splitlines()[2].split()[-2:] == ["40", "rmse=2.500"]


def test_status_table_marks_a_server_that_is_down(live: dict[str, MetricsEndpoint]) -> None:
    url = live["v1"].url
    live["v1"].close()
    state = DeploymentEndpoints(name="solo", model="arrests", stable=1, servers={1: url})
    (row,) = collect([state], interval=0.05, timeout=1)
    assert row.down and row.drift == "off"
    assert "down" in render([row], 0.05).splitlines()[1]
    with MetricsEndpoint(lambda _: "not a sample line at all {\n") as garbage:
        state = DeploymentEndpoints(name="odd", model="arrests", stable=1, servers={1: garbage.url})
        (row,) = collect([state], interval=0.05, timeout=1)
    assert row.down and row.down.startswith(f"GET {garbage.url}/metrics: not the Prometheus text format: ")


def test_deployment_state_files(kubeloop_home: Path) -> None:
    assert status_table([]).startswith("no running deployments")
    deployment = SimpleNamespace(
        metadata=SimpleNamespace(name="arrests"),
        spec=SimpleNamespace(
            model="arrests",
            version=1,
            canary=SimpleNamespace(version=2, traffic_percent=10),
            shadow=SimpleNamespace(version=3, percent=50),
        ),
    )
    endpoints = SimpleNamespace(
        url="http://127.0.0.1:1",
        servers={1: "http://127.0.0.1:2", 2: "http://127.0.0.1:3", 3: "http://127.0.0.1:5"},
        sidecar="http://127.0.0.1:4",
        canary_sidecar=None,
        shadow_sidecar="http://127.0.0.1:6",
        splitter=None,
    )
    path = record_deployment(deployment, endpoints)
    assert path == kubeloop_home / "deployments" / "arrests.json"
    (state,) = running_deployments()
    assert (state.name, state.stable, state.canary, state.canary_percent, state.pid) == (
        "arrests",
        1,
        2,
        10,
        os.getpid(),
    )
    assert state.servers == {1: "http://127.0.0.1:2", 2: "http://127.0.0.1:3", 3: "http://127.0.0.1:5"}
    assert (state.shadow, state.shadow_percent, state.sidecars) == (3, 50, {3: "http://127.0.0.1:6"})
    assert state.versions() == [(1, "stable"), (2, "canary"), (3, "shadow")]
    assert sidecar_for("arrests", 2) == "http://127.0.0.1:4" and sidecar_for("arrests", 3) == "http://127.0.0.1:6"
    assert sidecar_for("arrests", 4) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = state.to_json().replace(f'"pid": {os.getpid()}', f'"pid": {int(dead.stdout)}')
    path.write_text(stale)
    assert running_deployments() == [] and not path.exists()  # its process is gone: ignored and removed
