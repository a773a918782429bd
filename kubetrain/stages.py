"""Stage entrypoints: paths in, paths out, a metadata dict back.

Each KFP component in `components/` calls exactly one function here and only
maps its artifacts to paths; each function here calls the stage's logic module
and renders the stage's report for the Kubeflow UI. The local CLI, the
per-stage command line (`python -m kubetrain.cli.stage`) and the tests call the
same functions, so a stage behaves the same everywhere.

A function takes only the config sections it reads, as parameters named after
them (`clean: CleanConfig`, `seed: int`): `kubetrain.registry` derives each
stage's settings, its CLI flags and its component's parameters from that.
Where a stage can run in different places (tuning with Optuna here or Katib on
the cluster; training in this process, over torchrun or as a TrainJob), it
takes a backend callable, chosen once by `kubetrain.cluster.backends`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain.config.settings import (
    AUTO_HYPER,
    AugmentConfig,
    CleanConfig,
    CompressConfig,
    DataConfig,
    DeployConfig,
    FinalConfig,
    GateConfig,
    HyperConfig,
    PublishConfig,
    TrainConfig,
    TuneConfig,
)
from kubetrain.core import progress
from kubetrain.data.datasets import is_image_table, load_split, write_json, write_text
from kubetrain.data.packed_json import pack
from kubetrain.report import plots
from kubetrain.report.html import Section, write_html, write_markdown


@dataclass(frozen=True)
class CleanRequest:
    """What any clean engine needs: the table and the three split paths (URIs on a cluster)."""

    table_path: str
    train_path: str
    val_path: str
    test_path: str
    clean: CleanConfig
    seed: int
    table_uri: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class TuneRequest:
    """What any tuning backend needs: the splits (as paths here and URIs on the cluster)."""

    train_path: str
    val_path: str
    train: TrainConfig
    tune: TuneConfig
    seed: int
    train_uri: str = ""
    val_uri: str = ""
    #: The configured values: the local study's first trial (`tuning.tune`'s baseline).
    hyper: HyperConfig | None = None


@dataclass(frozen=True)
class TrainRequest:
    """What any training backend needs; `hyper` already holds the tuned values."""

    train_path: str
    val_path: str
    model_path: str
    metrics_path: str
    report_path: str
    train: TrainConfig
    hyper: HyperConfig
    final: FinalConfig
    seed: int
    checkpoint_dir: str | None = None
    train_uri: str = ""
    val_uri: str = ""
    output_uri: str = ""


#: Longest list or mapping kept in KFP artifact metadata. Metadata travels to every
#: downstream task on its command line: 3,000 class counts there broke a run with
#: "Argument list too long". The full values stay in files inside the artifacts.
METADATA_ITEMS = 50
META_FILE = "stage_meta.json"
#: Clean's validation result (`kubetrain.data.validation`), in the train split's directory.
VALIDATION_FILE = "validation.json"


def compact(meta: dict[str, Any], limit: int = METADATA_ITEMS) -> dict[str, Any]:
    """`meta` with long lists and mappings cut to `limit` items, and their full length noted."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, dict) and len(value) > limit:
            out[key] = dict(list(value.items())[:limit])
            out[f"{key}_total"] = len(value)
        elif isinstance(value, list) and len(value) > limit:
            out[key] = value[:limit]
            out[f"{key}_total"] = len(value)
        elif isinstance(value, dict):
            out[key] = compact(value, limit)
        else:
            out[key] = value
    return out


def read_meta(artifact_path: str) -> dict[str, Any]:
    """The full metadata a stage wrote beside its artifact (KFP metadata holds the compact one)."""
    return json.loads((Path(artifact_path) / META_FILE).read_text())


#: A clean engine: writes the three splits; returns the stage metadata (`clean` documents it).
Cleaner = Callable[[CleanRequest], dict[str, Any]]
#: A tuning backend: returns (best hyperparameters, trial rows, extra metadata).
Tuner = Callable[[TuneRequest], tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]]
#: A training backend: writes the model, metrics and report; returns the stage metadata.
Trainer = Callable[[TrainRequest], dict[str, Any]]


def ingest_stage(
    dataset_path: str, profile_path: str, data: DataConfig, fingerprint: str = ""
) -> dict[str, Any]:
    from kubetrain.data.ingest import ingest

    progress.log("ingest", f"reading {data.dataset}")
    from kubetrain.data.image_ingest import ImageOptions

    images = ImageOptions(size=data.image_size, on_bad=data.bad_images)
    meta = ingest(data.dataset, data.label_column, dataset_path, fingerprint, data.task, images)
    write_json(Path(dataset_path) / META_FILE, meta)
    labels = "regression" if meta["task"] == "regression" else f"{len(meta['classes'])} classes"
    progress.log(
        "ingest",
        f"{meta['rows']} rows, {meta['features']} features, "
        f"{labels}, hash {meta['content_hash'][:12]}",
    )
    rows = [{"class": k, "rows": v} for k, v in meta["class_counts"].items()]
    write_markdown(
        profile_path,
        f"Dataset: {data.dataset}",
        [
            Section(
                "Summary",
                facts={
                    "kind": meta["kind"],
                    "task": meta["task"],
                    "rows": meta["rows"],
                    "features": meta["features"],
                    "missing values": meta["missing_values"],
                    "content sha256": meta["content_hash"][:16],
                },
            ),
            *([Section("Class counts", tables=[rows])] if rows else []),
        ],
    )
    return meta


#: Memory the in-memory clean takes per byte of the compressed Parquet table (measured
#: on the 1M-row bench table: 1.6 GiB peak for a 0.23 GiB file, about 7x).
TABLE_EXPANSION = 8


def clean_here(req: CleanRequest) -> dict[str, Any]:
    """The local engine: in memory when the table fits the budget, else streamed in batches."""
    from kubetrain.core.memory import fits, reuse_freed_memory
    from kubetrain.data.clean import clean as clean_table
    from kubetrain.data.clean_images import clean_images
    from kubetrain.data.clean_stream import clean_streaming

    reuse_freed_memory()
    paths = (req.table_path, req.train_path, req.val_path, req.test_path)
    if is_image_table(req.table_path):  # pixels stay uint8; any size streams
        return clean_images(*paths, req.clean, req.seed)
    on_disk = sum(f.stat().st_size for f in Path(req.table_path).rglob("*") if f.is_file())
    if fits(on_disk * TABLE_EXPANSION):
        return clean_table(*paths, req.clean, req.seed)
    progress.log(
        "clean", f"streaming: the table ({on_disk:,} bytes on disk) is over the memory budget"
    )
    return clean_streaming(*paths, req.clean, req.seed)


def clean_stage(
    table_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    report_path: str,
    clean: CleanConfig,
    seed: int,
    cleaner: Cleaner = clean_here,
    table_uri: str = "",
    run_id: str = "",
) -> dict[str, Any]:
    """Clean with whichever engine was chosen (here, or Spark locally or on the cluster)."""
    from kubetrain.data.clean import quality_report

    if cleaner is not clean_here and is_image_table(table_path):
        progress.log(
            "clean",
            "an image table is cleaned here, not by Spark: one pass keys and routes the "
            "images, one writes them, and pixels need no per-column work to spread out",
        )
        cleaner = clean_here
    meta = cleaner(
        CleanRequest(table_path, train_path, val_path, test_path, clean, seed, table_uri, run_id)
    )
    validation = meta.pop("validation", None)
    if validation is not None:  # beside the training shards: no new pipeline output
        write_json(Path(train_path) / VALIDATION_FILE, pack(validation))
    write_text(report_path, quality_report({**meta, "validation": validation}))
    sizes = ", ".join(f"{k} {v['rows']}" for k, v in meta["splits"].items())
    progress.log(
        "clean",
        f"{meta['duplicates_removed']} duplicates removed, "
        f"{meta['missing_values']} missing values filled; splits: {sizes}",
    )
    return meta


def augment_stage(
    train_path: str, out_path: str, report_path: str, augment: AugmentConfig, seed: int
) -> dict[str, Any]:
    """Tables: oversampling and jittered copies. Images: the split as it is, with the
    policy training applies per batch recorded in its schema, and shown in the report
    on a few training images."""
    from kubetrain.data.augment import augment as augment_split
    from kubetrain.data.shards import is_sharded, read_schema
    from kubetrain.training.batch_augment import policy_from

    schema = read_schema(train_path) if is_sharded(train_path) else load_split(train_path)[2]
    policy = None
    if schema.kind == "image" and augment.augment_copies != 0:
        assert schema.image_shape is not None
        policy = policy_from(augment, schema.image_shape)
    meta = augment_split(
        train_path, out_path, augment, seed, policy=policy.to_dict() if policy else None
    )
    if schema.kind != "image":
        progress.log("augment", f"{meta['rows_before']} -> {meta['rows_after']} training rows")
        sections = [
            Section(
                "Training rows per class",
                facts={"rows before": meta["rows_before"], "rows after": meta["rows_after"]},
                images=[
                    (
                        plots.class_balance_compare(
                            meta["class_counts_before"], meta["class_counts_after"]
                        ),
                        "Only the training split is augmented",
                    )
                ],
            )
        ]
    else:
        sections = _image_augment_sections(train_path, schema, policy, seed, meta)
    write_html(report_path, "Augmentation", sections)
    return meta


def _image_augment_sections(
    train_path: str, schema: Any, policy: Any, seed: int, meta: dict[str, Any]
) -> list[Section]:
    """The policy, and a grid of training images beside augmented versions of them."""
    from kubetrain.data.augment import sample_images
    from kubetrain.training.batch_augment import preview

    if policy is None:
        progress.log("augment", "images: per-batch augmentation off (augment_copies=0)")
        return [Section("Images", text="Per-batch augmentation is off (augment_copies=0).")]
    settings = policy.to_dict()
    on = [f"{k}={v:.3g}" if isinstance(v, float) else k for k, v in settings.items() if v]
    progress.log(
        "augment",
        f"images: {meta['rows_before']} training rows, not copied; training augments each "
        f"batch: {', '.join(on)}",
    )
    X, y = sample_images(train_path, 8)
    rows = preview(X, y, schema.image_shape, policy, seed, max(schema.num_classes, 1))
    grid = plots.image_grid(
        [r for _, r in rows], [t for t, _ in rows], "Training images, augmented per batch"
    )
    return [
        Section(
            "Per-batch augmentation (in training, on the training device)",
            facts={"training rows (not copied)": meta["rows_before"], **settings},
            images=[(grid, "Every batch of every epoch is augmented afresh")],
        )
    ]


def tune_here(req: TuneRequest) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The local tuning backend: Optuna trials in this process (on a stratified sample of
    the training split when it is over the memory budget: `tuning.tuning_split`)."""
    from kubetrain.training.tuning import tune, tuning_split

    (X, y), schema = tuning_split(req.train_path, req.seed)
    Xv, yv, _ = load_split(req.val_path)
    best, trials, facts = tune(
        req.train, req.tune, req.seed, (X, y), (Xv, yv), schema, baseline=req.hyper
    )
    return best, trials, {"backend": "optuna", **facts}


def tune_stage(
    train_path: str,
    val_path: str,
    trials_path: str,
    report_path: str,
    train: TrainConfig,
    tune: TuneConfig,
    seed: int,
    tuner: Tuner = tune_here,
    train_uri: str = "",
    val_uri: str = "",
    hyper: HyperConfig | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Search the hyperparameters with whichever backend was chosen (Optuna here, Katib there);
    `hyper`, the configured values, is the local study's first trial."""
    from kubetrain.data.shards import read_schema
    from kubetrain.training.tuning import GOALS, objective_for

    tune = objective_for(tune, read_schema(train_path).regression)
    started = time.perf_counter()
    best, trials, extra = tuner(
        TuneRequest(train_path, val_path, train, tune, seed, train_uri, val_uri, hyper)
    )
    progress.log("tune", f"best hyperparameters: {best}")
    meta = {
        "stage": "tune",
        "algorithm": tune.tune_algorithm,
        "objective": tune.tune_objective,
        "goal": GOALS[tune.tune_objective],
        "trials": len(trials),
        "best_hyperparameters": best,
        "seconds": round(time.perf_counter() - started, 3),
        **extra,
    }
    return best, _write_trials(trials_path, report_path, trials, meta)


def default_hyperparameters_stage(
    trials_path: str, report_path: str, hyper: HyperConfig, tune: TuneConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the Else branch runs when tune_trials=0: the configured values, no trials."""
    from kubetrain.training.tuning import GOALS

    best = hyper.to_dict()
    auto = [k for k in AUTO_HYPER["table"] if best[k] == 0]
    progress.log(
        "tune",
        f"skipped (tune_trials=0); using {best}"
        + (f" ({' and '.join(auto)} 0: auto, set by the kind of data)" if auto else ""),
    )
    meta = {
        "stage": "tune",
        "algorithm": "none",
        "objective": tune.tune_objective,
        "goal": GOALS.get(tune.tune_objective, "maximize"),  # auto: accuracy or R^2
        "trials": 0,
        "best_hyperparameters": best,
        "seconds": 0.0,
    }
    return best, _write_trials(trials_path, report_path, [], meta)


def _write_trials(
    trials_path: str, report_path: str, trials: list[dict], meta: dict
) -> dict[str, Any]:
    """Write the trials table and its report; return it (`{"meta", "trials"}`)."""
    tuning = {"meta": meta, "trials": trials}
    write_json(trials_path, tuning)
    rows = [
        {
            "trial": f"{t['number']} (baseline)" if t.get("baseline") else t["number"],
            "state": t["state"],
            meta["objective"]: t.get("value"),
            **t["params"],
        }
        for t in trials
    ]
    write_html(
        report_path,
        "Hyperparameter tuning",
        [
            Section(
                "Search",
                facts={
                    "algorithm": meta["algorithm"],
                    "trials": meta["trials"],
                    "objective": f"{meta['objective']} ({meta['goal']})",
                },
                text="" if trials else "Tuning was skipped (tune_trials=0).",
            ),
            Section("Best hyperparameters", tables=[[meta["best_hyperparameters"]]]),
            *cross_validation_sections(meta.get("cv")),
            Section(
                "Trials",
                images=[plots.tuning_trials(trials, meta["objective"], meta["goal"])]
                if trials
                else [],
                tables=[rows] if rows else [],
            ),
        ],
    )
    return json.loads(json.dumps(tuning, default=str))


def cross_validation_sections(
    cv: dict[str, Any] | None, test: dict[str, float] | None = None
) -> list[Section]:
    """The best trial's K-fold scores: each fold, and mean ± std beside the held-out
    ``test`` figures when given (the run report)."""
    if not cv:
        return []
    per_fold = [{"fold": i + 1, **f} for i, f in enumerate(cv["per_fold"])]
    metrics = [k for k in cv["per_fold"][0] if f"{k}_mean" in cv]
    facts = {
        f"{k} ({cv['folds']}-fold mean ± std)": f"{cv[f'{k}_mean']:.4f} ± {cv[f'{k}_std']:.4f}"
        for k in metrics
    }
    facts.update({f"held-out test {k}": v for k, v in (test or {}).items()})
    return [Section("Cross-validation (best trial)", facts=facts, tables=[per_fold])]


def train_here(req: TrainRequest) -> dict[str, Any]:
    """The in-process training backend (also rank 0 of a DDP run): fit, then write outputs."""
    from kubetrain.training import challenger, checkpoint, stream
    from kubetrain.training.batch_augment import recorded
    from kubetrain.training.loop import describe, fit
    from kubetrain.training.models import save_model, uses_width

    # in memory when the split fits the budget; streamed from its shards when it does not
    train_data, schema = stream.training_split(req.train_path)
    epochs = req.final.epochs_for(schema.kind)
    Xv, yv, _ = load_split(req.val_path)
    rows = len(train_data[0]) if isinstance(train_data, tuple) else train_data.rows
    hyper = req.hyper.for_kind(schema.kind)
    width = uses_width(req.train.model, schema, rows)
    described = describe(req.train, hyper, req.seed, epochs, width)
    held = {
        stream.Streamed: " (streamed from shards)",
        stream.Stored: " (uint8 pixels, decoded batch by batch on the device)",
    }.get(type(train_data), "")
    progress.log(
        "train",
        f"{rows} rows{held}, "
        f"{len(schema.feature_names)} features, "
        f"{'a number to predict' if schema.regression else f'{schema.num_classes} classes'}, "
        f"hyperparameters {described}",
    )
    with checkpoint.mirrored(req.checkpoint_dir) as (checkpoint_dir, after_epoch):
        result = fit(
            req.train,
            hyper,
            req.seed,
            train_data,
            (Xv, yv),
            schema,
            epochs,
            hook=after_epoch,
            checkpoint_dir=checkpoint_dir,
        )
    rival = challenger.train_beside(
        req.final.challenger, train_data, schema, req.train_path, (Xv, yv), req.seed
    )
    policy = recorded(schema)
    info = {
        "hyperparameters": described,
        "history": result.history,
        "metrics": result.metrics,
        "schema": schema.extra.get("preprocessing", {}),
        "feature_names": schema.feature_names,
        # what the model was trained with (images): the published bundle carries it
        **({"augment_policy": policy.to_dict()} if policy else {}),
    }
    save_model(req.model_path, result.model, result.spec, info)
    challenger.save(req.model_path, rival)
    write_json(req.metrics_path, result.metrics)
    write_html(
        req.report_path,
        "Training",
        [
            Section(
                "Result",
                facts={
                    **{
                        f"validation {k[4:].replace('r2', 'R^2').replace('rmse', 'RMSE')}": v
                        for k, v in result.metrics.items()
                        if k.startswith("val_")
                    },
                    "best epoch": result.best_epoch,
                    "epochs run": result.metrics["epochs_run"],
                    "device": result.metrics["device"],
                },
            ),
            Section("Learning curves", images=[plots.learning_curves(result.history)]),
            Section("Hyperparameters", tables=[[described]]),
            *([Section("Per-batch augmentation", tables=[[policy.to_dict()]])] if policy else []),
            Section(
                "Gradient-boosting challenger",
                facts={k.removeprefix("challenger_"): v for k, v in rival.meta.items()},
            ),
        ],
    )
    return {
        "stage": "train",
        **result.metrics,
        "hyperparameters": described,
        "arch": result.spec.arch,
        **rival.meta,
    }


def train_stage(
    train_path: str,
    val_path: str,
    model_path: str,
    metrics_path: str,
    report_path: str,
    train: TrainConfig,
    hyper: HyperConfig,
    final: FinalConfig,
    seed: int,
    hyperparameters: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    trainer: Trainer = train_here,
    train_uri: str = "",
    val_uri: str = "",
    output_uri: str = "",
    checkpoint_root: str = "",
) -> dict[str, Any]:
    """Train the final model with the tuned values on whichever backend was chosen.

    With ``checkpoint_root`` (local folder or s3:// prefix) the checkpoint lives
    at ``<root>/<key of the inputs and settings>``, where a retry or a re-run of
    the same training finds it and resumes at the next epoch.
    """
    tuned = hyper.replace(hyperparameters or {})
    if checkpoint_root:
        from kubetrain.training import checkpoint

        settings = {**train.to_dict(), **tuned.to_dict(), **final.to_dict(), "seed": seed}
        settings.pop("challenger")  # the network trains the same with or without one
        stable = checkpoint.stable_dir(checkpoint_root, train_path, val_path, settings)
        progress.log("train", f"checkpoints under {stable}")
        if checkpoint_dir:  # the task's own output says where its checkpoint lives
            write_json(Path(checkpoint_dir) / "location.json", {"checkpoint_dir": stable})
        checkpoint_dir = stable
    return trainer(
        TrainRequest(
            train_path,
            val_path,
            model_path,
            metrics_path,
            report_path,
            train,
            tuned,
            final,
            seed,
            checkpoint_dir,
            train_uri,
            val_uri,
            output_uri,
        )
    )


def evaluate_stage(
    model_path: str,
    test_path: str,
    evaluation_path: str,
    report_path: str,
    gate: GateConfig,
    tuning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test metrics and the gate; with ``tuning`` (the tune step's output) the best
    trial's K-fold figures go beside them (``cross_validation``)."""
    from kubetrain.assessment.evaluation import evaluate

    result = evaluate(
        model_path,
        test_path,
        gate.min_accuracy,
        max_gap_to_baseline=gate.max_gap_to_baseline,
        min_r2=gate.min_r2,
    )
    cv = ((tuning or {}).get("meta") or {}).get("cv")
    if cv:
        result["cross_validation"] = cv
    write_json(evaluation_path, result)
    regression = result.get("task") == "regression"
    if regression:
        progress.log(
            "evaluate",
            f"R^2 {result['r2']:.4f} | RMSE {result['rmse']:.4g} | MAE {result['mae']:.4g}",
        )
    else:
        progress.log(
            "evaluate",
            f"accuracy {result['accuracy']:.4f} | macro_f1 "
            f"{result['macro_f1']:.4f} | roc_auc "
            + ("n/a" if result["roc_auc"] is None else f"{result['roc_auc']:.4f}"),
        )
    if "challenger" in result:
        score = "r2" if regression else "accuracy"
        progress.log(
            "evaluate",
            f"gradient boosting: {score} {result['challenger'][score]:.4f} | "
            f"gap to the network {result['gap_to_challenger']:+.4f}",
        )
    progress.log("evaluate", result["gate_reason"])
    write_html(report_path, "Evaluation on the held-out test split", evaluation_sections(result))
    return result


def evaluation_sections(result: dict[str, Any]) -> list[Section]:
    from kubetrain.assessment.evaluation import comparison_rows

    rival = (
        [Section("Network vs gradient boosting", tables=[comparison_rows(result)])]
        if "challenger" in result
        else []
    )
    regression = result.get("task") == "regression"
    scores = ("r2", "rmse", "mae") if regression else ("accuracy", "macro_f1", "roc_auc")
    folds = cross_validation_sections(
        result.get("cross_validation"), {k: result[k] for k in scores}
    )
    if regression:
        return [
            Section(
                "Test metrics",
                facts={k: result[k] for k in ("r2", "rmse", "mae", "target_std", "test_rows")},
                text=result["gate_reason"],
            ),
            *folds,
            Section("Predicted vs actual", images=[plots.regression_fit(result["points"])]),
            *rival,
        ]
    return [
        Section(
            "Test metrics",
            facts={
                k: result[k]
                for k in (
                    "accuracy",
                    "macro_f1",
                    "precision_macro",
                    "recall_macro",
                    "roc_auc",
                    "test_rows",
                )
            },
            text=result["gate_reason"],
        ),
        Section(
            "Confusion matrix",
            images=[plots.confusion_matrix(result["confusion_matrix"], result["class_names"])],
        ),
        *folds,
        Section("ROC", images=[plots.roc_curves(result["roc"])]),
        Section("Per class", tables=[result["per_class"]]),
        *rival,
    ]


def compress_stage(
    model_path: str,
    test_path: str,
    out_path: str,
    report_path: str,
    compress: CompressConfig,
    seed: int = 42,
    train_path: str = "",
    val_path: str = "",
) -> dict[str, Any]:
    """Compress ``model_path``, scored on ``test_path``; with ``train_path`` (and
    ``val_path``, the student's early stopping) also static int8 and a distilled student."""
    from kubetrain.assessment.compression import Extras, compress_split

    progress.log(
        "compress",
        f"pruning {compress.prune_amount:.0%}, int8 quantization, ONNX export"
        + (f", distillation ({compress.distill_epochs} epochs)" if train_path else ""),
    )
    # the test split in memory when it fits the budget, else scored batch by batch
    summary = compress_split(
        model_path,
        test_path,
        compress.accuracy_budget,
        compress.prune_amount,
        out_dir=out_path,
        error_budget=compress.error_budget,
        train_path=train_path or None,
        val_path=val_path or None,
        extras=Extras(
            objective=compress.compress_objective,
            distill_epochs=compress.distill_epochs,
            temperature=compress.distill_temperature,
            seed=seed,
        ),
    )
    chosen = next(v for v in summary["variants"] if v["name"] == summary["chosen"])
    score = "rmse" if "rmse" in chosen else "accuracy"
    progress.log(
        "compress",
        f"kept {chosen['name']} ({summary['objective']}): {chosen['bytes']} bytes, {score} "
        f"{chosen[score]:.4g}, {chosen['latency_b1_ms']:.3f} ms at batch 1, "
        f"{chosen['latency_b64_ms']:.3f} ms at batch 64 ({chosen['speedup_b64']:.2f}x fp32)",
    )
    write_html(report_path, "Compression", compression_sections(summary, compress.accuracy_budget))
    return summary


#: The columns of the compress report's trade-off table, in order.
TRADEOFF_COLUMNS = (
    "name",
    "accuracy",
    "rmse",
    "gzip_bytes",
    "latency_b1_ms",
    "latency_b64_ms",
    "ms_per_row_b64",
    "speedup_b1",
    "speedup_b64",
    "within_budget",
    "pareto",
    "chosen",
)


def compression_sections(summary: dict[str, Any], budget: float) -> list[Section]:
    variants = [dict(v, chosen=v["name"] == summary["chosen"]) for v in summary["variants"]]
    regression = "baseline_rmse" in summary
    front = [{k: v[k] for k in TRADEOFF_COLUMNS if k in v} for v in variants]
    floor = (
        summary["baseline_rmse"] * (1 + summary["error_budget"])
        if regression
        else summary["baseline_accuracy"] - budget
    )
    pareto = Section(
        "Size, latency and accuracy (Pareto front)",
        text=(
            f"Objective {summary.get('objective', 'size')}: "
            + {
                "size": "the smallest gzip size within the budget.",
                "latency": "the fastest within the budget (the worse of its batch-1 and "
                "batch-64 speed-ups over fp32).",
                "balanced": "the smallest within the budget that is no slower than fp32 "
                f"at batch 1 and at batch 64 (tolerance "
                f"{summary.get('latency_tolerance', 0):.0%}).",
            }.get(summary.get("objective", "size"), "")
            + " Latency: ONNX Runtime on the CPU, one thread, median of interleaved runs. "
            "pareto: no other variant is at least as small, as fast at both batch sizes "
            "and as accurate."
        ),
        images=[plots.compression_pareto(variants, floor)],
        tables=[front],
    )
    distilled = summary.get("distillation")
    student = (
        [
            Section(
                "Distilled student",
                facts={
                    **{
                        role: "{arch} width {width}".format(**distilled[role])
                        for role in ("student", "teacher")
                    },
                    "training rows": distilled["rows"],
                    "epochs (best)": f"{distilled['epochs']} ({distilled['best_epoch']})",
                    "temperature": distilled["temperature"],
                    "seconds": distilled["seconds"],
                    **{k: round(v, 4) for k, v in distilled["validation"].items()},
                },
            )
        ]
        if distilled
        else []
    )
    if regression:  # a regression: RMSE within a relative budget
        return [
            Section(
                "Kept variant",
                facts={
                    "variant": summary["chosen"],
                    "baseline test RMSE": summary["baseline_rmse"],
                    "relative RMSE budget": summary["error_budget"],
                },
            ),
            pareto,
            *student,
            Section("Variants", tables=[variants]),
        ]
    return [
        Section(
            "Kept variant",
            facts={
                "variant": summary["chosen"],
                "baseline accuracy": summary["baseline_accuracy"],
                "accuracy budget": budget,
            },
        ),
        pareto,
        *student,
        Section(
            "Size vs accuracy",
            images=[plots.compression_tradeoff(variants, summary["baseline_accuracy"], budget)],
            tables=[variants],
        ),
    ]


def skip_compression_stage(evaluation_path: str, out_path: str, report_path: str) -> dict[str, Any]:
    """The Else branch of the quality gate: record why nothing was compressed."""
    from kubetrain.data.datasets import atomic_dir

    result = json.loads(Path(evaluation_path).read_text())
    summary = {"skipped": True, "reason": result["gate_reason"], "variants": [], "chosen": None}
    with atomic_dir(out_path) as tmp:
        (tmp / "compression.json").write_text(json.dumps(summary, indent=2))
    write_html(
        report_path, "Compression skipped", [Section("Quality gate", text=result["gate_reason"])]
    )
    progress.log("compress", f"skipped: {result['gate_reason']}")
    return summary


def publish_stage(
    trained_model: str,
    compressed_model: str,
    evaluation_path: str,
    table_path: str,
    publish: PublishConfig,
    run_id: str = "",
) -> str:
    from kubetrain.assessment.publish import publish_model
    from kubetrain.training.loop import trained_hyperparameters

    # a retry of the same KFP run targets the same version, and finishes or replaces it
    uri = publish_model(
        trained_model,
        compressed_model,
        evaluation_path,
        read_meta(table_path),
        trained_hyperparameters(trained_model),  # as the train stage recorded them
        publish.publish_uri,
        publish.model_name,
        run_id=run_id,
        table_path=table_path,
    )
    if publish.registry_url:
        from kubetrain.assessment.registration import register

        register(
            publish.registry_url,
            publish.model_name,
            uri.rstrip("/").rsplit("/", 1)[-1],
            uri,
            Path(compressed_model),
            json.loads(Path(evaluation_path).read_text()),
            run_id,
        )
    return uri


@dataclass(frozen=True)
class DeployRequest:
    """What a deploy backend gets: the published bundle and the run's table and test
    split (its held-out rows score champion and challenger and feed the smoke test)."""

    bundle_uri: str
    table_path: str
    test_path: str
    publish: PublishConfig
    deploy: DeployConfig
    run_id: str = ""


#: A deploy backend: returns the deploy record (`deploy_stage` documents it).
Deployer = Callable[[DeployRequest], dict[str, Any]]


def deploy_here(req: DeployRequest) -> dict[str, Any]:
    """Locally nothing serves: champion/challenger against the previously published
    version of the model, recorded so a run shows what the cluster would have done."""
    from kubetrain.serving import challenge

    new, heldout = challenge.load(req.bundle_uri, req.table_path, req.test_path, "pytorch")
    previous = challenge.previous_version(
        req.publish.publish_uri, req.publish.model_name, req.bundle_uri
    )
    old = challenge.load_bundle(previous, "pytorch") if previous else None
    decision = challenge.challenge(new, old, heldout, req.deploy.deploy_margin)
    return {
        "target": "local",
        "challenger": req.bundle_uri,
        "champion": previous,
        "decision": decision.to_dict(),
        "deployed": False,
        "note": "no endpoint runs locally: the decision is recorded; serve the bundle with "
        "`kubetrain serve --bundle` (a cluster run deploys it to KServe)",
    }


def deploy_stage(
    bundle_uri: str,
    table_path: str,
    test_path: str,
    out_path: str,
    publish: PublishConfig,
    deploy: DeployConfig,
    deployer: Deployer = deploy_here,
    run_id: str = "",
) -> dict[str, Any]:
    """Champion/challenger, then (on a cluster) the InferenceService; writes the record
    (``target``, ``challenger``/``champion`` URIs, ``decision``, ``deployed``) as JSON."""
    record = deployer(DeployRequest(bundle_uri, table_path, test_path, publish, deploy, run_id))
    write_json(out_path, record)
    progress.log("deploy", f"deploy decision: {record['decision']['reason']}")
    return record
