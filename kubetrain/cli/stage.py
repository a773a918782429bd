"""Run one pipeline stage by hand: `python -m kubetrain.cli.stage <stage> --help`.

How an operator debugs a single stage inside the image, outside Kubeflow:

    docker run IMAGE python -m kubetrain.cli.stage ingest --dataset digits \\
        --dataset-path /tmp/ds --profile-path /tmp/profile.md

Each subcommand calls the same `kubetrain.stages` function its KFP component
calls (`kubetrain.registry` lists them). Artifact flags (`--<name>-path`,
`--checkpoint-dir`) come from that function's signature; setting flags are
exactly those of the config sections the function takes, with the same names,
help and defaults as `kubetrain run`. Progress lines go to stderr, the stage's
metadata as JSON to stdout; a `KubetrainError` prints `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from typing import Any

from kubetrain.cluster.backends import cleaner_for, trainer_for, tuner_for
from kubetrain.config import flags
from kubetrain.config.settings import SECTIONS, SEED, RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.registry import CLI_STAGES, Stage

#: Parameters filled here, not from flags: the backends chosen for a local run.
BACKENDS = ("cleaner", "tuner", "trainer")


def _add_stage(sub: argparse._SubParsersAction, stage: Stage) -> None:
    func = stage.function
    parser = sub.add_parser(
        stage.stage,
        help=stage.description,
        description=(
            f"{stage.description} Calls kubetrain.stages.{func.__name__}, like the KFP component."
        ),
    )
    paths = parser.add_argument_group("artifacts")
    settings = parser.add_argument_group("settings")
    for f in stage.settings:
        flags.add_argument(settings, f)
    for p in inspect.signature(func).parameters.values():
        if p.name in SECTIONS or p.name == SEED or p.name in BACKENDS:
            continue
        if p.name.endswith(("_path", "_dir")):
            required = p.default is inspect.Parameter.empty
            paths.add_argument(
                flags.flag_of(p.name),
                dest=p.name,
                required=required,
                metavar="PATH",
                default=None if required else p.default,
                help="artifact directory or file" if required else f"(default: {p.default})",
            )
        elif p.name == "hyperparameters":
            parser.add_argument(
                "--hyperparameters",
                default="{}",
                metavar="JSON",
                help="tuned values as a JSON object, e.g. the tune stage's "
                "best_hyperparameters (default: {})",
            )
        else:
            parser.add_argument(
                flags.flag_of(p.name),
                dest=p.name,
                metavar="TEXT",
                default="" if p.default is inspect.Parameter.empty else p.default,
                help=f"{p.name} (default: {p.default!r})",
            )
    parser.set_defaults(stage=stage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kubetrain.cli.stage", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="stage_name", required=True, metavar="STAGE")
    for stage in CLI_STAGES:
        _add_stage(sub, stage)
    return parser


def _call(args: argparse.Namespace) -> Any:
    stage: Stage = args.stage
    # parsed and validated once (a stage without settings sections reads none)
    given = {f.name: getattr(args, f.name) for f in stage.settings}
    cfg = RunConfig.from_flat({k: v for k, v in given.items() if v is not None})
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(stage.function).parameters.values():
        if p.name == SEED:
            kwargs[p.name] = cfg.seed
        elif p.name in SECTIONS:
            kwargs[p.name] = getattr(cfg, p.name)
        elif p.name == "cleaner":
            kwargs[p.name] = cleaner_for(cfg.clean)
        elif p.name == "tuner":
            kwargs[p.name] = tuner_for(None)
        elif p.name == "trainer":
            kwargs[p.name] = trainer_for(cfg.final)
        elif p.name == "hyperparameters":
            kwargs[p.name] = flags.json_object(args.hyperparameters, "--hyperparameters")
        else:
            kwargs[p.name] = getattr(args, p.name)
    with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the JSON
        result = stage.function(**kwargs)
    if stage.stage == "tune":
        best, tuning = result
        result = {"best_hyperparameters": best, "tuning": tuning}
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = _call(args)
    except KubetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
