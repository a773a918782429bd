"""Sharded datasets: Parquet shards of bounded size plus a manifest written last.

A split used to be one ``arrays.npz`` holding every row, so every stage needed
the whole dataset in memory at once. A *sharded dataset* is a directory (a
local path or an ``s3://`` prefix) of

* ``part-00000.parquet``, ``part-00001.parquet``, ...: each holds at most
  ``shard_bytes`` of values (64 MiB by default), in row groups of at most
  ``ROW_GROUP_BYTES``, so a reader never needs more than one shard in memory;
* ``_manifest.json``, written **last**: format and version, the `Schema`,
  the number of features, total rows and class counts, and per shard its
  name, rows, bytes, sha256 and class counts, plus a free ``stats`` slot for
  fitted statistics (scaler parameters and the like).

The manifest is what "the dataset exists" means. Readers refuse a directory
without one (a writer that died halfway leaves shards but no manifest) and
check each shard's size and sha256 before using its rows, so a truncated or
altered shard fails with one line naming it instead of with a Parquet error
three stages later.

Columns: the features are ONE ``FixedSizeList<float32>`` column ``x`` (one
list of ``features`` values per row) and the labels an ``int32`` column
``y``. One column and not one per feature because tables can be wide and
images have thousands of pixels: thousands of Parquet columns make footers of
megabytes, per-column overhead on every row group and slow schema handling,
while one fixed-size list column is a single contiguous float32 buffer that
turns into the 2-D ``(rows, features)`` array the models take without a copy
(``column.flatten().to_numpy().reshape(rows, features)``).

Image pixels may be stored as they were decoded (``dtype=np.uint8``): ``x`` is
then fixed-size binary, a byte per value (Parquet would store a list of uint8
as INT32 values), a quarter of float32's bytes on disk, over the network and in
a loader's memory. The manifest's ``decode`` (``offset``, ``scale``) turns a
stored value ``v`` into the feature ``(v - offset) / scale``; readers apply it
with a 256-entry float32 table, so every reader still gets float32 features
equal to what clean's float64 arithmetic cast to float32 gives.

Writes never publish half a dataset: local writes go to a temporary sibling
directory renamed into place (`kubetrain.data.datasets.atomic_dir`); on S3
the old manifest is deleted first, shards are written under the prefix and the
manifest last, and a failed write deletes what it wrote. S3 is reached through
pyarrow's ``S3FileSystem``, configured from the same variables as
`kubetrain.core.storage` (``S3_ENDPOINT_URL`` is passed explicitly: pyarrow
does not read it), with credentials redacted from every error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kubetrain.core import integrity, storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import Schema, atomic_dir, pixel_column, pixel_rows
from kubetrain.data.packed_json import pack, unpack

MiB = 1024 * 1024
FORMAT = "kubetrain-shards"
#: 2: per-pixel runs packed (`kubetrain.data.packed_json`)
VERSION = 2
#: Written last; its presence is what makes the directory a dataset.
MANIFEST = "_manifest.json"
#: Default bound on the values in one shard (uncompressed): big enough that S3 requests
#: and Parquet footers are a negligible share, small enough to hold one shard in memory.
DEFAULT_SHARD_BYTES = 64 * MiB
#: Bound on one row group (the unit a Parquet reader decodes at once).
ROW_GROUP_BYTES = 16 * MiB
#: Default rows per batch of `iter_batches` (training mini-batches are far smaller).
DEFAULT_BATCH_ROWS = 65536
#: What a reader tells the user to do about a missing or damaged dataset.
FIX = f"re-run the producing stage (locally: {integrity.FIX})"
_SHARD = "part-{:05d}.parquet"
#: A shard written by one task of a distributed writer (`write_part`): part-TASK-INDEX.
_TASK_SHARD = "part-{:05d}-{:05d}.parquet"
_SHARD_NAME = re.compile(r"part-\d{5,}(-\d{5,})?\.parquet")
_COMPRESSION = "snappy"  # fast both ways; float features hardly compress anyway
#: How features may be stored: float32, or uint8 image pixels with a ``decode``.
STORED = (np.dtype(np.float32), np.dtype(np.uint8))


# --- writing -----------------------------------------------------------------------


class ShardWriter:
    """Appends ``(X, y)`` batches to a sharded dataset; made by `writer`, which publishes it.

    A class because the state is real: the open shard, rows buffered for the
    next row group and the counts that go into the manifest. Memory stays
    bounded by one row group (``ROW_GROUP_BYTES``) plus the caller's batch.
    Fill ``stats`` (JSON-serialisable) before the ``with`` block ends to store
    fitted statistics in the manifest.
    """

    def __init__(
        self,
        opener: Callable[[str], BinaryIO],
        schema: Schema,
        shard_bytes: int,
        max_rows_per_shard: int | None,
        errors: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        name: Callable[[int], str] = _SHARD.format,
        dtype: Any = np.float32,
    ) -> None:
        if shard_bytes < 1 or (max_rows_per_shard is not None and max_rows_per_shard < 1):
            raise KubetrainError(
                f"shard_bytes={shard_bytes} / max_rows_per_shard={max_rows_per_shard} "
                "must be positive"
            )
        if np.dtype(dtype) not in STORED:
            raise KubetrainError(f"features stored as {np.dtype(dtype)}; use float32 or uint8")
        self.schema = schema
        self.stats: dict[str, Any] = {}
        #: uint8 storage: ``{"offset", "scale"}`` turning stored values into features; set
        #: before the ``with`` block ends (the scaler is often fitted while writing)
        self.decode: dict[str, float] | None = None
        self._dtype = np.dtype(dtype)
        self.manifest: dict[str, Any] = {}  # set once the dataset is published
        self.written: list[str] = []  # every shard name opened, for cleanup on failure
        self._opener = opener
        self._name = name  # shard number -> file name
        self._errors = errors  # turns storage errors into one line (S3)
        self._shard_bytes = shard_bytes
        self._max_rows = max_rows_per_shard
        self._features: int | None = None
        self._rows_per_shard = self._group_rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._counts = np.zeros(len(schema.class_names), np.int64)
        self._shard_counts = np.zeros(len(schema.class_names), np.int64)
        self._shard_rows = 0
        self._sink: _HashingSink | None = None
        self._parquet: pq.ParquetWriter | None = None

    @property
    def rows(self) -> int:
        """Rows accepted so far (written or buffered)."""
        return sum(s["rows"] for s in self._shards) + self._shard_rows + self._pending_rows

    def write(self, X: np.ndarray, y: np.ndarray) -> None:
        """Append rows: ``X`` is ``(n, features)`` (or ``(n, c, h, w)``, flattened), ``y``
        ``(n,)`` class indices. The arrays are copied, so the caller may reuse them."""
        X, y = np.asarray(X), np.asarray(y).reshape(-1)
        if X.ndim == 0 or len(X) != len(y):
            raise KubetrainError(
                f"features have {len(X) if X.ndim else 0} rows but labels {len(y)}; they must match"
            )
        X = X.reshape(len(X), -1)
        self._check_labels(y)
        if self._features is None:
            self._start(X.shape[1])
        elif X.shape[1] != self._features:
            raise KubetrainError(
                f"batch has {X.shape[1]} features but the dataset {self._features}; "
                "every batch must have the same columns"
            )
        with self._errors():
            self._append(X, y)

    def _append(self, X: np.ndarray, y: np.ndarray) -> None:
        start = 0
        while start < len(X):
            room = min(
                self._group_rows - self._pending_rows,
                self._rows_per_shard - self._shard_rows - self._pending_rows,
            )
            take = min(room, len(X) - start)
            self._pending.append(
                (
                    np.array(X[start : start + take], self._dtype, order="C"),
                    np.array(y[start : start + take], self._y_type.to_pandas_dtype()),
                )
            )
            self._pending_rows += take
            start += take
            if take == room:
                self._flush()

    def _start(self, features: int) -> None:
        """Size shards and row groups once the width is known (from the first batch)."""
        self._features = features
        row_bytes = self._dtype.itemsize * features + 4
        self._rows_per_shard = max(1, self._shard_bytes // row_bytes)
        if self._max_rows is not None:
            self._rows_per_shard = min(self._rows_per_shard, self._max_rows)
        self._group_rows = max(1, min(self._rows_per_shard, ROW_GROUP_BYTES // row_bytes))
        self._arrow_schema = pa.schema([("x", _x_type(self._dtype, features)), ("y", self._y_type)])

    @property
    def _y_type(self) -> pa.DataType:
        """Class codes as int32; a regression's targets as float32."""
        return pa.float32() if self.schema.regression else pa.int32()

    def _check_labels(self, y: np.ndarray) -> None:
        if not len(y):
            return
        if self.schema.regression:
            if not np.isfinite(y).all():
                raise KubetrainError("regression targets must be finite numbers")
            return
        if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
            raise KubetrainError(f"labels must be class indices (integers), got {y.dtype} values")
        low, high = int(y.min()), int(y.max())
        classes = len(self.schema.class_names)
        if low < 0 or (classes and high >= classes):
            bad = low if low < 0 else high
            raise KubetrainError(
                f"label {bad} is outside the schema's {classes} classes (0..{classes - 1}); "
                "labels must be class indices"
            )

    def _flush(self) -> None:
        """Write the buffered rows as one row group; close the shard when it is full."""
        if not self._pending_rows:
            return
        X = np.concatenate([p[0] for p in self._pending])
        y = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_rows = [], 0
        if self._parquet is None:
            name = self._name(len(self._shards))
            self.written.append(name)
            self._sink = _HashingSink(self._opener(name))
            self._parquet = pq.ParquetWriter(
                self._sink,
                self._arrow_schema,
                compression=_COMPRESSION,
                use_dictionary=["y"],  # dictionaries of float features only cost time
                write_statistics=["y"],
            )
        features = _x_array(X, self._arrow_schema.field("x").type)
        self._parquet.write_table(
            pa.Table.from_arrays([features, pa.array(y)], schema=self._arrow_schema),
            row_group_size=len(y),
        )
        self._shard_rows += len(y)
        if not self.schema.regression:
            self._shard_counts = _add_counts(self._shard_counts, y)
        if self._shard_rows >= self._rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._parquet is not None and self._sink is not None
        self._parquet.close()
        self._sink.close()
        self._shards.append(
            {
                "name": self.written[-1],
                "rows": self._shard_rows,
                "bytes": self._sink.size,
                "sha256": self._sink.digest.hexdigest(),
                "class_counts": self._shard_counts.tolist(),
            }
        )
        self._counts = _add_counts(self._counts, None, self._shard_counts)
        self._parquet = self._sink = None
        self._shard_rows = 0
        self._shard_counts = np.zeros(len(self.schema.class_names), np.int64)

    def finish(self) -> dict[str, Any]:
        """Write what is buffered, close the last shard and return the manifest."""
        with self._errors():
            self._flush()
            if self._parquet is not None:
                self._close_shard()
        features = self._features
        if features is None:  # no rows at all: the schema is all there is to go by
            features = len(self.schema.feature_names)
        stored = {}
        if self._dtype != np.float32:
            if self.decode is None:
                raise KubetrainError("uint8 features need decode (offset, scale) set")
            stored = {"dtype": str(self._dtype), "decode": dict(self.decode)}
        return {
            "format": FORMAT,
            "version": VERSION,
            "schema": _schema_json(self.schema),
            "features": features,
            **stored,
            "rows": sum(s["rows"] for s in self._shards),
            "class_counts": self._counts.tolist(),
            "shards": self._shards,
            "stats": self.stats,
        }

    def abort(self) -> None:
        """Close the open shard without recording it (its file is removed by `writer`)."""
        with contextlib.suppress(Exception):
            if self._parquet is not None:
                self._parquet.close()
        with contextlib.suppress(Exception):
            if self._sink is not None:
                self._sink.close()
        self._parquet = self._sink = None


@contextlib.contextmanager
def writer(
    uri: str | os.PathLike,
    schema: Schema,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_rows_per_shard: int | None = None,
    dtype: Any = np.float32,
) -> Iterator[ShardWriter]:
    """Write a sharded dataset batch by batch; it is published only if the block succeeds.

    ``with writer(uri, schema) as w: w.write(X, y)`` (as often as needed). A
    dataset already at ``uri`` is replaced. Locally the old one stays intact
    until the new one is complete; on S3 the old manifest is deleted first (S3
    has no atomic multi-object swap), so a failed write leaves no dataset.
    """
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        with _s3_errors(uri):
            _unpublish(uri, fs, base)
        w = ShardWriter(
            lambda name: fs.open_output_stream(f"{base}/{name}"),
            schema,
            shard_bytes,
            max_rows_per_shard,
            functools.partial(_s3_errors, uri),
            dtype=dtype,
        )
        try:
            yield w
            with _s3_errors(uri):
                data = _manifest_bytes(w.finish())
                with fs.open_output_stream(f"{base}/{MANIFEST}") as f:
                    f.write(data)
                w.manifest = unpack(json.loads(data))
        except BaseException:
            w.abort()
            with contextlib.suppress(Exception):  # best effort: without a manifest
                storage.delete_objects(uri, w.written)  # they are invisible anyway
            raise
        return
    with atomic_dir(uri) as tmp:
        w = ShardWriter(
            lambda name: open(tmp / name, "wb"),  # noqa: SIM115 - closed by the writer
            schema,
            shard_bytes,
            max_rows_per_shard,
            dtype=dtype,
        )
        try:
            yield w
            data = _manifest_bytes(w.finish())
        except BaseException:
            w.abort()
            raise
        (tmp / MANIFEST).write_bytes(data)  # last
        w.manifest = unpack(json.loads(data))


@contextlib.contextmanager
def part_writer(
    uri: str | os.PathLike, schema: Schema, task: int, *, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Iterator[ShardWriter]:
    """One task's share of a dataset that several workers write at once (Spark executors).

    Shards are named ``part-TASK-INDEX.parquet`` so tasks never collide, and no
    manifest is written: the coordinator gathers every task's
    ``writer.manifest["shards"]`` and calls `publish`. ``uri`` is the staging
    directory `publish` will turn into the dataset (locally) or the dataset's
    own ``s3://`` prefix. A failing task deletes what it wrote; a retried task
    rewrites the same names.
    """
    name = functools.partial(_TASK_SHARD.format, task)
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        w = ShardWriter(
            lambda n: fs.open_output_stream(f"{base}/{n}"),
            schema,
            shard_bytes,
            None,
            functools.partial(_s3_errors, uri),
            name,
        )
    else:
        root = Path(uri)
        root.mkdir(parents=True, exist_ok=True)
        w = ShardWriter(lambda n: open(root / n, "wb"), schema, shard_bytes, None, name=name)  # noqa: SIM115
    try:
        yield w
        w.manifest = w.finish()
    except BaseException:
        w.abort()
        with contextlib.suppress(Exception):
            if storage.is_s3(uri):
                storage.delete_objects(uri, w.written)
            else:
                for n in w.written:
                    (Path(uri) / n).unlink(missing_ok=True)
        raise


def publish(
    uri: str | os.PathLike,
    schema: Schema,
    parts: list[list[dict[str, Any]]],
    features: int,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest of a dataset whose shards `part_writer` tasks wrote (in task order).

    Locally ``uri`` is the staging directory (the caller renames it, e.g. with
    `kubetrain.data.datasets.atomic_dir`); on S3 it is the dataset's prefix, and
    writing the manifest is what publishes it.
    """
    shard_list = [s for part in parts for s in part]
    counts = np.zeros(len(schema.class_names), np.int64)
    for s in shard_list:
        counts = _add_counts(counts, None, np.asarray(s["class_counts"], np.int64))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "schema": _schema_json(schema),
        "features": features,
        "rows": sum(s["rows"] for s in shard_list),
        "class_counts": counts.tolist(),
        "shards": shard_list,
        "stats": stats or {},
    }
    data = _manifest_bytes(manifest)
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        with _s3_errors(uri), fs.open_output_stream(f"{base}/{MANIFEST}") as f:
            f.write(data)
    else:
        (Path(uri) / MANIFEST).write_bytes(data)
    return unpack(json.loads(data))


def unpublish(uri: str | os.PathLike) -> None:
    """Remove any dataset at an ``s3://`` prefix before tasks write new shards there."""
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        with _s3_errors(uri):
            _unpublish(uri, fs, base)


def write(
    uri: str | os.PathLike,
    X: np.ndarray,
    y: np.ndarray,
    schema: Schema,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_rows_per_shard: int | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write in-memory arrays as a sharded dataset (one `writer` call); return the manifest."""
    with writer(uri, schema, shard_bytes=shard_bytes, max_rows_per_shard=max_rows_per_shard) as w:
        w.write(X, y)
        w.stats.update(stats or {})
    return w.manifest


# --- reading -----------------------------------------------------------------------


def is_sharded(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` holds a manifest (a complete sharded dataset)."""
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        with _s3_errors(uri):
            return fs.get_file_info(f"{base}/{MANIFEST}").type == pafs.FileType.File
    return (Path(uri) / MANIFEST).is_file()


def read_manifest(uri: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the dataset at ``uri``; one-line errors when it is missing or damaged.

    Use ``Schema.from_json(manifest["schema"])`` for the schema and
    ``manifest["stats"]`` for the fitted statistics.
    """
    where = _display(uri)
    try:
        data = unpack(json.loads(_read_bytes(uri, MANIFEST)))
    except FileNotFoundError:
        if _has_shards(uri):
            raise KubetrainError(
                f"incomplete dataset {where}: shards but no {MANIFEST} (its writer did not "
                f"finish); {FIX}"
            ) from None
        raise KubetrainError(
            f"{where} is not a sharded dataset (no {MANIFEST}); pass the output of the "
            "previous stage"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise KubetrainError(
            f"{where}/{MANIFEST} is damaged ({type(exc).__name__}); {FIX}"
        ) from None
    try:
        ok = data["format"] == FORMAT and int(data["version"]) <= VERSION
        for shard in data["shards"]:
            _SHARD_NAME.fullmatch(shard["name"]) or _bad(shard["name"])
            int(shard["rows"]), int(shard["bytes"]), str(shard["sha256"])
        int(data["features"]), int(data["rows"]), Schema.from_json(data["schema"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KubetrainError(
            f"{where}/{MANIFEST} is damaged ({type(exc).__name__}: {exc}); {FIX}"
        ) from None
    if not ok:
        raise KubetrainError(
            f"{where}/{MANIFEST} is format {data['format']!r} version {data['version']}; this "
            f"kubetrain reads {FORMAT!r} up to version {VERSION}: upgrade kubetrain or {FIX}"
        )
    return data


def read_schema(uri: str | os.PathLike) -> Schema:
    return Schema.from_json(read_manifest(uri)["schema"])


def iter_batches(
    uri: str | os.PathLike, batch_rows: int = DEFAULT_BATCH_ROWS, raw: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(X float32 (n, features), y int64 (n,))`` batches in the stored order
    (``raw``: ``X`` as stored, uint8 for pixels, not decoded).

    Every batch has exactly ``batch_rows`` rows but the last. Each shard is
    read whole and its sha256 checked before any of its rows is yielded, so
    memory is bounded by one shard plus one batch, whatever the dataset's size.
    """
    if batch_rows < 1:
        raise KubetrainError(f"batch_rows={batch_rows} must be positive")
    manifest = read_manifest(uri)
    features, lut = int(manifest["features"]), None if raw else decoder(manifest)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_rows = 0
    for shard in manifest["shards"]:
        for batch in _open_shard(uri, shard).iter_batches(batch_size=batch_rows):
            pending.append(_arrays(batch, features, lut))
            pending_rows += batch.num_rows
            if pending_rows < batch_rows:
                continue
            # copies, so batches are writable and hold no reference to the shard's bytes
            X = np.concatenate([p[0] for p in pending])
            y = np.concatenate([p[1] for p in pending])
            start = 0
            while pending_rows - start >= batch_rows:
                yield X[start : start + batch_rows], y[start : start + batch_rows]
                start += batch_rows
            pending, pending_rows = [(X[start:], y[start:])], pending_rows - start
    if pending_rows:
        yield np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending])


def copy(src: str | os.PathLike, dst: str | os.PathLike, schema: Schema) -> dict[str, Any]:
    """The dataset at ``src`` written to ``dst`` under ``schema``, its rows, storage
    (uint8 stays uint8), decode and fitted statistics as they are; returns the manifest."""
    manifest = read_manifest(src)
    with writer(dst, schema, dtype=np.dtype(manifest.get("dtype", "float32"))) as w:
        w.stats.update(manifest.get("stats", {}))
        w.decode = manifest.get("decode")
        for X, y in iter_batches(src, raw=True):
            w.write(X, y)
    return w.manifest


def read_all(uri: str | os.PathLike, raw: bool = False) -> tuple[np.ndarray, np.ndarray, Schema]:
    """The whole dataset in memory: ``(X float32 (rows, features), y int64, schema)``
    (``raw``: ``X`` as stored, uint8 for pixels, not decoded).

    The arrays are allocated once from the manifest's row count and filled
    shard by shard, so the peak is the result plus one shard.
    """
    manifest = read_manifest(uri)
    features, rows = int(manifest["features"]), int(manifest["rows"])
    listed = sum(int(s["rows"]) for s in manifest["shards"])
    if listed != rows:
        raise KubetrainError(
            f"{_display(uri)}/{MANIFEST} says {rows} rows but lists shards of {listed}; {FIX}"
        )
    X = np.empty((rows, features), _read_dtype(manifest, raw))
    y = np.empty(rows, label_dtype(manifest))
    at, lut = 0, None if raw else decoder(manifest)
    for shard in manifest["shards"]:
        n = int(shard["rows"])
        _fill(uri, shard, X[at : at + n], y[at : at + n], lut)
        at += n
    return X, y, Schema.from_json(manifest["schema"])


def read_shard(
    uri: str | os.PathLike, manifest: dict[str, Any], shard: dict[str, Any], raw: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's ``(X float32, y int64)`` (``raw``: ``X`` as stored), checked against its
    sha256: the unit a streaming reader deals out to ranks and data-loader workers.
    ``manifest`` is `read_manifest`'s, ``shard`` one of its ``manifest["shards"]``."""
    n, features = int(shard["rows"]), int(manifest["features"])
    X = np.empty((n, features), _read_dtype(manifest, raw))
    y = np.empty(n, label_dtype(manifest))
    _fill(uri, shard, X, y, None if raw else decoder(manifest))
    return X, y


def _read_dtype(manifest: dict[str, Any], raw: bool) -> np.dtype:
    """What ``X`` is read as: float32 features, or with ``raw`` the stored type."""
    decoder(manifest)  # an unknown storage fails here, named, raw or not
    return np.dtype(manifest.get("dtype", "float32")) if raw else np.dtype(np.float32)


def label_dtype(manifest: dict[str, Any]) -> type:
    """What ``y`` is read as: int64 class codes, or float32 regression targets."""
    return np.float32 if manifest["schema"].get("task") == "regression" else np.int64


def decoder(manifest: dict[str, Any]) -> np.ndarray | None:
    """The stored value -> feature table of a uint8 dataset (None: stored as float32)."""
    if manifest.get("dtype", "float32") == "float32":
        return None
    if manifest["dtype"] != "uint8" or "decode" not in manifest:
        raise KubetrainError(
            f"features stored as {manifest['dtype']!r} without a decode; {FIX} with this kubetrain"
        )
    d = manifest["decode"]
    return ((np.arange(256, dtype=np.float64) - d["offset"]) / d["scale"]).astype(np.float32)


def _fill(
    uri: str | os.PathLike,
    shard: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    lut: np.ndarray | None = None,
) -> None:
    """Decode a shard into ``X``/``y`` (sized from the manifest) batch by batch: decoding it
    whole first would hold its values twice."""
    at, features = 0, X.shape[1]
    for batch in _open_shard(uri, shard).iter_batches(batch_size=DEFAULT_BATCH_ROWS):
        n = batch.num_rows
        if at + n > len(y):
            at += n
            break
        X[at : at + n], y[at : at + n] = _arrays(batch, features, lut)
        at += n
    if at != len(y):
        raise KubetrainError(
            f"shard {_display(uri)}/{shard['name']} holds {'more than ' if at > len(y) else ''}"
            f"{at} rows but {MANIFEST} says {len(y)}; {FIX}"
        )


def _arrays(
    data: pa.Table | pa.RecordBatch, features: int, lut: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` numpy views of a table or batch's ``x`` and ``y`` columns (with ``lut``,
    `decoder`'s table: the uint8 values decoded to float32 features, a new array)."""
    x = data.column("x")
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks()
    if pa.types.is_fixed_size_binary(x.type):  # uint8 pixels, one fixed-size value per row
        values = pixel_rows(x).reshape(-1)
    else:
        values = x.flatten().to_numpy(zero_copy_only=False)  # no nulls: a view in practice
    if lut is not None:
        values = lut[values]
    y = data.column("y").to_numpy()
    y = y.astype(np.float32 if np.issubdtype(y.dtype, np.floating) else np.int64, copy=False)
    return values.reshape(len(y), features), y


def _x_type(dtype: np.dtype, features: int) -> pa.DataType:
    """float32 features as a fixed-size list; uint8 pixels as fixed-size binary, which
    Parquet stores as one byte per value (a list of uint8 is stored as INT32 values)."""
    return pa.binary(features) if dtype == np.uint8 else pa.list_(pa.float32(), features)


def _x_array(X: np.ndarray, x_type: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_binary(x_type):
        return pixel_column(X)
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), x_type.list_size)


def _open_shard(uri: str | os.PathLike, shard: dict[str, Any]) -> pq.ParquetFile:
    """A shard's Parquet file, read into memory and checked against the manifest first."""
    where = f"{_display(uri)}/{shard['name']}"
    try:
        data = _read_bytes(uri, shard["name"])
    except FileNotFoundError:
        raise KubetrainError(f"shard {where} is missing; {FIX}") from None
    if len(data) != int(shard["bytes"]):
        raise KubetrainError(
            f"shard {where} is damaged: {len(data)} bytes, expected {shard['bytes']} "
            f"(truncated or overwritten); {FIX}"
        )
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise KubetrainError(
            f"shard {where} is damaged: its sha256 does not match {MANIFEST}; {FIX}"
        )
    try:
        return pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:  # matching sha256: written wrong, not damaged
        raise KubetrainError(f"shard {where} cannot be read ({exc}); {FIX}") from None


# --- storage -----------------------------------------------------------------------


class _HashingSink(io.RawIOBase):
    """A write-only file that hashes and counts the bytes on their way to ``target``, so
    a shard's sha256 costs no second read (on S3 there is nothing to read back)."""

    def __init__(self, target: BinaryIO) -> None:
        super().__init__()
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.target.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            try:
                self.target.close()
            finally:
                super().close()


def _add_counts(
    counts: np.ndarray, y: np.ndarray | None, more: np.ndarray | None = None
) -> np.ndarray:
    """``counts`` plus the class counts of ``y`` (or plus ``more``), growing when needed
    (a schema without class names still gets counts)."""
    add = np.bincount(y, minlength=len(counts)) if y is not None else more
    assert add is not None
    if len(add) > len(counts):
        counts = np.concatenate([counts, np.zeros(len(add) - len(counts), np.int64)])
    counts[: len(add)] += add
    return counts


#: Features beyond which a manifest is written without indentation: json's C encoder
#: only runs then, and an image's per-pixel fitted statistics (150,528 values at
#: 224x224x3, in every split's schema) took seconds per manifest in the Python one.
INDENT_MAX_FEATURES = 4096


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    indent = 1 if int(manifest.get("features", 0)) <= INDENT_MAX_FEATURES else None
    return json.dumps(pack(manifest), indent=indent, sort_keys=True, default=_json_default).encode()


def _schema_json(schema: Schema) -> dict[str, Any]:
    """The schema as a dict without `dataclasses.asdict`'s deep copy of every value (its
    lists and dicts are only read by the encoder)."""
    return {f.name: getattr(schema, f.name) for f in fields(schema)}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"stats values must be JSON-serialisable, not {type(value).__name__}")


def _bad(name: str) -> None:
    raise ValueError(f"unexpected shard name {name!r}")


def _display(uri: str | os.PathLike) -> str:
    return storage.redact(os.fspath(uri)).rstrip("/")


def _read_bytes(uri: str | os.PathLike, name: str) -> bytes:
    """One file of the dataset; FileNotFoundError when it is not there."""
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        with _s3_errors(uri):
            info = fs.get_file_info(f"{base}/{name}")
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(name)
            with fs.open_input_file(f"{base}/{name}") as f:
                return f.readall()
    path = Path(uri) / name
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(name) from None
    except OSError as exc:
        raise KubetrainError(
            f"cannot read {path} ({exc.strerror}): check the path and its permissions"
        ) from None


def _has_shards(uri: str | os.PathLike) -> bool:
    if storage.is_s3(uri):
        fs, base = _s3(uri)
        with _s3_errors(uri):
            listed = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        return any(_SHARD_NAME.fullmatch(info.base_name) for info in listed)
    root = Path(uri)
    return root.is_dir() and any(_SHARD_NAME.fullmatch(p.name) for p in root.iterdir())


def _unpublish(uri: str | os.PathLike, fs: pafs.S3FileSystem, base: str) -> None:
    """Remove a previous dataset at ``uri``: its manifest first, so no reader ever sees
    an old manifest with new shards. Deletes go through boto3 (`storage.delete_objects`):
    pyarrow's delete_file leaves a directory marker object behind."""
    listed = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = {info.base_name for info in listed}
    if MANIFEST in names:
        storage.delete_objects(uri, [MANIFEST])
    storage.delete_objects(uri, sorted(n for n in names if _SHARD_NAME.fullmatch(n)))


def _s3(uri: str | os.PathLike) -> tuple[pafs.S3FileSystem, str]:
    """pyarrow's S3 filesystem for the environment's settings, and ``bucket/key`` of ``uri``."""
    bucket, key = storage.split_uri(uri)
    return _s3_filesystem(storage.S3Settings.from_env()), f"{bucket}/{key}".rstrip("/")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: storage.S3Settings) -> pafs.S3FileSystem:
    """pyarrow's S3 client, configured like `kubetrain.core.storage.client`: explicit
    endpoint (pyarrow ignores ``S3_ENDPOINT_URL``), path-style addressing for MinIO,
    Ceph and SeaweedFS, finite timeouts and retries."""
    kwargs: dict[str, Any] = {}
    if settings.endpoint_url:
        parts = urlsplit(settings.endpoint_url)
        kwargs["scheme"] = parts.scheme
        kwargs["endpoint_override"] = parts.netloc.rpartition("@")[2] + parts.path.rstrip("/")
    if settings.access_key and settings.secret_key:
        kwargs.update(
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            session_token=settings.session_token,
        )
    return pafs.S3FileSystem(
        region=settings.region,
        connect_timeout=storage.CONNECT_TIMEOUT_S,
        request_timeout=storage.READ_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=min(settings.max_attempts, 10)),
        **kwargs,
    )


@contextlib.contextmanager
def _s3_errors(uri: str | os.PathLike) -> Iterator[None]:
    """Turn pyarrow's S3 errors into one redacted line naming the URI and the fix."""
    try:
        yield
    except (FileNotFoundError, KubetrainError):
        raise
    except (OSError, pa.ArrowException) as exc:
        detail = " ".join(str(exc).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        endpoint = storage.S3Settings.from_env().endpoint_url or "AWS S3"
        raise KubetrainError(
            storage.redact(
                f"S3 request for {os.fspath(uri)} failed at {endpoint} ({detail}): check "
                "S3_ENDPOINT_URL, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) "
                "and that the bucket exists"
            )
        ) from None
