"""Inference response bodies as the payload logger forwards them: the model's answer per row, read per task."""

from __future__ import annotations

import math
from typing import Any

from kubeloop.api.modelversion import Task
from monitoring.events import Malformed, Predictions, flat_data

# v2 outputs taken for each task, by name in this order (else the first output)
PREDICTION_OUTPUTS: dict[Task, tuple[str, ...]] = {
    "binary": ("probability", "probabilities", "predict_proba", "output-0"),
    "multiclass": ("probabilities", "probability", "predict_proba", "output-0"),
    "regression": ("value", "predictions", "output-0"),
}


def parse_predictions(payload: Any, task: Task = "binary", classes: int = 0) -> Predictions:
    """The model's answer per row from a v1 ``{"predictions": [...]}`` or v2 ``{"outputs": [...]}`` response.

    binary, a score per row: a number is the score; a list of class probabilities gives its last entry (the positive
    class); an object gives its ``probability`` or ``score``; of a v2 ``[n, classes]`` tensor the last column.
    multiclass, a list of ``classes`` probabilities per row: v1 one list per row, v2 an ``[n, classes]`` tensor
    (``probabilities``). regression, a value per row: v1 numbers, v2 ``value`` of shape ``[n]`` or ``[n, 1]``.
    """
    if not isinstance(payload, dict):
        raise Malformed("bad_body", f"response body is {type(payload).__name__}, not an object")
    predictions = payload.get("predictions")
    if predictions is not None:
        if not isinstance(predictions, list):
            raise Malformed("bad_body", "'predictions' is not a list")
        if task == "multiclass":
            out: Predictions = [_probabilities(p, classes) for p in predictions]
        else:
            out = [_score(p) if task == "binary" else _value(p) for p in predictions]
    elif isinstance(payload.get("outputs"), list) and payload["outputs"]:
        out = _v2_predictions(payload["outputs"], task, classes)
    else:
        raise Malformed("bad_body", "response has neither 'predictions' (v1) nor 'outputs' (v2)")
    if not out:
        raise Malformed("empty", "no predictions")
    return out


def _v2_predictions(outputs: list[Any], task: Task, classes: int) -> Predictions:
    tensors = [o for o in outputs if isinstance(o, dict)]
    named = {o.get("name"): o for o in tensors}
    chosen = next((named[n] for n in PREDICTION_OUTPUTS[task] if n in named), tensors[0] if tensors else None)
    if chosen is None or not isinstance(chosen.get("data"), list):
        raise Malformed("bad_body", "v2 response output without 'data'")
    name = str(chosen.get("name"))
    data = flat_data(chosen["data"], name)
    shape = chosen.get("shape")
    width = shape[1] if isinstance(shape, list) and len(shape) == 2 and type(shape[1]) is int else 1
    if width > 1 and len(data) != math.prod(shape):
        raise Malformed("shape_mismatch", f"output shape {shape} but {len(data)} values")
    if task == "multiclass":
        if width != classes:
            raise Malformed("shape_mismatch", f"{name[:60]}: shape {str(shape)[:40]}, expected [n, {classes}]")
        return [_probabilities(data[i : i + width], classes) for i in range(0, len(data), width)]
    if task == "regression":
        if width != 1:
            raise Malformed("shape_mismatch", f"{name[:60]}: shape {str(shape)[:40]}, expected [n] or [n, 1]")
        return [_value(v) for v in data]
    return [_score(p) for p in (data[width - 1 :: width] if width > 1 else data)]


def _score(value: Any) -> float:
    kind = type(value)
    if kind is float or kind is int:
        if value - value != 0:
            raise Malformed("wrong_type", f"prediction {value} is not finite")
        return float(value)
    if kind is list and value:
        return _score(value[-1])
    if kind is dict:
        for key in ("probability", "score"):
            if key in value:
                return _score(value[key])
    raise Malformed("wrong_type", f"prediction {str(value)[:40]!r} is not a number")


def _number(value: Any) -> float:
    kind = type(value)
    if kind is not float and kind is not int:
        raise Malformed("wrong_type", f"prediction {str(value)[:40]!r} is not a number")
    if value - value != 0:
        raise Malformed("wrong_type", f"prediction {value} is not finite")
    return float(value)


def _value(value: Any) -> float:
    return _number(value[0] if type(value) is list and len(value) == 1 else value)


def _probabilities(row: Any, classes: int) -> list[float]:
    if type(row) is not list:
        raise Malformed("wrong_type", f"prediction {str(row)[:40]!r} is not a list of {classes} class probabilities")
    if len(row) != classes:
        raise Malformed("shape_mismatch", f"a prediction of {len(row)} probabilities, the model has {classes} classes")
    return [_number(p) for p in row]
