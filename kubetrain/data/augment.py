"""Augment: more (and more varied) training rows; validation and test stay untouched.

Tables get minority-class oversampling and Gaussian jitter on continuous columns
only (one-hot columns stay 0/1). Images are not copied: the training loop
augments each batch afresh on its device (`kubetrain.training.batch_augment`),
so every epoch sees new variants and the split stays its own size. For them this
stage writes the split unchanged with the augmentation policy recorded in its
schema (``schema.extra["augment_policy"]``), which every trainer reads.

A training split over the memory budget is augmented shard by shard
(`kubetrain.data.batches`): every batch is written followed by its augmented
rows, and each class's extra rows are shared out over the batches so the class
counts are those of the in-memory path. The in-memory path is the same code
with the split as one batch; either way the output is written piece by piece.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from kubetrain.config.settings import AugmentConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.data import batches, shards
from kubetrain.data.batches import Batches, spread
from kubetrain.data.datasets import Schema

#: Most rows of jittered output made at once (a rare class's rows may be drawn millions
#: of times; its copies are written in pieces of this size).
CHUNK_ROWS = 65_536
#: Bytes the in-memory path holds per byte of the split (see `held_bytes`; tables:
#: measured 1.45 on 3M rows x 35 features, oversampled, one copy; images are passed
#: through).
HELD_PER_BYTE = {"image": 1.0, "table": 1.5}
#: Where the policy goes in the written split's schema (read by
#: `kubetrain.training.batch_augment.recorded`).
POLICY_KEY = "augment_policy"


def jitter(X: np.ndarray, schema: Schema, std: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, std, X.shape).astype(np.float32)
    noise[:, schema.extra.get("categorical_columns", [])] = 0.0
    return X + noise


#: A class grows at most to this many times its rows: repeating a class of ten rows a
#: thousand times teaches the network those ten rows, and multiplies the epoch's work
#: (19 classes of a 20,000-row table became 181,000 rows without it).
MAX_OVERSAMPLE = 4


def extra_rows(counts: np.ndarray, oversample: bool) -> np.ndarray:
    """Rows to add per class: up to the majority count, at most `MAX_OVERSAMPLE` times
    the class's own rows."""
    counts = np.asarray(counts, np.int64)
    if not oversample or not counts.size:
        return np.zeros_like(counts)
    return np.where(counts > 0, np.minimum(counts.max(), MAX_OVERSAMPLE * counts) - counts, 0)


def counts_after(counts: np.ndarray, schema: Schema, cfg: AugmentConfig) -> np.ndarray:
    """Rows per class the augmentation writes (what both paths produce)."""
    counts = np.asarray(counts, np.int64)
    if schema.kind == "image":
        return counts  # augmented per batch in training, never copied
    cfg = cfg.replace({"augment_copies": copies_for(cfg, int(counts.sum()), quiet=True)})
    counts = counts + extra_rows(counts, cfg.oversample)
    return counts * (1 + cfg.augment_copies)


def augment_batch(
    X: np.ndarray,
    y: np.ndarray,
    extra: np.ndarray,
    schema: Schema,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A table batch's rows, then ``extra[k]`` rows of each class k drawn from the batch
    with replacement and jittered, then `augment_copies` jittered copies of that balanced
    batch (originals plus unjittered draws): piece by piece, at most ``chunk_rows`` rows
    of output at once, as a rare class's few rows may be drawn millions of times.

    Noise is drawn row after row, so the pieces are the rows (and draws) of jittering
    the whole balanced batch at once."""
    yield X.astype(np.float32, copy=False), y
    draws = [rng.choice(np.flatnonzero(y == k), n) for k, n in enumerate(extra) if n > 0]
    added = np.concatenate(draws) if draws else np.zeros(0, np.intp)
    yield from _jittered(X, y, added, schema, cfg.noise_std, rng, chunk_rows)
    balanced = np.concatenate([np.arange(len(y)), added])
    for _ in range(cfg.augment_copies):
        yield from _jittered(X, y, balanced, schema, cfg.noise_std, rng, chunk_rows)


def _jittered(
    X: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    schema: Schema,
    std: float,
    rng: np.random.Generator,
    chunk_rows: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``X[rows]`` jittered, ``chunk_rows`` rows at a time."""
    for start in range(0, len(rows), chunk_rows):
        take = rows[start : start + chunk_rows]
        yield jitter(X[take], schema, std, rng).astype(np.float32, copy=False), y[take]


def augment_batches(
    source: Iterable[tuple[np.ndarray, np.ndarray]],
    counts: np.ndarray,
    schema: Schema,
    cfg: AugmentConfig,
    seed: int,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The augmented split, piece by piece, from its batches and its class ``counts``;
    deterministic given the seed and the batches.

    Images pass through unchanged (training augments them per batch). For tables every
    batch is followed by its augmented rows: each class's extra rows (up to the
    majority count) are shared out over the batches in proportion to their
    rows of the class (`spread`), so the class counts written are the same
    however the split is batched; with ONE batch this is exactly the in-memory
    augmentation, with many the random draws differ (same counts, other rows
    and noise).
    """
    if schema.kind == "image":
        for X, y in source:
            yield X.astype(np.float32, copy=False), y
        return
    cfg = cfg.replace({"augment_copies": copies_for(cfg, int(np.sum(counts)))})
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts, np.int64)
    # a regression has no classes to balance: its rows are one group, never oversampled
    extra = extra_rows(counts, cfg.oversample and not schema.regression)
    before = np.zeros_like(counts)
    for X, y in source:
        here = np.bincount(
            np.zeros(len(y), np.int64) if schema.regression else y, minlength=len(counts)
        )
        if len(here) > len(counts):
            raise KubetrainError(
                f"labels go up to {len(here) - 1} but the split counts {len(counts)} classes; "
                "pass the training split written by the clean stage"
            )
        share = spread(extra, counts, before, here)
        before += here
        yield from augment_batch(X, y, share, schema, cfg, rng, chunk_rows)


def augment_arrays(
    X: np.ndarray, y: np.ndarray, schema: Schema, cfg: AugmentConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Original rows first, then the augmented ones; deterministic given the seed."""
    y = np.asarray(y)
    if schema.regression:
        counts = np.array([len(y)], np.int64)
    else:
        counts = np.bincount(y) if len(y) else np.zeros(0, np.int64)
    pieces = list(augment_batches([(X, y)], counts, schema, cfg, seed))
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def held_bytes(split: Batches) -> float:
    """What the in-memory path holds: the split, plus for tables the indices of the
    balanced rows and one chunk of jittered rows."""
    kind = split.schema.kind if split.schema else "table"
    return split.nbytes * HELD_PER_BYTE.get(kind, HELD_PER_BYTE["table"])


#: Largest training split `augment_copies=-1` (auto) adds a jittered copy to: past it
#: the data regularise themselves, and a copy only doubles every epoch's work.
AUTO_COPIES_MAX_ROWS = 200_000


def copies_for(cfg: AugmentConfig, rows: int, quiet: bool = False) -> int:
    """The augmented copies to add: as set, or for -1 (auto) one copy up to
    `AUTO_COPIES_MAX_ROWS` training rows and none beyond."""
    if cfg.augment_copies >= 0:
        return cfg.augment_copies
    copies = 1 if rows <= AUTO_COPIES_MAX_ROWS else 0
    if not copies and not quiet:
        progress.log(
            "augment",
            f"no augmented copies: {rows:,} training rows is over {AUTO_COPIES_MAX_ROWS:,} "
            "(augment_copies=-1, auto; set it to add copies anyway)",
        )
    return copies


def augment(
    train_path: str,
    out_path: str,
    cfg: AugmentConfig,
    seed: int,
    budget: int | None = None,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The augment stage; returns metadata (rows and class counts before and after).

    In memory when the split (and what augmenting it takes, `held_bytes`) fits the
    memory budget, else streamed shard by shard; either way the output is written
    piece by piece, never held whole (see `augment_batches`). Images are written as
    they are, with ``policy`` (the per-batch augmentation training applies; None: none)
    in the schema."""
    started = time.perf_counter()
    if shards.is_sharded(train_path) and (stored := shards.read_schema(train_path)).kind == "image":
        return _images(train_path, out_path, stored, policy, started)
    split = batches.open_split(train_path, held_bytes, budget)
    schema = split.schema
    assert schema is not None
    image = schema.kind == "image"  # an old ``arrays.npz`` split of images
    if image:
        schema = _with_policy(schema, policy)
    if split.streamed:
        progress.log(
            "augment",
            f"streaming: the training split ({split.rows:,} rows, {split.nbytes:,} bytes) is "
            "over the memory budget; extra rows are drawn shard by shard",
        )
    cfg = cfg.replace({"augment_copies": 0 if image else copies_for(cfg, split.rows)})
    pieces = augment_batches(
        batches.logged(split, "augment", "augmented"), split.class_counts, schema, cfg, seed
    )
    with shards.writer(out_path, schema) as w:
        w.stats.update(split.stats)  # fitted statistics stay with the training data
        for X, y in pieces:
            w.write(X, y)
    return {
        "stage": "augment",
        "kind": schema.kind,
        "rows_before": split.rows,
        "rows_after": int(w.manifest["rows"]),
        "copies": cfg.augment_copies,
        **({"policy": policy or {}} if image else {}),
        "class_counts_before": _named(split.class_counts, schema.class_names),
        "class_counts_after": _named(w.manifest["class_counts"], schema.class_names),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _images(
    train_path: str,
    out_path: str,
    schema: Schema,
    policy: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    """An image split copied as it is stored (uint8 pixels stay uint8), with the policy:
    its rows and class counts are the same before and after."""
    schema = _with_policy(schema, policy)
    copied = shards.copy(train_path, out_path, schema)
    counts = _named(copied["class_counts"], schema.class_names)
    return {
        "stage": "augment",
        "kind": "image",
        "rows_before": int(copied["rows"]),
        "rows_after": int(copied["rows"]),
        "copies": 0,
        "policy": policy or {},
        "class_counts_before": counts,
        "class_counts_after": counts,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _with_policy(schema: Schema, policy: dict[str, Any] | None) -> Schema:
    """The policy replaces any earlier one; None records that there is none."""
    extra = {k: v for k, v in schema.extra.items() if k != POLICY_KEY}
    return dataclasses.replace(schema, extra={**extra, **({POLICY_KEY: policy} if policy else {})})


def _named(counts: Iterable[int], class_names: list[str]) -> dict[str, int]:
    return {name: int(c) for name, c in zip(class_names, counts, strict=False)}


def sample_images(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` rows of a split (one shard read, whatever its size): the images the
    stage's report shows augmented."""
    X, y, _ = batches.head(path, n)
    return X, y
