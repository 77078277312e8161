"""The Ray Data actor that scores a BatchPrediction's batches: check, predict, write, and report in one row.

Each actor loads the model artifact once. Per batch it checks the rows against the signature
(`signature_check`), runs the passing rows through the model's own transform and network
(`ModelArtifact.predict_columns`), and writes two Parquet files into the run's staging directory: the scored rows
(the carried columns, then the prediction) and the rejected rows (the row as read, plus ``reason``). It returns
one summary row (file names, counts, drift counts) instead of the data, so the driver's memory does not grow
with the input; a file whose summary never reached the driver (an attempt that died) is deleted at the end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kubeloop.api.modelversion import Feature, Signature
from kubeloop.artifact import ModelArtifact
from kubeloop.batch.drift import Bins, bool_text
from kubeloop.batch.signature_check import REASON, check_rows

REJECTED_DIR = "_rejected"  # a leading underscore: Parquet readers of OUTPUT (pandas, pyarrow, Spark) skip it
PROBABILITY, PROBABILITIES, VALUE, PREDICTION = "probability", "probabilities", "value", "prediction"
NUMBER_TYPES = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
SUMMARY = pa.schema(
    [
        ("part", pa.string()),
        ("rejected_part", pa.string()),
        ("rows", pa.int64()),
        ("scored", pa.int64()),
        ("reasons", pa.string()),  # JSON {reason: rows}
        ("out_of_range", pa.string()),  # JSON {feature: rows}
        ("counts", pa.string()),  # JSON {feature: [count per drift bin]}
    ]
)


def output_columns(signature: Signature) -> list[str]:
    """The prediction's columns, named as the model server names its outputs (serving.model.OUTPUTS), plus the
    predicted class."""
    if signature.task == "binary":
        return [PROBABILITY, PREDICTION]
    if signature.task == "multiclass":
        return [PROBABILITIES, PREDICTION]
    return [VALUE]


def prediction_columns(signature: Signature, outputs: np.ndarray) -> dict[str, pa.Array]:
    """Binary: P(positive class) and whether it is the predicted class (P >= 0.5, evaluation's cut-off);
    multiclass: the probabilities in the order of signature.classes and the most probable class; regression: the
    value in the label's units."""
    if signature.task == "binary":
        return {PROBABILITY: pa.array(outputs, pa.float32()), PREDICTION: pa.array(outputs >= 0.5)}
    if signature.task == "multiclass":
        classes = np.asarray(signature.classes, dtype=object)
        flat = pa.array(outputs.reshape(-1), pa.float32())
        return {
            PROBABILITIES: pa.FixedSizeListArray.from_arrays(flat, outputs.shape[1]),
            PREDICTION: pa.array(classes[outputs.argmax(axis=1)], pa.string()),
        }
    return {VALUE: pa.array(outputs, pa.float32())}


class BatchScorer:
    def __init__(
        self,
        artifact_uri: str,
        signature: dict,
        carry: Sequence[str],
        staging: str,
        bins: Sequence[Bins],
    ) -> None:
        # one thread per actor: its CPUs are the actor's (Ray sets OMP_NUM_THREADS=1 in workers; torch may not
        # follow it when imported before), and more threads than cores only spin against each other
        torch.set_num_threads(1)
        self.artifact = ModelArtifact.load(artifact_uri)
        self.signature = Signature.model_validate(signature)
        self.features: list[Feature] = list(self.signature.inputs)
        self.scales = {f.name: (f.mean, f.std) for f in self.artifact.transform.features if f.categories is None}
        self.carry = list(carry)
        self.fs, self.staging = fsspec.core.url_to_fs(staging)
        self.bins = list(bins)
        self.dtypes = {f.name: f.dtype for f in self.features}

    def __call__(self, table: pa.Table) -> pa.Table:
        checked = check_rows(table, self.features, self.scales)
        ok = checked.ok
        scored = int(ok.sum())
        part = ""
        if scored:
            outputs = self.artifact.predict_columns(checked.columns)
            finite = np.isfinite(outputs) if outputs.ndim == 1 else np.isfinite(outputs).all(axis=1)
            if not finite.all():
                # the float32 network overflowed (inputs far outside the training data): set aside, as the server
                # refuses to answer these
                rows = np.flatnonzero(ok)[~finite]
                checked.reasons[rows] = "non_finite_output"
                ok[rows] = False
                outputs = outputs[finite]
                checked.columns = {name: values[finite] for name, values in checked.columns.items()}
                scored = int(ok.sum())
        if scored:
            predictions = prediction_columns(self.signature, outputs)
            part = self._write(self._carried(table, ok, checked.columns), predictions, "")
        rejected_part = ""
        if scored < table.num_rows:
            rejected = table.filter(pa.array(~ok))
            reasons = pa.array(checked.reasons[~ok], pa.string())
            rejected_part = self._write(rejected, {REASON: reasons}, REJECTED_DIR)
        reason_counts = dict(zip(*np.unique(checked.reasons[~ok].astype(str), return_counts=True), strict=True))
        counts = {bins.feature: self._count(bins, checked.columns[bins.feature]).tolist() for bins in self.bins}
        return pa.Table.from_pylist(
            [
                {
                    "part": part,
                    "rejected_part": rejected_part,
                    "rows": table.num_rows,
                    "scored": scored,
                    "reasons": json.dumps({str(k): int(v) for k, v in reason_counts.items()}),
                    "out_of_range": json.dumps(checked.out_of_range),
                    "counts": json.dumps(counts),
                }
            ],
            schema=SUMMARY,
        )

    def _carried(self, table: pa.Table, ok: np.ndarray, features: dict[str, np.ndarray]) -> pa.Table:
        """The carried columns of the scored rows; a numeric feature read as text (a CSV's) as its checked number."""
        carried = table.select(self.carry).filter(pa.array(ok))
        for i, name in enumerate(self.carry):
            dtype = self.dtypes.get(name)
            if dtype in NUMBER_TYPES and pa.types.is_string(carried.schema.field(i).type):
                carried = carried.set_column(
                    i, name, pa.array(features[name], from_pandas=True).cast(NUMBER_TYPES[dtype])
                )
        return carried

    def _count(self, bins: Bins, values: np.ndarray) -> np.ndarray:
        return bins.count(bool_text(values) if self.dtypes[bins.feature] == "bool" else values)

    def _write(self, table: pa.Table, more: dict[str, pa.Array], directory: str) -> str:
        for name, values in more.items():
            table = table.append_column(name, values)
        name = f"{directory}/part-{uuid.uuid4().hex}.parquet".lstrip("/")
        with self.fs.open(f"{self.staging}/{name}", "wb") as stream:
            pq.write_table(table, stream)
        return name
