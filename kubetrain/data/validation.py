"""Data validation, like TFDV: a table's statistics, schema and anomalies.

Why: a table's problems (a number column with a few text cells, inf values,
a constant column, labels spelled "Yes" and "yes ", a column that gives the
label away) otherwise surface much later as a refused category, a diverged
training run or a suspiciously perfect model. Clean fixes what it can and
says so here; what it cannot fix stops the stage with one line.

Where each number comes from, and how exact it is:

* exact, over every raw row, in bounded memory: clean's first pass folds a
  `TableProfile` per record batch (rows, missing, inf, finite count / sum /
  min / max) and merges them in batch order. Distinct values are exact up to
  `DISTINCT_CAP` (then reported as ``"> cap"``), and so are the top values;
* from the column-type sample (the first `column_types.SAMPLE_ROWS` rows, the
  rows clean types the columns from): each column's type, its junk cells
  (mixed types), constant and empty columns, the top values of a column past
  `DISTINCT_CAP`, and, with the sample's train/test routing, the leakage and
  skew checks. Those stay bounded whatever the table's size, so they never
  slow the passes over a huge table;
* from ingest (the table schema's ``extra``): renamed header cells and label
  spellings merged by case.

Anomalies are `Anomaly` objects: ``severity`` is ``fatal`` (the stage stops,
`raise_fatal`), ``warning`` (nothing was changed; look at it) or ``handled``
(clean fixed it; the message says how).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kubetrain.core.errors import KubetrainError
from kubetrain.data.column_types import (
    DROPPED_KINDS,
    NUMERIC_KINDS,
    ColumnType,
    Typing,
    finite,
    raw_float,
    to_float,
)
from kubetrain.data.datasets import LABEL, LABEL_ALIASES, SKIPPED_ROWS, Schema

#: Distinct values counted exactly per column; past it, ``"> cap"`` (and top values come
#: from the sample).
DISTINCT_CAP = 1_000
#: Most frequent values shown per categorical or text column.
TOP_VALUES = 5
#: Leakage: a single-feature rule at least this accurate on the training sample ...
LEAK_ACCURACY = 0.99
#: ... while always guessing the majority class is right less often than this.
LEAK_MAJORITY = 0.9
#: Quantile bins a numeric feature is cut into for its single-feature rule: at least
#: `LEAK_BINS`, up to `MAX_LEAK_BINS` for a larger sample (a bin straddling the value
#: where the label flips costs up to half its rows, so 20 bins could hide a perfect leak
#: at 97.5%; bins of 1% of the rows keep that under 0.5%), about 10 rows a bin.
LEAK_BINS = 20
MAX_LEAK_BINS = 100
#: Fewest training rows in the sample for the leakage check (fewer: anything "predicts").
MIN_LEAK_ROWS = 200
#: Skew: train/test mean difference in training standard deviations (numeric columns) ...
SKEW_STD = 0.5
#: ... or L-infinity distance of value frequencies (categorical columns), as TFDV does.
SKEW_LINF = 0.2
#: Fewest rows of each split in the sample for the skew check.
MIN_SKEW_ROWS = 100
SEVERITIES = ("fatal", "warning", "handled")
#: Kinds whose values are compared as categories (per-value rule, frequency skew).
CATEGORY_KINDS = ("categorical", "boolean")


@dataclass(frozen=True)
class Anomaly:
    """One finding: which column, what kind, how bad, and one line on what was done."""

    column: str
    kind: str
    severity: str  # one of SEVERITIES
    message: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


# --- statistics, folded per batch ------------------------------------------------------


@dataclass
class ColumnProfile:
    """Exact statistics of one column, mergeable: counts, finite moments and, while they
    are at most `DISTINCT_CAP`, the exact count of every value (None past it)."""

    rows: int = 0
    missing: int = 0
    inf: int = 0
    count: int = 0  # finite numbers
    total: float = 0.0
    low: float = np.inf
    high: float = -np.inf
    counts: dict[Any, int] | None = field(default_factory=dict)

    def merge(self, other: ColumnProfile) -> ColumnProfile:
        self.rows += other.rows
        self.missing += other.missing
        self.inf += other.inf
        self.count += other.count
        self.total += other.total
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        if self.counts is not None and other.counts is not None:
            for value, n in other.counts.items():
                self.counts[value] = self.counts.get(value, 0) + n
            if len(self.counts) > DISTINCT_CAP:
                self.counts = None
        else:
            self.counts = None
        return self


def is_number(kind: str, col: pd.Series) -> bool:
    """Whether a column's statistics are numeric: numbers by type, or by dtype for a
    dropped column (an ID, a constant)."""
    if kind in NUMERIC_KINDS:
        return True
    dtype_numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    return kind in DROPPED_KINDS and dtype_numeric


def profile_column(col: pd.Series, kind: str, count_values: bool = True) -> ColumnProfile:
    """One batch's statistics of a column; ``count_values`` False once the column is
    known to be past `DISTINCT_CAP` (saves the counting)."""
    p = ColumnProfile(rows=len(col), missing=int(col.isna().sum()))
    values: pd.Series = col.dropna()
    if is_number(kind, col):
        numbers = raw_float(col)
        p.inf = int(np.isinf(numbers).sum())
        present = finite(numbers)
        present = present[~np.isnan(present)]
        p.count, p.total = len(present), float(present.sum())
        if len(present):
            p.low, p.high = float(present.min()), float(present.max())
        values = pd.Series(present)
    elif not isinstance(values.dtype, pd.StringDtype):
        values = values.astype(str)
    if not count_values or _past_cap(values):
        p.counts = None
        return p
    counts = values.value_counts(sort=False)
    p.counts = None if len(counts) > DISTINCT_CAP else {k: int(n) for k, n in counts.items()}
    return p


def _past_cap(values: pd.Series) -> bool:
    """Whether the batch's first values alone are over `DISTINCT_CAP` distinct: then so is
    the batch, and counting every value of it (100k floats of a continuous column, in
    each batch before the merged profile marks the column) is skipped."""
    head = values.iloc[: 4 * DISTINCT_CAP]
    return len(head) > DISTINCT_CAP and head.nunique() > DISTINCT_CAP


class TableProfile:
    """Every column's `ColumnProfile` (features by type, the label as text), folded batch
    by batch; columns past `DISTINCT_CAP` stop being counted in later batches."""

    def __init__(self, kinds: Mapping[str, str], over_cap: set[str] | None = None) -> None:
        self.kinds = dict(kinds)
        self.over_cap = over_cap if over_cap is not None else set()  # shared by every batch
        self.columns: dict[str, ColumnProfile] = {c: ColumnProfile() for c in self.kinds}

    @classmethod
    def of_types(cls, types: Typing) -> TableProfile:
        return cls({**{c: t.kind for c, t in types.items()}, LABEL: "label"})

    def empty(self) -> TableProfile:
        """A fresh profile sharing this one's columns and over-cap set (for one batch)."""
        return TableProfile(self.kinds, self.over_cap)

    def add(self, frame: pd.DataFrame) -> TableProfile:
        for c, kind in self.kinds.items():
            if c in frame.columns:
                one = profile_column(frame[c], kind, c not in self.over_cap)
                self.columns[c].merge(one)
        return self

    def merge(self, other: TableProfile) -> TableProfile:
        for c, p in other.columns.items():
            self.columns[c].merge(p)
            if self.columns[c].counts is None:
                self.over_cap.add(c)
        return self

    @property
    def rows(self) -> int:
        return max((p.rows for p in self.columns.values()), default=0)


# --- the result ------------------------------------------------------------------------


def column_statistics(
    profile: TableProfile, types: Typing, sample: pd.DataFrame
) -> dict[str, dict[str, Any]]:
    """Per column: type, missing %, distinct, min/max/mean (numbers) or the top values
    (categories and text; from the sample when the column is past `DISTINCT_CAP`)."""
    out = {}
    for c, p in profile.columns.items():
        kind = profile.kinds[c]
        row: dict[str, Any] = {
            "type": kind,
            "missing_pct": round(100 * p.missing / p.rows, 2) if p.rows else 0.0,
            "distinct": len(p.counts) if p.counts is not None else f"> {DISTINCT_CAP}",
        }
        if p.inf:
            row["inf"] = p.inf
        if p.count and (kind in NUMERIC_KINDS or kind in DROPPED_KINDS):
            # the mean to 12 digits: batch sums round differently in the last bit or two
            row.update(min=p.low, max=p.high, mean=float(f"{p.total / p.count:.12g}"))
        else:
            row["top"] = _top(p, sample[c] if c in sample.columns else None)
        out[c] = row
    return out


def _top(p: ColumnProfile, sampled: pd.Series | None) -> list[list[Any]]:
    if p.counts is not None:
        ranked = sorted(p.counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    elif sampled is not None:
        ranked = list(sampled.dropna().astype(str).value_counts().items())
    else:
        ranked = []
    return [[str(v), int(n)] for v, n in ranked[:TOP_VALUES]]


def validation_schema(types: Typing, schema: Schema) -> dict[str, Any]:
    """What a later stage or the server checks incoming rows against: the columns in
    table order with their types (dropped ones marked), the classes and label aliases."""
    return {
        "columns": [
            {"name": c, "type": t.kind, "dropped": t.kind in DROPPED_KINDS}
            for c, t in types.items()
        ],
        "classes": list(schema.class_names),
        LABEL_ALIASES: dict(schema.extra.get(LABEL_ALIASES, {})),
    }


def validate(
    types: Typing,
    schema: Schema,
    profile: TableProfile,
    sample: pd.DataFrame,
    split: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """The validation result (JSON): statistics, schema and anomalies. ``split`` (0 train,
    1 validation, 2 test, -1 dropped) and ``labels`` (class codes) are of the sample's
    rows; without them the leakage and skew checks are skipped."""
    anomalies = [*table_anomalies(types, schema, profile)]
    if split is not None and labels is not None and len(sample):
        anomalies += sample_anomalies(types, sample, split, labels)
    return {
        "rows": profile.rows,
        "statistics": column_statistics(profile, types, sample),
        "schema": validation_schema(types, schema),
        "anomalies": [a.to_json() for a in anomalies],
    }


def table_anomalies(types: Typing, schema: Schema, profile: TableProfile) -> list[Anomaly]:
    """Everything but the sample checks: ingest's fixes, types, inf, and what is fatal."""
    return [
        *header_anomalies(schema),
        *label_anomalies(schema),
        *type_anomalies(types),
        *inf_anomalies(profile),
        *fatal_anomalies(types, profile),
    ]


def sample_anomalies(
    types: Typing, sample: pd.DataFrame, split: np.ndarray, labels: np.ndarray
) -> list[Anomaly]:
    """Leakage (training rows of the sample) and train/test skew (train vs test rows)."""
    kept = {c: t for c, t in types.items() if t.kind not in DROPPED_KINDS and c in sample}
    train = split == 0
    found = leakage_anomalies(kept, sample[train], labels[train])
    found += skew_anomalies(kept, sample[train], sample[split == 2])
    return found


def raise_fatal(anomalies: Iterable[Mapping[str, str]]) -> None:
    """Stop with the first fatal anomaly's line (the CLI exits 2 on a KubetrainError)."""
    for a in anomalies:
        if a["severity"] == "fatal":
            raise KubetrainError(a["message"])


# --- the checks ------------------------------------------------------------------------


def header_anomalies(schema: Schema) -> list[Anomaly]:
    """Duplicate or empty header cells that ingest renamed as pandas does, and CSV rows
    it skipped for a wrong number of fields."""
    out = []
    skipped = schema.extra.get(SKIPPED_ROWS)
    if skipped:
        out.append(
            Anomaly(
                "",
                "malformed_rows",
                "handled",
                f"{skipped['count']} CSV row(s) had a different number of fields than the "
                f"header and were skipped (first: {skipped['examples'][0]!r}); quote values "
                "that hold the delimiter or newlines to keep them",
            )
        )
    for r in schema.extra.get("renamed_columns", []):
        shown = (
            "an empty header cell" if r["why"] == "empty" else f"duplicate header {r['header']!r}"
        )
        out.append(
            Anomaly(
                r["column"],
                f"{r['why']}_header",
                "handled",
                f"{shown} renamed to {r['column']!r} (as pandas does); give the column a "
                "unique name in the source to choose it",
            )
        )
    return out


def label_anomalies(schema: Schema) -> list[Anomaly]:
    """Label spellings that differ only by case, merged by ingest into one class."""
    merged: dict[str, list[str]] = {}
    for variant, kept in schema.extra.get(LABEL_ALIASES, {}).items():
        merged.setdefault(kept, []).append(variant)
    return [
        Anomaly(
            LABEL,
            "label_case_variants",
            "handled",
            f"labels {', '.join(map(repr, sorted(variants)))} differ from {kept!r} only by "
            f"case: merged into class {kept!r} (its most frequent spelling)",
        )
        for kept, variants in merged.items()
    ]


def type_anomalies(types: Typing) -> list[Anomaly]:
    """Mixed types (a number column with a few text cells), constant and empty columns."""
    out = []
    for c, t in types.items():
        if t.kind == "numeric_text" and t.junk:
            out.append(_mixed(c, t))
        elif t.kind == "constant" and not t.forced:
            out.append(Anomaly(c, "constant", "handled", f"column {c!r} is constant: dropped"))
        elif t.kind == "empty" and not t.forced:
            out.append(Anomaly(c, "all_missing", "handled", f"column {c!r} has no values: dropped"))
    return out


def _mixed(c: str, t: ColumnType) -> Anomaly:
    shown = ", ".join(map(repr, t.examples))
    return Anomaly(
        c,
        "mixed_types",
        "handled",
        f"numeric column {c!r} has {t.junk} text cell(s) in the sample ({shown}): treated as "
        f"missing; fix them in the source or pass --column-types {c}=categorical",
    )


def inf_anomalies(profile: TableProfile) -> list[Anomaly]:
    """inf / -inf in number columns: `column_types.to_float` reads them as missing."""
    return [
        Anomaly(
            c,
            "infinite_values",
            "handled",
            f"column {c!r} has {p.inf} inf/-inf value(s): treated as missing (filled)",
        )
        for c, p in profile.columns.items()
        if p.inf
    ]


def fatal_anomalies(types: Typing, profile: TableProfile) -> list[Anomaly]:
    """What clean cannot work around: no label values, or no kept feature column with a
    single usable value in the whole table."""
    out = []
    label = profile.columns.get(LABEL)
    if label is not None and label.rows and label.missing == label.rows:
        out.append(
            Anomaly(
                LABEL,
                "label_missing",
                "fatal",
                "the label column has no values; fill it (or pass the right --label-column) "
                "and ingest again",
            )
        )
    kept = [c for c, t in types.items() if t.kind not in DROPPED_KINDS]
    usable = [c for c in kept if _has_values(profile.columns.get(c), types[c].kind)]
    if profile.rows and not usable:
        out.append(
            Anomaly(
                "",
                "no_usable_feature",
                "fatal",
                f"no usable feature column is left (the {len(kept)} kept column(s) have no "
                "finite values); fix the source or keep a column with --column-types",
            )
        )
    return out


def _has_values(p: ColumnProfile | None, kind: str) -> bool:
    if p is None:
        return True  # not profiled (an engine without profiles): let the fit decide
    if kind in NUMERIC_KINDS:
        return p.count > 0
    return p.missing < p.rows


# --- leakage ---------------------------------------------------------------------------


def leakage_anomalies(types: Typing, train: pd.DataFrame, y: np.ndarray) -> list[Anomaly]:
    """A warning per feature whose best single-feature rule predicts the label almost
    perfectly (`rule_accuracy` >= `LEAK_ACCURACY`) although the majority class alone does
    not (< `LEAK_MAJORITY`): a copy of the label, or something known only after it."""
    if len(y) < MIN_LEAK_ROWS:
        return []
    majority = np.bincount(y).max() / len(y)
    if majority >= LEAK_MAJORITY:
        return []
    out = []
    for c, t in types.items():
        accuracy = rule_accuracy(train[c], y, t)
        if accuracy is not None and accuracy >= LEAK_ACCURACY:
            out.append(
                Anomaly(
                    c,
                    "leakage",
                    "warning",
                    f"column {c!r} alone predicts the label {accuracy:.1%} of the time "
                    f"(majority class: {majority:.0%}): a possible label leak; drop it "
                    f"(--drop-columns {c}) unless it is known at prediction time",
                )
            )
    return out


def rule_accuracy(col: pd.Series, y: np.ndarray, t: ColumnType) -> float | None:
    """Accuracy of the best rule on one feature: the majority label per value
    (categories) or per quantile bin (`LEAK_BINS` to `MAX_LEAK_BINS`, numbers and
    dates); missing values are a value of their own. None for hashed text (its values
    are too many to rule on) and for columns with over a value per 10 rows."""
    bins = min(MAX_LEAK_BINS, max(LEAK_BINS, len(col) // 10))
    keys = _rule_keys(col.reset_index(drop=True), t, bins)
    if keys is None or keys.nunique() > len(keys) / 10:
        return None
    pairs = pd.DataFrame({"key": keys.to_numpy(), "y": y})
    best = pairs.value_counts().groupby(level="key").max()
    return float(best.sum() / len(y))


def _rule_keys(col: pd.Series, t: ColumnType, bins: int) -> pd.Series | None:
    if t.kind in CATEGORY_KINDS:
        return col.astype(object).where(col.notna(), "\0missing").astype(str)
    if t.kind in (*NUMERIC_KINDS, "datetime"):
        values = pd.Series(to_float(col, t.kind, t.how))
        if values.notna().sum() == 0:
            return None
        binned = pd.qcut(values, bins, labels=False, duplicates="drop")
        return binned.fillna(-1).astype(np.int64)
    return None


# --- train/test skew -------------------------------------------------------------------


def skew(train: pd.Series, test: pd.Series, t: ColumnType) -> float | None:
    """How far a column's test values are from its training values: for numbers, the
    difference of the means in training standard deviations; for categories, the
    L-infinity distance of the value frequencies (TFDV's measure). None when it does not
    apply (text, no spread, no values)."""
    if t.kind in (*NUMERIC_KINDS, "datetime"):
        a = pd.Series(to_float(train, t.kind, t.how)).dropna()
        b = pd.Series(to_float(test, t.kind, t.how)).dropna()
        sd = float(a.std(ddof=0)) if len(a) else 0.0
        if not len(b) or sd <= 1e-12:
            return None
        return abs(float(a.mean()) - float(b.mean())) / sd
    if t.kind in CATEGORY_KINDS:
        p = train.dropna().astype(str).value_counts(normalize=True)
        q = test.dropna().astype(str).value_counts(normalize=True)
        if not len(p) or not len(q):
            return None
        return float(p.sub(q, fill_value=0.0).abs().max())
    return None


def skew_anomalies(types: Typing, train: pd.DataFrame, test: pd.DataFrame) -> list[Anomaly]:
    """A warning per column whose test values drift from its training values."""
    if len(train) < MIN_SKEW_ROWS or len(test) < MIN_SKEW_ROWS:
        return []
    out = []
    for c, t in types.items():
        measure = skew(train[c], test[c], t)
        numeric = t.kind in (*NUMERIC_KINDS, "datetime")
        limit = SKEW_STD if numeric else SKEW_LINF
        if measure is None or measure <= limit:
            continue
        what = "train/test means differ by" if numeric else "value frequencies differ by"
        unit = " training standard deviations" if numeric else " (L-infinity)"
        out.append(
            Anomaly(
                c,
                "train_test_skew",
                "warning",
                f"column {c!r}: {what} {measure:.2f}{unit}, over {limit}: the test split "
                "does not look like the training split; check the source for drift",
            )
        )
    return out


# --- the report ------------------------------------------------------------------------


def report_lines(result: Mapping[str, Any], md: Any, limit: int = 100) -> list[str]:
    """The "Data validation" section: per-column statistics, then one line per anomaly.
    ``md`` makes the user's text inert Markdown (`kubetrain.core.markdown.md_text`)."""
    stats = result.get("statistics", {})
    lines = ["", "## Data validation", ""]
    if stats:
        lines += [
            "| column | type | missing % | distinct | min | max | mean | top values |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for c, s in list(stats.items())[:limit]:
        lines.append(_stat_row(c, s, md))
    if len(stats) > limit:
        lines.append(f"| ... | | | | | | | {len(stats) - limit} more (validation.json) |")
    anomalies = result.get("anomalies", [])
    lines += ["", f"Anomalies: {len(anomalies) or 'none'}", ""]
    lines += [f"- **{a['severity']}** {a['kind']}: {md(a['message'])}" for a in anomalies]
    return lines


def _stat_row(c: str, s: Mapping[str, Any], md: Any) -> str:
    def num(key: str) -> str:
        return f"{s[key]:.4g}" if key in s else ""

    top = ", ".join(f"{md(v)} ({n})" for v, n in s.get("top", []))
    name = md(c)
    return (
        f"| {name} | {s['type']} | {s['missing_pct']:g} | {s['distinct']} | {num('min')} | "
        f"{num('max')} | {num('mean')} | {top} |"
    )


__all__ = [
    "Anomaly",
    "ColumnProfile",
    "TableProfile",
    "validate",
    "raise_fatal",
    "rule_accuracy",
    "skew",
    "report_lines",
]
