"""Ingest: turn a data source into one canonical, validated table, in bounded memory.

Sources: datasets that ship with scikit-learn (digits as 8x8 images,
breast_cancer and wine as tables), local CSV / Parquet / NPZ files, and
``s3://`` URIs. CSV and Parquet are streamed record batch by record batch
(pyarrow's streaming CSV reader, ``ParquetFile.iter_batches``; on S3 through
pyarrow's S3 filesystem, configured like every other stage), so a source
larger than memory ingests holding one batch plus per-class counts: the table
goes to disk part by part (`kubetrain.data.datasets.table_writer`) and is
published only once every row has been read and checked. NPZ archives and the
built-in datasets are read whole (numpy archives cannot be streamed; an NPZ on
S3 is downloaded first) and written the same way.

CSV files read as ``pandas.read_csv`` read them, where a user would notice:
its missing-value markers (``NA``, ``N/A``, ``null``, empty, ...), duplicate
column names made unique (``a``, ``a.1``), dates kept as text, an empty column
as float. pyarrow infers column types from the first block only; when a later
block does not convert (a number column with text at row 9,000,000), the read
starts over with that column widened (to float64 for numbers, else to text),
which is what pandas makes of such a column.

Labels lose surrounding whitespace; labels that then differ only by case are one
class, spelled as the most frequent variant (the schema's ``label_aliases``,
applied by every table reader). Renamed header cells are recorded in the schema's
``renamed_columns``; clean's validation reports both as handled anomalies.

Every problem a user can cause ends in one `KubetrainError` line, and nothing
is published.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kubetrain.config.settings import BUILTIN_DATASETS, CONTINUOUS_CLASSES, CONTINUOUS_SHARE
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data.datasets import (
    LABEL,
    LABEL_ALIASES,
    SKIPPED_ROWS,
    ContentHash,
    Schema,
    load_table,
    table_writer,
)
from kubetrain.data.image_ingest import ImageOptions, ingest_images
from kubetrain.data.image_sources import is_image_source

FILE_TYPES = (".csv", ".parquet", ".pq", ".npz")
LABEL_GUESSES = ("label", "target", "class", "y")
#: CSV text parsed per block (pyarrow's default). Column types are inferred from the
#: first block; memory grows with it (about 35x a block at peak), speed hardly does.
CSV_BLOCK_BYTES = 1 << 20
#: The largest block tried for a CSV whose rows are longer than a block (very wide tables).
MAX_CSV_BLOCK_BYTES = 256 << 20
#: Bytes read from the file at once (per column, for Parquet): on S3 each read is a request.
READ_BUFFER_BYTES = 8 << 20
#: Rows ingest handles at once (converted, counted, hashed, written).
BATCH_ROWS = 65_536
#: A progress line every this many batches.
PROGRESS_EVERY = 16
#: What ``pandas.read_csv`` reads as missing (its ``na_values``); pyarrow's own list
#: lacks ``<NA>`` and ``None``.
NULL_VALUES = [
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
]
_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)(?:: (.*))?", re.S)
_INVALID_VALUE = re.compile(r"invalid value '(.*)'$", re.S)
_NOT_FOUND = (
    "not found; pass an existing .csv/.parquet/.npz file, an s3:// URI or a built-in "
    f"dataset ({', '.join(BUILTIN_DATASETS)})"
)


# --- the plan and the tally ------------------------------------------------------------


@dataclass
class _Plan:
    """How a source's batches become canonical rows: its label and feature columns."""

    shown_as: str
    label: str  # the source's column that holds the labels
    features: list[str]
    kind: str = "table"
    image_shape: list[int] | None = None
    class_names: list[str] | None = None  # fixed (built-ins); None: sorted from the labels
    #: Header cells renamed as pandas renames them: {"column", "header", "why"} each.
    renamed: list[dict[str, str]] = field(default_factory=list)
    #: Text of the CSV rows skipped for a wrong number of fields (see `_CsvRead`).
    bad_rows: list[str] = field(default_factory=list)
    task: str = "auto"  # the requested task (`decide_task` settles "auto")


@dataclass
class _Tally:
    """What ingest reports, accumulated batch by batch."""

    rows: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    #: More than `MAX_COUNTED_LABELS` distinct labels: the counting stopped.
    uncounted: bool = False
    #: The first label that is not a number (None: every label is one so far).
    text_label: str | None = None
    missing: int = 0
    missing_labels: int = 0
    first_missing_label: int = -1
    digest: ContentHash | None = None


class _Widen(Exception):  # noqa: N818 - a signal to read again, not an error
    """A later CSV block did not convert a column to its inferred type."""

    def __init__(self, column: str, current: pa.DataType, value: str | None) -> None:
        super().__init__(column)
        self.column, self.current, self.value = column, current, value


class _Malformed(Exception):  # noqa: N818 - turned into a KubetrainError by the caller
    """A CSV row that does not parse (the wrong number of fields)."""


class _LongRow(Exception):  # noqa: N818 - a signal to read again with bigger blocks
    """A CSV row longer than a block (pyarrow parses rows within one block)."""


@dataclass
class _CsvRead:
    """What the reads of a CSV so far have taught the next one."""

    block_bytes: int  # CSV text parsed at once: every row must fit in one block
    column_types: dict[str, pa.DataType] = field(default_factory=dict)  # forced types
    renamed: list[dict[str, str]] = field(default_factory=list)  # `_renames` of the header
    #: Rows whose field count differs from the header's, skipped (`_skip_bad_row`).
    bad_rows: list[str] = field(default_factory=list)

    def skip_bad_row(self, row: Any) -> str:
        """pyarrow's invalid-row handler: skip the row and keep its text for the report.
        Real exports break rows (a newline inside an unquoted tweet); one bad row should
        not cost the table, but many mean a wrong file, which `_check_bad_rows` refuses."""
        self.bad_rows.append(row.text if len(row.text) <= 60 else row.text[:60] + "...")
        return "skip"


# --- entry points ----------------------------------------------------------------------


def ingest(
    source: str,
    label_column: str,
    out_path: str,
    fingerprint: str = "",
    task: str = "auto",
    images: ImageOptions | None = None,
) -> dict[str, Any]:
    """The ingest stage: read, validate and write the table; returns artifact metadata.

    `fingerprint` is not read: the caller passes a hash of a local file's
    content so that KFP's cache key changes when the file does. `task` (auto,
    classification, regression) is decided here, once, and travels in the schema.
    """
    started = time.perf_counter()
    if source not in BUILTIN_DATASETS and is_image_source(source, label_column):
        require(task != "regression", f"{source} holds images: its labels are classes")
        return ingest_images(source, label_column, out_path, images)  # image_ingest.py
    if source in BUILTIN_DATASETS:
        require(
            task != "regression",
            f"the built-in dataset {source!r} has classes, not a number to predict; "
            "drop --task regression or point --dataset at your table",
        )
        frame, schema = _load_builtin(source)
        tally, schema = _ingest_frame(frame, schema, source, out_path)
    elif _suffix(source) == ".npz":
        frame, schema = _load_npz_source(source)
        tally, schema = _ingest_frame(frame, schema, source, out_path)
    else:
        tally, schema = _ingest_stream(source, label_column, out_path, started, task)
    assert tally.digest is not None
    return {
        "stage": "ingest",
        "source": source,
        "kind": schema.kind,
        "task": schema.task,
        "rows": tally.rows,
        "features": len(schema.feature_names),
        "classes": schema.class_names,
        "class_counts": {c: int(tally.counts.get(c, 0)) for c in schema.class_names},
        "content_hash": tally.digest.hexdigest(),
        "image_shape": schema.image_shape or [],
        "missing_values": tally.missing,
        **{
            k: schema.extra[k]
            for k in ("renamed_columns", LABEL_ALIASES, SKIPPED_ROWS)
            if k in schema.extra
        },
        "seconds": round(time.perf_counter() - started, 3),
    }


def load_source(source: str, label_column: str = "") -> tuple[pd.DataFrame, Schema]:
    """Read `source` into a frame whose label column is `LABEL`, plus its schema.

    The whole table in memory, for small sources and tests; CSV and Parquet go
    through `ingest` (into a temporary directory), so they are validated too.
    """
    if source in BUILTIN_DATASETS:
        return _load_builtin(source)
    if _suffix(source) == ".npz":
        return _load_npz_source(source)
    with tempfile.TemporaryDirectory(prefix="kubetrain-ingest-") as tmp:
        ingest(source, label_column, str(Path(tmp) / "table"))
        return load_table(Path(tmp) / "table")


def validate(rows: int, schema: Schema, shown_as: str) -> None:
    """Checks every source must pass before its table is published."""
    require(rows > 0, f"{shown_as} has no rows; give at least a few rows per class")
    require(
        schema.regression or len(schema.class_names) >= 2,
        f"{shown_as} has only one class ({(schema.class_names or ['?'])[0]!r}) in its "
        "labels; a classifier needs at least two",
    )
    if schema.image_shape:
        require(
            int(np.prod(schema.image_shape)) == len(schema.feature_names),
            f"{shown_as}: image shape {schema.image_shape} does not match "
            f"{len(schema.feature_names)} pixel columns",
        )


#: Distinct label values counted exactly; a label with more is no set of classes
#: (counting on would hold every distinct value of a 10M-row measurement in memory).
MAX_COUNTED_LABELS = 100_000


def decide_task(requested: str, tally: _Tally, shown_as: str) -> str:
    """classification or regression: as requested, or for ``auto`` regression when the
    label is numeric with many distinct values (`CONTINUOUS_CLASSES`, `CONTINUOUS_SHARE`)."""
    distinct = MAX_COUNTED_LABELS + 1 if tally.uncounted else len(tally.counts)
    many = tally.uncounted or distinct > max(CONTINUOUS_CLASSES, CONTINUOUS_SHARE * tally.rows)
    if requested == "regression" or (requested == "auto" and many and tally.text_label is None):
        require(
            tally.text_label is None,
            f"the label column of {shown_as} holds {tally.text_label!r}, not a number; "
            "regression needs numeric labels (fix or drop those rows, or use --task "
            "classification)",
        )
        require(
            distinct >= 2,
            f"the label column of {shown_as} has a single value; there is nothing to predict",
        )
        return "regression"
    require(
        not tally.uncounted,
        f"the label column of {shown_as} has over {MAX_COUNTED_LABELS:,} distinct values: "
        "too many to be classes; pick a categorical label column (or --task regression "
        "for numeric labels)",
    )
    require(
        not (many and tally.text_label is None),
        f"the label column of {shown_as} holds {distinct} distinct numbers in "
        f"{tally.rows} rows: a measurement, not classes; use --task regression (or auto), "
        "or bin it into classes (e.g. low/mid/high)",
    )
    return "classification"


# --- writing: one loop for every source ------------------------------------------------


def _write(
    batches: Iterable[pa.RecordBatch],
    plan: _Plan,
    source: str,
    out_path: str,
    report: Callable[[int], None] = lambda rows: None,
) -> tuple[_Tally, Schema]:
    """Write the canonical rows of `batches` as the table at `out_path`; nothing is
    published unless every row was read and the labels and schema pass `validate`."""
    tally = _Tally()
    with table_writer(out_path, Schema(plan.kind, plan.features, [])) as writer:
        for i, batch in enumerate(batches, 1):
            rows = _canonical(batch, plan, tally)
            if rows is not None:
                writer.write(rows)
            if i % PROGRESS_EVERY == 0:
                report(tally.rows)
        _check_labels(tally, plan)
        _check_bad_rows(plan, tally.rows)
        task = "classification" if plan.class_names else decide_task(plan.task, tally, source)
        if task == "regression":
            aliases, classes = {}, []
            progress.log("ingest", "the label is a number to predict: task regression")
        else:
            aliases = {} if plan.class_names else _merge_case_variants(tally.counts)
            classes = plan.class_names or _ordered_classes(pd.Series(list(tally.counts)))
        schema = Schema(
            plan.kind,
            plan.features,
            classes,
            plan.image_shape,
            _extra(source, plan, aliases),
            task=task,
        )
        validate(tally.rows, schema, plan.shown_as)
        writer.schema = schema
    return tally, schema


#: Malformed CSV rows skipped before the file counts as wrong: this share of its rows...
BAD_ROWS_SHARE = 0.01
#: ...and never more than this many.
MAX_BAD_ROWS = 1000


def _check_bad_rows(plan: _Plan, rows: int) -> None:
    """A few broken rows are skipped and reported; many mean a wrong delimiter or a
    file that is not the table, which fails naming the first bad row."""
    bad = len(plan.bad_rows)
    if bad and (bad > MAX_BAD_ROWS or bad > BAD_ROWS_SHARE * (rows + bad)):
        raise _Malformed(f"{bad} rows have the wrong number of fields")
    if bad:
        progress.log(
            "ingest",
            f"skipped {bad} row(s) whose number of fields differs from the header's "
            f"(first: {plan.bad_rows[0]!r}); reported in the data validation",
        )


def _extra(source: str, plan: _Plan, aliases: dict[str, str]) -> dict[str, Any]:
    """The schema's ``extra``: the source, and what ingest changed so validation reports it
    (``renamed_columns``) and readers apply it (``label_aliases``)."""
    extra: dict[str, Any] = {"source": source}
    if plan.renamed:
        extra["renamed_columns"] = plan.renamed
    if plan.bad_rows:
        extra[SKIPPED_ROWS] = {"count": len(plan.bad_rows), "examples": plan.bad_rows[:3]}
    if aliases:
        extra[LABEL_ALIASES] = aliases
    return extra


def _merge_case_variants(counts: Counter[str]) -> dict[str, str]:
    """Labels that differ only by case ("Yes", "yes", "YES") folded into their most
    frequent spelling (ties: the first in sort order), in ``counts`` too; returns
    {variant: spelling}. The rows keep the variant as read (they are written already,
    batch by batch); `kubetrain.data.datasets` readers apply the aliases, so a variant
    never becomes a class of its own."""
    groups: dict[str, list[str]] = {}
    for label in counts:
        groups.setdefault(label.casefold(), []).append(label)
    aliases: dict[str, str] = {}
    for spellings in groups.values():
        if len(spellings) < 2:
            continue
        keep = min(spellings, key=lambda s: (-counts[s], s))
        for variant in spellings:
            if variant != keep:
                aliases[variant] = keep
                counts[keep] += counts.pop(variant)
    return aliases


def _canonical(batch: pa.RecordBatch, plan: _Plan, tally: _Tally) -> pa.RecordBatch | None:
    """The batch's features plus its labels as text (`LABEL`), counted into `tally`.

    After the first missing label nothing is written or hashed any more: the
    ingest will fail, the rest of the source is only read to count them.
    """
    labels = batch.column(plan.label)
    missing = pc.is_null(labels, nan_is_null=True)
    n_missing = pc.sum(missing).as_py() or 0
    if n_missing and not tally.missing_labels:
        tally.first_missing_label = tally.rows + pc.index(missing, True).as_py()
    tally.missing_labels += n_missing
    tally.rows += batch.num_rows
    if tally.missing_labels:
        return None
    texts = _label_texts(labels)
    _count_labels(labels, texts, tally)
    columns = [_plain(batch.column(name)) for name in plan.features]
    tally.missing += sum(pc.sum(pc.is_null(c, nan_is_null=True)).as_py() or 0 for c in columns)
    rows = pa.RecordBatch.from_arrays([*columns, texts], names=[*plan.features, LABEL])
    if tally.digest is None:
        tally.digest = ContentHash(rows.schema.names, _numeric(rows.schema))
    tally.digest.update(rows.to_pandas())
    return rows


def _count_labels(labels: pa.Array, texts: pa.Array, tally: _Tally) -> None:
    """Count the labels per value (up to `MAX_COUNTED_LABELS` values), and note the first
    that is not a number: together they decide the task (`decide_task`)."""
    if tally.text_label is None:
        kind = _plain(labels).type
        if pa.types.is_floating(kind):
            infinite = pc.is_inf(_plain(labels))
            tally.text_label = "inf" if pc.any(infinite).as_py() else None
        elif not pa.types.is_integer(kind):
            tally.text_label = _first_non_number(texts)
    if tally.uncounted:
        return
    for item in pc.value_counts(texts).to_pylist():
        tally.counts[item["values"]] += item["counts"]
    if len(tally.counts) > MAX_COUNTED_LABELS:
        tally.uncounted = True
        tally.counts.clear()


def _first_non_number(texts: pa.Array) -> str | None:
    """The first distinct label that is not a finite number, or None."""
    for value in pc.unique(texts).to_pylist():
        if not (_is_number(value) and math.isfinite(float(value))):
            return value
    return None


def _plain(column: pa.Array) -> pa.Array:
    """Dictionary-encoded columns (Parquet categories) as their values: each batch has its
    own dictionary, and the parts of a table must share one schema."""
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _numeric(schema: pa.Schema) -> list[str]:
    """Columns pandas reads as numbers (integers and floats; booleans are not)."""
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]


def _label_texts(labels: pa.Array) -> pa.Array:
    """Labels as text, `_label_text` per distinct value (few: they are classes), without
    surrounding whitespace ("yes " is "yes": a stray space must not make a class)."""
    labels = _plain(labels)
    if pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type):
        return pc.utf8_trim_whitespace(labels.cast(pa.string()))
    encoded = pc.dictionary_encode(labels)
    texts = pa.array([_label_text(v) for v in encoded.dictionary.to_pylist()], pa.string())
    return texts.take(encoded.indices)


def _check_labels(tally: _Tally, plan: _Plan) -> None:
    if tally.missing_labels:
        raise KubetrainError(
            f"label column {plan.label!r} in {plan.shown_as} has {tally.missing_labels} "
            f"missing value(s) (first at row {tally.first_missing_label}); fill or drop those rows"
        )


def _plan(columns: list[str], label_column: str, shown_as: str, task: str) -> _Plan:
    """Which column holds the labels (given, or guessed by name) and which are features."""
    if not label_column:
        guesses = [c for c in columns if c.lower() in LABEL_GUESSES]
        require(
            bool(guesses),
            f"{shown_as} has no label column named {'/'.join(LABEL_GUESSES)}; pass "
            f"--label-column with one of: {_preview(columns)}",
        )
        label_column = guesses[0]
    require(
        label_column in columns,
        f"label column {label_column!r} not in {shown_as}; columns are: "
        f"{_preview(columns)} (pass --label-column NAME)",
    )
    features = [c for c in columns if c != label_column]
    require(bool(features), f"{shown_as} has only the label column; add feature columns")
    require(
        LABEL not in features,
        f"{shown_as} has a feature column named {LABEL!r} besides the label column "
        f"{label_column!r}; rename that column (or pass --label-column {LABEL})",
    )
    return _Plan(shown_as, label_column, features, task=task)


# --- streamed sources: CSV and Parquet, local or on S3 ---------------------------------


@dataclass
class _File:
    """A CSV or Parquet source: how to open it (again: a CSV may be read more than once)."""

    shown_as: str
    suffix: str
    size: int
    open: Callable[[], pa.NativeFile]  # a fresh random-access file (a CSV may be read again)
    errors: Callable[[], contextlib.AbstractContextManager[Any]]  # S3/OS errors as one line


def _ingest_stream(
    source: str, label_column: str, out_path: str, started: float, task: str
) -> tuple[_Tally, Schema]:
    file = _open_file(source)
    with file.errors():
        if file.suffix == ".csv":
            return _ingest_csv(file, label_column, out_path, started, task)
        return _ingest_parquet(file, label_column, out_path, started, task)


def _open_file(source: str) -> _File:
    """The source file, checked to exist and to be of a type ingest reads."""
    if source.startswith("s3://"):
        from kubetrain.data import shards  # pyarrow's S3 filesystem, configured from env

        fs, key = shards._s3(source)  # checks the URI first
        suffix = _checked_suffix(source)
        with shards._s3_errors(source):
            info = fs.get_file_info(key)
        require(info.type == pafs.FileType.File, f"dataset {source} {_NOT_FOUND}")
        return _File(
            source,
            suffix,
            int(info.size or 0),
            lambda: fs.open_input_file(key),
            _s3_error_lines(source),
        )
    path = Path(source)
    suffix = _checked_suffix(source)
    require(path.is_file(), f"dataset {source} {_NOT_FOUND}")
    return _File(
        source,
        suffix,
        path.stat().st_size,
        lambda: pa.OSFile(str(path)),
        _local_error_lines(source),
    )


def _s3_error_lines(source: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    from kubetrain.data import shards

    return lambda: shards._s3_errors(source)


def _local_error_lines(shown_as: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    @contextlib.contextmanager
    def errors() -> Iterator[None]:
        try:
            yield
        except KubetrainError:
            raise
        except OSError as exc:
            raise KubetrainError(
                f"cannot read {shown_as}: {_first_line(exc)}; check that the file is readable"
            ) from None

    return errors


def _ingest_parquet(
    file: _File, label_column: str, out_path: str, started: float, task: str
) -> tuple[_Tally, Schema]:
    with contextlib.closing(file.open()) as handle:
        return _parquet_from(handle, file, label_column, out_path, started, task)


def _parquet_from(
    handle: pa.NativeFile,
    file: _File,
    label_column: str,
    out_path: str,
    started: float,
    task: str,
) -> tuple[_Tally, Schema]:
    remote = file.shown_as.startswith("s3://")
    try:
        # pre_buffer would read ahead whole row groups (hundreds of MiB); buffered reads
        # keep memory to a batch, whatever the row groups' size
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        schema = parquet.schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        if remote and not isinstance(exc, pa.ArrowInvalid):
            raise
        raise _cannot_parse(file.shown_as, exc) from None
    index = (schema.pandas_metadata or {}).get("index_columns", [])  # pandas' stored index
    columns = [n for n in schema.names if n not in {c for c in index if isinstance(c, str)}]
    total = parquet.metadata.num_rows
    require(
        bool(columns) and total > 0,
        f"{file.shown_as} is empty (no rows); give a table with a header and data rows",
    )
    plan = _plan(columns, label_column, file.shown_as, task)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:  # OSError: a page that does not decode
            if remote and not isinstance(exc, pa.ArrowInvalid):
                raise  # the network: `_s3_errors` says so
            raise _cannot_parse(file.shown_as, exc) from None

    def report(rows: int) -> None:
        _log_progress(started, rows, rows, total)

    return _write(batches(), plan, file.shown_as, out_path, report)


def _ingest_csv(
    file: _File, label_column: str, out_path: str, started: float, task: str
) -> tuple[_Tally, Schema]:
    """Read (and write) the CSV, again with a column widened each time a later block does
    not convert to the type inferred from the first (or with bigger blocks when a row is
    longer than one)."""
    read = _CsvRead(block_bytes=CSV_BLOCK_BYTES)
    while True:
        try:
            return _csv_attempt(file, label_column, out_path, started, read, task)
        except _LongRow:
            require(
                read.block_bytes * 4 <= MAX_CSV_BLOCK_BYTES,
                f"cannot parse {file.shown_as}: a row is longer than "
                f"{MAX_CSV_BLOCK_BYTES >> 20} MiB; split the table into narrower files",
            )
            read.block_bytes *= 4
            progress.log(
                "ingest",
                f"a row of {file.shown_as} is longer than a block: reading it again in "
                f"blocks of {read.block_bytes:,} bytes",
            )
        except _Widen as widen:
            wider = _wider(widen, file.shown_as)
            read.column_types[widen.column] = wider
            progress.log(
                "ingest",
                f"column {widen.column!r} holds {widen.value!r} after its first block, not "
                f"{widen.current}: reading {file.shown_as} again with it as {wider}",
            )
        except _Malformed as bad:
            raise _malformed(file, read, str(bad)) from None


def _csv_attempt(
    file: _File,
    label_column: str,
    out_path: str,
    started: float,
    read: _CsvRead,
    task: str,
) -> tuple[_Tally, Schema]:
    reader, stream = _open_csv(file, read)
    with contextlib.closing(stream), contextlib.closing(reader):
        batches = _rebatched(_csv_batches(reader, file.shown_as), BATCH_ROWS)
        first = next(batches, None)
        if first is None and read.bad_rows:  # every row was malformed: say so, not "empty"
            raise _Malformed(f"all {len(read.bad_rows)} rows have the wrong number of fields")
        require(
            first is not None and reader.schema.names,
            f"{file.shown_as} is empty (no rows); give a table with a header and data rows",
        )
        assert first is not None
        plan = _plan(reader.schema.names, label_column, file.shown_as, task)
        plan.renamed = read.renamed
        plan.bad_rows = read.bad_rows

        def report(rows: int) -> None:
            _log_progress(started, rows, stream.tell(), file.size)

        return _write(itertools.chain([first], batches), plan, file.shown_as, out_path, report)


def _open_csv(file: _File, read: _CsvRead) -> tuple[pacsv.CSVStreamingReader, pa.NativeFile]:
    """A streaming reader (and the file under it, whose position tells the progress) with
    pandas' column names, and its first block's guesses adjusted the way pandas reads such
    columns (added to ``read.column_types``). Each adjustment opens the file again: only its
    first block has been read."""
    names: list[str] | None = None
    while True:
        stream = file.open()
        buffered = pa.BufferedInputStream(stream, READ_BUFFER_BYTES)
        try:
            options = _csv_options(
                names, read.column_types, read.block_bytes, True, invalid_row=read.skip_bad_row
            )
            reader = pacsv.open_csv(buffered, *options)
        except pa.ArrowInvalid as exc:
            stream.close()
            if "Empty CSV file" in str(exc):
                raise KubetrainError(
                    f"{file.shown_as} is empty (no header, no rows); give a table with a "
                    "header and data rows"
                ) from None
            raise _csv_error(exc, file.shown_as, None) from None
        header = reader.schema.names
        adjust: dict[str, pa.DataType] = {}
        if names is None and _pandas_names(header) != header:
            names = _pandas_names(header)
            read.renamed = _renames(header, names)
        else:
            for f in reader.schema:
                known = f.name in read.column_types
                wanted = None if known else _first_block_type(f, file.shown_as)
                if wanted is not None:
                    adjust[f.name] = wanted
            if not adjust:
                return reader, stream
        read.column_types.update(adjust)
        reader.close()
        stream.close()


def _csv_options(
    names: list[str] | None,
    column_types: dict[str, pa.DataType],
    block_bytes: int,
    threads: bool,
    invalid_row: Callable[[Any], str] | None = None,
) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    return (
        pacsv.ReadOptions(
            block_size=block_bytes,
            use_threads=threads,
            column_names=names,
            skip_rows=1 if names else 0,  # names given: the header row is skipped
        ),
        pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid_row),
        pacsv.ConvertOptions(
            null_values=NULL_VALUES,
            strings_can_be_null=True,  # pandas: a missing category is missing, not ""
            column_types=column_types,
        ),
    )


def _first_block_type(f: pa.Field, shown_as: str) -> pa.DataType | None:
    """The type pandas would give a column pyarrow typed from the first block, if other:
    dates and times stay text, an empty column is float."""
    if pa.types.is_temporal(f.type):
        return pa.string()
    if pa.types.is_null(f.type):
        return pa.float64()
    require(
        not pa.types.is_binary(f.type),
        f"cannot parse {shown_as}: column {f.name!r} is not UTF-8 text; save the file as UTF-8",
    )
    return None


def _pandas_names(header: list[str]) -> list[str]:
    """Column names as ``pandas.read_csv`` makes them: empty ones ``Unnamed: i``,
    repeated ones numbered past the names the header already has (``a,a,a.1`` gives
    ``a, a.2, a.1``), as pandas' C parser does."""
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    counts: dict[str, int] = {}
    for i, name in enumerate(names):
        col, count = name, counts.get(name, 0)
        while count > 0:
            counts[name] = count + 1
            col = f"{name}.{count}"
            count = count + 1 if col in names else counts.get(col, 0)
        names[i] = col
        counts[col] = count + 1
    return names


def _renames(header: list[str], names: list[str]) -> list[dict[str, str]]:
    """What `_pandas_names` changed: each renamed column, its header cell and why."""
    return [
        {"column": new, "header": old, "why": "empty" if not old else "duplicate"}
        for old, new in zip(header, names, strict=True)
        if old != new
    ]


def _csv_batches(reader: pacsv.CSVStreamingReader, shown_as: str) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise _csv_error(exc, shown_as, reader.schema) from None
        yield batch


def _rebatched(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The CSV reader's small batches (one per block) joined into batches of `rows`."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.concat_batches(pending)
            pending, count = [], 0
    if pending:
        yield pa.concat_batches(pending)


def _csv_error(exc: pa.ArrowInvalid, shown_as: str, schema: pa.Schema | None) -> Exception:
    """What a pyarrow CSV error means: a column to widen, a malformed row, or neither."""
    text = str(exc)
    conversion = _CONVERSION.search(text)
    if conversion and schema is not None:
        column = schema.field(int(conversion.group(1)))
        value = _INVALID_VALUE.search(conversion.group(3) or "")
        return _Widen(column.name, column.type, value.group(1) if value else None)
    if "CSV parse error" in text:
        return _Malformed(text)
    if "straddles two block boundaries" in text:
        return _LongRow(text)
    return _cannot_parse(shown_as, exc)


def _wider(widen: _Widen, shown_as: str) -> pa.DataType:
    """float64 for a number where integers (or nothing) were, else text."""
    current = widen.current
    require(
        not (pa.types.is_string(current) or pa.types.is_binary(current)),
        f"cannot parse {shown_as}: column {widen.column!r} is not UTF-8 text; save the "
        "file as UTF-8",
    )
    if (pa.types.is_integer(current) or pa.types.is_null(current)) and _is_number(widen.value):
        return pa.float64()
    return pa.string()


def _is_number(value: str | None) -> bool:
    try:
        float(value or "")
    except ValueError:
        return False
    return True


def _malformed(file: _File, read: _CsvRead, error: str) -> KubetrainError:
    """One line naming the first row that does not parse: found again single-threaded,
    since pyarrow numbers rows only then (every column as text: no conversion errors)."""
    found: list[Any] = []

    def invalid_row(row: Any) -> str:
        found.append(row)
        return "error"

    skip = _csv_options(None, {}, read.block_bytes, threads=True, invalid_row=lambda row: "skip")
    with contextlib.closing(file.open()) as stream:
        names = _pandas_names(pacsv.open_csv(stream, *skip).schema.names)
    as_text = {name: pa.string() for name in names}
    options = _csv_options(names, as_text, read.block_bytes, False, invalid_row=invalid_row)
    with contextlib.closing(file.open()) as stream, contextlib.suppress(pa.ArrowInvalid):
        for _ in pacsv.open_csv(stream, *options):
            pass
    if not found or found[0].number is None:
        return _cannot_parse(file.shown_as, ValueError(error))
    row = found[0]
    text = row.text if len(row.text) <= 60 else row.text[:60] + "..."
    return KubetrainError(
        f"cannot parse {file.shown_as}: data row {row.number - 1} (counting from 1 after the "
        f"header) has {row.actual_columns} fields but the header has {row.expected_columns} "
        f"({text!r}); fix that row (quote values that hold commas) and ingest again"
    )


def _cannot_parse(shown_as: str, exc: BaseException) -> KubetrainError:
    return KubetrainError(
        f"cannot parse {shown_as}: {_first_line(exc)}; check that it is a valid file of that type"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _log_progress(started: float, rows: int, done: int, total: int) -> None:
    message = f"{rows:,} rows read"
    if total > 0:
        share = min(done / total, 1.0)
        message += f" ({share:.0%}, ETA {progress.eta(started, done, total)})"
    progress.log("ingest", message)


def _suffix(source: str) -> str:
    return Path(source.rstrip("/")).suffix.lower()


def _checked_suffix(source: str) -> str:
    suffix = _suffix(source)
    require(
        suffix in FILE_TYPES,
        f"cannot read {source}: unsupported file type {suffix or '(none)'}; use "
        f"{', '.join(FILE_TYPES)} or a built-in dataset ({', '.join(BUILTIN_DATASETS)})",
    )
    return ".parquet" if suffix == ".pq" else suffix


# --- in-memory sources: built-ins and NPZ ----------------------------------------------


def _ingest_frame(
    frame: pd.DataFrame, schema: Schema, source: str, out_path: str
) -> tuple[_Tally, Schema]:
    """Write a source read whole (labels already text in `LABEL`) like a streamed one."""
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    plan = _Plan(
        source,
        LABEL,
        list(schema.feature_names),
        schema.kind,
        schema.image_shape,
        list(schema.class_names),
    )
    return _write(table.to_batches(max_chunksize=BATCH_ROWS), plan, source, out_path)


def _load_builtin(name: str) -> tuple[pd.DataFrame, Schema]:
    from sklearn import datasets as skd

    bunch = {
        "digits": skd.load_digits,
        "breast_cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
    }[name]()
    is_image = name == "digits"
    names = (
        [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
        if is_image
        else [str(n) for n in bunch.feature_names]
    )
    class_names = [str(n) for n in bunch.target_names]
    frame = pd.DataFrame(np.asarray(bunch.data, np.float32), columns=names)
    frame[LABEL] = [class_names[i] for i in bunch.target]
    schema = Schema(
        kind="image" if is_image else "table",
        feature_names=names,
        class_names=class_names,
        image_shape=[1, 8, 8] if is_image else None,
    )
    return frame, schema


def _load_npz_source(source: str) -> tuple[pd.DataFrame, Schema]:
    """An NPZ archive, local or on S3 (downloaded first: a zip is not streamed)."""
    if source.startswith("s3://"):
        from kubetrain.core import storage  # boto3 only when needed

        with tempfile.TemporaryDirectory(prefix="kubetrain-ingest-") as tmp:
            local = Path(tmp) / Path(source.rstrip("/")).name
            storage.download(source, local)
            return _load_npz(local, shown_as=source)
    path = Path(source)
    _checked_suffix(source)
    require(path.is_file(), f"dataset {source} {_NOT_FOUND}")
    return _load_npz(path, source)


def _load_npz(path: Path, shown_as: str) -> tuple[pd.DataFrame, Schema]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array named .npz
            raise ValueError("it holds one array, not an archive of named arrays")
        with loaded:
            arrays = dict(loaded)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise KubetrainError(
            f"cannot read {shown_as} as NPZ: {str(exc).rstrip('.')}; save "
            "it with numpy.savez(path, X=features, y=labels)"
        ) from None
    x_key = next((k for k in ("X", "x", "features", "images") if k in arrays), None)
    y_key = next((k for k in ("y", "labels", "label", "target") if k in arrays), None)
    require(
        x_key is not None and y_key is not None,
        f"{shown_as} needs arrays named X and y; it has: {', '.join(arrays) or 'none'}",
    )
    X, y = arrays[x_key], arrays[y_key]
    require(
        y.ndim == 1, f"{shown_as}: y must be 1-D (one label per row), got shape {tuple(y.shape)}"
    )
    require(
        X.ndim in (2, 3, 4),
        f"{shown_as}: X must be (rows, features), (rows, H, W) or "
        f"(rows, C, H, W), got shape {tuple(X.shape)}",
    )
    require(
        len(X) == len(y), f"{shown_as}: X has {len(X)} rows but y has {len(y)}; they must match"
    )
    require(len(X) > 0, f"{shown_as} is empty (no rows); give at least a few rows per class")
    require(np.issubdtype(X.dtype, np.number), f"{shown_as}: X must be numeric, got {X.dtype}")
    image_shape = None
    if X.ndim == 3:
        image_shape = [1, *X.shape[1:]]
    elif X.ndim == 4:
        image_shape = list(X.shape[1:])
    flat = X.reshape(len(X), -1).astype(np.float32)
    names = (
        [f"pixel_{i}" for i in range(flat.shape[1])]
        if image_shape
        else [f"feature_{i}" for i in range(flat.shape[1])]
    )
    labels = pd.Series(y)
    frame = pd.DataFrame(flat, columns=names)
    frame[LABEL] = _label_strings(labels, "y", shown_as)
    schema = Schema(
        kind="image" if image_shape else "table",
        feature_names=names,
        class_names=_ordered_classes(labels),
        image_shape=image_shape,
    )
    return frame, schema


def _label_strings(labels: pd.Series, name: str, shown_as: str) -> list[str]:
    missing = labels.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise KubetrainError(
            f"label column {name!r} in {shown_as} has {int(missing.sum())} "
            f"missing value(s) (first at row {first}); fill or drop those rows"
        )
    return [_label_text(v) for v in labels]


def _label_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _ordered_classes(labels: pd.Series) -> list[str]:
    """Sorted class names; numerically when every label is a number (so 2 < 10)."""
    values = sorted({_label_text(v) for v in labels})
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _preview(columns: list[str], limit: int = 12) -> str:
    shown = ", ".join(columns[:limit])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")
