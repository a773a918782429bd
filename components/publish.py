"""KFP component: publish the model bundle to object storage."""

from kfp.dsl import Artifact, Dataset, Input, Model

from kubetrain.components.common import component


@component
def publish(
    trained_model: Input[Model],
    compressed_model: Input[Model],
    evaluation: Input[Artifact],
    table: Input[Dataset],
    publish_uri: str,
    model_name: str,
    registry_url: str,
    run_id: str,
) -> str:
    """Upload ONNX + PyTorch weights + metrics + model card atomically, and register the
    version in the Kubeflow Model Registry when registry_url is set; returns its URI. The
    card's hyperparameters are those the trained model recorded."""
    from kubetrain.config import RunConfig
    from kubetrain.stages import publish_stage

    cfg = RunConfig.pick(locals())
    return publish_stage(
        trained_model.path,
        compressed_model.path,
        evaluation.path,
        table.path,
        cfg.publish,
        run_id,
    )
