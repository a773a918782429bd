"""KFP component: train."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from kubetrain.components.common import component


@component
def train(
    train: Input[Dataset],
    validation: Input[Dataset],
    hyperparameters: dict,
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
    epochs: int,
    nproc: int,
    challenger: bool,
    seed: int,
    cluster: dict,
    run_id: str,
    trained_model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoint: Output[Artifact],
):
    """Train the final model (tuned values override the defaults) with early stopping.

    In this pod, with `nproc` DDP processes; or, when the compiled cluster placement asks
    for several nodes or GPUs, as a Kubeflow Trainer TrainJob that this pod follows.
    """
    from kubetrain.cluster.backends import checkpoint_root, trainer_for
    from kubetrain.config import RunConfig
    from kubetrain.stages import train_stage

    cfg = RunConfig.pick(locals())
    meta = train_stage(
        train.path,
        validation.path,
        trained_model.path,
        metrics.path,
        report.path,
        cfg.train,
        cfg.hyper,
        cfg.final,
        cfg.seed,
        hyperparameters,
        checkpoint_dir=checkpoint.path,
        trainer=trainer_for(cfg.final, cluster, run_id),
        train_uri=train.uri,
        val_uri=validation.uri,
        output_uri=checkpoint.uri + "-trainjob",
        checkpoint_root=checkpoint_root(cluster),
    )
    scores = [k for k in meta if k.startswith(("val_", "challenger_val_"))]
    for name in (*scores, "best_epoch", "epochs_run", "seconds"):
        metrics.log_metric(name, float(meta[name]))
    trained_model.metadata.update(meta)
