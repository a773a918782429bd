"""Clean a raw table larger than memory: the in-memory clean, in record batches.

`clean_streaming` produces what `kubetrain.data.clean.clean` produces (three
sharded splits and the same metadata) while holding one record batch at a
time plus a few bytes per row (row hashes, label codes, one routing code per
raw row). It reads the table's single Parquet file several times:

1. every row: content hash of features + label, exact duplicates dropped
   (first occurrence kept, across batches), missing values counted, rows with
   missing values dropped for ``impute="drop"``; then the train/validation/test
   routing (`kubetrain.data.stats.route`: exactly stratified, decided by row
   hashes only, so any batching routes every row the same way);
2. training rows: fill values (mean via merged moments, median via a
   `QuantileSample` keyed by row hash, most frequent via exact counts) and
   category lists; 2b: moments (and, for ``outliers="iqr"``, quantile samples)
   of the imputed, encoded matrix, which give the outlier bounds, or the scaler
   when outliers are not handled; 2c (only when outliers are handled): moments
   of the clipped matrix, which give the scaler;
3. every kept row: `Preprocessor.transform`, written to the three splits with
   `kubetrain.data.shards.writer` (nothing is published if anything fails).

The routing differs from the in-memory clean's (scikit-learn's shuffled
split): both are exactly stratified, but they pick different rows, and rows
keep their table order inside each split. Median and IQR are exact up to
`stats.SAMPLE_SIZE` training values per column, a uniform hash-chosen sample
beyond. Means and standard deviations are merged batch by batch, so different
batch sizes agree to floating-point rounding (about 1e-15 relative), not bit
for bit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import pandas as pd

from kubetrain.config.settings import CleanConfig
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data import shards
from kubetrain.data.clean import MAX_CATEGORIES, Preprocessor, _check_classes
from kubetrain.data.datasets import (
    LABEL,
    Schema,
    class_counts,
    table_arrow_schema,
    table_batches,
    table_schema,
)
from kubetrain.data.stats import QuantileSample, route, row_hashes

#: Distinct values a numeric column may have for ``impute="most_frequent"`` (exact counts).
MAX_MODE_VALUES = 1_000_000
DROPPED = -1  # routing code of a raw row that is a duplicate or was dropped for missing values


class _ColumnMoments:
    """Per-column count, mean, M2, min and max of a float matrix, merged batch by batch."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)
        self.min = np.full(width, np.inf)
        self.max = np.full(width, -np.inf)

    def add(self, X: np.ndarray) -> None:
        n = len(X)
        if n == 0:
            return
        mean = X.mean(axis=0)
        m2 = ((X - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta * delta * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.count = total
        self.min = np.minimum(self.min, X.min(axis=0))
        self.max = np.maximum(self.max, X.max(axis=0))

    def overall(self) -> tuple[float, float, float, float]:
        """(mean, std, min, max) of every value of the matrix together (images)."""
        width = len(self.mean)
        n = self.count * width
        mean = float(self.mean.mean())
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        return mean, float(np.sqrt(m2 / n)), float(self.min.min()), float(self.max.max())

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)


def _columns(table_path: str) -> tuple[list[str], list[str]]:
    """(numeric, categorical) feature columns, decided as `Preprocessor.fit` decides them
    on the whole table (from the file's schema, not from one batch's dtypes)."""
    empty = table_arrow_schema(table_path).empty_table().to_pandas()
    features = empty.drop(columns=[LABEL])
    numeric = [
        c
        for c in features.columns
        if pd.api.types.is_numeric_dtype(features[c])
        and not pd.api.types.is_bool_dtype(features[c])
    ]
    return numeric, [c for c in features.columns if c not in numeric]


def batch_hashes(frame: pd.DataFrame, numeric: list[str]) -> np.ndarray:
    """Row hashes of a batch (features + label) independent of the batch's own dtypes.

    A batch without missing values reads an integer column as int64 and one
    with them as float64; hashing both as float64 (and everything else as
    text) makes equal rows hash equally whichever batch holds them.
    """
    norm = {}
    for c in frame.columns:
        col = frame[c]
        if c in numeric:
            norm[c] = col.astype(np.float64)
        else:
            obj = col.astype(object)
            norm[c] = obj.where(obj.isna(), obj.astype(str)).where(obj.notna(), None)
    return row_hashes(pd.DataFrame(norm, columns=frame.columns))


def _first_unseen(hashes: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Mask of rows whose hash occurs neither earlier in the batch nor in ``seen`` (sorted)."""
    _, first = np.unique(hashes, return_index=True)
    mask = np.zeros(len(hashes), bool)
    mask[first] = True
    if len(seen):
        pos = np.searchsorted(seen, hashes)
        hit = seen[np.minimum(pos, len(seen) - 1)] == hashes
        mask &= ~hit
    return mask


def clean_streaming(
    table_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    cfg: CleanConfig,
    seed: int,
    batch_rows: int = 100_000,
) -> dict[str, Any]:
    """The clean stage in bounded memory; returns the metadata `clean` returns."""
    require(batch_rows >= 1, f"batch_rows={batch_rows} must be positive")
    started = time.perf_counter()
    schema = table_schema(table_path)
    numeric, categorical = _columns(table_path)
    index = {name: i for i, name in enumerate(schema.class_names)}
    label_dtype = np.min_scalar_type(max(len(schema.class_names), 1))

    # --- pass 1: dedupe, count missing values, route ---------------------------------
    stats: dict[str, Any] = {"rows_in": 0, "duplicates_removed": 0, "missing_values": 0}
    dropped_missing = 0
    seen = np.empty(0, np.uint64)
    kept_hashes, kept_labels, raw_keep = [], [], []
    for frame in table_batches(table_path, batch_rows):
        stats["rows_in"] += len(frame)
        hashes = batch_hashes(frame, numeric)
        unique = _first_unseen(hashes, seen)
        seen = np.union1d(seen, hashes[unique])
        stats["duplicates_removed"] += int((~unique).sum())
        features = frame.drop(columns=[LABEL])
        missing = features.isna()
        stats["missing_values"] += int(missing[unique].sum().sum())
        keep = unique
        if cfg.impute == "drop":
            has_missing = missing.any(axis=1).to_numpy()
            dropped_missing += int((unique & has_missing).sum())
            keep = unique & ~has_missing
        y = frame.loc[keep, LABEL].map(index).to_numpy()
        require(not pd.isna(y).any(), "labels outside the schema's classes; re-run ingest")
        kept_hashes.append(hashes[keep])
        kept_labels.append(np.asarray(y, np.int64).astype(label_dtype))
        raw_keep.append(keep)
    del seen
    if cfg.impute == "drop":
        stats["rows_dropped_missing"] = dropped_missing
    hashes = np.concatenate(kept_hashes) if kept_hashes else np.empty(0, np.uint64)
    y_all = np.concatenate(kept_labels) if kept_labels else np.empty(0, np.int64)
    keep_all = np.concatenate(raw_keep) if raw_keep else np.empty(0, bool)
    del kept_hashes, kept_labels, raw_keep
    require(
        len(hashes) > 0,
        "no rows left after dropping rows with missing values; use "
        "--impute median (or mean/most_frequent) instead of drop",
    )
    _check_classes(y_all.astype(np.int64), schema.class_names, cfg)
    routed = route(hashes, y_all, cfg.test_fraction, cfg.val_fraction, seed)
    codes = np.full(len(keep_all), DROPPED, np.int8)  # per raw row: -1, 0 train, 1 val, 2 test
    codes[keep_all] = routed
    del keep_all, routed

    def train_batches():
        """(frame of training feature rows, their row hashes), batch by batch."""
        start = cursor = 0
        for frame in table_batches(table_path, batch_rows):
            c = codes[start : start + len(frame)]
            start += len(frame)
            kept = c != DROPPED
            h = hashes[cursor : cursor + int(kept.sum())]
            cursor += len(h)
            train = c[kept] == 0
            yield frame.drop(columns=[LABEL])[c == 0].reset_index(drop=True), h[train]

    # --- pass 2: fill values and categories (training rows only) ----------------------
    params = _fit_fill(cfg, numeric, categorical, train_batches())
    prep = Preprocessor(cfg, schema)
    prep.params = params  # fitted here, applied by the in-memory code
    width = len(prep.feature_names())
    n_num = len(numeric)
    image = schema.kind == "image"

    # --- pass 2b: moments (and quantiles) of the imputed, encoded matrix --------------
    moments = _ColumnMoments(width)
    samples = [QuantileSample() for _ in range(n_num)]
    want_iqr = cfg.outliers == "iqr" and n_num and not image
    for frame, h in train_batches():
        X = prep._encode(frame)
        moments.add(X)
        if want_iqr:
            for j in range(n_num):
                samples[j] = samples[j].merge(QuantileSample.of(X[:, j], h))
    bounds = None
    if cfg.outliers != "none" and n_num and not image:
        t = cfg.outlier_threshold
        if cfg.outliers == "zscore":
            mu, sd = moments.mean[:n_num], moments.std[:n_num]
            bounds = [(mu - t * sd).tolist(), (mu + t * sd).tolist()]
        else:
            q1 = np.array([s.quantile(0.25) for s in samples])
            q3 = np.array([s.quantile(0.75) for s in samples])
            bounds = [(q1 - t * (q3 - q1)).tolist(), (q3 + t * (q3 - q1)).tolist()]
    params["bounds"] = bounds

    # --- pass 2c: moments of the clipped matrix (only when outliers are handled) ------
    if bounds is not None:
        moments = _ColumnMoments(width)
        for frame, _ in train_batches():
            X = prep._encode(frame)
            X[:, :n_num] = np.clip(X[:, :n_num], *bounds)
            moments.add(X)
    params["scale"] = _scale(cfg, moments, image, width)

    # --- pass 3: transform and write ----------------------------------------------------
    split_schema = Schema(
        kind=schema.kind,
        feature_names=prep.feature_names(),
        class_names=schema.class_names,
        image_shape=schema.image_shape,
        extra={
            "preprocessing": params,
            "categorical_columns": list(range(n_num, width)),
        },
    )
    drop_outliers = bounds is not None and cfg.outlier_action == "drop"
    outliers_dropped = outliers_clipped = 0
    counts = np.zeros((3, len(schema.class_names)), np.int64)
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(shards.writer(p, split_schema))
            for p in (train_path, val_path, test_path)
        ]
        writers[0].stats["preprocessing"] = params
        start = cursor = 0
        for frame in table_batches(table_path, batch_rows):
            c = codes[start : start + len(frame)]
            start += len(frame)
            kept = c != DROPPED
            n_kept = int(kept.sum())
            y = y_all[cursor : cursor + n_kept].astype(np.int64)
            cursor += n_kept
            features = frame.drop(columns=[LABEL])[kept].reset_index(drop=True)
            split = c[kept]
            X = prep.transform(features)
            if bounds is not None:
                out = prep.outlier_mask(features)
                if drop_outliers:
                    bad = out & (split == 0)
                    outliers_dropped += int(bad.sum())
                    X, y, split = X[~bad], y[~bad], split[~bad]
                else:
                    outliers_clipped += int(out.sum())
            for s in range(3):
                rows = split == s
                if rows.any():
                    writers[s].write(X[rows], y[rows])
                    counts[s] += np.bincount(y[rows], minlength=len(schema.class_names))
    if drop_outliers:
        stats["outliers_dropped"] = outliers_dropped
    elif cfg.outliers != "none":
        stats["outliers_clipped_rows"] = outliers_clipped
    splits = {
        name: {
            "rows": int(counts[s].sum()),
            "class_counts": class_counts(
                np.repeat(np.arange(len(schema.class_names)), counts[s]), schema.class_names
            ),
        }
        for s, name in enumerate(("train", "validation", "test"))
    }
    stats.update(
        stage="clean",
        splits=splits,
        features_out=width,
        scaling=cfg.scaling,
        impute=cfg.impute,
        outliers=cfg.outliers,
        seconds=round(time.perf_counter() - started, 3),
    )
    return stats


def _no_values(c: str) -> KubetrainError:
    return KubetrainError(
        f"feature column {c!r} has no values in the training "
        "split; drop the column or fill it before ingest"
    )


def _fit_fill(cfg: CleanConfig, numeric, categorical, batches) -> dict[str, Any]:
    """The fill values and category lists `Preprocessor.fit` computes, batch by batch."""
    strategy = cfg.impute if cfg.impute != "drop" else "median"
    sums = {c: [0, 0.0] for c in numeric}  # count, running mean (merged exactly like Moments)
    samples = {c: QuantileSample() for c in numeric}
    modes: dict[str, dict[float, int]] = {c: {} for c in numeric}
    cats: dict[str, dict[str, int]] = {c: {} for c in categorical}
    for frame, h in batches:
        for c in numeric:
            v = frame[c].astype(np.float64).to_numpy()
            present = v[~np.isnan(v)]
            if strategy == "mean" and len(present):
                n0, m0 = sums[c]
                n = n0 + len(present)
                sums[c] = [n, m0 + (float(present.mean()) - m0) * len(present) / n]
            elif strategy == "median":
                samples[c] = samples[c].merge(QuantileSample.of(v, h))
            elif strategy == "most_frequent":
                values, counts = np.unique(present, return_counts=True)
                acc = modes[c]
                for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                    acc[value] = acc.get(value, 0) + count
                if len(acc) > MAX_MODE_VALUES:
                    raise KubetrainError(
                        f"feature column {c!r} has over {MAX_MODE_VALUES} distinct values; "
                        "impute most_frequent needs exact counts of each: use "
                        "--impute median (or mean) for a table this large"
                    )
            if strategy != "mean" and len(present):
                sums[c][0] += len(present)
        for c in categorical:
            values = frame[c].dropna().astype(str).value_counts()
            acc = cats[c]
            for value, count in values.items():
                if count:
                    acc[value] = acc.get(value, 0) + int(count)
            if len(acc) > MAX_CATEGORIES:
                raise KubetrainError(
                    f"feature column {c!r} has over {MAX_CATEGORIES} distinct text values "
                    f"(limit {MAX_CATEGORIES}); drop it (an ID?) or encode it numerically first"
                )
    fill: dict[str, Any] = {}
    for c in numeric:
        if sums[c][0] == 0:
            raise _no_values(c)
        if strategy == "mean":
            fill[c] = float(sums[c][1])
        elif strategy == "median":
            fill[c] = samples[c].quantile(0.5)
        else:
            fill[c] = float(min(modes[c].items(), key=lambda kv: (-kv[1], kv[0]))[0])
    categories: dict[str, list[str]] = {}
    for c in categorical:
        if not cats[c]:
            raise _no_values(c)
        categories[c] = sorted(cats[c])
        fill[c] = min(cats[c].items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return {"numeric": list(numeric), "categorical": categories, "fill": fill}


def _scale(cfg: CleanConfig, m: _ColumnMoments, image: bool, width: int) -> dict[str, Any]:
    """`Preprocessor._scaler` from merged moments."""
    kind = cfg.scaling
    if kind == "none" or width == 0 or m.count == 0:
        return {"kind": "none"}
    if image:
        mean, std, lo, hi = m.overall()
        offset, scale = (mean, std) if kind == "standard" else (lo, hi - lo)
    else:
        offset, scale = (m.mean, m.std) if kind == "standard" else (m.min, m.max - m.min)
    scale = np.where(np.asarray(scale) > 1e-12, scale, 1.0)
    return {
        "kind": kind,
        "offset": np.atleast_1d(offset).tolist(),
        "scale": np.atleast_1d(scale).tolist(),
    }


__all__ = ["batch_hashes", "clean_streaming"]
