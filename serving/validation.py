"""Request validation against a ModelVersion's input signature, before the model runs.

Both protocols end in the same `Batch`: one column per signature feature, numeric columns as float64 with NaN for
nulls and string columns as object arrays with None for nulls, i.e. what `TabularTransform.transform_columns`
takes. Every rejection is an `InvalidRequest` (a `kserve.errors.InvalidInput`, so kserve answers 400) whose
message starts with the field it is about and whose `kind` labels the error metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from kserve.errors import InvalidInput

from kubeloop.api.modelversion import Feature

# Open Inference Protocol datatypes each signature dtype accepts (the first is the one the metadata announces)
V2_DATATYPES: dict[str, tuple[str, ...]] = {
    "float": ("FP32", "FP64", "FP16"),
    "int": ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8"),
    "bool": ("BOOL",),
    "string": ("BYTES",),
}
DEFAULT_MAX_BATCH = 1024
OutOfRange = Literal["count", "clip", "reject"]
# a value this many training standard deviations from the training mean is refused whatever the policy: no network
# computes it meaningfully in float32 (1e200 overflows to inf in the transform)
ABSURD_STDS = 1e6


class InvalidRequest(InvalidInput):
    """A request the signature rejects; `kind` is the reason label of kubeloop_request_errors_total."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Batch:
    rows: int
    columns: dict[str, np.ndarray]
    protocol: str = "v1"
    request: Any = field(default=None, repr=False)  # the kserve InferRequest of a v2 call (id, requested outputs)
    positions: dict[str, int] = field(default_factory=dict, repr=False)  # v2: each feature's index in inputs

    def where(self, name: str, row: int) -> str:
        """The request field of one value, as the rejections name it."""
        if self.protocol == "v1":
            return f"instances[{row}].{name}"
        return f"inputs[{self.positions[name]}] ({name!r}).data[{row}]"


class SignatureValidator:
    """Types, shapes, nulls per the signature; then numeric ranges (`check_ranges`) per the deployment's policy.

    `scales` are the fitted transform's (mean, std) of numeric features, for the absurd-value bound."""

    def __init__(
        self,
        features: Sequence[Feature],
        max_batch: int = DEFAULT_MAX_BATCH,
        *,
        out_of_range: OutOfRange = "count",
        scales: dict[str, tuple[float, float]] | None = None,
    ):
        if not features:
            raise ValueError("a signature needs at least one input feature")
        self.features = list(features)
        self.names = [f.name for f in self.features]
        self.name_set = frozenset(self.names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.max_batch = max_batch
        self.out_of_range = out_of_range
        self._takes = ", ".join(f"{f.name}:{f.dtype}" for f in self.features)
        scales = scales or {}
        # per numeric feature: (name, dtype, training min, training max, absurd low, absurd high)
        self._bounds: list[tuple[str, str, float, float, float, float]] = []
        for f in self.features:
            if f.dtype not in ("float", "int"):
                continue
            mean, std = scales.get(f.name, (0.0, math.inf))
            low = -math.inf if f.min is None else f.min
            high = math.inf if f.max is None else f.max
            self._bounds.append((f.name, f.dtype, low, high, mean - ABSURD_STDS * std, mean + ABSURD_STDS * std))

    def check_ranges(self, batch: Batch) -> dict[str, int]:
        """Numeric values outside the training [min, max]: counted (returned per feature), clipped in place, or
        rejected, per `out_of_range`; values absurdly far out are rejected whatever the policy."""
        outside: dict[str, int] = {}
        for name, dtype, low, high, absurd_low, absurd_high in self._bounds:
            values = batch.columns[name]
            with np.errstate(invalid="ignore"):
                absurd = (values < absurd_low) | (values > absurd_high)
                if absurd.any():
                    row = int(np.flatnonzero(absurd)[0])
                    raise InvalidRequest(
                        "out_of_range",
                        f"{batch.where(name, row)}: {values[row]:g} is more than {ABSURD_STDS:g} training standard "
                        f"deviations from the training mean: no model computes it meaningfully",
                    )
                out = (values < low) | (values > high)
            count = int(out.sum())
            if not count:
                continue
            if self.out_of_range == "reject":
                row = int(np.flatnonzero(out)[0])
                raise InvalidRequest(
                    "out_of_range",
                    f"{batch.where(name, row)}: {values[row]:g} is outside the training range [{low:g}, {high:g}] "
                    f"(the deployment's spec.inputs.outOfRange is reject)",
                )
            if self.out_of_range == "clip":
                np.clip(values, low, high, out=values)
                if dtype == "int":
                    np.round(values, out=values)
            outside[name] = count
        return outside

    # ---- v1: {"instances": [{feature: value}, ...]} or rows as lists in signature order
    def from_v1(self, body: Any) -> Batch:
        if not isinstance(body, dict):
            raise InvalidRequest(
                "invalid_request", f'body: expected a JSON object {{"instances": [...]}}, got {_kind(body)}'
            )
        if "instances" not in body:
            raise InvalidRequest("missing_feature", f"instances: field required (rows of {self._takes})")
        instances = body["instances"]
        if not isinstance(instances, list):
            raise InvalidRequest("wrong_type", f"instances: expected a list of rows, got {_kind(instances)}")
        self._check_rows("instances", len(instances))
        width = len(self.names)
        cells: list[list[Any]] = [[] for _ in self.names]
        for i, row in enumerate(instances):
            if type(row) is dict:
                if row.keys() != self.name_set:
                    self._row_keys_error(i, row)
                for column, name in zip(cells, self.names, strict=True):
                    column.append(row[name])
            elif type(row) is list:
                if len(row) != width:
                    raise InvalidRequest(
                        "wrong_shape",
                        f"instances[{i}]: expected {width} values in signature order ({', '.join(self.names)}), "
                        f"got {len(row)}",
                    )
                for column, value in zip(cells, row, strict=True):
                    column.append(value)
            else:
                raise InvalidRequest(
                    "wrong_type",
                    f"instances[{i}]: expected an object {{feature: value}} or a list in signature order, "
                    f"got {_kind(row)}",
                )
        columns = {
            f.name: _column(f, values, lambda i, name=f.name: f"instances[{i}].{name}")
            for f, values in zip(self.features, cells, strict=True)
        }
        return Batch(rows=len(instances), columns=columns, protocol="v1")

    def _row_keys_error(self, i: int, row: dict) -> None:
        unknown = [key for key in row if key not in self.name_set]
        if unknown:
            raise InvalidRequest(
                "unknown_feature", f"instances[{i}].{unknown[0]}: unknown feature; the model takes {self._takes}"
            )
        missing = [name for name in self.names if name not in row]
        raise InvalidRequest("missing_feature", f"instances[{i}].{missing[0]}: missing feature")

    # ---- v2 (Open Inference Protocol): one input tensor per feature
    def from_v2(self, request: Any) -> Batch:
        """`request` is a kserve InferRequest: .inputs of InferInput (name, shape, datatype, data)."""
        inputs = list(request.inputs or [])
        if not inputs:
            raise InvalidRequest("missing_feature", f"inputs: no input tensors; the model takes {self._takes}")
        given: dict[str, tuple[int, Any]] = {}
        for k, tensor in enumerate(inputs):
            name = tensor.name
            if name not in self.index:
                raise InvalidRequest(
                    "unknown_feature", f"inputs[{k}] ({name!r}): unknown feature; the model takes {self._takes}"
                )
            if name in given:
                raise InvalidRequest("wrong_shape", f"inputs[{k}] ({name!r}): feature {name!r} given twice")
            given[name] = (k, tensor)
        missing = [name for name in self.names if name not in given]
        if missing:
            raise InvalidRequest("missing_feature", f"inputs: missing feature {missing[0]!r} (a tensor named so)")
        rows: int | None = None
        first = ""
        values_of: dict[str, list[Any]] = {}
        for feature in self.features:
            k, tensor = given[feature.name]
            where = f"inputs[{k}] ({feature.name!r})"
            if tensor.datatype not in V2_DATATYPES[feature.dtype]:
                raise InvalidRequest(
                    "wrong_type",
                    f"{where}.datatype: expected {'/'.join(V2_DATATYPES[feature.dtype])} for a feature of type "
                    f"{feature.dtype}, got {tensor.datatype}",
                )
            shape = list(tensor.shape or [])
            if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
                raise InvalidRequest("wrong_shape", f"{where}.shape: expected [n] or [n, 1], got {shape}")
            data = tensor.data
            if isinstance(data, np.ndarray):  # binary tensor extension: decoded by kserve already
                data = data.reshape(-1).tolist()
            if not isinstance(data, list):
                raise InvalidRequest("wrong_type", f"{where}.data: expected a list, got {_kind(data)}")
            if data and all(type(item) is list for item in data):
                if not all(len(item) == 1 for item in data):
                    raise InvalidRequest("wrong_shape", f"{where}.data: nested rows must hold one value each")
                data = [item[0] for item in data]
            if len(data) != shape[0]:
                raise InvalidRequest(
                    "wrong_shape", f"{where}.data: shape {shape} needs {shape[0]} values, got {len(data)}"
                )
            if rows is None:
                rows, first = shape[0], feature.name
            elif shape[0] != rows:
                raise InvalidRequest(
                    "wrong_shape", f"{where}.shape: {shape[0]} rows, but input {first!r} has {rows} rows"
                )
            values_of[feature.name] = data
        assert rows is not None
        self._check_rows("inputs", rows)
        columns = {}
        for f in self.features:
            k = given[f.name][0]
            columns[f.name] = _column(
                f, values_of[f.name], lambda i, k=k, name=f.name: f"inputs[{k}] ({name!r}).data[{i}]"
            )
        positions = {name: k for name, (k, _) in given.items()}
        return Batch(rows=rows, columns=columns, protocol="v2", request=request, positions=positions)

    def _check_rows(self, where: str, rows: int) -> None:
        if rows == 0:
            raise InvalidRequest("empty_batch", f"{where}: empty batch; send at least one row")
        if rows > self.max_batch:
            raise InvalidRequest(
                "batch_too_large", f"{where}: {rows} rows exceed the maximum batch of {self.max_batch} rows"
            )


def _column(feature: Feature, values: list[Any], where: Callable[[int], str]) -> np.ndarray:
    """Type-check one feature's values; returns float64 (NaN = null) or an object array of str (None = null)."""
    dtype = feature.dtype
    if dtype == "string":
        if all(type(v) is str for v in values):
            return np.array(values, dtype=object)
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            if v is None:
                _null(feature, where(i))
            elif type(v) is bytes:  # BYTES over gRPC
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest("wrong_type", f"{where(i)}: expected UTF-8 text, got {_short(v)}") from None
            elif type(v) is not str:
                raise InvalidRequest("wrong_type", f"{where(i)}: expected a string, got {_kind(v)} {_short(v)}")
            out[i] = v
        return out
    if dtype == "bool":
        if all(type(v) is bool for v in values):
            return np.array(values, dtype=np.float64)
        for i, v in enumerate(values):
            if v is None:
                _null(feature, where(i))
            elif type(v) is not bool:
                raise InvalidRequest("wrong_type", f"{where(i)}: expected true or false, got {_kind(v)} {_short(v)}")
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    # float and int
    if all(type(v) is int for v in values):
        try:
            return np.array(values, dtype=np.float64)
        except OverflowError:
            pass  # an integer too large for a float: reported below
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        kind = type(v)
        if v is None:
            _null(feature, where(i))
            out[i] = np.nan
        elif kind is int or kind is float:
            try:
                number = float(v)
            except OverflowError:
                raise InvalidRequest("wrong_type", f"{where(i)}: {_short(v)} is out of range") from None
            if math.isnan(number):
                _null(feature, where(i), "NaN")
                out[i] = np.nan
                continue
            if math.isinf(number):
                raise InvalidRequest("wrong_type", f"{where(i)}: expected a finite number, got {v!r}")
            if dtype == "int" and not number.is_integer():
                raise InvalidRequest("wrong_type", f"{where(i)}: expected an integer, got {v!r}")
            out[i] = number
        else:
            expected = "an integer" if dtype == "int" else "a number"
            raise InvalidRequest("wrong_type", f"{where(i)}: expected {expected}, got {_kind(v)} {_short(v)}")
    return out


def _null(feature: Feature, where: str, what: str = "null") -> None:
    if not feature.nullable:
        raise InvalidRequest("null_value", f"{where}: {what} is not allowed: feature {feature.name!r} is not nullable")


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
