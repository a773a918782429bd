"""KFP components: compress, and the record left when the quality gate stops it."""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from kubetrain.components.common import component


@component
def compress(
    trained_model: Input[Model],
    test: Input[Dataset],
    train: Input[Dataset],
    validation: Input[Dataset],
    accuracy_budget: float,
    error_budget: float,
    prune_amount: float,
    compress_objective: str,
    distill_epochs: int,
    distill_temperature: float,
    seed: int,
    compressed_model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> NamedTuple("Compressed", [("summary", dict)]):
    """Prune, quantize to int8 (dynamic; static calibrated on `train`), distil a smaller
    student on `train` (early stopping on `validation`) and export ONNX; keep a variant
    within budget by `compress_objective`."""
    import json

    from kubetrain.config import RunConfig
    from kubetrain.stages import compress_stage

    cfg = RunConfig.pick(locals())
    summary = compress_stage(
        trained_model.path,
        test.path,
        compressed_model.path,
        report.path,
        cfg.compress,
        cfg.seed,
        train_path=train.path,
        val_path=validation.path,
    )
    chosen = next(v for v in summary["variants"] if v["name"] == summary["chosen"])
    for name in (
        "bytes",
        "gzip_bytes",
        "accuracy",
        "rmse",
        "cpu_latency_ms",
        "latency_b64_ms",
        "speedup_b1",
        "speedup_b64",
    ):
        if name in chosen:  # accuracy for classes, rmse for a regression
            metrics.log_metric(name, float(chosen[name]))
    with open(metrics.path, "w") as f:
        json.dump(metrics.metadata, f)
    compressed_model.metadata.update(
        {"format": "onnx", "variant": summary["chosen"], "file": "model.onnx"}
    )
    return (dict(summary, uri=compressed_model.uri),)


@component
def skip_compression(
    evaluation: Input[Artifact],
    compressed_model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> NamedTuple("Compressed", [("summary", dict)]):
    """Runs instead of compress when the quality gate fails: records the reason."""
    import json

    from kubetrain.stages import skip_compression_stage

    summary = skip_compression_stage(evaluation.path, compressed_model.path, report.path)
    with open(metrics.path, "w") as f:
        json.dump({"skipped": 1}, f)
    compressed_model.metadata.update({"skipped": True, "reason": summary["reason"]})
    return (dict(summary, uri=compressed_model.uri),)
