"""uint8 image splits train as stored: resident (`Stored`) or streamed, their batches are
decoded on the training device, and the model is the one the decoded float32 split gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.data import shards
from kubetrain.data.datasets import Schema
from kubetrain.training import loop, stream
from kubetrain.training.stream import ShardStream, Stored, Streamed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (3, 8, 8)
SCHEMA = Schema("image", [f"p{i}" for i in range(192)], ["dark", "light", "red"], list(SHAPE))
DECODE = {"offset": 101.5, "scale": 58.25}


def pixels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three learnable classes of noisy 8x8 colour images, as uint8."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    base = np.array([[40, 40, 40], [200, 200, 200], [200, 30, 30]])[y]  # per class, per channel
    images = base[:, :, None, None] + rng.normal(0, 40, (n, *SHAPE))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1), y.astype(np.int64)


def write_pair(tmp_path, X: np.ndarray, y: np.ndarray, rows_per_shard: int = 100):
    """The split as uint8 shards and as the float32 shards of its decoded values (same order)."""
    with shards.writer(
        tmp_path / "u8", SCHEMA, dtype=np.uint8, max_rows_per_shard=rows_per_shard
    ) as w:
        w.write(X, y)
        w.decode = dict(DECODE)
    decoded = shards.read_all(tmp_path / "u8")[0]
    shards.write(tmp_path / "f32", decoded, y, SCHEMA, max_rows_per_shard=rows_per_shard)
    return str(tmp_path / "u8"), str(tmp_path / "f32")


def same_model(a: loop.FitResult, b: loop.FitResult) -> None:
    assert [{**r, "seconds": 0} for r in a.history] == [{**r, "seconds": 0} for r in b.history]
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name


def test_a_uint8_split_is_held_as_stored_within_a_quarter_of_the_float_budget(tmp_path):
    X, y = pixels(600, 0)
    u8, f32 = write_pair(tmp_path, X, y)
    held, schema = stream.training_split(u8, budget=10**9)
    assert isinstance(held, Stored) and held.X.dtype == np.uint8 and schema == SCHEMA
    assert np.array_equal(held.X, X) and np.array_equal(held.y, y)
    assert np.array_equal(held.decoded()[0], shards.read_all(u8)[0])  # the same table
    # a budget that float32 features would overflow still holds the stored bytes
    budget = 2 * X.nbytes
    assert isinstance(stream.training_split(u8, budget)[0], Stored)
    assert isinstance(stream.training_split(f32, budget)[0], Streamed)
    assert isinstance(stream.training_split(u8, X.nbytes // 2)[0], Streamed)


def test_training_on_stored_pixels_gives_the_model_of_their_decoded_features(tmp_path):
    X, y = pixels(600, 0)
    u8, _ = write_pair(tmp_path, X, y)
    held, _ = stream.training_split(u8)
    Xv, yv = pixels(150, 1)
    val = (shards.decoder(shards.read_manifest(u8))[Xv], yv)
    cfg, hyper = TrainConfig(device="cpu", model="cnn"), HyperConfig(batch_size=64, width=16)
    stored = loop.fit(cfg, hyper, 3, held, val, SCHEMA, 3, verbose=False)
    decoded = loop.fit(cfg, hyper, 3, held.decoded(), val, SCHEMA, 3, verbose=False)
    same_model(stored, decoded)
    assert stored.metrics["val_accuracy"] > 0.9


def test_a_streamed_uint8_split_crosses_as_bytes_and_trains_as_its_float_twin(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "STREAM_WORKERS", 0)
    X, y = pixels(600, 0)
    u8, f32 = write_pair(tmp_path, X, y)
    first = next(iter(ShardStream(Streamed.open(u8), 64, 3, 1)))[0]
    assert first.dtype == torch.uint8  # the loader hands the stored bytes
    Xv, yv = pixels(150, 1)
    val = (shards.decoder(shards.read_manifest(u8))[Xv], yv)
    cfg, hyper = TrainConfig(device="cpu", model="cnn"), HyperConfig(batch_size=64, width=16)
    as_bytes = loop.fit(cfg, hyper, 3, Streamed.open(u8), val, SCHEMA, 2, verbose=False)
    as_floats = loop.fit(cfg, hyper, 3, Streamed.open(f32), val, SCHEMA, 2, verbose=False)
    same_model(as_bytes, as_floats)
