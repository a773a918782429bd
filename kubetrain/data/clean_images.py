"""Clean an image table: drop exact duplicates, split, fit the pixel scaler; pixels stay uint8.

An image table (`kubetrain.data.image_ingest`) holds each image as one value of
its `PIXELS` column. The table path of clean (`kubetrain.data.clean_stream`:
column types, per-column fills and bounds, feature selection) has nothing to do
for pixels but would cost a pandas column per value, so images take this path,
built from the same pieces: duplicates are rows with equal pixels and label
(first kept), `Plan.route` splits by row hash (stratified, the same for any
batching), the validation result and the stage metadata are `Plan`'s, and the
scaler is clean's one scalar for every pixel (``standard``: mean and deviation of
the training pixels; ``minmax``; ``robust`` is ``standard`` for images, as in the
table path; ``none``).

The splits keep the pixels as ingest decoded them: uint8 shards
(`kubetrain.data.shards`, a byte per value) whose ``decode`` is the scaler, so
they are a quarter of float32's size on disk and over the network, and every
reader still gets the float32 features the table path would write. Two passes
over the table: keys and routing, then the splits with the training pixels'
sums; the table's batches are held between them when they fit the memory budget.
An image has no missing pixels: fill values (kept for serving's preprocessor)
are each pixel's training mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from kubetrain.config.settings import CleanConfig
from kubetrain.core import progress
from kubetrain.core.errors import require
from kubetrain.core.memory import fits
from kubetrain.data import shards
from kubetrain.data.clean import Preprocessor, fill_params
from kubetrain.data.clean_stream import (
    DROPPED,
    EncodedStats,
    Plan,
    SplitCounts,
    class_codes_of,
    class_index,
    first_unseen,
)
from kubetrain.data.column_types import infer_types
from kubetrain.data.datasets import (
    LABEL,
    PIXELS,
    pixel_rows,
    table_files,
    table_frame,
    table_record_batches,
    table_rows,
    table_schema,
)
from kubetrain.data.validation import TableProfile

#: Most images and bytes of pixels per record batch read from the table.
BATCH_IMAGES = 4096
BATCH_BYTES = 64 * 1024 * 1024
PROGRESS_S = 5.0


def clean_images(
    table_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    cfg: CleanConfig,
    seed: int,
) -> dict[str, Any]:
    """The clean stage for an image table; returns the metadata `clean` returns."""
    started = time.perf_counter()
    schema = table_schema(table_path)
    features = schema.feature_names
    require(not schema.regression, "an image table is for classification; re-run ingest")
    types = infer_types(
        pd.DataFrame(),
        pa.schema([]),
        features,
        image=True,
        overrides=cfg.type_overrides,
        drop=cfg.dropped_columns,
    )
    index = class_index(schema)
    plan = Plan(cfg, schema, features, [], index, types)
    batch_rows = max(1, min(BATCH_IMAGES, BATCH_BYTES // max(1, len(features))))
    on_disk = sum(f.stat().st_size for f in table_files(table_path))
    held: list[pa.RecordBatch] | None = [] if fits(2 * on_disk) else None

    # --- pass 1: keys, duplicates, routing ---------------------------------------------
    stats: dict[str, Any] = {"rows_in": 0, "duplicates_removed": 0, "missing_values": 0}
    profile = TableProfile.of_types({})  # an image's pixels: only the label is profiled
    seen = np.empty(0, np.uint64)
    hashes, labels, unique = [], [], []
    sample, total, last = None, table_rows(table_path), time.monotonic()
    for batch in table_record_batches(table_path, batch_rows):
        if held is not None:
            held.append(batch)
        frame = table_frame(batch.select([LABEL]), schema)
        sample = frame if sample is None else sample
        profile.merge(profile.empty().add(frame))
        h = _row_hashes(pixel_rows(batch.column(PIXELS)), frame[LABEL].to_numpy(str))
        first, seen = first_unseen(h, seen)
        hashes.append(h[first])
        labels.append(class_codes_of(frame[LABEL], index)[first])
        unique.append(first)
        stats["rows_in"] += batch.num_rows
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            done = stats["rows_in"]
            progress.log(
                "clean",
                f"{done:,}/{total:,} images keyed (ETA {progress.eta(started, done, total)})",
            )
    assert sample is not None, "a table always has a part"
    all_hashes, y_all = np.concatenate(hashes), np.concatenate(labels)
    was_unique = np.concatenate(unique)
    del hashes, labels, unique, seen
    require(bool((y_all >= 0).all()), "labels outside the schema's classes; re-run ingest")
    stats["duplicates_removed"] = stats["rows_in"] - len(all_hashes)
    missing = np.zeros(len(all_hashes), np.int32)
    keep, routed = plan.route(all_hashes, y_all, missing, stats, seed)
    codes = np.full(len(was_unique), DROPPED, np.int8)  # per raw row: -1, 0, 1, 2
    codes[np.flatnonzero(was_unique)[keep]] = routed
    y_codes = np.full(len(was_unique), -1, np.int64)
    y_codes[np.flatnonzero(was_unique)] = y_all
    stats["validation"] = plan.validation(profile, sample, codes)
    stats["anomalies"] = stats["validation"]["anomalies"]
    if stats.get("classes_dropped"):
        stats["anomalies"].append(plan.rare_class_anomaly(stats))

    # --- pass 2: the splits, uint8, and the training pixels' sums -------------------------
    train = _PixelSums(len(features))
    counts = SplitCounts.of(schema)
    batches = held if held is not None else table_record_batches(table_path, batch_rows)
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(shards.writer(p, schema, dtype=np.uint8))
            for p in (train_path, val_path, test_path)
        ]
        for c, y, pixels in _routed(batches, codes, y_codes):
            for s, w in enumerate(writers):
                rows = c == s
                if rows.any():
                    w.write(pixels[rows], y[rows])
                    counts.add(s, y[rows])
            train.add(pixels[c == 0])
        prep = Preprocessor(cfg, schema)
        prep.params = fill_params(types) | {"bounds": None, "scale": train.scaler(cfg)}
        # no pixel is ever missing in an image table; a frame given to `transform` with
        # NaN gets the training pixels' mean (one value: per pixel it was 3.5 MB at 224)
        prep.params["fill"] = dict.fromkeys(features, train.mean())
        nothing = EncodedStats(0, 0, want_iqr=False)  # no selection: pixels keep their grid
        stats.update(plan.select(prep, nothing, all_hashes, y_all, seed))
        split_schema = plan.split_schema(prep)
        scale = prep.params["scale"]
        decode = (
            {"offset": scale["offset"][0], "scale": scale["scale"][0]}
            if scale["kind"] != "none"
            else {"offset": 0.0, "scale": 1.0}
        )
        for w in writers:  # the manifests, written last, carry them
            w.schema, w.decode = split_schema, decode
        writers[0].stats["preprocessing"] = prep.params
    return plan.finish(stats, counts, {"dropped": 0, "clipped": 0}, prep, started)


def _row_hashes(pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each image's pixels and label: equal images with equal labels
    are duplicates; the same image under two labels is two rows, as in the table path."""
    out = np.empty(len(pixels), np.uint64)
    for i, (row, label) in enumerate(zip(pixels, labels, strict=True)):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, person=b"kubetrain-img")
        digest.update(label.encode())
        out[i] = int.from_bytes(digest.digest(), "little")
    return out


def _routed(
    batches: Any, codes: np.ndarray, y_codes: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per table batch: (split code, class code, uint8 pixels) of its kept rows."""
    start = 0
    for batch in batches:
        c = codes[start : start + batch.num_rows]
        y = y_codes[start : start + batch.num_rows]
        start += batch.num_rows
        kept = c != DROPPED
        yield c[kept], y[kept], pixel_rows(batch.column(PIXELS))[kept]


class _PixelSums:
    """Sums of the training pixels (exact, in integers) and of their squares, minimum
    and maximum. A class: the sums grow batch by batch."""

    def __init__(self, values: int) -> None:
        self.values = values
        self.rows = self.total = self.squares = 0
        self.low, self.high = 255, 0

    def add(self, pixels: np.ndarray) -> None:
        if not len(pixels):
            return
        self.rows += len(pixels)
        self.total += int(pixels.sum(dtype=np.int64))
        # squares of uint8 fit in uint16; summed per row in int64 they cannot overflow
        self.squares += int((pixels.astype(np.uint16) ** 2).sum(dtype=np.int64))
        self.low, self.high = min(self.low, int(pixels.min())), max(self.high, int(pixels.max()))

    def mean(self) -> float:
        return self.total / max(self.rows * self.values, 1)

    def scaler(self, cfg: CleanConfig) -> dict[str, Any]:
        """`Preprocessor._scaler` for an image (one scalar for every pixel)."""
        n = self.rows * self.values
        if cfg.scaling == "none" or n == 0:
            return {"kind": "none"}
        if cfg.scaling == "minmax":
            offset, scale = float(self.low), float(self.high - self.low)
        else:  # standard, and robust (standard for images, as in the table path)
            offset = self.total / n
            scale = max(self.squares / n - offset**2, 0.0) ** 0.5
        return {"kind": cfg.scaling, "offset": [offset], "scale": [scale if scale > 1e-12 else 1.0]}
