"""The kserve.Model that serves a ModelVersion: its artifact (network + the fitted transform from training), input
validation against its signature, both inference protocols, kubeloop's metrics, an optional prediction cache.

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
import pandas as pd
from kserve.errors import InferenceError
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from kubeloop.api.modelversion import ModelVersion
from kubeloop.artifact import ModelArtifact
from kubeloop.errors import KubeloopError
from kubeloop.log import event
from serving.cache import PredictionCache, read_rows, row_keys
from serving.metrics import ServingMetrics
from serving.validation import DEFAULT_MAX_BATCH, V2_DATATYPES, Batch, InvalidRequest, SignatureValidator

OUTPUT = "probability"
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
    ):
        super().__init__(name)
        self.merge_requests = merge_requests
        self.record = record
        self.version = record.spec.version
        self.features = list(record.spec.signature.inputs)
        self.names = [f.name for f in self.features]
        self.validator = SignatureValidator(self.features, max_batch)
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
        self.artifact = artifact
        if self.metrics is None:
            stats = {f.name: (f.mean, f.std) for f in artifact.transform.features if f.categories is None}
            self.metrics = ServingMetrics(self.record.spec.model, self.version, self.features, stats)
        if self.cache is not None and self.cache_file:
            self._preload_cache(self.cache_file)
        self.ready = True
        return self.ready

    def _preload_cache(self, path: str) -> None:
        rows = [{name: _native(row.get(name)) for name in self.names} for row in read_rows(path)]
        for start in range(0, len(rows), self.validator.max_batch):
            try:
                batch = self.validator.from_v1({"instances": rows[start : start + self.validator.max_batch]})
            except InvalidRequest as error:
                raise KubeloopError(f"--cache-file {path}: rows from {start}: {error}") from None
            self.cache.preload(row_keys(batch.columns, self.names), self._forward(batch.columns))
        self._update_cache_gauges()
        event(log, "cache.preloaded", rows=len(rows), keys=len(self.cache.static), mode=self.cache.mode)

    # ---- metadata (GET /v2/models/{name})
    def get_input_types(self) -> list[dict]:
        return [{"name": f.name, "datatype": V2_DATATYPES[f.dtype][0], "shape": [-1]} for f in self.features]

    def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}]

    # ---- the kserve handlers
    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Batch:
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
        probabilities = await self._submit(batch) if self.merge_requests else self._compute_one(batch)
        if batch.protocol == "v1":
            return {"predictions": probabilities.tolist()}
        request = batch.request
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=str(self.version),
            infer_outputs=[InferOutput(name=OUTPUT, shape=[batch.rows], datatype="FP32", data=probabilities)],
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
        except Exception:
            log.exception("model call failed on a request of %d rows", batch.rows)
            raise InferenceError("the model failed on this request; see the server log") from None

    def _run_group(self, group: Sequence[tuple[Batch, asyncio.Future]]) -> None:
        live = [(batch, future) for batch, future in group if not future.done()]  # a cancelled request is skipped
        if not live:
            return
        try:
            results = self._compute([batch for batch, _ in live])
        except Exception:
            if len(live) == 1:
                log.exception("model call failed on a request of %d rows", live[0][0].rows)
                live[0][1].set_exception(InferenceError("the model failed on this request; see the server log"))
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
        probabilities = self._forward(columns) if self.cache is None else self._cached_forward(columns)
        self.metrics.observe_batch(columns, probabilities)
        if len(batches) == 1:
            return [probabilities]
        offsets = np.cumsum([b.rows for b in batches])[:-1]
        return np.split(probabilities, offsets)

    def _forward(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The trained model on validated rows: ModelArtifact.predict (the fitted transform, then the net)."""
        frame = pd.DataFrame({name: columns[name] for name in self.names}, copy=False)
        return self.artifact.predict(frame).astype(np.float32, copy=False)

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


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
