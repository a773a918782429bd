"""On-disk formats of the data artifacts that flow between stages.

Two shapes, both directories so one KFP artifact carries data and schema:

* a *table* (ingest's output): ``data.parquet`` with raw, possibly
  categorical or missing features plus the label column, and ``meta.json``.
  It stays one file: its columns are the source's own (strings, categories,
  missing values), which do not fit the numeric ``x``/``y`` layout of shards;
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import FIX, verify_checksums, write_checksums
from kubetrain.core.storage import is_s3

LABEL = "label"  # name of the label column inside a canonical table


@dataclass
class Schema:
    """What downstream stages need to know about a dataset besides its values."""

    kind: str  # "image" or "table"
    feature_names: list[str]
    class_names: list[str]
    image_shape: list[int] | None = None  # (channels, height, width) for images
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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
    with atomic_dir(path) as tmp:
        frame.to_parquet(tmp / "data.parquet", index=False)
        (tmp / "meta.json").write_text(json.dumps(asdict(schema), indent=2))


def load_table(path: str | os.PathLike) -> tuple[pd.DataFrame, Schema]:
    root = _existing_dir(path, "data.parquet")
    schema = Schema.from_json(json.loads((root / "meta.json").read_text()))
    return pd.read_parquet(root / "data.parquet"), schema


def table_schema(path: str | os.PathLike) -> Schema:
    """A table's `Schema`, without reading its rows."""
    root = _existing_dir(path, "data.parquet")
    return Schema.from_json(json.loads((root / "meta.json").read_text()))


def table_files(path: str | os.PathLike) -> list[Path]:
    """The table's Parquet files in row order (what an engine like Spark reads directly)."""
    return [_existing_dir(path, "data.parquet") / "data.parquet"]


def table_arrow_schema(path: str | os.PathLike) -> pa.Schema:
    """The Arrow schema of the table's columns (label included), without reading rows."""
    return pq.ParquetFile(table_files(path)[0]).schema_arrow


def table_batches(path: str | os.PathLike, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The table as pandas frames of at most ``batch_rows`` rows, in row order."""
    for file in table_files(path):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows):
            yield batch.to_pandas()


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


def content_hash(frame: pd.DataFrame) -> str:
    """Stable hash of a table's values and column names, for lineage and caching."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(c) for c in frame.columns]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def class_counts(y: np.ndarray, class_names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(y, np.int64), minlength=len(class_names))
    return {name: int(c) for name, c in zip(class_names, counts, strict=False)}
