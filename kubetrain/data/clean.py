"""Clean: from a raw table to numeric train/validation/test splits.

Order matters for honest metrics: duplicates go first (a row in both train and
test inflates accuracy), then the stratified split, and only then every
statistic (imputation values, category lists, outlier bounds, scaler) is
fitted, on the training split alone, and applied to all three.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from kubetrain.config.settings import CleanConfig
from kubetrain.core.errors import KubetrainError, require
from kubetrain.core.markdown import md_text
from kubetrain.data.datasets import LABEL, Schema, class_counts, load_table, save_split

MAX_CATEGORIES = 100
MIN_ROWS_PER_CLASS = 3  # one each for train, validation and test


@dataclass
class Split:
    X: np.ndarray
    y: np.ndarray


def split_indices(
    y: np.ndarray, cfg: CleanConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/validation/test row indices, reproducible from the seed."""
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=y, random_state=seed)
    val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=seed)
    return train, val, test


def _check_classes(y: np.ndarray, class_names: list[str], cfg: CleanConfig) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    present = [n for n, c in zip(class_names, counts, strict=False) if c > 0]
    require(
        len(present) >= 2,
        f"only one class ({present[0]!r}) is left after cleaning; "
        "a classifier needs at least two (check the label column)",
    )
    smallest = min(counts[counts > 0])
    need = max(MIN_ROWS_PER_CLASS, int(np.ceil(2 / min(cfg.test_fraction, cfg.val_fraction))))
    if smallest < need:
        rare = [n for n, c in zip(class_names, counts, strict=False) if 0 < c < need]
        raise KubetrainError(
            f"class(es) {', '.join(map(repr, rare[:5]))} have fewer than {need} rows "
            f"(smallest: {smallest}); a stratified train/validation/test split needs at "
            "least that many: add rows or drop those classes"
        )


class Preprocessor:
    """Statistics fitted on the training split, replayable on any split or at serving."""

    def __init__(self, cfg: CleanConfig, schema: Schema):
        self.cfg, self.schema = cfg, schema
        self.params: dict[str, Any] = {}

    def fit(self, frame: pd.DataFrame) -> Preprocessor:
        cfg, image = self.cfg, self.schema.kind == "image"
        numeric = [
            c
            for c in frame.columns
            if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        ]
        categorical = [c for c in frame.columns if c not in numeric]
        fill: dict[str, Any] = {}
        for c in numeric:
            col = frame[c].astype(np.float64)
            if col.isna().all():
                raise KubetrainError(
                    f"feature column {c!r} has no values in the training "
                    "split; drop the column or fill it before ingest"
                )
            strategy = cfg.impute if cfg.impute != "drop" else "median"
            fill[c] = float(
                col.mean()
                if strategy == "mean"
                else col.median()
                if strategy == "median"
                else col.mode().iloc[0]
            )
        categories: dict[str, list[str]] = {}
        for c in categorical:
            values = frame[c].dropna().astype(str)
            if values.empty:  # all-missing text/null column: same error as a numeric one
                raise KubetrainError(
                    f"feature column {c!r} has no values in the training "
                    "split; drop the column or fill it before ingest"
                )
            distinct = sorted(values.unique())
            if len(distinct) > MAX_CATEGORIES:
                raise KubetrainError(
                    f"feature column {c!r} has {len(distinct)} distinct text values (limit "
                    f"{MAX_CATEGORIES}); drop it (an ID?) or encode it numerically first"
                )
            categories[c] = distinct
            fill[c] = values.mode().iloc[0] if len(values) else ""
        self.params = {"numeric": numeric, "categorical": categories, "fill": fill}
        X = self._encode(frame)
        self.params["bounds"] = self._bounds(X, len(numeric)) if not image else None
        if self.params["bounds"] is not None and cfg.outliers != "none":
            lo, hi = self.params["bounds"]
            X[:, : len(numeric)] = np.clip(X[:, : len(numeric)], lo, hi)
        self.params["scale"] = self._scaler(X, image)
        return self

    def _encode(self, frame: pd.DataFrame) -> np.ndarray:
        p = self.params
        parts = [
            frame[p["numeric"]]
            .astype(np.float64)
            .fillna({c: p["fill"][c] for c in p["numeric"]})
            .to_numpy()
        ]
        for c, cats in p["categorical"].items():
            col = frame[c].astype(object).where(frame[c].notna(), p["fill"][c]).astype(str)
            parts.append((col.to_numpy()[:, None] == np.array(cats)[None, :]).astype(float))
        return np.concatenate(parts, axis=1) if parts else np.empty((len(frame), 0))

    def _bounds(self, X: np.ndarray, n_numeric: int) -> list[list[float]] | None:
        if self.cfg.outliers == "none" or n_numeric == 0:
            return None
        num, t = X[:, :n_numeric], self.cfg.outlier_threshold
        if self.cfg.outliers == "zscore":
            mu, sd = num.mean(0), num.std(0)
            return [(mu - t * sd).tolist(), (mu + t * sd).tolist()]
        q1, q3 = np.percentile(num, 25, axis=0), np.percentile(num, 75, axis=0)
        return [(q1 - t * (q3 - q1)).tolist(), (q3 + t * (q3 - q1)).tolist()]

    def _scaler(self, X: np.ndarray, image: bool) -> dict[str, Any]:
        kind = self.cfg.scaling
        if kind == "none" or X.size == 0:
            return {"kind": "none"}
        axis = None if image else 0  # images: one scalar keeps pixel relations intact
        if kind == "standard":
            offset, scale = X.mean(axis=axis), X.std(axis=axis)
        else:
            offset, scale = X.min(axis=axis), X.max(axis=axis) - X.min(axis=axis)
        scale = np.where(np.asarray(scale) > 1e-12, scale, 1.0)
        return {
            "kind": kind,
            "offset": np.atleast_1d(offset).tolist(),
            "scale": np.atleast_1d(scale).tolist(),
        }

    def outlier_mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows with any numeric feature outside the fitted bounds."""
        if self.params.get("bounds") is None:
            return np.zeros(len(frame), bool)
        n = len(self.params["numeric"])
        num = self._encode(frame)[:, :n]
        lo, hi = (np.asarray(b) for b in self.params["bounds"])
        return ((num < lo) | (num > hi)).any(axis=1)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        X = self._encode(frame)
        if self.params.get("bounds") is not None:
            n = len(self.params["numeric"])
            X[:, :n] = np.clip(X[:, :n], *self.params["bounds"])
        s = self.params["scale"]
        if s["kind"] != "none":
            X = (X - np.asarray(s["offset"])) / np.asarray(s["scale"])
        return X.astype(np.float32)

    def feature_names(self) -> list[str]:
        p = self.params
        return list(p["numeric"]) + [
            f"{c}={v}" for c, cats in p["categorical"].items() for v in cats
        ]


def clean(
    table_path: str, train_path: str, val_path: str, test_path: str, cfg: CleanConfig, seed: int
) -> dict[str, Any]:
    """The clean stage; returns metadata and writes the three splits atomically."""
    started = time.perf_counter()
    frame, schema = load_table(table_path)
    stats: dict[str, Any] = {"rows_in": int(len(frame))}
    before = len(frame)
    frame = frame.drop_duplicates(ignore_index=True)
    stats["duplicates_removed"] = before - len(frame)
    features = frame.drop(columns=[LABEL])
    stats["missing_values"] = int(features.isna().sum().sum())
    if cfg.impute == "drop":
        keep = ~features.isna().any(axis=1).to_numpy()
        frame, features = frame[keep].reset_index(drop=True), features[keep].reset_index(drop=True)
        stats["rows_dropped_missing"] = int((~keep).sum())
    require(
        len(frame) > 0,
        "no rows left after dropping rows with missing values; use "
        "--impute median (or mean/most_frequent) instead of drop",
    )
    index = {name: i for i, name in enumerate(schema.class_names)}
    y = frame[LABEL].map(index).to_numpy()
    require(not pd.isna(y).any(), "labels outside the schema's classes; re-run ingest")
    y = y.astype(np.int64)
    _check_classes(y, schema.class_names, cfg)
    tr, va, te = split_indices(y, cfg, seed)
    prep = Preprocessor(cfg, schema).fit(features.iloc[tr])
    if cfg.outliers != "none" and cfg.outlier_action == "drop":
        out = prep.outlier_mask(features.iloc[tr])
        stats["outliers_dropped"] = int(out.sum())
        tr = tr[~out]  # validation/test rows are clipped, never dropped: honest metrics
    elif cfg.outliers != "none":
        stats["outliers_clipped_rows"] = int(prep.outlier_mask(features).sum())
    split_schema = Schema(
        kind=schema.kind,
        feature_names=prep.feature_names(),
        class_names=schema.class_names,
        image_shape=schema.image_shape,
        extra={
            "preprocessing": prep.params,
            "categorical_columns": list(
                range(len(prep.params["numeric"]), len(prep.feature_names()))
            ),
        },
    )
    splits = {}
    for name, rows, path in (
        ("train", tr, train_path),
        ("validation", va, val_path),
        ("test", te, test_path),
    ):
        X = prep.transform(features.iloc[rows])
        save_split(path, X, y[rows], split_schema)
        splits[name] = {
            "rows": int(len(rows)),
            "class_counts": class_counts(y[rows], schema.class_names),
        }
    stats.update(
        stage="clean",
        splits=splits,
        features_out=len(split_schema.feature_names),
        scaling=cfg.scaling,
        impute=cfg.impute,
        outliers=cfg.outliers,
        seconds=round(time.perf_counter() - started, 3),
    )
    return stats


def quality_report(stats: dict[str, Any]) -> str:
    """Markdown data-quality report (before/after counts) for the KFP UI."""
    splits = stats["splits"]
    kept = sum(s["rows"] for s in splits.values())
    lines = [
        "# Data quality",
        "",
        "| check | count |",
        "|---|---|",
        f"| rows in | {stats['rows_in']} |",
        f"| exact duplicates removed | {stats['duplicates_removed']} |",
        f"| missing feature values ({stats['impute']}) | {stats['missing_values']} |",
    ]
    for key, label in (
        ("rows_dropped_missing", "rows dropped for missing values"),
        ("outliers_dropped", f"training rows dropped as outliers ({stats['outliers']})"),
        ("outliers_clipped_rows", f"rows with clipped outliers ({stats['outliers']})"),
    ):
        if key in stats:
            lines.append(f"| {label} | {stats[key]} |")
    lines += [
        f"| rows out | {kept} |",
        f"| features out | {stats['features_out']} |",
        "",
        "## Splits (stratified)",
        "",
        "| split | rows | per class |",
        "|---|---|---|",
    ]
    for name, s in splits.items():
        # class names are the user's data: inert text, not Markdown or HTML
        per_class = ", ".join(f"{md_text(k)}: {v}" for k, v in s["class_counts"].items())
        lines.append(f"| {name} | {s['rows']} | {per_class} |")
    lines += ["", f"Scaling: {stats['scaling']} (fitted on the training split only)."]
    return "\n".join(lines) + "\n"
