"""The clean stage on Spark, for tables that outgrow one machine (``--engine spark``).

Spark runs the streaming clean's own pieces (`kubetrain.data.clean_stream`:
`batch_keys`, `FillStats`, `EncodedStats`, `encode_train`, `apply_batch`)
through ``mapInArrow``; nothing is written twice, so both engines fit the same
preprocessor and route every row to the same split:

1. each table part (one Spark task) is read with pyarrow, its sha256 checked,
   and every row gets its content hash; ``dropDuplicates`` on the hash leaves
   one copy of each row (persisted on local disk, since four passes read it);
2. the (hash, label, missing count) of every unique row is collected (about
   16 bytes a row) and `Plan.route` splits them on the driver, exactly as the
   local engine does; the routing table is broadcast;
3. fill values, then the encoded matrix's moments (and quantile samples, and
   feature selection's cross products and row sample), are folded per task and
   merged on the driver, which selects the features;
4. every task transforms its rows and writes its own shards of each split
   (`kubetrain.data.shards.part_writer`); the driver writes the manifests last.

The Python workers read and write through pyarrow (``s3://`` with the same
settings as every other stage, `kubetrain.data.shards`), not through Hadoop's
s3a, so no Hadoop AWS jars have to match the Spark build. Locally Spark runs in
local mode (``local[N]``); on a cluster the driver is `kubetrain.cli.spark_clean`
inside a SparkApplication (`kubetrain.cluster.spark`), which sets the master.

Within each split rows come in task order, not table order, and which copy of a
duplicate row is kept is Spark's choice (copies are identical). Statistics
merge in a different order than the local engine's, so they agree to floating-
point rounding (the equivalence test allows 1e-9 relative).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kubetrain.config.settings import CleanConfig
from kubetrain.core import progress, storage
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data import shards
from kubetrain.data.clean_stream import (
    Plan,
    SplitCounts,
    _scale,
    apply_batch,
    batch_keys,
    encode_train,
    sample_cut,
)
from kubetrain.data.datasets import LABEL, Schema, atomic_dir
from kubetrain.data.packed_json import unpack

#: Rows per Arrow batch handed to a task's Python worker.
BATCH_ROWS = 65_536
HASH = "_kubetrain_hash"  # the row-hash column added to the table's own columns
SPLITS = ("train", "validation", "test")


# --- the table, as the driver and the tasks see it --------------------------------------


@dataclass(frozen=True)
class Part:
    """One Parquet file of the raw table: a Spark task's unit of work."""

    uri: str
    sha256: str = ""  # empty for tables written before parts carried checksums


@dataclass(frozen=True)
class Table:
    uri: str
    schema: Schema
    arrow_schema: pa.Schema
    parts: tuple[Part, ...]
    rows: int


def open_table(uri: str) -> Table:
    """The table's schema, parts and row count, from its meta.json and Parquet footers."""
    meta = unpack(json.loads(_read(uri, "meta.json", "the table's meta.json")))
    listed = meta.pop("parts", None) or [{"name": "data.parquet"}]
    meta.pop("rows", None)
    fields = Schema.__dataclass_fields__
    schema = Schema(**{k: v for k, v in meta.items() if k in fields})
    parts = tuple(Part(_join(uri, p["name"]), p.get("sha256", "")) for p in listed)
    footers = [pq.ParquetFile(_open(p.uri)).metadata for p in parts]
    arrow_schema = footers[0].schema.to_arrow_schema()
    return Table(uri, schema, arrow_schema, parts, sum(f.num_rows for f in footers))


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def _open(uri: str) -> Any:
    if storage.is_s3(uri):
        fs, key = shards._s3(uri)
        return fs.open_input_file(key)
    return open(uri, "rb")  # noqa: SIM115 - pyarrow closes it with the ParquetFile


def _read(root: str, name: str, what: str) -> bytes:
    try:
        return shards._read_bytes(root, name)
    except FileNotFoundError:
        raise KubetrainError(
            f"{storage.redact(root)} has no {name}: it is not a kubetrain table; pass the "
            "ingest stage's output"
        ) from None


def read_part(part: Part, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A part's rows in batches, after checking its sha256 (parts are bounded in size)."""
    with contextlib.closing(_open(part.uri)) as f:
        data = f.read()
    if part.sha256 and hashlib.sha256(data).hexdigest() != part.sha256:
        raise KubetrainError(
            f"table part {storage.redact(part.uri)} does not match its sha256 in meta.json "
            "(damaged or replaced); re-run ingest"
        )
    yield from pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=batch_rows)


def _sample(table: Table) -> Any:
    """The table's first rows, read on the driver as the local engine reads them: the
    rows the column types are inferred from (`kubetrain.data.column_types`)."""
    from kubetrain.data.column_types import read_sample

    batches = (b.to_pandas() for part in table.parts for b in read_part(part, BATCH_ROWS))
    return read_sample(batches)


def spark_types(arrow_schema: pa.Schema) -> pa.Schema:
    """The table's columns in types Spark takes from Arrow (dictionary columns become
    their values, large strings strings, all-null columns strings)."""

    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_dictionary(t):
            return plain(t.value_type)
        if pa.types.is_large_string(t) or pa.types.is_null(t):
            return pa.string()
        return t

    return pa.schema([pa.field(f.name, plain(f.type)) for f in arrow_schema])


# --- the session -------------------------------------------------------------------------


def session(cores: int | None = None) -> Any:
    """The SparkSession: the one spark-submit made (on a cluster), else local mode.

    PySpark warns that pandas 3 is not fully supported; that concerns its
    pandas UDFs and ``toPandas``. This engine hands Spark only Arrow batches
    (``mapInArrow``) and converts them itself, so the warning is silenced.
    """
    warnings.filterwarnings("ignore", message=".*PySpark does not yet fully support pandas")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("kubetrain-clean")
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit: local mode
        builder = (
            builder.master(f"local[{cores or os.cpu_count() or 1}]")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", "1g")
            .config("spark.sql.shuffle.partitions", str(2 * (cores or os.cpu_count() or 1)))
        )
    spark = builder.config(
        "spark.sql.execution.arrow.maxRecordsPerBatch", str(BATCH_ROWS)
    ).getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _is_local(spark: Any) -> bool:
    return str(spark.sparkContext.master).startswith("local")


# --- the passes (functions the tasks run; module-level so Spark can pickle them) ---------


def _hashed(
    parts: list[Part], arrow_schema: pa.Schema, plan: Plan, batches: Iterator
) -> Iterator[pa.RecordBatch]:
    """Task: read the parts named in the incoming rows; each row plus its content hash."""
    out = arrow_schema.append(pa.field(HASH, pa.int64()))
    for unit in batches:
        for i in unit.column("part").to_pylist():
            for batch in read_part(parts[i], BATCH_ROWS):
                batch = pa.Table.from_batches([batch]).cast(arrow_schema)
                frame = batch.to_pandas()
                h = batch_keys(frame, plan.numeric, plan.label_codes, plan.kept)[0]
                cols = [*batch.columns, pa.array(h.view(np.int64))]
                yield pa.RecordBatch.from_arrays(
                    [c.combine_chunks() if hasattr(c, "combine_chunks") else c for c in cols],
                    schema=out,
                )


def _frames(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[Any, np.ndarray]]:
    """The rows of a task as (pandas frame without the hash, uint64 hashes)."""
    for batch in batches:
        frame = batch.to_pandas()
        yield frame.drop(columns=[HASH]), frame[HASH].to_numpy(np.int64).view(np.uint64)


def _keys(plan: Plan, batches: Iterator) -> Iterator[pa.RecordBatch]:
    """Task: (hash, label code, missing values) of each unique row."""
    for frame, h in _frames(batches):
        _, y, missing = batch_keys(frame, plan.numeric, plan.label_codes, plan.kept)
        yield pa.RecordBatch.from_pydict(
            {"h": h.view(np.int64), "y": y.astype(np.int32), "missing": missing}
        )


@dataclass(frozen=True)
class Routing:
    """Split code of every kept row, looked up by row hash (rows not kept get -1)."""

    hashes: np.ndarray  # sorted uint64
    codes: np.ndarray  # int8, aligned with hashes

    @classmethod
    def of(cls, hashes: np.ndarray, codes: np.ndarray) -> Routing:
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], codes[order].astype(np.int8))

    def lookup(self, h: np.ndarray) -> np.ndarray:
        if not len(self.hashes):
            return np.full(len(h), -1, np.int8)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return np.where(self.hashes[pos] == h, self.codes[pos], -1).astype(np.int8)


def _fold(
    routing: Any, start: Callable[[], Any], add: Callable[[Any, Any, np.ndarray], None], batches
) -> Iterator[pa.RecordBatch]:
    """Task: fold the task's training rows into one summary; yield it pickled."""
    acc = start()
    for frame, h in _frames(batches):
        train = routing.value.lookup(h) == 0
        add(acc, frame.drop(columns=[LABEL])[train].reset_index(drop=True), h[train])
    yield pa.RecordBatch.from_pydict({"payload": [pickle.dumps(acc)]})


def _add_fill(acc: Any, frame: Any, h: np.ndarray) -> None:
    acc.add(frame, h)


def _add_encoded(prep: Any, bounds: Any, acc: Any, frame: Any, h: np.ndarray) -> None:
    acc.add(encode_train(prep, frame, bounds), h)


def _write(
    plan: Plan,
    prep: Any,
    routing: Any,
    staging: tuple[str, str, str],
    drop: bool,
    batches: Iterator,
) -> Iterator[pa.RecordBatch]:
    """Task: transform the task's kept rows and write its own shards of each split."""
    from pyspark import TaskContext

    task = TaskContext.get().partitionId()
    split_schema = plan.split_schema(prep)
    counts = SplitCounts.of(plan.schema)
    dropped = clipped = 0
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(shards.part_writer(u, split_schema, task)) for u in staging]
        for frame, h in _frames(batches):
            split = routing.value.lookup(h)
            kept = split >= 0
            frame, split = frame[kept].reset_index(drop=True), split[kept]
            labels = frame[LABEL]
            regression = plan.schema.regression
            y = plan.targets(labels.to_numpy()) if regression else plan.label_codes(labels)
            features = frame.drop(columns=[LABEL])
            X, y, split, d, c = apply_batch(prep, features, y, split, drop)
            dropped, clipped = dropped + d, clipped + c
            for s in range(3):
                rows = split == s
                if rows.any():
                    writers[s].write(X[rows], y[rows])
                    counts.add(s, y[rows])
    yield pa.RecordBatch.from_pydict(
        {
            "task": pa.array([task], pa.int32()),
            "shards": [json.dumps([w.manifest["shards"] for w in writers])],
            "counts": [pickle.dumps(counts)],
            "dropped": pa.array([dropped], pa.int64()),
            "clipped": pa.array([clipped], pa.int64()),
        }
    )


# --- the engine --------------------------------------------------------------------------


@contextlib.contextmanager
def _task_errors() -> Iterator[None]:
    """A task's `KubetrainError` reaches the driver as a Spark exception holding the
    worker's traceback; turn it back into the one line it was."""
    try:
        yield
    except KubetrainError:
        raise
    except Exception as exc:
        found = re.search(r"KubetrainError: (.+)", str(exc))
        if found is None:
            raise
        raise KubetrainError(found.group(1).strip()) from None


def _merged(df: Any) -> Any:
    """Unpickle and merge the per-task summaries a `_fold` pass yielded."""
    payloads = df.toArrow().column("payload").to_pylist()
    require(bool(payloads), "the table has no rows; re-run ingest")
    return functools.reduce(lambda a, b: a.merge(b), (pickle.loads(p) for p in payloads))


@contextlib.contextmanager
def _staging(uris: tuple[str, str, str], local_spark: bool) -> Iterator[tuple[str, str, str]]:
    """Where the tasks write: temporary local directories renamed into place when the
    block succeeds (local mode only), or the ``s3://`` prefixes themselves."""
    for u in uris:
        if not storage.is_s3(u) and not local_spark:
            raise KubetrainError(
                f"split path {u} is local, but Spark runs on a cluster whose executors cannot "
                "see it; pass s3:// URIs"
            )
    with contextlib.ExitStack() as stack:
        out = []
        for u in uris:
            if storage.is_s3(u):
                shards.unpublish(u)
                out.append(u)
            else:
                out.append(str(stack.enter_context(atomic_dir(u))))
        yield out[0], out[1], out[2]


@_task_errors()
def clean_spark(
    table_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    cfg: CleanConfig,
    seed: int,
    spark: Any = None,
) -> dict[str, Any]:
    """The clean stage on Spark; returns the metadata `clean` returns (``engine: spark``).
    A task's one-line error reaches the caller as that line (`_task_errors`)."""
    from pyspark import StorageLevel
    from pyspark.sql.pandas.types import from_arrow_schema

    started = time.perf_counter()
    table = open_table(str(table_path))
    arrow_schema = spark_types(table.arrow_schema)
    plan = Plan.of_schemas(cfg, table.schema, arrow_schema, _sample(table))
    spark = spark or session()
    sc = spark.sparkContext
    say = functools.partial(progress.log, "clean")
    say(f"spark ({sc.master}): {table.rows:,} rows in {len(table.parts)} part(s)")

    # 1. rows with their hashes, one copy of each; persisted for the passes below
    units = sc.parallelize([(i,) for i in range(len(table.parts))], len(table.parts))
    hashed_schema = from_arrow_schema(arrow_schema.append(pa.field(HASH, pa.int64())))
    rows = (
        spark.createDataFrame(units, "part int")
        .mapInArrow(
            functools.partial(_hashed, list(table.parts), arrow_schema, plan),
            hashed_schema,
        )
        .dropDuplicates([HASH])
        .persist(StorageLevel.DISK_ONLY)
    )
    try:
        say("spark pass 1/4: deduplicate and route")
        keys = rows.mapInArrow(
            functools.partial(_keys, plan), "h long, y int, missing int"
        ).toArrow()
        hashes = keys.column("h").to_numpy().view(np.uint64)
        stats: dict[str, Any] = {
            "rows_in": table.rows,
            "duplicates_removed": table.rows - len(hashes),
        }
        labels = keys.column("y").to_numpy().astype(np.int64)
        keep, codes = plan.route(hashes, labels, keys.column("missing").to_numpy(), stats, seed)
        hashes, labels = hashes[keep], labels[keep]  # feature selection's sample labels
        cut = sample_cut(hashes[codes == 0])  # the training rows medians are taken from
        routing = sc.broadcast(Routing.of(hashes, codes))
        del keys, keep, codes

        say("spark pass 2/4: fill values and categories")
        fill = _merged(
            rows.mapInArrow(
                functools.partial(
                    _fold, routing, functools.partial(plan.fill_stats, cut), _add_fill
                ),
                "payload binary",
            )
        )
        prep = plan.preprocessor(fill)

        say("spark pass 3/4: feature selection, outlier bounds and scaling")
        encoded = _merged(
            rows.mapInArrow(
                functools.partial(
                    _fold,
                    routing,
                    functools.partial(plan.encoded_stats, prep, True),
                    functools.partial(_add_encoded, prep, None),
                ),
                "payload binary",
            )
        )
        stats.update(plan.select(prep, encoded, hashes, labels, seed))
        del hashes, labels
        prep.params["bounds"] = encoded.bounds(cfg, plan.n_num(prep), plan.image)
        robust = plan.robust(encoded, prep)
        if prep.params["bounds"] is not None:
            encoded = _merged(
                rows.mapInArrow(
                    functools.partial(
                        _fold,
                        routing,
                        functools.partial(plan.encoded_stats, prep, False),
                        functools.partial(_add_encoded, prep, prep.params["bounds"]),
                    ),
                    "payload binary",
                )
            )
        prep.params["scale"] = _scale(
            cfg, encoded.moments, plan.image, plan.encoded_width(prep), robust
        )

        say("spark pass 4/4: transform and write the splits")
        drop = plan.drop_outliers(prep)
        uris = (str(train_path), str(val_path), str(test_path))
        with _staging(uris, _is_local(spark)) as staging:
            done = (
                rows.mapInArrow(
                    functools.partial(_write, plan, prep, routing, staging, drop),
                    "task int, shards string, counts binary, dropped long, clipped long",
                )
                .toArrow()
                .to_pylist()
            )
            done.sort(key=lambda r: r["task"])
            counts = functools.reduce(
                SplitCounts.merge,
                (pickle.loads(r["counts"]) for r in done),
                SplitCounts.of(plan.schema),
            )
            split_schema = plan.split_schema(prep)
            split_schema.extra.update(counts.target())
            for s, target in enumerate(staging):
                parts = [json.loads(r["shards"])[s] for r in done]
                extra = {"preprocessing": prep.params} if s == 0 else {}
                shards.publish(target, split_schema, parts, plan.width(prep), extra)
        counters = {
            "dropped": sum(r["dropped"] for r in done),
            "clipped": sum(r["clipped"] for r in done),
        }
    finally:
        rows.unpersist()
    meta = plan.finish(stats, counts, counters, prep, started)
    meta["engine"] = "spark"
    meta["anomalies"] = plan.typed_anomalies()  # no statistics pass here: no inf counts
    return meta
