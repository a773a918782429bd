"""KFP components: tune, and the hyperparameter defaults used when tuning is skipped."""

from typing import NamedTuple

from kfp.dsl import HTML, Dataset, Input, Output

from kubetrain.components.common import component


@component
def tune(
    train: Input[Dataset],
    validation: Input[Dataset],
    model: str,
    regression_loss: str,
    optimizer: str,
    momentum: float,
    l1: float,
    lr_schedule: str,
    patience: int,
    device: str,
    torch_compile: str,
    initial_weights: str,
    learning_rate: float,
    weight_decay: float,
    dropout: float,
    width: int,
    batch_size: int,
    tune_trials: int,
    tune_time_budget: float,
    tune_parallel: int,
    tune_algorithm: str,
    tune_early_stopping: str,
    tune_epochs: int,
    cv_folds: int,
    tune_max_failed: int,
    tune_objective: str,
    seed: int,
    cluster: dict,
    run_id: str,
    trials: Output[Dataset],
    report: Output[HTML],
) -> NamedTuple("Tuned", [("best_hyperparameters", dict), ("tuning", dict)]):
    """Search learning rate, weight decay, dropout, width and batch size (Katib semantics);
    locally the configured values are the first trial.

    Locally (cluster empty) the trials run in this pod with Optuna; compiled for a
    cluster, a Katib Experiment runs them on the GPU pool.
    """
    from kubetrain.cluster.backends import tuner_for
    from kubetrain.config import RunConfig
    from kubetrain.stages import tune_stage

    cfg = RunConfig.pick(locals())
    best, tuning = tune_stage(
        train.path,
        validation.path,
        trials.path,
        report.path,
        cfg.train,
        cfg.tune,
        cfg.seed,
        tuner=tuner_for(cluster, run_id),
        train_uri=train.uri,
        val_uri=validation.uri,
        hyper=cfg.hyper,
    )
    trials.metadata.update(tuning["meta"])
    return (best, tuning)


@component
def default_hyperparameters(
    learning_rate: float,
    weight_decay: float,
    dropout: float,
    width: int,
    batch_size: int,
    tune_trials: int,
    tune_time_budget: float,
    tune_parallel: int,
    tune_algorithm: str,
    tune_early_stopping: str,
    tune_epochs: int,
    cv_folds: int,
    tune_max_failed: int,
    tune_objective: str,
    trials: Output[Dataset],
    report: Output[HTML],
) -> NamedTuple("Tuned", [("best_hyperparameters", dict), ("tuning", dict)]):
    """The configured values, for runs with tune_trials=0 (the Else branch of tuning)."""
    from kubetrain.config import RunConfig
    from kubetrain.stages import default_hyperparameters_stage

    cfg = RunConfig.pick(locals())
    best, tuning = default_hyperparameters_stage(trials.path, report.path, cfg.hyper, cfg.tune)
    trials.metadata.update(tuning["meta"])
    return (best, tuning)
