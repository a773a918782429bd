"""What every rank of a distributed training runs (under torchrun).

    torchrun --nproc-per-node N -m kubetrain.cli.train_entry \\
        --train URI --validation URI --output URI \\
        [--hyperparameters JSON] [--settings JSON] [--checkpoint-dir DIR] [--epochs 5 ...]

Locally `kubetrain.training.distributed.run_local_ddp` starts it (``--nproc N``); on a
cluster it is the command of the Kubeflow Trainer TrainJob
(`kubetrain.cluster.trainjob`), whose torch plugin hands torchrun the node topology
through ``PET_*`` variables. URIs are ``s3://`` (credentials from the standard
AWS variables plus ``S3_ENDPOINT_URL``) or local paths.

Every rank fetches both splits and trains (`kubetrain.training.loop.fit` shards the
work). A training split over the memory budget is not loaded: every rank streams
its share of the shards (`kubetrain.training.stream.training_split`, as the
single-process train stage does); the validation split stays in memory. The ranks
agree first, so all of them stream when any one's budget is too small (in-memory
and streamed epochs run different step counts, and DDP would hang on the
difference). Rank 0 trains through `kubetrain.stages.train_stage`, so the model
bundle, metrics and report are exactly the single-process stage's, written to
a temporary folder and then copied to ``--output``::

    <output>/model/{weights.pt,spec.json,info.json}
    <output>/metrics.json
    <output>/report.html
    <output>/meta.json        (train_stage's return value; written last)

A failing rank prints ``kubetrain | train | rank R failed: <Error>: <message>``
and exits 1; torchrun then stops the other ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from kubetrain.config import flags
from kubetrain.config.settings import RunConfig
from kubetrain.core import progress, storage
from kubetrain.core.errors import KubetrainError
from kubetrain.core.memory import fits
from kubetrain.data import shards
from kubetrain.training import distributed, stream


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubetrain.cli.train_entry",
        description="One rank of a data-parallel training (run it with torchrun).",
    )
    p.add_argument("--train", required=True, help="Training split: s3:// URI or local folder.")
    p.add_argument("--validation", required=True, help="Validation split: s3:// URI or folder.")
    p.add_argument(
        "--output",
        required=True,
        help="Where rank 0 writes model/, metrics.json, report.html, meta.json.",
    )
    p.add_argument(
        "--hyperparameters",
        default="{}",
        help="JSON object of tuned values (learning_rate, width, ...).",
    )
    p.add_argument(
        "--settings",
        default="{}",
        help="JSON object of RunConfig settings; the flags below override it.",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="Folder of rank 0's per-epoch checkpoint (resumes from it).",
    )
    flags.add_arguments(p, "seed", "train", "hyper", "final")
    return p


def config_of(args: argparse.Namespace) -> RunConfig:
    """``--settings`` overridden by explicit flags, then ``--hyperparameters``: parsed once."""
    given = flags.json_object(args.settings, "--settings") | flags.given(
        args, "seed", "train", "hyper", "final"
    )
    cfg = RunConfig.from_flat(given)
    tuned = flags.json_object(args.hyperparameters, "--hyperparameters")
    return dataclasses.replace(cfg, hyper=cfg.hyper.replace(tuned))


def _publish(local: Path, output: str) -> None:
    """Copy rank 0's outputs to ``output``; meta.json last, so its presence means done."""
    meta = local / distributed.OUTPUT_META
    dest = output.rstrip("/")
    for item in sorted(local.iterdir()):
        if item != meta:
            storage.upload(item, f"{dest}/{item.name}")
    storage.upload(meta, f"{dest}/{meta.name}")


#: The variable `kubetrain.core.memory.memory_budget` reads.
BUDGET_ENV = "KUBETRAIN_MEMORY_BUDGET"


def agree_on_streaming(train_dir: str | os.PathLike) -> bool:
    """Whether the ranks stream the training split: yes on every rank when it is over any
    rank's memory budget. A rank whose own budget would hold the split lowers it to just
    below the split's size, so its `stream.training_split` (rank 0's inside `train_here`)
    streams too. A collective: every rank calls it, before loading."""
    if not shards.is_sharded(train_dir):  # the previous format has no shards to stream
        return False
    nbytes = stream.Streamed.open(str(train_dir)).nbytes
    streamed = distributed.any_rank(not fits(nbytes))
    if streamed and fits(nbytes):
        os.environ[BUDGET_ENV] = str(nbytes - 1)
    return streamed


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train this rank; rank 0 returns the train stage's meta, the others None."""
    from kubetrain.data.datasets import load_split
    from kubetrain.training.loop import fit

    cfg = config_of(args)
    backend = "gloo" if cfg.train.device == "cpu" else None
    with (
        distributed.init(backend=backend) as me,
        tempfile.TemporaryDirectory(prefix=f"kubetrain-rank{me.rank}-") as tmp,
    ):
        work = Path(tmp)
        train_dir = storage.local_dir(args.train, work / "train")
        val_dir = storage.local_dir(args.validation, work / "validation")
        agree_on_streaming(train_dir)
        if me.rank == 0:
            from kubetrain.stages import TrainRequest, train_here  # reports and plots: rank 0

            progress.log(
                "train",
                f"data-parallel over {me.world_size} process(es), backend {backend or 'auto'}",
            )
            out = work / "out"
            out.mkdir()
            # The same call sequence as the other ranks below: train_here -> fit(...).
            meta = train_here(
                TrainRequest(
                    str(train_dir),
                    str(val_dir),
                    str(out / distributed.OUTPUT_MODEL),
                    str(out / distributed.OUTPUT_METRICS),
                    str(out / distributed.OUTPUT_REPORT),
                    cfg.train,
                    cfg.hyper,
                    cfg.final,
                    cfg.seed,
                    checkpoint_dir=args.checkpoint_dir,
                )
            )
            meta = {**meta, "processes": me.world_size}
            (out / distributed.OUTPUT_META).write_text(json.dumps(meta, indent=2, default=str))
            _publish(out, args.output)
            return meta
        # What train_here does before and around fit, minus every write: the training
        # split in memory when it fits the budget, else streamed from its shards.
        train_data, schema = stream.training_split(str(train_dir))
        Xv, yv, _ = load_split(val_dir)
        fit(
            cfg.train,
            cfg.hyper,
            cfg.seed,
            train_data,
            (Xv, yv),
            schema,
            cfg.final.epochs_for(schema.kind),
            checkpoint_dir=args.checkpoint_dir,
        )
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - one line per failing rank, then exit 1
        rank = os.environ.get("RANK", "0")
        if not isinstance(exc, KubetrainError):
            traceback.print_exc()
        print(
            f"{progress.PREFIX} train | rank {rank} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
