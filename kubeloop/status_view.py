"""`kubeloop status`: the deployments running on this machine, read from their live /metrics endpoints.

A `LocalDeployment` records its endpoints in $KUBELOOP_HOME/deployments/<name>.json while it runs
(`record_deployment`; the file goes when it stops, and a file whose process is gone is ignored and removed), with
its processes' pids and restarts (`record_processes`, again at every restart).
`status_table` scrapes every endpoint twice, `interval` seconds apart, and prints one row per model version:
traffic split (a shadow's: the share mirrored to it), requests/s, error rate and p99 latency over that interval, the
drift sidecar's state, and from its sidecar the rows labelled by feedback and a live metric on the latest of them
(rocAuc, else accuracy, else rmse); then a line per shadow with its paired answers (the splitter's agreement), and a
line per process that was restarted, as kubectl's RESTARTS column says it: `2 (14s ago)`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.samples import Sample

from kubeloop import config
from kubeloop.analysis.signals import Buckets, histogram_quantile
from kubeloop.errors import KubeloopError
from kubeloop.report import promtext

if TYPE_CHECKING:
    from kubeloop.processes import Child

# the server's latency histogram: kubeloop's own request histogram when the server exports one, else kserve's
# predict-time histogram (labelled by model name only: one version per server process)
LATENCY_HISTOGRAMS = ("kubeloop_request_duration_seconds", "request_predict_seconds")
LIVE_METRICS = ("rocAuc", "accuracy", "rmse")  # the one shown, the first the sidecar exports for the version


@dataclass
class DeploymentEndpoints:
    """Where one running deployment answers: a model server per version, the drift sidecars, the splitter."""

    name: str
    model: str
    stable: int
    servers: dict[int, str]
    url: str = ""
    canary: int | None = None
    canary_percent: int = 0
    shadow: int | None = None
    shadow_percent: int = 0
    sidecar: str | None = None
    sidecars: dict[int, str] = field(default_factory=dict)  # per version its drift sidecar, where not `sidecar`
    splitter: str | None = None
    pid: int | None = None  # the process that runs it; its state file is stale once that is gone
    started: float = field(default_factory=time.time)
    pids: dict[str, int] = field(default_factory=dict)  # per process (drift-sidecar, server-v1, ...): its pid now
    restarts: dict[str, int] = field(default_factory=dict)  # per process: how often it was restarted
    last_restart: dict[str, float] = field(default_factory=dict)  # per restarted process: when, time.time()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DeploymentEndpoints:
        data = json.loads(text)
        for key in ("servers", "sidecars"):
            data[key] = {int(k): v for k, v in data.get(key, {}).items()}
        return cls(**data)

    def versions(self) -> list[tuple[int, str]]:
        out = [(self.stable, "stable")]
        if self.canary is not None:
            out.append((self.canary, "canary"))
        if self.shadow is not None:
            out.append((self.shadow, "shadow"))
        return out

    def sidecar_of(self, version: int) -> str | None:
        return self.sidecars.get(version, self.sidecar)


# ---- the state files -------------------------------------------------------------------------------------------


def deployments_dir() -> Path:
    return config.home() / "deployments"


def record_deployment(deployment: Any, endpoints: Any, processes: Sequence[Child] = ()) -> Path:
    """Write the state file of a started LocalDeployment (its ModelDeployment, `Endpoints` and processes);
    returns its path."""
    spec = deployment.spec
    canary, shadow = spec.canary, spec.shadow
    own = {canary.version: endpoints.canary_sidecar} if canary is not None else {}
    if shadow is not None:
        own[shadow.version] = endpoints.shadow_sidecar
    state = DeploymentEndpoints(
        name=deployment.metadata.name,
        model=spec.model,
        stable=spec.version,
        servers=dict(endpoints.servers),
        url=endpoints.url,
        canary=canary.version if canary is not None else None,
        canary_percent=canary.traffic_percent if canary is not None else 0,
        shadow=shadow.version if shadow is not None else None,
        shadow_percent=shadow.percent if shadow is not None else 0,
        sidecar=endpoints.sidecar,
        sidecars={version: url for version, url in own.items() if url is not None},
        splitter=endpoints.splitter,
        pid=os.getpid(),
    )
    _set_processes(state, processes)
    directory = deployments_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{state.name}.json"
    _write(path, state)
    return path


def record_processes(path: Path, processes: Sequence[Child]) -> None:
    """Rewrite the pids and restarts of a state file `record_deployment` wrote (after a process was restarted)."""
    state = DeploymentEndpoints.from_json(path.read_text())
    _set_processes(state, processes)
    _write(path, state)


def _set_processes(state: DeploymentEndpoints, processes: Sequence[Child]) -> None:
    state.pids = {child.name: child.process.pid for child in processes}
    state.restarts = {child.name: child.restarts for child in processes}
    state.last_restart = {child.name: child.last_restart for child in processes if child.last_restart is not None}


def _write(path: Path, state: DeploymentEndpoints) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(state.to_json())
    os.replace(temporary, path)  # a reader sees the old file or the new one, never half of one


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_deployments() -> list[DeploymentEndpoints]:
    """The deployments recorded under $KUBELOOP_HOME/deployments whose process still runs (stale files removed)."""
    directory = deployments_dir()
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            state = DeploymentEndpoints.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if not _alive(state.pid):
            path.unlink(missing_ok=True)
            continue
        found.append(state)
    return found


def sidecar_for(model: str, version: int) -> str | None:
    """The drift sidecar of a running local deployment that serves this model version, if one does."""
    for state in running_deployments():
        if state.model == model and version in state.servers and state.sidecar_of(version):
            return state.sidecar_of(version)
    return None


# ---- scraping ----------------------------------------------------------------------------------------------------


@dataclass
class Scrape:
    at: float
    samples: list[Sample] | None
    error: str | None = None


def _scrape(url: str, timeout: float) -> Scrape:
    try:
        samples = promtext.scrape(url, timeout)
        return Scrape(time.monotonic(), samples)
    except KubeloopError as error:
        return Scrape(time.monotonic(), None, str(error))


def _scrape_all(urls: Sequence[str], timeout: float) -> dict[str, Scrape]:
    if not urls:
        return {}
    with ThreadPoolExecutor(min(8, len(urls))) as pool:
        return dict(zip(urls, pool.map(lambda u: _scrape(u, timeout), urls), strict=True))


@dataclass
class VersionRow:
    deployment: str
    model: str
    version: int
    role: str
    traffic: str
    requests_per_s: float | None
    error_rate: float | None
    p99_ms: float | None
    drift: str
    labelled: float | None = None  # rows joined to feedback labels, by its sidecar (None: no sidecar)
    live: tuple[str, float] | None = None  # a live metric on the latest labelled rows
    agreement: str | None = None  # a shadow's paired answers, as the splitter counted them
    since_start: bool = False  # no requests in the interval: error rate and p99 are over the server's lifetime
    down: str | None = None


def _requests(samples: list[Sample]) -> tuple[float, float]:
    """(all requests, failed requests: any status but 2xx) counted by the server."""
    rows = promtext.select(samples, "kubeloop_requests_total")
    return sum(s.value for s in rows), sum(s.value for s in rows if not s.labels.get("code", "").startswith("2"))


def _latency(samples: list[Sample]) -> Buckets:
    for name in LATENCY_HISTOGRAMS:
        found = promtext.buckets(samples, name)
        if found:
            return found
    return []


def _drift_state(samples: list[Sample] | None, model: str, version: int) -> str:
    if samples is None:
        return "sidecar down"
    labels = {"model": model, "version": str(version)}
    windows = {
        result: promtext.total(samples, "kubeloop_drift_windows_total", result=result, **labels)
        for result in ("drift", "no_drift")
    }
    evaluated = windows["drift"] + windows["no_drift"]
    if not promtext.select(samples, "kubeloop_drift_detected", **labels):
        return "not monitored"
    if evaluated == 0:
        return "Unknown"
    state = "Drift" if promtext.total(samples, "kubeloop_drift_detected", **labels) >= 1 else "NoDrift"
    return f"{state} ({int(windows['drift'])}/{int(evaluated)} flagged)"


def _outcomes(samples: list[Sample] | None, model: str, version: int) -> tuple[float | None, tuple[str, float] | None]:
    """The rows labelled at the version's sidecar, and its first live metric of LIVE_METRICS."""
    if samples is None:
        return None, None
    labels = {"model": model, "version": str(version)}
    labelled = promtext.total(samples, "kubeloop_labelled_rows_total", **labels)
    for metric in LIVE_METRICS:
        found = promtext.select(samples, "kubeloop_live_metric", metric=metric, **labels)
        if found:
            return labelled, (metric, found[0].value)
    return labelled, None


def _agreement(splitter: list[Sample] | None, version: int) -> str | None:
    if splitter is None:
        return None
    pairs = {
        agree: promtext.total(splitter, "kubeloop_shadow_pairs_total", version=str(version), agree=agree)
        for agree in ("true", "false")
    }
    paired = pairs["true"] + pairs["false"]
    if paired == 0:
        return "no paired answers yet"
    rows = promtext.total(splitter, "kubeloop_shadow_rows_total", version=str(version))
    distance = promtext.total(splitter, "kubeloop_shadow_distance_total", version=str(version))
    text = f"agreed on {pairs['true']:.0f} of {paired:.0f} paired answers ({pairs['true'] / paired:.1%})"
    return text + (f", mean distance {distance / rows:.3f}" if rows else "")


def _traffic(state: DeploymentEndpoints, role: str, splitter: list[Sample] | None) -> str:
    if role == "shadow":
        percent = float(state.shadow_percent)
        if splitter is not None and promtext.select(splitter, "kubeloop_splitter_shadow_percent"):
            percent = promtext.total(splitter, "kubeloop_splitter_shadow_percent")
        return f"mirror {percent:g}%"
    if state.canary is None:
        return "100%"
    percent = float(state.canary_percent)
    if splitter is not None and promtext.select(splitter, "kubeloop_splitter_candidate_percent"):
        percent = promtext.total(splitter, "kubeloop_splitter_candidate_percent")
    share = percent if role == "canary" else 100 - percent
    return f"{share:g}%"


def collect(
    deployments: Sequence[DeploymentEndpoints], interval: float = 1.0, timeout: float = 5.0
) -> list[VersionRow]:
    """Scrape every endpoint twice, `interval` seconds apart; one row per (deployment, model version)."""
    urls = sorted(
        {
            u
            for d in deployments
            for u in (*d.servers.values(), d.sidecar, *d.sidecars.values(), d.splitter)
            if u is not None
        }
    )
    first = _scrape_all(urls, timeout)
    time.sleep(interval)
    second = _scrape_all(urls, timeout)
    rows = []
    for state in deployments:
        splitter = second[state.splitter].samples if state.splitter else None
        for version, role in state.versions():
            url, sidecar_url = state.servers.get(version), state.sidecar_of(version)
            sidecar = second[sidecar_url].samples if sidecar_url else None
            drift = _drift_state(sidecar, state.model, version) if sidecar_url else "off"
            row = VersionRow(
                state.name, state.model, version, role, _traffic(state, role, splitter), None, None, None, drift
            )
            row.labelled, row.live = _outcomes(sidecar, state.model, version)
            if role == "shadow":
                row.agreement = _agreement(splitter, version)
            before, after = (first.get(url), second.get(url)) if url else (None, None)
            if after is None or after.samples is None or before is None or before.samples is None:
                row.down = (after.error if after is not None else None) or "no server recorded"
                rows.append(row)
                continue
            (total_0, failed_0), (total_1, failed_1) = _requests(before.samples), _requests(after.samples)
            elapsed = max(after.at - before.at, 1e-6)
            requests = total_1 - total_0
            row.requests_per_s = requests / elapsed
            latency_1 = _latency(after.samples)
            if requests > 0:
                row.error_rate = (failed_1 - failed_0) / requests
                latency = promtext.subtract(latency_1, _latency(before.samples))
            else:
                row.since_start = True
                row.error_rate = failed_1 / total_1 if total_1 else None
                latency = latency_1
            p99 = histogram_quantile(0.99, latency)
            row.p99_ms = None if p99 is None else p99 * 1000
            rows.append(row)
    return rows


# ---- the table ---------------------------------------------------------------------------------------------------


def _fmt(value: float | None, pattern: str, mark: str = "") -> str:
    return "-" if value is None else pattern.format(value) + mark


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, seconds):.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def restart_lines(deployments: Sequence[DeploymentEndpoints], now: float | None = None) -> list[str]:
    """One line per restarted process: `arrests drift-sidecar: restarts 2 (14s ago)`."""
    now = time.time() if now is None else now
    lines = []
    for state in deployments:
        for process, count in sorted(state.restarts.items()):
            if count:
                last = state.last_restart.get(process)
                ago = f" ({_ago(now - last)} ago)" if last is not None else ""
                lines.append(f"{state.name} {process}: restarts {count}{ago}")
    return lines


def render(rows: Sequence[VersionRow], interval: float, deployments: Sequence[DeploymentEndpoints] = ()) -> str:
    if not rows:
        return "no running deployments (start one: kubeloop quickstart, or kubeloop run -f modeldeployment.yaml)"
    table = [
        ("DEPLOYMENT", "MODEL", "VERSION", "ROLE", "TRAFFIC", "REQ/S", "ERRORS", "P99", "DRIFT", "LABELLED", "LIVE")
    ]
    for row in rows:
        mark = "*" if row.since_start else ""
        if row.down:
            measured = ("down", "-", "-")
        else:
            measured = (
                _fmt(row.requests_per_s, "{:.1f}"),
                _fmt(None if row.error_rate is None else row.error_rate * 100, "{:.2f}%", mark),
                _fmt(row.p99_ms, "{:.1f}ms", mark),
            )
        outcomes = (_fmt(row.labelled, "{:.0f}"), "-" if row.live is None else f"{row.live[0]}={row.live[1]:.3f}")
        identity = (row.deployment, row.model, f"v{row.version}", row.role, row.traffic)
        table.append((*identity, *measured, row.drift, *outcomes))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.append(f"requests/s, errors (non-2xx) and p99 over the last {interval:g}s")
    if any(row.since_start for row in rows):
        lines.append("*: no requests in that time: since the server started")
    lines += [f"{row.deployment} v{row.version}: {row.down}" for row in rows if row.down]
    lines += [f"{row.deployment} v{row.version} (shadow): {row.agreement}" for row in rows if row.agreement]
    lines += restart_lines(deployments)
    return "\n".join(lines)


def status_table(deployments: Sequence[DeploymentEndpoints] | None = None, interval: float = 1.0) -> str:
    """The live table of `deployments` (default: the running local deployments), as text."""
    deployments = running_deployments() if deployments is None else deployments
    return render(collect(deployments, interval) if deployments else [], interval, deployments)
