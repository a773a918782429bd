"""KFP component: publish the model bundle to object storage."""

from kfp.dsl import Artifact, Dataset, Input, Model

from kubetrain.components.common import component


@component
def publish(trained_model: Input[Model], compressed_model: Input[Model],
            evaluation: Input[Artifact], dataset: Input[Dataset], best_hyperparameters: dict,
            publish_uri: str, model_name: str) -> str:
    """Upload ONNX + PyTorch weights + metrics + model card atomically; returns its URI."""
    from kubetrain.stages import publish_stage

    return publish_stage(trained_model.path, compressed_model.path, evaluation.path,
                         dict(dataset.metadata), best_hyperparameters, publish_uri, model_name)
