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
import pyarrow as pa
import pyarrow.compute as pc

from kubetrain.config.settings import CleanConfig
from kubetrain.core.errors import KubetrainError, require
from kubetrain.core.markdown import md_text
from kubetrain.data import feature_selection
from kubetrain.data.column_types import (
    ACTIONS,
    DATETIME_PARTS,
    DROPPED_KINDS,
    HASH_WIDTH,
    MAX_CATEGORIES,
    NUMERIC_KINDS,
    Typing,
    date_features,
    feature_names,
    finite,
    hashed,
    legacy_types,
    to_float,
)
from kubetrain.data.datasets import Schema, is_image_table

MIN_ROWS_PER_CLASS = 3  # one each for train, validation and test
#: Rows of the report's column table (a wide table's columns are in the stage metadata).
REPORT_COLUMNS = 100


@dataclass
class Split:
    X: np.ndarray
    y: np.ndarray


def rows_needed(cfg: CleanConfig) -> int:
    """Fewest rows a class needs for a stratified train/validation/test split."""
    return max(MIN_ROWS_PER_CLASS, int(np.ceil(2 / min(cfg.test_fraction, cfg.val_fraction))))


def rare_classes(y: np.ndarray, class_names: list[str], cfg: CleanConfig) -> list[int]:
    """Classes with too few rows to split, to be dropped (a model cannot learn, nor a test
    measure, a class seen once); refuses only when fewer than two classes would remain."""
    counts = np.bincount(y, minlength=len(class_names))
    present = [n for n, c in zip(class_names, counts, strict=False) if c > 0]
    require(
        len(present) >= 2,
        f"only one class ({present[0]!r}) is left after cleaning; "
        "a classifier needs at least two (check the label column)",
    )
    need = rows_needed(cfg)
    rare = [i for i, c in enumerate(counts) if 0 < c < need]
    if len(present) - len(rare) < 2:
        names = [class_names[i] for i in rare]
        raise KubetrainError(
            f"class(es) {', '.join(map(repr, names[:5]))} have fewer than {need} rows "
            f"(smallest: {min(counts[counts > 0])}); a stratified train/validation/test split "
            "needs at least that many and fewer than two classes have them: add rows"
        )
    return rare


def _one_hot_into(out: np.ndarray, col: pd.Series, categories: list[str], fill: str) -> None:
    """One column per category; missing values count as ``fill``, unseen values as none."""
    codes = category_codes(col, categories, fill)
    out[:] = 0.0
    seen = np.flatnonzero(codes >= 0)
    out[seen, codes[seen]] = 1.0


def category_codes(col: pd.Series, categories: list[str], fill: str | None) -> np.ndarray:
    """Each value's position in ``categories`` (missing values count as ``fill``; unseen
    ones, and missing ones without a fill, are -1). Arrow's hash lookup: pandas'
    Categorical on Arrow-backed text costs about 30 times as much, and this runs on
    every row of every pass."""
    if isinstance(col.dtype, pd.StringDtype):
        text = pa.array(col.array)
    else:  # numbers, booleans, objects: compared as their text, like the fit saw them
        obj = col.astype(object).where(col.isna(), col.astype(str))
        text = pa.array(obj, type=pa.string(), from_pandas=True)
    filled = text if fill is None else pc.fill_null(text, pa.scalar(fill, text.type))
    codes = pc.index_in(filled, value_set=pa.array(categories, text.type))
    return codes.fill_null(-1).to_numpy().astype(np.int64, copy=False)


def no_values(c: str) -> KubetrainError:
    return KubetrainError(
        f"feature column {c!r} has no values in the training "
        "split; drop the column (--drop-columns) or fill it before ingest"
    )


def continuous_width(params: dict[str, Any]) -> int:
    """Leading encoded columns that are continuous (numbers, and each date's year and
    elapsed days): the ones outlier bounds apply to. Old params: the numeric columns."""
    return len(params["numeric"]) + 2 * len(params.get("datetime", {}))


def _numbers(frame: pd.DataFrame, cols: list[str], p: dict[str, Any]) -> np.ndarray:
    """Columns as floats (NaN: missing or junk), each read as its type says; a plain
    numeric block in one step (wide image tables)."""
    kinds = p.get("types", {})
    plain = all(
        kinds.get(c, "numeric") == "numeric"
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
        for c in cols
    )
    if plain:  # inf and -inf are missing here too (`to_float`)
        values = frame[cols].to_numpy(np.float64, na_value=np.nan)
        return finite(values).reshape(len(frame), len(cols))
    how = p.get("datetime", {})
    return np.column_stack(
        [to_float(frame[c], kinds.get(c, "numeric"), how.get(c, {}).get("how", "")) for c in cols]
    ).reshape(len(frame), len(cols))


def _filled(frame: pd.DataFrame, cols: list[str], p: dict[str, Any]) -> np.ndarray:
    values = _numbers(frame, cols, p)
    fill = np.array([p["fill"][c] for c in cols], np.float64)
    return np.where(np.isnan(values), fill, values)


def _fill_into(out: np.ndarray, frame: pd.DataFrame, cols: list[str], p: dict[str, Any]) -> None:
    """`_filled` written into ``out`` (filled in place, no second array)."""
    if not cols:
        return
    out[:] = _numbers(frame, cols, p)
    fill = np.broadcast_to(np.array([p["fill"][c] for c in cols], np.float64), out.shape)
    np.copyto(out, fill, where=np.isnan(out))


class Preprocessor:
    """Statistics fitted on the training split, replayable on any split or at serving.

    ``params`` (JSON) holds everything `transform` needs: each column's type
    (``types``), the fill values, categories, each date column's reading and earliest
    training date, each hashed column's width, then the outlier bounds and scaler. The
    encoded matrix is [numbers, dates' year and days | booleans, dates' cyclic parts,
    one-hot categories, hashed features]; outlier bounds apply to the part before the
    bar. ``selected`` (feature selection) lists the encoded columns `transform` outputs;
    bounds and scaler cover every encoded column. Params written before column types
    existed (no ``types``: numeric and categorical columns only), or without
    ``selected`` (every column), transform exactly as they did.
    """

    def __init__(self, cfg: CleanConfig, schema: Schema):
        self.cfg, self.schema = cfg, schema
        self.params: dict[str, Any] = {}

    def fit(self, frame: pd.DataFrame, types: Typing | None = None) -> Preprocessor:
        """Fit on the training rows held in memory: the reference the streaming folds
        (`kubetrain.data.clean_stream.FillStats`) are checked against. Without ``types``,
        numeric dtypes are numeric and everything else categorical."""
        cfg, image = self.cfg, self.schema.kind == "image"
        types = types if types is not None else legacy_types(frame)
        self.params = fill_params(types)
        strategy = cfg.impute if cfg.impute != "drop" else "median"
        p, fill = self.params, self.params["fill"]
        for c in [*p["numeric"], *p["boolean"], *p["datetime"]]:
            col = pd.Series(_numbers(frame, [c], p)[:, 0]).dropna()
            if col.empty:
                raise no_values(c)
            fill[c] = float(
                col.mean()
                if strategy == "mean"
                else col.median()
                if strategy == "median"
                else col.mode().iloc[0]
            )
            if c in p["datetime"]:
                p["datetime"][c]["earliest"] = float(col.min())
        for c in p["categorical"]:
            values = frame[c].dropna().astype(str)
            if values.empty:  # all-missing text/null column: same error as a numeric one
                raise no_values(c)
            distinct = sorted(values.unique())
            if len(distinct) > MAX_CATEGORIES:
                raise too_many_categories(c, len(distinct))
            p["categorical"][c] = distinct
            fill[c] = values.mode().iloc[0]
        X = self._encode(frame)
        n = continuous_width(p)
        p["bounds"] = self._bounds(X, n) if not image else None
        if p["bounds"] is not None and cfg.outliers != "none":
            lo, hi = p["bounds"]
            X[:, :n] = np.clip(X[:, :n], lo, hi)
        p["scale"] = self._scaler(X, image, n)
        return self

    def _encode(self, frame: pd.DataFrame) -> np.ndarray:
        """The encoded matrix, each part written into its columns of one column-major
        array: a part's columns are then contiguous (half the time of joining parts
        into a row-major array); `transform` hands out rows contiguous again."""
        p = self.params
        dates = p.get("datetime", {})
        numeric, boolean = p["numeric"], p.get("boolean", [])
        X = np.empty((len(frame), len(self.encoded_names())), np.float64, order="F")
        steady = len(numeric)  # next column of the continuous part (dates' year, days)
        at = continuous_width(p)  # next column of the bounded part
        _fill_into(X[:, :steady], frame, numeric, p)
        _fill_into(X[:, at : at + len(boolean)], frame, boolean, p)
        at += len(boolean)
        for c, d in dates.items():
            years_days, cyclic = date_features(_filled(frame, [c], p)[:, 0], d["earliest"])
            X[:, steady : steady + 2] = years_days
            X[:, at : at + cyclic.shape[1]] = cyclic
            steady, at = steady + 2, at + cyclic.shape[1]
        for c, cats in p["categorical"].items():
            _one_hot_into(X[:, at : at + len(cats)], frame[c], cats, p["fill"][c])
            at += len(cats)
        for c, h in p.get("hashed", {}).items():
            X[:, at : at + h["width"]] = hashed(frame[c], h["kind"], h["width"])
            at += h["width"]
        assert at == X.shape[1], "encoded parts and encoded_names disagree"
        return X

    def _bounds(self, X: np.ndarray, n_numeric: int) -> list[list[float]] | None:
        if self.cfg.outliers == "none" or n_numeric == 0:
            return None
        num, t = X[:, :n_numeric], self.cfg.outlier_threshold
        if self.cfg.outliers == "zscore":
            mu, sd = num.mean(0), num.std(0)
            return [(mu - t * sd).tolist(), (mu + t * sd).tolist()]
        q1, q3 = np.percentile(num, 25, axis=0), np.percentile(num, 75, axis=0)
        return [(q1 - t * (q3 - q1)).tolist(), (q3 + t * (q3 - q1)).tolist()]

    def _scaler(self, X: np.ndarray, image: bool, n_continuous: int = 0) -> dict[str, Any]:
        kind = self.cfg.scaling
        if kind == "none" or X.size == 0:
            return {"kind": "none"}
        axis = None if image else 0  # images: one scalar keeps pixel relations intact
        if kind == "minmax":
            offset, scale = X.min(axis=axis), X.max(axis=axis) - X.min(axis=axis)
        else:
            offset, scale = X.mean(axis=axis), X.std(axis=axis)
        if kind == "robust" and not image and n_continuous:
            q1, median, q3 = np.percentile(X[:, :n_continuous], [25, 50, 75], axis=0)
            offset[:n_continuous], scale[:n_continuous] = median, q3 - q1
        scale = np.where(np.asarray(scale) > 1e-12, scale, 1.0)
        return {
            "kind": kind,
            "offset": np.atleast_1d(offset).tolist(),
            "scale": np.atleast_1d(scale).tolist(),
        }

    def outlier_mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows with any continuous feature outside the fitted bounds."""
        if self.params.get("bounds") is None:
            return np.zeros(len(frame), bool)
        n = continuous_width(self.params)
        num = self._encode(frame)[:, :n]
        lo, hi = (np.asarray(b) for b in self.params["bounds"])
        return ((num < lo) | (num > hi)).any(axis=1)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode, clip, keep the selected columns, scale."""
        return self._finished(self._encode(frame))

    def transform_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """`transform` of images given as their rows of values (``(n, C*H*W)`` finite
        numbers), without the frame of a column per value that `transform` reads: at
        224x224x3 that frame alone took seconds per image to build and encode. An
        image's pixels are all numeric and never missing, so their encoding is the values
        themselves in float64; the rest is `transform`'s."""
        return self._finished(np.array(pixels, np.float64))  # this call's own: changed in place

    def _finished(self, X: np.ndarray) -> np.ndarray:
        """Clip, keep the selected columns, scale the encoded float64 ``X`` (changed in
        place). Bounds and scaler are fitted on the full encoded width (before
        selection), so they are sliced like the columns."""
        if self.params.get("bounds") is not None:
            n = continuous_width(self.params)
            X[:, :n] = np.clip(X[:, :n], *self.params["bounds"])
        selected = self.selected()
        if selected is not None:
            X = X[:, selected]
        s = self.params["scale"]
        if s["kind"] != "none":  # in place: X is this call's own array, rows x features big
            X -= _picked(s["offset"], selected)
            X /= _picked(s["scale"], selected)
        return np.ascontiguousarray(X, np.float32)  # rows contiguous, as shards store them

    def selected(self) -> list[int] | None:
        """Indices into the encoded width of the columns `transform` outputs (feature
        selection, `kubetrain.data.feature_selection`); None: all (params without it)."""
        return self.params.get("selected")

    def feature_names(self) -> list[str]:
        """Names of the columns `transform` outputs (the selected encoded columns)."""
        names = self.encoded_names()
        selected = self.selected()
        return names if selected is None else [names[j] for j in selected]

    def sources(self) -> list[str]:
        """The source column of each encoded column, in `encoded_names` order: a one-hot
        group, a date's parts and a text column's hashed features share theirs."""
        p = self.params
        dates = list(p.get("datetime", {}))
        parts = len(DATETIME_PARTS)
        return [
            *p["numeric"],
            *(c for c in dates for _ in range(2)),
            *p.get("boolean", []),
            *(c for c in dates for _ in range(parts - 2)),
            *(c for c, cats in p["categorical"].items() for _ in cats),
            *(c for c, h in p.get("hashed", {}).items() for _ in range(h["width"])),
        ]

    def encoded_names(self) -> list[str]:
        """Names of every encoded column (before selection): what bounds and scaler cover."""
        p = self.params
        dates = list(p.get("datetime", {}))
        parts = [f"{c}:{part}" for c in dates for part in DATETIME_PARTS[2:]]
        return [
            *p["numeric"],
            *(f"{c}:{part}" for c in dates for part in DATETIME_PARTS[:2]),
            *p.get("boolean", []),
            *parts,
            *(f"{c}={v}" for c, cats in p["categorical"].items() for v in cats),
            *(name for c, h in p.get("hashed", {}).items() for name in feature_names(c, h["kind"])),
        ]


def _picked(values: list[float], selected: list[int] | None) -> np.ndarray:
    """A per-column scaler vector sliced to the selected columns (an image's one scalar
    stays as it is)."""
    v = np.asarray(values)
    return v if selected is None or v.size == 1 else v[selected]


def fill_params(types: Typing) -> dict[str, Any]:
    """The params' shape for a typing, before anything is fitted: which column goes where
    (fill values, categories and earliest dates are filled in by the fit)."""
    kept = {c: t for c, t in types.items() if t.kind not in DROPPED_KINDS}

    def of(*kinds: str) -> list[str]:  # in table order
        return [c for c, t in kept.items() if t.kind in kinds]

    return {
        "types": {c: t.kind for c, t in types.items()},
        "numeric": of(*NUMERIC_KINDS),
        "boolean": of("boolean"),
        "datetime": {c: {"how": kept[c].how, "earliest": 0.0} for c in of("datetime")},
        "categorical": {c: [] for c in of("categorical")},
        "hashed": {
            c: {"kind": kept[c].kind, "width": HASH_WIDTH[kept[c].kind]}
            for c in of("high_cardinality", "text")
        },
        "fill": {},
    }


def too_many_categories(c: str, n: int | str) -> KubetrainError:
    return KubetrainError(
        f"feature column {c!r} has {n} distinct text values (limit {MAX_CATEGORIES} for "
        f"categorical); pass --column-types {c}=high_cardinality (hashed) or drop it "
        f"(--drop-columns {c})"
    )


def clean(
    table_path: str, train_path: str, val_path: str, test_path: str, cfg: CleanConfig, seed: int
) -> dict[str, Any]:
    """The clean stage for a table that fits in memory: read once, then the streaming
    clean's passes (`kubetrain.data.clean_stream`) over the held batches, so both
    paths, and the Spark engine, dedupe, route and fit exactly alike. An image table
    takes `kubetrain.data.clean_images.clean_images`, whatever its size."""
    from kubetrain.data.clean_images import clean_images  # they build on this module
    from kubetrain.data.clean_stream import clean_streaming

    if is_image_table(table_path):
        return clean_images(table_path, train_path, val_path, test_path, cfg, seed)
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
        ("rows_dropped_rare_classes", "rows dropped: classes too rare to split"),
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
        "| split | rows | per class (regression: target mean ± std) |",
        "|---|---|---|",
    ]
    for name, s in splits.items():
        if "target" in s:  # a regression: the target's spread, stratified on its quantiles
            t = s["target"]
            per_class = f"{t['mean']:.4g} ± {t['std']:.4g} (min {t['min']:.4g}, max {t['max']:.4g})"
        else:  # class names are the user's data: inert text, not Markdown or HTML
            per_class = ", ".join(f"{md_text(k)}: {v}" for k, v in s["class_counts"].items())
        lines.append(f"| {name} | {s['rows']} | {per_class} |")
    lines += ["", f"Scaling: {stats['scaling']} (fitted on the training split only)."]
    lines += _columns_section(stats.get("column_types", {}), stats.get("column_notes", []))
    lines += _validation_section(stats)
    lines += _selection_section(stats)
    return "\n".join(lines) + "\n"


def _selection_section(stats: dict[str, Any]) -> list[str]:
    """The "Feature selection" section (absent from metadata written before it existed)."""
    return feature_selection.report_lines(stats, md_text, REPORT_COLUMNS)


def _validation_section(stats: dict[str, Any]) -> list[str]:
    """The "Data validation" section: the full result when the stage has it, else (an
    engine without statistics) the anomalies alone."""
    from kubetrain.data.validation import report_lines

    result = stats.get("validation") or (
        {"anomalies": stats["anomalies"]} if "anomalies" in stats else None
    )
    return report_lines(result, md_text, REPORT_COLUMNS) if result else []


def _columns_section(types: dict[str, str], notes: list[str]) -> list[str]:
    """The "Columns" table: each feature column's type and what clean did with it, then
    the notes (junk values, identifiers dropped, how to override)."""
    if not types:
        return []
    lines = ["", "## Columns", "", "| column | type | what was done |", "|---|---|---|"]
    for name, kind in list(types.items())[:REPORT_COLUMNS]:
        lines.append(f"| {md_text(name)} | {kind} | {ACTIONS.get(kind, kind)} |")
    if len(types) > REPORT_COLUMNS:
        lines.append(f"| ... | | {len(types) - REPORT_COLUMNS} more (stage metadata) |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {md_text(n)}" for n in notes]
    return lines
