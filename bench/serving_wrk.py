"""Model-serving benchmark, side by side in one run, with wrk (Debian) as the load generator in its own process.

    .venv/bin/python -m bench.serving_wrk [--duration 10] [--connections 16] [--rounds 3]
        [--server-cpus 0] [--side-cpus 1] [--wrk-cpus 1] [--only a "a'" a0 a1 b c] [--json results.json]

Needs `wrk` (`apt-get install wrk`) and `taskset` (util-linux). The same registered arrests model
(tests/support/serving_fixtures.py: the bundled data, the training transform and MLP builder, briefly trained;
registered again with its training data stored as a snapshot, the sidecar's reference) behind:

  (a)  kubeloop's server (`python -m serving.server --logger-url`) logging every request to a real drift sidecar
       (`python -m monitoring.sidecar`, KS detection on, window 200, p 0.05, reference 2,000 rows: the
       ModelDeployment defaults), each pinned with `taskset -c` to its own CPUs as a pod's CPU limit would give it:
       the server to --server-cpus, the sidecar to --side-cpus;
  (a') the same, nothing pinned: server, sidecar and wrk share every core (the embedded `kubeloop run`);
  (a0) the server without --logger-url, pinned as (a) (what logging and detection cost the server);
  (a1) (a) with --no-merge-requests: each request runs the model alone, as in (b) and (c);
  (b)  a stock `kserve.Model` + `kserve.ModelServer` with default settings whose predict only runs the model;
  (c)  a bare FastAPI `async def` endpoint running the same model (the framework-free ceiling).
(b) and (c) are bench/serving_baselines.py; what a run measures is bench/serving_measures.py.

Every request is one row (v1 protocol, rows as objects); wrk cycles through the first --distinct-rows rows of the
data set, so the sidecar's windows hold real data. (b) and (c) run the model as their user would write it,
`ModelArtifact.predict(pd.DataFrame(instances))`. Every server but (a')'s is pinned to --server-cpus.

wrk runs one thread, pinned to --side-cpus with the sidecar (--wrk-cpus to move it; unpinned in (a')). Measured
here: wrk costs 25-40 µs of CPU per request, 6-9 % of the server's ~430 µs, so on the server's CPUs it would slow
the server under test by that much; next to the sidecar, the two used 10-17 % of that core at ~2,000 req/s and the
sidecar kept up. The table's `car+wrk%` column (sidecar + wrk CPU seconds per second of the run) shows whether that
core had room; after each logging run (warm-up included) the line of the run gives the server's payload counters
(kubeloop_payload_events_*_total, summed over labels) and the sidecar's events received, rows, windows evaluated
and dropped (/metrics, /status): received = sent and nothing dropped means it kept up.

Every server gets wrk -t1 -c N for a warm-up and then the measured run; rounds alternate the variants (in reverse
order every other round); the table gives medians over rounds, then the issue's goals (one run):
(a) >= 0.95 x (a0) in req/s; (a1) >= 2 x (b) in req/s with p99 <= (b)'s; (a1) >= 0.9 x (c) in req/s.
Also timed in-process: the raw torch forward of one transformed row, the transform of one row, predict of one row
(DataFrame and column paths).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.serving_baselines import PREDICT
from bench.serving_measures import cpu_seconds, settled, wrk
from kubeloop.processes import free_port
from tests.support.serving_fixtures import Process, arrests_frame, record_path, register_model, rows

REPO = Path(__file__).resolve().parents[1]

# wrk cycles through these requests: one row each, a different row of the data set every time
LUA = """local requests, n, i = {}, 0, 0
init = function(args)
%s
end
request = function()
  i = i %% n + 1
  return requests[i]
end
"""
READY = re.compile(r"^(?:serving .* on|drift sidecar on) (http://\S+)", re.M)
# the ModelDeployment's spec.drift defaults, as `kubeloop run` passes them
SIDECAR_FLAGS = ["--detector", "ks", "--window", "200", "--p-value", "0.05", "--reference-size", "2000"]


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # server | stock | bare
    logged: bool = False
    pinned: bool = True
    merge: bool = True


VARIANTS = {
    "a": Variant("(a) kubeloop + sidecar, pinned", "server", logged=True),
    "a'": Variant("(a') kubeloop + sidecar, shared", "server", logged=True, pinned=False),
    "a0": Variant("(a0) kubeloop, no payload log", "server"),
    "a1": Variant("(a1) (a), no request merging", "server", logged=True, merge=False),
    "b": Variant("(b) stock kserve", "stock"),
    "c": Variant("(c) bare fastapi", "bare"),
}


# ---------------------------------------------------------------- setting up
def register(home: Path) -> tuple[Path, int]:
    """The trained arrests model, registered again as the next version whose lineage names its training data stored
    as a snapshot (the drift sidecar's reference; the fixture's record names the bundled file's digest)."""
    from kubeloop.api.load import load_resources
    from kubeloop.data.snapshot import ingest
    from kubeloop.registry import Registry

    register_model(home)
    snapshot = ingest("bundled://arrests")
    (trained,) = load_resources(record_path(home, 1))
    lineage = trained.spec.lineage.model_copy(update={"dataset_digest": snapshot.digest})
    registry = Registry(home / "registry")
    version, _ = registry.allocate("arrests")
    registry.save(trained.spec.model_copy(update={"version": version, "lineage": lineage}), "bench: stored snapshot")
    return record_path(home, version), version


def lua_script(frame, count: int) -> str:
    bodies = [json.dumps({"instances": rows(frame, 1, start=i)}) for i in range(min(count, len(frame)))]
    headers = '{["Content-Type"] = "application/json"}'
    return LUA % "\n".join(
        f'  n = n + 1; requests[n] = wrk.format("POST", nil, {headers}, [==[{body}]==])' for body in bodies
    )


def launch(args: list[str], log: Path, cpus: str | None, env: dict[str, str], timeout: float = 180) -> Process:
    """`python ARGS` in the repo (under `taskset -c CPUS` if given), its stdout and stderr to `log`; waits for its
    ready line (`serving ... on URL`, `drift sidecar on URL`)."""
    command = [sys.executable, *args]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    with log.open("wb") as out:
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and popen.poll() is None:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return Process(popen, match.group(1), log)
        time.sleep(0.2)
    popen.kill()
    popen.wait(5)
    raise RuntimeError(f"{' '.join(command)} did not become ready; its log ({log}):\n{log.read_text()[-3000:]}")


def answer_once(url: str, body: str, timeout: float = 60) -> None:
    """One prediction, retried while the port does not listen yet (stock kserve prints before it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.post(url + PREDICT, content=body, headers={"content-type": "application/json"}, timeout=10)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if answer.status_code != 200:
        raise RuntimeError(f"{url}{PREDICT} answered {answer.status_code}: {answer.text[:500]}")


def check_tools(pin: bool, cpus: list[str]) -> None:
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed: install it (Debian/Ubuntu: apt-get install wrk) and run again")
    if not pin:
        return
    if shutil.which("taskset") is None:
        sys.exit("error: taskset is not installed: install util-linux (apt-get install util-linux) or pass --no-pin")
    allowed = os.sched_getaffinity(0)
    for spec in cpus:
        wanted = {int(x) for part in spec.split(",") for x in _cpu_range(part)}
        if not wanted <= allowed:
            sys.exit(
                f"error: CPUs {spec} are not all available here (this process may use {sorted(allowed)}): "
                "choose others with --server-cpus/--side-cpus, or pass --no-pin"
            )


def _cpu_range(part: str) -> range:
    low, _, high = part.partition("-")
    return range(int(low), int(high or low) + 1)


def in_process_timings(record: Path) -> dict:
    import pandas as pd
    import torch

    from kubeloop.api.load import load_resources
    from kubeloop.artifact import ModelArtifact

    torch.set_num_threads(1)
    artifact = ModelArtifact.load(load_resources(record)[0].spec.artifact_uri)
    instances = rows(arrests_frame(), 1)
    frame = pd.DataFrame(instances)
    columns = artifact.transform.frame_columns(frame)
    x = torch.from_numpy(artifact.transform.transform(frame))

    def forward() -> None:
        with torch.no_grad():
            torch.sigmoid(artifact.model(x).squeeze(1))

    def best(fn, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    return {
        "torch_forward_us": best(forward, 2000),
        "transform_us": best(lambda: artifact.transform.transform(frame), 200),
        "predict_us": best(lambda: artifact.predict(frame), 200),
        "dataframe_and_predict_us": best(lambda: artifact.predict(pd.DataFrame(instances)), 200),
        "predict_columns_us": best(lambda: artifact.predict_columns(columns), 2000),
    }


# ---------------------------------------------------------------- the run
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--distinct-rows", type=int, default=1000, help="requests cycle through this many data rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-cpus", default="0", help="taskset -c list of the servers (default %(default)s)")
    parser.add_argument("--side-cpus", default="1", help="taskset -c list of the sidecar (default %(default)s)")
    parser.add_argument("--wrk-cpus", help="taskset -c list of wrk (default: --side-cpus)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="pin nothing ((a) is then (a'))")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.wrk_cpus = args.wrk_cpus or args.side_cpus
    check_tools(args.pin, [args.server_cpus, args.side_cpus, args.wrk_cpus])
    work = Path(tempfile.mkdtemp(prefix="kubeloop-bench-"))
    home = work / "home"
    env = {"KUBELOOP_HOME": str(home)}
    os.environ.update(env)
    record, version = register(home)
    body = json.dumps({"instances": rows(arrests_frame(), 1)})
    script = work / "post.lua"
    script.write_text(lua_script(arrests_frame(), args.distinct_rows))

    timings = in_process_timings(record)
    print("in-process, one row (us): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), flush=True)

    names = [n for n in VARIANTS if n in args.only]

    def cpus(name: str, role: str = "server") -> str | None:
        if not (args.pin and VARIANTS[name].pinned):
            return None
        return {"server": args.server_cpus, "sidecar": args.side_cpus, "wrk": args.wrk_cpus}[role]

    def server_command(name: str, sidecar: Process | None) -> list[str]:
        variant = VARIANTS[name]
        if variant.kind == "stock":
            return ["-m", "bench.serving_baselines", "stock", str(record), str(free_port()), str(free_port())]
        if variant.kind == "bare":
            return ["-m", "bench.serving_baselines", "bare", str(record), str(free_port())]
        command = ["-m", "serving.server", "--model-version", str(record), "--http-port", "0"]
        if sidecar is not None:
            command += ["--logger-url", sidecar.url + "/"]
        return command + ([] if variant.merge else ["--no-merge-requests"])

    servers: dict[str, Process] = {}
    sidecars: dict[str, Process] = {}
    results: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for name in names:
            tag = name.replace("'", "p")
            if VARIANTS[name].logged:
                sidecar_args = ["-m", "monitoring.sidecar", "--port", "0", "--model-version", str(record)]
                sidecar_args += ["--default-version", str(version), *SIDECAR_FLAGS]
                sidecars[name] = launch(sidecar_args, work / f"sidecar-{tag}.log", cpus(name, "sidecar"), env)
            command = server_command(name, sidecars.get(name))
            servers[name] = launch(command, work / f"{tag}.log", cpus(name), env)
            answer_once(servers[name].url, body)
        print(f"servers ready (logs in {work})", flush=True)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                results[name].append(measure(name, servers[name], sidecars.get(name), script, args, cpus(name, "wrk")))
    finally:
        for process in [*servers.values(), *sidecars.values()]:
            process.stop()

    summary = report(names, results, args)
    if args.json:
        figures = {"timings": timings, "rounds": results, "median": summary["median"], "goals": summary["goals"]}
        figures["layout"] = {k: vars(args)[k] for k in ("server_cpus", "side_cpus", "wrk_cpus", "pin")}
        Path(args.json).write_text(json.dumps(figures, indent=2))


def measure(name: str, server: Process, sidecar: Process | None, script: Path, args, wrk_cpus: str | None) -> dict:
    url = server.url + PREDICT
    before = settled(server, sidecar) if sidecar else {}
    wrk(url, script, args.warmup, args.connections, wrk_cpus)
    server_cpu, sidecar_cpu = cpu_seconds(server), cpu_seconds(sidecar)
    result = wrk(url, script, args.duration, args.connections, wrk_cpus)
    server_cpu, sidecar_cpu = cpu_seconds(server) - server_cpu, cpu_seconds(sidecar) - sidecar_cpu
    served = max(result["requests"], 1)
    # CPU per request, the server's and the sidecar's: steadier than req/s on a shared machine
    result["cpu_us_per_request"] = server_cpu / served * 1e6
    result["sidecar_cpu_us_per_request"] = sidecar_cpu / served * 1e6
    # share of one core the sidecar and wrk used together: near 100 % the pinned sidecar's core had no room
    result["side_busy"] = (sidecar_cpu + result["wrk_cpu_s"]) / args.duration
    if sidecar:
        after = settled(server, sidecar)
        result["logging"] = {k: after[k] - before.get(k, 0.0) for k in after if k != "pending_windows"}
    print(f"  {name:<3} {_brief(result)}", flush=True)
    return result


def _brief(result: dict) -> str:
    text = f"{result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms"
    if result["non2xx"] or result["socket_errors"]:
        text += f", non-2xx {result['non2xx']}, socket errors {result['socket_errors'] or 0}"
    logging = result.get("logging")
    if logging:
        server = ", ".join(
            f"{k.removeprefix('server_')} {v:.0f}" for k, v in logging.items() if k.startswith("server_")
        )
        text += (
            f"; server events {server}; sidecar received {logging['sidecar_received']:.0f}"
            f" (malformed {logging['sidecar_malformed']:.0f}), rows {logging['sidecar_rows']:.0f}, windows evaluated"
            f" {logging['windows_evaluated']:.0f}, dropped {logging['windows_dropped']:.0f}"
        )
    return text


def report(names: list[str], results: dict[str, list[dict]], args) -> dict:
    keys = ("rps", "p50", "p99", "cpu_us_per_request", "sidecar_cpu_us_per_request", "side_busy")
    median = {n: {k: statistics.median(r[k] for r in results[n]) for k in keys} for n in names}
    layout = "nothing pinned"
    if args.pin:
        layout = f"servers on CPUs {args.server_cpus}, sidecar on {args.side_cpus}, wrk on {args.wrk_cpus}"
    print(
        f"\nmedians over {args.rounds} round(s), wrk -t1 -c{args.connections} -d{args.duration}s, one-row v1 requests;"
        f" {layout}"
    )
    print(
        f"  {'variant':<34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'srv us/rq':>9} {'car us/rq':>9} {'car+wrk%':>8}"
    )
    for n in names:
        s = median[n]
        sidecar = f"{s['sidecar_cpu_us_per_request']:9.0f}" if VARIANTS[n].logged else f"{'-':>9}"
        side = f"{s['side_busy'] * 100:8.0f}" if VARIANTS[n].pinned and args.pin else f"{'-':>8}"
        print(
            f"  {VARIANTS[n].label:<34} {s['rps']:7.0f} {s['p50']:7.2f} {s['p99']:7.2f}"
            f" {s['cpu_us_per_request']:9.0f} {sidecar} {side}"
        )
    goals = {}

    def goal(key: str, text: str, ratio: float, passed: bool) -> None:
        goals[key] = {"ratio": ratio, "pass": passed}
        print(f"  {text}: {'PASS' if passed else 'FAIL'}")

    m = median
    if {"a", "a0"} <= set(names):
        r = m["a"]["rps"] / m["a0"]["rps"]
        goal("a_vs_a0", f"(a) >= 0.95 x (a0) req/s: {r:.3f}x", r, r >= 0.95)
        cpu = m["a"]["cpu_us_per_request"] / m["a0"]["cpu_us_per_request"]
        print(f"    server CPU per request (a) / (a0): {cpu:.2f}x (logging's cost; steadier on a busy host)")
    if {"a1", "b"} <= set(names):
        r, p = m["a1"]["rps"] / m["b"]["rps"], m["a1"]["p99"] / m["b"]["p99"]
        goal("a1_vs_b", f"(a1) >= 2 x (b) req/s with p99 <= (b)'s: {r:.3f}x, p99 {p:.3f}x", r, r >= 2 and p <= 1)
    if {"a1", "c"} <= set(names):
        r = m["a1"]["rps"] / m["c"]["rps"]
        goal("a1_vs_c", f"(a1) >= 0.9 x (c) req/s: {r:.3f}x", r, r >= 0.9)
    if {"a'", "a0"} <= set(names):
        r = m["a'"]["rps"] / m["a0"]["rps"]
        print(f"  (a') / (a0) req/s: {r:.2f}x (no goal: every core shared)")
    return {"median": median, "goals": goals}


if __name__ == "__main__":
    main()
