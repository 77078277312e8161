"""`python -m serving.server`: serve one ModelVersion with kserve (v1/v2 REST), validation, metrics, payload logs.

Locally: `--host 127.0.0.1` (the default) and any port (`--http-port 0` picks a free one). In a pod: `--host 0.0.0.0`
and KServe's port 8080. Prints `serving MODEL vN on http://HOST:PORT` once the socket accepts requests; stops
cleanly on SIGTERM or SIGINT (in-flight requests finish, queued payload events are dropped and counted).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import warnings
from pathlib import Path

from kubeloop import log as kubeloop_log
from kubeloop.api.load import load_resources
from kubeloop.api.modelversion import ModelVersion
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from kubeloop.registry import Registry, parse_ref
from serving.net import SignalGuard, run, url_of

log = logging.getLogger("kubeloop.serving.server")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model-version",
        required=True,
        metavar="PATH|NAME:VERSION",
        help="a modelversion.yaml (e.g. $KUBELOOP_HOME/registry/arrests/v1/modelversion.yaml) or a registry ref",
    )
    p.add_argument("--model-name", help="the name in the URL paths (default: the ModelVersion's spec.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port (default 8080 as KServe; 0: any free)")
    p.add_argument(
        "--grpc-port", type=int, default=0, help="gRPC (Open Inference Protocol) on this port, on --host (default off)"
    )
    p.add_argument("--logger-url", help="send request/response CloudEvents to this URL (the drift sidecar)")
    p.add_argument("--logger-queue", type=int, default=2000, help="logged requests queued before dropping")
    p.add_argument("--source-uri", help="ce-source of the events (default http://localhost:PORT/)")
    p.add_argument("--endpoint", choices=("default", "canary"), default="default", help="ce-endpoint of the events")
    p.add_argument("--inference-service", help="ce-inferenceservicename (default: the model name)")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"), help="ce-namespace")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get HTTP 413 (default 1 MiB)")
    p.add_argument("--max-batch-size", type=int, default=1024, help="most rows in one request (default 1024)")
    p.add_argument(
        "--cache",
        choices=("off", "static", "dynamic", "hybrid"),
        default="off",
        help="prediction cache: static = the --cache-file rows precomputed at start, dynamic = LRU of served rows, "
        "hybrid = both (default off)",
    )
    p.add_argument("--cache-file", help="rows to precompute (JSON lines of {feature: value}, a JSON list, or CSV)")
    p.add_argument("--cache-size", type=int, default=10_000, help="entries of the dynamic (LRU) cache")
    p.add_argument(
        "--no-merge-requests",
        dest="merge_requests",
        action="store_false",
        help="run each request's rows through the model alone (default: concurrent requests share a model call)",
    )
    p.add_argument(
        "--out-of-range",
        choices=("count", "clip", "reject"),
        default="count",
        help="numeric inputs outside the training [min, max]: count them, clip them to the range, or answer 400 "
        "(default count)",
    )
    p.add_argument(
        "--enable-repository",
        action="store_true",
        help="open the model repository extension (load/unload over HTTP and gRPC; default off: anyone reaching the "
        "port could unload the model)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--grace-period", type=int, default=5, help="seconds in-flight requests get at shutdown")
    p.add_argument("--verbose", action="store_true")
    return p


def load_record(reference: str) -> ModelVersion:
    path = Path(reference)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        records = [r for r in load_resources(path) if isinstance(r, ModelVersion)]
        if not records:
            raise KubeloopError(f"{path}: holds no ModelVersion")
        return records[0]
    return Registry().get(*parse_ref(reference))


def configure_logging(verbose: bool) -> None:
    """kubeloop's structured lines for everything; no per-request lines from kserve or uvicorn."""
    kubeloop_log.setup(verbose)
    # kserve 0.21 answers with FastAPI's ORJSONResponse, which FastAPI now flags as deprecated on every use site
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    handler = logging.getLogger("kubeloop").handlers[0]
    for name in ("kserve", "uvicorn", "uvicorn.error"):
        other = logging.getLogger(name)
        other.handlers[:] = [handler]
        other.setLevel(logging.DEBUG if verbose else logging.WARNING if name == "kserve" else logging.INFO)
        other.propagate = False
    for name in ("kserve.trace", "uvicorn.access"):
        quiet = logging.getLogger(name)
        quiet.handlers[:] = [logging.NullHandler()]
        quiet.setLevel(logging.WARNING)
        quiet.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return serve(args)
    except KubeloopError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    import torch
    from prometheus_client import disable_created_metrics

    from serving.app import KubeloopModelServer
    from serving.cache import PredictionCache
    from serving.model import KubeloopModel
    from serving.payload_logger import EventSource, PayloadLogger

    disable_created_metrics()  # a _created series per counter and histogram doubles /metrics for nothing

    if args.cache != "off" and args.cache != "dynamic" and not args.cache_file:
        raise KubeloopError(f"--cache {args.cache} precomputes the rows of --cache-file: give one")
    torch.set_num_threads(max(1, args.torch_threads))
    record = load_record(args.model_version)
    spec = record.spec
    name = args.model_name or spec.model
    cache = PredictionCache(args.cache, args.cache_size) if args.cache != "off" else None
    model = KubeloopModel(
        name,
        record,
        max_batch=args.max_batch_size,
        cache=cache,
        cache_file=args.cache_file if args.cache in ("static", "hybrid") else None,
        merge_requests=args.merge_requests,
        out_of_range=args.out_of_range,
    )
    model.load()
    server = KubeloopModelServer(
        host=args.host,
        http_port=args.http_port,
        metrics=model.metrics,
        model_name=name,
        model_version=spec.version,
        max_body_bytes=args.max_body_bytes,
        grpc_port=args.grpc_port or None,
        grace_period=args.grace_period,
        repository_enabled=args.enable_repository,
        signature=spec.signature,
    )
    payload_logger = None
    if args.logger_url:
        source = EventSource(
            source=args.source_uri or f"http://localhost:{server.port}/",
            inference_service=args.inference_service or name,
            namespace=args.namespace,
            endpoint=args.endpoint,
            model_version=str(spec.version),
        )
        payload_logger = PayloadLogger(args.logger_url, source, model=name, queue_size=args.logger_queue)
        server.payload_logger = payload_logger
    url = url_of(args.host, server.sock)

    guard = SignalGuard()

    # everything loaded so far (torch, pandas, kserve, the model: ~300k objects) lives as long as the process: moved
    # out of the collector's reach, a full collection no longer walks it (measured: a 0.5 s pause on a busy machine)
    gc.collect()
    gc.freeze()

    def ready() -> None:
        guard.serving = True
        event(log, "serving.ready", model=name, version=spec.version, url=url, payload_log=args.logger_url or "off")
        print(f"serving {name} v{spec.version} on {url}", flush=True)

    try:
        run(lambda: server.serve([model], on_ready=ready))
    finally:
        event(log, "serving.stopped", model=name, version=spec.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
