"""KFP components: tune, and the hyperparameter defaults used when tuning is skipped."""

from typing import NamedTuple

from kfp.dsl import HTML, Dataset, Input, Output

from kubetrain.components.common import component

@component
def tune(train: Input[Dataset], validation: Input[Dataset], model: str, optimizer: str,
         momentum: float, l1: float, lr_schedule: str, patience: int, seed: int, device: str,
         tune_trials: int, tune_parallel: int, tune_algorithm: str, tune_early_stopping: str,
         tune_epochs: int, tune_max_failed: int, tune_objective: str, backend: str,
         cluster: dict, run_id: str,
         trials: Output[Dataset], report: Output[HTML]) -> NamedTuple("Tuned", [("best_hyperparameters", dict), ("tuning", dict)]):
    """Search learning rate, weight decay, dropout, width and batch size (Katib semantics).

    backend "optuna" runs the trials in this pod; "katib" creates a Katib Experiment
    whose trials run on the GPU pool (cluster: the ClusterConfig it was compiled with).
    """
    from kubetrain.stages import tune_stage

    settings = dict(model=model, optimizer=optimizer, momentum=momentum, l1=l1,
                    lr_schedule=lr_schedule, patience=patience, seed=seed, device=device,
                    tune_trials=tune_trials, tune_parallel=tune_parallel,
                    tune_algorithm=tune_algorithm, tune_early_stopping=tune_early_stopping,
                    tune_epochs=tune_epochs, tune_max_failed=tune_max_failed,
                    tune_objective=tune_objective)
    best, tuning = tune_stage(train.path, validation.path, trials.path, report.path, settings,
                              backend=backend, cluster=cluster, train_uri=train.uri,
                              val_uri=validation.uri, run_id=run_id)
    trials.metadata.update(tuning["meta"])
    return (best, tuning)


@component
def default_hyperparameters(learning_rate: float, weight_decay: float, dropout: float,
                            width: int, batch_size: int, tune_objective: str,
                            trials: Output[Dataset], report: Output[HTML]) -> NamedTuple("Tuned", [("best_hyperparameters", dict), ("tuning", dict)]):
    """The configured values, for runs with tune_trials=0 (the Else branch of tuning)."""
    from kubetrain.stages import default_hyperparameters_stage

    settings = dict(learning_rate=learning_rate, weight_decay=weight_decay, dropout=dropout,
                    width=width, batch_size=batch_size, tune_objective=tune_objective)
    best, tuning = default_hyperparameters_stage(trials.path, report.path, settings)
    trials.metadata.update(tuning["meta"])
    return (best, tuning)
