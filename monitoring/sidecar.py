"""The drift-detector sidecar: a CloudEvents sink for KServe's payload logger that watches for drift.

    python -m monitoring.sidecar --host 127.0.0.1 --port 8090 [--metrics-port 8091 [--metrics-host 0.0.0.0]]
        --model-version mv.yaml [--model-version mv2.yaml] [--default-version N] --detector ks|mmd --window 200
        --p-value 0.05 --reference-size 2000

For each ModelVersion it loads a seeded reference sample of the training snapshot named in its lineage and keeps
a window per version. ``POST`` (any path) takes one event (binary or structured mode, as KServe's logger sends
them) or a batch of them (batched mode, as kubeloop's model server sends them): the handler parses and appends,
nothing more; a full window is handed to a detection thread through a bounded queue (a window that finds the queue
full is dropped and its events counted in ``kubeloop_drift_events_dropped_total``), so the sink answers in
microseconds and never blocks KServe's logger (whose own queue of 100 blocks predictions when it fills). Request
events feed the drift windows, response events a per-version prediction window (for canary analysis), read per the
ModelVersion's ``spec.signature.task``: a score (binary), class probabilities (multiclass), a value (regression).
``GET /metrics`` (Prometheus), ``GET /status`` (JSON), ``GET /healthz``. A malformed event is answered 4xx (in a
batch: counted in the batch's 200 answer), counted by reason and logged (at most one line per reason per
``LOG_EVERY_S``); it never stops the process.

Listeners: ``--host``/``--port`` serves every route; keep it on loopback, the logger posts from inside the pod. With
``--metrics-port`` a second, read-only listener (``--metrics-host``, 0.0.0.0 by default) serves the GET routes to
the pod network for Prometheus and answers events with 405, so nothing outside the pod can feed the detector.
"""

from __future__ import annotations

import argparse
import gc
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    disable_created_metrics,
)

from kubeloop.api.modeldeployment import DriftMonitor
from monitoring.app import DriftSidecar, build_sidecar
from monitoring.config import DEFAULT_MAX_BODY, SidecarConfig
from monitoring.detectors import (
    ALARM_K,
    ALARM_M,
    DEFAULT_CORRECTION,
    MMD_PERMUTATIONS,
    DriftTracker,
)
from monitoring.versions import read_model_version

log = logging.getLogger("monitoring.sidecar")  # not __name__: that is __main__ under python -m


def _parser() -> argparse.ArgumentParser:
    defaults = DriftMonitor()
    p = argparse.ArgumentParser(prog="python -m monitoring.sidecar", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--host", default="127.0.0.1", help="the listener for events and every route; keep it on loopback (%(default)s)"
    )
    p.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="also serve GET /metrics /status /healthz, and no events, on this port (0: a free one, printed)",
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="the read-only listener's address (default %(default)s)")
    p.add_argument(
        "--model-version",
        action="append",
        required=True,
        metavar="PATH|NAME:VERSION",
        help="a ModelVersion YAML (repeat for stable + canary); NAME:VERSION reads the local registry",
    )
    p.add_argument("--default-version", type=int, help="version of events without ce-modelversion (first given)")
    p.add_argument("--detector", choices=["ks", "mmd"], default=defaults.detector)
    p.add_argument("--backend", choices=["alibi", "scipy"], default=defaults.backend, help="runs the ks tests")
    p.add_argument("--window", type=int, default=defaults.window, help="rows per detection window")
    p.add_argument("--p-value", type=float, default=defaults.p_value, help="family-wise alpha per window")
    p.add_argument("--reference-size", type=int, default=defaults.reference_size)
    p.add_argument("--correction", choices=["bonferroni", "fdr"], default=DEFAULT_CORRECTION)
    p.add_argument("--alarm-k", type=int, default=ALARM_K, help="Drift when >= k of the last m windows flag")
    p.add_argument("--alarm-m", type=int, default=ALARM_M)
    p.add_argument("--seed", type=int, default=0, help="seed of the reference sample")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--detection-queue", type=int, default=8, help="full windows that may wait for the detector")
    p.add_argument("--mmd-permutations", type=int, default=MMD_PERMUTATIONS)
    p.add_argument("--verbose", action="store_true")
    return p


def _setup_logging(verbose: bool) -> None:
    from kubeloop.log import setup

    setup(verbose)
    kubeloop_logger = logging.getLogger("kubeloop")
    ours = logging.getLogger("monitoring")
    ours.handlers[:] = kubeloop_logger.handlers
    ours.setLevel(kubeloop_logger.level)
    ours.propagate = False


@dataclass(frozen=True)
class Listener:
    host: str
    port: int  # 0: a free one


def listeners(args: argparse.Namespace) -> tuple[Listener, Listener | None]:
    """The ingest listener and the read-only metrics listener (None without --metrics-port)."""
    ingest = Listener(args.host, args.port)
    for name, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"{name} {port}: expected 0-65535 (0: a free port)")
    if args.metrics_port is None:
        return ingest, None
    if args.metrics_port == args.port and args.port != 0:
        raise ValueError(f"--metrics-port {args.metrics_port} is the ingest --port too: give it a port of its own")
    return ingest, Listener(args.metrics_host, args.metrics_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        ingest, metrics = listeners(args)
    except ValueError as error:
        parser.error(str(error))
    _setup_logging(args.verbose)
    disable_created_metrics()  # no *_created series: they would double the exposition
    from pydantic import ValidationError

    from kubeloop.errors import KubeloopError

    try:
        # the ModelDeployment's own bounds (window >= 20, 0 < p < 1, ...) apply to the flags too
        monitor = DriftMonitor(
            detector=args.detector,
            backend=args.backend,
            window=args.window,
            p_value=args.p_value,
            reference_size=args.reference_size,
        )
        config = SidecarConfig.from_monitor(
            monitor,
            correction=args.correction,
            alarm_k=args.alarm_k,
            alarm_m=args.alarm_m,
            seed=args.seed,
            max_body_bytes=args.max_body_bytes,
            detection_queue=args.detection_queue,
            mmd_permutations=args.mmd_permutations,
        )
        DriftTracker(config.alarm_k, config.alarm_m)
        if args.detector == "mmd":
            import torch

            torch.set_num_threads(1)  # a sidecar shares the pod's CPU with the predictor
        records = [read_model_version(ref) for ref in args.model_version]
        app = build_sidecar(records, config, args.default_version)
    except (KubeloopError, ValidationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # torch, alibi-detect and the references (~500k objects) live as long as the process: out of the collector's
    # reach, a full collection no longer walks them (measured: 0.27 s with the GIL held, the event loop stopped)
    gc.collect()
    gc.freeze()
    app.start()
    try:
        serve(app, ingest, metrics)
    finally:
        app.stop()
    return 0


# per-event work uvicorn can skip: access log lines, proxy-header rewriting, Server and Date response headers
UVICORN_SETTINGS: dict[str, Any] = {
    "access_log": False,
    "log_level": "warning",
    "lifespan": "off",
    "proxy_headers": False,
    "server_header": False,
    "date_header": False,
}


def serve(app: DriftSidecar, ingest: Listener, metrics: Listener | None = None) -> None:
    """Serve `app` on the ingest listener and, if given, the read-only metrics listener: one server, one event loop,
    both sockets (the app tells them apart by the local port of each request)."""
    import uvicorn

    sockets = [_bind(ingest)]
    if metrics is not None:
        sockets.append(_bind(metrics))
        app.read_only_ports = frozenset({sockets[1].getsockname()[1]})

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                ports = [sock.getsockname()[1] for sock in sockets or ()]
                print(f"drift sidecar on http://{_url_host(ingest.host)}:{ports[0]}", flush=True)
                if metrics is not None:
                    print(f"drift sidecar metrics on http://{_url_host(metrics.host)}:{ports[1]}", flush=True)

    Server(uvicorn.Config(app, **UVICORN_SETTINGS)).run(sockets=sockets)


def _bind(listener: Listener) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    dualstack = listener.host == "::" and socket.has_dualstack_ipv6()  # "::" takes IPv4 connections too
    try:
        return socket.create_server(
            (listener.host, listener.port), family=family, backlog=2048, dualstack_ipv6=dualstack
        )
    except OSError as error:
        raise SystemExit(f"error: cannot listen on {listener.host}:{listener.port}: {error}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
