"""Ground truth joined to served predictions (monitoring/outcomes.py): label decoding per task, the join under
late, partial, out-of-order, duplicated and unknown feedback, the live metrics against a direct computation on
the same joined rows, each version's summed loss against sklearn on the same rows, and the estimate without labels
against the labels it stands in for."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from monitoring.outcomes import PROBABILITY_CLIP, OutcomeJoin, estimate_without_labels


def _served(join: OutcomeJoin, rng: np.random.Generator, requests: int) -> dict[str, tuple[list[float], list[float]]]:
    """Requests of 1-3 rows with calibrated scores; returns id -> (scores, the labels that will come)."""
    truth = {}
    for i in range(requests):
        scores = rng.random(int(rng.integers(1, 4))).tolist()
        labels = [float(rng.random() < s) for s in scores]
        join.served(f"req-{i}", 1, scores)
        truth[f"req-{i}"] = (scores, labels)
    return truth


@pytest.mark.parametrize("share", [1.0, 0.1, 0.0])
def test_late_partial_out_of_order_feedback_joins_and_the_live_metrics_match_a_direct_computation(share) -> None:
    rng = np.random.default_rng(7)
    join = OutcomeJoin("binary", window=10_000)
    truth = _served(join, rng, 400)
    chosen = [rid for rid in truth if rng.random() < share]
    rng.shuffle(chosen)  # labels arrive in any order, long after the requests
    for rid in chosen:
        assert join.label(rid, truth[rid][1]) == "joined"
    if chosen:
        assert join.label(chosen[0], truth[chosen[0]][1]) == "duplicate"
    assert join.label("never-served", [1.0]) == "unknown"
    live = join.live(1)
    assert join.results["joined"] == len(chosen) and join.results["unknown"] == 1
    assert join.results["duplicate"] == (1 if chosen else 0)
    if not chosen:
        assert live == {"rows": 0}
        return
    scores = np.array([s for rid in chosen for s in truth[rid][0]])
    labels = np.array([y for rid in chosen for y in truth[rid][1]])
    assert live["rows"] == len(labels)
    assert live["rocAuc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert live["accuracy"] == pytest.approx(skm.accuracy_score(labels, scores >= 0.5))
    assert live["positiveRate"] == pytest.approx(labels.mean())
    assert 0 <= live["calibrationError"] < 0.25


def test_counts_mismatched_rows_and_expires_the_oldest_waiting_request() -> None:
    join = OutcomeJoin("binary", capacity=3)
    for i in range(5):
        join.served(f"r{i}", 2, [0.2, 0.9])
    assert join.results["expired"] == 2
    assert join.label("r0", [0.0, 1.0]) == "unknown"  # expired before its label came
    assert join.label("r4", [1.0]) == "mismatch"  # two rows served, one label
    assert join.label("r4", [0.0, 1.0]) == "joined"
    assert join.status(2)["labelled"] == 2 and join.status(1)["labelled"] == 0


def test_multiclass_and_regression_live_metrics() -> None:
    join = OutcomeJoin("multiclass", ["a", "b", "c"])
    join.served("m", 1, [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    join.label("m", [0.0, 1.0, 2.0, 1.0])
    live = join.live(1)
    assert live["accuracy"] == 0.75 and live["labelShare.b"] == 0.5 and live["rocAuc"] is not None
    reg = OutcomeJoin("regression")
    reg.served("r", 1, [1.0, 2.0])
    reg.label("r", [2.0, 2.0])
    assert reg.live(1) == {"rows": 2, "mae": 0.5, "rmse": pytest.approx(np.sqrt(0.5)), "labelMean": 2.0}


def _task_rows(task: str, rng: np.random.Generator, n: int) -> tuple[list, list[float]]:
    """n served predictions of the task and their labels (as the feedback decoding gives them)."""
    if task == "binary":
        scores = rng.uniform(0.02, 0.98, n)
        return scores.tolist(), (rng.random(n) < scores).astype(float).tolist()
    if task == "multiclass":
        probabilities = rng.dirichlet([2.0, 2.0, 2.0], n)
        return probabilities.tolist(), [float(rng.choice(3, p=p)) for p in probabilities]
    values = rng.normal(0, 1, n)
    return values.tolist(), (values + rng.normal(0.3, 0.5, n)).tolist()


def _sklearn_loss(task: str, predictions: list, labels: list[float]) -> float:
    if task == "regression":
        return skm.mean_squared_error(labels, predictions)
    if task == "multiclass":
        return skm.log_loss(labels, predictions, labels=[0.0, 1.0, 2.0])
    return skm.log_loss(labels, predictions, labels=[0.0, 1.0])


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_the_summed_loss_of_the_joined_rows_equals_sklearn_on_the_same_rows(task: str) -> None:
    rng = np.random.default_rng(11)
    join = OutcomeJoin(task, ["a", "b", "c"] if task == "multiclass" else [], window=50)  # loss counts every row
    requests = [_task_rows(task, rng, int(rng.integers(1, 4))) for _ in range(300)]
    for i, (predictions, _) in enumerate(requests):
        join.served(f"r{i}", 1, predictions)
    labelled = [i for i in range(len(requests)) if i % 3]  # a third never labelled: no loss counted for them
    for i in reversed(labelled):
        join.label(f"r{i}", requests[i][1])
    join.label(f"r{labelled[0]}", requests[labelled[0]][1])  # a duplicate counts nothing twice
    predictions = [p for i in labelled for p in requests[i][0]]
    labels = [y for i in labelled for y in requests[i][1]]
    per_row = [_sklearn_loss(task, [p], [y]) for p, y in zip(predictions, labels, strict=True)]
    rows, loss_sum, loss_squared_sum = join.totals(1)
    assert rows == len(labels) > 50
    assert loss_sum == pytest.approx(_sklearn_loss(task, predictions, labels) * rows)
    assert loss_squared_sum == pytest.approx(np.sum(np.square(per_row)))
    assert join.totals(2) == (0, 0.0, 0.0)


def test_a_confident_wrong_probability_costs_the_clipped_log_loss() -> None:
    join = OutcomeJoin("binary")
    join.served("sure", 1, [1.0, 0.0])
    join.label("sure", [0.0, 1.0])
    multiclass = OutcomeJoin("multiclass", ["a", "b"])
    multiclass.served("sure", 1, [[1.0, 0.0]])
    multiclass.label("sure", [1.0])
    assert join.totals(1)[1] == pytest.approx(-2 * np.log(PROBABILITY_CLIP))
    assert multiclass.totals(1)[1] == pytest.approx(-np.log(PROBABILITY_CLIP))


def test_the_estimate_without_labels_brackets_the_performance_of_calibrated_scores_and_not_of_a_broken_model() -> None:
    rng = np.random.default_rng(3)
    scores = rng.beta(2, 2, 2000)
    labels = rng.random(2000) < scores  # calibrated: the labels are drawn from the scores
    estimate = estimate_without_labels("binary", scores.tolist())
    actual_auc, actual_accuracy = skm.roc_auc_score(labels, scores), np.mean((scores >= 0.5) == labels)
    assert estimate["rocAuc"].low <= actual_auc <= estimate["rocAuc"].high
    assert estimate["accuracy"].low <= actual_accuracy <= estimate["accuracy"].high
    assert estimate["accuracy"].high - estimate["accuracy"].low < 0.06
    # a model whose scores no longer say anything about the labels: its estimate still says what calibrated
    # scores would give, and the live metric on labels shows the gap (why labels are preferred where they come)
    broken = rng.permutation(scores)
    assert skm.roc_auc_score(labels, broken) < estimate_without_labels("binary", broken.tolist())["rocAuc"].low
    multiclass = estimate_without_labels("multiclass", [[0.8, 0.1, 0.1]] * 500)
    assert multiclass["accuracy"].low < 0.8 < multiclass["accuracy"].high
    assert estimate_without_labels("regression", [1.0]) == {}
