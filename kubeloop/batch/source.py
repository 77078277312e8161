"""A BatchPrediction's input: where it is, its digest and size, its columns, and a Ray Data dataset over it.

The input is a CSV (.csv, .csv.gz) or Parquet (.parquet, .pq) file, a directory of Parquet files, or a .zip
holding one CSV (``bundled://NAME`` is one); a path (relative to the working directory) or an fsspec URI.

Its digest is the sha256 of the file's bytes (of each Parquet file's relative name and bytes, in name order, for a
directory), read in chunks: the snapshot digest of the data layer (kubeloop.data.snapshot) would identify the
table whatever its format, but it serializes the whole table in memory, which a batch of millions of rows must not.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data
from pyarrow.fs import FSSpecHandler, PyFileSystem

from kubeloop.api.modelversion import Feature
from kubeloop.data.bundled import bundled_path
from kubeloop.data.snapshot import BUNDLED_SCHEME
from kubeloop.errors import DataError

Format = Literal["parquet", "csv", "zip"]
_SUFFIXES: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv", ".zip": "zip"}
_CHUNK = 1 << 20
BATCHES_PER_BLOCK = 16
UNKNOWN_BYTES_PER_ROW = 100


@dataclass
class Source:
    uri: str
    fs: fsspec.AbstractFileSystem
    files: list[str]  # the file, or a directory's Parquet files in name order
    root: str
    format: Format
    digest: str
    rows: int | None  # None: not known before reading (a .csv.gz)
    bytes_per_row: float
    schema: pa.Schema  # feature columns of a CSV as strings: their values are checked row by row
    _frame: pa.Table | None = None  # a .zip, read whole

    def dataset(self, batch_size: int, actors: int) -> ray.data.Dataset:
        """The rows as a Ray Data dataset in blocks of several batches (each block is one actor task: fewer tasks,
        less overhead), at least four per actor when there are rows enough, so that every actor gets work."""
        rows = self.rows or 4 * actors * BATCHES_PER_BLOCK * batch_size  # a .csv.gz: the largest blocks
        block_rows = min(max(rows // (4 * actors), batch_size), BATCHES_PER_BLOCK * batch_size)
        if self._frame is not None:
            slices = [self._frame.slice(start, block_rows) for start in range(0, self._frame.num_rows, block_rows)]
            return ray.data.from_arrow(slices)
        filesystem = None if _is_local(self.fs) else PyFileSystem(FSSpecHandler(self.fs))
        context = ray.data.DataContext.get_current()
        v2 = context.use_datasource_v2
        # Ray Data's V2 file reads list the files in a task of 1 CPU that waits forever once the actors hold every
        # CPU; V1 reads take the CPUs they are given: none, as they are I/O and decoding beside the scoring
        context.use_datasource_v2 = False
        try:
            if self.format == "parquet":
                ds = ray.data.read_parquet(self.files, filesystem=filesystem, num_cpus=0)
            else:
                text = {n: pa.string() for n in self.schema.names if pa.types.is_string(self.schema.field(n).type)}
                ds = ray.data.read_csv(
                    self.files,
                    filesystem=filesystem,
                    num_cpus=0,
                    convert_options=pacsv.ConvertOptions(column_types=text, strings_can_be_null=True),
                )
        finally:
            context.use_datasource_v2 = v2
        # the read splits its output into blocks of this many bytes (the default, 128 MiB, makes a million rows
        # one block, and one actor would score them all)
        ds.context.target_max_block_size = max(1 << 16, int(self.bytes_per_row * block_rows))
        return ds


def open_source(uri: str, features: list[Feature]) -> Source:
    """Find the input and read what is known before scoring: digest, rows, columns (the features of a CSV as text)."""
    where = uri
    if uri.startswith(BUNDLED_SCHEME):
        uri = str(bundled_path(uri.removeprefix(BUNDLED_SCHEME)))
    fs, root = fsspec.core.url_to_fs(uri if "://" in uri else str(Path(uri).expanduser().resolve()))
    if fs.isdir(root):
        files = sorted(
            path
            for path in fs.find(root)
            if path.endswith((".parquet", ".pq"))
            and not any(part.startswith(("_", ".")) for part in Path(path).relative_to(root).parts)
        )
        if not files:
            raise DataError(f"spec.input: {where} is a directory without Parquet files (*.parquet, *.pq)")
        fmt: Format = "parquet"
    elif fs.isfile(root):
        files = [root]
        fmt = next((f for suffix, f in _SUFFIXES.items() if root.lower().endswith(suffix)), None)
        if fmt is None:
            raise DataError(f"spec.input: unknown format of {where}: expected a file ending in {', '.join(_SUFFIXES)}")
    else:
        raise DataError(f"spec.input: no such file or directory: {where}")
    digest, lines = _digest(fs, root, files, count_lines=fmt == "csv" and not root.endswith(".gz"))
    size = sum(fs.size(path) for path in files)
    if fmt == "parquet":
        metadata = [pq.ParquetFile(fs.open(path)).metadata for path in files]
        rows = sum(m.num_rows for m in metadata)
        in_memory = sum(m.row_group(i).total_byte_size for m in metadata for i in range(m.num_row_groups))
        schema = pq.read_schema(fs.open(files[0]))
        return Source(where, fs, files, root, fmt, digest, rows, in_memory / max(rows, 1), schema)
    if fmt == "zip":
        frame = _read_zip(fs, root, features)
        return Source(where, fs, files, root, fmt, digest, frame.num_rows, UNKNOWN_BYTES_PER_ROW, frame.schema, frame)
    names = _csv_header(fs, root)
    features_by_name = {f.name for f in features}
    schema = pa.schema([(name, pa.string() if name in features_by_name else pa.null()) for name in names])
    rows = None if lines is None else max(lines - 1, 0)
    # arrow holds a CSV's text in about twice its bytes (offsets, validity); unknown rows (.csv.gz): a guess
    bytes_per_row = 2 * size / rows if rows else UNKNOWN_BYTES_PER_ROW
    return Source(where, fs, files, root, fmt, digest, rows, bytes_per_row, schema)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _digest(fs: fsspec.AbstractFileSystem, root: str, files: list[str], count_lines: bool) -> tuple[str, int | None]:
    sha = hashlib.sha256()
    lines, last = 0, b"\n"
    for path in files:
        if len(files) > 1 or path != root:
            sha.update(str(Path(path).relative_to(root)).encode() + b"\0")
        with fs.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                sha.update(chunk)
                if count_lines:
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
    if count_lines and last != b"\n":
        lines += 1  # the last row has no line end
    return "sha256:" + sha.hexdigest(), lines if count_lines else None


def _csv_header(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    with fs.open(path, "rt", compression="infer", encoding="utf-8", newline="") as stream:
        line = stream.readline()
    if not line.strip():
        raise DataError(f"spec.input: {path} is empty: a CSV needs a header row")
    return next(csv.reader([line]))


def _read_zip(fs: fsspec.AbstractFileSystem, path: str, features: list[Feature]) -> pa.Table:
    """A .zip holding one CSV, read whole (feature columns as text, as a CSV file's)."""
    with fs.open(path, "rb") as stream:
        try:
            frame = pd.read_csv(stream, compression="zip", dtype={f.name: str for f in features})
        except (ValueError, OSError) as e:
            raise DataError(f"spec.input: cannot read {path} as a .zip holding one CSV: {e}") from e
    return pa.Table.from_pandas(frame, preserve_index=False)
