"""Run one pipeline stage by hand: `python -m kubetrain.cli.stage <stage> --help`.

How an operator debugs a single stage inside the image, outside Kubeflow:

    docker run IMAGE python -m kubetrain.cli.stage ingest --source digits \\
        --dataset-path /tmp/ds --profile-path /tmp/profile.md

Each subcommand calls the same `kubetrain.stages` function its KFP component
calls. Artifact flags (`--<name>-path`, `--checkpoint-dir`) come from that
function's signature; setting flags come from `RunConfig` (same names, help
and defaults as `kubetrain run`). Progress lines go to stderr, the stage's
metadata as JSON to stdout; a `KubetrainError` prints `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from typing import Any, Callable

from kubetrain import stages
from kubetrain.config.settings import RunConfig, add_argument, fields_of, json_object
from kubetrain.core.errors import KubetrainError

#: stage -> (function, RunConfig stages whose fields make up its `settings`, description).
STAGES: dict[str, tuple[Callable[..., Any], tuple[str, ...], str]] = {
    "ingest": (stages.ingest_stage, (), "Read a dataset into a validated table "
               "(writes --dataset-path, --profile-path)."),
    "clean": (stages.clean_stage, ("clean",), "Impute, handle outliers, scale and split "
              "--table-path into --train-path, --val-path, --test-path."),
    "augment": (stages.augment_stage, ("augment",), "Augment the training split "
                "--train-path into --out-path."),
    "tune": (stages.tune_stage, ("train", "tune"), "Search hyperparameters on --train-path "
             "/ --val-path; prints best_hyperparameters for `train --hyperparameters`."),
    "train": (stages.train_stage, ("train",), "Train on --train-path with early stopping "
              "on --val-path; writes --model-path and --metrics-path."),
    "evaluate": (stages.evaluate_stage, (), "Score --model-path on --test-path and apply "
                 "the --min-accuracy quality gate."),
    "compress": (stages.compress_stage, ("compress",), "Prune, quantize and export "
                 "--model-path to ONNX under --out-path; keep the smallest within budget."),
}
#: function parameters that are a RunConfig field under another name.
ALIASES = {"source": "dataset"}
FIELDS = {f.name: f for f in fields_of()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_stage(sub: argparse._SubParsersAction, name: str) -> None:
    func, setting_stages, doc = STAGES[name]
    parser = sub.add_parser(name, help=doc, description=f"{doc} Calls "
                            f"kubetrain.stages.{func.__name__}, like the KFP component.")
    paths = parser.add_argument_group("artifacts")
    settings = parser.add_argument_group("settings")
    for p in inspect.signature(func).parameters.values():
        field = FIELDS.get(ALIASES.get(p.name, p.name))
        if p.name == "settings":
            for stage in setting_stages:
                for f in fields_of(stage):
                    add_argument(settings, f)
        elif field is not None:
            add_argument(settings, field, _flag(p.name))
        elif p.name.endswith(("_path", "_dir")):
            required = p.default is inspect.Parameter.empty
            paths.add_argument(_flag(p.name), dest=p.name, required=required, metavar="PATH",
                               default=None if required else p.default,
                               help="artifact directory or file" if required
                               else f"(default: {p.default})")
        elif p.name == "hyperparameters":
            parser.add_argument("--hyperparameters", default="{}", metavar="JSON",
                                help="tuned values as a JSON object, e.g. the tune stage's "
                                     "best_hyperparameters (default: {})")
        else:
            parser.add_argument(_flag(p.name), dest=p.name, metavar="TEXT",
                                default="" if p.default is inspect.Parameter.empty
                                else p.default, help=f"{p.name} (default: {p.default!r})")
    parser.set_defaults(stage=name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetrain.cli.stage",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGES:
        _add_stage(sub, name)
    return parser


def _call(args: argparse.Namespace) -> Any:
    func, setting_stages, _ = STAGES[args.stage]
    given = vars(args)
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(func).parameters.values():
        name = ALIASES.get(p.name, p.name)
        if p.name == "settings":
            kwargs[p.name] = {f.name: given[f.name] for s in setting_stages
                              for f in fields_of(s) if given[f.name] is not None}
        elif name in FIELDS:  # validated and typed like any other setting
            value = given[name]
            cfg = RunConfig.from_dict({} if value is None else {name: value})
            kwargs[p.name] = getattr(cfg, name)
        elif p.name == "hyperparameters":
            kwargs[p.name] = json_object(args.hyperparameters, "--hyperparameters")
        else:
            kwargs[p.name] = given[p.name]
    with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the JSON
        result = func(**kwargs)
    if args.stage == "tune":
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
