"""Ground-truth feedback: labels for served requests, by the request id the payload logger gave their events.

One body shape for the model server's feedback endpoint and for the CloudEvent the drift sidecar accepts:

    {"feedback": [{"id": "<request id>", "labels": [<one label per row of the request>]},
                  {"id": "<request id>", "label": <the label of a one-row request>}, ...]}

A label is what the training data's label column holds: binary, the positive class name (any other value is the
negative class, as in training), 0/1 or true/false; multiclass, a class name or its index; regression, a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubeloop.api.modelversion import Signature

FEEDBACK_TYPE = "org.kubeloop.feedback"  # the CloudEvent type of a feedback body
MAX_FEEDBACK = 10_000  # entries per body


class LabelError(ValueError):
    """Feedback the model cannot use; ``field`` names where in the body (``feedback[3].labels[1]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Feedback:
    request_id: str
    labels: list[float]  # as the model learned them: binary 0/1, multiclass the class index, regression the value


def decode_label(value: Any, signature: Signature, field: str) -> float:
    if signature.task == "regression":
        if type(value) in (int, float) and math.isfinite(value):
            return float(value)
        raise LabelError(field, f"{value!r} is not a finite number (the model is a regression)")
    if signature.task == "multiclass":
        classes = signature.classes or []
        if type(value) is str and value in classes:
            return float(classes.index(value))
        if type(value) is int and 0 <= value < len(classes):
            return float(value)
        raise LabelError(field, f"{value!r} is not one of the model's classes {classes} (or their index)")
    if type(value) is bool or (type(value) is int and value in (0, 1)):
        return float(value)
    if type(value) is str:
        return 1.0 if value == signature.positive_class else 0.0
    raise LabelError(
        field, f"{value!r} is not 0/1, true/false or a class name (positive: {signature.positive_class!r})"
    )


def parse_feedback(body: Any, signature: Signature) -> list[Feedback]:
    """The entries of a feedback body, every label decoded; the first problem raises LabelError naming its field."""
    entries = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(entries, list) or not entries:
        raise LabelError("feedback", 'expected {"feedback": [{"id": REQUEST_ID, "labels": [...]}, ...]}')
    if len(entries) > MAX_FEEDBACK:
        raise LabelError("feedback", f"{len(entries)} entries, at most {MAX_FEEDBACK} per body: send several")
    out = []
    for i, entry in enumerate(entries):
        where = f"feedback[{i}]"
        if not isinstance(entry, dict):
            raise LabelError(where, "expected an object with id and labels (or label)")
        request_id = entry.get("id")
        if type(request_id) is not str or not request_id:
            raise LabelError(f"{where}.id", "expected the request's id (a non-empty string)")
        if "labels" in entry:
            labels = entry["labels"]
            if not isinstance(labels, list) or not labels:
                raise LabelError(f"{where}.labels", "expected a non-empty list, one label per row of the request")
            decoded = [decode_label(v, signature, f"{where}.labels[{j}]") for j, v in enumerate(labels)]
        elif "label" in entry:
            decoded = [decode_label(entry["label"], signature, f"{where}.label")]
        else:
            raise LabelError(where, "has neither labels nor label")
        out.append(Feedback(request_id, decoded))
    return out
