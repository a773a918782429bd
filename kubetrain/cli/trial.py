"""One Katib trial: `python -m kubetrain.cli.trial --train URI --validation URI --width N ...`.

Katib runs this in each trial pod (see `kubetrain.cluster.katib.experiment`). It reads
both splits straight from the upstream artifacts' URIs (s3:// or a local
directory; no PVC), then calls `tuning.run_trial`, the same function every
local Optuna trial calls, so a trial means the same thing on a laptop and on
the cluster. Every setting of the sections a trial reads (`SECTIONS`: the
recipe, the tunables, the search, the seed) is a flag (`kubetrain.config.flags`),
parsed once into typed sections; the searched ones (`tuning.search_space()`) are
among them.

Output follows Katib's StdOut metrics collector: per epoch one
`<RFC3339 timestamp> <metric>=<value>` line per metric (the timestamp is how
Katib's median stopping orders the reports), then the restored best epoch's
metrics last, which the Experiment's `latest` metric strategy picks up. Other
lines never contain a metric name, so the collector ignores them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from kubetrain.config import flags
from kubetrain.core import progress, storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import load_split

#: The keys of `tuning.GOALS` (a test pins them equal), written out so that a bad
#: command line fails before torch is imported.
METRICS = ("validation-accuracy", "validation-loss", "validation-r2", "validation-rmse")
#: The settings a trial reads: what `tuning.run_trial` takes.
SECTIONS = ("train", "hyper", "tune", "seed")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage: errors stay one line."""

    def error(self, message: str):  # type: ignore[override]
        raise KubetrainError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m kubetrain.cli.trial",
        description="Run one tuning trial and print metrics for Katib.",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="Training split: s3:// URI or local directory (Parquet shards + _manifest.json).",
    )
    parser.add_argument(
        "--validation", required=True, help="Validation split: s3:// URI or local directory."
    )
    parser.add_argument(
        "--checkpoint-root",
        default="",
        help="Where trials keep resumable checkpoints (s3:// prefix or folder), keyed by the "
        "data and the trial's settings: a re-created trial pod resumes (default: none).",
    )
    flags.add_arguments(parser, *SECTIONS)  # the searched ones included
    return parser


def timestamp() -> str:
    """UTC RFC 3339 with microseconds, which Go's time.RFC3339Nano parses (Katib's collector)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def metric_lines(metrics: Mapping[str, float], when: str | None = None) -> list[str]:
    """`<timestamp> name=value` per metric; repr keeps full precision and parses back exactly."""
    when = when or timestamp()
    return [f"{when} {name}={float(metrics[name])!r}" for name in METRICS if name in metrics]


def report(metrics: Mapping[str, float], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for line in metric_lines(metrics):
        print(line, file=out)
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one trial; 0 on success, 2 with one `error: ...` line on a fixable problem."""
    try:
        args = build_parser().parse_args(argv)
        cfg = flags.from_arguments(args, *SECTIONS)
        # torch: only once the arguments are known good
        from kubetrain.training import checkpoint, tuning

        with tempfile.TemporaryDirectory(prefix="kubetrain-trial-") as tmp:
            train_dir = storage.local_dir(args.train, Path(tmp) / "train")
            val_dir = storage.local_dir(args.validation, Path(tmp) / "validation")
            # a stratified sample when over the memory budget, as in local tuning
            (X, y), schema = tuning.tuning_split(str(train_dir), cfg.seed)
            Xv, yv, _ = load_split(val_dir)
            settings = {**cfg.flat(*SECTIONS), "role": "trial"}
            where = (
                checkpoint.stable_dir(args.checkpoint_root, str(train_dir), str(val_dir), settings)
                if args.checkpoint_root
                else None
            )
        progress.log(
            "trial",
            f"{len(X)} training / {len(Xv)} validation rows; "
            + ", ".join(f"{k} {v}" for k, v in cfg.hyper.to_dict().items())
            + f"; {cfg.tune.tune_epochs} epochs",
        )

        def hook(epoch: int, metrics: dict[str, float]) -> bool:
            report(metrics)
            return False  # Katib's median stopping ends weak trials from outside

        with checkpoint.mirrored(where) as (checkpoint_dir, after_epoch):
            final = tuning.run_trial(
                cfg.train,
                cfg.hyper,
                cfg.tune,
                cfg.seed,
                (X, y),
                (Xv, yv),
                schema,
                checkpoint.chain(after_epoch, hook),
                checkpoint_dir=checkpoint_dir,
            )
        report(final)  # the restored best epoch: what `latest` scores the trial by
        progress.log("trial", f"done after {final['epochs']} epochs")
        return 0
    except KubetrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
