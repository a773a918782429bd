"""`kubetrain`: run the pipeline locally, or compile it for Kubeflow.

    kubetrain run --dataset breast_cancer --epochs 5
    kubetrain compile --target cluster
    kubetrain submit --host http://localhost:8080 --wait
    kubetrain render --num-nodes 2
    kubetrain serve --bundle s3://models/digits/run-1234/

Errors a user can fix print as one line (`error: ...`) with exit code 2; a
run whose model fails the quality gate exits 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetrain.config import cluster as cluster_config
from kubetrain.config import flags
from kubetrain.core.errors import KubetrainError

COMPILED = Path("pipelines/compiled")


def _run(args: argparse.Namespace) -> int:
    from kubetrain.local.runner import run_local, storage_error, summary_table

    cfg = flags.from_arguments(args)
    try:
        summary = run_local(cfg, runs_dir=args.runs_dir, cache=not args.no_cache)
    except OSError as exc:  # a full or read-only disk the runner did not already name
        if (error := storage_error(exc, Path(args.runs_dir).resolve())) is None:
            raise
        raise error from None
    print(summary_table(summary))
    if not summary["quality_gate"]["passed"]:
        print(
            f"error: {summary['quality_gate']['reason']}; compression skipped (lower "
            f"--{'min-r2' if summary.get('task') == 'regression' else 'min-accuracy'} or "
            "improve the model)",
            file=sys.stderr,
        )
        return 3
    return 0


def _compile(args: argparse.Namespace) -> int:
    from kubetrain.cluster.compile import compile_pipeline

    path = compile_pipeline(
        args.target, Path(args.output) if args.output else None, cluster_config.from_arguments(args)
    )
    print(f"kubetrain | compile | wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline locally with kfp.local")
    flags.add_arguments(run)
    run.add_argument("--runs-dir", default="runs", help="where runs/<run-id>/ goes")
    run.add_argument("--no-cache", action="store_true", help="re-run every stage")
    run.set_defaults(func=_run)
    comp = sub.add_parser("compile", help="write the pipeline YAML for the Kubeflow UI")
    comp.add_argument("--target", choices=("local", "cluster"), default="local")
    comp.add_argument("--output", default="", help="YAML path (default pipelines/compiled/)")
    cluster_config.add_arguments(comp.add_argument_group("cluster placement (--target cluster)"))
    comp.set_defaults(func=_compile)
    from kubetrain.cluster import render, submit

    submit.add_parser(sub)
    render.add_parser(sub)
    from kubetrain.cli import serve

    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KubetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
