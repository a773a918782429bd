"""What the driver of a clean SparkApplication runs (the Spark engine on a cluster).

    spark-submit .../kubetrain/cli/spark_clean.py \\
        --table URI --train URI --validation URI --test URI --meta URI \\
        [--seed N] [--impute median --scaling standard ...]

`kubetrain.cluster.spark` creates the SparkApplication whose ``mainApplicationFile``
is this file and whose arguments are these flags; the clean step's pod follows
it and then copies the three splits into its KFP output artifacts. URIs are
``s3://`` (credentials from the standard AWS variables plus
``S3_ENDPOINT_URL``) or local paths. The splits are sharded datasets
(`kubetrain.data.shards`, manifest last); ``--meta`` receives the clean
stage's metadata as JSON, written after the splits, so its presence means the
job finished. A failure prints one ``kubetrain | clean | error: ...`` line and
exits 2 (1 for a bug, with its traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kubetrain.config import flags
from kubetrain.config.settings import RunConfig, seed_field
from kubetrain.core.errors import KubetrainError

URI_FLAGS = ("table", "train", "validation", "test", "meta")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark_clean.py", description="The clean stage on Spark (a SparkApplication driver)."
    )
    for name in URI_FLAGS:
        p.add_argument(f"--{name}", required=True, metavar="URI")
    flags.add_arguments(p, "clean")
    flags.add_argument(p, seed_field())
    return p


def run(argv: list[str] | None = None) -> dict:
    from kubetrain.core import storage
    from kubetrain.data.clean_spark import clean_spark

    args = parser().parse_args(argv)
    given = flags.given(args, "clean")
    if args.seed is not None:
        given["seed"] = args.seed
    cfg = RunConfig.from_flat(given)
    meta = clean_spark(args.table, args.train, args.validation, args.test, cfg.clean, cfg.seed)
    body = json.dumps(meta, indent=2, default=str)
    if storage.is_s3(args.meta):
        with tempfile.TemporaryDirectory(prefix="kubetrain-spark-") as tmp:
            local = Path(tmp) / "meta.json"
            local.write_text(body)
            storage.upload(local, args.meta)
    else:
        Path(args.meta).parent.mkdir(parents=True, exist_ok=True)
        Path(args.meta).write_text(body)
    return meta


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except KubetrainError as exc:
        print(f"kubetrain | clean | error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
