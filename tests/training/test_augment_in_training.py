"""Per-batch augmentation inside the training loop, the image augment stage that records
its policy, and the CUDA-speed options that must be no-ops (or fall back) on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kubetrain.config.settings import AugmentConfig, FinalConfig, HyperConfig, TrainConfig
from kubetrain.data.augment import POLICY_KEY
from kubetrain.data.datasets import Schema, load_split, save_split
from kubetrain.training import loop
from kubetrain.training.batch_augment import AugmentPolicy, policy_from, recorded
from kubetrain.training.models import spec_for

SHAPE = (3, 12, 12)
HYPER = HyperConfig(batch_size=16, width=16, dropout=0.0)
TRAIN = TrainConfig(model="cnn", patience=10)


def images(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is which quadrant is bright: learnable, and changed by crops."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    X = rng.normal(0, 0.3, (n, *SHAPE)).astype(np.float32)
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        X[i, :, r * 6 : r * 6 + 6, c * 6 : c * 6 + 6] += 1.5
    return X.reshape(n, -1), y


def schema(policy: AugmentPolicy | None = None) -> Schema:
    c, h, w = SHAPE
    return Schema(
        kind="image",
        feature_names=[f"p{i}" for i in range(c * h * w)],
        class_names=list("abcd"),
        image_shape=list(SHAPE),
        extra={POLICY_KEY: policy.to_dict()} if policy else {},
    )


def fit(policy: AugmentPolicy | None, epochs: int = 2, train: TrainConfig = TRAIN, **kw):
    X, y = images()
    Xv, yv = images(32, seed=1)
    return loop.fit(train, HYPER, 7, (X, y), (Xv, yv), schema(policy), epochs, verbose=False, **kw)


def test_the_loop_applies_the_recorded_policy_reproducibly():
    policy = AugmentPolicy(crop_min_area=0.5, max_rotation=20.0)
    plain, augmented, again = fit(None), fit(policy), fit(policy)
    losses = [r["train_loss"] for r in augmented.history]
    assert losses != [r["train_loss"] for r in plain.history]  # the batches were augmented
    assert losses == [r["train_loss"] for r in again.history]  # seeded: the same draws
    assert augmented.config[POLICY_KEY] == policy.to_dict()  # a checkpoint is per policy
    assert POLICY_KEY not in plain.config


def test_training_batches_are_augmented_on_their_device_with_soft_targets():
    policy = AugmentPolicy(mixup_alpha=0.4, cutmix_alpha=1.0)
    X, y = images(32)
    lp = loop.training_loop(
        spec_for(schema(policy), "cnn", 16, 0.0), TRAIN, HYPER, 7, (X, y), (X, y), schema(policy)
    )
    lp._seed_augmentation(1)
    xb, yb = torch.as_tensor(X[:16]), torch.as_tensor(y[:16])
    out, target = lp.training_batch(xb, yb)
    assert out.device == xb.device and out.shape == (16, *SHAPE)  # images, for the conv net
    assert not torch.allclose(out, xb.reshape(16, *SHAPE))
    assert target.shape == (16, 4) and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(16))
    assert (target.max(1).values < 1).any()  # soft: mixed pairs
    # validation batches are laid out, never augmented
    torch.testing.assert_close(lp.inputs(xb), xb.reshape(16, *SHAPE))


def test_mixup_trains_and_an_mlp_on_images_gets_flat_augmented_rows():
    result = fit(AugmentPolicy(mixup_alpha=0.4, cutmix_alpha=1.0, cutout=0.3), epochs=3)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]  # it learns
    mlp = fit(AugmentPolicy(), epochs=1, train=TrainConfig(model="mlp"))
    assert mlp.spec.arch == "mlp" and np.isfinite(mlp.history[0]["train_loss"])


def test_tables_ignore_any_policy():
    table = Schema(kind="table", feature_names=["a", "b"], class_names=["x", "y"],
                   extra={POLICY_KEY: AugmentPolicy().to_dict()})  # fmt: skip
    assert recorded(table) is None


def test_default_policy_rules():
    grey, colour = (
        policy_from(AugmentConfig(), [1, 8, 8]),
        policy_from(AugmentConfig(), [3, 32, 32]),
    )
    assert not grey.flip_horizontal and grey.crop_min_area == 0.8 and grey.saturation == 0
    assert grey.max_rotation == 10 and colour.max_rotation == 0
    assert colour.flip_horizontal and colour.crop_min_area == 0.8
    assert policy_from(AugmentConfig(), [3, 64, 64]).crop_min_area == 0.35
    assert policy_from(AugmentConfig(flip="on"), [1, 28, 28]).flip_horizontal
    assert not policy_from(AugmentConfig(flip="off"), [3, 32, 32]).flip_horizontal
    assert policy_from(AugmentConfig(crop_area=1.0, mixup=0.2), [3, 32, 32]).mixes


def test_compile_on_a_cpu_traces_and_a_failing_compiler_falls_back(monkeypatch, capsys):
    eager = fit(None, epochs=1)
    monkeypatch.setattr(loop, "COMPILE_BACKEND", "eager")  # dynamo traces; no codegen
    compiled = fit(None, epochs=1, train=TrainConfig(model="cnn", torch_compile="on"))
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"])

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler for this graph")

    monkeypatch.setattr(loop, "COMPILE_BACKEND", broken_backend)
    X, y = images()
    train = TrainConfig(model="cnn", torch_compile="on")
    lp = loop.training_loop(spec_for(schema(), "cnn", 16, 0.0), train, HYPER, 7, (X, y), (X, y),
                            schema())  # fmt: skip
    assert lp.compiled is not None
    loss = lp.train_epoch(1)
    assert lp.compiled is None and np.isfinite(loss)
    assert "torch.compile failed, training uncompiled" in capsys.readouterr().out
    off = TrainConfig(model="cnn", torch_compile="auto")  # auto: CUDA only
    assert loop.training_loop(spec_for(schema(), "cnn", 16, 0.0), off, HYPER, 7, (X, y), (X, y),
                              schema()).compiled is None  # fmt: skip


def test_augment_stage_records_the_policy_shows_samples_and_copies_nothing(tmp_path):
    from kubetrain.stages import TrainRequest, augment_stage, train_here

    X, y = images(40)
    save_split(tmp_path / "train", X, y, schema())
    report = tmp_path / "report.html"
    meta = augment_stage(str(tmp_path / "train"), str(tmp_path / "out"), str(report),
                         AugmentConfig(cutmix=1.0), 3)  # fmt: skip
    assert meta["rows_before"] == meta["rows_after"] == 40 and meta["copies"] == 0
    X_out, y_out, out_schema = load_split(tmp_path / "out")
    np.testing.assert_array_equal(X_out, X)
    policy = policy_from(AugmentConfig(cutmix=1.0), list(SHAPE))
    assert recorded(out_schema) == policy and meta["policy"] == policy.to_dict()
    page = report.read_text()
    assert "data:image/png;base64," in page and "cutmix_alpha" in page
    # the train stage trains with it and the model bundle records it
    save_split(tmp_path / "val", *images(16, seed=2), schema())
    train_here(
        TrainRequest(
            str(tmp_path / "out"), str(tmp_path / "val"), str(tmp_path / "model"),
            str(tmp_path / "metrics.json"), str(tmp_path / "train.html"), TRAIN, HYPER,
            FinalConfig(epochs=1, challenger=False), 3,
        )
    )  # fmt: skip
    info = (tmp_path / "model" / "info.json").read_text()
    assert '"augment_policy"' in info and '"cutmix_alpha": 1.0' in info


def test_a_streamed_augmented_epoch_interrupted_mid_way_resumes_to_the_same_weights(
    tmp_path, monkeypatch
):
    from kubetrain.data import shards
    from kubetrain.training.stream import Streamed

    monkeypatch.setattr(loop, "STREAM_WORKERS", 0)
    monkeypatch.setattr(loop, "MID_EPOCH_CHECKPOINT_S", 0.0)  # a checkpoint after every step
    policy = AugmentPolicy(crop_min_area=0.5, cutmix_alpha=1.0)
    X, y = images(96)
    shards.write(tmp_path / "train", X, y, schema(policy), max_rows_per_shard=32)
    streamed = Streamed.open(str(tmp_path / "train"))

    def run(checkpoint_dir=None):
        return loop.fit(TRAIN, HYPER, 7, streamed, images(16, seed=1), schema(policy), 2,
                        verbose=False, checkpoint_dir=checkpoint_dir)  # fmt: skip

    straight = run()
    real_loss, calls = loop._Loop._loss, {"n": 0}

    def crash_in_epoch_two(self, X, y):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2 (6 steps an epoch), step 3
            raise RuntimeError("preempted")
        return real_loss(self, X, y)

    monkeypatch.setattr(loop._Loop, "_loss", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="preempted"):
        run(str(tmp_path / "ckpt"))
    monkeypatch.setattr(loop._Loop, "_loss", real_loss)
    resumed = run(str(tmp_path / "ckpt"))
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
