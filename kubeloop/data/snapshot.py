"""Immutable, content-addressed dataset snapshots.

A snapshot is a table normalized to four dtypes (float, int, bool, string), identified by the sha256 of a
canonical serialization and stored once under ``snapshots_dir()/<hex>/`` as ``data.parquet`` plus
``snapshot.json``. The same table read from CSV or Parquet gets the same digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

import fsspec
import pandas as pd
from pandas.api import types as ptypes
from pydantic import BaseModel

from kubeloop.config import snapshots_dir
from kubeloop.errors import DataError

log = logging.getLogger(__name__)

Dtype = Literal["float", "int", "bool", "string"]

CATEGORY_CAP = 1000
DATA_FILE = "data.parquet"
META_FILE = "snapshot.json"
BUNDLED_SCHEME = "bundled://"
_FORMATS = {".csv": "csv", ".csv.gz": "csv.gz", ".parquet": "parquet", ".pq": "parquet", ".zip": "zip"}
# pandas storage dtype for each kubeloop dtype: nullable ints and bools keep integers exact next to nulls
_STORAGE = {"float": "float64", "int": "Int64", "bool": "boolean", "string": "string"}


class ColumnStats(BaseModel):
    null_rate: float
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    # string/bool columns: value -> count, the CATEGORY_CAP most frequent values
    categories: dict[str, int] | None = None


class Snapshot(BaseModel):
    digest: str
    source: str
    rows: int
    columns: dict[str, Dtype]
    stats: dict[str, ColumnStats]
    created: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


def ingest(uri: str) -> Snapshot:
    """Read a CSV/Parquet table (a path, an fsspec URI or ``bundled://<name>``) and store it as a snapshot."""
    source = uri if "://" in uri else str(Path(uri).expanduser().resolve())
    frame = _normalize(_read(source), uri)
    digest = _digest(frame)
    existing = _try_load(digest)
    if existing is not None:
        log.info("snapshot %s already stored (from %s)", digest, existing.source)
        return existing
    snapshot = Snapshot(
        digest=digest,
        source=source,
        rows=len(frame),
        columns={name: dtype_of(frame[name]) for name in frame.columns},
        stats={name: column_stats(frame[name]) for name in frame.columns},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    log.info("storing snapshot %s: %d rows, %d columns from %s", digest, snapshot.rows, len(frame.columns), uri)
    return _store(snapshot, frame)


def load_snapshot(ref: str) -> Snapshot:
    """Find a stored snapshot by ``sha256:<hex>``, ``<hex>`` or a unique prefix of at least 8 hex digits."""
    hex_ref = ref.strip().removeprefix("sha256:").lower()
    if len(hex_ref) < 8 or any(c not in "0123456789abcdef" for c in hex_ref):
        raise DataError(f"invalid snapshot reference {ref!r}: give 'sha256:<hex>' or at least 8 hex digits")
    root = snapshots_dir()
    matches = sorted(p.name for p in root.glob(f"{hex_ref}*") if (p / META_FILE).is_file()) if root.is_dir() else []
    if not matches:
        raise DataError(f"no snapshot matches {ref!r} in {root}: run `kubeloop data ingest <uri>` first")
    if len(matches) > 1:
        raise DataError(f"snapshot reference {ref!r} is ambiguous ({', '.join(matches)}): give more digits")
    return _read_meta(root / matches[0])


def list_snapshots() -> list[Snapshot]:
    root = snapshots_dir()
    if not root.is_dir():
        return []
    found = [_read_meta(p) for p in root.iterdir() if (p / META_FILE).is_file()]
    return sorted(found, key=lambda s: (s.created, s.digest))


def snapshot_path(snapshot: Snapshot) -> Path:
    return snapshots_dir() / snapshot.hex / DATA_FILE


def read_frame(snapshot: Snapshot, columns: list[str] | None = None) -> pd.DataFrame:
    """The snapshot's table with dtypes float64, Int64, boolean and string."""
    path = snapshot_path(snapshot)
    if not path.is_file():
        raise DataError(f"snapshot {snapshot.digest} has no data at {path}: re-ingest {snapshot.source}")
    return pd.read_parquet(path, columns=columns)


def _read(uri: str) -> pd.DataFrame:
    if uri.startswith(BUNDLED_SCHEME):
        from kubeloop.data.bundled import bundled_path

        uri = str(bundled_path(uri.removeprefix(BUNDLED_SCHEME)))
    fmt = next((f for suffix, f in _FORMATS.items() if uri.lower().endswith(suffix)), None)
    if fmt is None:
        raise DataError(f"unknown format for {uri}: expected a file ending in {', '.join(_FORMATS)}")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {uri}: {e}") from e
    if not fs.isfile(path):
        raise DataError(f"no such file: {uri}")
    if fs.size(path) == 0:
        raise DataError(f"empty file: {uri} has no header and no rows")
    try:
        with fs.open(path, "rb") as f:
            frame = _parse(f, fmt, uri)
    except DataError:
        raise
    except Exception as e:  # pandas, pyarrow, zipfile and gzip each raise their own types for corrupt input
        raise DataError(f"cannot parse {uri} as {fmt}: {e}") from e
    if frame.empty:
        raise DataError(f"{uri} has no rows: a snapshot needs at least one row")
    return frame


def _parse(f: IO[bytes], fmt: str, uri: str) -> pd.DataFrame:
    if fmt == "parquet":
        return pd.read_parquet(f, dtype_backend="numpy_nullable")
    if fmt == "zip":
        with zipfile.ZipFile(f) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise DataError(f"{uri} holds {len(members)} files: a .zip must hold exactly one CSV")
            return _read_csv(io.BytesIO(archive.read(members[0])), compression=None)
    return _read_csv(f, compression="gzip" if fmt == "csv.gz" else None)


def _read_csv(f: IO[bytes], compression: str | None) -> pd.DataFrame:
    try:
        # round_trip: the C parser's default float parsing can be one ulp off, which would change the digest
        return pd.read_csv(f, compression=compression, dtype_backend="numpy_nullable", float_precision="round_trip")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def dtype_of(series: pd.Series) -> Dtype:
    """kubeloop's dtype of a pandas column: anything neither bool nor numeric is a string."""
    if ptypes.is_bool_dtype(series.dtype):
        return "bool"
    if ptypes.is_integer_dtype(series.dtype):
        return "int"
    if ptypes.is_float_dtype(series.dtype):
        return "float"
    return "string"


def _normalize(frame: pd.DataFrame, uri: str) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    duplicated = frame.columns[frame.columns.duplicated()].tolist()
    if duplicated:
        raise DataError(f"{uri} has duplicate column names {duplicated}: rename them")
    return frame.astype({name: _STORAGE[dtype_of(frame[name])] for name in frame.columns})


def _digest(frame: pd.DataFrame) -> str:
    header = json.dumps({name: dtype_of(frame[name]) for name in frame.columns})
    # a null must not serialize like an empty string, or two different tables would share a digest
    body = frame.to_csv(index=False, lineterminator="\n", na_rep="\\N")
    return "sha256:" + hashlib.sha256(f"{header}\n{body}".encode()).hexdigest()


def column_stats(series: pd.Series) -> ColumnStats:
    null_rate = float(series.isna().mean())
    if dtype_of(series) in ("bool", "string"):
        counts = series.dropna().astype(str).value_counts().head(CATEGORY_CAP)
        return ColumnStats(null_rate=null_rate, categories={str(k): int(v) for k, v in counts.items()})
    values = series.dropna().astype("float64")
    if values.empty:
        return ColumnStats(null_rate=null_rate)
    return ColumnStats(
        null_rate=null_rate,
        min=float(values.min()),
        max=float(values.max()),
        mean=float(values.mean()),
        std=float(values.std(ddof=0)),
    )


def _store(snapshot: Snapshot, frame: pd.DataFrame) -> Snapshot:
    root = snapshots_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ingest-", dir=root))
    try:
        frame.to_parquet(tmp / DATA_FILE, index=False)
        (tmp / META_FILE).write_text(snapshot.model_dump_json(indent=2, exclude_none=True) + "\n")
        for name in (DATA_FILE, META_FILE):
            (tmp / name).chmod(0o444)
        tmp.chmod(0o755)  # mkdtemp makes it private
        # rename is atomic: readers never see a half-written snapshot
        os.rename(tmp, root / snapshot.hex)
    except OSError:
        # a concurrent ingest of the same table won the rename: keep its snapshot, it holds the same data
        stored = _try_load(snapshot.digest)
        if stored is None:
            raise
        return stored
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return snapshot


def _try_load(digest: str) -> Snapshot | None:
    directory = snapshots_dir() / digest.removeprefix("sha256:")
    return _read_meta(directory) if (directory / META_FILE).is_file() else None


def _read_meta(directory: Path) -> Snapshot:
    return Snapshot.model_validate_json((directory / META_FILE).read_text())
