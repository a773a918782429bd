"""Image bytes to uint8 pixels of one shape, decoded in parallel threads with Pillow.

Pillow releases the GIL while it decodes and resamples, so a thread pool
scales over cores without pickling pixels between processes (and torchvision is
not needed: its wheel pulls a multi-GB CUDA build of torch).

Every image ends as ``(channels, size, size)`` uint8, channel-first like the
NPZ image path. Colour modes fold into 1 channel (greyscale, with or without
alpha, 16-bit) or 3 (RGB, RGBA with alpha dropped, palette, CMYK, ...). An
image that cannot be used gets a *reason* instead of pixels:

* ``corrupt``: Pillow cannot decode it (truncated, not an image, wrong suffix);
* ``unreadable``: the file could not be read (permissions, vanished);
* ``channels``: greyscale in a colour set, or the reverse;
* ``tiny``: a side below `min_side` (nothing of it survives resizing);
* ``size``: no size was configured and it differs from the others.

Resizing keeps the aspect ratio: the shorter side is scaled to the target and
the longer one centre-cropped, as image classifiers are usually fed. JPEGs are
decoded at a reduced scale first when much larger than the target (``draft``),
which makes decoding big photos several times faster.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Modes that become one channel; every other mode becomes RGB.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: Smallest side (pixels) an image may have before resizing, whatever the target size.
MIN_SIDE = 8
#: Images decoded per task handed to the pool (amortizes the scheduling).
CHUNK = 32
REASONS = ("corrupt", "unreadable", "channels", "tiny", "size")


@dataclass(frozen=True)
class Target:
    """The shape every image is brought to: channels (1 or 3) and side (0: keep as is)."""

    channels: int
    size: int  # 0: no resizing; every image must then have `keep` as its (h, w)
    keep: tuple[int, int] | None = None  # (height, width) when size == 0


@dataclass(frozen=True)
class Decoded:
    """One image's pixels ``(c, h, w)`` uint8, or why it was left out."""

    pixels: np.ndarray | None
    reason: str = ""
    detail: str = ""


def channels_of(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


def probe(data: bytes) -> tuple[int, int, int] | None:
    """(channels, height, width) from the header only (no pixel decoding); None if
    Pillow does not recognize the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return channels_of(img.mode), img.height, img.width
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def decode(data: bytes, target: Target, min_side: int = MIN_SIDE) -> Decoded:
    """`data` as pixels of `target`'s shape, or the reason it cannot be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            channels = channels_of(img.mode)
            if channels != target.channels:
                kind = "greyscale" if channels == 1 else "colour"
                return Decoded(
                    None, "channels", f"{kind} ({img.mode}) in a {target.channels}-channel set"
                )
            if min(img.size) < min_side:
                return Decoded(
                    None, "tiny", f"{img.width}x{img.height} (sides under {min_side} px)"
                )
            if target.size == 0 and (img.height, img.width) != target.keep:
                assert target.keep is not None
                return Decoded(
                    None,
                    "size",
                    f"{img.width}x{img.height}, the others {target.keep[1]}x{target.keep[0]}",
                )
            if target.size and img.format == "JPEG":
                img.draft(img.mode, (target.size, target.size))  # decode at 1/2, 1/4, 1/8 scale
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:  # fmt: skip
        if isinstance(exc, UnidentifiedImageError):  # its text names an in-memory buffer
            return Decoded(None, "corrupt", "not an image format Pillow reads")
        return Decoded(None, "corrupt", _first_line(exc))
    return Decoded(_pixels(img, target))


def decode_all(
    items: Iterable[tuple[str, Callable[[], bytes]]],
    target: Target,
    workers: int,
    min_side: int = MIN_SIDE,
) -> Iterator[tuple[str, Decoded]]:
    """Decode `items` (name, reader) in `workers` threads; results in input order.

    Reading happens in the threads too: on S3 each read is a request, and
    overlapping them hides the latency.
    """

    def one(item: tuple[str, Callable[[], bytes]]) -> tuple[str, Decoded]:
        name, read = item
        try:
            data = read()
        except OSError as exc:
            return name, Decoded(None, "unreadable", _first_line(exc))
        return name, decode(data, target, min_side)

    if workers <= 1:
        yield from map(one, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="kubetrain-decode") as pool:
        yield from pool.map(one, items, chunksize=1)


def _pixels(img: Image.Image, target: Target) -> np.ndarray:
    if target.channels == 1:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            grey = np.asarray(img, np.float64)
            scale = 255.0 / max(65535.0 if img.mode.startswith("I;16") else grey.max(), 1.0)
            img = Image.fromarray(np.clip(grey * scale, 0, 255).astype(np.uint8), "L")
        else:
            img = img.convert("L")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if target.size:
        img = _cover_resize(img, target.size)
    pixels = np.asarray(img, np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _cover_resize(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the centre `size` x `size` square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) / 2, (new_h - size) / 2
    # resize's box crops the source before scaling: one resampling pass, no big temporary
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
