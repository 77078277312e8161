"""Model-serving benchmark, side by side in one run, with wrk (Debian) as the load generator in its own process.

    uv run --frozen python bench/serving_wrk.py [--duration 10] [--connections 16] [--rounds 2]

The same registered arrests model (tests/integration/serving_fixtures.py: the bundled data, the training transform
and MLP builder, briefly trained) behind:

  (a)  kubeloop's server (`python -m serving.server`): signature validation, kubeloop metrics and payload logging
       to a real sink process (the drift sidecar's stand-in) all on;
  (a0) the same without payload logging (what the sidecar costs);
  (a1) (a) with --no-merge-requests: each request runs the model alone, as in (b) and (c), so (a1)/(b) shows
       kubeloop's per-request overhead against stock kserve's, with the transform's cost the same on both sides;
  (b)  a stock `kserve.Model` + `kserve.ModelServer` with default settings whose predict only runs the model;
  (c)  a bare FastAPI `async def` endpoint running the same model (the framework-free ceiling).

"Running the model" is the same call everywhere: `ModelArtifact.predict(pd.DataFrame(instances))`, i.e. the
fitted training transform and the network, on the request's one row (v1 protocol, rows as objects). Also timed
in-process: the raw torch forward of one transformed row, the transform of one row, and predict of one row.
Every server gets wrk -c N for a warm-up and then the measured run; rounds alternate the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import httpx
from fastapi import Request  # at module level: the endpoint's annotation is resolved from these globals

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from serving_fixtures import Process, arrests_frame, record_path, register_model, rows, scrape, start  # noqa: E402

LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""


# ---------------------------------------------------------------- the baselines, run as subprocesses of this file
def stock_kserve(record: str, port: int, grpc_port: int) -> None:
    import kserve
    import pandas as pd

    from kubeloop.api.load import load_resources
    from kubeloop.artifact import ModelArtifact

    uri = load_resources(record)[0].spec.artifact_uri

    class Stock(kserve.Model):
        def load(self) -> bool:
            self.artifact = ModelArtifact.load(uri)
            self.ready = True
            return True

        def predict(self, payload, headers=None):
            return {"predictions": self.artifact.predict(pd.DataFrame(payload["instances"])).tolist()}

    model = Stock("arrests")
    model.load()
    print(f"serving stock kserve on http://127.0.0.1:{port}", flush=True)
    kserve.ModelServer(http_port=port, grpc_port=grpc_port).start([model])


def bare_fastapi(record: str, port: int) -> None:
    import pandas as pd
    import uvicorn
    from fastapi import FastAPI

    from kubeloop.api.load import load_resources
    from kubeloop.artifact import ModelArtifact

    artifact = ModelArtifact.load(load_resources(record)[0].spec.artifact_uri)
    app = FastAPI()

    @app.post("/v1/models/arrests:predict")
    async def predict(request: Request) -> dict:
        body = await request.json()
        return {"predictions": artifact.predict(pd.DataFrame(body["instances"])).tolist()}

    print(f"serving bare fastapi on http://127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- measuring
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, script: Path, duration: int, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    if "99" not in latency:
        raise RuntimeError(f"wrk gave no latency distribution:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": to_ms(latency["50"]),
        "p99": to_ms(latency["99"]),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of these processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def in_process_timings(record: Path) -> dict:
    import pandas as pd
    import torch

    from kubeloop.api.load import load_resources
    from kubeloop.artifact import ModelArtifact

    torch.set_num_threads(1)
    artifact = ModelArtifact.load(load_resources(record)[0].spec.artifact_uri)
    frame = pd.DataFrame(rows(arrests_frame(), 1))
    x = torch.from_numpy(artifact.transform.transform(frame))

    def forward() -> None:
        with torch.no_grad():
            torch.sigmoid(artifact.model(x).squeeze(1))

    def best(fn, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    instances = rows(arrests_frame(), 1)
    return {
        "torch_forward_us": best(forward, 2000),
        "transform_us": best(lambda: artifact.transform.transform(frame), 200),
        "predict_us": best(lambda: artifact.predict(frame), 200),
        "dataframe_and_predict_us": best(lambda: artifact.predict(pd.DataFrame(instances)), 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["a", "a0", "a1", "b", "c"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kubeloop-bench-"))
    home = work / "home"
    env = {"KUBELOOP_HOME": str(home)}
    os.environ.update(env)
    register_model(home)
    record = record_path(home, 1)
    body = json.dumps({"instances": rows(arrests_frame(), 1)})
    script = work / "post.lua"
    script.write_text(LUA % body)
    me = str(Path(__file__).resolve())

    timings = in_process_timings(record)
    print("in-process, one row: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), flush=True)

    sink = start([str(REPO / "tests/integration/serving_fixtures.py"), "sink", "--port", "0"], work / "sink.log")
    launch = {
        "a": lambda: start(
            ["-m", "serving.server", "--model-version", str(record), "--http-port", "0", "--logger-url", sink.url],
            work / "a.log",
            env=env,
        ),
        "a0": lambda: start(
            ["-m", "serving.server", "--model-version", str(record), "--http-port", "0"], work / "a0.log", env=env
        ),
        "a1": lambda: start(
            [
                "-m",
                "serving.server",
                "--model-version",
                str(record),
                "--http-port",
                "0",
                "--logger-url",
                sink.url,
                "--no-merge-requests",
            ],
            work / "a1.log",
            env=env,
        ),
        "b": lambda: start([me, "stock", str(record), str(free_port()), str(free_port())], work / "b.log", env=env),
        "c": lambda: start([me, "bare", str(record), str(free_port())], work / "c.log", env=env),
    }
    names = [n for n in ("a", "a0", "a1", "b", "c") if n in args.only]
    servers: dict[str, Process] = {}
    results: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for name in names:
            servers[name] = launch[name]()
            deadline = time.monotonic() + 60
            while True:  # the stock server prints before kserve starts listening
                try:
                    check = httpx.post(servers[name].url + "/v1/models/arrests:predict", content=body, timeout=10)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert check.status_code == 200, (name, check.text)
        for round_ in range(args.rounds):
            for name in names:
                url = servers[name].url + "/v1/models/arrests:predict"
                wrk(url, script, args.warmup, args.connections)
                server_before, sink_before = cpu_seconds(servers[name].pid), cpu_seconds(sink.pid)
                result = wrk(url, script, args.duration, args.connections)
                # CPU per request, the server's and the sink's: steadier than rps on a shared machine
                served = result["rps"] * args.duration
                result["cpu_us_per_request"] = (cpu_seconds(servers[name].pid) - server_before) / served * 1e6
                result["sink_cpu_us_per_request"] = (cpu_seconds(sink.pid) - sink_before) / served * 1e6
                results[name].append(result)
                print(f"round {round_ + 1} ({name}): {result}", flush=True)
        if "a" in servers:
            metrics = httpx.get(servers["a"].url + "/metrics").text
            batches = scrape(metrics, "kubeloop_inference_batch_rows_count")
            merged = scrape(metrics, "kubeloop_inference_batch_rows_sum")
            logger = {k: scrape(metrics, f"kubeloop_payload_events_{k}_total") for k in ("sent", "dropped", "failed")}
            received = httpx.get(sink.url + "/count").json()["count"]
            print(
                f"(a) rows per model call {merged / max(batches, 1):.2f}; payload events {logger}, sink got {received}"
            )
    finally:
        for server in servers.values():
            server.stop()
        sink.stop()

    keys = ("rps", "p50", "p99", "cpu_us_per_request", "sink_cpu_us_per_request")
    summary = {n: {k: statistics.median(r[k] for r in results[n]) for k in keys} for n in names}
    print(f"\nmedian over rounds (wrk -t2 -c{args.connections} -d{args.duration}s, one-row v1 requests):")
    labels = {
        "a": "(a) kubeloop",
        "a0": "(a0) kubeloop, no payload log",
        "a1": "(a1) kubeloop, no request merging",
        "b": "(b) stock kserve",
        "c": "(c) bare fastapi",
    }
    for n in names:
        s = summary[n]
        print(
            f"  {labels[n]:<36} {s['rps']:>7.0f} req/s   p50 {s['p50']:7.2f} ms   p99 {s['p99']:7.2f} ms   "
            f"server CPU {s['cpu_us_per_request']:5.0f} us/request"
            + (f" (+ sink {s['sink_cpu_us_per_request']:.0f})" if n in ("a", "a1") else "")
        )
    if {"a", "b"} <= set(names):
        a, b = summary["a"], summary["b"]
        print(
            f"  (a)/(b): rps {a['rps'] / b['rps']:.2f}x (target >= 1.0), "
            f"p99 {a['p99'] / b['p99']:.2f}x (target <= 1.10)"
        )
    if {"a", "b"} <= set(names):
        ratio = summary["a"]["cpu_us_per_request"] / summary["b"]["cpu_us_per_request"]
        print(f"  server CPU per request (a)/(b): {ratio:.2f}x")
    if {"a", "c"} <= set(names):
        print(f"  (a)/(c): rps {summary['a']['rps'] / summary['c']['rps']:.2f}x (aim >= 0.7)")
    if {"a1", "b"} <= set(names):
        a1, b = summary["a1"], summary["b"]
        print(
            f"  (a1)/(b): rps {a1['rps'] / b['rps']:.2f}x, p99 {a1['p99'] / b['p99']:.2f}x "
            "(per-request overhead only: each request runs the transform alone, as in (b) and (c))"
        )
    if {"a", "a0"} <= set(names):
        print(f"  sidecar cost: p50 {summary['a']['p50'] / summary['a0']['p50']:.2f}x of (a0) (target <= 1.05)")
    if args.json:
        Path(args.json).write_text(json.dumps({"timings": timings, "rounds": results, "median": summary}, indent=2))


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["stock"]:
        record_, port_, grpc_port_ = sys.argv[2:5]
        sys.argv = sys.argv[:1]  # kserve parses sys.argv when it is imported
        stock_kserve(record_, int(port_), int(grpc_port_))
    elif command == ["bare"]:
        bare_fastapi(sys.argv[2], int(sys.argv[3]))
    else:
        main()
