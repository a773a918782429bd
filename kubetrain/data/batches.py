"""A split read batch by batch: held in memory when it fits the budget, else streamed.

The stages after clean (augment, evaluate, compress, tuning's sample) apply one
function to every batch of a split. A split that fits the memory budget is
loaded whole and dealt as ONE batch, so the in-memory path *is* the streamed
path with one batch: the same code, and the results it always gave. A split
over the budget is dealt from its shards (`kubetrain.data.shards.iter_batches`),
so memory stays bounded by one shard plus one batch, whatever the split's size.

A stage chooses with `open_split(path, held=...)`, where ``held`` says how many
bytes the stage would hold for that split in memory (the split itself, plus
copies or scores it makes). Counts a stage needs before its pass (rows, class
counts) come from the shards' manifest, so a streamed split is read once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.core.memory import fits
from kubetrain.core.storage import redact
from kubetrain.data import shards
from kubetrain.data.datasets import Schema, load_split

#: Values in one streamed batch (float32 bytes): big enough that per-batch overhead (a
#: model call, a Parquet write) is negligible, small because reading costs several
#: times a batch (the shard's bytes, Arrow's decoded pages, the batch): measured on 35
#: features, a read pass peaks 206 MiB over the imports at 8 MiB, 406 MiB at 32 MiB.
BATCH_BYTES = 8 * shards.MiB


@dataclass(frozen=True)
class Batches:
    """A split to read batch by batch; iterate it for ``(X float32, y int64)`` batches.

    ``arrays`` holds the split when it is in memory (then it is dealt as one
    batch); otherwise batches of ``batch_rows`` rows stream from ``uri``.
    """

    schema: Schema | None  # None only for bare arrays (`of`) that came without one
    rows: int
    features: int
    class_counts: np.ndarray  # rows per class index
    stats: dict[str, Any] = field(default_factory=dict)  # the manifest's fitted statistics
    arrays: tuple[np.ndarray, np.ndarray] | None = None
    uri: str = ""
    batch_rows: int = shards.DEFAULT_BATCH_ROWS
    shard_rows: int = 0  # mean rows per shard: how often a long pass reports progress

    @property
    def streamed(self) -> bool:
        return self.arrays is None

    @property
    def nbytes(self) -> int:
        """Bytes of the features held whole (float32)."""
        return self.rows * self.features * 4

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.arrays is not None:
            yield self.arrays
        else:
            yield from shards.iter_batches(self.uri, self.batch_rows)


def of(X: np.ndarray, y: np.ndarray, schema: Schema | None = None, **kw: Any) -> Batches:
    """Arrays already in memory, as one batch."""
    classes = schema.num_classes if schema else 0
    if schema is not None and schema.regression:
        counts = np.array([len(y)], np.int64)  # one group: numbers have no classes
    elif len(y):
        counts = np.bincount(np.asarray(y, np.int64), minlength=classes)
    else:
        counts = np.zeros(classes, np.int64)
    return Batches(schema, len(X), int(np.prod(X.shape[1:])), counts, arrays=(X, y), **kw)


def head(path: str | os.PathLike, rows: int) -> tuple[np.ndarray, np.ndarray, Schema]:
    """The first ``rows`` rows of the split at ``path`` and its schema, reading only the
    shards they are in (a split of the old ``arrays.npz`` format cannot be read in part:
    it is loaded whole)."""
    if not shards.is_sharded(path):
        X, y, schema = load_split(path)
        return X[:rows], y[:rows], schema
    split = dataclasses.replace(streamed(path), batch_rows=max(1, rows))
    X, y = next(iter(split), (np.empty((0, split.features), np.float32), np.empty(0)))
    assert split.schema is not None
    return X[:rows], y[:rows], split.schema


def streamed(uri: str | os.PathLike, batch_bytes: int | None = None) -> Batches:
    """A sharded split that streams in batches of ``batch_bytes`` (`BATCH_BYTES`) of
    values; reads only its manifest."""
    batch_bytes = BATCH_BYTES if batch_bytes is None else batch_bytes
    manifest = shards.read_manifest(uri)
    schema = Schema.from_json(manifest["schema"])
    rows, features = int(manifest["rows"]), int(manifest["features"])
    counts = np.asarray(manifest.get("class_counts", []), np.int64)
    if schema.regression:
        counts = np.array([rows], np.int64)  # one group: numbers have no classes
    if int(counts.sum()) != rows:
        raise KubetrainError(
            f"{redact(os.fspath(uri))}/{shards.MANIFEST} counts {int(counts.sum())} labelled rows "
            f"of {rows}; {shards.FIX}"
        )
    counts = np.pad(counts, (0, max(0, schema.num_classes - len(counts))))
    return Batches(
        schema,
        rows,
        features,
        counts,
        stats=dict(manifest.get("stats") or {}),
        uri=str(uri),
        batch_rows=max(1, batch_bytes // max(1, features * 4)),
        shard_rows=max(1, rows // max(1, len(manifest["shards"]))),
    )


def open_split(
    path: str | os.PathLike,
    held: Callable[[Batches], float] = lambda split: split.nbytes,
    budget: int | None = None,
) -> Batches:
    """The split at ``path``: in memory (one batch) when the ``held(split)`` bytes the
    caller would hold fit the memory budget, else streamed from its shards. Splits of
    the old ``arrays.npz`` format cannot stream and are always loaded."""
    if shards.is_sharded(path):
        split = streamed(path)
        if not fits(int(held(split)), budget):
            return split
        X, y, schema = load_split(path)
        return of(X, y, schema, stats=split.stats)
    X, y, schema = load_split(path)  # npz, or the error naming what is wrong with `path`
    return of(X, y, schema)


def logged(split: Batches, stage: str, verb: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The split's batches; a streamed pass logs a progress line about once a shard, as
    it can take minutes (a batch in memory is over at once and logs nothing)."""
    if not split.streamed:
        yield from split
        return
    started, done, next_log = time.perf_counter(), 0, split.shard_rows
    for X, y in split:
        yield X, y
        done += len(y)
        if done >= next_log or done == split.rows:
            progress.log(
                stage,
                f"{verb} {done:,}/{split.rows:,} rows | ETA "
                f"{progress.eta(started, done, split.rows)}",
            )
            next_log = (done // split.shard_rows + 1) * split.shard_rows


def spread(
    totals: np.ndarray, counts: np.ndarray, before: np.ndarray, here: np.ndarray
) -> np.ndarray:
    """One batch's share of per-class ``totals``, in proportion to its rows of each class.

    ``counts`` are the split's rows per class, ``before`` those already dealt,
    ``here`` this batch's. The share is ``floor(total * seen / count)`` after
    the batch minus before it, so the shares of all batches add up to exactly
    ``totals`` (at the end ``seen == count``), a batch with no row of a class
    gets none of it, and with ``totals <= counts`` no share exceeds ``here``.
    """
    counts = np.maximum(np.asarray(counts, np.int64), 1)  # absent classes: totals are 0
    totals = np.asarray(totals, np.int64)
    return totals * (before + here) // counts - totals * before // counts


def stratified_sample(
    split: Batches, rows: int, seed: int, stage: str = "sample"
) -> tuple[np.ndarray, np.ndarray]:
    """About ``rows`` rows of ``split`` (at least one per present class), each class in
    its share of the split, in stored order; one pass, deterministic for a split and seed.

    Each batch gives each class its `spread` share of the class's quota, drawn
    without replacement from the batch's rows of that class, so rows are taken
    evenly along the split (not just from its first shards).
    """
    counts = split.class_counts
    quota = np.minimum(counts, np.maximum(counts * rows // max(1, split.rows), counts > 0))
    X_out = np.empty((int(quota.sum()), split.features), np.float32)
    regression = split.schema is not None and split.schema.regression
    y_out = np.empty(int(quota.sum()), np.float32 if regression else np.int64)
    rng = np.random.default_rng(seed)
    before, at = np.zeros_like(counts), 0
    for X, y in logged(split, stage, "sampled"):
        group = np.zeros(len(y), np.int64) if regression else y  # a regression: one group
        here = np.bincount(group, minlength=len(counts))
        share = spread(quota, counts, before, here)
        before += here
        picks = [
            rng.choice(np.flatnonzero(group == k), n, replace=False)
            for k, n in enumerate(share)
            if n
        ]
        if picks:
            idx = np.sort(np.concatenate(picks))
            X_out[at : at + len(idx)], y_out[at : at + len(idx)] = X[idx], y[idx]
            at += len(idx)
    return X_out[:at], y_out[:at]
