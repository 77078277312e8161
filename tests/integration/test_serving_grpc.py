"""The model server over gRPC: a real `python -m serving.server --grpc-port N` process driven with kserve's own gRPC
client (`kserve.InferenceGRPCClient`) and, for what that client cannot send (malformed messages, the repository
RPCs, model metadata), the GRPCInferenceService stub kserve generates. One in-process test serves a model whose
network fails, through `serving.grpc.InferenceGRPCServer`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from kubeloop.api.load import load_resources
from kubeloop.processes import free_port
from tests.support.serving_fixtures import (
    arrests_frame,
    launch_server,
    launch_sink,
    record_path,
    rows,
    scrape,
    start_all,
    stop_all,
)
from tests.support.serving_requests import FEATURES, MAX_BODY, V2_TYPES

pytestmark = pytest.mark.integration

FIELD_FIRST = re.compile(r"^(inputs|raw_input_contents)\b")


@pytest.fixture(scope="module")
def grpc_processes(serving_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sink and a model server with gRPC on, logging payloads to the sink."""
    logs = tmp_path_factory.mktemp("serving-grpc")
    (sink,) = start_all(launch_sink(logs / "sink.log"))
    port = free_port()
    try:
        (server,) = start_all(
            launch_server(
                record_path(serving_home, 1),
                logs / "server.log",
                "--grpc-port", str(port),
                "--logger-url", f"{sink.url}/",
                "--max-body-bytes", str(MAX_BODY),
                env={"KUBELOOP_HOME": str(serving_home)},
            )
        )  # fmt: skip
    except BaseException:
        sink.stop()
        raise
    yield {"server": server, "sink": sink, "grpc": f"127.0.0.1:{port}"}
    stop_all(server, sink)


@pytest.fixture(scope="module")
def target(grpc_processes: dict[str, Any]) -> str:
    return grpc_processes["grpc"]


@pytest.fixture(scope="module")
def http_url(grpc_processes: dict[str, Any]) -> str:
    return grpc_processes["server"].url


@pytest.fixture(scope="module")
def stub(target: str):
    """kserve's generated GRPCInferenceService stub on a plain channel: messages the client would not build."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield GRPCInferenceServiceStub(channel)


def infer_request(instances: list[dict], *, request_id: str = "", **override: tuple[str, list]) -> InferRequest:
    """A v2 request of the rows, one tensor per feature (BYTES for strings, INT64 else); `override` replaces a
    feature's (datatype, data) or, for a name not a feature, adds a tensor."""
    tensors = {name: (V2_TYPES.get(name, "INT64"), [row[name] for row in instances]) for name in FEATURES}
    tensors.update(override)
    inputs = [InferInput(name, [len(data)], datatype, data) for name, (datatype, data) in tensors.items()]
    return InferRequest(model_name="arrests", infer_inputs=inputs, request_id=request_id or None)


async def grpc_infer(target: str, request: InferRequest, headers: tuple = ()):
    async with InferenceGRPCClient(target, timeout=30) as client:
        return await client.infer(request, headers=headers)


def grpc_error(target: str, request: InferRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(grpc_infer(target, request))
    return caught.value


def metrics(http_url: str) -> str:
    return httpx.get(f"{http_url}/metrics", timeout=30).text


# ---------------------------------------------------------------- the served model is the trained model
def test_grpc_predictions_with_string_features_equal_the_artifact(target, artifact):
    frame = arrests_frame()
    instances = rows(frame, 100, start=300)
    expected = artifact.predict(frame.drop(columns=["released"]).iloc[300:400])
    response = asyncio.run(grpc_infer(target, infer_request(instances, request_id="grpc-1")))
    assert response.id == "grpc-1"
    assert response.model_version == "1"
    (output,) = response.outputs
    assert (output.name, output.datatype, output.shape) == ("probability", "FP32", [100])
    np.testing.assert_allclose(output.as_numpy(), expected, rtol=0, atol=1e-6)


def test_grpc_numpy_inputs_sent_as_raw_contents_are_decoded(target, artifact):
    """kserve's client sends numpy data as raw_input_contents (BYTES as length-prefixed elements)."""
    frame = arrests_frame().iloc[:20]
    inputs = []
    for name in FEATURES:
        tensor = InferInput(name, [20], V2_TYPES.get(name, "INT64"))
        values = frame[name].to_numpy(dtype=object if name in V2_TYPES else np.int64)
        tensor.set_data_from_numpy(values, binary_data=True)
        inputs.append(tensor)
    response = asyncio.run(grpc_infer(target, InferRequest(model_name="arrests", infer_inputs=inputs)))
    expected = artifact.predict(frame.drop(columns=["released"]))
    np.testing.assert_allclose(response.outputs[0].as_numpy(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- refusals: INVALID_ARGUMENT, the field first
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"height": ("INT64", [180])}, "inputs[7] ('height'): unknown feature; the model takes colour:string"),
        ({"age": ("FP32", [21.5])}, "inputs[2] ('age').datatype: expected INT64/"),
        ({"colour": ("INT64", [1])}, "inputs[0] ('colour').datatype: expected BYTES for a feature of type string"),
        ({"colour": ("BYTES", [b"\xff\xfe"])}, "inputs[0] ('colour').data[0]: expected UTF-8 text"),
        ({"age": ("INT64", [21, 22])}, "inputs[2] ('age').shape: 2 rows, but input 'colour' has 1 rows"),
    ],
    ids=["unknown-feature", "wrong-datatype", "number-for-string", "not-utf8", "rows-differ"],
)
def test_grpc_invalid_request_is_invalid_argument_naming_the_field(target, override, message):
    error = grpc_error(target, infer_request(rows(arrests_frame(), 1), **override))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(message), error.details()


def test_grpc_datatype_outside_the_protocol_names_the_input(stub):
    request = pb.ModelInferRequest(
        model_name="arrests",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="age", datatype="INT65", shape=[1])],
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("inputs[0] ('age').datatype: 'INT65' is not an Open Inference Protocol")


def test_grpc_message_over_the_body_limit_is_refused(target):
    """--max-body-bytes holds for gRPC messages too: gRPC refuses a larger one before the model sees it."""
    error = grpc_error(target, infer_request(rows(arrests_frame(), 1), colour=("BYTES", ["x" * (MAX_BODY + 1)])))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- metrics and payload events
def test_grpc_requests_are_counted_by_status_and_reason(target, http_url):
    before = metrics(http_url)
    instances = rows(arrests_frame(), 2)

    async def traffic() -> None:
        async with InferenceGRPCClient(target, timeout=30) as client:
            for _ in range(3):
                await client.infer(infer_request(instances))
            with pytest.raises(grpc.aio.AioRpcError):
                await client.infer(infer_request(instances, height=("INT64", [1, 2])))

    asyncio.run(traffic())
    after = metrics(http_url)

    def delta(name: str, **labels: str) -> float:
        return scrape(after, name, **labels) - scrape(before, name, **labels)

    grpc_ok = {"model": "arrests", "version": "1", "protocol": "grpc", "code": "OK"}
    assert delta("kubeloop_requests_total", **grpc_ok) == 3
    assert delta("kubeloop_request_duration_seconds_count", **grpc_ok) == 3
    assert delta("kubeloop_requests_total", protocol="grpc", code="INVALID_ARGUMENT") == 1
    assert delta("kubeloop_request_errors_total", model="arrests", reason="unknown_feature") == 1
    assert delta("kubeloop_feature_category_total", feature="colour") == 6  # the 3 answered requests' rows


def test_grpc_requests_are_logged_to_the_sink_as_v2_json(target, grpc_processes):
    sink = grpc_processes["sink"]
    instances = rows(arrests_frame(), 2, start=7)
    response = asyncio.run(grpc_infer(target, infer_request(instances, request_id="r-9"), headers=(("ce-id", "g-9"),)))
    deadline = time.monotonic() + 10
    found: dict[str, dict] = {}
    while len(found) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        for kept in httpx.get(f"{sink.url}/events", timeout=30).json():
            event = kept.get("event", {})  # the sink keeps each event of a CloudEvents batch on its own
            if event.get("id") == "g-9":
                found[event["type"]] = event
    request = found["org.kubeflow.serving.inference.request"]
    answer = found["org.kubeflow.serving.inference.response"]
    assert request["datacontenttype"] == "application/json"
    tensors = {t["name"]: t for t in request["data"]["inputs"]}
    assert tensors["colour"] == {
        "name": "colour",
        "shape": [2],
        "datatype": "BYTES",
        "data": [row["colour"] for row in instances],
    }
    assert tensors["age"]["data"] == [row["age"] for row in instances]
    (output,) = answer["data"]["outputs"]
    assert output["name"] == "probability"
    np.testing.assert_allclose(output["data"], response.outputs[0].as_numpy(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- the repository extension and metadata
@pytest.mark.parametrize("rpc", ["RepositoryModelLoad", "RepositoryModelUnload"])
def test_grpc_repository_rpcs_are_refused_by_default(stub, target, rpc):
    message = getattr(pb, f"{rpc}Request")(model_name="arrests")
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, rpc)(message, timeout=30)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--enable-repository" in caught.value.details()
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
    assert asyncio.run(grpc_infer(target, infer_request(rows(arrests_frame(), 1)))).outputs[0].shape == [1]


def test_grpc_model_metadata_lists_the_served_version(stub):
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="arrests"), timeout=30)
    assert list(metadata.versions) == ["1"]
    assert {(t.name, t.datatype) for t in metadata.inputs} == {(name, V2_TYPES.get(name, "INT64")) for name in FEATURES}
    assert list(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30).extensions) == []
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- the fuzz pass
def test_grpc_fuzz_never_answers_internal(stub, target, http_url):
    """Hypothesis-generated ModelInferRequests (names, datatypes, shapes, contents, raw contents): each answered OK
    or INVALID_ARGUMENT with the field first, none INTERNAL or UNKNOWN; the server answers normally after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    datatypes = st.sampled_from(["BOOL", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES", "x"])
    contents = st.one_of(
        st.builds(pb.InferTensorContents, bool_contents=st.lists(st.booleans(), max_size=4)),
        st.builds(pb.InferTensorContents, int64_contents=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)),
        st.builds(pb.InferTensorContents, int_contents=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)),
        st.builds(pb.InferTensorContents, uint64_contents=st.lists(st.integers(0, 2**64 - 1), max_size=4)),
        st.builds(pb.InferTensorContents, fp32_contents=st.lists(st.floats(width=32), max_size=4)),
        st.builds(pb.InferTensorContents, fp64_contents=st.lists(st.floats(), max_size=4)),
        st.builds(pb.InferTensorContents, bytes_contents=st.lists(st.binary(max_size=8), max_size=4)),
    )
    tensor = st.builds(
        pb.ModelInferRequest.InferInputTensor,
        name=st.one_of(st.sampled_from(FEATURES), st.text(max_size=6)),
        datatype=datatypes,
        shape=st.lists(st.integers(-2, 5), max_size=3),
        contents=contents,
    )

    def typed(name: str, values: list) -> pb.ModelInferRequest.InferInputTensor:
        if name in V2_TYPES:
            contents = pb.InferTensorContents(bytes_contents=[v.encode() for v in values])
        else:
            contents = pb.InferTensorContents(int64_contents=values)
        datatype = V2_TYPES.get(name, "INT64")
        return pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=[len(values)], contents=contents
        )

    def values(name: str, n: int) -> st.SearchStrategy[list]:  # any text (unseen categories), numbers near and far
        value = st.text(max_size=8) if name in V2_TYPES else st.integers(-(10**4), 10**4)
        return st.lists(value, min_size=n, max_size=n)

    well_typed = st.integers(1, 4).flatmap(
        lambda n: st.tuples(*(values(name, n).map(lambda data, name=name: typed(name, data)) for name in FEATURES))
    )
    one_replaced = st.builds(  # a well-typed request with one tensor replaced: reaches the later checks
        lambda tensors, k, replacement: [replacement if i == k else t for i, t in enumerate(tensors)],
        well_typed,
        st.integers(0, len(FEATURES) - 1),
        tensor,
    )
    anything = st.builds(
        lambda inputs, raw: pb.ModelInferRequest(model_name="arrests", inputs=inputs, raw_input_contents=raw),
        st.lists(tensor, max_size=8),
        st.one_of(st.just([]), st.lists(st.binary(max_size=24), max_size=8)),
    )
    requests = st.one_of(
        anything,
        st.builds(lambda inputs: pb.ModelInferRequest(model_name="arrests", inputs=inputs), well_typed),
        st.builds(lambda inputs: pb.ModelInferRequest(model_name="arrests", inputs=inputs), one_replaced),
    )
    seen: dict[str, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request=requests)
    def check(request: pb.ModelInferRequest) -> None:
        try:
            stub.ModelInfer(request, timeout=30)
            seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as error:
            code = error.code()
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, error.details(), request)
            assert FIELD_FIRST.match(error.details()), (error.details(), request)

    before = metrics(http_url)
    check()
    after = metrics(http_url)
    assert sum(seen.values()) >= 300 and seen.get("OK", 0) > 30 and seen.get("INVALID_ARGUMENT", 0) > 100, seen
    grpc_calls = scrape(after, "kubeloop_requests_total", protocol="grpc") - scrape(
        before, "kubeloop_requests_total", protocol="grpc"
    )
    assert grpc_calls == sum(seen.values())
    assert scrape(after, "kubeloop_request_errors_total", reason="internal") == 0
    assert asyncio.run(grpc_infer(target, infer_request(rows(arrests_frame(), 3)))).outputs[0].shape == [3]


# ---------------------------------------------------------------- a model failure, in process
def test_grpc_model_failure_is_internal_and_counted(serving_home):
    """A network that raises: INTERNAL with kubeloop's message (kserve's interceptor would answer INVALID_ARGUMENT),
    counted as model_error, the request handed to the payload logger without a response."""
    import torch
    from kserve.model_repository import ModelRepository
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.app import KubeloopDataPlane
    from serving.grpc import InferenceGRPCServer
    from serving.metrics import ServingMetrics
    from serving.model import KubeloopModel

    record = load_resources(record_path(serving_home, 1))[0]
    registry = CollectorRegistry()
    features = list(record.spec.signature.inputs)
    model = KubeloopModel("arrests", record, metrics=ServingMetrics("arrests", 1, features, registry=registry))
    model.load()

    class Broken(torch.nn.Module):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the network broke")

    model.artifact.model = Broken()
    repository = ModelRepository()
    repository.update(model)
    dataplane = KubeloopDataPlane(repository, repository_enabled=False)

    logged: list[tuple] = []

    class Recorder:  # stands in for the PayloadLogger: what the server hands it
        def log(self, *event: object) -> None:
            logged.append(event)

    async def run() -> grpc.aio.AioRpcError:
        server = InferenceGRPCServer(
            "127.0.0.1",
            0,
            dataplane,
            ModelRepositoryExtension(repository),
            metrics=model.metrics,
            payload_logger=Recorder(),
        )
        await server.start()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await grpc_infer(f"127.0.0.1:{server.port}", infer_request(instances), (("ce-id", "fail-1"),))
            return caught.value
        finally:
            await server.stop()

    instances = rows(arrests_frame(), 2)
    colours = [row["colour"] for row in instances]
    error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "the model failed on this request; see the server log"
    text = generate_latest(registry).decode()
    assert scrape(text, "kubeloop_requests_total", protocol="grpc", code="INTERNAL") == 1
    assert scrape(text, "kubeloop_request_errors_total", reason="model_error") == 1
    ((ce_id, request, response, content_type),) = logged  # as REST logs a 5xx: the request, no response
    assert (ce_id, response, content_type) == ("fail-1", None, "application/json")
    assert json.loads(request)["inputs"][0] == {"name": "colour", "shape": [2], "datatype": "BYTES", "data": colours}
