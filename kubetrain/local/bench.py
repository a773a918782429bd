"""`make bench`: the speed targets, measured on this machine.

Runs the default pipeline twice in a fresh runs directory (cold, then from the
cache) and checks the targets of the local runner: the cold run under 120 s
with test accuracy >= 0.97 on digits, the cached run under 15 s (both measured
as the whole `kubetrain run` process, start-up included for the cached run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"cold_pipeline_seconds": 120.0, "cached_run_seconds": 15.0, "min_accuracy": 0.97}


def _run(runs: Path, extra: list[str]) -> tuple[float, dict]:
    exe = Path(sys.executable).parent / "kubetrain"
    started = time.perf_counter()
    proc = subprocess.run(
        [str(exe), "run", "--runs-dir", str(runs), *extra], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"error: benchmark run failed: {proc.stderr.strip()}")
    return seconds, json.loads((runs / "latest" / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="", help="write the results as JSON here")
    args, run_flags = parser.parse_known_args(argv)  # the rest: `kubetrain run` flags
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as tmp:
        runs = Path(tmp)
        cold_wall, cold = _run(runs, run_flags)
        cached_wall, _ = _run(runs, run_flags)
    result = {
        "cold_process_seconds": round(cold_wall, 1),
        "cold_pipeline_seconds": cold["pipeline_seconds"],
        "cached_run_seconds": round(cached_wall, 1),
        "test_accuracy": cold["test_metrics"]["accuracy"],
        "stages": {s["name"]: s["seconds"] for s in cold["stages"]},
        "compressed": cold["compressed"],
    }
    checks = {
        "cold pipeline < 120 s": result["cold_pipeline_seconds"] < TARGETS["cold_pipeline_seconds"],
        "cached run < 15 s": result["cached_run_seconds"] < TARGETS["cached_run_seconds"],
        "test accuracy >= 0.97": result["test_accuracy"] >= TARGETS["min_accuracy"],
    }
    print(json.dumps(result, indent=2))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.output:
        Path(args.output).write_text(json.dumps(result | {"checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
