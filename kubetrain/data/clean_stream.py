"""Clean a raw table larger than memory: the in-memory clean, in record batches.

`clean_streaming` produces what `kubetrain.data.clean.clean` produces (three
sharded splits and the same metadata) while holding one record batch at a
time plus a few bytes per row (row hashes, label codes, one routing code per
raw row). It reads the table several times: from its Parquet parts, or, when
the table's Arrow batches fit the memory budget, from those batches, which the
first pass keeps (`HeldBatches`). Batches are read ahead on a thread of their own
(`read_ahead`) and shards written behind on another (`write_behind`):

0. the first rows (`kubetrain.data.column_types.read_sample`): each feature
   column's type (numeric, date, text, identifier, ...), which decides its
   encoding; `Plan` holds it, so every engine encodes alike;
1. every row: content hash of features + label, exact duplicates dropped
   (first occurrence kept, across batches), missing values counted, rows with
   missing values dropped for ``impute="drop"``; then the train/validation/test
   routing (`kubetrain.data.stats.route`: exactly stratified, decided by row
   hashes only, so any batching routes every row the same way); the same pass
   folds the validation statistics (`kubetrain.data.validation.TableProfile`),
   stops on a fatal anomaly, and checks leakage and train/test skew on the
   first rows with their routing (bounded whatever the table's size);
2. training rows: fill values (mean via merged moments, median via a
   `QuantileSample` keyed by row hash, most frequent via exact counts),
   category lists and each date column's earliest date; 2b: moments (and, for
   ``outliers="iqr"``, quantile samples; for feature selection, cross products
   and a hash-chosen row sample) of the imputed, encoded matrix, which give the
   selected columns (`kubetrain.data.feature_selection`), the outlier bounds, and
   the scaler when outliers are not handled; 2c
   (only when outliers are handled): moments of the clipped matrix, which give
   the scaler;
3. every kept row: `Preprocessor.transform`, written to the three splits with
   `kubetrain.data.shards.writer` (nothing is published if anything fails).

The in-memory clean (`kubetrain.data.clean.clean`) is this function with the
table's batches held in memory after one read, and the Spark engine
(`kubetrain.data.clean_spark`) runs the same pieces per task, so all three
route every row alike. Rows keep their table order inside each split. Median
and IQR are exact up to `stats.SAMPLE_SIZE` training values per column, a
uniform hash-chosen sample beyond. Batches are worked on by `THREADS` threads
(`ordered_map`), each summary merged in batch order; means and standard
deviations therefore agree across batch sizes to floating-point rounding
(about 1e-15 relative), not bit for bit.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from kubetrain.config.settings import CleanConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError, require
from kubetrain.core.memory import fits
from kubetrain.data import shards
from kubetrain.data.clean import (
    MAX_CATEGORIES,
    Preprocessor,
    category_codes,
    continuous_width,
    fill_params,
    no_values,
    rare_classes,
    rows_needed,
    too_many_categories,
)
from kubetrain.data.column_types import (
    DROPPED_KINDS,
    Typing,
    infer_types,
    notes,
    read_sample,
    to_float,
)
from kubetrain.data.datasets import (
    LABEL,
    LABEL_ALIASES,
    Schema,
    class_counts,
    table_arrow_schema,
    table_batches,
    table_frame,
    table_record_batches,
    table_rows,
    table_schema,
)
from kubetrain.data.feature_selection import SelectionStats, labels_of, select
from kubetrain.data.stats import (
    SAMPLE_SIZE,
    Frequencies,
    Moments,
    QuantileSample,
    route,
    row_hashes,
)
from kubetrain.data.validation import TableProfile, raise_fatal, table_anomalies, validate

#: Distinct values a numeric column may have for ``impute="most_frequent"`` (exact counts).
MAX_MODE_VALUES = 1_000_000
DROPPED = -1  # routing code of a raw row that is a duplicate or was dropped for missing values
#: Fewest values a median is taken from when the table has more: a column missing in
#: most rows has few values among the sampled rows (`FillStats`).
MIN_MEDIAN_SAMPLE = 256
NO_CUT = np.uint64(np.iinfo(np.uint64).max)  # every row is sampled


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

    def merge(self, other: _ColumnMoments) -> _ColumnMoments:
        """Fold another worker's moments in (Chan et al.); exact up to rounding."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / total
        self.mean = self.mean + delta * other.count / total
        self.count = total
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        return self

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


def columns_of(arrow_schema: pa.Schema) -> tuple[list[str], list[str]]:
    """(numeric, categorical) feature columns, decided as `Preprocessor.fit` decides them
    on the whole table (from the table's schema, not from one batch's dtypes)."""
    features = arrow_schema.empty_table().to_pandas().drop(columns=[LABEL])
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
    wanted = set(numeric)
    for c in frame.columns:
        col = frame[c]
        if c in wanted:
            norm[c] = col.astype(np.float64)
        elif isinstance(col.dtype, pd.StringDtype):
            norm[c] = col  # text stays text in every batch (the table's Arrow type decides)
        else:  # booleans (object when a batch has missing values) and other objects
            obj = col.astype(object)
            norm[c] = obj.where(obj.isna(), obj.astype(str)).where(obj.notna(), None)
    return row_hashes(pd.DataFrame(norm, columns=frame.columns))


class EncodedStats:
    """Moments (and, for IQR bounds, quantile samples; for feature selection, cross
    products and a row sample: `SelectionStats`) of the imputed, encoded training
    matrix: passes 2b and 2c, folded batch by batch and merged across workers."""

    def __init__(self, width: int, n_num: int, want_iqr: bool, selection: bool = False) -> None:
        self.moments = _ColumnMoments(width)
        self.samples = [QuantileSample() for _ in range(n_num if want_iqr else 0)]
        self.selection = SelectionStats(width) if selection else None

    def add(self, X: np.ndarray, h: np.ndarray) -> None:
        self.moments.add(X)
        for j, sample in enumerate(self.samples):
            self.samples[j] = sample.merge(QuantileSample.of(X[:, j], h))
        if self.selection is not None:
            self.selection.add(X, h)

    def merge(self, other: EncodedStats) -> EncodedStats:
        self.moments = self.moments.merge(other.moments)
        self.samples = [a.merge(b) for a, b in zip(self.samples, other.samples, strict=True)]
        if self.selection is not None and other.selection is not None:
            self.selection = self.selection.merge(other.selection)
        return self

    def robust(self, bounds: list | None) -> tuple[np.ndarray, np.ndarray]:
        """(median, interquartile range) of each continuous column, clipped to the outlier
        ``bounds`` when they apply (quantiles of the clipped values: clipping is monotone)."""
        q = np.array([[s.quantile(p) for s in self.samples] for p in (0.25, 0.5, 0.75)])
        if bounds is not None:
            q = np.clip(q, np.asarray(bounds[0]), np.asarray(bounds[1]))
        return q[1], q[2] - q[0]

    def bounds(self, cfg: CleanConfig, n_num: int, image: bool) -> list | None:
        """The outlier bounds `Preprocessor.outlier_mask` applies, or None."""
        if cfg.outliers == "none" or not n_num or image:
            return None
        t = cfg.outlier_threshold
        if cfg.outliers == "zscore":
            mu, sd = self.moments.mean[:n_num], self.moments.std[:n_num]
            return [(mu - t * sd).tolist(), (mu + t * sd).tolist()]
        q1 = np.array([s.quantile(0.25) for s in self.samples])
        q3 = np.array([s.quantile(0.75) for s in self.samples])
        return [(q1 - t * (q3 - q1)).tolist(), (q3 + t * (q3 - q1)).tolist()]


def encode_train(prep: Preprocessor, frame: pd.DataFrame, bounds: list | None) -> np.ndarray:
    """Training rows imputed and encoded (clipped when bounds are known): what the
    scaler is fitted on."""
    X = prep._encode(frame)
    if bounds is not None:
        n_num = len(bounds[0])
        X[:, :n_num] = np.clip(X[:, :n_num], *bounds)
    return X


def apply_batch(
    prep: Preprocessor,
    features: pd.DataFrame,
    y: np.ndarray,
    split: np.ndarray,
    drop_outliers: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Pass 3 for one batch of kept rows: (X, y, split, outliers dropped, rows clipped)."""
    X = prep.transform(features)
    dropped = clipped = 0
    if prep.params.get("bounds") is not None:
        out = prep.outlier_mask(features)
        if drop_outliers:
            bad = out & (split == 0)  # only training rows are dropped; others are clipped
            dropped = int(bad.sum())
            X, y, split = X[~bad], y[~bad], split[~bad]
        else:
            clipped = int(out.sum())
    return X, y, split, dropped, clipped


def batch_keys(
    frame: pd.DataFrame,
    numeric: list[str],
    codes: Callable[[pd.Series], np.ndarray],
    features: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 for one batch: (row hashes, label codes, missing values per row).

    Only the ``features`` kept (default: all) and the label count: rows that differ
    only in a dropped column (an ID) are duplicates for the model, and must not land
    in train and test both; a dropped column's gaps neither count nor drop rows for
    ``impute="drop"``."""
    kept = frame.drop(columns=[LABEL]) if features is None else frame[features]
    hashes = batch_hashes(kept.assign(**{LABEL: frame[LABEL]}), numeric)
    missing = kept.isna().sum(axis=1).to_numpy(np.int32)
    return hashes, codes(frame[LABEL]), missing


def class_index(schema: Schema) -> dict[str, int]:
    """Each class name, and each label variant ingest merged into one, to its class code."""
    index = {name: i for i, name in enumerate(schema.class_names)}
    for variant, name in schema.extra.get(LABEL_ALIASES, {}).items():  # "YES" -> "yes"
        if name in index:
            index.setdefault(variant, index[name])
    return index


def class_codes_of(labels: pd.Series, index: dict[str, int]) -> np.ndarray:
    """``labels.map(index)``, -1 where a label is not in it: by Arrow's hash lookup for
    text labels (what ingest writes), where pandas' ``map`` costs about 20 times as much."""
    if not isinstance(labels.dtype, pd.StringDtype):
        return labels.map(index).fillna(-1).to_numpy(np.int64)
    found = category_codes(labels, list(index), None)  # -1 picks the appended -1
    return np.asarray([*index.values(), -1], np.int64)[found]


def first_unseen(hashes: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows whose hash occurs neither earlier in the batch nor in ``seen``,
    ``seen`` with their hashes added); ``seen`` is sorted.

    The batch's new hashes come out of `np.unique` sorted, so they are inserted where
    `searchsorted` puts them: one linear copy (sorting the whole array again per batch
    cost about ten times as much at a few million rows)."""
    new, first = np.unique(hashes, return_index=True)
    pos = np.searchsorted(seen, new)
    if len(seen):
        fresh = seen[np.minimum(pos, len(seen) - 1)] != new
        new, first, pos = new[fresh], first[fresh], pos[fresh]
    mask = np.zeros(len(hashes), bool)
    mask[first] = True
    return mask, np.insert(seen, pos, new)


def clean_streaming(
    table_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    cfg: CleanConfig,
    seed: int,
    batch_rows: int = 100_000,
    in_memory: bool = False,
) -> dict[str, Any]:
    """The clean stage; returns its metadata. ``in_memory`` reads the table once and
    keeps its batches for the later passes (fast, for a table that fits the budget);
    otherwise every pass reads it again and memory does not grow with the rows."""
    require(batch_rows >= 1, f"batch_rows={batch_rows} must be positive")
    started = time.perf_counter()
    sample = read_sample(table_batches(table_path, 1 << 16))  # types, then validation
    plan = Plan.of(table_path, cfg, sample)
    read: Callable[[], Iterator[pd.DataFrame]] = functools.partial(
        table_batches, table_path, batch_rows
    )
    # the later passes read raw batches: pandas frames held in memory, else Arrow record
    # batches (kept by pass 1 while they fit the budget, else read from the parts again)
    raw: Callable[[], Iterator[pd.DataFrame | pa.RecordBatch]]
    if in_memory:
        held = list(read())
        raw = first_read = functools.partial(iter, held)
    else:
        arrow = HeldBatches(table_path, batch_rows)
        first_read, raw = arrow.first_read, arrow.read

    # --- pass 1: dedupe, count missing values, route ---------------------------------
    stats: dict[str, Any] = {"rows_in": 0, "duplicates_removed": 0, "missing_values": 0}
    seen = np.empty(0, np.uint64)
    kept_hashes, kept_labels, kept_missing, raw_keep = [], [], [], []
    # validation's exact statistics (an image's pixels: only the label is profiled)
    profile = TableProfile.of_types({} if plan.image else plan.types)
    keyed = functools.partial(_keys_and_profile, plan, profile)
    for rows, (hashes, y, missing), batch_profile in ordered_map(keyed, first_read()):
        profile.merge(batch_profile)
        stats["rows_in"] += rows
        unique, seen = first_unseen(hashes, seen)
        kept_hashes.append(hashes[unique])
        kept_labels.append(y[unique].astype(plan.label_dtype))
        kept_missing.append(missing[unique])
        raw_keep.append(unique)
    del seen
    hashes = _joined(kept_hashes, np.uint64)
    y_all = _joined(kept_labels, np.int64)
    missing = _joined(kept_missing, np.int32)
    unique_all = _joined(raw_keep, bool)
    del kept_hashes, kept_labels, kept_missing, raw_keep
    stats["duplicates_removed"] = stats["rows_in"] - len(hashes)
    raise_fatal(a.to_json() for a in table_anomalies(plan.types, plan.schema, profile))
    keep, routed = plan.route(hashes, y_all, missing, stats, seed)
    hashes, y_all = hashes[keep], y_all[keep]
    cut = sample_cut(hashes[routed == 0])  # the training rows medians are taken from
    codes = np.full(len(unique_all), DROPPED, np.int8)  # per raw row: -1, 0 train, 1 val, 2 test
    codes[np.flatnonzero(unique_all)[keep]] = routed
    del unique_all, routed, missing, keep
    stats["validation"] = plan.validation(profile, sample, codes)
    del sample
    stats["anomalies"] = stats["validation"]["anomalies"]
    if stats.get("classes_dropped"):
        stats["anomalies"].append(plan.rare_class_anomaly(stats))

    def kept_batches(split: int | None = None):
        """(kept feature rows, their hashes, labels, split codes), batch by batch; with
        ``split``, only that split's rows (the frame is filtered once, not twice)."""
        start = cursor = 0
        for batch in raw():
            c = codes[start : start + len(batch)]
            start += len(batch)
            kept = c != DROPPED
            n = int(kept.sum())
            h, y = hashes[cursor : cursor + n], y_all[cursor : cursor + n]
            cursor += n
            if plan.schema.regression:  # the number itself, not its quantile bin
                y = plan.targets(_column(batch, LABEL)[kept])
            rows = kept if split is None else c == split
            inner = rows[kept]
            yield _feature_rows(batch, rows, plan.schema), h[inner], y[inner], c[rows]

    def train_batches():
        for features, h, _, _ in kept_batches(0):
            yield features, h

    # --- pass 2: fill values and categories (training rows only) ----------------------
    fill = _fold(functools.partial(plan.fill_stats, cut), FillStats.add, train_batches())
    prep = plan.preprocessor(fill)

    # --- pass 2b (and 2c when outliers are handled): the encoded matrix; selection -----
    encoded = _fold(
        functools.partial(plan.encoded_stats, prep, True),
        functools.partial(_add_encoded, prep, None),
        train_batches(),
    )
    stats.update(plan.select(prep, encoded, hashes, y_all, seed))
    prep.params["bounds"] = encoded.bounds(cfg, plan.n_num(prep), plan.image)
    robust = plan.robust(encoded, prep)
    if prep.params["bounds"] is not None:
        encoded = _fold(
            functools.partial(plan.encoded_stats, prep, False),
            functools.partial(_add_encoded, prep, prep.params["bounds"]),
            train_batches(),
        )
    prep.params["scale"] = _scale(
        cfg, encoded.moments, plan.image, plan.encoded_width(prep), robust
    )

    # --- pass 3: transform and write ----------------------------------------------------
    drop = plan.drop_outliers(prep)
    counters = {"dropped": 0, "clipped": 0}
    counts = SplitCounts.of(plan.schema)
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(shards.writer(p, plan.split_schema(prep)))
            for p in (train_path, val_path, test_path)
        ]
        writers[0].stats["preprocessing"] = prep.params
        applied = functools.partial(_apply, prep, drop)

        def write(X: np.ndarray, y: np.ndarray, split: np.ndarray) -> None:
            for s in range(3):
                rows = split == s
                if rows.any():
                    writers[s].write(X[rows], y[rows])
                    counts.add(s, y[rows])

        def transformed():
            for X, y, split, dropped, clipped in ordered_map(applied, kept_batches()):
                counters["dropped"] += dropped
                counters["clipped"] += clipped
                yield X, y, split

        write_behind(write, transformed())
        for w in writers:  # written with the manifests, which close last
            w.schema.extra.update(counts.target())
    return plan.finish(stats, counts, counters, prep, started)


class HeldBatches:
    """The table's Arrow record batches, kept by the first pass while they fit the
    memory budget, so the later passes convert them to pandas instead of reading and
    decoding the Parquet parts again; past the budget they are let go and every pass
    streams from the parts. Arrow holds the 1M-row bench table in 234 MiB, pandas
    in over twice that. A table whose first batch, times its rows, already exceeds
    the budget is not held at all: filling the budget only to let it go put clean's
    peak at 1.30 GiB on 10M rows, against 0.84 GiB on 1M (bench-scale)."""

    def __init__(self, table_path: str, batch_rows: int) -> None:
        self.table_path, self.batch_rows = table_path, batch_rows
        self.schema = table_schema(table_path)
        self.rows = table_rows(table_path)
        self.batches: list[pa.RecordBatch] | None = []

    def first_read(self) -> Iterator[pd.DataFrame]:
        size = 0
        for batch in table_record_batches(self.table_path, self.batch_rows):
            if self.batches is not None:
                size += batch.nbytes
                whole = batch.nbytes / max(1, batch.num_rows) * self.rows  # estimated
                if fits(size) and (len(self.batches) or fits(int(whole))):
                    self.batches.append(batch)
                else:
                    self.batches = None
            yield table_frame(batch, self.schema)

    def read(self) -> Iterator[pa.RecordBatch]:
        if self.batches is None:
            return table_record_batches(self.table_path, self.batch_rows)
        return iter(self.batches)


def _column(batch: pd.DataFrame | pa.RecordBatch, name: str) -> np.ndarray:
    if isinstance(batch, pd.DataFrame):
        return batch[name].to_numpy()
    return batch.column(name).to_numpy(zero_copy_only=False)


def _feature_rows(
    batch: pd.DataFrame | pa.RecordBatch, rows: np.ndarray, schema: Schema
) -> pd.DataFrame:
    """The feature columns of ``rows`` as a frame. A record batch is filtered in Arrow
    before it becomes pandas: the training passes then convert two rows in three, and
    pandas' boolean indexing (a copy of every block) is not needed."""
    if isinstance(batch, pd.DataFrame):
        return batch.drop(columns=[LABEL])[rows].reset_index(drop=True)
    features = batch.drop_columns([LABEL])
    if not rows.all():
        features = features.filter(pa.array(rows))
    return table_frame(features, schema)


@dataclass
class SplitCounts:
    """Rows per class of each split, or for a regression each split's target moments
    (the training split's mean and deviation scale the network's output)."""

    classes: np.ndarray  # (3, classes) rows per class; (3, 0) for a regression
    targets: list[Moments]

    @classmethod
    def of(cls, schema: Schema) -> SplitCounts:
        return cls(np.zeros((3, len(schema.class_names)), np.int64), [Moments()] * 3)

    def add(self, split: int, y: np.ndarray) -> None:
        if self.classes.shape[1]:
            self.classes[split] += np.bincount(y, minlength=self.classes.shape[1])
        else:
            self.targets[split] = self.targets[split].merge(Moments.of(y))

    def merge(self, other: SplitCounts) -> SplitCounts:
        targets = [a.merge(b) for a, b in zip(self.targets, other.targets, strict=True)]
        return SplitCounts(self.classes + other.classes, targets)

    def rows(self, split: int) -> int:
        if self.classes.shape[1]:
            return int(self.classes[split].sum())
        return self.targets[split].count

    def target(self) -> dict[str, Any]:
        """The schema's ``extra["target"]`` of a regression (empty for classes)."""
        if self.classes.shape[1]:
            return {}
        train = self.targets[0]
        return {"target": {"mean": train.mean, "std": train.std or 1.0}}


#: Threads that work on batches at once (pandas and numpy release the GIL in most of
#: the work); each holds one batch, so memory grows by a batch per thread, not by rows.
THREADS = max(1, min(4, len(os.sched_getaffinity(0))))


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int = THREADS):
    """``map(fn, items)`` on `threads` threads: results in order, at most `threads`
    items in flight (a plain executor ``map`` would read the whole table first).

    BLAS (numpy's matrix products) gets one thread meanwhile: the batches already keep
    the cores busy, and its own threads on top of ours spin against them (a 60k x 46
    cross product took 2.5 s instead of 0.05 s on 2 shared cores)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with ThreadPoolExecutor(threads) as pool, threadpool_limits(1, user_api="blas"):
        pending: collections.deque = collections.deque()
        for item in read_ahead(items, threads):
            pending.append(pool.submit(fn, item))
            if len(pending) >= threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_ahead(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``items``, produced by a thread of their own up to ``depth`` ahead: reading and
    decoding the next batch (Parquet, Arrow to pandas, the split filter) overlaps the
    caller's serial work (merging summaries, writing shards) instead of waiting on it.
    An exception while producing is raised here; closing early stops the producer."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, exc))

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        producer.join()


_END = object()  # what `read_ahead`'s producer sends after the last item


def write_behind(write: Callable[..., None], calls: Iterable[tuple]) -> None:
    """``write(*args)`` for each of ``calls`` in order, on one thread of its own, at most
    two behind: encoding and hashing shards overlaps the next batches' transform. The
    first exception stops the loop and is raised here."""
    failed = threading.Event()

    def guarded(*args: Any) -> None:
        if failed.is_set():  # a write already failed: the ones queued after it do nothing
            return
        try:
            write(*args)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(1, thread_name_prefix="write-behind") as writer:
        pending: collections.deque = collections.deque()
        try:
            for args in calls:
                pending.append(writer.submit(guarded, *args))
                if len(pending) > 2:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            close = getattr(calls, "close", None)
            if close is not None:  # a generator: stops its reading threads now
                close()


def _fold(start: Callable[[], Any], add: Callable[..., None], batches: Iterable) -> Any:
    """Fold each (frame, hashes) batch into its own summary, on threads; merge them."""

    def one(batch: tuple[pd.DataFrame, np.ndarray]) -> Any:
        acc = start()
        add(acc, *batch)
        return acc

    return functools.reduce(lambda a, b: a.merge(b), ordered_map(one, batches), start())


def _keys_of(plan: Plan, frame: pd.DataFrame) -> tuple[int, tuple]:
    return len(frame), batch_keys(frame, plan.numeric, plan.label_codes, plan.kept)


def _keys_and_profile(
    plan: Plan, profile: TableProfile, frame: pd.DataFrame
) -> tuple[int, tuple, TableProfile]:
    """Pass 1 for one batch: its keys and its validation statistics."""
    return (*_keys_of(plan, frame), profile.empty().add(frame))


def _add_encoded(prep: Preprocessor, bounds: list | None, acc: EncodedStats, frame, h) -> None:
    acc.add(encode_train(prep, frame, bounds), h)


def _apply(prep: Preprocessor, drop: bool, batch: tuple) -> tuple:
    features, _, y, split = batch
    return apply_batch(prep, features, y, split, drop)


def _joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)


@dataclass(frozen=True)
class Plan:
    """What every engine decides the same way before and after the passes: columns and
    their types, class codes, the routing, the preprocessor's shape and the stage
    metadata. ``numeric``/``categorical`` are the raw Arrow columns (row hashes and
    dedupe work on raw values); ``types`` says how each feature column is encoded."""

    cfg: CleanConfig
    schema: Schema
    numeric: list[str]
    categorical: list[str]
    index: dict[str, int]
    types: Typing
    #: A regression's stratification: the label's quantile edges (`target_bins`).
    bins: tuple[float, ...] = ()

    @classmethod
    def of(cls, table_path: str, cfg: CleanConfig, sample: pd.DataFrame | None = None) -> Plan:
        """The plan of a local table: its schemas and its first rows (`read_sample`; pass
        them when already read, so the table's first part is not read twice)."""
        if sample is None:
            sample = read_sample(table_batches(table_path, 1 << 16))
        arrow_schema = table_arrow_schema(table_path)
        return cls.of_schemas(cfg, table_schema(table_path), arrow_schema, sample)

    @classmethod
    def of_schemas(
        cls, cfg: CleanConfig, schema: Schema, arrow_schema: pa.Schema, sample: pd.DataFrame
    ) -> Plan:
        """The plan from the table's schemas and ``sample``, its first rows in table order
        (`kubetrain.data.column_types.read_sample`): every engine passes the same rows,
        so every engine types the columns alike."""
        numeric, categorical = columns_of(arrow_schema)
        index = class_index(schema)
        features = [n for n in arrow_schema.names if n != LABEL]
        types = infer_types(
            sample,
            arrow_schema,
            features,
            image=schema.kind == "image",
            overrides=cfg.type_overrides,
            drop=cfg.dropped_columns,
        )
        bins = target_bins(sample[LABEL]) if schema.regression else ()
        return cls(cfg, schema, numeric, categorical, index, types, bins)

    def label_codes(self, labels: pd.Series) -> np.ndarray:
        """What a row is stratified and counted by: its class code, or for a regression
        the quantile bin of its target (splits then span the target's range alike)."""
        if self.schema.regression:
            return np.searchsorted(np.asarray(self.bins), self.targets(labels.to_numpy()))
        y = class_codes_of(labels, self.index)
        require(bool((y >= 0).all()), "labels outside the schema's classes; re-run ingest")
        return y

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """A regression's labels (ingest keeps them as text) as float32 numbers."""
        return np.asarray(pd.to_numeric(labels), np.float32)

    @property
    def kept(self) -> list[str]:
        """Feature columns that reach the model (not dropped)."""
        return [c for c, t in self.types.items() if t.kind not in DROPPED_KINDS]

    @property
    def image(self) -> bool:
        return self.schema.kind == "image"

    @property
    def label_dtype(self) -> np.dtype:
        return np.min_scalar_type(max(len(self.schema.class_names), 1))

    def route(
        self,
        hashes: np.ndarray,
        y: np.ndarray,
        missing: np.ndarray,
        stats: dict[str, Any],
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Of the unique rows: (kept mask, split code of each kept row); fills ``stats``."""
        stats["missing_values"] = int(missing.sum())
        keep = np.ones(len(hashes), bool)
        if self.cfg.impute == "drop":
            keep = missing == 0
            stats["rows_dropped_missing"] = int((~keep).sum())
        require(
            bool(keep.any()),
            "no rows left after dropping rows with missing values; use "
            "--impute median (or mean/most_frequent) instead of drop",
        )
        names = self.schema.class_names
        rare = rare_classes(np.asarray(y[keep], np.int64), names, self.cfg) if names else []
        if rare:
            dropped = keep & np.isin(y, rare)
            keep &= ~dropped
            names = [self.schema.class_names[i] for i in rare]
            stats["rows_dropped_rare_classes"] = int(dropped.sum())
            stats["classes_dropped"] = names
            progress.log(
                "clean",
                f"dropped {int(dropped.sum())} row(s) of {len(names)} class(es) with fewer than "
                f"{rows_needed(self.cfg)} rows: {', '.join(map(repr, names[:5]))}"
                + (f" and {len(names) - 5} more" if len(names) > 5 else ""),
            )
        y_kept = np.asarray(y[keep], np.int64)
        return keep, route(
            hashes[keep], y_kept, self.cfg.test_fraction, self.cfg.val_fraction, seed
        )

    def fill_stats(self, cut: np.uint64 = NO_CUT) -> FillStats:
        """An empty pass-2 summary; ``cut``: `sample_cut` of the training rows' hashes."""
        return FillStats(self.cfg, self.types, cut)

    def preprocessor(self, fill: FillStats) -> Preprocessor:
        prep = Preprocessor(self.cfg, self.schema)
        prep.params = fill.params()  # fitted here, applied by the in-memory code
        return prep

    def n_num(self, prep: Preprocessor) -> int:
        """Leading continuous columns of the encoded matrix (what outlier bounds cover)."""
        return continuous_width(prep.params)

    def width(self, prep: Preprocessor) -> int:
        """Columns of the splits (after feature selection)."""
        return len(prep.feature_names())

    def encoded_width(self, prep: Preprocessor) -> int:
        """Columns of the encoded matrix (before selection): what bounds and scaler cover."""
        return len(prep.encoded_names())

    @property
    def selects(self) -> bool:
        """Whether feature selection runs (never on images: pixels keep their grid)."""
        return not self.image and (self.cfg.feature_selection or self.cfg.max_features > 0)

    def encoded_stats(self, prep: Preprocessor, first: bool) -> EncodedStats:
        """Pass 2b's summary (``first``: IQR samples and selection statistics too), or
        pass 2c's (moments of the clipped matrix only)."""
        quantiles = self.cfg.outliers == "iqr" or self.cfg.scaling == "robust"
        iqr = first and quantiles and not self.image
        selection = first and self.selects
        return EncodedStats(self.encoded_width(prep), self.n_num(prep), iqr, selection)

    def robust(self, encoded: EncodedStats, prep: Preprocessor) -> tuple | None:
        """Pass 2b's (median, IQR) of the continuous columns when scaling is robust."""
        if self.cfg.scaling != "robust" or self.image:
            return None
        return encoded.robust(prep.params["bounds"])

    def select(
        self,
        prep: Preprocessor,
        encoded: EncodedStats,
        hashes: np.ndarray,
        labels: np.ndarray,
        seed: int,
    ) -> dict[str, Any]:
        """Feature selection from pass 2b's statistics (`kubetrain.data.feature_selection`):
        sets ``prep.params["selected"]`` when a column goes; returns the metadata.
        ``hashes``/``labels``: every kept row's hash and label code (the sample's labels)."""
        out: dict[str, Any] = {"features_dropped": [], "feature_selection_notes": []}
        if self.image and self.cfg.max_features:
            out["feature_selection_notes"].append(
                "max_features ignored: an image's pixels keep their grid"
            )
        if encoded.selection is None:
            return out
        keys = encoded.selection.sample.keys
        chosen = select(
            prep.encoded_names(),
            prep.sources(),
            encoded.moments,
            encoded.selection,
            labels_of(keys, hashes, labels) if self.cfg.max_features else None,
            self.cfg,
            seed,
        )
        if chosen.changed:
            prep.params["selected"] = chosen.kept
        out.update(features_dropped=chosen.dropped, feature_selection_notes=chosen.notes)
        return out

    def drop_outliers(self, prep: Preprocessor) -> bool:
        return prep.params.get("bounds") is not None and self.cfg.outlier_action == "drop"

    def validation(
        self, profile: TableProfile, sample: pd.DataFrame, codes: np.ndarray
    ) -> dict[str, Any]:
        """The validation result (`kubetrain.data.validation`): ``profile`` over every raw
        row, leakage and skew on ``sample`` (the table's first rows) with their routing
        (``codes``: per raw row, -1 dropped, else the split), so it stays bounded."""
        if self.image:  # pixels: no column types worth checking, and too many columns
            return validate(self.types, self.schema, profile, sample.iloc[:0])
        split = codes[: len(sample)]
        if self.schema.regression:
            labels = self.label_codes(sample[LABEL])
        else:
            labels = sample[LABEL].map(self.index).fillna(-1).to_numpy(np.int64)
        ok = labels >= 0
        return validate(
            self.types,
            self.schema,
            profile,
            sample[ok].reset_index(drop=True),
            split[ok],
            labels[ok],
        )

    def rare_class_anomaly(self, stats: dict[str, Any]) -> dict[str, str]:
        names = stats["classes_dropped"]
        return {
            "column": LABEL,
            "kind": "rare_classes",
            "severity": "handled",
            "message": f"{stats['rows_dropped_rare_classes']} row(s) of {len(names)} class(es) "
            f"with fewer than {rows_needed(self.cfg)} rows dropped "
            f"({', '.join(map(repr, names[:5]))}); add rows of them to keep them",
        }

    def typed_anomalies(self) -> list[dict[str, str]]:
        """The anomalies known without statistics (renamed headers, merged labels, mixed
        types, constant and empty columns): what an engine without a profile reports."""
        return [a.to_json() for a in table_anomalies(self.types, self.schema, TableProfile({}))]

    def split_schema(self, prep: Preprocessor) -> Schema:
        """The splits' schema: the output (selected) columns' names, and which of them
        are not continuous (``categorical_columns``, positions in the output)."""
        n_num = self.n_num(prep)
        columns = prep.selected() or range(self.encoded_width(prep))
        return Schema(
            kind=self.schema.kind,
            feature_names=prep.feature_names(),
            class_names=self.schema.class_names,
            image_shape=self.schema.image_shape,
            extra={
                "preprocessing": prep.params,
                "categorical_columns": [i for i, j in enumerate(columns) if j >= n_num],
            },
            task=self.schema.task,
        )

    def finish(
        self,
        stats: dict[str, Any],
        counts: SplitCounts,
        counters: dict[str, int],
        prep: Preprocessor,
        started: float,
    ) -> dict[str, Any]:
        """The stage metadata `clean` returns, from what the passes counted."""
        if self.drop_outliers(prep):
            stats["outliers_dropped"] = counters["dropped"]
        elif self.cfg.outliers != "none":
            stats["outliers_clipped_rows"] = counters["clipped"]
        names = self.schema.class_names
        splits = {
            name: {"rows": counts.rows(s)}
            | (
                {"target": counts.targets[s].summary()}
                if self.schema.regression
                else {
                    "class_counts": class_counts(
                        np.repeat(np.arange(len(names)), counts.classes[s]), names
                    )
                }
            )
            for s, name in enumerate(("train", "validation", "test"))
        }
        stats.update(
            stage="clean",
            task=self.schema.task,
            splits=splits,
            features_out=self.width(prep),
            features_encoded=self.encoded_width(prep),
            features_selected=self.width(prep),
            scaling=self.cfg.scaling,
            impute=self.cfg.impute,
            outliers=self.cfg.outliers,
            column_types={c: t.kind for c, t in self.types.items()} if not self.image else {},
            column_notes=notes(self.types),
            seconds=round(time.perf_counter() - started, 3),
        )
        return stats


#: Quantile bins a regression's target is stratified by.
TARGET_BINS = 10


def target_bins(labels: pd.Series) -> tuple[float, ...]:
    """Inner quantile edges of the target on the table's first rows (`read_sample`: the
    same rows for every engine, so every engine routes alike)."""
    values = pd.to_numeric(labels).to_numpy(np.float64)
    edges = np.quantile(values, np.linspace(0, 1, TARGET_BINS + 1)[1:-1])
    return tuple(float(e) for e in np.unique(edges))


def sample_cut(train_hashes: np.ndarray, k: int = SAMPLE_SIZE) -> np.uint64:
    """The largest row hash among the ``k`` training rows with the smallest hashes (the
    hashes are unique after deduplication): the rows a median is sampled from."""
    if len(train_hashes) <= k:
        return NO_CUT
    return np.uint64(np.partition(train_hashes, k - 1)[k - 1])


class FillStats:
    """What `Preprocessor.fit` learns (fill values, categories, earliest dates), folded
    batch by batch (pass 2) and merged across workers: exact counts, means merged like
    `_ColumnMoments`, medians from a row sample, minima.

    The median of a column is that of its values in the ``SAMPLE_SIZE`` training rows
    with the smallest row hashes (every training row below that many: exact), chosen
    by `sample_cut` once routing is known, so a batch only picks its rows under the
    cut and merging is appending; if that leaves under `MIN_MEDIAN_SAMPLE` values (a
    column missing in most rows), the median is that of the column's
    `MIN_MEDIAN_SAMPLE` values with the smallest hashes. Both are uniform, hash-chosen
    and independent of batching and engine. (A bottom-k sample per column, trimmed at
    every merge, took a tenth of the whole clean on 1M rows.)

    Numbers, booleans and dates (as epoch seconds) get a numeric fill; hashed columns
    need none (a missing value hashes to zeros) and dropped columns are not read."""

    def __init__(self, cfg: CleanConfig, types: Typing, cut: np.uint64 = NO_CUT) -> None:
        self.strategy = cfg.impute if cfg.impute != "drop" else "median"
        self.types = types
        self.cut = np.uint64(cut)
        shape = fill_params(types)
        self.numeric = [*shape["numeric"], *shape["boolean"], *shape["datetime"]]
        self.categorical = list(shape["categorical"])
        self.present = dict.fromkeys(self.numeric, 0)
        self.means = dict.fromkeys(self.numeric, 0.0)
        self.sampled: dict[str, list[np.ndarray]] = {c: [] for c in self.numeric}
        self.samples = {c: QuantileSample(MIN_MEDIAN_SAMPLE) for c in self.numeric}
        self.modes: dict[str, dict[float, int]] = {c: {} for c in self.numeric}
        self.cats = {c: Frequencies(cap=MAX_CATEGORIES) for c in self.categorical}
        self.earliest = dict.fromkeys(shape["datetime"], np.inf)

    def add(self, frame: pd.DataFrame, h: np.ndarray) -> None:
        under = h <= self.cut
        for c in self.numeric:
            t = self.types[c]
            v = to_float(frame[c], t.kind, t.how)
            present = v[~np.isnan(v)]
            if self.strategy == "mean" and len(present):
                self._add_mean(c, len(present), float(present.mean()))
            elif self.strategy == "median":
                picked = v[under]
                self.sampled[c].append(picked[~np.isnan(picked)])
                self.samples[c] = self.samples[c].merge(QuantileSample.of(v, h, MIN_MEDIAN_SAMPLE))
            elif self.strategy == "most_frequent":
                values, counts = np.unique(present, return_counts=True)
                self._add_counts(
                    self.modes, c, dict(zip(values.tolist(), counts.tolist(), strict=True))
                )
            if self.strategy != "mean":
                self.present[c] += len(present)
            if c in self.earliest and len(present):
                self.earliest[c] = min(self.earliest[c], float(present.min()))
        for c in self.categorical:
            self._add_categories(c, Frequencies.of(frame[c], MAX_CATEGORIES))

    def merge(self, other: FillStats) -> FillStats:
        for c in self.numeric:
            if self.strategy == "mean":
                if other.present[c]:
                    self._add_mean(c, other.present[c], other.means[c])
            else:
                self.present[c] += other.present[c]
            self.sampled[c] += other.sampled[c]
            self.samples[c] = self.samples[c].merge(other.samples[c])
            self._add_counts(self.modes, c, other.modes[c])
        for c in self.categorical:
            self._add_categories(c, other.cats[c])
        for c, first in other.earliest.items():
            self.earliest[c] = min(self.earliest[c], first)
        return self

    def _add_mean(self, c: str, n: int, mean: float) -> None:
        total = self.present[c] + n
        self.means[c] += (mean - self.means[c]) * n / total
        self.present[c] = total

    def _add_categories(self, c: str, more: Frequencies) -> None:
        self.cats[c] = self.cats[c].merge(more)
        if self.cats[c].over_cap:
            raise too_many_categories(c, f"over {MAX_CATEGORIES}")

    def _add_counts(self, into: dict[str, dict], c: str, counts: dict) -> None:
        """Exact value counts of a numeric column for ``impute="most_frequent"``."""
        acc = into[c]
        for value, count in counts.items():
            acc[value] = acc.get(value, 0) + count
        if len(acc) <= MAX_MODE_VALUES:
            return
        raise KubetrainError(
            f"feature column {c!r} has over {MAX_MODE_VALUES} distinct values; "
            "impute most_frequent needs exact counts of each: use "
            "--impute median (or mean) for a table this large"
        )

    def params(self) -> dict[str, Any]:
        """The `Preprocessor.params` before bounds and scaling: the column layout, fill
        values, category lists and earliest dates."""
        out = fill_params(self.types)
        fill = out["fill"]
        for c in self.numeric:
            if self.present[c] == 0:
                raise no_values(c)
            if self.strategy == "mean":
                fill[c] = float(self.means[c])
            elif self.strategy == "median":
                sampled = np.concatenate([np.empty(0), *self.sampled[c]])
                if len(sampled) >= MIN_MEDIAN_SAMPLE:
                    fill[c] = float(np.median(sampled))
                else:  # few values under the cut (or in all): the smallest hashes' values
                    fill[c] = self.samples[c].quantile(0.5)
            else:
                fill[c] = float(min(self.modes[c].items(), key=lambda kv: (-kv[1], kv[0]))[0])
        for c, first in self.earliest.items():
            out["datetime"][c]["earliest"] = float(first)
        for c in self.categorical:
            if not self.cats[c].counts:
                raise no_values(c)
            out["categorical"][c] = sorted(self.cats[c].counts)
            fill[c] = self.cats[c].mode()
        return out


def _scale(
    cfg: CleanConfig,
    m: _ColumnMoments,
    image: bool,
    width: int,
    robust: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """`Preprocessor._scaler` from merged moments (and, for robust scaling, pass 2b's
    median and IQR of the continuous columns)."""
    kind = cfg.scaling
    if kind == "none" or width == 0 or m.count == 0:
        return {"kind": "none"}
    if image:  # one scalar for every pixel; robust scaling is standard here
        mean, std, lo, hi = m.overall()
        offset, scale = (lo, hi - lo) if kind == "minmax" else (mean, std)
    elif kind == "minmax":
        offset, scale = m.min, m.max - m.min
    else:
        offset, scale = m.mean.copy(), m.std.copy()
        if robust is not None:
            median, iqr = robust
            offset[: len(median)], scale[: len(iqr)] = median, iqr
    scale = np.where(np.asarray(scale) > 1e-12, scale, 1.0)
    return {
        "kind": kind,
        "offset": np.atleast_1d(offset).tolist(),
        "scale": np.atleast_1d(scale).tolist(),
    }


__all__ = [
    "Plan",
    "columns_of",
    "apply_batch",
    "batch_hashes",
    "batch_keys",
    "clean_streaming",
    "encode_train",
]
