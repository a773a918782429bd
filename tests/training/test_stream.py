"""Training from shards: every row once per epoch, the same steps on every rank, and a
streamed epoch interrupted mid-way resumes to the same weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data import shards
from kubetrain.data.datasets import Schema
from kubetrain.training import loop, stream
from kubetrain.training.stream import ShardStream, Streamed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int = 1200, features: int = 6, seed: int = 0):
    """Three Gaussian blobs; the centers are the same for every `n` and `seed`."""
    centers = np.random.default_rng(99).normal(0, 3, (3, features))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = (centers[y] + rng.normal(0, 1, (n, features))).astype(np.float32)
    schema = Schema("table", [f"f{i}" for i in range(features)], ["a", "b", "c"])
    return X, y.astype(np.int64), schema


@pytest.fixture
def split(tmp_path):
    X, y, schema = blobs()
    # row i's first feature gets a unique tag, so rows can be recognised after shuffling
    X[:, 0] = np.arange(len(X), dtype=np.float32)
    shards.write(tmp_path / "train", X, y, schema, max_rows_per_shard=100)
    return Streamed.open(str(tmp_path / "train")), X, y


def test_each_epoch_deals_every_shard_to_exactly_one_slot():
    for epoch in range(3):
        dealt = sorted(i for slot in range(6) for i in stream.deal(13, 7, epoch, slot, 6))
        assert dealt == list(range(13))
    assert stream.deal(13, 7, 0, 0, 1) != stream.deal(13, 7, 1, 0, 1)


def test_a_rank_streams_each_of_its_rows_once_in_batches_of_at_most_batch_rows(split):
    streamed, X, _ = split
    seen = []
    for xb, yb in ShardStream(streamed, batch_rows=64, seed=3, epoch=1, buffer_rows=250):
        assert len(xb) == len(yb) <= 64
        seen += xb[:, 0].int().tolist()
    assert sorted(seen) == list(range(len(X)))  # all 12 shards, every row once
    again = [b[0][:, 0].int().tolist() for b in ShardStream(streamed, 64, 3, 1, 0, 1, 250)]
    assert sum(again, []) == seen  # the order is a function of (seed, epoch)


def test_ranks_split_the_shards_and_run_the_same_number_of_steps(split):
    streamed, X, _ = split
    rows = [sum(len(b[1]) for b in ShardStream(streamed, 50, 3, 0, rank, 3)) for rank in range(3)]
    assert sum(rows) == len(X)
    steps = stream.steps_per_epoch(streamed, 50, 3, 0, world=3, workers=1)
    assert steps == min(rows) // 50
    for rank in range(3):
        assert len(list(ShardStream(streamed, 50, 3, 0, rank, 3))) >= steps


@pytest.mark.parametrize("slots", [13, 16, 29])
def test_fewer_shards_than_slots_share_shards_so_every_slot_gets_rows(split, slots):
    """12 shards over 13+ (rank x worker) slots: a shard is split by rows among the slots
    mapped to it, every row still streams once per epoch and no rank is left empty (an
    empty rank would skip the collectives of the steps the others run)."""
    streamed, X, _ = split
    for epoch in (0, 1):
        seen, per_slot = [], []
        for slot in range(slots):
            rows = [
                xb[:, 0].int().tolist()
                for xb, _ in ShardStream(streamed, 16, 3, epoch, slot, slots)
            ]
            per_slot.append(sum(len(r) for r in rows))
            seen += sum(rows, [])
        assert sorted(seen) == list(range(len(X)))
        assert min(per_slot) > 0
        steps = stream.steps_per_epoch(streamed, 16, 3, epoch, world=slots, workers=1)
        assert steps == max(1, min(per_slot) // 16)
    # with enough shards a slot reads whole shards, as `deal` hands them out
    assert stream.portion(12, 3, 0, 5, 12) == (stream.deal(12, 3, 0, 5, 12), 0, 1)


def test_a_damaged_shard_stops_the_stream_naming_it(split, tmp_path):
    streamed, _, _ = split
    victim = tmp_path / "train" / streamed.manifest["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    with pytest.raises(KubetrainError, match=victim.name):
        list(ShardStream(streamed, 64, 3, 0))


def test_training_from_shards_learns_like_training_in_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(loop, "STREAM_WORKERS", 0)
    X, y, schema = blobs()
    shards.write(tmp_path / "blobs", X, y, schema, max_rows_per_shard=100)
    streamed = Streamed.open(str(tmp_path / "blobs"))
    Xv, yv, _ = blobs(300, seed=1)
    cfg, hyper = TrainConfig(device="cpu"), HyperConfig(batch_size=32, width=32)
    shard_fit = loop.fit(cfg, hyper, 1, streamed, (Xv, yv), schema, 6, verbose=False)
    memory_fit = loop.fit(cfg, hyper, 1, (X, y), (Xv, yv), schema, 6, verbose=False)
    assert shard_fit.metrics["epochs_run"] == memory_fit.metrics["epochs_run"] == 6
    assert memory_fit.metrics["val_accuracy"] > 0.95
    assert shard_fit.metrics["val_accuracy"] > memory_fit.metrics["val_accuracy"] - 0.03


def test_a_streamed_epoch_interrupted_mid_way_resumes_to_the_same_weights(
    split, monkeypatch, tmp_path
):
    monkeypatch.setattr(loop, "STREAM_WORKERS", 0)
    monkeypatch.setattr(loop, "MID_EPOCH_CHECKPOINT_S", 0.0)  # a checkpoint after every step
    streamed, _, _ = split
    Xv, yv, schema = blobs(300, seed=5)
    cfg, hyper = TrainConfig(device="cpu"), HyperConfig(batch_size=64, width=16)

    def run(checkpoint_dir=None):
        return loop.fit(
            cfg,
            hyper,
            2,
            streamed,
            (Xv, yv),
            schema,
            3,
            verbose=False,
            checkpoint_dir=checkpoint_dir,
        )

    straight = run()
    real_loss, calls = loop._Loop._loss, {"n": 0}

    def crash_on_the_25th_step(self, X, y):
        calls["n"] += 1
        if calls["n"] == 25:  # epoch 2, step 7 of 18
            raise RuntimeError("preempted")
        return real_loss(self, X, y)

    monkeypatch.setattr(loop._Loop, "_loss", crash_on_the_25th_step)
    with pytest.raises(RuntimeError, match="preempted"):
        run(str(tmp_path / "ckpt"))
    monkeypatch.setattr(loop._Loop, "_loss", real_loss)
    resumed = run(str(tmp_path / "ckpt"))
    assert resumed.history == [
        {**row, "seconds": r["seconds"]}
        for row, r in zip(straight.history, resumed.history, strict=True)
    ]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_the_train_stage_streams_a_split_over_the_memory_budget(tmp_path, monkeypatch, capsys):
    from kubetrain.config.settings import FinalConfig
    from kubetrain.data.datasets import save_split
    from kubetrain.stages import train_stage

    monkeypatch.setattr(loop, "STREAM_WORKERS", 0)
    X, y, schema = blobs()
    Xv, yv, _ = blobs(300, seed=1)
    save_split(tmp_path / "train", X, y, schema)
    save_split(tmp_path / "val", Xv, yv, schema)
    out = tmp_path / "out"
    kwargs = dict(
        train=TrainConfig(device="cpu"),
        hyper=HyperConfig(batch_size=32, width=32),
        final=FinalConfig(epochs=3),
        seed=1,
    )
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", "1000")  # far less than the split's 28 KiB
    meta = train_stage(
        str(tmp_path / "train"),
        str(tmp_path / "val"),
        str(out / "model"),
        str(out / "metrics.json"),
        str(out / "report.html"),
        **kwargs,
    )
    assert "1200 rows (streamed from shards)" in capsys.readouterr().out
    assert meta["epochs_run"] == 3 and meta["val_accuracy"] > 0.9
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", str(10**9))
    train_stage(
        str(tmp_path / "train"),
        str(tmp_path / "val"),
        str(tmp_path / "m2"),
        str(tmp_path / "m2.json"),
        str(tmp_path / "r2.html"),
        **kwargs,
    )
    assert "streamed" not in capsys.readouterr().out  # fits: the in-memory fast path


def test_reader_processes_only_where_they_do_not_take_the_training_cores(monkeypatch):
    monkeypatch.setattr(loop, "STREAM_WORKERS", None)
    assert loop.stream_workers(torch.device("cpu"), 40) == 0
    assert 1 <= loop.stream_workers(torch.device("cuda"), 40) <= 4
    assert loop.stream_workers(torch.device("cuda"), 1) <= 1  # never more readers than shards


def test_the_memory_budget_can_be_set_and_defaults_to_a_share_of_memory(monkeypatch):
    from kubetrain.core import memory

    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", "2e9")
    assert memory.memory_budget() == 2_000_000_000 and memory.fits(10**9)
    monkeypatch.delenv("KUBETRAIN_MEMORY_BUDGET")
    assert 0 < memory.memory_budget() < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
