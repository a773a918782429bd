"""Clean: from a raw table to numeric train/validation/test splits.

Order matters for honest metrics: duplicates go first (a row in both train and
test inflates accuracy), then the stratified split, and only then every
statistic (imputation values, category lists, outlier bounds, scaler) is
fitted, on the training split alone, and applied to all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kubetrain.config.settings import CleanConfig
from kubetrain.core.errors import KubetrainError, require
from kubetrain.core.markdown import md_text
from kubetrain.data.datasets import Schema

MAX_CATEGORIES = 100
MIN_ROWS_PER_CLASS = 3  # one each for train, validation and test


@dataclass
class Split:
    X: np.ndarray
    y: np.ndarray


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


def _one_hot(col: pd.Series, categories: list[str], fill: str) -> np.ndarray:
    """One column per category; missing values count as ``fill``, unseen values as none."""
    if not isinstance(col.dtype, pd.StringDtype):
        col = col.astype(object).where(col.isna(), col.astype(str))
    codes = pd.Categorical(col.fillna(fill), categories=categories).codes
    out = np.zeros((len(col), len(categories)), np.float64)
    seen = np.flatnonzero(codes >= 0)
    out[seen, codes[seen]] = 1.0
    return out


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
        numeric = frame[p["numeric"]].to_numpy(np.float64, na_value=np.nan)
        fill = np.array([p["fill"][c] for c in p["numeric"]], np.float64)
        parts = [np.where(np.isnan(numeric), fill, numeric)]
        for c, cats in p["categorical"].items():
            parts.append(_one_hot(frame[c], cats, p["fill"][c]))
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
    """The clean stage for a table that fits in memory: read once, then the streaming
    clean's passes (`kubetrain.data.clean_stream`) over the held batches, so both
    paths, and the Spark engine, dedupe, route and fit exactly alike."""
    from kubetrain.data.clean_stream import clean_streaming  # it builds on this module

    return clean_streaming(
        table_path, train_path, val_path, test_path, cfg, seed, batch_rows=1 << 17, in_memory=True
    )


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
