"""KFP component: train."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from kubetrain.components.common import component


@component
def train(train: Input[Dataset], validation: Input[Dataset], hyperparameters: dict,
          model: str, epochs: int, batch_size: int, learning_rate: float, optimizer: str,
          momentum: float, weight_decay: float, l1: float, dropout: float, width: int,
          lr_schedule: str, patience: int, seed: int, device: str, nproc: int, cluster: dict,
          run_id: str, trained_model: Output[Model], metrics: Output[Metrics], report: Output[HTML],
          checkpoint: Output[Artifact]):
    """Train the final model (tuned values override the defaults) with early stopping.

    In this pod, with `nproc` DDP processes; or, when the compiled cluster placement asks
    for several nodes or GPUs, as a Kubeflow Trainer TrainJob that this pod follows.
    """
    from kubetrain.stages import train_stage

    settings = dict(model=model, epochs=epochs, batch_size=batch_size,
                    learning_rate=learning_rate, optimizer=optimizer, momentum=momentum,
                    weight_decay=weight_decay, l1=l1, dropout=dropout, width=width,
                    lr_schedule=lr_schedule, patience=patience, seed=seed, device=device,
                    nproc=nproc)
    meta = train_stage(train.path, validation.path, hyperparameters, trained_model.path,
                       metrics.path, report.path, settings, checkpoint_dir=checkpoint.path,
                       cluster=cluster, train_uri=train.uri, val_uri=validation.uri,
                       output_uri=checkpoint.uri + "-trainjob", run_id=run_id)
    for name in ("val_accuracy", "val_loss", "best_epoch", "epochs_run", "seconds"):
        metrics.log_metric(name, float(meta[name]))
    trained_model.metadata.update(meta)
