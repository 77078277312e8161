"""kserve's REST app and ModelServer, bound where kubeloop says and wrapped with kubeloop's request accounting.

kserve 0.21 hard-codes the HTTP host to 0.0.0.0 in `kserve/protocol/rest/server.py` (RESTServer builds its
uvicorn.Config with host="0.0.0.0"). `LocalRESTServer` keeps everything else of RESTServer -- kserve's FastAPI
app, its v1/v2 routes and dataplane, its exception handlers and /metrics -- and serves it on a socket that kubeloop
binds itself (127.0.0.1 locally, 0.0.0.0:8080 in a pod). `KubeloopModelServer` is a kserve.ModelServer whose start()
uses it. Per-request logging is off: no uvicorn access log, no kserve latency or timing-middleware trace lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import InferenceError, InvalidInput, generic_exception_handler, inference_error_handler
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer

from kubeloop.api.modelversion import Signature
from kubeloop.asgi import Receive, Send, read_body, respond
from kubeloop.feedback import LabelError, parse_feedback
from kubeloop.log import event
from serving.grpc import start_grpc_server
from serving.metrics import ServingMetrics
from serving.net import bind
from serving.payload_logger import PayloadLogger, event_id

log = logging.getLogger("kubeloop.serving")

Scope = dict[str, Any]
DEFAULT_MAX_BODY_BYTES = 1 << 20
_UNION_TAGS = {"body", "InferenceRequest", "bytes"}  # kserve's v2 body is Union[InferenceRequest, bytes]
_V2_BODY = 'body: expected a JSON object {"inputs": [{"name", "shape", "datatype", "data"}, ...]}'


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote a client's string, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode("ascii")


class ServingMiddleware:
    """Pure ASGI middleware in front of every route: the body-size limit (413) before any body is read, the
    repository extension refused unless enabled, versioned v2 routes answered for the served version; and on the
    inference routes of the model request counters by protocol and status and the payload logger's CloudEvents
    (queued, never awaited; not for requests refused with a 4xx)."""

    def __init__(
        self,
        app: Any,
        *,
        model_name: str,
        model_version: int,
        metrics: ServingMetrics,
        payload_logger: PayloadLogger | None,
        max_body_bytes: int,
        signature: Signature | None = None,
        repository_enabled: bool = False,
    ):
        self.app = app
        self.metrics = metrics
        self.signature = signature
        self.payload_logger = payload_logger
        self.max_body_bytes = max_body_bytes
        self.repository_enabled = repository_enabled
        self.model_name, self.model_version = model_name, str(model_version)
        self.v1_path = f"/v1/models/{model_name}:predict"
        self.v2_prefix = f"/v2/models/{model_name}/"
        self.feedback_path = f"/v1/models/{model_name}:feedback"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v2/models/") and "/versions/" in path:
            path = self._unversioned(path)
            if path is None:
                return await respond(send, 404, _error_body(self._version_message(scope["path"])))
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if not self.repository_enabled and path.startswith("/v2/repository/"):
            message = "the model repository extension is off: start the server with --enable-repository to load "
            return await respond(send, 403, _error_body(message + "and unload models over HTTP"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if path == self.feedback_path:
            return await self._feedback(receive, send)
        if path == self.v1_path:
            protocol: str | None = "v1"
        elif path.startswith(self.v2_prefix) and path.endswith("/infer"):
            protocol = "v2"
        else:
            protocol = None

        started = time.perf_counter()
        length = ce_id = None
        content_type = None
        binary_extension = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"ce-id":
                ce_id = value
            elif name == b"inference-header-content-length":
                binary_extension = True
        if protocol is not None and (
            content_type is None or content_type.startswith("application/x-www-form-urlencoded")
        ):
            # curl's default: the body is JSON all the same (kserve would pass a v2 body on as raw bytes)
            content_type = "application/json"
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        limit = self.max_body_bytes
        if length is not None and length > limit:
            return await self._reject(send, protocol, 413, "body_too_large", _too_large(length, limit), started)
        if binary_extension and protocol == "v2":
            message = (
                "inference-header-content-length: the binary tensor extension is not supported by this model; "
                "send the tensors as JSON data"
            )
            return await self._reject(send, protocol, 400, "invalid_request", message, started)

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    return await self._reject(
                        send, protocol, 413, "body_too_large", _too_large(size, limit, "at least "), started
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if protocol is None:
            return await self.app(scope, replay, send)
        status = 500
        response_chunks: list[bytes] = []
        capture = self.payload_logger is not None
        # the id the request's events carry, answered as ce-id: what a client names when it sends the labels later
        request_id = event_id(ce_id) if capture else ""

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if capture:
                    message = {**message, "headers": [*message.get("headers", []), (b"ce-id", request_id.encode())]}
            elif capture and message["type"] == "http.response.body":
                response_chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay, watch)
        finally:
            self.metrics.count_request(protocol, status, time.perf_counter() - started)
            if self.payload_logger is not None and not 400 <= status < 500:
                response = b"".join(response_chunks) if status == 200 else None
                self.payload_logger.log(request_id, body, response, content_type)

    async def _feedback(self, receive: Receive, send: Send) -> None:
        """Labels for served requests (kubeloop/feedback.py), checked against the model's signature and passed on
        to the drift sidecar, which joins them to the predictions it saw, as one CloudEvent through the payload
        logger: 202 once queued."""
        if self.payload_logger is None or self.signature is None:
            message = (
                "feedback goes to the drift sidecar through the payload logger: start the server with --logger-url"
            )
            return await respond(send, 409, _error_body(message))
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            message = (
                f"body: over the limit of {self.max_body_bytes} bytes (--max-body-bytes): send fewer labels a body"
            )
            return await respond(send, 413, _error_body(message))
        try:
            entries = parse_feedback(orjson.loads(body), self.signature)
        except orjson.JSONDecodeError as error:
            return await respond(send, 400, _error_body(f"body: not JSON ({error})"))
        except LabelError as error:
            return await respond(send, 400, _error_body(str(error)))
        self.payload_logger.log_feedback(body)
        labels = sum(len(entry.labels) for entry in entries)
        await respond(send, 202, orjson.dumps({"accepted": len(entries), "labels": labels}))

    def _unversioned(self, path: str) -> str | None:
        """/v2/models/NAME/versions/V[/rest] as /v2/models/NAME[/rest]; None for a version of this model that is
        not the served one. Other models' paths lose the version too: kserve then answers that it has no such
        model."""
        head, _, tail = path.partition("/versions/")
        version, _, rest = tail.partition("/")
        if head == f"/v2/models/{self.model_name}" and version != self.model_version:
            return None
        return head + (f"/{rest}" if rest else "")

    def _version_message(self, path: str) -> str:
        version = path.partition("/versions/")[2].partition("/")[0]
        return (
            f"model {self.model_name} version {version} is not served here: this server serves version "
            f"{self.model_version} (/v2/models/{self.model_name}/versions/{self.model_version}/...)"
        )

    async def _reject(
        self, send: Send, protocol: str | None, status: int, reason: str, message: str, started: float
    ) -> None:
        self.metrics.count_error(reason)
        if protocol is not None:
            self.metrics.count_request(protocol, status, time.perf_counter() - started)
        await respond(send, status, _error_body(message))


def _too_large(size: int, limit: int, qualifier: str = "") -> str:
    return f"body: {qualifier}{size} bytes exceed the limit of {limit} bytes (--max-body-bytes)"


def _field(location: tuple | list) -> str:
    """FastAPI's error location ("body", "InferenceRequest", "inputs", 0, "shape") as inputs[0].shape."""
    parts = [part for part in location if part not in _UNION_TAGS] or ["body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class LocalRESTServer(RESTServer):
    def __init__(
        self,
        *args: Any,
        sock: socket.socket,
        metrics: ServingMetrics,
        model_name: str,
        model_version: int,
        payload_logger: PayloadLogger | None,
        max_body_bytes: int,
        repository_enabled: bool,
        signature: Signature | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.sock = sock
        self.signature = signature
        self.metrics, self.model_name, self.model_version = metrics, model_name, model_version
        self.payload_logger, self.max_body_bytes = payload_logger, max_body_bytes
        self.repository_enabled = repository_enabled
        host, port = sock.getsockname()[:2]
        self.config = uvicorn.Config(
            self.config.app,
            host=host,
            port=port,
            log_config=None,  # logging is configured by kubeloop
            access_log=False,  # ~0.5 KB of logs per request otherwise
            server_header=False,
            timeout_graceful_shutdown=self.config.timeout_graceful_shutdown,
            timeout_keep_alive=self.config.timeout_keep_alive,
            ssl_certfile=self.config.ssl_certfile,
            ssl_keyfile=self.config.ssl_keyfile,
        )
        self._server = uvicorn.Server(self.config)

    @property
    def server(self) -> uvicorn.Server:
        return self._server

    def _add_middlewares(self, app: FastAPI) -> None:
        # kserve's TimingMiddleware only writes trace log lines: left out, as is the access log
        app.add_middleware(
            ServingMiddleware,
            model_name=self.model_name,
            model_version=self.model_version,
            metrics=self.metrics,
            payload_logger=self.payload_logger,
            max_body_bytes=self.max_body_bytes,
            signature=self.signature,
            repository_enabled=self.repository_enabled,
        )

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        metrics = self.metrics

        async def invalid_input(_: Request, error: InvalidInput) -> ErrorResponse:
            metrics.count_error(getattr(error, "kind", "invalid_request"))
            message = str(error)
            if message.startswith("received byte inputs"):  # kserve's words for a v2 body that is no object
                message = _V2_BODY
            event(log, "request.rejected", logging.DEBUG, error=message)
            return ErrorResponse(status_code=400, content={"error": message})

        async def invalid_request(_: Request, error: RequestValidationError) -> ErrorResponse:
            metrics.count_error("invalid_request")
            problems = [p for p in error.errors() if "bytes" not in p.get("loc", ())] or list(error.errors())
            if not problems:
                message = "body: invalid request"
            elif problems[0].get("type") == "json_invalid":
                message = f"body: invalid JSON ({problems[0].get('ctx', {}).get('error', 'cannot be decoded')})"
            elif problems[0].get("type") == "model_attributes_type":
                message = _V2_BODY
            else:
                message = "; ".join(f"{_field(p.get('loc', ()))}: {p.get('msg', 'invalid')}" for p in problems[:3])
                if len(problems) > 3:
                    message += f" (and {len(problems) - 3} more)"
            return ErrorResponse(status_code=400, content={"error": message})

        async def model_error(request: Request, error: InferenceError) -> Any:
            metrics.count_error("model_error")
            return await inference_error_handler(request, error)

        async def internal_error(request: Request, error: Exception) -> Any:
            metrics.count_error("internal")
            return await generic_exception_handler(request, error)

        app.add_exception_handler(InvalidInput, invalid_input)
        app.add_exception_handler(RequestValidationError, invalid_request)
        app.add_exception_handler(InferenceError, model_error)
        app.add_exception_handler(Exception, internal_error)

    async def start(self) -> None:
        self.create_application()
        await self._server.serve(sockets=[self.sock])


class KubeloopDataPlane(DataPlane):
    """kserve's DataPlane, except: ready only while every registered model is (after an unload there is none);
    model metadata lists the served version; the repository extension is announced only when enabled."""

    def __init__(self, model_registry: Any, *, repository_enabled: bool):
        super().__init__(model_registry=model_registry)
        self.repository_enabled = repository_enabled

    def metadata(self) -> dict:
        out = super().metadata()
        if not self.repository_enabled:
            out["extensions"] = []
        return out

    async def ready(self) -> bool:
        models = self.model_registry.get_models()
        return bool(models) and all(model.ready for model in models.values())

    async def model_metadata(self, model_name: str) -> dict:
        out = await super().model_metadata(model_name)
        version = getattr(self.get_model_from_registry(model_name), "version", None)
        if version is not None:
            out["versions"] = [str(version)]
        return out


class KubeloopModelServer(ModelServer):
    """kserve.ModelServer serving on a socket bound to the given host; gRPC only when a port is given."""

    def __init__(
        self,
        *,
        host: str,
        http_port: int,
        metrics: ServingMetrics,
        model_name: str,
        model_version: int,
        payload_logger: PayloadLogger | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        grpc_port: int | None = None,
        grace_period: int = 5,
        repository_enabled: bool = False,
        signature: Signature | None = None,
    ):
        super().__init__(
            http_port=http_port,
            grpc_port=grpc_port or 8081,
            enable_grpc=bool(grpc_port),
            enable_latency_logging=False,
            grace_period=grace_period,
        )
        self.host = host
        self.metrics, self.model_name, self.model_version = metrics, model_name, model_version
        self.repository_enabled, self.signature = repository_enabled, signature
        self.dataplane = KubeloopDataPlane(self.registered_models, repository_enabled=repository_enabled)
        self.payload_logger, self.max_body_bytes = payload_logger, max_body_bytes
        self.sock = bind(host, http_port)
        self.port = self.sock.getsockname()[1]

    async def serve(self, models: list, on_ready: Callable[[], None] | None = None) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        for model in models:
            model.enable_latency_logging = False
        self._rest_server = LocalRESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.port,
            grace_period=self.grace_period,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            sock=self.sock,
            metrics=self.metrics,
            model_name=self.model_name,
            model_version=self.model_version,
            payload_logger=self.payload_logger,
            max_body_bytes=self.max_body_bytes,
            repository_enabled=self.repository_enabled,
            signature=self.signature,
        )
        if self.payload_logger is not None:
            self.payload_logger.start()
        if self.enable_grpc:
            self._grpc_server = await start_grpc_server(
                self.host,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                metrics=self.metrics,
                repository_enabled=self.repository_enabled,
                payload_logger=self.payload_logger,
                max_receive_bytes=self.max_body_bytes,
                grace_period=self.grace_period,
            )
        rest = asyncio.create_task(self._rest_server.start(), name="rest")
        server = self._rest_server.server
        while not server.started and not rest.done():
            await asyncio.sleep(0.01)
        if server.started and on_ready is not None:
            on_ready()
        try:
            await rest
        finally:
            if self.payload_logger is not None:
                await self.payload_logger.close()
            if self._grpc_server is not None:
                await self._grpc_server.stop(None)
            for name in list(self.registered_models.get_models()):
                self.registered_models.unload(name)
