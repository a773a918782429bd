"""Ingest for image folders and manifests: decode, check, and write the canonical table.

The output is the table every other source produces (`kubetrain.data.datasets`:
Parquet parts plus ``meta.json``, published atomically by `table_writer`), of
kind ``image``, with two columns: ``pixels`` (`datasets.PIXELS`: each image's
uint8 values in channel-first order, one fixed-size binary value, a byte per
value on disk) and the label. The schema still names every value (``pixel_i``,
as the NPZ image path's columns are named), which is what serving checks
arrays against. Clean keeps the pixels uint8 (`kubetrain.data.clean_images`).

Images that cannot be used (see `kubetrain.data.image_decode` for the
reasons) are reported and left out (``on_bad="skip"``), or the first of them
stops the run with one line (``on_bad="fail"``). Images of different sizes with
no size configured always stop the run: that is a setting to choose, not a
damaged file. Either way a failed ingest publishes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data.datasets import LABEL, PIXELS, Schema, pixel_column, table_writer
from kubetrain.data.image_decode import MIN_SIDE, Decoded, Target, decode_all, probe
from kubetrain.data.image_sources import ImageRef, list_images, read_image_bytes

ON_BAD = ("skip", "fail")
#: Images whose headers decide the data set's channels and (unless configured) size.
SAMPLE = 64
#: Most images and bytes of pixels per table batch.
BATCH_IMAGES = 1024
BATCH_BYTES = 32 * 1024 * 1024
#: Examples of skipped images kept in the schema (all are counted).
EXAMPLES = 10
PROGRESS_S = 5.0
#: Most values per image (512x512 RGB): beyond it an unresized folder of photos would
#: make a table of many GB and a network no GPU trains fast; --image-size brings it in.
MAX_VALUES = 3 * 512 * 512


@dataclass(frozen=True)
class ImageOptions:
    """How image sources are ingested (``data`` settings ``image_size`` and ``bad_images``)."""

    size: int = 0  # side of the square every image is resized to; 0 keeps the images' own
    on_bad: str = "skip"  # "skip": report and leave out; "fail": stop at the first
    workers: int = 0  # decoding threads; 0: one per core, at most 8

    def __post_init__(self) -> None:
        require(self.on_bad in ON_BAD, f"bad_images={self.on_bad!r}; use skip or fail")
        require(0 <= self.size <= 4096, f"image_size={self.size}; use 0 (keep) or 8..4096")
        require(
            self.size == 0 or self.size >= MIN_SIDE, f"image_size={self.size} is below {MIN_SIDE}"
        )


@dataclass
class _Skipped:
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, where: str, decoded: Decoded) -> None:
        self.counts[decoded.reason] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(
                {"path": where, "reason": decoded.reason, "detail": decoded.detail}
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict[str, Any]:
        return {"count": self.total, "by_reason": dict(self.counts), "examples": self.examples}


def ingest_images(
    source: str, label_column: str, out_path: str, options: ImageOptions | None = None
) -> dict[str, Any]:
    """Decode every image of `source` and write the image table at `out_path`; returns
    the ingest metadata (the keys `kubetrain.data.ingest.ingest` returns, plus
    ``skipped_images`` and ``images_per_second``)."""
    options = options or ImageOptions()
    started = time.perf_counter()
    refs = list_images(source, label_column)
    target = _target(refs, options, source)
    shape = [target.channels, *(target.keep or (target.size, target.size))]
    require(
        int(np.prod(shape)) <= MAX_VALUES,
        f"the images of {source} are {_shape_text(shape)}: {int(np.prod(shape)):,} values each, "
        f"more than the {MAX_VALUES:,} (512x512x3) kubetrain trains on; set --image-size N "
        "(224 is usual for photos) to resize them",
    )
    features = [f"pixel_{i}" for i in range(int(np.prod(shape)))]
    workers = options.workers or min(8, os.cpu_count() or 1)
    progress.log(
        "ingest", f"{len(refs):,} images, decoding to {_shape_text(shape)} in {workers} threads"
    )
    skipped, counts = _Skipped(), Counter[str]()
    digest = hashlib.sha256(json.dumps([*features, LABEL]).encode())
    base = Schema(kind="image", feature_names=features, class_names=[], image_shape=shape)
    decode_started = time.perf_counter()
    with table_writer(out_path, base) as writer:
        for X, labels in _batches(refs, target, workers, options, skipped, started):
            counts.update(labels)
            digest.update(X.tobytes())
            digest.update("\n".join(labels).encode())
            writer.write(_record_batch(X, labels))
        seconds = time.perf_counter() - decode_started
        rows = sum(counts.values())
        classes = _ordered(counts)
        if rows == 0:
            raise KubetrainError(
                f"every one of the {len(refs)} images of {source} was skipped "
                f"({_reasons(skipped)}); see the first: {skipped.examples[0]['path']}"
            )
        if len(classes) < 2:
            raise KubetrainError(
                f"{source} has images of one class only ({classes[0]!r}); a classifier "
                "needs at least two class subfolders (or labels)"
            )
        extra: dict[str, Any] = {"source": source}
        if skipped.total:
            extra["skipped_images"] = skipped.report()
            progress.log(
                "ingest",
                f"skipped {skipped.total} image(s): {_reasons(skipped)} (first: "
                f"{skipped.examples[0]['path']}: {skipped.examples[0]['detail']}); "
                "listed in the dataset metadata",
            )
        writer.schema = Schema(
            kind="image",
            feature_names=features,
            class_names=classes,
            image_shape=shape,
            extra=extra,
        )
    rate = (rows + skipped.total) / max(seconds, 1e-9)
    progress.log(
        "ingest",
        f"decoded {rows + skipped.total:,} images in {seconds:.1f}s ({rate:,.0f} images/s)",
    )
    return {
        "stage": "ingest",
        "source": source,
        "kind": "image",
        "task": "classification",
        "rows": rows,
        "features": len(features),
        "classes": classes,
        "class_counts": {c: int(counts[c]) for c in classes},
        "content_hash": digest.hexdigest(),
        "image_shape": shape,
        "missing_values": 0,
        "skipped_images": skipped.report(),
        "images_per_second": round(rate, 1),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _target(refs: list[ImageRef], options: ImageOptions, source: str) -> Target:
    """Channels (and, without a configured size, the size) the majority of the first
    `SAMPLE` readable images have; the rest of the set is held to them."""
    shapes = [s for s in (probe(_read(r)) for r in refs[:SAMPLE]) if s is not None]
    if not shapes:
        if options.on_bad == "fail":
            raise KubetrainError(
                f"{refs[0].location} is not an image Pillow can read; fix or remove it, "
                "or set --bad-images skip"
            )
        raise KubetrainError(
            f"none of the first {min(len(refs), SAMPLE)} files of {source} is an image "
            f"Pillow can read (first: {refs[0].location}); check the source"
        )
    channels = Counter(c for c, _, _ in shapes).most_common(1)[0][0]
    if options.size:
        return Target(channels, options.size)
    usable = [(h, w) for c, h, w in shapes if c == channels and min(h, w) >= MIN_SIDE]
    sizes = Counter(usable or [(h, w) for c, h, w in shapes if c == channels])
    if len(sizes) > 1:
        (a, _), (b, _) = sizes.most_common(2)
        raise KubetrainError(
            f"the images of {source} differ in size ({a[1]}x{a[0]}, {b[1]}x{b[0]}, ...); "
            "set --image-size N to resize them all to N x N"
        )
    return Target(channels, 0, next(iter(sizes)))


def _read(ref: ImageRef) -> bytes:
    try:
        return read_image_bytes(ref.location)
    except OSError:
        return b""


def _batches(
    refs: list[ImageRef],
    target: Target,
    workers: int,
    options: ImageOptions,
    skipped: _Skipped,
    started: float,
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Decoded images in `BATCH_IMAGES` batches, ``(uint8 (n, features), labels)``."""
    items = [(ref.location, functools.partial(read_image_bytes, ref.location)) for ref in refs]
    height, width = target.keep or (target.size, target.size)
    per_batch = max(1, min(BATCH_IMAGES, BATCH_BYTES // (target.channels * height * width)))
    pixels: list[np.ndarray] = []
    names: list[str] = []
    last = time.monotonic()
    decoded_in_order = zip(refs, decode_all(items, target, workers), strict=True)
    for done, (ref, (where, decoded)) in enumerate(decoded_in_order, 1):
        if decoded.pixels is None:
            _refuse_or_skip(where, decoded, options, skipped)
        else:
            pixels.append(decoded.pixels.reshape(-1))
            names.append(ref.label)
        if len(pixels) == per_batch:
            yield np.stack(pixels), names
            pixels, names = [], []
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            progress.log(
                "ingest",
                f"{done:,}/{len(refs):,} images ({done / len(refs):.0%}, ETA "
                f"{progress.eta(started, done, len(refs))})",
            )
    if pixels:
        yield np.stack(pixels), names


def _refuse_or_skip(where: str, decoded: Decoded, options: ImageOptions, skipped: _Skipped) -> None:
    if decoded.reason == "size":
        raise KubetrainError(
            f"{where} is {decoded.detail}: the images differ in size; set --image-size N "
            "to resize them all to N x N"
        )
    if options.on_bad == "fail":
        raise KubetrainError(
            f"{where}: {decoded.reason} image ({decoded.detail}); fix or remove it, or set "
            "--bad-images skip to leave such images out"
        )
    skipped.add(where, decoded)


def _record_batch(X: np.ndarray, labels: list[str]) -> pa.RecordBatch:
    labels_array = pa.array(labels, pa.string())
    return pa.RecordBatch.from_arrays([pixel_column(X), labels_array], [PIXELS, LABEL])


def _ordered(counts: Counter[str]) -> list[str]:
    """Class names sorted; numerically when every one is a number (so 2 < 10)."""
    names = sorted(counts)
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def _reasons(skipped: _Skipped) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.counts.most_common())


def _shape_text(shape: list[int]) -> str:
    return f"{shape[1]}x{shape[2]}x{shape[0]}"
