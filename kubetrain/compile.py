"""Compile the pipeline to the YAML people upload in the Kubeflow UI."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

COMPILED_DIR = Path("pipelines/compiled")


def compile_pipeline(target: str = "local", output: Path | None = None) -> Path:
    from kubetrain.pipelines.training import build_pipeline

    if target != "local":
        from kubetrain.errors import KubetrainError

        raise KubetrainError(f"target {target!r} is not available yet; use --target local")
    pipeline = build_pipeline()
    path = output or COMPILED_DIR / "training-pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    return path
