from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kubeloop.api import ModelVersion, load_resources
from kubeloop.api.trainingjob import Gate
from kubeloop.evaluation import evaluate, gate, metrics

SAMPLE = "manifests/samples/modelversion.yaml"


def production() -> ModelVersion:
    (record,) = load_resources(SAMPLE)
    assert isinstance(record, ModelVersion)
    return record


def test_metrics_match_their_definitions():
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    proba = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.7, 0.1, 0.55])
    result = metrics(labels, proba)
    # predicted positive: 0.9 0.8 0.6 0.7 0.55 -> 4 true positives of 5 predicted, 4 of 5 positives found
    assert result.rows == 8 and result.positive_rate == pytest.approx(5 / 8)
    assert result.precision == pytest.approx(4 / 5) and result.recall == pytest.approx(4 / 5)
    assert result.accuracy == pytest.approx(6 / 8)
    assert result.roc_auc == pytest.approx(roc_auc_score(labels, proba))
    expected_log_loss = -np.mean(labels * np.log(proba) + (1 - labels) * np.log(1 - proba))
    assert result.log_loss == pytest.approx(expected_log_loss)


def test_slices_are_evaluated_separately_and_single_class_slices_have_no_auc():
    labels = np.array([1, 0, 1, 0, 1, 1])
    proba = np.array([0.8, 0.2, 0.7, 0.4, 0.9, 0.6])
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    result = evaluate(labels, proba, "group", groups)
    assert set(result.slices.values) == {"a", "b"}
    assert result.slices.values["a"].rows == 4 and result.slices.values["a"].roc_auc == 1.0
    assert result.slices.values["b"].roc_auc is None


def test_gate_names_the_metric_and_the_shortfall():
    evaluation = evaluate(np.array([1, 0, 1, 0]), np.array([0.6, 0.4, 0.4, 0.6]))
    decision = gate(evaluation, Gate.model_validate({"thresholds": {"rocAuc": 0.7, "logLoss": 0.5}}), None)
    assert not decision.passed
    assert decision.reasons == [
        "roc_auc 0.5000 is below the threshold 0.7 by 0.2000",
        "log_loss 0.7136 is above the threshold 0.5 by 0.2136",
    ]


def test_gate_compares_against_production_with_a_margin():
    record = production()  # rocAuc 0.724 in Production
    labels = np.array([1, 0] * 50)
    good = evaluate(labels, np.where(labels == 1, 0.8, 0.2))
    spec = Gate.model_validate({"maxRegression": {"rocAuc": 0.02}})
    assert gate(good, spec, record).passed

    weak = evaluate(labels, np.linspace(0.3, 0.7, 100))  # AUC about 0.5
    decision = gate(weak, spec, record)
    assert not decision.passed and decision.compared_with == "arrests-v1"
    assert "roc_auc" in decision.reasons[0] and "worse than Production arrests-v1 (0.7240)" in decision.reasons[0]


def test_gate_records_the_bounds_it_held_the_version_to():
    evaluation = evaluate(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2]))
    spec = Gate.model_validate({"thresholds": {"rocAuc": 0.7, "f1": 0.5}, "maxRegression": {"rocAuc": 0.02}})
    decision = gate(evaluation, spec, None)
    assert decision.passed
    assert decision.thresholds == {"rocAuc": 0.7, "f1": 0.5}
    assert decision.max_regression == {"rocAuc": 0.02}


def test_multiclass_and_regression_metrics_and_gate():
    labels = np.array([0, 1, 2, 2, 1, 0])
    proba = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.2, 0.6, 0.2], [0.6, 0.3, 0.1]]
    )
    result = metrics(labels, proba, "multiclass", ["a", "b", "c"])
    assert result.accuracy == pytest.approx(5 / 6) and result.class_rates == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    )
    assert result.roc_auc == pytest.approx(roc_auc_score(labels, proba, multi_class="ovr"))
    assert result.positive_rate is None and result.rmse is None
    decision = gate(
        evaluate(labels, proba, task="multiclass", classes=["a", "b", "c"]),
        Gate.model_validate({"thresholds": {"accuracy": 0.9}}),
        None,
        "multiclass",
    )
    assert decision.reasons == ["accuracy 0.8333 is below the threshold 0.9 by 0.0667"]

    values, predicted = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 2.5, 4.0])
    result = metrics(values, predicted, "regression")
    assert result.rmse == pytest.approx(np.sqrt(0.125)) and result.mae == pytest.approx(0.25)
    assert result.r2 == pytest.approx(1 - 0.5 / 5) and result.accuracy is None
    decision = gate(
        evaluate(values, predicted, task="regression"),
        Gate.model_validate({"thresholds": {"rmse": 0.3, "r2": 0.95}}),
        None,
        "regression",
    )
    assert decision.reasons == [
        "rmse 0.3536 is above the threshold 0.3 by 0.0536",
        "r2 0.9000 is below the threshold 0.95 by 0.0500",
    ]
    constant = metrics(np.array([2.0, 2.0]), np.array([2.0, 2.5]), "regression")
    assert constant.r2 is None
