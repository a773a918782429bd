"""On-disk formats of the data artifacts that flow between stages.

Two shapes, both directories so one KFP artifact carries data and schema:

* a *table* (ingest's output): ``part-00000.parquet``, ``part-00001.parquet``,
  ... with raw, possibly categorical or missing features plus the label
  column, all with one Arrow schema, each holding at most ``TABLE_PART_BYTES``
  of values (row groups at most ``TABLE_ROW_GROUP_BYTES``), and ``meta.json``,
  written last: the `Schema` fields plus ``parts`` (name, rows, bytes, sha256
  of each, in row order) and total ``rows``. Parts keep the source's own
  columns (strings, categories, missing values), which do not fit the numeric
  ``x``/``y`` layout of shards; bounded parts let ingest write, and clean
  read, tables larger than memory. Readers check each part's size and sha256
  before using it. Tables of the previous format (one ``data.parquet`` and a
  ``meta.json`` without ``parts``) are still read, unchecked;
* a *split* (clean's and augment's outputs): a sharded dataset
  (`kubetrain.data.shards`: Parquet shards of bounded size and a
  ``_manifest.json`` with the schema and every shard's sha256), checked on
  every load. Splits of the previous format, ``arrays.npz`` with ``X`` and
  ``y``, ``meta.json`` and ``sha256.json`` (`kubetrain.core.integrity`), are
  still read, so existing local caches keep working.

Writes are atomic (a temporary sibling directory, then one rename), so a
failed stage never leaves a half-written artifact behind; the checksums catch
what atomicity cannot: a cached artifact damaged after it was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import FIX, sha256_file, verify_checksums, write_checksums
from kubetrain.core.storage import is_s3
from kubetrain.data.packed_json import pack, unpack

LABEL = "label"  # name of the label column inside a canonical table
#: An image table's one feature column: each image's uint8 values in channel-first order,
#: as fixed-size binary (one byte per value on disk; `kubetrain.data.image_ingest`).
PIXELS = "pixels"
#: Schema ``extra`` key: {label as written: class} for labels that differ from a class only
#: by case (ingest merges them after the rows are written); every reader applies it.
LABEL_ALIASES = "label_aliases"
#: Schema extra: CSV rows ingest skipped for a wrong field count ({"count", "examples"}).
SKIPPED_ROWS = "skipped_rows"
MiB = 1024 * 1024
#: Bound on one table part's Arrow data (uncompressed): small enough that a reader holds
#: one part in memory while checking its sha256, big enough to keep the parts few.
TABLE_PART_BYTES = 64 * MiB
#: Bound on one row group of a part (the unit a Parquet reader decodes at once).
TABLE_ROW_GROUP_BYTES = 16 * MiB
TABLE_META = "meta.json"  # written last: the schema plus every part's rows, size and sha256
OLD_TABLE_FILE = "data.parquet"  # the previous format's one file (no checksums)
#: What a reader tells the user to do about a missing or damaged table part.
TABLE_FIX = f"re-run ingest (locally: {FIX})"
_PART = "part-{:05d}.parquet"


@dataclass
class Schema:
    """What downstream stages need to know about a dataset besides its values."""

    kind: str  # "image" or "table"
    feature_names: list[str]
    class_names: list[str]
    image_shape: list[int] | None = None  # (channels, height, width) for images
    extra: dict[str, Any] = field(default_factory=dict)
    #: "classification" (labels are `class_names` codes) or "regression" (labels are
    #: numbers; `class_names` is empty and ``extra["target"]`` has the training split's
    #: mean and standard deviation once clean has run).
    task: str = "classification"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schema:
        return cls(**data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that is renamed onto `path` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes 0600; artifacts are meant to be read by others
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` atomically (reports, JSON): readers see the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save_table(path: str | os.PathLike, frame: pd.DataFrame, schema: Schema) -> None:
    """Write an in-memory frame as a table (the multi-part format `table_writer` writes)."""
    with table_writer(path, schema) as writer:
        writer.write(pa.Table.from_pandas(frame, preserve_index=False))


class TableWriter:
    """Appends record batches to a table's parts; made by `table_writer`, which publishes it.

    A class because the state is real: the open part, the batches buffered for
    its next row group and the list of finished parts. Memory stays bounded by
    one row group (``TABLE_ROW_GROUP_BYTES``) plus the caller's batch. Set
    ``schema`` before the ``with`` block ends: class names are often known only
    once every row has been read.
    """

    def __init__(
        self, root: Path, schema: Schema, part_bytes: int, part_rows: int | None = None
    ) -> None:
        if part_bytes < 1 or (part_rows is not None and part_rows < 1):
            raise KubetrainError(
                f"part_bytes={part_bytes} / part_rows={part_rows} must be positive"
            )
        self.schema = schema
        self.arrow_schema: pa.Schema | None = None  # the first batch's; every part has it
        self.rows = 0
        self.parts: list[dict[str, Any]] = []
        self._root = root
        self._part_bytes = part_bytes
        self._part_rows = part_rows
        self._group: list[pa.RecordBatch] = []
        self._group_bytes = 0
        self._parquet: pq.ParquetWriter | None = None
        self._in_part_rows = self._in_part_bytes = 0

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        """Append rows; every batch must have the first one's columns (types are cast)."""
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        for batch in self._conform(table).to_batches():
            self._add(batch)

    def _conform(self, table: pa.Table) -> pa.Table:
        if self.arrow_schema is None:
            self.arrow_schema = table.schema
            return table
        if table.schema.equals(self.arrow_schema):
            return table
        try:
            if table.schema.names != self.arrow_schema.names:
                raise ValueError("other column names")
            return table.cast(self.arrow_schema)
        except (pa.ArrowException, ValueError):
            raise KubetrainError(
                f"a batch with columns {_describe(table.schema)} does not fit the table's "
                f"{_describe(self.arrow_schema)}; every batch of a table needs the same columns "
                "and types"
            ) from None

    def _add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            row_bytes = max(1, batch.nbytes // batch.num_rows)
            room_bytes = min(
                self._part_bytes - self._in_part_bytes, TABLE_ROW_GROUP_BYTES - self._group_bytes
            )
            room = max(1, room_bytes // row_bytes)
            if self._part_rows is not None:
                room = min(room, self._part_rows - self._in_part_rows)
            take, batch = batch.slice(0, room), batch.slice(room)
            self._group.append(take)
            self._group_bytes += take.nbytes
            self._in_part_rows += take.num_rows
            self._in_part_bytes += take.nbytes
            self.rows += take.num_rows
            if self._group_bytes + row_bytes > TABLE_ROW_GROUP_BYTES:  # no room for a row
                self._flush()
            full_rows = self._part_rows is not None and self._in_part_rows >= self._part_rows
            if full_rows or self._in_part_bytes + row_bytes > self._part_bytes:
                self._close_part()

    def _flush(self) -> None:
        """Write the buffered batches as one row group of the open part (opened here)."""
        if self._parquet is None:
            assert self.arrow_schema is not None
            name = _PART.format(len(self.parts))
            self._parquet = pq.ParquetWriter(
                self._root / name,
                self.arrow_schema,
                use_dictionary=_text_columns(self.arrow_schema),  # numbers: only costs time
            )
        if self._group:
            group = pa.Table.from_batches(self._group, self.arrow_schema)
            self._parquet.write_table(group, row_group_size=group.num_rows)
            self._group, self._group_bytes = [], 0

    def _close_part(self) -> None:
        self._flush()
        assert self._parquet is not None
        self._parquet.close()
        self._parquet = None
        name = _PART.format(len(self.parts))
        path = self._root / name
        self.parts.append(
            {
                "name": name,
                "rows": self._in_part_rows,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        self._in_part_rows = self._in_part_bytes = 0

    def finish(self) -> dict[str, Any]:
        """Close the last part and return meta.json's content (an empty table gets one
        empty part, so its columns are still on disk)."""
        if self._group or self._parquet is not None or (not self.parts and self.arrow_schema):
            self._close_part()
        return {**asdict(self.schema), "parts": self.parts, "rows": self.rows}

    def abort(self) -> None:
        """Close the open part without recording it (`atomic_dir` removes the files)."""
        with contextlib.suppress(Exception):
            if self._parquet is not None:
                self._parquet.close()
        self._parquet = None


@contextlib.contextmanager
def table_writer(
    path: str | os.PathLike,
    schema: Schema,
    *,
    part_bytes: int | None = None,
    part_rows: int | None = None,
) -> Iterator[TableWriter]:
    """Write a table batch by batch; it is published only if the block succeeds.

    ``with table_writer(path, schema) as w: w.write(batch)`` (as often as
    needed), then ``w.schema = final_schema``. Parts hold at most ``part_bytes``
    of Arrow data (``TABLE_PART_BYTES`` by default; ``part_rows`` bounds their
    rows too); meta.json is written last. A table already at ``path`` is
    replaced only once the new one is complete.
    """
    with atomic_dir(path) as tmp:
        writer = TableWriter(tmp, schema, part_bytes or TABLE_PART_BYTES, part_rows)
        try:
            yield writer
            meta = writer.finish()
        except BaseException:
            writer.abort()
            raise
        (tmp / TABLE_META).write_text(json.dumps(pack(meta), indent=2))  # last


def _text_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: text, which repeats (categories)."""
    return [
        f.name
        for f in schema
        if pa.types.is_string(f.type)
        or pa.types.is_large_string(f.type)
        or pa.types.is_dictionary(f.type)
    ]


def _describe(schema: pa.Schema, limit: int = 6) -> str:
    shown = ", ".join(f"{f.name}: {f.type}" for f in list(schema)[:limit])
    return f"({shown}{', ...' if len(schema) > limit else ''})"


def load_table(path: str | os.PathLike) -> tuple[pd.DataFrame, Schema]:
    """The whole table in memory (each part checked against meta.json first)."""
    root, meta = _table_meta(path)
    schema = _table_schema(meta)
    if "parts" not in meta:  # the previous format: one file, no checksums
        return pd.read_parquet(root / OLD_TABLE_FILE), schema
    if not meta["parts"]:
        raise KubetrainError(f"{root} lists no table parts in {TABLE_META}; {TABLE_FIX}")
    tables = [pq.read_table(_part_source(root, part)) for part in meta["parts"]]
    return with_label_aliases(pa.concat_tables(tables).to_pandas(), schema), schema


def table_schema(path: str | os.PathLike) -> Schema:
    """A table's `Schema`, without reading its rows."""
    return _table_schema(_table_meta(path)[1])


def table_rows(path: str | os.PathLike) -> int:
    """How many rows the table holds, from meta.json (no part is read)."""
    return int(_table_meta(path)[1]["rows"])


def table_files(path: str | os.PathLike) -> list[Path]:
    """The table's Parquet files in row order (what an engine like Spark reads directly)."""
    root, meta = _table_meta(path)
    return [root / part["name"] for part in _parts(meta)]


def table_arrow_schema(path: str | os.PathLike) -> pa.Schema:
    """The Arrow schema of the table's columns (label included), without reading rows;
    every part has it."""
    files = table_files(path)
    if not files:
        raise KubetrainError(f"{path} lists no table parts in {TABLE_META}; {TABLE_FIX}")
    return pq.read_schema(files[0])


def table_batches(path: str | os.PathLike, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The table as pandas frames of at most ``batch_rows`` rows, in row order.

    Each part is read whole (parts are bounded) and checked against its size
    and sha256 in meta.json before any of its rows is yielded.
    """
    schema = table_schema(path)
    for batch in table_record_batches(path, batch_rows):
        yield table_frame(batch, schema)


def table_record_batches(path: str | os.PathLike, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """`table_batches` before the conversion to pandas (Arrow holds text far more
    compactly than pandas objects: a stage may keep these in memory and convert each
    batch when it needs it, with `table_frame`)."""
    root, meta = _table_meta(path)
    for part in _parts(meta):
        source = _part_source(root, part)
        yield from pq.ParquetFile(source).iter_batches(batch_size=batch_rows)


def table_frame(batch: pa.RecordBatch, schema: Schema) -> pd.DataFrame:
    """One record batch of the table as the frame `table_batches` yields."""
    return with_label_aliases(batch.to_pandas(), schema)


def pixel_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A `PIXELS` column as uint8 ``(rows, values)``: a view of its buffer, no copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.byte_width
    start = column.offset * width
    flat = np.frombuffer(column.buffers()[1], np.uint8)[start : start + len(column) * width]
    return flat.reshape(len(column), width)


def pixel_column(pixels: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 ``(rows, values)`` as a `PIXELS` column (`pixel_rows` reads it back): one
    fixed-size binary value per row over the array's own buffer."""
    pixels = np.ascontiguousarray(pixels, np.uint8)
    kind = pa.binary(pixels.shape[1])
    return pa.FixedSizeBinaryArray.from_buffers(kind, len(pixels), [None, pa.py_buffer(pixels)])


def is_image_table(path: str | os.PathLike) -> bool:
    """Whether the table at ``path`` holds images as a `PIXELS` column."""
    return PIXELS in table_arrow_schema(path).names


def with_label_aliases(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """``frame`` with its labels spelled as the schema's classes (`LABEL_ALIASES`)."""
    aliases = schema.extra.get(LABEL_ALIASES)
    if not aliases or LABEL not in frame.columns:
        return frame
    labels = frame[LABEL]
    return frame.assign(**{LABEL: labels.map(aliases).fillna(labels)})


def _table_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The table's directory and meta.json; tables of the previous format (one
    ``data.parquet``, no ``parts`` list) are accepted too."""
    root = Path(path)
    meta_file = root / TABLE_META
    if not meta_file.is_file():
        raise KubetrainError(
            f"{root} is not a kubetrain table (no {TABLE_META}); pass the output of the "
            "ingest stage"
        )
    try:
        meta = unpack(json.loads(meta_file.read_text(encoding="utf-8")))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise KubetrainError(
            f"{meta_file} is damaged ({type(exc).__name__}); {TABLE_FIX}"
        ) from None
    if "parts" not in meta:
        _existing_dir(root, OLD_TABLE_FILE)
    return root, meta


def _parts(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts listed in meta.json, in row order (the previous format: its one file)."""
    if "parts" not in meta:
        return [{"name": OLD_TABLE_FILE}]
    return list(meta["parts"])


def _table_schema(meta: dict[str, Any]) -> Schema:
    fields = Schema.__dataclass_fields__
    return Schema.from_json({k: v for k, v in meta.items() if k in fields})


#: Parts this process has checked, as (path, size, mtime_ns, sha256): a stage that reads
#: a table several times (the streaming clean: four passes) hashes each part once.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _part_source(root: Path, part: dict[str, Any]) -> Path | pa.BufferReader:
    """What to read a part from: its bytes once they match meta.json's size and sha256
    (a part of the previous format, which has no checksum: its path). A part already
    checked by this process, and not rewritten since (same size and mtime), is read
    from its path without hashing it again."""
    path = root / part["name"]
    if "sha256" not in part:
        return path
    if not path.is_file():
        raise KubetrainError(f"table part {path} is missing; {TABLE_FIX}")
    stat = path.stat()
    if stat.st_size != int(part["bytes"]):
        raise KubetrainError(
            f"table part {path} is damaged: {stat.st_size} bytes, expected {part['bytes']} "
            f"(truncated or overwritten); {TABLE_FIX}"
        )
    key = (str(path), stat.st_size, stat.st_mtime_ns, part["sha256"])
    if key in _VERIFIED:
        return path
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise KubetrainError(
            f"table part {path} is damaged: its sha256 does not match {TABLE_META}; {TABLE_FIX}"
        )
    _VERIFIED.add(key)
    return pa.BufferReader(data)


def save_split(path: str | os.PathLike, X: np.ndarray, y: np.ndarray, schema: Schema) -> None:
    """Write a split as a sharded dataset (`kubetrain.data.shards`) at a local path or
    ``s3://`` prefix: ``X`` float32 ``(rows, features)``, ``y`` class indices."""
    from kubetrain.data import shards  # shards builds on this module's Schema and atomic_dir

    if len(X) != len(y):
        raise KubetrainError(f"features have {len(X)} rows but labels {len(y)}; they must match")
    shards.write(path, X, y, schema)


def save_split_npz(path: str | os.PathLike, X: np.ndarray, y: np.ndarray, schema: Schema) -> None:
    """Write a split in the previous format (``arrays.npz``); `load_split` still reads it.

    Kept so the reader of old caches stays tested; stages write `save_split`'s format.
    """
    if len(X) != len(y):
        raise KubetrainError(f"features have {len(X)} rows but labels {len(y)}; they must match")
    with atomic_dir(path) as tmp:
        np.savez(tmp / "arrays.npz", X=np.asarray(X, np.float32), y=np.asarray(y, np.int64))
        (tmp / "meta.json").write_text(json.dumps(asdict(schema), indent=2))
        write_checksums(tmp)  # last: its presence vouches for the files above


def load_split(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Schema]:
    """Read a split: ``(X float32 (rows, features), y int64, schema)``.

    Sharded splits (a local path or ``s3://`` prefix) are checked shard by
    shard against their manifest's sha256; a local folder of the previous
    format (``arrays.npz``) against its ``sha256.json``. kfp.local's cache
    hands out an artifact as long as its files exist, so damage must be
    caught here, with the file and the fix named, not three stages later as a
    ``BadZipFile`` or Parquet error in the task log.
    """
    from kubetrain.data import shards

    if not is_s3(path) and not shards.is_sharded(path):
        root = Path(path)
        if (root / "arrays.npz").exists():
            return _load_split_npz(root)
        if not (root.is_dir() and any(root.glob("part-*.parquet"))):  # else: "incomplete"
            raise KubetrainError(
                f"{root} is not a kubetrain dataset artifact (no {shards.MANIFEST}, "
                "no arrays.npz); pass the output of the previous stage"
            )
    return shards.read_all(path)


def _load_split_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Schema]:
    """The previous format: ``arrays.npz`` + ``meta.json``, checked against ``sha256.json``."""
    root = _existing_dir(path, "arrays.npz")
    verify_checksums(root)
    arrays_path = root / "arrays.npz"
    try:
        schema = Schema.from_json(json.loads((root / "meta.json").read_text()))
        with np.load(arrays_path) as arrays:
            return arrays["X"], arrays["y"], schema
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        # an artifact from before checksums existed, damaged: still one line
        raise KubetrainError(
            f"{root} cannot be read ({type(exc).__name__}: {exc}); {FIX}"
        ) from None


def _existing_dir(path: str | os.PathLike, member: str) -> Path:
    root = Path(path)
    if not (root / member).is_file():
        raise KubetrainError(
            f"{root} is not a kubetrain dataset artifact (no {member}); "
            "pass the output of the previous stage"
        )
    return root


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """Columns whose values are numbers (booleans are not): `stable_row_hashes` hashes them
    as float64. Decide it on the whole table's dtypes, not on one batch's."""
    return [
        str(c)
        for c, dtype in frame.dtypes.items()
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    ]


def stable_row_hashes(frame: pd.DataFrame, numeric: Collection[str]) -> np.ndarray:
    """64-bit hashes of a frame's rows that do not depend on the frame's own dtypes.

    One batch of a table reads an integer column as int64 and another, which
    has missing values, as float64; hashing every ``numeric`` column as float64
    and everything else as text (missing as None) makes equal rows hash equally
    whichever batch holds them. Column names are not hashed; their order is.
    """
    norm: dict[int, pd.Series] = {}
    for i, c in enumerate(frame.columns):
        col = frame.iloc[:, i]
        if str(c) in numeric:
            norm[i] = col.astype(np.float64)
        else:
            obj = col.astype(object)
            norm[i] = obj.where(obj.isna(), obj.astype(str)).where(obj.notna(), None)
    return pd.util.hash_pandas_object(pd.DataFrame(norm), index=False).to_numpy(np.uint64)


class ContentHash:
    """`content_hash` fed batch by batch: the digest of the column names and of every
    row's `stable_row_hashes`, in order, so any batching of the same rows gives the same
    hash (ingest streams sources larger than memory)."""

    def __init__(self, columns: Sequence[Any], numeric: Collection[str]) -> None:
        self._digest = hashlib.sha256(json.dumps([str(c) for c in columns]).encode())
        self._numeric = frozenset(numeric)

    def update(self, frame: pd.DataFrame) -> None:
        self._digest.update(stable_row_hashes(frame, self._numeric).tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def content_hash(frame: pd.DataFrame) -> str:
    """Stable hash of a table's values and column names, for lineage and caching; the
    same as `ContentHash` fed the frame in any number of batches."""
    digest = ContentHash(list(frame.columns), numeric_columns(frame))
    digest.update(frame)
    return digest.hexdigest()


def class_counts(y: np.ndarray, class_names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(y, np.int64), minlength=len(class_names))
    return {name: int(c) for name, c in zip(class_names, counts, strict=False)}
