"""`python -m kubetrain.local.bench_shards`: the sharded split format against ``arrays.npz``.

Writes one split (default 1,000,000 rows x 22 float32 features, 3 classes) in
both formats and reports, per format, the best of ``--repeat`` write and read
times (warm page cache: what a stage reading its upstream artifact sees), the
bytes on disk, and the peak RSS of a fresh process that reads the split whole
(`load_split`) or streams it (`shards.iter_batches`). Peak RSS is measured in
a child process per reader (``VmHWM``) so one reader's peak cannot hide
another's; each child also reports its RSS after imports, before reading.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain.data import shards
from kubetrain.data.datasets import Schema, load_split, save_split, save_split_npz

MiB = 1024 * 1024


def _best(repeat: int, action: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss) starts afresh at exec, so
    a child does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(reader: str, path: str, batch_rows: int) -> None:
    """Run one reader in this (fresh) process and print its memory as JSON."""
    before = _peak_rss_mib()
    rows = 0
    if reader == "load_split":
        X, y, _ = load_split(path)
        rows = len(y)
        del X, y
    else:
        for _, y in shards.iter_batches(path, batch_rows):
            rows += len(y)
    print(json.dumps({"rows": rows, "rss_before_mib": before, "peak_rss_mib": _peak_rss_mib()}))


def _measure_rss(reader: str, path: Path, batch_rows: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetrain.local.bench_shards",
            "--child",
            reader,
            str(path),
            str(batch_rows),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_and_read(rows: int, features: int, repeat: int, workdir: Path) -> dict[str, Any]:
    """Time both formats; the arrays are freed on return, before the RSS children run."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = rng.integers(0, 3, rows)
    schema = Schema("table", [f"f{i}" for i in range(features)], ["a", "b", "c"])
    results: dict[str, Any] = {"values_mib": round((X.nbytes + y.nbytes) / MiB, 1)}
    for name, save in (("npz", save_split_npz), ("shards", save_split)):
        path = workdir / name
        write_s = _best(repeat, lambda path=path, save=save: save(path, X, y, schema))
        read_s = _best(repeat, lambda path=path: load_split(path))
        results[name] = {
            "write_s": round(write_s, 3),
            "read_s": round(read_s, 3),
            "disk_mib": round(_size(path) / MiB, 1),
            "files": len(list(path.iterdir())),
        }
    return results


def run(rows: int, features: int, repeat: int, batch_rows: int, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"rows": rows, "features": features, "repeat": repeat}
    results.update(_write_and_read(rows, features, repeat, workdir))
    old, new = workdir / "npz", workdir / "shards"
    results["npz"]["load_split_rss"] = _measure_rss("load_split", old, batch_rows)
    results["shards"]["load_split_rss"] = _measure_rss("load_split", new, batch_rows)
    results["shards"]["iter_batches_rss"] = _measure_rss("iter_batches", new, batch_rows)
    results["shards"]["iter_batches_s"] = round(
        _best(repeat, lambda: sum(len(b[1]) for b in shards.iter_batches(new, batch_rows))), 3
    )
    results["batch_rows"] = batch_rows
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=22)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=shards.DEFAULT_BATCH_ROWS)
    parser.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    parser.add_argument(
        "--child", nargs=3, metavar=("READER", "PATH", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-shards-", dir=args.dir or None) as tmp:
        results = run(args.rows, args.features, args.repeat, args.batch_rows, Path(tmp))
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
