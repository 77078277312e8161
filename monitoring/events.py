"""KServe logger CloudEvents: headers and bodies, request bodies parsed into encoded feature columns (response
bodies: :mod:`monitoring.predictions`).

KServe's logger (pkg/logger/worker.go) sends each inference request and response as a CloudEvent in binary mode
through the CloudEvents Go SDK: the body is the payload as received or returned, the attributes are headers
``Ce-Specversion``, ``Ce-Type`` (``org.kubeflow.serving.inference.request`` | ``.response``), ``Ce-Id`` (shared by
a request and its response), ``Ce-Source``, ``Ce-Time`` and the extensions ``Ce-Inferenceservicename``,
``Ce-Namespace``, ``Ce-Component``, ``Ce-Endpoint`` (default | canary), ``Ce-Metadata`` (JSON). kubeloop's own
servers add ``Ce-Modelversion``. Header names are matched case-insensitively (Go writes ``Ce-Id``, others
``ce-id``). The structured mode (``application/cloudevents+json``) is accepted too, and the batched mode
(``application/cloudevents-batch+json``: a JSON array of structured events) that kubeloop's own model server sends:
the array is decoded once, each event's ``data`` already parsed with it.

Every problem raises :class:`Malformed` with a short, fixed ``reason`` (a metric label) and a detail for the log.
An event is taken whole or not at all: one bad row rejects the event, so a window never holds half a request.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubeloop.feedback import FEEDBACK_TYPE
from monitoring.schema import FeatureSpec, Schema

try:  # orjson is ~5x faster on these bodies; the stdlib is the fallback
    import orjson

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - depends on the environment

    def loads(data: bytes) -> Any:
        return json.loads(data)

    _JSON_ERRORS = (ValueError, UnicodeDecodeError)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
EventType = Literal["request", "response", "feedback"]
_TYPES: dict[str, EventType] = {REQUEST_TYPE: "request", RESPONSE_TYPE: "response", FEEDBACK_TYPE: "feedback"}
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"

# the label values of kubeloop_drift_events_malformed_total{reason}
REASONS = (
    "missing_header",  # no ce-type / ce-id / ce-specversion
    "bad_header",  # a header with an impossible value (specversion, modelversion)
    "unknown_type",  # ce-type is none of the request, response and feedback types
    "unknown_version",  # ce-modelversion names a version this sidecar was not started for
    "too_large",  # body over the limit
    "bad_json",  # body is not JSON (or not UTF-8)
    "bad_body",  # JSON, but not a v1/v2 inference request or response
    "bad_feedback",  # a feedback body kubeloop/feedback.py refuses (the log line names the field)
    "unknown_feature",  # a feature the signature does not have
    "missing_feature",  # a non-nullable feature absent
    "wrong_type",  # a value of the wrong JSON type (a string for a number, a number for a category, inf)
    "null_value",  # null (or NaN) in a non-nullable feature
    "shape_mismatch",  # v2 tensors of different lengths, a shape that does not match the data, a short row
    "empty",  # no rows / no predictions
)


class Malformed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class EventMeta:
    type: EventType
    id: str
    source: str = ""
    inference_service: str = ""
    namespace: str = ""
    component: str = ""
    endpoint: str = ""
    model_version: int | None = None  # kubeloop extension; absent from KServe's own logger


@dataclass(slots=True)
class Rows:
    """Encoded feature columns of one request, in schema order: float (NaN = null) or category codes."""

    n: int
    columns: list[list[Any]]


# the model's answer per row (monitoring.predictions reads it): a score or value, or a list of class probabilities
Predictions = list[float] | list[list[float]]


def lower_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {k.lower(): v for k, v in items}


def parse_version(value: str) -> int:
    known = _VERSIONS.get(value)
    if known is not None:
        return known
    text = value.strip().lower().removeprefix("v")
    if not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise Malformed("bad_header", f"ce-modelversion {value[:40]!r} is not a version number")
    if len(_VERSIONS) >= 64:  # a sender's few spellings of its few versions; anything else is not kept
        _VERSIONS.clear()
    _VERSIONS[value] = int(text)
    return int(text)


_VERSIONS: dict[str, int] = {}


def parse_meta(headers: Mapping[str, str]) -> EventMeta:
    """Attributes of a binary-mode event; ``headers`` must have lower-case names (see :func:`lower_headers`)."""
    get = headers.get
    version = get("ce-modelversion")
    return EventMeta(
        _kind(get("ce-specversion"), get("ce-type"), get("ce-id"), "ce-"),
        str(get("ce-id")),
        get("ce-source", ""),
        get("ce-inferenceservicename", ""),
        get("ce-namespace", ""),
        get("ce-component", ""),
        get("ce-endpoint", ""),
        parse_version(str(version)) if version else None,
    )


def parse_envelope(envelope: Any) -> tuple[EventMeta, Any]:
    """Attributes and payload of one structured event (alone, or one element of a batch): ``data`` as decoded with
    the envelope, or ``data_base64`` decoded as JSON."""
    if type(envelope) is not dict:
        raise Malformed("bad_body", f"a structured CloudEvent is a JSON object, not {type(envelope).__name__}")
    get = envelope.get
    version = get("modelversion")
    meta = EventMeta(
        _kind(get("specversion"), get("type"), get("id"), ""),
        str(get("id")),
        str(get("source", "")),
        str(get("inferenceservicename", "")),
        str(get("namespace", "")),
        str(get("component", "")),
        str(get("endpoint", "")),
        parse_version(str(version)) if version is not None and version != "" else None,
    )
    encoded = get("data_base64")
    if encoded is None:
        return meta, get("data")
    try:
        return meta, decode_json(base64.b64decode(encoded, validate=True))
    except (ValueError, TypeError) as e:
        raise Malformed("bad_json", f"data_base64: {e}") from None


def _kind(spec: Any, ce_type: Any, ce_id: Any, prefix: str) -> EventType:
    if not (spec and ce_type and ce_id):
        missing = [n for n, v in (("specversion", spec), ("type", ce_type), ("id", ce_id)) if not v]
        raise Malformed("missing_header", "no " + ", ".join(prefix + name for name in missing))
    if type(spec) is not str or not spec.startswith("1."):
        raise Malformed("bad_header", f"{prefix}specversion {str(spec)[:20]!r}: only CloudEvents 1.x")
    kind = _TYPES.get(ce_type) if type(ce_type) is str else None
    if kind is None:
        raise Malformed("unknown_type", f"{prefix}type {str(ce_type)[:80]!r}")
    return kind


def parse_event(headers: Mapping[str, str], body: bytes) -> tuple[EventMeta, Any]:
    """Attributes and decoded JSON payload of one event, binary or structured mode. Headers: lower-case names."""
    if headers.get("content-type", "").startswith(STRUCTURED):
        return parse_envelope(decode_json(body))
    # KServe sends the inference payload's own content type (or none): the body is JSON either way
    return parse_meta(headers), decode_json(body)


def decode_batch(body: bytes) -> list[Any]:
    """The events of a batched-mode body (parse each with :func:`parse_envelope`).

    A model server embeds each inference body as it was received; one that its JSON parser took but strict JSON
    does not (``NaN``, ``Infinity``, a number past the double range: Python's json takes them) would cost the whole
    batch. Such a batch is read again leniently, each non-finite number a :data:`NON_FINITE` marker that the
    converters reject as ``wrong_type``: the event that holds it is rejected, the others are taken.
    """
    if not body:
        raise Malformed("bad_json", "empty body")
    try:
        events = loads(body)
    except _JSON_ERRORS:
        try:
            events = json.loads(body, parse_constant=_non_finite, parse_float=_float, parse_int=_int)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise Malformed("bad_json", str(e)[:120]) from None
    if type(events) is not list:
        raise Malformed("bad_body", f"a CloudEvents batch is a JSON array of events, not {type(events).__name__}")
    return events


class _NonFinite:
    def __repr__(self) -> str:
        return "non-finite number"


NON_FINITE = _NonFinite()


def _non_finite(_token: str) -> _NonFinite:
    return NON_FINITE


def _float(token: str) -> float | _NonFinite:
    value = float(token)
    return value if value - value == 0.0 else NON_FINITE


def _int(token: str) -> int | float | _NonFinite:
    value = int(token)
    if -(2**63) <= value < 2**64:
        return value
    return _float(token)  # as orjson reads it: a double, or past the double range not a number


def decode_json(body: bytes) -> Any:
    if not body:
        raise Malformed("bad_json", "empty body")
    try:
        return loads(body)
    except _JSON_ERRORS as e:
        raise Malformed("bad_json", str(e)[:120]) from None


# ---------------------------------------------------------------------------------------------- requests

_MISSING = object()
Converter = Callable[[Any], Any]


def _numeric_converter(spec: FeatureSpec) -> Converter:
    name, nullable, nan = spec.name, spec.nullable, math.nan

    def convert(value: Any) -> float:
        kind = type(value)
        if kind is float:
            if value - value == 0.0:  # finite
                return value
            if value != value and nullable:  # NaN is a null
                return nan
            raise Malformed("null_value" if value != value else "wrong_type", f"{name}: {value}")
        if kind is int:
            return float(value)
        if value is None:
            if nullable:
                return nan
            raise Malformed("null_value", f"{name} is null but not nullable")
        raise Malformed("wrong_type", f"{name}: expected a number, got {type(value).__name__} {str(value)[:40]!r}")

    return convert


def _categorical_converter(spec: FeatureSpec) -> Converter:
    name, nullable, codes = spec.name, spec.nullable, spec.codes
    null, other = spec.null_code, spec.other_code
    expected: type = bool if spec.dtype == "bool" else str

    def convert(value: Any) -> int:
        if type(value) is expected:
            return codes.get(value, other)
        if value is None:
            if nullable:
                return null
            raise Malformed("null_value", f"{name} is null but not nullable")
        raise Malformed(
            "wrong_type", f"{name}: expected {expected.__name__}, got {type(value).__name__} {str(value)[:40]!r}"
        )

    return convert


class RequestParser:
    """Turns v1 / v2 inference request bodies into encoded columns (kept per schema: converters built once)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.names = schema.names
        self.index = schema.index
        self.converters = [
            _numeric_converter(f) if f.kind == "numeric" else _categorical_converter(f) for f in schema.features
        ]
        self.specs = schema.features
        self.named = list(zip(self.names, self.converters, strict=True))

    def parse(self, payload: Any) -> Rows:
        if not isinstance(payload, dict):
            raise Malformed("bad_body", f"request body is {type(payload).__name__}, not an object")
        instances = payload.get("instances")
        if instances is not None:
            return self._instances(instances)
        inputs = payload.get("inputs")
        if isinstance(inputs, list):
            return self._v2(inputs)
        if isinstance(inputs, dict):  # v1 columnar form: {"inputs": {feature: [values]}}
            return self._columnar(inputs)
        raise Malformed("bad_body", "request has neither 'instances' (v1) nor 'inputs' (v2)")

    # v1 ---------------------------------------------------------------------------------------------
    def object_rows(self, payload: Any) -> list[dict[str, Any]] | None:
        """The rows of a v1 request made only of objects with as many keys as the signature has features (the common
        form, which :meth:`convert_objects` converts for many requests at once); None for any other form."""
        if type(payload) is dict:
            instances = payload.get("instances")
            width = len(self.names)
            if type(instances) is list and instances and all(type(r) is dict and len(r) == width for r in instances):
                return instances
        return None

    def convert_objects(self, rows: list[dict[str, Any]]) -> list[list[Any]]:
        """Encoded columns of rows :meth:`object_rows` gave, of one request or of many. Raises Malformed, or
        KeyError (a feature missing, another key in its place): :meth:`parse` of each request alone says which."""
        return [[convert(row[name]) for row in rows] for name, convert in self.named]

    def _instances(self, instances: Any) -> Rows:
        if not isinstance(instances, list):
            raise Malformed("bad_body", "'instances' is not a list")
        if not instances:
            raise Malformed("empty", "'instances' is empty")
        width = len(self.names)
        # fast path: objects holding exactly the signature's features (the common case)
        if all(type(row) is dict and len(row) == width for row in instances):
            try:
                return Rows(len(instances), self.convert_objects(instances))
            except KeyError:
                pass  # a feature missing (and another key in its place): the general path says which
        columns = [[] for _ in self.names]
        pairs = list(zip(self.names, self.converters, columns, strict=True))
        appends = [(conv, col.append) for conv, col in zip(self.converters, columns, strict=True)]
        for row in instances:
            kind = type(row)
            if kind is dict:
                found = 0
                for name, convert, column in pairs:
                    value = row.get(name, _MISSING)
                    if value is _MISSING:
                        value = self._absent(name)
                    else:
                        found += 1
                    column.append(convert(value))
                if found != len(row):
                    unknown = next(k for k in row if k not in self.index)
                    raise Malformed("unknown_feature", f"{str(unknown)[:60]!r} is not in the signature")
            elif kind is list:
                if len(row) != width:
                    raise Malformed("shape_mismatch", f"row of {len(row)} values, the signature has {width}")
                for (convert, append), value in zip(appends, row, strict=True):
                    append(convert(value))
            else:
                raise Malformed("bad_body", f"instance is {kind.__name__}, not an object or a list")
        return Rows(len(instances), columns)

    def _absent(self, name: str) -> None:
        if not self.specs[self.index[name]].nullable:
            raise Malformed("missing_feature", f"{name} missing")
        return None

    def _columnar(self, inputs: dict[str, Any]) -> Rows:
        unknown = [k for k in inputs if k not in self.index]
        if unknown:
            raise Malformed("unknown_feature", f"{str(unknown[0])[:60]!r} is not in the signature")
        return self._from_tensors({k: flat_data(v, k) for k, v in inputs.items()})

    # v2 ---------------------------------------------------------------------------------------------
    def _v2(self, inputs: list[Any]) -> Rows:
        if not inputs:
            raise Malformed("empty", "'inputs' is empty")
        tensors: dict[str, list[Any]] = {}
        shapes: dict[str, list[int]] = {}
        for tensor in inputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or "data" not in tensor:
                raise Malformed("bad_body", "each v2 input needs a 'name' and 'data'")
            name = tensor["name"]
            data = flat_data(tensor["data"], name)
            shape = tensor.get("shape")
            if shape is not None:
                if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                    raise Malformed("bad_body", f"{name[:60]}: shape {str(shape)[:40]} is not a list of sizes")
                if math.prod(shape) != len(data):
                    raise Malformed("shape_mismatch", f"{name[:60]}: shape {shape} but {len(data)} values")
                shapes[name] = shape
            tensors[name] = data
        if len(tensors) == 1 and not any(n in self.index for n in tensors):
            # one [n, features] tensor holding whole rows in signature order
            (name, data), width = next(iter(tensors.items())), len(self.names)
            shape = shapes.get(name)
            if shape is None or len(shape) != 2 or shape[1] != width:
                raise Malformed("unknown_feature", f"{name[:60]!r} is not a feature nor a [n, {width}] row tensor")
            return self._instances([data[i : i + width] for i in range(0, len(data), width)])
        unknown = [n for n in tensors if n not in self.index]
        if unknown:
            raise Malformed("unknown_feature", f"{unknown[0][:60]!r} is not in the signature")
        return self._from_tensors(tensors)

    def _from_tensors(self, tensors: dict[str, list[Any]]) -> Rows:
        lengths = {len(v) for v in tensors.values()}
        if len(lengths) > 1:
            raise Malformed("shape_mismatch", f"inputs of different lengths {sorted(lengths)}")
        n = lengths.pop()
        if n == 0:
            raise Malformed("empty", "inputs hold no values")
        columns: list[list[Any]] = []
        for name, convert in zip(self.names, self.converters, strict=True):
            data = tensors.get(name)
            if data is None:
                self._absent(name)
                data = [None] * n
            columns.append([convert(value) for value in data])
        return Rows(n, columns)


def flat_data(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise Malformed("bad_body", f"{str(name)[:60]}: data is not a list")
    if data and type(data[0]) is list:  # nested ([[v], [v]] or [[row], [row]]): row-major flatten
        flat: list[Any] = []
        for item in data:
            if type(item) is not list:
                raise Malformed("shape_mismatch", f"{str(name)[:60]}: ragged nested data")
            flat.extend(item)
        return flat
    return data
