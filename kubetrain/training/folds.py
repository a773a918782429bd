"""K-fold cross-validation for tuning small tables.

A single validation split of a few hundred rows ranks hyperparameters by noise: on a
1,300-row table one split's accuracy moves by several points between seeds. With
`cv_folds` K >= 2 a trial trains K times, each time holding out one fold of the
training and validation rows together, and scores the mean; the test split is never
touched. Folds are dealt per class (per target decile for a regression) by a hash of
each row's encoded values, so a row lands in the same fold on every run, in any row
order, whatever engine wrote the splits (its values agree to float32 rounding, and the
hash reads them rounded to `HASH_DECIMALS` significant digits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kubetrain.config.settings import TuneConfig

#: `cv_folds=-1` (auto) turns K-fold on for this many training + validation rows at
#: most: beyond it one validation split is already large, and K fits cost K times more.
AUTO_MAX_ROWS = 20_000
AUTO_FOLDS = 5
#: ... and for images of at most this many values: a ResNet on 2,000 32x32x3 images
#: trains for minutes a fit on 2 cores, so 5 fits per trial overran a 120 s tuning budget
#: 3-6 times (measured), while digits (8x8) and small tables take seconds.
AUTO_MAX_IMAGE_VALUES = 1024
HASH_DECIMALS = 5
#: Target quantile groups a regression's folds are stratified on.
REGRESSION_GROUPS = 10


def folds_for(tune: TuneConfig, rows: int, image_shape: list[int] | None = None) -> int:
    """The folds to use: as set (0 or 1: off), or for -1 `AUTO_FOLDS` up to `AUTO_MAX_ROWS`
    rows of tables or of images up to `AUTO_MAX_IMAGE_VALUES` values."""
    if tune.cv_folds >= 0:
        return tune.cv_folds if tune.cv_folds >= 2 else 0
    if image_shape and int(np.prod(image_shape)) > AUTO_MAX_IMAGE_VALUES:
        return 0
    return AUTO_FOLDS if rows <= AUTO_MAX_ROWS else 0


def row_keys(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A uint64 hash of each row's values and label, rounded so float noise between
    engines does not move a row (FNV-1a over the rounded values' bytes, vectorized)."""
    rounded = np.column_stack([X.astype(np.float64), np.asarray(y, np.float64)])
    with np.errstate(all="ignore"):
        rounded = np.round(rounded, HASH_DECIMALS)
    rounded[rounded == 0] = 0.0  # -0.0 and 0.0 hash alike
    words = np.ascontiguousarray(rounded).view(np.uint64)
    h = np.full(len(words), 0xCBF29CE484222325, np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for column in words.T:
            h = (h ^ column) * prime
            h ^= h >> np.uint64(29)
    return h


def assign(X: np.ndarray, y: np.ndarray, folds: int, regression: bool) -> np.ndarray:
    """Fold of every row (0..folds-1): within each class (or target decile), rows ordered
    by `row_keys` are dealt round-robin, so each fold holds each group's share to one row."""
    groups = _groups(y, regression)
    keys = row_keys(X, y)
    order = np.lexsort((keys, groups))  # by group, then by key
    out = np.empty(len(y), np.int64)
    start = 0
    for count in np.bincount(groups[order]):
        out[order[start : start + count]] = np.arange(count) % folds
        start += count
    return out


def _groups(y: np.ndarray, regression: bool) -> np.ndarray:
    if not regression:
        return np.asarray(y, np.int64)
    edges = np.quantile(y, np.linspace(0, 1, REGRESSION_GROUPS + 1)[1:-1])
    return np.searchsorted(np.unique(edges), y).astype(np.int64)


Split = tuple[np.ndarray, np.ndarray]


def cross_validate(
    fit_fold: Callable[[Split, Split], dict[str, float]],
    train: Split,
    val: Split,
    folds: int,
    regression: bool,
    after_fold: Callable[[int, list[dict[str, float]]], bool] | None = None,
) -> list[dict[str, float]]:
    """``fit_fold(train, held_out)`` on each of ``folds`` folds of ``train`` + ``val``;
    the metrics per fold. ``after_fold(i, so_far)`` may stop early (a pruned trial)."""
    X = np.concatenate([train[0], val[0]])
    y = np.concatenate([train[1], val[1]])
    fold = assign(X, y, folds, regression)
    results: list[dict[str, float]] = []
    for k in range(folds):
        held = fold == k
        results.append(fit_fold((X[~held], y[~held]), (X[held], y[held])))
        if after_fold and after_fold(k, results):
            break
    return results


def summary(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Mean and (population) std of each metric over the folds."""
    names = [k for k in per_fold[0] if isinstance(per_fold[0][k], float | int)]
    out: dict[str, float] = {}
    for name in names:
        values = np.array([f[name] for f in per_fold], np.float64)
        out[f"{name}_mean"], out[f"{name}_std"] = float(values.mean()), float(values.std())
    return out
