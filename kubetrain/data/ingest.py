"""Ingest: turn a data source into one canonical, validated table.

Sources: datasets that ship with scikit-learn (digits as 8x8 images,
breast_cancer and wine as tables), local CSV / Parquet / NPZ files, and
``s3://`` URIs (downloaded with boto3, then read like a local file). Every
problem a user can cause ends in one `KubetrainError` line before anything is
written.
"""

from __future__ import annotations

import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kubetrain.config.settings import BUILTIN_DATASETS
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data.datasets import LABEL, Schema, content_hash, save_table

FILE_TYPES = (".csv", ".parquet", ".pq", ".npz")
LABEL_GUESSES = ("label", "target", "class", "y")


def load_source(source: str, label_column: str = "") -> tuple[pd.DataFrame, Schema]:
    """Read `source` into a frame whose label column is `LABEL`, plus its schema."""
    if source in BUILTIN_DATASETS:
        return _load_builtin(source)
    if source.startswith("s3://"):
        from kubetrain.core import storage  # boto3 only when needed

        with tempfile.TemporaryDirectory(prefix="kubetrain-ingest-") as tmp:
            local = Path(tmp) / Path(source.rstrip("/")).name
            storage.download(source, local)
            return _load_file(local, label_column, shown_as=source)
    return _load_file(Path(source), label_column, shown_as=source)


def _load_builtin(name: str) -> tuple[pd.DataFrame, Schema]:
    from sklearn import datasets as skd

    bunch = {
        "digits": skd.load_digits,
        "breast_cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
    }[name]()
    is_image = name == "digits"
    names = (
        [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
        if is_image
        else [str(n) for n in bunch.feature_names]
    )
    class_names = [str(n) for n in bunch.target_names]
    frame = pd.DataFrame(np.asarray(bunch.data, np.float32), columns=names)
    frame[LABEL] = [class_names[i] for i in bunch.target]
    schema = Schema(
        kind="image" if is_image else "table",
        feature_names=names,
        class_names=class_names,
        image_shape=[1, 8, 8] if is_image else None,
    )
    return frame, schema


def _load_file(path: Path, label_column: str, shown_as: str) -> tuple[pd.DataFrame, Schema]:
    suffix = path.suffix.lower()
    require(
        suffix in FILE_TYPES,
        f"cannot read {shown_as}: unsupported file type {suffix or '(none)'}; use "
        f"{', '.join(FILE_TYPES)} or a built-in dataset ({', '.join(BUILTIN_DATASETS)})",
    )
    require(
        path.is_file(),
        f"dataset {shown_as} not found; pass an existing .csv/.parquet/.npz file, an "
        f"s3:// URI or a built-in dataset ({', '.join(BUILTIN_DATASETS)})",
    )
    if suffix == ".npz":
        return _load_npz(path, shown_as)
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise KubetrainError(
            f"{shown_as} is empty (no header, no rows); give a table with a header and data rows"
        ) from None
    except (pd.errors.ParserError, OSError, ValueError) as exc:
        raise KubetrainError(
            f"cannot parse {shown_as}: {str(exc).splitlines()[0]}; "
            "check that it is a valid file of that type"
        ) from None
    return _table(frame, label_column, shown_as)


def _table(frame: pd.DataFrame, label_column: str, shown_as: str) -> tuple[pd.DataFrame, Schema]:
    require(
        len(frame.columns) > 0 and len(frame) > 0,
        f"{shown_as} is empty (no rows); give a table with a header and data rows",
    )
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if not label_column:
        guesses = [c for c in columns if c.lower() in LABEL_GUESSES]
        require(
            bool(guesses),
            f"{shown_as} has no label column named {'/'.join(LABEL_GUESSES)}; pass "
            f"--label-column with one of: {_preview(columns)}",
        )
        label_column = guesses[0]
    require(
        label_column in columns,
        f"label column {label_column!r} not in {shown_as}; columns are: "
        f"{_preview(columns)} (pass --label-column NAME)",
    )
    features = [c for c in columns if c != label_column]
    require(bool(features), f"{shown_as} has only the label column; add feature columns")
    require(
        LABEL not in features,
        f"{shown_as} has a feature column named {LABEL!r} besides the label column "
        f"{label_column!r}; rename that column (or pass --label-column {LABEL})",
    )
    labels = frame[label_column]
    frame = frame[features].copy()
    frame[LABEL] = _label_strings(labels, label_column, shown_as)
    class_names = _ordered_classes(labels.dropna())
    return frame, Schema(kind="table", feature_names=features, class_names=class_names)


def _load_npz(path: Path, shown_as: str) -> tuple[pd.DataFrame, Schema]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array named .npz
            raise ValueError("it holds one array, not an archive of named arrays")
        with loaded:
            arrays = dict(loaded)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise KubetrainError(
            f"cannot read {shown_as} as NPZ: {str(exc).rstrip('.')}; save "
            "it with numpy.savez(path, X=features, y=labels)"
        ) from None
    x_key = next((k for k in ("X", "x", "features", "images") if k in arrays), None)
    y_key = next((k for k in ("y", "labels", "label", "target") if k in arrays), None)
    require(
        x_key is not None and y_key is not None,
        f"{shown_as} needs arrays named X and y; it has: {', '.join(arrays) or 'none'}",
    )
    X, y = arrays[x_key], arrays[y_key]
    require(
        y.ndim == 1, f"{shown_as}: y must be 1-D (one label per row), got shape {tuple(y.shape)}"
    )
    require(
        X.ndim in (2, 3, 4),
        f"{shown_as}: X must be (rows, features), (rows, H, W) or "
        f"(rows, C, H, W), got shape {tuple(X.shape)}",
    )
    require(
        len(X) == len(y), f"{shown_as}: X has {len(X)} rows but y has {len(y)}; they must match"
    )
    require(len(X) > 0, f"{shown_as} is empty (no rows); give at least a few rows per class")
    require(np.issubdtype(X.dtype, np.number), f"{shown_as}: X must be numeric, got {X.dtype}")
    image_shape = None
    if X.ndim == 3:
        image_shape = [1, *X.shape[1:]]
    elif X.ndim == 4:
        image_shape = list(X.shape[1:])
    flat = X.reshape(len(X), -1).astype(np.float32)
    names = (
        [f"pixel_{i}" for i in range(flat.shape[1])]
        if image_shape
        else [f"feature_{i}" for i in range(flat.shape[1])]
    )
    labels = pd.Series(y)
    frame = pd.DataFrame(flat, columns=names)
    frame[LABEL] = _label_strings(labels, "y", shown_as)
    schema = Schema(
        kind="image" if image_shape else "table",
        feature_names=names,
        class_names=_ordered_classes(labels),
        image_shape=image_shape,
    )
    return frame, schema


def _label_strings(labels: pd.Series, name: str, shown_as: str) -> list[str]:
    missing = labels.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise KubetrainError(
            f"label column {name!r} in {shown_as} has {int(missing.sum())} "
            f"missing value(s) (first at row {first}); fill or drop those rows"
        )
    return [_label_text(v) for v in labels]


def _label_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _ordered_classes(labels: pd.Series) -> list[str]:
    """Sorted class names; numerically when every label is a number (so 2 < 10)."""
    values = sorted({_label_text(v) for v in labels})
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _preview(columns: list[str], limit: int = 12) -> str:
    shown = ", ".join(columns[:limit])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")


def validate(frame: pd.DataFrame, schema: Schema, shown_as: str) -> None:
    """Checks every source must pass before anything is written."""
    require(len(frame) > 0, f"{shown_as} has no rows; give at least a few rows per class")
    require(
        len(schema.class_names) >= 2,
        f"{shown_as} has only one class ({schema.class_names[0]!r}) in its labels; a "
        "classifier needs at least two",
    )
    if schema.image_shape:
        require(
            int(np.prod(schema.image_shape)) == len(schema.feature_names),
            f"{shown_as}: image shape {schema.image_shape} does not match "
            f"{len(schema.feature_names)} pixel columns",
        )


def ingest(source: str, label_column: str, out_path: str, fingerprint: str = "") -> dict[str, Any]:
    """The ingest stage: load, validate, write the table; returns artifact metadata.

    `fingerprint` is not read: the caller passes a hash of a local file's
    content so that KFP's cache key changes when the file does.
    """
    started = time.perf_counter()
    frame, schema = load_source(source, label_column)
    validate(frame, schema, source)
    counts = frame[LABEL].value_counts()
    class_counts = {c: int(counts.get(c, 0)) for c in schema.class_names}
    schema.extra["source"] = source
    save_table(out_path, frame, schema)
    return {
        "stage": "ingest",
        "source": source,
        "kind": schema.kind,
        "rows": int(len(frame)),
        "features": len(schema.feature_names),
        "classes": schema.class_names,
        "class_counts": class_counts,
        "content_hash": content_hash(frame),
        "image_shape": schema.image_shape or [],
        "missing_values": int(frame.drop(columns=[LABEL]).isna().sum().sum()),
        "seconds": round(time.perf_counter() - started, 3),
    }
