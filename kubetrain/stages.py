"""Stage entrypoints: paths in, paths out, a metadata dict back.

Each KFP component in `components/` calls exactly one function here and only
maps its artifacts to paths; each function here calls the stage's logic module
and renders the stage's report for the Kubeflow UI. The local CLI, the
per-stage command line (`python -m kubetrain.cli.stage`) and the tests call the
same functions, so a stage behaves the same everywhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kubetrain.report import plots

from kubetrain.core import progress
from kubetrain.config.settings import RunConfig
from kubetrain.data.datasets import load_split, write_json, write_text
from kubetrain.core.errors import KubetrainError
from kubetrain.report.html import Section, write_html, write_markdown


def _cfg(settings: dict[str, Any] | None) -> RunConfig:
    return RunConfig.from_dict(dict(settings or {}))


def ingest_stage(source: str, label_column: str, dataset_path: str, profile_path: str,
                 fingerprint: str = "") -> dict[str, Any]:
    from kubetrain.data.ingest import ingest

    progress.log("ingest", f"reading {source}")
    meta = ingest(source, label_column, dataset_path, fingerprint)
    progress.log("ingest", f"{meta['rows']} rows, {meta['features']} features, "
                           f"{len(meta['classes'])} classes, hash {meta['content_hash'][:12]}")
    rows = [{"class": k, "rows": v} for k, v in meta["class_counts"].items()]
    write_markdown(profile_path, f"Dataset: {source}", [
        Section("Summary", facts={"kind": meta["kind"], "rows": meta["rows"],
                                  "features": meta["features"],
                                  "missing values": meta["missing_values"],
                                  "content sha256": meta["content_hash"][:16]}),
        Section("Class counts", tables=[rows]),
    ])
    return meta


def clean_stage(table_path: str, train_path: str, val_path: str, test_path: str,
                report_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    from kubetrain.data.clean import clean, quality_report

    meta = clean(table_path, train_path, val_path, test_path, _cfg(settings))
    write_text(report_path, quality_report(meta))
    sizes = ", ".join(f"{k} {v['rows']}" for k, v in meta["splits"].items())
    progress.log("clean", f"{meta['duplicates_removed']} duplicates removed, "
                          f"{meta['missing_values']} missing values filled; splits: {sizes}")
    return meta


def augment_stage(train_path: str, out_path: str, report_path: str,
                  settings: dict[str, Any]) -> dict[str, Any]:
    from kubetrain.data.augment import augment

    meta = augment(train_path, out_path, _cfg(settings))
    progress.log("augment", f"{meta['rows_before']} -> {meta['rows_after']} training rows")
    write_html(report_path, "Augmentation", [Section(
        "Training rows per class", facts={"rows before": meta["rows_before"],
                                          "rows after": meta["rows_after"]},
        images=[(plots.class_balance_compare(meta["class_counts_before"],
                                             meta["class_counts_after"]),
                 "Only the training split is augmented")])])
    return meta


def tune_stage(train_path: str, val_path: str, trials_path: str, report_path: str,
               settings: dict[str, Any], backend: str = "optuna", cluster: dict | None = None,
               train_uri: str = "", val_uri: str = "",
               run_id: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune in this process (Optuna) or through a Katib Experiment on the cluster."""
    from kubetrain.training.tuning import GOALS, tune

    cfg = _cfg(settings)
    started = time.perf_counter()
    extra: dict[str, Any] = {"backend": backend}
    if backend == "katib":
        from kubetrain.cluster import katib
        from kubetrain.core import storage
        from kubetrain.config.cluster import ClusterConfig

        placement = ClusterConfig.from_dict(cluster or {})
        best, trials, extra = katib.tune(
            cfg, placement, storage.object_uri(train_uri), storage.object_uri(val_uri),
            katib.experiment_name(run_id),
            timeout_s=placement.wait_timeout, keep=placement.finished_jobs == "keep")
    elif backend == "optuna":
        X, y, schema = load_split(train_path)
        Xv, yv, _ = load_split(val_path)
        best, trials = tune(cfg, (X, y), (Xv, yv), schema)
    else:
        raise KubetrainError(f"unknown tune backend {backend!r}; use optuna or katib")
    progress.log("tune", f"best hyperparameters: {best}")
    meta = {"stage": "tune", "algorithm": cfg.tune_algorithm, "objective": cfg.tune_objective,
            "goal": GOALS[cfg.tune_objective], "trials": len(trials),
            "best_hyperparameters": best, "seconds": round(time.perf_counter() - started, 3),
            **extra}
    return best, _write_trials(trials_path, report_path, trials, meta)


def default_hyperparameters_stage(trials_path: str, report_path: str,
                                  settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the Else branch runs when tune_trials=0: the configured values, no trials."""
    from kubetrain.training.loop import tuned_values
    from kubetrain.training.tuning import GOALS

    cfg = _cfg(settings)
    best = tuned_values(cfg)
    progress.log("tune", f"skipped (tune_trials=0); using {best}")
    meta = {"stage": "tune", "algorithm": "none", "objective": cfg.tune_objective,
            "goal": GOALS[cfg.tune_objective], "trials": 0, "best_hyperparameters": best,
            "seconds": 0.0}
    return best, _write_trials(trials_path, report_path, [], meta)


def _write_trials(trials_path: str, report_path: str, trials: list[dict],
                  meta: dict) -> dict[str, Any]:
    """Write the trials table and its report; return it (`{"meta", "trials"}`)."""
    tuning = {"meta": meta, "trials": trials}
    write_json(trials_path, tuning)
    rows = [{"trial": t["number"], "state": t["state"], meta["objective"]: t.get("value"),
             **t["params"]} for t in trials]
    write_html(report_path, "Hyperparameter tuning", [
        Section("Search", facts={"algorithm": meta["algorithm"], "trials": meta["trials"],
                                 "objective": f"{meta['objective']} ({meta['goal']})"},
                text="" if trials else "Tuning was skipped (tune_trials=0)."),
        Section("Best hyperparameters", tables=[[meta["best_hyperparameters"]]]),
        Section("Trials", images=[plots.tuning_trials(trials, meta["objective"], meta["goal"])]
                if trials else [], tables=[rows] if rows else []),
    ])
    return json.loads(json.dumps(tuning, default=str))


def train_stage(train_path: str, val_path: str, hyperparameters: dict[str, Any],
                model_path: str, metrics_path: str, report_path: str,
                settings: dict[str, Any], checkpoint_dir: str | None = None,
                cluster: dict | None = None, train_uri: str = "", val_uri: str = "",
                output_uri: str = "", run_id: str = "") -> dict[str, Any]:
    """Train here (one process or `nproc` DDP processes) or as a TrainJob on the cluster."""
    from kubetrain.training import distributed
    from kubetrain.training.models import save_model
    from kubetrain.training.loop import describe, fit, with_hyperparameters

    if cluster:
        from kubetrain.cluster import k8s
        from kubetrain.config.cluster import ClusterConfig
        from kubetrain.cluster.trainjob import MAX_NAME, train_on_cluster

        placement = ClusterConfig.from_dict(cluster)
        if placement.trainjob:
            return train_on_cluster(settings, placement, train_uri, val_uri, output_uri,
                                    hyperparameters, placement.num_nodes, model_path,
                                    metrics_path, report_path,
                                    name=k8s.run_name(run_id, "kubetrain-train", MAX_NAME))
    nproc = int((settings or {}).get("nproc", 1))
    if distributed.should_launch(nproc):
        return distributed.train_distributed(train_path, val_path, hyperparameters, model_path,
                                             metrics_path, report_path, settings, nproc,
                                             checkpoint_dir=checkpoint_dir)
    cfg = with_hyperparameters(_cfg(settings), hyperparameters or {})
    described = describe(cfg)
    X, y, schema = load_split(train_path)
    Xv, yv, _ = load_split(val_path)
    progress.log("train", f"{len(X)} rows, {len(schema.feature_names)} features, "
                          f"{schema.num_classes} classes, hyperparameters {described}")
    result = fit(cfg, (X, y), (Xv, yv), schema, checkpoint_dir=checkpoint_dir)
    info = {"hyperparameters": described, "history": result.history,
            "metrics": result.metrics, "schema": schema.extra.get("preprocessing", {}),
            "feature_names": schema.feature_names}
    save_model(model_path, result.model, result.spec, info)
    write_json(metrics_path, result.metrics)
    write_html(report_path, "Training", [
        Section("Result", facts={"validation accuracy": result.metrics["val_accuracy"],
                                 "validation loss": result.metrics["val_loss"],
                                 "best epoch": result.best_epoch,
                                 "epochs run": result.metrics["epochs_run"],
                                 "device": result.metrics["device"]}),
        Section("Learning curves", images=[plots.learning_curves(result.history)]),
        Section("Hyperparameters", tables=[[described]]),
    ])
    return {"stage": "train", **result.metrics, "hyperparameters": described,
            "arch": result.spec.arch}


def evaluate_stage(model_path: str, test_path: str, evaluation_path: str, report_path: str,
                   min_accuracy: float) -> dict[str, Any]:
    from kubetrain.assessment.evaluation import evaluate

    result = evaluate(model_path, test_path, min_accuracy)
    write_json(evaluation_path, result)
    progress.log("evaluate", f"accuracy {result['accuracy']:.4f} | macro_f1 "
                             f"{result['macro_f1']:.4f} | roc_auc {result['roc_auc']:.4f}")
    progress.log("evaluate", result["gate_reason"])
    write_html(report_path, "Evaluation on the held-out test split", evaluation_sections(result))
    return result


def evaluation_sections(result: dict[str, Any]) -> list[Section]:
    return [
        Section("Test metrics", facts={k: result[k] for k in (
            "accuracy", "macro_f1", "precision_macro", "recall_macro", "roc_auc", "test_rows")},
                text=result["gate_reason"]),
        Section("Confusion matrix", images=[plots.confusion_matrix(
            result["confusion_matrix"], result["class_names"])]),
        Section("ROC", images=[plots.roc_curves(result["roc"])]),
        Section("Per class", tables=[result["per_class"]]),
    ]


def compress_stage(model_path: str, test_path: str, out_path: str, report_path: str,
                   settings: dict[str, Any]) -> dict[str, Any]:
    from kubetrain.assessment.compression import compress

    cfg = _cfg(settings)
    X, y, _ = load_split(test_path)
    progress.log("compress", f"pruning {cfg.prune_amount:.0%}, int8 quantization, ONNX export")
    summary = compress(model_path, X, y, cfg.accuracy_budget, cfg.prune_amount, out_dir=out_path)
    chosen = next(v for v in summary["variants"] if v["name"] == summary["chosen"])
    progress.log("compress", f"kept {chosen['name']}: {chosen['bytes']} bytes, accuracy "
                             f"{chosen['accuracy']:.4f}, {chosen['cpu_latency_ms']:.3f} ms")
    write_html(report_path, "Compression", compression_sections(summary, cfg.accuracy_budget))
    return summary


def compression_sections(summary: dict[str, Any], budget: float) -> list[Section]:
    variants = [dict(v, chosen=v["name"] == summary["chosen"]) for v in summary["variants"]]
    return [
        Section("Kept variant", facts={"variant": summary["chosen"],
                                       "baseline accuracy": summary["baseline_accuracy"],
                                       "accuracy budget": budget}),
        Section("Size vs accuracy", images=[plots.compression_tradeoff(
            variants, summary["baseline_accuracy"], budget)], tables=[variants]),
    ]


def skip_compression_stage(evaluation_path: str, out_path: str, report_path: str) -> dict[str, Any]:
    """The Else branch of the quality gate: record why nothing was compressed."""
    from kubetrain.data.datasets import atomic_dir

    result = json.loads(Path(evaluation_path).read_text())
    summary = {"skipped": True, "reason": result["gate_reason"], "variants": [],
               "chosen": None}
    with atomic_dir(out_path) as tmp:
        (tmp / "compression.json").write_text(json.dumps(summary, indent=2))
    write_html(report_path, "Compression skipped", [Section("Quality gate",
                                                            text=result["gate_reason"])])
    progress.log("compress", f"skipped: {result['gate_reason']}")
    return summary


def publish_stage(trained_model: str, compressed_model: str, evaluation_path: str,
                  dataset_meta: dict[str, Any], hyperparameters: dict[str, Any],
                  publish_uri: str, model_name: str) -> str:
    from kubetrain.assessment.publish import publish_model
    from kubetrain.training.loop import tuned_values, with_hyperparameters

    best = tuned_values(with_hyperparameters(RunConfig(), hyperparameters or {}))
    return publish_model(trained_model, compressed_model, evaluation_path, dataset_meta, best,
                         publish_uri, model_name)
