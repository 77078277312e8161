"""The Open Inference Protocol over gRPC with kubeloop's validation, status codes, metrics, payload events and
repository policy: the same model and DataPlane as REST.

kserve 0.21's GRPCServer (kserve/protocol/grpc/server.py) cannot be used as it is: it builds its grpc.aio server
with a fixed interceptor tuple -- a LoggingInterceptor that writes a line per call and an ExceptionToStatusInterceptor
that answers a model failure (InferenceError) INVALID_ARGUMENT -- binds every interface ([::]) with gRPC's default
SO_REUSEPORT (a second server on the same port starts without an error), takes messages up to kserve's 8 MiB whatever
--max-body-bytes says and serves the repository RPCs to anyone. `InferenceGRPCServer` serves kserve's servicer
(`KubeloopServicer`, a subclass) behind one `AccountingInterceptor` instead, on the address kubeloop binds:

- ModelInfer: the client's tensors become a kserve InferRequest as kserve decodes them, plus `raw_input_contents`
  (what kserve's own client sends for numpy data) decoded to values, so KubeloopModel.preprocess validates gRPC
  requests as it does v2 JSON (BYTES arrive as bytes and are decoded as UTF-8 there).
- Status codes: a request the model refuses (InvalidInput, kubeloop's InvalidRequest) INVALID_ARGUMENT with its
  message (the field first); a model failure (InferenceError) or any other error INTERNAL; an unknown model
  NOT_FOUND; a model not ready UNAVAILABLE; the repository RPCs PERMISSION_DENIED naming --enable-repository unless
  it was given. A message larger than the receive limit (the server's --max-body-bytes) is RESOURCE_EXHAUSTED,
  answered by gRPC before any handler runs (so it is in no kubeloop metric).
- Every ModelInfer call is counted (`ServingMetrics.count_request("grpc", status name, seconds)`) and its refusal
  or failure by reason (`count_error`: the InvalidRequest's kind, model_error, internal); an answered request is
  sent to the payload logger as v2 JSON (request and response), as REST requests are.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import orjson
from kserve.constants.constants import MAX_GRPC_MESSAGE_LENGTH
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse, deserialize_bytes_tensor
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.utils.numpy_codec import to_np_dtype
from kserve.utils.utils import to_headers

from kubeloop.log import event
from serving.metrics import ServingMetrics
from serving.payload_logger import PayloadLogger, event_id
from serving.validation import InvalidRequest

log = logging.getLogger("kubeloop.serving.grpc")

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
DATATYPES = "BOOL, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, FP16, FP32, FP64, BYTES"
REPOSITORY_OFF = (
    "the model repository extension is off: start the server with --enable-repository to load and unload models "
    "over gRPC"
)

SERVER_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)  # REST's 5xx

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class RepositoryDisabled(Exception):
    """A repository RPC on a server started without --enable-repository."""


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """The gRPC status code and message a handler's exception is answered with, and the reason label of
    kubeloop_request_errors_total it counts under (None: not counted, as REST does not count a 404 or 503)."""
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), getattr(error, "kind", "invalid_request")
    if isinstance(error, UnsupportedProtocol):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), "invalid_request"
    if isinstance(error, InferenceError):
        return grpc.StatusCode.INTERNAL, str(error), "model_error"
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(error), None
    if isinstance(error, ModelNotReady | ServerNotReady | ServerNotLive):
        return grpc.StatusCode.UNAVAILABLE, str(error), None
    if isinstance(error, RepositoryDisabled):
        return grpc.StatusCode.PERMISSION_DENIED, str(error), None
    return grpc.StatusCode.INTERNAL, "internal error: see the model server's log", "internal"


class AccountingInterceptor(grpc.aio.ServerInterceptor):
    """Answers every unary RPC's exceptions with `status_of`'s code and message; counts ModelInfer calls by status
    and latency and their refusals by reason."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:  # unknown methods: gRPC answers UNIMPLEMENTED
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(handler.unary_unary, handler_call_details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, behavior: Behavior, method: str) -> Behavior:
        metrics, counted = self.metrics, method == MODEL_INFER

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # the client went away or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, message, reason = status_of(error)
                if reason is not None:
                    metrics.count_error(reason)
                if reason == "internal":
                    log.exception("gRPC %s from %s failed", method, context.peer())
                elif code == grpc.StatusCode.INVALID_ARGUMENT:
                    event(log, "request.rejected", logging.DEBUG, protocol="grpc", error=message)
                await context.abort(code, message)
            finally:
                if counted:
                    metrics.count_request("grpc", code.name, time.perf_counter() - started)

        return call


class KubeloopServicer(InferenceServicer):
    """kserve's servicer with ModelInfer decoding raw tensors and logging payloads, model metadata listing the
    served version, and the repository RPCs refused unless enabled."""

    def __init__(
        self,
        dataplane: DataPlane,
        repository_extension: ModelRepositoryExtension,
        *,
        repository_enabled: bool,
        payload_logger: PayloadLogger | None,
    ):
        super().__init__(dataplane, repository_extension)
        self.dataplane = dataplane
        self.repository_enabled = repository_enabled
        self.payload_logger = payload_logger

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        infer_request = decode_request(request)
        headers = to_headers(context)
        logger = self.payload_logger
        try:
            response, _ = await self.dataplane.infer(
                model_name=request.model_name, request=infer_request, headers=headers
            )
        except Exception as error:
            # as REST logs a 5xx (the request that failed, no response) and no 4xx
            if logger is not None and status_of(error)[0] in SERVER_ERRORS:
                logger.log(event_id(headers.get("ce-id")), request_json(infer_request), None, "application/json")
            raise
        if logger is not None:
            ce_id = event_id(headers.get("ce-id"))
            logger.log(ce_id, request_json(infer_request), response_json(response), "application/json")
        return response.to_grpc()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        metadata = await self.dataplane.model_metadata(model_name=request.name)
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata.get("versions", []),
            platform=metadata["platform"],
            inputs=metadata["inputs"],
            outputs=metadata["outputs"],
        )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> pb.RepositoryModelLoadResponse:
        if not self.repository_enabled:
            raise RepositoryDisabled(REPOSITORY_OFF)
        return await super().RepositoryModelLoad(request, context)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> pb.RepositoryModelUnloadResponse:
        if not self.repository_enabled:
            raise RepositoryDisabled(REPOSITORY_OFF)
        return await super().RepositoryModelUnload(request, context)


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    """kserve's InferRequest of a gRPC request, each tensor's `data` a flat list of values (bytes for BYTES),
    whether the client sent typed contents or raw_input_contents. Errors name the input (kserve's own checks of
    raw_input_contents do not)."""
    raw_count = len(request.raw_input_contents)
    if raw_count and raw_count != len(request.inputs):
        raise InvalidRequest(
            "wrong_shape",
            f"raw_input_contents: {raw_count} given for {len(request.inputs)} inputs; send one per input, in the "
            f"order of inputs, or none",
        )
    for k, tensor in enumerate(request.inputs):
        if raw_count and tensor.HasField("contents"):
            raise InvalidRequest(
                "invalid_request",
                f"inputs[{k}] ({tensor.name!r}).contents: give the values in contents or in raw_input_contents, "
                f"not both",
            )
        if to_np_dtype(tensor.datatype) is None:  # kserve's decoder says "invalid content type", naming nothing
            raise InvalidRequest(
                "wrong_type",
                f"inputs[{k}] ({tensor.name!r}).datatype: {tensor.datatype!r} is not an Open Inference Protocol "
                f"datatype ({DATATYPES})",
            )
    infer_request = InferRequest.from_grpc(request)
    for k, raw in enumerate(request.raw_input_contents):
        tensor = infer_request.inputs[k]
        where = f"raw_input_contents[{k}] ({tensor.name!r})"
        if tensor.datatype == "BYTES":
            try:
                tensor.data = deserialize_bytes_tensor(raw).tolist()
            except struct.error:
                raise InvalidRequest(
                    "wrong_shape", f"{where}: not BYTES elements (each a 4-byte little-endian length, then the bytes)"
                ) from None
            continue
        dtype = np.dtype(to_np_dtype(tensor.datatype))
        if len(raw) % dtype.itemsize:
            raise InvalidRequest(
                "wrong_shape", f"{where}: {len(raw)} bytes are not a whole number of {tensor.datatype} values"
            )
        tensor.data = np.frombuffer(raw, dtype=dtype).tolist()
    return infer_request


def request_json(request: InferRequest) -> bytes:
    """A validated gRPC request as the v2 JSON body the drift sidecar reads (BYTES as text)."""
    inputs = [
        {
            "name": tensor.name,
            "shape": list(tensor.shape),
            "datatype": tensor.datatype,
            "data": [v.decode("utf-8", "replace") if type(v) is bytes else v for v in tensor.data],
        }
        for tensor in request.inputs
    ]
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    return orjson.dumps(body)


def response_json(response: InferResponse) -> bytes:
    """The v2 JSON body of a response (data flattened row-major, as REST answers)."""
    outputs = [
        {
            "name": output.name,
            "shape": list(output.shape),
            "datatype": output.datatype,
            "data": np.asarray(output.data).reshape(-1),
        }
        for output in response.outputs
    ]
    body = {"id": response.id, "model_name": response.model_name, "model_version": response.model_version}
    return orjson.dumps({**body, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)


class InferenceGRPCServer:
    """The GRPCInferenceService on `host:port` (started by `start()`, serving until `stop()`)."""

    def __init__(
        self,
        host: str,
        port: int,
        dataplane: DataPlane,
        repository_extension: ModelRepositoryExtension,
        *,
        metrics: ServingMetrics,
        repository_enabled: bool = False,
        payload_logger: PayloadLogger | None = None,
        max_receive_bytes: int = 1 << 20,
        grace_period: float = 5,
    ):
        self.host, self.port = host, port
        self.grace_period = grace_period
        self.options = [
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_LENGTH),
            ("grpc.so_reuseport", 0),
        ]
        self.interceptor = AccountingInterceptor(metrics)
        self.servicer = KubeloopServicer(
            dataplane, repository_extension, repository_enabled=repository_enabled, payload_logger=payload_logger
        )
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Bind and start serving, on the running event loop; raises OSError when the address cannot be bound."""
        self.server = grpc.aio.server(interceptors=[self.interceptor], options=self.options)
        add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind to address"; its log line before says why
            raise OSError(f"--grpc-port: cannot listen on {address}: is the port in use?") from None
        await self.server.start()
        event(log, "grpc.started", host=self.host, port=self.port)

    async def stop(self, sig: int | None = None) -> None:
        """Stop accepting calls; calls in flight get `grace_period` seconds (kserve's GRPCServer.stop signature)."""
        if self.server is not None:
            await self.server.stop(grace=self.grace_period)


async def start_grpc_server(
    host: str,
    port: int,
    dataplane: DataPlane,
    repository_extension: ModelRepositoryExtension,
    *,
    metrics: ServingMetrics,
    repository_enabled: bool,
    payload_logger: PayloadLogger | None,
    max_receive_bytes: int,
    grace_period: float,
) -> InferenceGRPCServer:
    """An InferenceGRPCServer listening on host:port once this returns (port 0: any free one, then `.port`)."""
    server = InferenceGRPCServer(
        host,
        port,
        dataplane,
        repository_extension,
        metrics=metrics,
        repository_enabled=repository_enabled,
        payload_logger=payload_logger,
        max_receive_bytes=max_receive_bytes,
        grace_period=grace_period,
    )
    await server.start()
    return server
