from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kubeloop.data.snapshot import ingest, read_frame
from kubeloop.training.split import held_out_rows, split_rows


def heart(seed: int = 0) -> pd.DataFrame:
    """303 rows, 94 positives (31 %), and a slice column with a value of 3 rows, like the dataset of issue 14."""
    rng = np.random.default_rng(seed)
    target = np.array(["yes"] * 94 + ["no"] * 209)
    rng.shuffle(target)
    thal = rng.choice(["normal", "fixed", "reversible"], size=303, p=[0.55, 0.1, 0.35]).astype(object)
    thal[[17, 150, 290]] = "unknown"
    return pd.DataFrame(
        {
            "age": rng.integers(29, 78, size=303),
            "thal": pd.array(thal, dtype="string"),
            "target": pd.array(target, dtype="string"),
        }
    )


def split(frame: pd.DataFrame, **options) -> tuple[np.ndarray, np.ndarray]:
    settings = {"task": "binary", "label": "target", "slice_column": None, "test_fraction": 0.2, "seed": 7}
    return split_rows(frame, **(settings | options))


def rate(values: pd.Series) -> float:
    return float((values == "yes").mean())


@pytest.mark.parametrize("slice_column", [None, "thal"])
@pytest.mark.parametrize("seed", range(20))
def test_class_rates_in_test_and_train_match_the_data(seed: int, slice_column: str | None) -> None:
    frame = heart()
    train, test = split(frame, seed=seed, slice_column=slice_column)

    overall = rate(frame.target)
    assert abs(rate(frame.target.iloc[test]) - overall) <= 0.02
    assert abs(rate(frame.target.iloc[train]) - overall) <= 0.02
    assert len(test) == held_out_rows(303, 0.2) == 61


def test_the_split_is_a_partition_and_the_seed_reproduces_it() -> None:
    frame = heart()
    train, test = split(frame, slice_column="thal")

    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(frame)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = split(frame.copy(), slice_column="thal")
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, split(frame, slice_column="thal", seed=8)[1])


def test_a_small_slice_gets_test_rows_and_slices_keep_their_share() -> None:
    frame = heart()
    for seed in range(20):
        _, test = split(frame, slice_column="thal", seed=seed)
        in_test = frame.thal.iloc[test].value_counts()

        assert in_test.get("unknown", 0) >= 1
        for value, count in frame.thal.value_counts().items():
            assert abs(in_test.get(value, 0) - 0.2 * count) <= 1.5, (seed, value)


def test_a_slice_of_two_rows_in_two_classes_is_tested() -> None:
    frame = pd.DataFrame(
        {
            "shop": ["big"] * 98 + ["tiny", "tiny"],
            "target": ["yes", "no"] * 50,
        }
    )
    for seed in range(10):
        _, test = split(frame, slice_column="shop", seed=seed)
        assert (frame.shop.iloc[test] == "tiny").sum() == 1


def test_a_slice_no_other_slice_can_cover_takes_one_more_test_row() -> None:
    # 2 test rows, one per class; the only other slice of class a has a single test row to give
    frame = pd.DataFrame({"shop": ["p"] * 3 + ["q"] * 2 + ["r"] * 5, "target": ["a"] * 5 + ["b"] * 5})
    _, test = split(frame, slice_column="shop")

    assert sorted(frame.shop.iloc[test]) == ["p", "q", "r"]


@pytest.mark.parametrize("test_fraction", [0.01, 0.2, 0.5, 0.9])
def test_every_class_of_three_rows_gets_a_test_row_and_two_training_rows(test_fraction: float) -> None:
    frame = pd.DataFrame({"target": ["big"] * 120 + [f"rare{i}" for i in range(8) for _ in range(3)] + ["pair"] * 2})
    train, test = split(frame, task="multiclass", test_fraction=test_fraction)

    in_test = frame.target.iloc[test].value_counts()
    in_train = frame.target.iloc[train].value_counts()
    for value in frame.target.unique():
        assert in_test.get(value, 0) >= 1, value
        assert in_train.get(value, 0) >= (2 if value != "pair" else 1), value


def test_test_share_stays_at_the_fraction_with_many_small_classes() -> None:
    frame = pd.DataFrame({"target": [f"c{i % 40}" for i in range(400)]})
    _, test = split(frame, task="multiclass", test_fraction=0.25)

    assert len(test) == 100
    assert frame.target.iloc[test].value_counts().between(2, 3).all()


def test_regression_test_rows_span_the_label() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=500), "price": rng.lognormal(3, 1, size=500)})
    _, test = split(frame, task="regression", label="price")

    assert len(test) == 100
    quantiles = frame.price.quantile([0.1, 0.5, 0.9]).to_numpy()
    assert np.allclose(frame.price.iloc[test].quantile([0.1, 0.5, 0.9]).to_numpy(), quantiles, rtol=0.1)
    top = frame.price >= frame.price.quantile(0.9)
    assert top.iloc[test].sum() == 10
    assert np.array_equal(test, split(frame, task="regression", label="price")[1])


def test_the_bundled_arrests_split_keeps_the_release_rate() -> None:
    frame = read_frame(ingest("bundled://arrests"))
    train, test = split(frame, label="released", slice_column="colour")

    released = frame.released == "Yes"
    assert abs(released.iloc[test].mean() - released.mean()) < 0.002
    assert abs(released.iloc[train].mean() - released.mean()) < 0.002
    assert len(test) == held_out_rows(len(frame), 0.2)


@pytest.mark.parametrize(("rows", "expected"), [(1, 0), (2, 1), (3, 1), (10, 2), (303, 61), (1000, 200)])
def test_held_out_rows_leave_a_row_on_each_side(rows: int, expected: int) -> None:
    assert held_out_rows(rows, 0.2) == expected
    assert held_out_rows(rows, 0.999) == max(0, rows - 1)
