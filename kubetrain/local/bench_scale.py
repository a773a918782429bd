"""`make bench-scale`: how memory and speed scale with the number of rows.

The measurement harness for "datasets larger than memory". It is a benchmark, not a
test: it prints what it measured, on this machine, and never fakes a number.

* Tables: a seeded N-row x 30-column Parquet file (26 numeric columns, some with
  missing values; 3 categorical columns, one with missing values; about 1% exact
  duplicate rows; a 3-class label), written in chunks so that generating 10M rows
  takes no more memory than generating 200k.
* Pipeline: ``kubetrain run --dataset FILE --label-column label --tune-trials 0
  --epochs 1 --min-accuracy 0`` at ``--rows`` and at ``--big-rows``, with the peak
  RSS of every stage (no quality gate: it would skip compress, leaving it unmeasured).
  kfp.local runs each task as its own process (``sh`` -> ``python -m
  kfp.dsl.executor_main ... --function_to_execute <task>``). A sampling thread walks
  the run's process tree every `SAMPLE_SECONDS` and reads each process's VmHWM from
  ``/proc/<pid>/status`` (the kernel's own high-water mark of resident memory, so a
  short spike between two samples is not missed); it can only miss growth in a
  task's last `SAMPLE_SECONDS` before it exits. The whole run's peak is
  also taken exactly, from the kernel's ``ru_maxrss`` that ``wait4`` returns for the
  run (the largest process of the tree), and printed beside the sampled stage peaks
  as a check on the sampling. The stage CLI with ``RUSAGE_CHILDREN`` would be exact
  per stage too, but it would not be the pipeline the issue asks about (kfp.local's
  executor, artifact handling and the driver process).
* Clean throughput: the ``clean`` stage (stage CLI on the ingested table, same
  settings as the pipeline) against a straightforward pandas + scikit-learn version of
  the same cleaning (`reference_clean`: dedup, stratified split, median impute,
  one-hot, standard scaling), on the same file; both timed from reading the table to
  the three splits written, each in its own process, with its exact peak RSS.

Every measured step runs in a subprocess with an address-space cap (`RLIMIT_AS`,
default `MEMORY_CAP_GIB`) and a time limit, so a step that would exhaust the
machine's memory or run for hours is reported as "failed: out of memory at N GiB" or
"timed out after S s".
* Spark: the clean stage with ``--engine spark`` (local mode) on the same ingested
  table, beside the local engine: wall time, and whether split sizes, class counts and
  fitted statistics agree (the JVM maps far more address space than it uses, so this
  step gets `SPARK_CAP_GIB`).

    python -m kubetrain.local.bench_scale [--rows 1000000 --big-rows 10000000
        --out DIR --skip-big]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubetrain.core.memory import parse_bytes

if TYPE_CHECKING:
    from kubetrain.registry import Stage

#: What the issue asks for (printed beside the measurements; never asserted in a test).
TARGETS = {"peak_ratio": 1.25, "peak_gib": 2.0, "clean_speedup": 3.0, "stream_ratio": 0.9}
GIB = 1024**3
MEMORY_CAP_GIB = 6.0
#: The stages' memory budget in the measured runs. The automatic budget (40% of RAM,
#: 9.6 GiB here) would let 10M rows be held; the 2 GiB-per-stage target is about what
#: streaming holds, so the bench sets the budget a 2 GiB pod would get.
MEMORY_BUDGET = "768MiB"
TIMEOUT_SECONDS = 1800  # the 10M-row pipeline takes 8-11 min on 2 shared cores
SAMPLE_SECONDS = 0.05
SEED = 42
CHUNK_ROWS = 200_000
#: Bump when the generated table changes, so a cached file from an older generator is
#: not reused.
GENERATOR_VERSION = 1

NUMERIC = tuple(f"num_{i:02d}" for i in range(26))
CATEGORIES = {
    "color": ("red", "green", "blue", "black", "white"),
    "region": tuple(f"region_{i:02d}" for i in range(12)),
    "channel": ("web", "store", "phone"),
}
#: Share of missing values per column: numeric and categorical, mild to heavy.
MISSING = {"num_03": 0.05, "num_07": 0.10, "num_11": 0.02, "num_19": 0.20, "region": 0.03}
DUPLICATE_FRACTION = 0.01
CLASSES = 3
LABEL = "label"
#: Cut points of a standard normal score: classes of about 50%, 30% and 20%.
CLASS_CUTS = (0.0, 0.8416)
#: The local runner's line for a failed stage.
FAILED_LINE = re.compile(r"kubetrain \| ([\w-]+) \| failed in")
#: Lines in a failed step's log that mean it ran out of memory.
OOM = re.compile(
    r"MemoryError|Unable to allocate|Cannot allocate memory|bad_alloc|out of memory",
    re.IGNORECASE,
)


# --- the table ---------------------------------------------------------------------------


def _chunk(rng: np.random.Generator, rows: int) -> Any:
    """One chunk of the table as a pyarrow Table; duplicates are copies within the chunk."""
    import pyarrow as pa

    numeric = rng.standard_normal((rows, len(NUMERIC)))
    numeric *= 1.0 + np.arange(len(NUMERIC)) % 5  # different spreads ...
    numeric += np.arange(len(NUMERIC)) * 3.0  # ... and centres
    numeric[:, 5] = np.exp(numeric[:, 5] / 3.0 - 5.0)  # skewed, with a long tail
    codes = {c: rng.integers(0, len(v), rows) for c, v in CATEGORIES.items()}
    # the label depends on a few columns (so a model can learn it) plus noise; the score
    # has unit variance, so the cuts give fixed class shares
    informative = [0, 1, 2, 4]  # columns without missing values
    z = (numeric[:, informative] - np.array(informative) * 3.0) / (1.0 + np.array(informative) % 5)
    score = z @ np.array([0.5, -0.4, 0.3, 0.2]) + 0.3 * (codes["color"] == 0)
    score += rng.standard_normal(rows) * 0.1
    score = (score - score.mean()) / score.std()
    label = np.searchsorted(np.array(CLASS_CUTS), score).astype(np.int64)
    masks = {c: rng.random(rows) < share for c, share in MISSING.items()}
    for c, mask in masks.items():
        if c in NUMERIC:
            numeric[mask, NUMERIC.index(c)] = np.nan
    # exact duplicate rows: targets overwritten by distinct source rows that are no
    # target themselves, so dropping duplicates removes exactly `n_dup` rows
    n_dup = round(rows * DUPLICATE_FRACTION)
    order = rng.permutation(rows)
    target, source = order[:n_dup], order[n_dup : 2 * n_dup]
    numeric[target] = numeric[source]
    label[target] = label[source]
    for c in codes:
        codes[c][target] = codes[c][source]
    for c in masks:
        masks[c][target] = masks[c][source]
    columns: dict[str, Any] = {c: numeric[:, i] for i, c in enumerate(NUMERIC)}
    for c, values in CATEGORIES.items():
        indices = pa.array(codes[c].astype(np.int32), mask=masks.get(c))
        columns[c] = pa.DictionaryArray.from_arrays(indices, pa.array(values)).cast(pa.string())
    columns[LABEL] = label
    return pa.table(columns)


def generate_table(path: str | os.PathLike, rows: int, seed: int = SEED) -> dict[str, Any]:
    """Write the seeded benchmark table to `path` in chunks; returns what it wrote.

    Chunked with one `ParquetWriter` so memory stays that of one chunk whatever
    `rows` is (generating the 10M-row file must not be what runs out of memory).
    Each chunk has its own generator, seeded by (seed, chunk index): the file is a
    function of `rows` and `seed` only. Written to a temporary name, then renamed.
    """
    import pyarrow.parquet as pq

    started = time.perf_counter()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    duplicates, writer = 0, None
    try:
        for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            table = _chunk(np.random.default_rng([seed, index]), n)
            duplicates += round(n * DUPLICATE_FRACTION)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=CHUNK_ROWS)
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, target)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {
        "path": str(target),
        "rows": rows,
        "columns": len(NUMERIC) + len(CATEGORIES) + 1,
        "duplicate_rows": duplicates,
        "bytes": target.stat().st_size,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "seconds": round(time.perf_counter() - started, 2),
    }


def cached_table(out: Path, rows: int, seed: int = SEED) -> dict[str, Any]:
    """The table for `rows`, generated once per (rows, seed, generator version)."""
    path = out / f"table-{rows}.parquet"
    meta_path = out / f"table-{rows}.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == seed and meta.get("generator_version") == GENERATOR_VERSION:
            return meta | {"reused": True}
    meta = generate_table(path, rows, seed)
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta | {"reused": False}


# --- the reference clean -----------------------------------------------------------------


def reference_clean(
    table_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = SEED,
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
) -> dict[str, Any]:
    """The same cleaning as the clean stage, written the straightforward way.

    pandas + scikit-learn as most people would: read the whole file, drop exact
    duplicates, stratified train/validation/test split (the stage's fractions and
    seed), then a pipeline fitted on the training split: median imputation of numeric
    columns, most-frequent imputation and one-hot encoding of text columns, standard
    scaling of every column; each split written as ``<name>.npz`` (float32 X, int64 y)
    like the stage's artifacts. It is the yardstick the clean stage's throughput is
    compared with, so it does no more and no less than the stage.
    """
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    started = time.perf_counter()
    frame = pd.read_parquet(table_path)
    rows_in = len(frame)
    frame = frame.drop_duplicates(ignore_index=True)
    y = pd.factorize(frame.pop(LABEL), sort=True)[0].astype(np.int64)
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    text = [c for c in frame.columns if c not in numeric]
    X_rest, X_test, y_rest, y_test = train_test_split(
        frame, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest,
        y_rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=y_rest,
        random_state=seed,
    )
    prep = make_pipeline(
        ColumnTransformer(
            [
                ("numeric", SimpleImputer(strategy="median"), numeric),
                (
                    "text",
                    make_pipeline(
                        SimpleImputer(strategy="most_frequent"),
                        OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                    ),
                    text,
                ),
            ]
        ),
        StandardScaler(),
    )
    prep.fit(X_train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, X, labels in (
        ("train", X_train, y_train),
        ("validation", X_val, y_val),
        ("test", X_test, y_test),
    ):
        matrix = prep.transform(X).astype(np.float32)
        np.savez(out / f"{name}.npz", X=matrix, y=labels)
        splits[name] = {"rows": len(matrix), "features": int(matrix.shape[1])}
    return {
        "rows_in": rows_in,
        "duplicates_removed": rows_in - len(frame),
        "splits": splits,
        "seconds": round(time.perf_counter() - started, 3),
    }


# --- measuring a process -----------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of a process in bytes; empty once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":", 1)
            found[key] = int(value.split()[0]) * 1024
    return found


def _children(pid: int) -> list[int]:
    """Direct children of a process (any of its threads may have forked them)."""
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _task_of(pid: int) -> str | None:
    """The kfp task a process runs (`--function_to_execute NAME`), if it is one."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"--function_to_execute" in argv:
        i = argv.index(b"--function_to_execute")
        if i + 1 < len(argv):
            return argv[i + 1].decode()
    return None


def sample_tree(root: int, stop: threading.Event, into: dict[str, dict[str, float]]) -> None:
    """Until `stop`: per kfp task (and "driver" for the rest of the tree) the largest
    VmHWM of its processes, and the times it was first and last seen.

    The peak is per process, like the kernel's ``ru_maxrss``, not a sum over a task's
    processes: a process just forked shares its parent's pages, and a sum would count
    them twice (the stages run in one process each).
    """
    tasks: dict[int, str] = {}  # pid -> task, remembered once seen
    while not stop.is_set():
        now = time.perf_counter()
        stack = [(root, "driver")]
        while stack:
            pid, inherited = stack.pop()
            if pid not in tasks:
                tasks[pid] = _task_of(pid) or inherited
            name = tasks[pid]
            if hwm := _status(pid).get("VmHWM", 0):
                rec = into.setdefault(name, {"peak": 0, "first": now, "last": now})
                rec["peak"] = max(rec["peak"], hwm)
                rec["last"] = now
            stack += [(kid, name) for kid in _children(pid)]
        stop.wait(SAMPLE_SECONDS)


def _limits(cap_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    return apply


def measure(
    cmd: list[str],
    log: Path,
    cap_gib: float = MEMORY_CAP_GIB,
    timeout_s: float = TIMEOUT_SECONDS,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `cmd` capped in memory and time; its exact peak RSS, wall time, per-task peaks.

    The cap is `RLIMIT_AS` per process (inherited by every process the command
    starts): an allocation past it fails inside that process (MemoryError) instead
    of the kernel's OOM killer picking a victim on a shared machine. The command gets
    its own session, so a time-out kills exactly its process group. The peak comes
    from ``wait4``'s rusage: the kernel's ``ru_maxrss`` of the largest process of
    the tree (each waited for by its parent), not a sample.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict[str, float]] = {}
    stop = threading.Event()
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_limits(int(cap_gib * GIB)),
        )
        sampler = threading.Thread(target=sample_tree, args=(proc.pid, stop, tasks), daemon=True)
        sampler.start()
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only its processes
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    result: dict[str, Any] = {
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "peak_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "tasks": {
            k: {
                "peak_bytes": int(v["peak"]),
                "seconds": round(v["last"] - v["first"], 1),
                "first": round(v["first"] - started, 1),
            }
            for k, v in tasks.items()
        },
    }
    if timed_out:
        result["failure"] = f"timed out after {timeout_s:.0f} s"
    elif proc.returncode != 0:
        if OOM.search(text) or proc.returncode == -signal.SIGKILL:
            result["failure"] = f"failed: out of memory at {cap_gib:g} GiB"
        else:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error:")]
            result["failure"] = "failed: " + ((errors or lines or ["(no output)"])[-1])[:200]
    return result


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _kubetrain() -> str:
    exe = Path(sys.executable).parent / "kubetrain"
    return str(exe) if exe.exists() else "kubetrain"


# --- the measurements --------------------------------------------------------------------


def pipeline_run(table: Path, work: Path, cap_gib: float, timeout_s: float) -> dict[str, Any]:
    """The whole pipeline on `table` with per-stage peak RSS.

    ``--min-accuracy 0``: the quality gate is not what is measured here, and a failed
    gate would skip the compress stage, leaving one stage unmeasured.
    """
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [
        _kubetrain(),
        "run",
        "--dataset",
        str(table),
        "--label-column",
        LABEL,
        "--tune-trials",
        "0",
        "--epochs",
        "1",
        "--min-accuracy",
        "0",
        "--runs-dir",
        str(runs),
    ]
    result = measure(cmd, work / "pipeline.log", cap_gib, timeout_s)
    result["command"] = "kubetrain " + " ".join(cmd[1:])
    result["failed_stage"] = _failed_stage(result, (work / "pipeline.log").read_text())
    return result


#: Rounds of `clean_comparison`: each side runs this many times, alternating, and its
#: median counts (one run each swung the ratio between 2.3 and 4.1 on a shared machine).
CLEAN_ROUNDS = 3


def clean_comparison(
    table: Path, work: Path, cap_gib: float, timeout_s: float, rounds: int = CLEAN_ROUNDS
) -> dict[str, Any]:
    """The clean stage against `reference_clean`, on the same file, each in its own process,
    ``rounds`` times in turn (stage, reference, stage, ...); each side's median run counts.

    The stage reads ingest's table (the same rows, label as text), so ingest runs
    first, through the stage CLI; it is measured too but not part of the comparison.
    """
    stage = [*_python("-m", "kubetrain.cli.stage")]
    art = work / "artifacts"
    shutil.rmtree(art, ignore_errors=True)
    ingest = measure(
        [
            *stage,
            "ingest",
            "--dataset",
            str(table),
            "--label-column",
            LABEL,
            "--dataset-path",
            str(art / "table"),
            "--profile-path",
            str(art / "profile.md"),
        ],
        work / "ingest.log",
        cap_gib,
        timeout_s,
    )
    result: dict[str, Any] = {"ingest": ingest, "rounds": rounds}
    if "failure" in ingest:
        result["kubetrain"] = {"failure": f"not run: ingest {ingest['failure']}"}
        return result
    clean_cmd = [
        *stage,
        "clean",
        "--seed",
        str(SEED),
        "--table-path",
        str(art / "table"),
        "--train-path",
        str(art / "train"),
        "--val-path",
        str(art / "validation"),
        "--test-path",
        str(art / "test"),
        "--report-path",
        str(art / "quality.md"),
    ]
    code = (
        "import json; from kubetrain.local.bench_scale import reference_clean; "
        f"print(json.dumps(reference_clean({str(table)!r}, {str(art / 'reference')!r})))"
    )
    runs: dict[str, list[dict[str, Any]]] = {"kubetrain": [], "reference": []}
    for _ in range(rounds):
        for side, cmd in (("kubetrain", clean_cmd), ("reference", _python("-c", code))):
            log = work / f"{'clean' if side == 'kubetrain' else 'reference'}.log"
            run = measure(cmd, log, cap_gib, timeout_s)
            if "failure" not in run:
                meta = _last_json(log.read_text())
                run |= {
                    "rows_in": meta["rows_in"],
                    "function_seconds": meta["seconds"],
                    "duplicates_removed": meta["duplicates_removed"],
                    "features_out": meta.get("features_out") or meta["splits"]["train"]["features"],
                    "splits": {k: v["rows"] for k, v in meta["splits"].items()},
                }
            runs[side].append(run)
    for side, side_runs in runs.items():
        result[side] = _median_run(side_runs)
    k, r = result["kubetrain"], result["reference"]
    if "rows_per_second" in k and "rows_per_second" in r:
        result["speedup"] = round(k["rows_per_second"] / r["rows_per_second"], 2)
        # per-class rounding of the split sizes may differ by a row per class
        tolerance = max(1, k["rows_in"] // 10_000)
        result["same_output_shape"] = k["features_out"] == r["features_out"] and all(
            abs(k["splits"][name] - r["splits"][name]) <= tolerance for name in r["splits"]
        )
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median function time (the first failure if any run failed), with
    every run's seconds and the largest peak beside it."""
    failed = [r for r in runs if "failure" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["function_seconds"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["all_function_seconds"] = [r["function_seconds"] for r in runs]
    median["peak_bytes"] = max(r["peak_bytes"] for r in runs)
    median["rows_per_second"] = round(median["rows_in"] / median["function_seconds"])
    return median


#: Address space a Spark step may map: the JVM reserves far more than it uses.
SPARK_CAP_GIB = 32.0


def spark_comparison(work: Path, timeout_s: float) -> dict[str, Any]:
    """The clean stage with ``--engine spark`` (local mode) on the table `clean_comparison`
    ingested, against the local engine's splits written there: split sizes, class
    counts and fitted statistics, and both wall times."""
    from kubetrain.data import shards

    art = work / "artifacts"
    if not (art / "train" / shards.MANIFEST).is_file():
        return {"failure": "not run: the local clean did not finish"}
    log = work / "clean-spark.log"
    spark = measure(
        [
            *_python("-m", "kubetrain.cli.stage"),
            "clean",
            "--engine",
            "spark",
            "--seed",
            str(SEED),
            "--table-path",
            str(art / "table"),
            "--train-path",
            str(art / "spark-train"),
            "--val-path",
            str(art / "spark-validation"),
            "--test-path",
            str(art / "spark-test"),
            "--report-path",
            str(art / "spark-quality.md"),
        ],
        log,
        SPARK_CAP_GIB,
        timeout_s,
    )
    if "failure" in spark:
        return spark
    spark["function_seconds"] = _last_json(log.read_text())["seconds"]
    same_counts = True
    for name in ("train", "validation", "test"):
        local, remote = (shards.read_manifest(art / f"{p}{name}") for p in ("", "spark-"))
        same_counts &= local["rows"] == remote["rows"]
        same_counts &= local["class_counts"] == remote["class_counts"]
    prep = [
        shards.read_manifest(art / f"{p}train")["stats"]["preprocessing"] for p in ("", "spark-")
    ]
    spark["same_split_sizes_and_class_counts"] = bool(same_counts)
    spark["max_statistic_difference"] = _max_difference(prep[0], prep[1])
    return spark


def _max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between the numbers of two JSON values of the same
    shape (inf when their shapes or non-numeric values differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((_max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max((_max_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object a process printed last (the stage CLI prints progress lines too)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{") :])


# --- the report --------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _seconds(n: float) -> str:
    return f"{n:6.1f} s"


def _failed_stage(run: dict[str, Any], log_text: str) -> str | None:
    """The stage a failed run died in: the runner's "<stage> | failed" line, else (a run
    killed at its time limit prints none) the kfp task that started last."""
    if "failure" not in run:
        return None
    if m := FAILED_LINE.search(log_text):
        return m.group(1)
    tasks = {k: v for k, v in run["tasks"].items() if k != "driver"}
    if not tasks:
        return None
    last = max(tasks, key=lambda k: tasks[k]["first"])
    return _stage_of().get(last, last)


def _short(failure: str) -> str:
    """A failure as it fits in a table cell; the full line is printed under the table."""
    failure = failure.removeprefix("failed: ")
    return failure if failure.startswith(("out of memory", "timed out")) else "failed"


def _stage_cells(run: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Per pipeline stage (registry order): (row label, cell) with the stage's sampled
    peak RSS and seconds, or why there is none."""
    from kubetrain import registry  # here: the reference clean's process stays pandas-only

    cells: dict[str, tuple[str, str]] = {}
    tasks = run.get("tasks", {})
    failed = run.get("failed_stage")
    reached = True
    for name in registry.STAGE_NAMES:
        ran = [s for s in registry.STAGES if s.stage == name and _fn(s) in tasks]
        if ran:
            t = tasks[_fn(ran[0])]
            cell = f"{_gib(t['peak_bytes'])} {_seconds(t['seconds'])}"
            if name == failed:
                cell = f"{_gib(t['peak_bytes'])} {_short(run['failure'])}"
                reached = False
            cells[name] = (ran[0].display, cell)
        elif name != "publish":
            cells[name] = (name, "not reached" if "failure" in run and not reached else "-")
            if "failure" in run and reached and failed is None:
                cells[name] = (name, _short(run["failure"]))
                reached = False
    for name in sorted(set(tasks) - set(_stage_of()) - {"driver"}):  # e.g. an exit handler
        cells[name] = (
            name,
            f"{_gib(tasks[name]['peak_bytes'])} {_seconds(tasks[name]['seconds'])}",
        )
    if "driver" in tasks:
        cells["driver"] = ("driver (kubetrain run)", f"{_gib(tasks['driver']['peak_bytes'])}")
    return cells


def _fn(stage: Stage) -> str:
    """The kfp function name a stage's task process runs (`--function_to_execute`)."""
    return stage.task.replace("-", "_")


def _stage_of() -> dict[str, str]:
    """kfp function name -> pipeline stage."""
    from kubetrain import registry

    return {_fn(s): s.stage for s in registry.STAGES}


def largest_stage(run: dict[str, Any]) -> int:
    """The largest sampled peak of the run's kfp tasks (the driver not counted)."""
    return max(
        (t["peak_bytes"] for n, t in run.get("tasks", {}).items() if n != "driver"), default=0
    )


def report(result: dict[str, Any]) -> str:
    """The table `make bench-scale` prints."""
    runs: dict[str, dict[str, Any]] = result["pipeline"]
    sizes = list(runs)
    lines = [
        f"kubetrain bench-scale | {os.cpu_count()} cores, {result['machine_gib']:.1f} GiB RAM "
        f"| cap {result['memory_cap_gib']:g} GiB address space per process, "
        f"{result['timeout_s']:.0f} s per step | stage memory budget "
        f"{result.get('memory_budget', 'auto')}",
        "",
        "Tables (30 columns: 26 numeric, 3 categorical, label; ~1% duplicate rows)",
    ]
    for rows, t in result["tables"].items():
        lines.append(
            f"  {int(rows):>12,} rows  {t['bytes'] / 2**20:8.1f} MiB parquet  "
            + ("reused" if t["reused"] else f"generated in {t['seconds']:.1f} s")
        )
    width = 36
    lines += [
        "",
        "Pipeline: peak RSS and seconds per stage (kubetrain run, kfp.local; one process a "
        "task, sampled)",
        f"  {'stage':<24}" + "".join(f"{f'{int(s):,} rows':>{width}}" for s in sizes),
    ]
    cells = {s: _stage_cells(runs[s]) for s in sizes}
    for key in dict.fromkeys(k for s in sizes for k in cells[s]):
        label = next(cells[s][key][0] for s in sizes if key in cells[s])
        lines.append(
            f"  {label:<24}" + "".join(f"{cells[s].get(key, ('', '-'))[1]:>{width}}" for s in sizes)
        )
    lines.append(
        f"  {'whole run (exact peak)':<24}"
        + "".join(
            f"{_gib(runs[s]['peak_bytes']) + ' ' + _seconds(runs[s]['seconds']):>{width}}"
            for s in sizes
        )
    )
    for s in sizes:
        lines.append(f"  {int(s):,} rows: {runs[s].get('failure', 'succeeded')}")
        sampled = largest_stage(runs[s])
        if sampled and abs(sampled - runs[s]["peak_bytes"]) > 0.05 * runs[s]["peak_bytes"]:
            lines.append(
                f"    note: largest sampled stage peak {_gib(sampled)} differs from the "
                f"exact peak {_gib(runs[s]['peak_bytes'])} by more than 5%"
            )
    lines += ["", "Targets"]
    for name, value, verdict in result["targets"]:
        lines.append(f"  {name:<44}{value:<38}{verdict}")
        if len(name) >= 44 or len(value) >= 38:  # a long row: its verdict on its own line
            lines[-1:] = [f"  {name}", f"  {'':<44}{value:<38}{verdict}"]
    c = result["clean"]
    lines += [
        "",
        f"Clean throughput on the {int(c['rows']):,}-row table (dedup, stratified split, "
        "median impute, one-hot, standard scaling)",
        f"  {'':<26}{'rows/s':>10}{'seconds':>10}{'process s':>11}{'peak RSS':>11}",
    ]
    for label, key in (
        ("kubetrain clean stage", "kubetrain"),
        ("pandas + scikit-learn", "reference"),
    ):
        rec = c[key]
        if "rows_per_second" in rec:
            lines.append(
                f"  {label:<26}{rec['rows_per_second']:>10,}{rec['function_seconds']:>10.1f}"
                f"{rec['seconds']:>11.1f}{_gib(rec['peak_bytes']):>11}"
            )
        else:
            lines.append(f"  {label:<26}{rec['failure']}")
    if "speedup" in c:
        lines.append(
            f"  kubetrain / reference: {c['speedup']:.2f}x "
            f"(target >= {TARGETS['clean_speedup']:g}x); same split sizes (to 0.01%) and features: "
            f"{'yes' if c['same_output_shape'] else 'NO'}"
        )
        lines.append(
            f"  median of {c.get('rounds', 1)} alternating runs each; function seconds: "
            f"kubetrain {c['kubetrain'].get('all_function_seconds')}, "
            f"reference {c['reference'].get('all_function_seconds')}"
        )
    sp = result.get("spark", {})
    lines += ["", f"Spark engine (local mode) vs local engine, clean on {int(c['rows']):,} rows"]
    if "failure" in sp:
        lines.append(f"  spark: {sp['failure']}")
    elif sp:
        k = c["kubetrain"]
        lines += [
            f"  {'':<26}{'seconds':>10}{'process s':>11}{'peak RSS':>11}",
            f"  {'local engine':<26}{k.get('function_seconds', 0):>10.1f}"
            f"{k.get('seconds', 0):>11.1f}"
            f"{_gib(k.get('peak_bytes', 0)):>11}",
            f"  {'spark engine':<26}{sp['function_seconds']:>10.1f}{sp['seconds']:>11.1f}"
            f"{_gib(sp['peak_bytes']):>11}  (driver process tree)",
            "  identical split sizes and class counts: "
            f"{'yes' if sp['same_split_sizes_and_class_counts'] else 'NO'}; largest difference "
            f"of a fitted statistic: {sp['max_statistic_difference']:.2e}",
        ]
    return "\n".join(lines)


def training_comparison(rows: int, work: Path, epochs: int = 2) -> dict[str, Any]:
    """Rows/s of `fit` on a split held in memory vs the same split streamed from its shards.

    Same model (the default MLP), same batch (scaled with the data), same epochs,
    in this process one after the other; the streamed run reads with the
    DataLoader workers `fit` uses. Synthetic 22-feature blobs: only the data
    path differs, not what is learned.
    """
    from kubetrain.config.settings import HyperConfig, TrainConfig
    from kubetrain.data import shards
    from kubetrain.data.datasets import Schema
    from kubetrain.training import loop
    from kubetrain.training.stream import Streamed

    rng = np.random.default_rng(SEED)
    features = 22
    y = rng.integers(0, 3, rows)
    centers = rng.normal(0, 2, (3, features))
    X = (centers[y] + rng.normal(0, 1, (rows, features))).astype(np.float32)
    schema = Schema("table", [f"f{i}" for i in range(features)], ["a", "b", "c"])
    split = work / "train-shards"
    shutil.rmtree(split, ignore_errors=True)
    shards.write(split, X, y, schema)
    Xv, yv = X[:20_000].copy(), y[:20_000].copy()
    train, hyper = TrainConfig(device="cpu"), HyperConfig()
    seconds = {}
    for name, data in (("memory", (X, y)), ("shards", Streamed.open(str(split)))):
        started = time.perf_counter()
        result = loop.fit(train, hyper, SEED, data, (Xv, yv), schema, epochs, verbose=False)
        seconds[name] = time.perf_counter() - started
        print(
            f"bench-scale | training {name}: {rows * epochs / seconds[name]:,.0f} rows/s, "
            f"batch {result.metrics['batch_rows']}",
            flush=True,
        )
    shutil.rmtree(split, ignore_errors=True)
    memory, streamed = (rows * epochs / seconds[k] for k in ("memory", "shards"))
    return {
        "rows": rows,
        "epochs": epochs,
        "memory_rows_per_s": round(memory),
        "shards_rows_per_s": round(streamed),
        "ratio": round(streamed / memory, 3),
    }


def targets(result: dict[str, Any], small: str, big: str | None) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows; a value that could not be measured says why."""
    runs = result["pipeline"]
    rows: list[tuple[str, str, str]] = []
    peak_name = f"peak(big)/peak(small) <= {TARGETS['peak_ratio']:g}"
    if big is None:
        rows.append((peak_name, "not run (--skip-big)", "-"))
    elif "failure" in runs[small]:
        rows.append((peak_name, f"no ratio: {_short(runs[small]['failure'])}", "MISS"))
    elif "failure" in runs[big]:
        # the big run's true peak is at least what it reached before failing
        ratio = runs[big]["peak_bytes"] / runs[small]["peak_bytes"]
        rows.append((peak_name, f">= {ratio:.2f} ({_short(runs[big]['failure'])})", "MISS"))
    else:
        ratio = runs[big]["peak_bytes"] / runs[small]["peak_bytes"]
        result["peak_ratio"] = round(ratio, 3)
        rows.append((peak_name, f"{ratio:.2f}", _verdict(ratio <= TARGETS["peak_ratio"])))
    for size in (s for s in (small, big) if s is not None):
        run = runs[size]
        peak = run["peak_bytes"]
        state = "" if "failure" not in run else " (before it failed)"
        rows.append(
            (
                f"absolute peak <= {TARGETS['peak_gib']:g} GiB at {int(size):,} rows",
                f"{_gib(peak)}{state}",
                _verdict(peak <= TARGETS["peak_gib"] * GIB and "failure" not in run),
            )
        )
    c = result["clean"]
    rows.append(
        (
            f"clean speedup vs pandas+sklearn >= {TARGETS['clean_speedup']:g}x",
            f"{c['speedup']:.2f}x" if "speedup" in c else "not measured (a side failed)",
            _verdict(c.get("speedup", 0) >= TARGETS["clean_speedup"]),
        )
    )
    sp = result.get("spark", {})
    rows.append(
        (
            "spark = local: split sizes, class counts, stats within 1e-6",
            "not measured: " + _short(sp["failure"])
            if "failure" in sp
            else f"counts {'equal' if sp['same_split_sizes_and_class_counts'] else 'DIFFER'}, "
            f"stats within {sp['max_statistic_difference']:.1e}",
            _verdict(
                "failure" not in sp
                and sp["same_split_sizes_and_class_counts"]
                and sp["max_statistic_difference"] <= 1e-6
            ),
        )
    )
    s = result.get("training")
    if s:
        rows.append(
            (
                f"training from shards >= {TARGETS['stream_ratio']:g}x in-memory rows/s",
                f"{s['ratio']:.2f}x ({s['shards_rows_per_s']:,} vs {s['memory_rows_per_s']:,})",
                _verdict(s["ratio"] >= TARGETS["stream_ratio"]),
            )
        )
    return rows


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetrain.local.bench_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="the small table (1M)")
    parser.add_argument("--big-rows", type=int, default=10_000_000, help="the big table (10M)")
    parser.add_argument("--skip-big", action="store_true", help="measure the small table only")
    parser.add_argument(
        "--out",
        default="runs/bench-scale",
        help="tables (kept, reused), logs and bench-scale.json (default: runs/bench-scale)",
    )
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        default=MEMORY_CAP_GIB,
        help=f"address-space cap per process of a measured step (default {MEMORY_CAP_GIB:g})",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=TIMEOUT_SECONDS,
        help=f"time limit per measured step (default {TIMEOUT_SECONDS})",
    )
    parser.add_argument(
        "--memory-budget",
        default=MEMORY_BUDGET,
        help="KUBETRAIN_MEMORY_BUDGET of the measured runs: what a stage may hold before it "
        f"streams (default {MEMORY_BUDGET}; '' = auto, 40%% of RAM)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed (default: 0)"
    )
    args = parser.parse_args(argv)
    if args.memory_budget:
        parse_bytes(args.memory_budget, "--memory-budget")
        os.environ["KUBETRAIN_MEMORY_BUDGET"] = args.memory_budget  # every measured child
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    small = str(args.rows)
    big = None if args.skip_big else str(args.big_rows)
    sizes = [s for s in (small, big) if s is not None]
    result: dict[str, Any] = {
        "memory_budget": args.memory_budget or "auto",
        "machine_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "memory_cap_gib": args.memory_cap_gib,
        "timeout_s": args.timeout_s,
        "tables": {},
        "pipeline": {},
    }
    for size in sizes:
        print(f"bench-scale | table of {int(size):,} rows", flush=True)
        result["tables"][size] = cached_table(out, int(size))
    for size in sizes:
        print(f"bench-scale | pipeline on {int(size):,} rows", flush=True)
        table = Path(result["tables"][size]["path"])
        run = pipeline_run(table, out / f"work-{size}", args.memory_cap_gib, args.timeout_s)
        shutil.rmtree(out / f"work-{size}" / "runs", ignore_errors=True)  # GBs of splits
        result["pipeline"][size] = run
        print(f"bench-scale | {run.get('failure', 'succeeded')} in {run['seconds']:.1f} s")
    print(f"bench-scale | clean vs pandas + scikit-learn on {int(small):,} rows", flush=True)
    clean = clean_comparison(
        Path(result["tables"][small]["path"]),
        out / f"work-{small}",
        args.memory_cap_gib,
        args.timeout_s,
    )
    result["clean"] = clean | {"rows": small}
    print(f"bench-scale | spark engine vs local engine on {int(small):,} rows", flush=True)
    result["spark"] = spark_comparison(out / f"work-{small}", args.timeout_s)
    shutil.rmtree(out / f"work-{small}" / "artifacts", ignore_errors=True)  # GBs of splits
    print(f"bench-scale | training in memory vs from shards on {int(small):,} rows", flush=True)
    result["training"] = training_comparison(int(small), out / f"work-{small}")
    result["targets"] = targets(result, small, big)
    print()
    print(report(result))
    (out / "bench-scale.json").write_text(json.dumps(result, indent=2))
    print(f"\nresults: {out / 'bench-scale.json'}; logs: {out}/work-*/")
    missed = any(verdict == "MISS" for _, _, verdict in result["targets"])
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
