"""What bench/serving_wrk.py measures: one wrk run (req/s, latency percentiles, its own CPU), a process's CPU
seconds, and the payload logger's and drift sidecar's counters once they settled."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import time
from pathlib import Path

import httpx

from tests.support.serving_fixtures import Process


def to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, script: Path, duration: int, connections: int, cpus: str | None) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s", str(script)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    if "99" not in latency:
        raise RuntimeError(f"wrk gave no latency distribution:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50": to_ms(latency["50"]),
        "p99": to_ms(latency["99"]),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "wrk_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    }


def cpu_seconds(process: Process | None) -> float:
    """User + system CPU time of this process so far, all its threads (Linux /proc); 0 for none."""
    if process is None:
        return 0.0
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14 and 15)


def counter_sums(metrics: str, prefix: str) -> dict[str, float]:
    """Each counter whose name starts with `prefix`, summed over its labels, by name less prefix and `_total`."""
    sums: dict[str, float] = {}
    for line in metrics.splitlines():
        if not line.startswith(prefix):
            continue
        sample, _, value = line.rpartition(" ")
        name = sample.partition("{")[0]
        if name.endswith("_total"):
            key = name.removeprefix(prefix).removesuffix("_total")
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def logging_figures(server: Process, sidecar: Process) -> dict[str, float]:
    """The server's payload counters and the sidecar's events and windows, cumulative."""
    payload = counter_sums(httpx.get(server.url + "/metrics", timeout=10).text, "kubeloop_payload_events_")
    drift = counter_sums(httpx.get(sidecar.url + "/metrics", timeout=10).text, "kubeloop_drift_events_")
    status = httpx.get(sidecar.url + "/status", timeout=10).json()
    versions = status["versions"].values()
    return {
        **{f"server_{k}": v for k, v in payload.items()},
        "sidecar_received": drift.get("received", 0.0),
        "sidecar_malformed": drift.get("malformed", 0.0),
        "sidecar_rows": sum(v["rows"] for v in versions),
        "windows_evaluated": sum(v["windowsEvaluated"] for v in versions),
        "windows_dropped": sum(v["windowsDropped"] for v in versions),
        "pending_windows": status["pendingWindows"],
    }


def settled(server: Process, sidecar: Process, timeout: float = 15) -> dict[str, float]:
    """`logging_figures` once the logger has flushed and the detector has caught up (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    previous = logging_figures(server, sidecar)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        figures = logging_figures(server, sidecar)
        if figures == previous and not figures["pending_windows"]:
            return figures
        previous = figures
    return previous
