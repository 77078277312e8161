"""Pure parts of the splitter's shadow and feedback routing: the pairing of two answers, the bounded map of served
ids, the split of a feedback body by version, the mirror's bounded copies and the run-time admin changes."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import CollectorRegistry

from serving.mirror import MAX_IN_FLIGHT, Mirror, ShadowMetrics, compare, predictions
from serving.served_ids import Served, ServedIds, split_feedback
from serving.splitter import Backend, Splitter, SplitterMetrics, bucket


def v1(*rows: object) -> bytes:
    return orjson.dumps({"predictions": list(rows)})


def test_binary_answers_agree_on_the_same_side_of_one_half() -> None:
    same = compare("binary", v1(0.9, 0.2), v1(0.6, 0.1))
    assert (same.agree, same.rows) == (True, 2) and same.distance == pytest.approx(0.4)
    other = compare("binary", v1(0.9, 0.2), v1(0.4, 0.1))
    assert (other.agree, other.rows) == (False, 2) and other.distance == pytest.approx(0.6)
    assert compare("binary", v1(0.5), v1(0.5001)).agree  # 0.5 is on the positive side, as the model's threshold


def test_multiclass_answers_agree_on_the_argmax_their_distance_the_largest_difference() -> None:
    found = compare("multiclass", v1([0.7, 0.2, 0.1], [0.1, 0.8, 0.1]), v1([0.5, 0.4, 0.1], [0.6, 0.3, 0.1]))
    assert (found.agree, found.rows) == (False, 2)
    assert found.distance == pytest.approx(0.2 + 0.5)


def test_regression_answers_agree_within_ten_percent_of_the_users() -> None:
    assert compare("regression", v1(10.0, -20.0), v1(10.9, -18.1)).agree
    far = compare("regression", v1(10.0), v1(11.5))
    assert not far.agree and far.distance == pytest.approx(1.5)


def test_answers_that_cannot_be_lined_up_disagree_with_no_rows() -> None:
    for shadow in (v1(0.1), b"not json", orjson.dumps({"error": "x"}), v1("a", "b")):
        found = compare("binary", v1(0.9, 0.2), shadow)
        assert (found.agree, found.distance, found.rows) == (False, 0.0, 0)


def test_v2_answers_are_read_by_rows() -> None:
    flat = {"outputs": [{"name": "probability", "shape": [2], "data": [0.1, 0.9]}]}
    assert predictions(orjson.dumps(flat)) == [0.1, 0.9]
    square = {"outputs": [{"name": "probabilities", "shape": [2, 3], "data": [0.7, 0.2, 0.1, 0.1, 0.8, 0.1]}]}
    assert predictions(orjson.dumps(square)) == [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]
    assert compare("multiclass", orjson.dumps(square), v1([0.6, 0.3, 0.1], [0.2, 0.7, 0.1])).agree


def test_served_ids_keep_the_newest() -> None:
    served = ServedIds(capacity=3)
    for i in range(4):
        served.remember(f"id-{i}", "1", "3" if i % 2 else None)
    assert served.get("id-0") is None and len(served) == 3
    assert served.get("id-1") == Served("1", "3") and served.get("id-2") == Served("1")
    served.remember("id-1", "2")  # seen again: the newest, its version as now
    served.remember("id-4", "1")
    assert served.get("id-2") is None and served.get("id-1") == Served("2")
    with pytest.raises(ValueError, match="at least 1"):
        ServedIds(0)


def test_feedback_is_split_by_the_version_that_served_each_id() -> None:
    served = ServedIds(capacity=10)
    served.remember("a", "1", "3")
    served.remember("b", "2")
    served.remember("c", "1")
    body = {"feedback": [{"id": "b", "label": 1}, {"id": "a", "label": 0}, {"id": "x", "label": 1}, {"id": "c"}]}
    split = split_feedback(orjson.dumps(body), served, "1")
    assert split is not None
    by_version, by_shadow = split
    assert {v: p.positions for v, p in by_version.items()} == {"2": [0], "1": [1, 2, 3]}  # x: never seen, stable
    assert orjson.loads(by_version["1"].body()) == {"feedback": [body["feedback"][i] for i in (1, 2, 3)]}
    assert {v: p.positions for v, p in by_shadow.items()} == {"3": [1]}
    # the stable's server refuses its part's second entry: named as the client sent it
    message = "feedback[1].labels[0]: 0.5 is not 0/1"
    assert by_version["1"].in_client_terms(message) == "feedback[2].labels[0]: 0.5 is not 0/1"
    for not_entries in (b"nope", b"[]", b'{"feedback": []}', b'{"feedback": [{"label": 1}]}', b'{"feedback": [3]}'):
        assert split_feedback(not_entries, served, "1") is None


def test_the_mirror_takes_the_top_buckets_and_drops_copies_over_its_bound() -> None:
    metrics = ShadowMetrics(CollectorRegistry())
    mirror = Mirror(Backend("3", "http://c"), 30, "binary", metrics)
    ids = [f"r{i}" for i in range(1000)]
    assert [i for i in ids if mirror.mirrors(bucket(i))] == [i for i in ids if bucket(i) >= 70]
    assert mirror.pair(200, v1(0.9), 500, b"") is None and mirror.pair(400, b"", 200, v1(0.9)) is None
    mirror.pair(200, v1(0.9), 200, v1(0.1))
    mirror.pair(200, v1(0.9), 200, v1(0.8))

    def value(name: str, **labels: str) -> float | None:
        return _sample(metrics, name, labels)

    assert value("kubeloop_shadow_pairs_total", version="3", agree="true") == 1
    assert value("kubeloop_shadow_pairs_total", version="3", agree="false") == 1
    assert value("kubeloop_shadow_distance_total", version="3") == pytest.approx(0.9)
    assert value("kubeloop_shadow_rows_total", version="3") == 2

    async def flood() -> list[bool]:
        release = asyncio.Event()
        accepted = [mirror.submit(release.wait) for _ in range(MAX_IN_FLIGHT + 5)]
        release.set()
        await asyncio.sleep(0)
        return accepted

    accepted = asyncio.run(flood())
    assert accepted.count(True) == MAX_IN_FLIGHT and value("kubeloop_shadow_dropped_total", version="3") == 5
    with pytest.raises(ValueError, match="shadowPercent: expected an integer from 0 to 100, got 101"):
        mirror.set_percent(101)


def _sample(metrics: ShadowMetrics, name: str, labels: dict[str, str]) -> float | None:
    for family in (metrics.pairs, metrics.distance, metrics.rows, metrics.dropped):
        for metric in family.collect():
            for sample in metric.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
    return None


def splitter_with_shadow() -> Splitter:
    return Splitter(
        Backend("1", "http://a"),
        None,
        0,
        shadow=Backend("3", "http://c"),
        shadow_percent=50,
        metrics=SplitterMetrics(registry=None),
    )


def test_admin_changes_apply_whole_or_not_at_all() -> None:
    splitter = splitter_with_shadow()
    assert splitter.traffic()["shadow"] == {
        "version": "3",
        "url": "http://c",
        "percent": 50,
        "task": "binary",
        "inFlight": 0,
    }
    refusals = {
        "percent: no candidate behind this splitter": {"percent": 10, "shadowPercent": 20},
        "shadowPercent: expected an integer from 0 to 100, got 200": {"shadowPercent": 200},
        "promoteShadow: expected true": {"promoteShadow": False},
        "shadowPercent: no shadow behind this splitter": {"promoteShadow": True, "shadowPercent": 10},
        "percent: expected an integer from 0 to 100, got -1": {"promoteShadow": True, "percent": -1},
    }
    for message, change in refusals.items():
        with pytest.raises(ValueError, match=message):
            splitter._change(change)
        assert splitter.mirror is not None and splitter.mirror.percent == 50 and splitter.candidate is None
    splitter._change({"shadowPercent": 0})
    assert splitter.traffic()["shadow"]["percent"] == 0
    splitter._change({"promoteShadow": True, "percent": 25})
    assert splitter.traffic() == {
        "percent": 25,
        "stable": {"version": "1", "url": "http://a"},
        "candidate": {"version": "3", "url": "http://c"},
    }
    assert [splitter.choose(f"r{i}").version for i in range(200)].count("3") == sum(
        bucket(f"r{i}") < 25 for i in range(200)
    )
    with pytest.raises(ValueError, match="needs a shadow and no candidate"):
        splitter._change({"promoteShadow": True})


def test_versions_behind_a_splitter_differ() -> None:
    with pytest.raises(ValueError, match="must differ"):
        Splitter(
            Backend("1", "http://a"),
            Backend("2", "http://b"),
            0,
            shadow=Backend("2", "http://c"),
            metrics=SplitterMetrics(registry=None),
        )
