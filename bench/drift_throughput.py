"""Events per second the drift sidecar sustains with KS + Chi-square on the quickstart model's features.

    .venv/bin/python -m bench.drift_throughput [--duration 5] [--rounds 3] [--connections 16]
        [--cases 1:200,10:200,10:2000]   (BATCH:WINDOW: rows per request event, rows per drift window)

Not a test. In one run, on this machine:
1. the detector alone: one window's FeatureWiseDrift.test (3 KS + 4 Chi-square, alibi-detect) and skew;
2. the ingest path alone, in-process (parse + append, detection thread running): events/s, no HTTP;
3. over HTTP: the sidecar (``python -m monitoring.sidecar``) pinned to ONE core (taskset -c 0), loaded by wrk
   (Debian ``wrk``; pinned to the other core) with KServe-logger CloudEvents: each request event carries a batch of
   rows drawn from the arrests data and is followed by its response event (logger mode ``all``);
4. the baseline, same setup: a bare ASGI sink under the same uvicorn (same settings) that answers 200 without
   looking at the event.
Reported per batch size: events/s (wall), events per CPU-second of the sidecar (robust to other load on the
shared core), windows evaluated vs filled, dropped and non-2xx counts. Target: >= 5,000 events/s on one core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

FEATURES = ["colour", "year", "age", "sex", "employed", "citizen", "checks"]
TARGET = 5000

BASELINE_APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
class Server(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        print("drift sidecar on http://127.0.0.1:%d" % self.servers[0].sockets[0].getsockname()[1], flush=True)
from monitoring.sidecar import UVICORN_SETTINGS  # the same uvicorn settings as the sidecar's
Server(uvicorn.Config(app, **UVICORN_SETTINGS, host="127.0.0.1", port=0)).run()
"""


def make_record(home: Path) -> tuple[Path, object]:
    import yaml

    from kubeloop.api.modelversion import ModelVersion
    from kubeloop.data.snapshot import ingest, read_frame
    from kubeloop.registry import Registry

    snapshot = ingest("bundled://arrests")
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / "modelversion.yaml").read_text())
    doc["spec"]["lineage"]["datasetDigest"] = snapshot.digest
    spec = ModelVersion.model_validate(doc).spec
    registry = Registry(home / "registry")
    spec.version, _ = registry.allocate(spec.model)
    registry.save(spec, "benchmark record")
    return registry.root / spec.model / f"v{spec.version}" / "modelversion.yaml", read_frame(snapshot)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def launch(command: list[str], env: dict[str, str], core: int | None) -> tuple[subprocess.Popen[str], str]:
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 600
    for line in process.stdout:
        match = re.match(r"drift sidecar on (http://\S+)", line)
        if match:
            return process, match.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"{command} did not start")


def lua_script(path: Path, events: list[tuple[dict[str, str], bytes]]) -> None:
    lines = ["local reqs = {}", "local n = 0", "init = function(args)"]
    for headers, body in events:
        table = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
        lines.append(f'  n = n + 1; reqs[n] = wrk.format("POST", "/", {{{table}}}, [==[{body.decode()}]==])')
    lines += ["end", "local i = 0", "request = function()", "  i = i % n + 1", "  return reqs[i]", "end"]
    path.write_text("\n".join(lines) + "\n")


def run_wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "1", *command]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    for name in ("50%", "99%"):
        match = re.search(rf"{name}\s+([\d.]+)(us|ms|s)\b", out)
        if match:
            scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]
            result[f"p{name[:-1]}_ms"] = float(match.group(1)) * scale
    return result


def build_events(frame, batch: int, count: int = 200) -> list[tuple[dict[str, str], bytes]]:
    import numpy as np

    from tests.support import traffic_events as traffic

    rng = np.random.default_rng(batch)
    events = []
    for i in range(count):
        rows = traffic.records(traffic.in_distribution(frame, batch, rng), FEATURES)
        events.append((traffic.event_headers("request", f"b{i}"), traffic.v1_request(rows)))
        scores = [round(float(s), 4) for s in rng.uniform(0.3, 1.0, size=batch)]
        events.append((traffic.event_headers("response", f"b{i}"), traffic.v1_response(scores)))
    return events


def detector_alone(record: Path, frame, windows: list[int]) -> None:
    import numpy as np

    from kubeloop.api.load import load_resources
    from kubeloop.api.modelversion import ModelVersion
    from monitoring import detectors
    from monitoring.config import SidecarConfig
    from monitoring.versions import build_monitor
    from tests.support import traffic_events as traffic

    mv = next(r for r in load_resources(record) if isinstance(r, ModelVersion))
    for window in windows:
        monitor = build_monitor(mv, SidecarConfig(window=window, reference_size=2000))
        columns = monitor.schema.encode_frame(traffic.in_distribution(frame, window, np.random.default_rng(0)))
        monitor.detector.test(columns)
        timings = []
        for _ in range(50):
            start = time.perf_counter()
            monitor.detector.test(columns)
            detectors.skew(monitor.reference, columns)
            timings.append(time.perf_counter() - start)
        median = float(np.median(timings))
        print(
            f"  window {window:>5} rows: {median * 1000:.2f} ms per window test + skew (p90 "
            f"{np.quantile(timings, 0.9) * 1000:.2f} ms) -> {1 / median:,.0f} windows/s = {window / median:,.0f} rows/s"
        )


def ingest_alone(record: Path, frame, cases: list[tuple[int, int]]) -> None:
    from kubeloop.api.load import load_resources
    from kubeloop.api.modelversion import ModelVersion
    from monitoring.app import build_sidecar
    from monitoring.config import SidecarConfig
    from monitoring.events import lower_headers

    mv = next(r for r in load_resources(record) if isinstance(r, ModelVersion))
    for batch, window in cases:
        app = build_sidecar([mv], SidecarConfig(window=window, reference_size=2000, detection_queue=10**6), None)
        app.start()
        events = [(lower_headers(h), b) for h, b in build_events(frame, batch)]
        n = 0
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < 3:
            for headers, body in events:
                app.ingest(headers, body)
            n += len(events)
        ingest_s = time.perf_counter() - start
        app.drain(600)  # every window tested: the detector's share of the CPU is counted
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        app.stop()
        print(
            f"  batch {batch:>2}, window {window:>5}: parse+append {n / ingest_s:>8,.0f} events/s; with every window "
            f"tested {n / elapsed:>8,.0f} events/s wall, {n / cpu:>8,.0f} events per CPU-second"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--cases", default="1:200,10:200,10:2000", help="BATCH:WINDOW,...: rows per request event")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per server (best wall rate reported)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    logging.getLogger("monitoring").setLevel(logging.ERROR)
    home = Path(tempfile.mkdtemp(prefix="kubeloop-drift-bench-"))
    os.environ["KUBELOOP_HOME"] = str(home)
    record, frame = make_record(home)
    cases = [tuple(int(x) for x in case.split(":")) for case in args.cases.split(",")]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    print("\ndetector alone (reference 2000 rows; 3 KS + 4 Chi-square, alibi-detect; one thread):")
    detector_alone(record, frame, sorted({w for _, w in cases}))
    print("\nsidecar in-process, no HTTP (request + response events 1:1):")
    ingest_alone(record, frame, cases)

    env = {**os.environ, "KUBELOOP_HOME": str(home), "OMP_NUM_THREADS": "1"}
    print(
        f"\nover HTTP: server on core 0, wrk -t1 -c{args.connections} -d{args.duration}s on core 1, "
        f"best of {args.rounds} rounds (ev/CPU-s: median round)"
    )
    header = f"{'server':<9} {'batch':>5} {'window':>6} {'events/s':>9} {'ev/CPU-s':>9} {'p50 ms':>7} {'p99 ms':>7}"
    print(header + f" {'non2xx':>6} {'windows':>9} {'dropped':>7}")
    results = {}
    for batch, window in cases:
        script = home / f"events-{batch}.lua"
        lua_script(script, build_events(frame, batch))
        sidecar_cmd = [sys.executable, "-m", "monitoring.sidecar", "--port", "0", "--model-version", str(record)]
        sidecar_cmd += ["--detector", "ks", "--window", str(window), "--reference-size", "2000"]
        for name in ("baseline", "sidecar"):
            command = sidecar_cmd if name == "sidecar" else [sys.executable, "-c", BASELINE_APP]
            process, url = launch(command, env, core=0)
            try:
                run_wrk(url, script, 2, args.connections)  # warm-up
                rounds = []
                for _ in range(args.rounds):
                    cpu = cpu_seconds(process.pid)
                    outcome = run_wrk(url, script, args.duration, args.connections)
                    outcome["per_cpu"] = outcome["requests"] / max(cpu_seconds(process.pid) - cpu, 1e-9)
                    rounds.append(outcome)
                # the machine is shared: the best round's wall rate, the median round's events per CPU-second
                result = max(rounds, key=lambda r: r["rps"])
                per_cpu = sorted(r["per_cpu"] for r in rounds)[len(rounds) // 2]
                windows = dropped = "-"
                if name == "sidecar":
                    time.sleep(1)
                    status = httpx.get(url + "/status", timeout=30).json()
                    version = next(iter(status["versions"].values()))
                    windows = f"{version['windowsEvaluated']}/{version['rows'] // window}"
                    dropped = str(status["events"]["dropped"])
                    assert not status["events"]["malformed"], status["events"]
                results[(name, batch, window)] = {
                    **result,
                    "per_cpu": per_cpu,
                    "windows": windows,
                    "dropped": dropped,
                }
                print(
                    f"{name:<9} {batch:>5} {window:>6} {result['rps']:>9,.0f} {per_cpu:>9,.0f} "
                    f"{result.get('p50_ms', 0):>7.2f} {result.get('p99_ms', 0):>7.2f} {result['non2xx']:>6.0f} "
                    f"{windows:>9} {dropped:>7}"
                )
            finally:
                process.terminate()
                process.wait(30)
    print()
    for batch, window in cases:
        side, base = results[("sidecar", batch, window)], results[("baseline", batch, window)]
        sustained = side["dropped"] == "0"
        wall = "meets" if side["rps"] >= TARGET and sustained else "misses"
        core = "meets" if side["per_cpu"] >= TARGET and sustained else "misses"
        wall_ratio, cpu_ratio = side["rps"] / base["rps"], side["per_cpu"] / base["per_cpu"]
        print(
            f"batch {batch}, window {window}: {side['rps']:,.0f} events/s wall ({wall_ratio:.2f}x the bare sink), "
            f"{side['per_cpu']:,.0f} per CPU-second ({cpu_ratio:.2f}x); windows tested {side['windows']}, events "
            f"dropped {side['dropped']}. Target {TARGET:,}/s: {wall} it in wall time here, {core} it per CPU-second "
            "(one dedicated core)"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(json.dumps({f"{k[0]}-b{k[1]}-w{k[2]}": v for k, v in results.items()}))
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
