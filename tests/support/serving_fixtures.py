"""Helpers for the serving tests and bench/serving_wrk.py: a real registered model, server processes, a sink.

The model: a bundled data set (arrests for a binary model, penguins for a multiclass one, abalone for a regression),
`TabularTransform.fit` on it (the class training uses), the MLP builder training uses, trained in-process for a few
full-batch Adam steps on the task's loss (kubeloop.training.tasks; seconds, not a Ray TrainingJob), saved as a
`ModelArtifact` and registered through `Registry.allocate/save` with a ModelVersion record.

The sink (`python tests/support/serving_fixtures.py sink --port 0 [--delay S]`): a small real HTTP server standing
in for the drift sidecar; it answers 200 to every POST (HTTP/1.1 keep-alive, pipelining), keeps the last events'
headers and bodies, and answers `GET /events` with them as JSON and `GET /count` with how many it received.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"(?:serving .* on|splitting on) (http://\S+)")


# ---------------------------------------------------------------- the model
# bundled data set (= the model's name) -> its label, the task, the positive class
DATASETS = {
    "arrests": ("released", "binary", "Yes"),
    "penguins": ("species", "multiclass", None),
    "abalone": ("rings", "regression", None),
}


def bundled_frame(name: str) -> pd.DataFrame:
    from kubeloop.data.bundled import bundled_path

    return pd.read_csv(bundled_path(name))


def arrests_frame() -> pd.DataFrame:
    return bundled_frame("arrests")


def register_model(home: Path, *, seed: int = 0, steps: int = 60, dataset: str = "arrests"):
    """Train and register one model of a bundled data set under `home`; returns its ModelVersion record. Its
    signature is what training writes: each feature nullable only if the data had nulls, numeric ones with their
    training min and max."""
    import torch

    from kubeloop.api.modelversion import Feature, Lineage, ModelVersionSpec, Signature
    from kubeloop.artifact import ModelArtifact
    from kubeloop.data.bundled import bundled_path
    from kubeloop.evaluation import evaluate
    from kubeloop.registry import Registry
    from kubeloop.training import tasks
    from kubeloop.training.models import mlp
    from kubeloop.transform import TabularTransform

    label, task, positive = DATASETS[dataset]
    frame = bundled_frame(dataset)
    transform = TabularTransform.fit(frame, label=label, task=task, positive_class=positive)
    torch.manual_seed(seed)
    params = {"hidden_units": [16]}
    model = mlp(transform.output_dim, **params, outputs=transform.label_width)
    features = torch.from_numpy(transform.transform(frame))
    labels = tasks.targets(task, transform.encode_label(frame))
    loss_function = tasks.loss_function(task)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_function(tasks.fitted(task, model(features)), labels)
        loss.backward()
        optimizer.step()
    artifact = ModelArtifact(model, transform, "kubeloop.training.models:mlp", params)
    registry = Registry(home / "registry")
    version, directory = registry.allocate(dataset)
    artifact.save(directory / "artifact")
    digest = hashlib.sha256(bundled_path(dataset).read_bytes()).hexdigest()
    spec = ModelVersionSpec(
        model=dataset,
        version=version,
        artifact_uri=(directory / "artifact").resolve().as_uri(),
        lineage=Lineage(
            dataset_uri=f"bundled://{dataset}",
            dataset_digest=f"sha256:{digest}",
            dataset_rows=len(frame),
            training_job="tests/serving-fixture",
            code_version="test",
            builder="kubeloop.training.models:mlp",
            hyperparameters={"steps": steps, "seed": seed},
            workers=1,
            backend="gloo",
        ),
        metrics=evaluate(transform.label_values(frame), artifact.predict(frame), task=task, classes=transform.classes),
        signature=Signature(
            inputs=[Feature(**f) for f in transform.input_features()],
            label=label,
            task=task,
            positive_class=positive,
            classes=transform.classes,
        ),
    )
    return registry.save(spec, reason="serving test fixture")


def record_path(home: Path, version: int, model: str = "arrests") -> Path:
    return home / "registry" / model / f"v{version}" / "modelversion.yaml"


@contextmanager
def home_with_shared_models(tmp_path_factory, name: str) -> Iterator[Path]:
    """A KUBELOOP_HOME of its own (set while the context lasts) with arrests v1 of the shared test models."""
    models = shared_home(tmp_path_factory)
    home = tmp_path_factory.mktemp(name)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("KUBELOOP_HOME", str(home))
    try:
        register_shared(models)
        yield home
    finally:
        monkeypatch.undo()


def register_shared(models: Path, versions: tuple[int, ...] = (1,)) -> None:
    """These arrests versions of the shared test models in $KUBELOOP_HOME's registry, with the snapshot of their
    training data stored there: the drift sidecar's reference (the shared records name the bundled file's digest)."""
    from kubeloop.api import load_resources
    from kubeloop.data.snapshot import ingest
    from kubeloop.registry import Registry

    snapshot = ingest("bundled://arrests")
    registry = Registry()
    for number in versions:
        (shared,) = load_resources(record_path(models, number))
        lineage = shared.spec.lineage.model_copy(update={"dataset_digest": snapshot.digest})
        version, _ = registry.allocate("arrests")
        registry.save(shared.spec.model_copy(update={"version": version, "lineage": lineage}), "a shared test model")


# ---------------------------------------------------------------- processes
class Process:
    def __init__(self, popen: subprocess.Popen, url: str, log: Path):
        self.popen, self.url, self.log = popen, url, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Pending:
    """A started child process not yet ready: `wait()` reads its stdout up to its ready line."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.args, self.log = args, log
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=log.open("wb"), text=True
        )

    def wait(self, timeout: float = 120) -> Process:
        popen, log = self.popen, self.log
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                line = popen.stdout.readline()
                if not line:
                    if popen.poll() is not None:
                        break
                    continue
                match = READY.search(line)
                if match:
                    threading.Thread(target=_drain, args=(popen.stdout, log), daemon=True).start()
                    return Process(popen, match.group(1), log)
            raise RuntimeError(f"{self.args} did not become ready; its log:\n{log.read_text()[-3000:]}")
        except BaseException:
            popen.kill()
            popen.wait(5)
            raise


def stop_all(*processes: Process) -> list[int | None]:
    """SIGTERM them all first, then wait for each: their shutdowns overlap."""
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    return [process.stop() for process in processes]


def start(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Process:
    """Start `python ARGS` in the repo, wait for its ready line (`serving ... on URL` / `splitting on URL`)."""
    return Pending(args, log, env).wait(timeout)


def start_all(*pending: Pending) -> list[Process]:
    """Wait for processes started side by side; if one fails, the others are stopped too."""
    ready: list[Process] = []
    try:
        for item in pending:
            ready.append(item.wait())
    except BaseException:
        for process in ready:
            process.stop()
        for item in pending:
            if item.popen.poll() is None:
                item.popen.kill()
        raise
    return ready


def _drain(stream, log: Path) -> None:
    """Keep reading a child's stdout after its ready line (a full pipe would block it), into its log."""
    with log.open("a") as out:
        for line in stream:
            out.write(line)


def launch_server(record: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> Pending:
    return Pending(["-m", "serving.server", "--model-version", str(record), "--http-port", "0", *extra], log, env)


def launch_sink(log: Path, *extra: str) -> Pending:
    return Pending([str(Path(__file__).resolve()), "sink", "--port", "0", *extra], log)


def start_server(record: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> Process:
    return launch_server(record, log, *extra, env=env).wait()


def start_sink(log: Path, *extra: str) -> Process:
    return launch_sink(log, *extra).wait()


def shared_home(tmp_path_factory) -> Path:
    """One KUBELOOP_HOME per test session with arrests v1 (seed 0) and v2 (seed 1), whichever module asks first."""
    home = tmp_path_factory.getbasetemp() / "serving-models"
    if not (home / "ready").exists():
        register_model(home, seed=0)
        register_model(home, seed=1)
        (home / "ready").touch()
    return home


def task_home(tmp_path_factory) -> Path:
    """One KUBELOOP_HOME per test session with penguins v1 (multiclass) and abalone v1 (regression)."""
    home = tmp_path_factory.getbasetemp() / "serving-task-models"
    if not (home / "ready").exists():
        register_model(home, dataset="penguins")
        register_model(home, dataset="abalone")
        (home / "ready").touch()
    return home


def scrape(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels`, in Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, label_text = metric.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def http_many(
    url: str, requests: list[tuple[str, str, dict[str, str], bytes]], concurrency: int = 16
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send (method, path, headers, body) requests over `concurrency` keep-alive connections; answers in order.

    A small asyncio HTTP/1.1 client: cheap enough per request that thousands finish in seconds here.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)

    async def run() -> list:
        answers: list = [None] * len(requests)
        todo = iter(enumerate(requests))

        async def worker() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                for index, (method, path, headers, body) in todo:
                    head = f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n"
                    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
                    writer.write(head.encode() + body)
                    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                    answer_headers = {}
                    for line in lines[1:]:
                        if ":" in line:
                            name, _, value = line.partition(":")
                            answer_headers[name.strip().lower()] = value.strip()
                    content = await reader.readexactly(int(answer_headers.get("content-length", "0")))
                    answers[index] = (int(lines[0].split(" ")[1]), answer_headers, content)
            finally:
                writer.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return answers

    return asyncio.run(run())


def rows(frame: pd.DataFrame, n: int, start: int = 0, label: str = "released") -> list[dict]:
    """JSON-ready feature rows (the label dropped, nulls as None)."""
    features = frame.drop(columns=[label]).iloc[start : start + n]
    return [
        {k: None if pd.isna(v) else v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
        for row in features.to_dict("records")
    ]


# ---------------------------------------------------------------- the sink
class Sink:
    """Counts and keeps the events (each event of a CloudEvents batch on its own); answers pipelined requests in
    order, each after `delay` seconds if given."""

    def __init__(self, delay: float, keep: int = 5000):
        self.delay = delay
        self.events: deque[dict] = deque(maxlen=keep)
        self.count = 0

    def answer(self, method: str, target: str, head: bytes, body: bytes) -> bytes:
        if method == "GET":
            payload = json.dumps(list(self.events) if target == "/events" else {"count": self.count}).encode()
            return (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
                + payload
            )
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("content-type", "").startswith("application/cloudevents-batch+json"):
            batch = json.loads(body)
            self.events.extend({"headers": headers, "event": event} for event in batch)
            self.count += len(batch)
        else:
            self.events.append({"headers": headers, "body": body.decode("utf-8", "replace")})
            self.count += 1
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class SinkConnection(asyncio.Protocol):
    def __init__(self, sink: Sink):
        self.sink = sink
        self.buffer = b""
        self.next_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            lower = head.lower()
            at = lower.find(b"content-length:")
            length = int(lower[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, target = head.split(b" ", 2)[:2]
            out.append(self.sink.answer(method.decode(), target.decode(), head, body))
        if not out:
            return
        if not self.sink.delay:
            self.transport.write(b"".join(out))
            return
        loop = asyncio.get_running_loop()
        for answer in out:
            self.next_at = max(loop.time(), self.next_at) + self.sink.delay
            loop.call_at(self.next_at, self._write, answer)

    def _write(self, answer: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(answer)


async def serve_sink(sink: Sink, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkConnection(sink), host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"serving sink on http://{host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sink = sub.add_parser("sink")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=0)
    sink.add_argument("--delay", type=float, default=0.0, help="seconds before answering each event")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(serve_sink(Sink(args.delay), args.host, args.port))


if __name__ == "__main__":
    main()
