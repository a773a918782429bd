"""A synthetic 10-class RGB image data set, generated here because nothing can be downloaded.

Tests and benchmarks need image folders that look like real ones (files on
disk, one subfolder per class) and that a model cannot solve from one pixel:
every class is a *shape*, *texture* or *glyph* drawn with a random colour, size,
position and rotation over a random background (flat, gradient or blotchy
noise), with clutter and pixel noise on top. Colour carries no class
information, so a network has to learn form; a ResNet reaches well above chance
in a few CPU epochs, yet 100% needs real training.

Images are drawn at twice the output size and downsampled (anti-aliased edges,
as a camera gives), each from its own seed ``(seed, index)``, so a data set is
the same whatever the number of worker processes, and the first 100 images of
a 2,000-image set equal a 100-image set's.

    python -m kubetrain.data.synthetic_images OUT --images 2000 --size 32 --seed 0

writes ``OUT/<class>/<class>-00000.png`` ... and ``OUT/manifest.csv``
(``path,label``, paths relative to OUT). The folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import atomic_dir

CLASSES = (
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "stripes",
    "checker",
    "glyph_a",
    "glyph_k",
)
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MANIFEST = "manifest.csv"
_SUPERSAMPLE = 2


def generate_image(index: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, int]:
    """Image number `index` of the set: ``(uint8 (size, size, 3), class index)``.

    The class cycles with the index, so any prefix of the set is balanced.
    """
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES)
    big = size * _SUPERSAMPLE
    background = _background(rng, big)
    fg = _contrasting_colour(rng, np.asarray(background).reshape(-1, 3).mean(0))
    layer = Image.new("L", (big, big), 0)  # the class's mask, pasted in colour
    _DRAW[CLASSES[label]](ImageDraw.Draw(layer), rng, big)
    angle = float(rng.uniform(0, 360)) if CLASSES[label] not in ("glyph_a", "glyph_k") else 0.0
    if angle:
        layer = layer.rotate(angle, resample=Image.BILINEAR)
    image = background.copy()
    image.paste(Image.new("RGB", (big, big), fg), (0, 0), layer)
    _clutter(ImageDraw.Draw(image), rng, big)
    image = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), label


def generate_folder(
    out: str | os.PathLike,
    images: int = 2000,
    size: int = 32,
    seed: int = 0,
    image_format: str = "png",
    workers: int = 1,
) -> Path:
    """Write the set as ``out/<class>/<class>-NNNNN.<ext>`` plus ``out/manifest.csv``.

    Written into a temporary sibling and renamed, so an interrupted run leaves nothing.
    """
    if images < 1 or size < 8:
        raise KubetrainError(f"images={images}, size={size}: need images >= 1 and size >= 8")
    if image_format not in FORMATS:
        raise KubetrainError(f"format {image_format!r} unknown; use {', '.join(FORMATS)}")
    target = Path(out)
    with atomic_dir(target) as tmp:
        for name in CLASSES:
            (tmp / name).mkdir()
        chunks = [range(i, min(i + 256, images)) for i in range(0, images, 256)]
        job = [(str(tmp), c.start, c.stop, size, seed, image_format) for c in chunks]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                rows = [r for part in pool.map(_write_chunk, job) for r in part]
        else:
            rows = [r for args in job for r in _write_chunk(args)]
        lines = ["path,label", *(f"{path},{label}" for path, label in rows)]
        (tmp / MANIFEST).write_text("\n".join(lines) + "\n")
    return target


def _write_chunk(args: tuple[str, int, int, int, int, str]) -> list[tuple[str, str]]:
    root, start, stop, size, seed, image_format = args
    rows = []
    for i in range(start, stop):
        pixels, label = generate_image(i, size, seed)
        name = CLASSES[label]
        rel = f"{name}/{name}-{i:05d}.{image_format}"
        options = {"quality": 92} if image_format in ("jpeg", "webp") else {}
        Image.fromarray(pixels).save(Path(root) / rel, FORMATS[image_format], **options)
        rows.append((rel, name))
    return rows


# --- backgrounds, colours, clutter -----------------------------------------------------


def _background(rng: np.random.Generator, big: int) -> Image.Image:
    """Flat, a linear gradient between two colours, or smooth blotches."""
    kind = rng.integers(3)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if kind == 0:
        return Image.new("RGB", (big, big), tuple(int(v) for v in a))
    if kind == 1:
        t = np.linspace(0, 1, big)
        theta = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(theta) * t[None, :] + np.sin(theta) * t[:, None]
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        pixels = a[None, None] * (1 - ramp[..., None]) + b[None, None] * ramp[..., None]
        return Image.fromarray(pixels.astype(np.uint8))
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    blotches = Image.fromarray(coarse).resize((big, big), Image.BICUBIC)
    return blotches.filter(ImageFilter.GaussianBlur(big / 16))


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background's mean to be seen."""
    for _ in range(50):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - behind).sum() > 180:
            break
    else:
        colour = np.where(behind > 127, 0, 255)
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    """A few thin random lines: distractors no class owns."""
    for _ in range(int(rng.integers(0, 3))):
        xy = [float(v) for v in rng.uniform(0, big, 4)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(xy, fill=colour, width=int(rng.integers(1, 3)))


# --- the classes: each draws its mask in white on a black "L" layer --------------------


def _box(rng: np.random.Generator, big: int, low: float = 0.35, high: float = 0.8):
    """A random centre and radius keeping the figure mostly inside the frame."""
    r = rng.uniform(low, high) * big / 2
    cx, cy = rng.uniform(r * 0.8, big - r * 0.8, 2)
    return float(cx), float(cy), float(r)


def _disc(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    cx, cy, r = _box(rng, big)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _ring(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    cx, cy, r = _box(rng, big, 0.5, 0.85)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, int(r * 0.3)))


def _polygon(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int, corners: int) -> None:
    cx, cy, r = _box(rng, big)
    start = rng.uniform(0, 2 * math.pi)
    points = [
        (cx + r * math.cos(start + 2 * math.pi * k / corners),
         cy + r * math.sin(start + 2 * math.pi * k / corners))
        for k in range(corners)
    ]  # fmt: skip
    d.polygon(points, fill=255)


def _cross(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    cx, cy, r = _box(rng, big, 0.5, 0.85)
    t = r * rng.uniform(0.25, 0.4)
    d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
    d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)


def _star(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    cx, cy, r = _box(rng, big, 0.5, 0.9)
    inner = r * rng.uniform(0.35, 0.5)
    points = [
        (cx + (r if k % 2 == 0 else inner) * math.cos(math.pi * k / 5 - math.pi / 2),
         cy + (r if k % 2 == 0 else inner) * math.sin(math.pi * k / 5 - math.pi / 2))
        for k in range(10)
    ]  # fmt: skip
    d.polygon(points, fill=255)


def _stripes(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    """Parallel bars over a random patch (rotated afterwards like every figure)."""
    period = rng.uniform(0.12, 0.25) * big
    x0, y0 = rng.uniform(0, 0.25, 2) * big
    x1, y1 = big - rng.uniform(0, 0.25, 2) * big
    x = x0
    while x < x1:
        d.rectangle([x, y0, x + period / 2, y1], fill=255)
        x += period


def _checker(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    cell = rng.uniform(0.12, 0.22) * big
    x0, y0 = rng.uniform(0, 0.25, 2) * big
    x1, y1 = big - rng.uniform(0, 0.25, 2) * big
    for i, x in enumerate(np.arange(x0, x1, cell)):
        for j, y in enumerate(np.arange(y0, y1, cell)):
            if (i + j) % 2 == 0:
                d.rectangle([x, y, x + cell, y + cell], fill=255)


def _glyph(letter: str) -> Callable[[ImageDraw.ImageDraw, np.random.Generator, int], None]:
    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
        font = ImageFont.load_default(size=float(rng.uniform(0.55, 0.9) * big))
        text = letter if rng.random() < 0.5 else letter.lower()
        left, top, right, bottom = d.textbbox((0, 0), text, font=font)
        w, h = right - left, bottom - top
        x = rng.uniform(0, max(1.0, big - w)) - left
        y = rng.uniform(0, max(1.0, big - h)) - top
        d.text((x, y), text, fill=255, font=font, stroke_width=int(rng.integers(0, 3)))

    return draw


_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, np.random.Generator, int], None]] = {
    "disc": _disc,
    "ring": _ring,
    "square": lambda d, rng, big: _polygon(d, rng, big, 4),
    "triangle": lambda d, rng, big: _polygon(d, rng, big, 3),
    "cross": _cross,
    "star": _star,
    "stripes": _stripes,
    "checker": _checker,
    "glyph_a": _glyph("A"),
    "glyph_k": _glyph("K"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetrain.data.synthetic_images",
        description="Write a synthetic 10-class RGB image folder (one subfolder per class).",
    )
    parser.add_argument("out", help="folder to create (replaced if it exists)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=sorted(FORMATS), default="png")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    try:
        out = generate_folder(
            args.out, args.images, args.size, args.seed, args.format, args.workers
        )
    except KubetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.images} {args.size}x{args.size} images in {len(CLASSES)} classes to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
