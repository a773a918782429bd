"""Feature column types, inferred once from a bounded sample of the table.

Why: real tables hold dates, names, IDs, free text, booleans and numbers stored
as text with a few junk cells. One-hot encoding every text column either
refuses the table (over `MAX_CATEGORIES` values) or learns nothing from it, so
clean first decides what each column *is*, then encodes it accordingly
(`kubetrain.data.clean.Preprocessor`).

The decision is made once, before clean's first pass, from the first
`SAMPLE_ROWS` rows in table order, so it is deterministic and every engine
(in memory, streaming, Spark) types the columns alike. It looks at the format
of the values, never at the label; the statistics the encodings need (fill
values, the earliest date) are fitted later on the training split only.

Rules per feature column, in order (``n``: its non-missing values in the sample):

* no values: ``empty``; one distinct value: ``constant`` (both dropped);
* Arrow bool: ``boolean``; Arrow timestamp/date: ``datetime``;
* numbers: ``datetime`` when the column's name suggests time (``time``,
  ``date``, ``timestamp``, ``epoch``, ``_at``/``_ts`` suffix) and every value is
  a plausible epoch in seconds (1980-01-01 to 2100-01-01, `EPOCH_RANGE`);
  ``identifier`` when the name says ID (``id``, ``*_id``, ``*Id``, ``uuid``,
  ``guid``) and integer values are over `ID_DISTINCT` distinct; else ``numeric``;
* text: ``boolean`` when every value is one of true/false, yes/no, y/n, t/f,
  1/0, on/off (any case); ``numeric_text`` when at least `PARSE_SHARE` (90%)
  parse as numbers (the rest, the junk, become missing and are counted);
  ``datetime`` when at least 90% parse in one date format family
  (`DATE_FORMATS`: ISO 8601, 03/04/2021 month first, then day first, 04.03.2021,
  2021/03/04, 4 Mar 2021; the best-parsing family wins, month first on ties);
  ``categorical`` with at most `MAX_CATEGORIES` distinct values (unless they are
  unique per row, see identifier); ``text`` when values average at least
  `TEXT_TOKENS` (3) words; ``identifier`` when over `ID_DISTINCT` (95%) of the
  values are distinct (and at least `MIN_ID_VALUES`); else ``high_cardinality``.

Integer columns are identifiers only by name: continuous numbers are naturally
all distinct. Junk counts and examples are of the sample (for a table of up
to `SAMPLE_ROWS` rows, the whole table). A wide table samples at most
`SAMPLE_CELLS` cells. ``--column-types name=type`` overrides a column's type
and ``--drop-columns`` leaves a column out; image tables keep every pixel
column numeric.

Encodings (fitted on the training split, applied from JSON params, so serving
replays them): numbers, numbers as text and booleans (1/0) are filled and
scaled; a date becomes its year and the days since the earliest training date
(both continuous: outlier bounds apply) plus month, weekday and hour as sin/cos
pairs, its missing values filled like a number's (as epoch seconds); text and
high-cardinality columns become `HASH_WIDTH` hashed n-gram counts, L2-normalised
per row, with a tabulation hash whose table is derived from blake2b: the same
in every process (unlike Python's salted ``hash``) and vectorised with numpy
(1M rows of 45-character text: 5 to 12 s on a busy 2-core machine).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from kubetrain.core.errors import KubetrainError

#: Rows the types are inferred from: the first ones in table order ...
SAMPLE_ROWS = 50_000
#: ... but no more cells than this (a wide table samples fewer rows; never under 1,000).
SAMPLE_CELLS = 5_000_000
#: Most distinct text values a column may have to be one-hot encoded.
MAX_CATEGORIES = 100
#: Share of non-missing values that must parse for ``numeric_text`` / text ``datetime``.
PARSE_SHARE = 0.9
#: Share of distinct values above which a column is an ``identifier``.
ID_DISTINCT = 0.95
#: Fewest distinct values for the identifier rule (a tiny table's values are all unique).
MIN_ID_VALUES = 20
#: Distinct values each date format family is tried on before all of them.
DATE_PROBE = 500
#: Average words per value from which text is free ``text`` rather than names or codes.
TEXT_TOKENS = 3.0
#: Plausible epoch seconds of a time-named numeric column: 1980-01-01 to 2100-01-01.
EPOCH_RANGE = (315_532_800.0, 4_102_444_800.0)
#: Hashed features of a ``high_cardinality`` column (character 3-grams) and of ``text``
#: (word unigrams and bigrams): no vocabulary to fit, bounded width, stable everywhere.
HASH_WIDTH = {"high_cardinality": 32, "text": 64}
#: Junk values kept as examples for the report.
JUNK_EXAMPLES = 5

DROPPED_KINDS = ("identifier", "constant", "empty", "dropped")  # kinds left out of the output
NUMERIC_KINDS = ("numeric", "numeric_text")  # filled, clipped for outliers, scaled
DATETIME_PARTS = ("year", "days", "month_sin", "month_cos", "dow_sin", "dow_cos")
DATETIME_PARTS += ("hour_sin", "hour_cos")
#: How text dates are read, by format family; each family's formats are tried in order.
DATE_FORMATS: dict[str, tuple[str, ...]] = {
    "iso": ("ISO8601",),
    "mdy": ("%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y"),
    "dmy": ("%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%d/%m/%Y"),
    "dmy_dot": ("%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%d.%m.%Y"),
    "ymd_slash": ("%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M", "%Y/%m/%d"),
    "month_name": ("%d %b %Y", "%b %d %Y", "%b %d, %Y", "%d-%b-%Y", "%d %B %Y", "%B %d, %Y"),
}
NATIVE, EPOCH = "native", "epoch_s"  # datetime read from Arrow types / epoch seconds
TRUE_WORDS = frozenset({"true", "yes", "y", "t", "1", "on"})
FALSE_WORDS = frozenset({"false", "no", "n", "f", "0", "off"})
_BOOL = {**dict.fromkeys(TRUE_WORDS, 1.0), **dict.fromkeys(FALSE_WORDS, 0.0)}
_TIME_NAME = re.compile(r"time|date|epoch|(^|_)ts$|_at$", re.IGNORECASE)
_ID_NAME = re.compile(r"(?i:(^|[_\W])(id|uuid|guid)$|^(id|uuid|guid)[_\W])|[a-z](Id|ID)$")

ACTIONS = {
    "numeric": "filled, scaled",
    "numeric_text": "parsed as numbers (junk cells missing), filled, scaled",
    "boolean": "0/1, filled, scaled",
    "categorical": "one-hot",
    "high_cardinality": f"{HASH_WIDTH['high_cardinality']} hashed character 3-gram features",
    "text": f"{HASH_WIDTH['text']} hashed word 1-2-gram features",
    "datetime": "year, days since the earliest training date, cyclic month/weekday/hour",
    "identifier": "dropped",
    "constant": "dropped",
    "empty": "dropped",
    "dropped": "dropped (--drop-columns)",
}


@dataclass(frozen=True)
class ColumnType:
    """One feature column's type and how its values are read."""

    kind: str
    how: str = ""  # datetime: NATIVE, EPOCH or a `DATE_FORMATS` family
    note: str = ""  # one line for the report; empty for plain numeric/categorical columns
    forced: bool = False  # set by --column-types / --drop-columns, not inferred
    junk: int = 0  # sample values that did not parse (numeric_text, text datetime)
    examples: tuple[str, ...] = field(default=())  # up to JUNK_EXAMPLES of them


Typing = dict[str, ColumnType]


# --- the sample -------------------------------------------------------------------------


def read_sample(batches: Iterable[pd.DataFrame], rows: int = SAMPLE_ROWS) -> pd.DataFrame:
    """The first ``rows`` rows of the table (fewer for a wide one: `SAMPLE_CELLS`), the
    same rows whatever the batch size, so every engine infers the same types."""
    held: list[pd.DataFrame] = []
    have = 0
    for frame in batches:
        if not held:
            rows = min(rows, max(1_000, SAMPLE_CELLS // max(len(frame.columns), 1)))
        held.append(frame.iloc[: rows - have])
        have += len(held[-1])
        if have >= rows:
            break
    if not held:
        return pd.DataFrame()
    return pd.concat(held, ignore_index=True) if len(held) > 1 else held[0]


# --- inference --------------------------------------------------------------------------


def infer_types(
    sample: pd.DataFrame,
    arrow_schema: pa.Schema,
    features: list[str],
    image: bool = False,
    overrides: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
) -> Typing:
    """Every feature column's type: inferred from ``sample``, then the user's overrides."""
    overrides, drop = dict(overrides or {}), list(drop)
    _check_names(features, overrides, drop, image)
    if image:  # pixels: all numeric, none dropped (the image shape needs every one)
        return {c: ColumnType("numeric") for c in features}
    types = {}
    for c in features:
        arrow_type = arrow_schema.field(c).type
        values = sample[c] if c in sample.columns else pd.Series([], dtype=object)
        if c in drop:
            note = f"column {c!r}: dropped (--drop-columns)"
            types[c] = ColumnType("dropped", note=note, forced=True)
        elif c in overrides:
            types[c] = _forced(c, overrides[c], values, arrow_type)
        else:
            types[c] = infer_column(c, values, arrow_type)
    if all(t.kind in DROPPED_KINDS for t in types.values()):
        shown = ", ".join(f"{c}: {t.kind}" for c, t in list(types.items())[:6])
        raise KubetrainError(
            f"no feature column is left ({shown}{', ...' if len(types) > 6 else ''}); keep "
            "one with --column-types (e.g. id=categorical) or fewer --drop-columns"
        )
    return types


def _check_names(
    features: list[str], overrides: Mapping[str, str], drop: list[str], image: bool
) -> None:
    if image and (overrides or drop):
        raise KubetrainError(
            "--column-types and --drop-columns do not apply to an image table (every pixel "
            "column is a feature); leave them empty"
        )
    known = set(features)
    for flag, names in (("--column-types", list(overrides)), ("--drop-columns", drop)):
        for c in names:
            if c not in known:
                shown = ", ".join(features[:10]) + (", ..." if len(features) > 10 else "")
                raise KubetrainError(
                    f"{flag} names column {c!r}, which is not a feature column of the table "
                    f"(they are: {shown}); fix the name"
                )


def infer_column(name: str, values: pd.Series, arrow_type: pa.DataType) -> ColumnType:
    """The type of one column from its sample values and its Arrow type (rules: module doc)."""
    present = values.dropna()
    if len(present) == 0:
        return ColumnType("empty", note=f"column {name!r}: empty (no values sampled) — dropped")
    if pa.types.is_boolean(arrow_type):
        return _unless_constant(name, present, ColumnType("boolean"))
    if pa.types.is_temporal(arrow_type):
        return _unless_constant(
            name,
            present,
            ColumnType("datetime", NATIVE, f"column {name!r}: datetime — {ACTIONS['datetime']}"),
        )
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return _numeric_column(name, present.astype(np.float64))
    return _text_column(name, present.astype(str))


def _unless_constant(name: str, present: pd.Series, kind: ColumnType) -> ColumnType:
    if present.nunique() == 1:
        return _constant(name, present.iloc[0])
    return kind


def _constant(name: str, value: object) -> ColumnType:
    shown = str(value)[:40]
    return ColumnType("constant", note=f"column {name!r}: constant ({shown!r}) — dropped")


def _numeric_column(name: str, numbers: pd.Series) -> ColumnType:
    distinct = numbers.nunique()
    if distinct == 1:
        return _constant(name, numbers.iloc[0])
    lo, hi = EPOCH_RANGE
    if _TIME_NAME.search(name) and numbers.between(lo, hi).all():
        return ColumnType(
            "datetime", EPOCH, f"column {name!r}: datetime (epoch seconds) — {ACTIONS['datetime']}"
        )
    whole = bool((numbers == np.round(numbers)).all())
    if whole and _ID_NAME.search(name) and _unique(distinct, len(numbers)):
        return _identifier(name, distinct, len(numbers), "numeric")
    return ColumnType("numeric")


def _unique(distinct: int, n: int) -> bool:
    return distinct >= MIN_ID_VALUES and distinct > ID_DISTINCT * n


def _identifier(name: str, distinct: int, n: int, keep: str = "") -> ColumnType:
    keep = keep or ("categorical" if distinct <= MAX_CATEGORIES else "high_cardinality")
    return ColumnType(
        "identifier",
        note=f"column {name!r}: identifier ({_pct(distinct / n)} distinct) — dropped; pass "
        f"--column-types {name}={keep} to keep it",
    )


def _text_column(name: str, strings: pd.Series) -> ColumnType:
    distinct = strings.nunique()
    if distinct == 1:
        return _constant(name, strings.iloc[0])
    stripped = strings.str.strip()
    lowered = set(stripped.str.lower().unique())
    if lowered <= TRUE_WORDS | FALSE_WORDS:
        shown = "/".join(sorted(lowered))
        return ColumnType("boolean", note=f"column {name!r}: boolean ({shown}) — 1/0")
    parsed = pd.to_numeric(stripped, errors="coerce")
    share = float(parsed.notna().mean())
    if share >= PARSE_SHARE:
        return _parsed(name, "numeric_text", "", strings[parsed.isna().to_numpy()], share)
    family, share, bad = _best_date_family(stripped)
    if share >= PARSE_SHARE:
        return _parsed(name, "datetime", family, strings[bad], share)
    return _by_cardinality(name, strings, distinct)


def _by_cardinality(name: str, strings: pd.Series, distinct: int) -> ColumnType:
    n = len(strings)
    if distinct <= MAX_CATEGORIES and not _unique(distinct, n):
        return ColumnType("categorical")
    words = float(strings.str.count(r"\S+").mean())
    if words >= TEXT_TOKENS:
        return ColumnType(
            "text", note=f"column {name!r}: text ({words:.1f} words a value) — {ACTIONS['text']}"
        )
    if _unique(distinct, n):
        return _identifier(name, distinct, n)
    return ColumnType(
        "high_cardinality",
        note=f"column {name!r}: high_cardinality ({distinct} distinct values) — "
        f"{ACTIONS['high_cardinality']}",
    )


def _parsed(name: str, kind: str, how: str, junk: pd.Series, share: float) -> ColumnType:
    """A text column read as numbers or dates; its unparsed values are junk, reported."""
    counts = junk.value_counts()
    examples = tuple(str(v)[:40] for v in counts.index[:JUNK_EXAMPLES])
    what = "numbers" if kind == "numeric_text" else f"dates ({how})"
    note = f"column {name!r}: {kind} ({_pct(share)} parse as {what})"
    if len(junk):
        note += f" — {len(junk)} junk cell(s) in the sample become missing: " + ", ".join(
            map(repr, examples)
        )
    return ColumnType(kind, how, note, junk=len(junk), examples=examples)


def _best_date_family(strings: pd.Series) -> tuple[str, float, np.ndarray]:
    """(family, share parsed, mask of values it did not parse) of the best `DATE_FORMATS`
    family; ("", 0, all) when values hardly look like dates (no digit in most). Each
    family is first tried on `DATE_PROBE` distinct values, so non-dates cost little."""
    none = ("", 0.0, np.ones(len(strings), bool))
    if strings.str.contains(r"\d").mean() < PARSE_SHARE:
        return none
    probe = pd.Series(strings.unique()[:DATE_PROBE])
    best = none
    for family in DATE_FORMATS:
        if best[1] == 1.0:  # nothing parses more; ties keep the earlier family
            break
        if np.isnan(_parse_dates(probe, family)).mean() > 1 - PARSE_SHARE / 2:
            continue
        bad = np.isnan(_parse_dates(strings, family))
        share = 1.0 - float(bad.mean())
        if share > best[1]:
            best = (family, share, bad)
    return best


def _forced(name: str, kind: str, values: pd.Series, arrow_type: pa.DataType) -> ColumnType:
    """The type the user set; datetime still needs to know how to read the values."""
    note = f"column {name!r}: {kind} (set by --column-types) — {ACTIONS[kind]}"
    if kind != "datetime":
        return ColumnType(kind, note=note, forced=True)
    if pa.types.is_temporal(arrow_type):
        how = NATIVE
    elif pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        how = EPOCH
    else:
        how, share, _ = _best_date_family(values.dropna().astype(str).str.strip())
        if not how:
            raise KubetrainError(
                f"--column-types {name}=datetime: no sampled value of {name!r} reads as a date "
                f"in any known format ({', '.join(DATE_FORMATS)}); fix the column or its type"
            )
        note += f"; read as {how} ({_pct(share)} parse)"
    return ColumnType(kind, how, note, forced=True)


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%" if share < 1 else "100%"


def notes(types: Typing) -> list[str]:
    """One line per column worth a remark (everything but plain numbers and categories)."""
    return [t.note for t in types.values() if t.note]


def legacy_types(frame: pd.DataFrame) -> Typing:
    """The typing before column types existed: numeric dtypes numeric, the rest categorical
    (what `Preprocessor.fit` does on a frame without a typing)."""
    out = {}
    for c in frame.columns:
        col = frame[c]
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        out[c] = ColumnType("numeric" if numeric else "categorical")
    return out


# --- reading values (pure functions of the JSON params: transform and serving) --------


def to_float(col: pd.Series, kind: str, how: str = "") -> np.ndarray:
    """A numeric, numeric_text, boolean or datetime column as float64, NaN when missing,
    junk or infinite (datetime: seconds since 1970-01-01 UTC).

    inf and -inf count as missing: filled like any gap. Kept, they went through the
    scaler as inf (or NaN: inf - inf) and surfaced only as "training diverged"."""
    if kind == "datetime":
        return epoch_seconds(col, how)
    if kind == "boolean":
        return _booleans(col)
    return finite(raw_float(col))


def raw_float(col: pd.Series) -> np.ndarray:
    """A number (or numbers-as-text) column as float64, inf kept: what validation counts;
    junk and missing values are NaN."""
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(np.float64)
    if pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(np.float64, na_value=np.nan)
    text = _text(col).str.strip()  # numeric_text, or numbers stored as text
    return pd.to_numeric(text, errors="coerce").to_numpy(np.float64, na_value=np.nan)


def finite(values: np.ndarray) -> np.ndarray:
    """``values`` with inf and -inf made NaN (missing); the array itself when it has none."""
    inf = np.isinf(values)
    return np.where(inf, np.nan, values) if inf.any() else values


def _text(col: pd.Series) -> pd.Series:
    """Any column as pandas text, missing values kept missing."""
    if isinstance(col.dtype, pd.StringDtype):
        return col
    obj = col.astype(object)
    return obj.where(obj.isna(), obj.astype(str)).astype("str")


def _booleans(col: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(np.float64)
    if pd.api.types.is_numeric_dtype(col):
        v = col.to_numpy(np.float64, na_value=np.nan)
        return np.where(np.isnan(v), np.nan, (v != 0).astype(np.float64))
    words = _text(col).str.strip().str.lower()  # True/False objects read as "true"/"false"
    return words.map(_BOOL).to_numpy(np.float64, na_value=np.nan)


_EPOCH0 = pd.Timestamp(0, tz="UTC")


def epoch_seconds(col: pd.Series, how: str) -> np.ndarray:
    """Seconds since 1970-01-01 UTC (timezone-less values are taken as UTC); NaN when
    missing or unreadable."""
    if how == EPOCH:
        return to_float(col, "numeric")
    if how == NATIVE or pd.api.types.is_datetime64_any_dtype(col):
        stamps = pd.to_datetime(col, utc=True, errors="coerce")
        return (stamps - _EPOCH0).dt.total_seconds().to_numpy(np.float64, na_value=np.nan)
    return _parse_dates(_text(col).str.strip(), how)


def _parse_dates(text: pd.Series, family: str) -> np.ndarray:
    """Text dates read with each of the family's formats in turn (first match wins)."""
    out = np.full(len(text), np.nan)
    for fmt in DATE_FORMATS[family]:
        todo = np.isnan(out)
        if not todo.any():
            break
        stamps = pd.to_datetime(text[todo], format=fmt, utc=True, errors="coerce")
        out[todo] = (stamps - _EPOCH0).dt.total_seconds().to_numpy(np.float64, na_value=np.nan)
    return out


def date_features(seconds: np.ndarray, earliest: float) -> tuple[np.ndarray, np.ndarray]:
    """(continuous, cyclic) features of filled epoch seconds: [year, days since
    ``earliest``] and [month, day of week, hour of day] as sin/cos pairs, so December is
    next to January and 23:00 next to midnight."""
    days = np.floor(seconds / 86_400.0)
    as_days = np.clip(days, -1e7, 1e7).astype(np.int64).astype("datetime64[D]")
    year = as_days.astype("datetime64[Y]").astype(np.int64) + 1970.0
    month = as_days.astype("datetime64[M]").astype(np.int64) % 12  # 0 = January
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    hour = (seconds - days * 86_400.0) / 3_600.0
    continuous = np.column_stack([year, (seconds - earliest) / 86_400.0])
    cyclic = [_cycle(month, 12), _cycle(weekday, 7), _cycle(hour, 24)]
    return continuous, np.column_stack([a for pair in cyclic for a in pair])


def _cycle(values: np.ndarray, period: float) -> tuple[np.ndarray, np.ndarray]:
    angle = 2 * np.pi * values / period
    return np.sin(angle), np.cos(angle)


# --- hashed features ------------------------------------------------------------------

_POSITIONS = 64  # tabulation-hash table rows: a byte's position in its n-gram or word
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_UNIGRAM, _BIGRAM = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03)


@functools.cache
def _table() -> np.ndarray:
    """Random 64-bit words per (position, byte) for tabulation hashing, derived from
    blake2b of fixed labels: identical in every process, machine and library version
    (Python's ``hash`` is salted per process; numpy's generators may change streams)."""
    words = [
        np.frombuffer(
            hashlib.blake2b(f"kubetrain-ngram-{i}".encode(), digest_size=64).digest(), "<u8"
        )
        for i in range(_POSITIONS * 256 // 8)
    ]
    return np.concatenate(words).astype(np.uint64).reshape(_POSITIONS, 256)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * _M1
        h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def hashed(col: pd.Series, kind: str, width: int) -> np.ndarray:
    """Hashed n-gram counts of a text column, L2-normalised per row; missing values give
    zeros. ``high_cardinality``: character 3-grams of `` value `` (lower-cased UTF-8
    bytes, so names share parts: 'Smithson' ~ 'Smith'); ``text``: lower-cased word
    unigrams and bigrams. No vocabulary: any value, seen or not, maps into ``width``."""
    if width < 1 or width & (width - 1):
        raise KubetrainError(f"hash width {width} must be a power of two; fix HASH_WIDTH")
    codes, uniques = pd.factorize(_text(col))
    if not len(uniques):  # a batch where the column is all missing
        return np.zeros((len(col), width))
    values = uniques.str.replace("\0", " ", regex=False).tolist()  # NUL separates values
    if kind == "high_cardinality":
        rows, buckets = _char_trigrams(values, width)
    else:
        rows, buckets = _word_grams(values, width)
    counts = np.bincount(rows * width + buckets, minlength=len(values) * width)
    table = counts.reshape(len(values), width).astype(np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", table, table))
    table /= np.where(norm > 0, norm, 1.0)[:, None]
    if len(values) == len(codes):  # every value distinct, none missing: codes are 0..n-1
        return table
    out = table[codes]
    out[codes < 0] = 0.0  # missing values: no n-grams
    return out


def _buffer(values: list[str], pad: str) -> np.ndarray:
    """All values lower-cased as one UTF-8 byte array, each between NULs (one pass, no
    per-value Python work beyond the join)."""
    joined = "\0".join(f"{pad}{v}{pad}" for v in values).lower()
    return np.frombuffer(f"\0{joined}\0".encode("utf-8", "replace"), np.uint8)


def _value_of(data: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Index of the value each byte position belongs to (NULs before it)."""
    return np.searchsorted(np.flatnonzero(data == 0), positions) - 1  # data[0] is a NUL


def _char_trigrams(values: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    data = _buffer(values, " ")
    if len(data) < 5:  # NUL, at least 3 bytes, NUL
        return np.empty(0, np.int64), np.empty(0, np.int64)
    t = _table()
    a, b, c = data[:-2], data[1:-1], data[2:]
    at = np.flatnonzero((a != 0) & (b != 0) & (c != 0))
    h = _mix(t[0, a[at]] ^ t[1, b[at]] ^ t[2, c[at]])
    return _value_of(data, at), (h & np.uint64(width - 1)).astype(np.int64)


_WORD_BYTE = np.zeros(256, np.int8)
_WORD_BYTE[[*b"0123456789abcdefghijklmnopqrstuvwxyz_"]] = 1
_WORD_BYTE[0x80:] = 1  # any non-ASCII byte: letters of other scripts stay in words


def _word_grams(values: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    data = _buffer(values, "")
    word = _WORD_BYTE[data]  # data starts and ends with a NUL, not a word byte
    edges = np.flatnonzero(word[1:] != word[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]  # each word: [start, end) bytes
    if not len(starts):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    h = _word_hashes(data, starts, ends - starts)
    token_row = _value_of(data, starts)
    unigram = _mix(h ^ _UNIGRAM)
    same = token_row[:-1] == token_row[1:]  # bigrams stay inside one value
    with np.errstate(over="ignore"):
        rotated = (h[1:] << np.uint64(31)) | (h[1:] >> np.uint64(33))
    bigram = _mix(h[:-1] ^ rotated ^ _BIGRAM)[same]
    rows = np.concatenate([token_row, token_row[:-1][same]])
    buckets = np.concatenate([unigram, bigram]) & np.uint64(width - 1)
    return rows, buckets.astype(np.int64)


def _word_hashes(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Tabulation hash of every word: XOR of table[position, byte] over its bytes. One
    vectorised step per byte position, over the words still that long, so the work is
    the bytes once."""
    t = _table()
    h = np.zeros(len(starts), np.uint64)
    alive = np.arange(len(starts))
    k = 0
    while len(alive):
        h[alive] ^= t[k % _POSITIONS, data[starts[alive] + k]]
        k += 1
        alive = alive[lengths[alive] > k]
    return h


def feature_names(column: str, kind: str) -> list[str]:
    """Output feature names of a datetime or hashed column: 'when:year', 'name:h07'."""
    if kind == "datetime":
        return [f"{column}:{p}" for p in DATETIME_PARTS]
    return [f"{column}:h{i:02d}" for i in range(HASH_WIDTH[kind])]


__all__ = [
    "ColumnType",
    "Typing",
    "infer_types",
    "infer_column",
    "read_sample",
    "notes",
    "legacy_types",
    "to_float",
    "raw_float",
    "finite",
    "epoch_seconds",
    "date_features",
    "hashed",
    "feature_names",
]
