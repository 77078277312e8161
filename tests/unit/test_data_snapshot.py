from __future__ import annotations

import zipfile
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from kubeloop.config import snapshots_dir
from kubeloop.data.bundled import ARRESTS, bundled_path, get_bundled
from kubeloop.data.snapshot import ingest, list_snapshots, load_snapshot, read_frame, snapshot_path
from kubeloop.errors import DataError


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "score": [0.1, 1 / 3, None, 2.5e-17],
            "count": pd.array([1, None, 3, 4], dtype="Int64"),
            "active": pd.array([True, False, None, True], dtype="boolean"),
            "city": pd.array(["Oslo", None, "Lima, Peru", 'say "hi"'], dtype="string"),
        }
    )


def test_digest_is_the_same_for_csv_parquet_and_every_container(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_csv(tmp_path / "t.csv.gz", index=False)
    table.to_parquet(tmp_path / "t.parquet", index=False)
    table.to_parquet(tmp_path / "t.pq", index=False)
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as archive:
        archive.write(tmp_path / "t.csv", "inner.csv")
    with fsspec.open("memory://bucket/t.csv", "w") as f:
        table.to_csv(f, index=False)

    first = ingest(str(tmp_path / "t.csv"))
    uris = ["t.csv.gz", "t.parquet", "t.pq", "t.zip"]
    others = [ingest(str(tmp_path / uri)) for uri in uris]
    others += [ingest(f"file://{tmp_path / 't.parquet'}"), ingest("memory://bucket/t.csv")]

    assert first.digest.startswith("sha256:") and len(first.hex) == 64
    assert {s.digest for s in others} == {first.digest}
    assert first.rows == 4
    assert first.columns == {"score": "float", "count": "int", "active": "bool", "city": "string"}
    assert first.stats["count"].null_rate == 0.25
    assert first.stats["city"].categories == {"Oslo": 1, "Lima, Peru": 1, 'say "hi"': 1}
    assert first.stats["score"].min == 2.5e-17


def test_stored_frame_equals_the_source(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_parquet(tmp_path / "t.parquet", index=False)
    snapshot = ingest(str(tmp_path / "t.parquet"))

    frame = read_frame(snapshot)

    pd.testing.assert_frame_equal(frame, table.astype({"count": "Int64"}), check_dtype=False)
    assert [str(t) for t in frame.dtypes] == ["float64", "Int64", "boolean", "string"]
    assert snapshot_path(snapshot) == snapshots_dir() / snapshot.hex / "data.parquet"


def test_different_data_gets_a_different_digest(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_csv(tmp_path / "a.csv", index=False)
    changed = table.copy()
    changed.loc[0, "score"] = 0.1000000001
    changed.to_csv(tmp_path / "b.csv", index=False)
    empty_string = table.copy()
    empty_string.loc[1, "city"] = ""
    empty_string.to_parquet(tmp_path / "c.parquet", index=False)

    digests = {ingest(str(tmp_path / name)).digest for name in ("a.csv", "b.csv", "c.parquet")}

    assert len(digests) == 3
    assert len(list_snapshots()) == 3


def test_reingest_returns_the_stored_snapshot_and_rewrites_nothing(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_parquet(tmp_path / "t.parquet", index=False)
    first = ingest(str(tmp_path / "t.csv"))
    directory = snapshots_dir() / first.hex
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}

    again = ingest(str(tmp_path / "t.parquet"))

    assert again == first
    assert again.source == str(tmp_path / "t.csv")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()} == before
    assert sorted(before) == ["data.parquet", "snapshot.json"]
    assert [p.name for p in snapshots_dir().iterdir()] == [first.hex]


def test_load_by_digest_hex_and_prefix(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_csv(tmp_path / "t.csv", index=False)
    snapshot = ingest(str(tmp_path / "t.csv"))

    for ref in (snapshot.digest, snapshot.hex, snapshot.hex[:8], f"sha256:{snapshot.hex[:12]}"):
        assert load_snapshot(ref) == snapshot
    with pytest.raises(DataError, match="at least 8 hex digits"):
        load_snapshot(snapshot.hex[:7])
    with pytest.raises(DataError, match="no snapshot matches"):
        load_snapshot("0" * 64 if not snapshot.hex.startswith("0") else "1" * 64)


def test_an_ambiguous_prefix_is_rejected(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_csv(tmp_path / "t.csv", index=False)
    snapshot = ingest(str(tmp_path / "t.csv"))
    twin = snapshots_dir() / (snapshot.hex[:8] + "f" * 56)
    twin.mkdir()
    (twin / "snapshot.json").write_text((snapshots_dir() / snapshot.hex / "snapshot.json").read_text())

    with pytest.raises(DataError, match="ambiguous"):
        load_snapshot(snapshot.hex[:8])
    assert load_snapshot(snapshot.hex) == snapshot


def test_bundled_arrests_ingests() -> None:
    snapshot = ingest("bundled://arrests")

    assert snapshot.rows == 5226
    assert list(snapshot.columns) == [
        "released", "colour", "year", "age", "sex", "employed", "citizen", "checks"
    ]  # fmt: skip
    assert snapshot.source == "bundled://arrests"
    assert snapshot.stats["released"].categories == {"Yes": 4334, "No": 892}
    assert ingest(str(bundled_path("arrests"))).digest == snapshot.digest
    assert get_bundled("arrests") is ARRESTS


def test_unknown_bundled_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="unknown bundled dataset 'iris': known are abalone, arrests, penguins"):
        ingest("bundled://iris")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "empty file: .*empty.csv"),
        ("header.csv", b"a,b\n", "header.csv has no rows"),
        ("table.txt", b"a,b\n1,2\n", "unknown format for .*table.txt: expected a file ending in .csv"),
        ("broken.parquet", b"not parquet at all", "cannot parse .*broken.parquet as parquet"),
        ("broken.csv.gz", b"not gzip", "cannot parse .*broken.csv.gz as csv.gz"),
    ],
)
def test_bad_files_are_rejected_with_the_problem_named(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        ingest(str(tmp_path / name))
    assert list_snapshots() == []


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such file: .*nowhere\.csv"):
        ingest(str(tmp_path / "nowhere.csv"))
    with pytest.raises(DataError, match=r"no such file: memory://nowhere/t\.parquet"):
        ingest("memory://nowhere/t.parquet")


def test_zip_with_several_files_is_rejected(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.csv", "x\n1\n")
        archive.writestr("b.csv", "x\n2\n")

    with pytest.raises(DataError, match=r"holds 2 files: a \.zip must hold exactly one CSV"):
        ingest(str(tmp_path / "two.zip"))
