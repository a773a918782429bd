"""Augment: more (and more varied) training rows; validation and test stay untouched.

Images get one batched affine warp per copy (rotation, shift, optional flips
through `affine_grid`/`grid_sample`), then brightness and noise. Tables get
minority-class oversampling and Gaussian jitter on continuous columns only
(one-hot columns stay 0/1).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kubetrain.config.settings import AugmentConfig
from kubetrain.data.datasets import Schema, class_counts, load_split, save_split


def augment_images(
    X: np.ndarray, shape: list[int], cfg: AugmentConfig, rng: torch.Generator
) -> np.ndarray:
    """One randomly warped copy of every image in `X` (flat rows)."""
    n = len(X)
    c, h, w = shape
    imgs = torch.as_tensor(X, dtype=torch.float32).reshape(n, c, h, w)
    angle = (torch.rand(n, generator=rng) * 2 - 1) * math.radians(cfg.max_rotation)
    shift = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (n, 2), generator=rng).float()
    sx = torch.ones(n)
    sy = torch.ones(n)
    if cfg.flip_horizontal:
        sx = torch.where(torch.rand(n, generator=rng) < 0.5, -1.0, 1.0)
    if cfg.flip_vertical:
        sy = torch.where(torch.rand(n, generator=rng) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta works in [-1, 1] coordinates; h/w and w/h make it a true rotation in pixels
    # for non-square images (for square ones they are 1).
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy * h / w, shift[:, 0] * 2 / w], dim=1),
            torch.stack([sin * sx * w / h, cos * sy, shift[:, 1] * 2 / h], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(imgs.shape), align_corners=False)
    # Pixels shifted in from outside the frame are background (each image's minimum).
    # Not "border" padding: digits' strokes often touch the edge and would be smeared
    # (duplicated); not plain zeros: 0 is the mean intensity in scaled units.
    low = imgs.amin(dim=(1, 2, 3), keepdim=True)
    out = low + F.grid_sample(imgs - low, grid, padding_mode="zeros", align_corners=False)
    if cfg.brightness > 0:
        factor = 1 + (torch.rand(n, 1, 1, 1, generator=rng) * 2 - 1) * cfg.brightness
        out = low + (out - low) * factor
    if cfg.noise_std > 0:
        out = out + torch.randn(out.shape, generator=rng) * cfg.noise_std
    return out.reshape(n, -1).numpy()


def oversample(
    X: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resample every class up to the majority count (duplicates get jittered later)."""
    counts = np.bincount(y)
    target = counts.max()
    extra = [
        rng.choice(np.flatnonzero(y == k), target - n)
        for k, n in enumerate(counts)
        if 0 < n < target
    ]
    if not extra:
        return X, y
    idx = np.concatenate(extra)
    return np.concatenate([X, X[idx]]), np.concatenate([y, y[idx]])


def jitter(X: np.ndarray, schema: Schema, std: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, std, X.shape).astype(np.float32)
    noise[:, schema.extra.get("categorical_columns", [])] = 0.0
    return X + noise


def augment_arrays(
    X: np.ndarray, y: np.ndarray, schema: Schema, cfg: AugmentConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Original rows first, then the augmented ones; deterministic given the seed."""
    if schema.kind == "image":
        rng = torch.Generator().manual_seed(seed)
        copies = [
            augment_images(X, schema.image_shape, cfg, rng) for _ in range(cfg.augment_copies)
        ]
        return (
            np.concatenate([X, *copies]).astype(np.float32),
            np.concatenate([y] * (1 + len(copies))),
        )
    rng = np.random.default_rng(seed)
    base_X, base_y = X, y
    if cfg.oversample:
        # Copies below are drawn from the balanced set, so they keep the classes balanced.
        base_X, base_y = oversample(X, y, rng)
        added = base_X[len(X) :]
        X = np.concatenate([X, jitter(added, schema, cfg.noise_std, rng)]) if len(added) else X
        y = base_y
    copies = [jitter(base_X, schema, cfg.noise_std, rng) for _ in range(cfg.augment_copies)]
    return (
        np.concatenate([X, *copies]).astype(np.float32),
        np.concatenate([y, *([base_y] * len(copies))]),
    )


def augment(train_path: str, out_path: str, cfg: AugmentConfig, seed: int) -> dict[str, Any]:
    """The augment stage; returns metadata (rows and class counts before and after)."""
    started = time.perf_counter()
    X, y, schema = load_split(train_path)
    X_aug, y_aug = augment_arrays(X, y, schema, cfg, seed)
    save_split(out_path, X_aug, y_aug, schema)
    return {
        "stage": "augment",
        "kind": schema.kind,
        "rows_before": int(len(y)),
        "rows_after": int(len(y_aug)),
        "copies": cfg.augment_copies,
        "class_counts_before": class_counts(y, schema.class_names),
        "class_counts_after": class_counts(y_aug, schema.class_names),
        "seconds": round(time.perf_counter() - started, 3),
    }
