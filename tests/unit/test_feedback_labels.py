"""Feedback bodies and their labels (kubeloop/feedback.py), as the model server's feedback endpoint and the drift
sidecar read them: every label decoded as the model learned it, and each kind of bad input named by its field."""

from __future__ import annotations

import re

import pytest

from kubeloop.api.modelversion import Feature, Signature
from kubeloop.feedback import LabelError, decode_label, parse_feedback

INPUTS = [Feature(name="x", dtype="float")]
BINARY = Signature(inputs=INPUTS, label="released", task="binary", positive_class="Yes")
MULTICLASS = Signature(inputs=INPUTS, label="kind", task="multiclass", classes=["a", "b", "c"])
REGRESSION = Signature(inputs=INPUTS, label="price", task="regression")


def test_labels_decode_as_the_model_learned_them_and_a_wrong_type_names_its_field() -> None:
    assert [decode_label(v, BINARY, "labels[0]") for v in ("Yes", "No", True, False, 1, 0)] == [1, 0, 1, 0, 1, 0]
    assert [decode_label(v, MULTICLASS, "label") for v in ("a", "c", 1)] == [0, 2, 1]
    assert decode_label(2.5, REGRESSION, "label") == 2.5
    cases = [
        (2, BINARY, "is not 0/1, true/false or a class name"),
        (0.5, BINARY, "is not 0/1"),
        ("d", MULTICLASS, "is not one of the model's classes ['a', 'b', 'c']"),
        (3, MULTICLASS, "is not one of the model's classes"),
        ("1.5", REGRESSION, "is not a finite number"),
        (float("nan"), REGRESSION, "is not a finite number"),
        (True, REGRESSION, "is not a finite number"),
    ]
    for value, signature, message in cases:
        with pytest.raises(LabelError, match=re.escape(message)) as raised:
            decode_label(value, signature, "feedback[3].labels[1]")
        assert raised.value.field == "feedback[3].labels[1]"


def test_a_feedback_body_parses_into_decoded_labels_per_request() -> None:
    body = {"feedback": [{"id": "r1", "labels": ["Yes", "No"]}, {"id": "r2", "label": True}]}
    parsed = parse_feedback(body, BINARY)
    assert [(f.request_id, f.labels) for f in parsed] == [("r1", [1.0, 0.0]), ("r2", [1.0])]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ([], "feedback", "expected {"),
        ({"feedback": []}, "feedback", "expected {"),
        ({"feedback": ["r1"]}, "feedback[0]", "expected an object"),
        ({"feedback": [{"labels": [1]}]}, "feedback[0].id", "expected the request's id"),
        ({"feedback": [{"id": 7, "labels": [1]}]}, "feedback[0].id", "expected the request's id"),
        ({"feedback": [{"id": "r", "labels": []}]}, "feedback[0].labels", "one label per row"),
        ({"feedback": [{"id": "r"}]}, "feedback[0]", "has neither labels nor label"),
        ({"feedback": [{"id": "r", "label": 1}, {"id": "s", "labels": [1, 2]}]}, "feedback[1].labels[1]", "is not 0/1"),
        ({"feedback": [{"id": "r", "label": 1}] * 10_001}, "feedback", "at most 10000 per body"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(body, field, message) -> None:
    with pytest.raises(LabelError, match=re.escape(message)) as raised:
        parse_feedback(body, BINARY)
    assert raised.value.field == field
