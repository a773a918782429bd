"""The kubetrain training pipeline: ingest -> clean -> augment -> tune -> train -> evaluate -> compress.

Every pipeline parameter is a `RunConfig` field with the same default and
description, so the Kubeflow UI, the CLI and the library agree. Branches:
tuning runs only when ``tune_trials > 0`` (else the configured values are
used), and compression only when the evaluation passes the quality gate; the
`dsl.OneOf` outputs let the pipeline return one value whichever branch ran.
"""


import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from kubetrain.components.augment import augment
from kubetrain.components.clean import clean
from kubetrain.components.compress import compress, skip_compression
from kubetrain.components.evaluate import evaluate
from kubetrain.components.ingest import ingest
from kubetrain.components.publish import publish
from kubetrain.components.train import train
from kubetrain.components.tune import default_hyperparameters, tune
from kubetrain.config.settings import RunConfig, fields_of

PIPELINE_NAME = "kubetrain-training"
D = RunConfig()  # the defaults every parameter below starts from

Outputs = NamedTuple("Outputs", [
    ("dataset", Dataset), ("train_split", Dataset), ("augmented", Dataset),
    ("tuning", dict), ("best_hyperparameters", dict), ("trained_model", Model),
    ("evaluation", Artifact), ("compression", dict),
])


def code_version() -> str:
    """Hash of the library, component and pipeline sources: part of every task's cache key.

    KFP keys its cache on the component's command, which holds only the thin
    component body; without this, a change in the library behind it would be
    served stale results. Each package is found through its own module, so an
    editable checkout and an installed image hash the same sources alike.
    """
    import importlib

    digest = hashlib.sha256()
    for package in ("kubetrain", "kubetrain.components", "kubetrain.pipelines"):
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root)}".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TaskPolicy:
    """How tasks are decorated for a target: retries, caching, and a per-stage hook."""

    retries: int = 0
    backoff_seconds: int = 10
    configure: Optional[Callable[[dsl.PipelineTask, str], None]] = None
    #: Where tuning trials run: "optuna" in the tune pod, "katib" as an Experiment.
    tune_backend: str = "optuna"
    #: ClusterConfig (as a dict) handed to stages that create cluster resources.
    cluster: Optional[dict] = None


def _task(task: dsl.PipelineTask, stage: str, policy: TaskPolicy, version: str,
          display: str = "") -> dsl.PipelineTask:
    task.set_display_name(display or stage)
    task.set_env_variable("KUBETRAIN_CODE_VERSION", version)
    if policy.retries:
        task.set_retry(num_retries=policy.retries, backoff_duration=f"{policy.backoff_seconds}s",
                       backoff_factor=2.0, backoff_max_duration="600s")
    if policy.configure:
        policy.configure(task, stage)
    return task


def build_pipeline(policy: TaskPolicy = TaskPolicy()) -> Callable:
    """The pipeline function for one target (local runs retry nothing: errors are ours)."""
    version = code_version()
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER if policy.cluster else ""

    def t(task: dsl.PipelineTask, stage: str, display: str = "") -> dsl.PipelineTask:
        return _task(task, stage, policy, version, display)

    def training_pipeline(
        dataset: str = D.dataset, label_column: str = D.label_column, fingerprint: str = "",
        impute: str = D.impute, outliers: str = D.outliers, outlier_action: str = D.outlier_action,
        outlier_threshold: float = D.outlier_threshold, scaling: str = D.scaling,
        test_fraction: float = D.test_fraction, val_fraction: float = D.val_fraction,
        augment_copies: int = D.augment_copies, max_shift: int = D.max_shift,
        max_rotation: float = D.max_rotation, flip_horizontal: bool = D.flip_horizontal,
        flip_vertical: bool = D.flip_vertical, noise_std: float = D.noise_std,
        brightness: float = D.brightness, oversample: bool = D.oversample,
        model: str = D.model, epochs: int = D.epochs, batch_size: int = D.batch_size,
        learning_rate: float = D.learning_rate, optimizer: str = D.optimizer,
        momentum: float = D.momentum, weight_decay: float = D.weight_decay, l1: float = D.l1,
        dropout: float = D.dropout, width: int = D.width, lr_schedule: str = D.lr_schedule,
        patience: int = D.patience, seed: int = D.seed, device: str = D.device,
        nproc: int = D.nproc,
        tune_trials: int = D.tune_trials, tune_parallel: int = D.tune_parallel,
        tune_algorithm: str = D.tune_algorithm, tune_early_stopping: str = D.tune_early_stopping,
        tune_epochs: int = D.tune_epochs, tune_max_failed: int = D.tune_max_failed,
        tune_objective: str = D.tune_objective, min_accuracy: float = D.min_accuracy,
        accuracy_budget: float = D.accuracy_budget, prune_amount: float = D.prune_amount,
        publish_uri: str = D.publish_uri, model_name: str = D.model_name,
    ) -> Outputs:
        raw = t(ingest(source=dataset, label_column=label_column, fingerprint=fingerprint),
                "ingest")
        splits = t(clean(table=raw.outputs["dataset"], impute=impute, outliers=outliers,
                         outlier_action=outlier_action, outlier_threshold=outlier_threshold,
                         scaling=scaling, test_fraction=test_fraction,
                         val_fraction=val_fraction, seed=seed), "clean")
        aug = t(augment(train=splits.outputs["train"], augment_copies=augment_copies,
                        max_shift=max_shift, max_rotation=max_rotation,
                        flip_horizontal=flip_horizontal, flip_vertical=flip_vertical,
                        noise_std=noise_std, brightness=brightness, oversample=oversample,
                        seed=seed), "augment")
        with dsl.If(tune_trials > 0, name="tuning-requested"):
            tuned = t(tune(train=aug.outputs["augmented"], validation=splits.outputs["validation"],
                           model=model, optimizer=optimizer, momentum=momentum, l1=l1,
                           lr_schedule=lr_schedule, patience=patience, seed=seed, device=device,
                           tune_trials=tune_trials, tune_parallel=tune_parallel,
                           tune_algorithm=tune_algorithm, tune_early_stopping=tune_early_stopping,
                           tune_epochs=tune_epochs, tune_max_failed=tune_max_failed,
                           tune_objective=tune_objective, backend=policy.tune_backend,
                           cluster=policy.cluster or {}, run_id=run_id), "tune")
        with dsl.Else(name="tuning-skipped"):
            defaults = t(default_hyperparameters(
                learning_rate=learning_rate, weight_decay=weight_decay, dropout=dropout,
                width=width, batch_size=batch_size, tune_objective=tune_objective),
                "defaults", "tune (skipped)")
        best = dsl.OneOf(tuned.outputs["best_hyperparameters"],
                         defaults.outputs["best_hyperparameters"])
        # kfp.local selects only parameters with OneOf, so the branch results the
        # run report needs travel as dicts; the artifacts stay on each task for the UI.
        tuning = dsl.OneOf(tuned.outputs["tuning"], defaults.outputs["tuning"])
        trained = t(train(train=aug.outputs["augmented"], validation=splits.outputs["validation"],
                          hyperparameters=best, model=model, epochs=epochs,
                          batch_size=batch_size, learning_rate=learning_rate,
                          optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                          l1=l1, dropout=dropout, width=width, lr_schedule=lr_schedule,
                          patience=patience, seed=seed, device=device, nproc=nproc,
                          cluster=policy.cluster or {}, run_id=run_id), "train")
        judged = t(evaluate(trained_model=trained.outputs["trained_model"],
                            test=splits.outputs["test"], min_accuracy=min_accuracy), "evaluate")
        with dsl.If(judged.outputs["gate"] == "pass", name="quality-gate-passed"):
            small = t(compress(trained_model=trained.outputs["trained_model"],
                               test=splits.outputs["test"], accuracy_budget=accuracy_budget,
                               prune_amount=prune_amount), "compress")
            with dsl.If(publish_uri != "", name="publish-requested"):
                t(publish(trained_model=trained.outputs["trained_model"],
                          compressed_model=small.outputs["compressed_model"],
                          evaluation=judged.outputs["evaluation"], dataset=raw.outputs["dataset"],
                          best_hyperparameters=best, publish_uri=publish_uri,
                          model_name=model_name), "publish")
        with dsl.Else(name="quality-gate-failed"):
            skipped = t(skip_compression(evaluation=judged.outputs["evaluation"]),
                        "skip", "compress (skipped: quality gate)")
        return Outputs(
            dataset=raw.outputs["dataset"], train_split=splits.outputs["train"],
            augmented=aug.outputs["augmented"], tuning=tuning, best_hyperparameters=best,
            trained_model=trained.outputs["trained_model"],
            evaluation=judged.outputs["evaluation"],
            compression=dsl.OneOf(small.outputs["summary"], skipped.outputs["summary"]))

    training_pipeline.__doc__ = _docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=(
        "Train, tune (Katib semantics), evaluate, compress and publish a classifier: "
        "ingest -> clean -> augment -> tune -> train -> evaluate -> compress -> publish."))(training_pipeline)


def _docstring() -> str:
    """Google-style Args, which KFP turns into parameter descriptions in the UI."""
    lines = ["Kubetrain training pipeline.", "", "Args:"]
    for f in fields_of():
        lines.append(f"    {f.name}: {f.metadata['help']}")
        if f.name == "label_column":
            lines.append("    fingerprint: Content hash of a local dataset file, so the "
                         "cache notices edits (set by the CLI; leave empty).")
    return "\n".join(lines)


training_pipeline = build_pipeline()
