"""The kserve.Model that serves a ModelVersion: its artifact (network + the fitted transform from training), input
validation against its signature, both inference protocols, kubeloop's metrics, an optional prediction cache.

What it answers per row follows the signature's task (`ModelArtifact.predict`): binary, P(positive class), output
`probability` of shape [n]; multiclass, one probability per class in the order of `spec.signature.classes`, output
`probabilities` of shape [n, classes] (v2 data row-major, as the Open Inference Protocol flattens tensors; v1 one
list per row); regression, the value in the label's units, output `value` of shape [n]. An output that is not finite
(NaN or inf: inputs far outside the training data can overflow the float32 network) is never answered as a 200.

Concurrent requests are merged into one model call (KServe's batcher idea, without its wait): a request's rows are
queued and the first request of an event-loop turn schedules one flush for the turn after, so the rows of every
request that reached the model in between go through `ModelArtifact.predict` (the trained transform, then
the network) together. An idle server adds no delay; a busy one pays the transform's fixed cost once per turn.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import kserve
import numpy as np
import orjson
from kserve.errors import InferenceError
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from kubeloop.api.modelversion import ModelVersion, Task
from kubeloop.artifact import ModelArtifact
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from serving.cache import PredictionCache, read_rows, row_keys
from serving.metrics import ServingMetrics
from serving.validation import (
    DEFAULT_MAX_BATCH,
    V2_DATATYPES,
    Batch,
    InvalidRequest,
    OutOfRange,
    SignatureValidator,
)

OUTPUTS: dict[Task, str] = {"binary": "probability", "multiclass": "probabilities", "regression": "value"}
MAX_MERGED_ROWS = 4096

log = logging.getLogger("kubeloop.serving.model")


class KubeloopModel(kserve.Model):
    def __init__(
        self,
        name: str,
        record: ModelVersion,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache: PredictionCache | None = None,
        cache_file: str | None = None,
        metrics: ServingMetrics | None = None,
        merge_requests: bool = True,
        out_of_range: OutOfRange = "count",
    ):
        super().__init__(name)
        self.merge_requests = merge_requests
        self.record = record
        self.version = record.spec.version
        signature = record.spec.signature
        self.task, self.classes = signature.task, list(signature.classes or [])
        self.output = OUTPUTS[self.task]
        self.features = list(signature.inputs)
        self.names = [f.name for f in self.features]
        self.out_of_range = out_of_range
        self.validator = SignatureValidator(self.features, max_batch, out_of_range=out_of_range)
        self.cache, self.cache_file = cache, cache_file
        self.metrics = metrics
        self.artifact: ModelArtifact | None = None
        self._pending: list[tuple[Batch, asyncio.Future]] = []
        self._reported_hits = {"static": 0, "dynamic": 0}
        self._flush_scheduled = False

    # ---- lifecycle
    def load(self) -> bool:
        artifact = ModelArtifact.load(self.record.spec.artifact_uri)
        trained = artifact.transform.feature_names
        if sorted(trained) != sorted(self.names):
            raise KubeloopError(
                f"{self.record.metadata.name}: the signature's inputs {self.names} differ from the features the "
                f"artifact's transform was fitted on {trained}"
            )
        transform = artifact.transform
        if (transform.task, transform.classes or []) != (self.task, self.classes):
            raise KubeloopError(
                f"{self.record.metadata.name}: spec.signature.task {self.task} (classes {self.classes}) differs from "
                f"the artifact's transform: task {transform.task} (classes {transform.classes or []})"
            )
        self.artifact = artifact
        stats = {f.name: (f.mean, f.std) for f in transform.features if f.categories is None}
        self.validator = SignatureValidator(
            self.features, self.validator.max_batch, out_of_range=self.out_of_range, scales=stats
        )
        if self.metrics is None:
            self.metrics = ServingMetrics(
                self.record.spec.model,
                self.version,
                self.features,
                stats,
                task=self.task,
                classes=self.classes,
                label_stats=(transform.label_mean, transform.label_std),
            )
        if self.cache is not None and self.cache_file:
            self._preload_cache(self.cache_file)
        self.ready = True
        return self.ready

    def _preload_cache(self, path: str) -> None:
        rows = [{name: _native(row.get(name)) for name in self.names} for row in read_rows(path)]
        for start in range(0, len(rows), self.validator.max_batch):
            try:
                batch = self.validator.from_v1({"instances": rows[start : start + self.validator.max_batch]})
                self.validator.check_ranges(batch)  # clipped as requests are, so their keys meet
                outputs = _check_finite(self._forward(batch.columns))
            except (InvalidRequest, InferenceError) as error:
                raise KubeloopError(f"--cache-file {path}: rows from {start}: {error}") from None
            self.cache.preload(row_keys(batch.columns, self.names), outputs)
        self._update_cache_gauges()
        event(log, "cache.preloaded", rows=len(rows), keys=len(self.cache.static), mode=self.cache.mode)

    # ---- metadata (GET /v2/models/{name})
    def get_input_types(self) -> list[dict]:
        return [{"name": f.name, "datatype": V2_DATATYPES[f.dtype][0], "shape": [-1]} for f in self.features]

    def get_output_types(self) -> list[dict]:
        """The task's output; a multiclass one's columns follow spec.signature.classes (kserve's metadata has no
        field to name them)."""
        shape = [-1, len(self.classes)] if self.task == "multiclass" else [-1]
        return [{"name": self.output, "datatype": "FP32", "shape": shape}]

    # ---- the kserve handlers
    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Batch:
        batch = self._parse(payload)
        outside = self.validator.check_ranges(batch)
        if outside:
            self.metrics.count_out_of_range(outside)
        return batch

    def _parse(self, payload: Any) -> Batch:
        if isinstance(payload, InferRequest):
            return self.validator.from_v2(payload)
        if isinstance(payload, dict):
            return self.validator.from_v1(payload)
        if isinstance(payload, bytes | str):  # kserve passes bodies of non-JSON content types through as they are
            try:
                return self.validator.from_v1(orjson.loads(payload))
            except orjson.JSONDecodeError as error:
                raise InvalidRequest("invalid_json", f"body: invalid JSON ({error})") from None
        raise InvalidRequest("invalid_json", f"body: expected a JSON object, got {type(payload).__name__}")

    def validate(self, payload: Any) -> Any:
        return payload  # validated against the signature in preprocess

    async def predict(self, batch: Batch, headers: dict[str, str] | None = None) -> dict | InferResponse:
        outputs = await self._submit(batch) if self.merge_requests else self._compute_one(batch)
        if batch.protocol == "v1":
            return {"predictions": outputs.tolist()}
        request = batch.request
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=str(self.version),
            infer_outputs=[InferOutput(name=self.output, shape=list(outputs.shape), datatype="FP32", data=outputs)],
            requested_outputs=request.request_outputs,
        )

    # ---- batching
    def _submit(self, batch: Batch) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((batch, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        group: list[tuple[Batch, asyncio.Future]] = []
        rows = 0
        for item in pending:
            if group and rows + item[0].rows > MAX_MERGED_ROWS:
                self._run_group(group)
                group, rows = [], 0
            group.append(item)
            rows += item[0].rows
        if group:
            self._run_group(group)

    def _compute_one(self, batch: Batch) -> np.ndarray:
        try:
            return self._compute([batch])[0]
        except Exception as error:
            raise _failure(error, batch.rows) from None

    def _run_group(self, group: Sequence[tuple[Batch, asyncio.Future]]) -> None:
        live = [(batch, future) for batch, future in group if not future.done()]  # a cancelled request is skipped
        if not live:
            return
        try:
            results = self._compute([batch for batch, _ in live])
        except Exception as error:
            if len(live) == 1:
                live[0][1].set_exception(_failure(error, live[0][0].rows))
                return
            for item in live:  # isolate the request that fails
                self._run_group([item])
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _compute(self, batches: Sequence[Batch]) -> list[np.ndarray]:
        if len(batches) == 1:
            columns = batches[0].columns
        else:
            columns = {name: np.concatenate([b.columns[name] for b in batches]) for name in self.names}
        outputs = self._forward(columns) if self.cache is None else self._cached_forward(columns)
        _check_finite(outputs)
        self.metrics.observe_batch(columns, outputs)
        if len(batches) == 1:
            return [outputs]
        offsets = np.cumsum([b.rows for b in batches])[:-1]
        return np.split(outputs, offsets)  # along the rows: a multiclass request keeps its [rows, classes]

    def _forward(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The trained model on validated rows: ModelArtifact.predict_columns (the fitted transform, then the net;
        no DataFrame on the request path)."""
        return self.artifact.predict_columns(columns).astype(np.float32, copy=False)

    def _cached_forward(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        cache = self.cache
        keys = row_keys(columns, self.names)
        found, misses = cache.lookup(keys)
        if misses:
            index = np.asarray(misses)
            computed = self._forward({name: columns[name][index] for name in self.names}).tolist()
            cache.store([keys[i] for i in misses], computed)
            for i, value in zip(misses, computed, strict=True):
                found[i] = value
        self._update_cache_gauges(len(misses))
        return np.asarray(found, dtype=np.float32)

    def _update_cache_gauges(self, misses: int = 0) -> None:
        metrics, cache = self.metrics, self.cache
        labels = (metrics.model, metrics.version)
        for tier, reported in self._reported_hits.items():
            if cache.hits[tier] > reported:
                metrics.cache_hits.labels(*labels, tier).inc(cache.hits[tier] - reported)
                self._reported_hits[tier] = cache.hits[tier]
        if misses:
            metrics.cache_misses.inc(misses)
        metrics.cache_entries.labels(*labels, "static").set(len(cache.static))
        metrics.cache_entries.labels(*labels, "dynamic").set(len(cache.dynamic))


def _check_finite(outputs: np.ndarray) -> np.ndarray:
    finite = np.isfinite(outputs) if outputs.ndim == 1 else np.isfinite(outputs).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise InferenceError(
            f"the model's output is not finite (NaN or inf) for {len(rows)} row(s) of this request, the first "
            f"{rows[:5].tolist()}: inputs far outside the training data's range overflow its float32 arithmetic"
        )
    return outputs


def _failure(error: Exception, rows: int) -> InferenceError:
    """What a request whose model call failed is answered (HTTP 500): an InferenceError as raised, else a generic
    one, the traceback in the log. Called in the except block."""
    if isinstance(error, InferenceError):
        event(log, "request.failed", logging.WARNING, rows=rows, error=str(error))
        return error
    log.exception("model call failed on a request of %d rows", rows)
    return InferenceError("the model failed on this request; see the server log")


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
