"""The ResNet family: shapes by image size, the model registry, bundles, initial weights
(local and S3, refused when unsafe), and that it learns generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import Schema
from kubetrain.data.synthetic_images import generate_image
from kubetrain.training.loop import fit
from kubetrain.training.models import build, load_model, save_model, spec_for
from kubetrain.training.resnet import ResNetShape, load_initial_weights


def image_schema(shape: list[int], classes: int = 10) -> Schema:
    features = [f"pixel_{i}" for i in range(int(np.prod(shape)))]
    return Schema(
        kind="image",
        feature_names=features,
        class_names=[str(i) for i in range(classes)],
        image_shape=shape,
    )


def test_auto_picks_resnet_by_image_size_and_the_cnn_for_tiny_images():
    assert spec_for(image_schema([1, 8, 8]), "auto", 64, 0.1).arch == "cnn"  # digits
    spec = spec_for(image_schema([3, 32, 32]), "auto", 64, 0.1)
    assert spec.arch == "resnet" and spec.resnet == ResNetShape().to_dict()
    assert spec_for(image_schema([3, 64, 64]), "auto", 64, 0.1).resnet["stages"] == 4
    assert spec_for(image_schema([3, 160, 160]), "auto", 64, 0.1).resnet["stem_stride"] == 4
    assert spec_for(image_schema([3, 32, 32]), "resnet20", 64, 0.1).resnet["depth"] == 3
    table = Schema(kind="table", feature_names=["a", "b"], class_names=["x", "y"])
    with pytest.raises(KubetrainError, match="model=resnet needs image data"):
        spec_for(table, "resnet", 64, 0.1)


@pytest.mark.parametrize("shape", [[3, 32, 32], [1, 20, 24], [3, 64, 48], [3, 128, 128]])
def test_forward_takes_flat_rows(shape):
    net = build(spec_for(image_schema(shape, 7), "auto", 64, 0.0)).eval()
    out = net(torch.randn(2, int(np.prod(shape))))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_bundle_round_trip(tmp_path):
    spec = spec_for(image_schema([3, 16, 16], 4), "resnet14", 64, 0.1)
    net = build(spec).eval()
    save_model(tmp_path / "model", net, spec)
    again, spec2, _ = load_model(tmp_path / "model")
    x = torch.randn(3, 3 * 16 * 16)
    assert spec2.resnet == spec.resnet
    torch.testing.assert_close(again(x), net(x))


def test_initial_weights_local_partial_and_refused(tmp_path):
    spec = spec_for(image_schema([3, 16, 16], 10), "resnet", 64, 0.0)
    trained = build(spec).eval()
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    fresh = load_initial_weights(build(spec).eval(), str(tmp_path / "w.pt"))
    x = torch.randn(2, 3 * 16 * 16)
    torch.testing.assert_close(fresh(x), trained(x))
    # another number of classes: the backbone loads, the head keeps its own init
    other = build(spec_for(image_schema([3, 16, 16], 3), "resnet", 64, 0.0))
    head_before = other.head[-1].weight.clone()
    load_initial_weights(other, str(tmp_path / "w.pt"))
    torch.testing.assert_close(other.stem[0].weight, trained.stem[0].weight)
    torch.testing.assert_close(other.head[-1].weight, head_before)

    class Payload:  # what a crafted file holds: an object whose unpickling runs code
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(KubetrainError, match="cannot load initial weights"):
        load_initial_weights(build(spec), str(tmp_path / "evil.pt"))
    with pytest.raises(KubetrainError, match="not found"):
        load_initial_weights(build(spec), str(tmp_path / "absent.pt"))
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(KubetrainError, match="match none"):
        load_initial_weights(build(spec), str(tmp_path / "other.pt"))


def test_initial_weights_from_s3(tmp_path, s3_env):
    spec = spec_for(image_schema([3, 16, 16], 10), "resnet", 64, 0.0)
    trained = build(spec).eval()
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    uri = f"s3://{s3_env}/weights/w.pt"
    storage.upload(tmp_path / "w.pt", uri)
    fresh = load_initial_weights(build(spec).eval(), uri)
    x = torch.randn(2, 3 * 16 * 16)
    torch.testing.assert_close(fresh(x), trained(x))


def generated(n: int, start: int, classes: int, size: int = 16):
    """The first `classes` classes of the synthetic set, flattened and standardized."""
    idx = [i for i in range(start, start + n * 10) if i % 10 < classes][:n]
    images = [generate_image(i, size, seed=5) for i in idx]
    X = np.stack([p.transpose(2, 0, 1).reshape(-1) for p, _ in images]).astype(np.float32)
    return (X - 127.5) / 64.0, np.array([label for _, label in images])


def test_resnet_learns_generated_shapes(one_torch_thread):
    """Three classes (disc, ring, square) at 16x16: well above chance in a few epochs."""
    X_tr, y_tr = generated(600, 0, 3)
    X_va, y_va = generated(90, 5000, 3)
    schema = image_schema([3, 16, 16], 3)
    result = fit(
        TrainConfig(model="resnet", patience=20),
        HyperConfig(batch_size=32, learning_rate=3e-3),
        0,
        (X_tr, y_tr),
        (X_va, y_va),
        schema,
        epochs=6,
        verbose=False,
    )
    assert result.spec.arch == "resnet"
    assert max(h["val_accuracy"] for h in result.history) > 0.5  # chance: 0.33 (+-0.05)


def test_training_starts_from_initial_weights(tmp_path, one_torch_thread):
    X, y = generated(60, 0, 3)
    schema = image_schema([3, 16, 16], 3)
    start = build(spec_for(schema, "resnet", 64, 0.0))
    torch.nn.init.constant_(start.stem[0].weight, 0.01)  # unlike any random start
    torch.save(start.state_dict(), tmp_path / "start.pt")
    result = fit(
        TrainConfig(model="resnet", initial_weights=str(tmp_path / "start.pt")),
        HyperConfig(learning_rate=1e-7, weight_decay=0.0),
        0,
        (X, y),
        (X, y),
        schema,
        epochs=1,
        verbose=False,
    )
    torch.testing.assert_close(result.model.stem[0].weight, start.stem[0].weight, atol=1e-5, rtol=0)
