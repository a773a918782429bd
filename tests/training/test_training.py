"""Train stage library (`kubetrain.training.loop`, `kubetrain.training.models`): real tiny
networks on sklearn's breast_cancer (table) and digits (8x8 images), no KFP.
Every run is a few epochs on a few hundred rows: seconds on 2 cores."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import Schema
from kubetrain.training import checkpoint
from kubetrain.training.loop import TUNABLE, describe, fit, fit_config, tuned_values
from kubetrain.training.models import load_model, predict_proba, save_model

SEED = 42
TRAIN = TrainConfig()  # the default recipe: model=auto, adamw, cosine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cancer():
    """Standardized breast_cancer: ((X, y), (Xv, yv), schema) with a table schema."""
    data = load_breast_cancer()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    X_tr, X_va, y_tr, y_va = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = X_tr.mean(0), X_tr.std(0)
    scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    schema = Schema("table", list(data.feature_names), list(data.target_names))
    return (scale(X_tr), y_tr), (scale(X_va), y_va), schema


@pytest.fixture(scope="module")
def digits():
    """Digits standardized globally, as an image dataset [1, 8, 8]."""
    data = load_digits()
    X = data.data.astype(np.float32)
    X = ((X - X.mean()) / X.std()).astype(np.float32)
    X_tr, X_va, y_tr, y_va = train_test_split(
        X, data.target.astype(np.int64), test_size=0.25, random_state=0, stratify=data.target
    )
    schema = Schema(
        "image",
        [f"pixel_{i}" for i in range(64)],
        [str(i) for i in range(10)],
        image_shape=[1, 8, 8],
    )
    return (X_tr, y_tr), (X_va, y_va), schema


def _accuracy(model, X, y) -> float:
    return float((predict_proba(model, X).argmax(1).numpy() == y).mean())


def _val_loss(model, X, y) -> float:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(
            model(torch.as_tensor(X)), torch.as_tensor(y)
        ).item()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# --- learning -------------------------------------------------------------------------


def test_the_auto_network_learns_breast_cancer(cancer):
    train, val, schema = cancer
    result = fit(
        TRAIN,
        HyperConfig(width=32, learning_rate=1e-2),
        SEED,
        train,
        val,
        schema,
        epochs=5,
        verbose=False,
    )
    assert result.spec.arch == "tabular"  # model=auto on a table of up to 100,000 rows
    assert result.metrics["val_accuracy"] > 0.93
    # the reported metric is the returned model's, measured again from the outside
    assert _accuracy(result.model, *val) == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)
    assert [r["epoch"] for r in result.history] == list(range(1, len(result.history) + 1))
    assert not result.model.training  # handed back in eval mode


def test_cnn_learns_digits(digits):
    train, val, schema = digits
    result = fit(
        TRAIN,
        HyperConfig(width=32, learning_rate=5e-3),
        SEED,
        train,
        val,
        schema,
        epochs=3,
        verbose=False,
    )
    assert result.spec.arch == "cnn"  # model=auto on images
    assert result.spec.image_shape == [1, 8, 8]
    assert result.metrics["val_accuracy"] > 0.9
    assert _accuracy(result.model, *val) == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)


# --- determinism ----------------------------------------------------------------------


def test_same_seed_same_model_different_seed_different_model(cancer):
    train, val, schema = cancer
    hyper = HyperConfig(width=16, dropout=0.2)
    a = fit(TRAIN, hyper, 7, train, val, schema, epochs=3, verbose=False)
    b = fit(TRAIN, hyper, 7, train, val, schema, epochs=3, verbose=False)
    c = fit(TRAIN, hyper, 8, train, val, schema, epochs=3, verbose=False)
    assert _same_weights(a.model, b.model)
    assert _without_time(a.history) == _without_time(b.history)
    assert not _same_weights(a.model, c.model)
    assert _without_time(a.history) != _without_time(c.history)


# --- early stopping -------------------------------------------------------------------

#: On 40 training rows, no regularization and a high constant rate: validation loss falls
#: for a few epochs, then rises as the network overfits. (recipe, tunables, epochs)
OVERFIT = (
    TrainConfig(optimizer="adam", patience=2, lr_schedule="none"),
    HyperConfig(width=64, learning_rate=3e-3, dropout=0.0, weight_decay=0.0, batch_size=8),
    60,
)


def test_early_stopping_returns_best_epoch_model(cancer):
    (X, y), val, schema = cancer
    train, hyper, epochs = OVERFIT
    result = fit(train, hyper, SEED, (X[:40], y[:40]), val, schema, epochs=epochs, verbose=False)
    losses = [r["val_loss"] for r in result.history]
    assert len(result.history) < epochs
    assert result.metrics["epochs_run"] == len(result.history)
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert 1 < result.best_epoch < len(result.history)  # it improved, then stalled
    assert len(result.history) - result.best_epoch == train.patience
    assert result.metrics["val_loss"] == min(losses)
    # the weights handed back are the best epoch's, not the last one's
    assert _val_loss(result.model, *val) == pytest.approx(min(losses), abs=1e-5)
    assert _val_loss(result.model, *val) < losses[-1] - 1e-3


# --- optimizers and schedules ---------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["cosine", "step", "none"])
def test_optimizer_and_schedule(cancer, optimizer, schedule):
    train, val, schema = cancer
    lr = 1e-2
    recipe = TrainConfig(optimizer=optimizer, lr_schedule=schedule, patience=100)
    result = fit(
        recipe,
        HyperConfig(width=16, learning_rate=lr),
        SEED,
        train,
        val,
        schema,
        epochs=6,
        verbose=False,
    )
    assert len(result.history) == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]  # it learns
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(lr)
    if schedule == "cosine":
        assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False))
        assert lrs[-1] < 0.1 * lr
    elif schedule == "step":  # step_size = epochs // 3 = 2, gamma 0.1
        assert lrs == pytest.approx([lr, lr, lr / 10, lr / 10, lr / 100, lr / 100])
    else:
        assert lrs == pytest.approx([lr] * 6)


def test_l1_shrinks_weights(cancer):
    train, val, schema = cancer

    def weight_l1(model):
        return sum(p.abs().sum().item() for p in model.parameters() if p.ndim > 1)

    hyper = HyperConfig(width=16)
    plain = fit(TrainConfig(l1=0.0), hyper, SEED, train, val, schema, epochs=4, verbose=False)
    sparse = fit(TrainConfig(l1=1e-3), hyper, SEED, train, val, schema, epochs=4, verbose=False)
    assert weight_l1(sparse.model) < 0.97 * weight_l1(plain.model)


# --- hook and checkpoints -------------------------------------------------------------


def test_hook_stops_training(cancer):
    train, val, schema = cancer
    seen = []

    def hook(epoch, metrics):
        seen.append((epoch, dict(metrics)))
        return epoch == 2

    result = fit(
        TRAIN, HyperConfig(width=16), SEED, train, val, schema, epochs=6, hook=hook, verbose=False
    )
    assert result.stopped_by_hook
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert [e for e, _ in seen] == [1, 2]
    assert set(seen[0][1]) == {"validation-accuracy", "validation-loss"}
    assert seen[1][1]["validation-loss"] == result.history[1]["val_loss"]
    plain = fit(TRAIN, HyperConfig(width=16), SEED, train, val, schema, epochs=3, verbose=False)
    assert not plain.stopped_by_hook and len(plain.history) == 3


def test_checkpoint_each_epoch_and_resume(cancer, tmp_path):
    train, val, schema = cancer
    recipe, hyper, epochs = TrainConfig(patience=100), HyperConfig(width=16, dropout=0.2), 5
    ckpt = tmp_path / "ckpt"
    uninterrupted = fit(recipe, hyper, SEED, train, val, schema, epochs=epochs, verbose=False)

    saved = []

    def preempted_after_epoch_2(epoch, metrics):
        # written before the hook, and plain enough for the safe loader
        state = torch.load(ckpt / "last.pt", weights_only=True)
        saved.append(state["epoch"])
        return epoch == 2

    first = fit(
        recipe,
        hyper,
        SEED,
        train,
        val,
        schema,
        epochs=epochs,
        checkpoint_dir=str(ckpt),
        hook=preempted_after_epoch_2,
        verbose=False,
    )
    assert saved == [1, 2] and len(first.history) == 2

    epochs_trained = []
    resumed = fit(
        recipe,
        hyper,
        SEED,
        train,
        val,
        schema,
        epochs=epochs,
        checkpoint_dir=str(ckpt),
        verbose=False,
        hook=lambda epoch, m: epochs_trained.append(epoch) and False,
    )
    assert epochs_trained == [3, 4, 5]  # continued, did not restart at epoch 1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
    # resuming is exact: same weights, losses and learning rates as never stopping
    assert _without_time(resumed.history) == _without_time(uninterrupted.history)
    assert _same_weights(resumed.model, uninterrupted.model)
    assert resumed.best_epoch == uninterrupted.best_epoch

    # a finished run's checkpoint: nothing left to train, same result
    again = fit(
        recipe,
        hyper,
        SEED,
        train,
        val,
        schema,
        epochs=epochs,
        checkpoint_dir=str(ckpt),
        verbose=False,
        hook=lambda epoch, m: pytest.fail("trained past the finished checkpoint"),
    )
    assert _without_time(again.history) == _without_time(uninterrupted.history)
    assert _same_weights(again.model, uninterrupted.model)

    # other settings, or another epoch count (the schedule differs): a fresh run
    other = fit(
        recipe, hyper, 1, train, val, schema, checkpoint_dir=str(ckpt), epochs=2, verbose=False
    )
    assert [r["epoch"] for r in other.history] == [1, 2]
    longer = fit(
        recipe, hyper, SEED, train, val, schema, checkpoint_dir=str(ckpt), epochs=3, verbose=False
    )
    assert [r["epoch"] for r in longer.history] == [1, 2, 3]


def test_fit_config_holds_everything_that_decides_training(cancer):
    train, val, schema = cancer
    recipe, hyper = TrainConfig(patience=100), HyperConfig(width=16)
    result = fit(recipe, hyper, 3, train, val, schema, epochs=1, verbose=False)
    resolved = hyper.for_kind("table")  # the learning rate and batch size 0: auto
    assert (resolved.learning_rate, resolved.batch_size) == (2e-3, 64)
    assert result.config == fit_config(recipe, resolved, 3, 1)
    assert result.config == {**recipe.to_dict(), **resolved.to_dict(), "seed": 3, "epochs": 1}


def test_images_left_at_auto_train_with_the_image_learning_rate_and_batch(digits, monkeypatch):
    """The same auto settings train an image split with smaller, larger steps than a table."""
    train, val, schema = digits
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", _counted(torch.optim.AdamW.step, steps))
    result = fit(TRAIN, HyperConfig(width=32), SEED, train, val, schema, epochs=1, verbose=False)
    image = HyperConfig().for_kind("image")
    assert (result.config["learning_rate"], result.config["batch_size"]) == (
        image.learning_rate,
        image.batch_size,
    )
    assert result.history[0]["lr"] == image.learning_rate
    assert len(steps) == math.ceil(len(train[1]) / image.batch_size)


def _counted(step, calls: list):
    def counting(self, *args, **kwargs):
        calls.append(1)
        return step(self, *args, **kwargs)

    return counting


def test_resume_keeps_early_stopping_count(cancer, tmp_path):
    (X, y), val, schema = cancer
    recipe, hyper, epochs = OVERFIT
    train = (X[:40], y[:40])
    straight = fit(recipe, hyper, SEED, train, val, schema, epochs=epochs, verbose=False)
    stop_at = straight.best_epoch + 1  # one epoch without improvement already counted
    fit(
        recipe,
        hyper,
        SEED,
        train,
        val,
        schema,
        epochs=epochs,
        checkpoint_dir=str(tmp_path),
        verbose=False,
        hook=lambda epoch, m: epoch == stop_at,
    )
    resumed = fit(
        recipe,
        hyper,
        SEED,
        train,
        val,
        schema,
        epochs=epochs,
        checkpoint_dir=str(tmp_path),
        verbose=False,
    )
    assert len(resumed.history) == len(straight.history)
    assert resumed.best_epoch == straight.best_epoch


class _RunsACommand:
    """Pickles as a call of os.system: what a crafted last.pt would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_checkpoint_is_refused_unexecuted(cancer, tmp_path, writer):
    train, val, schema = cancer
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    payload = {"config": {}, "epoch": 1, "model": _RunsACommand(f"touch {marker}")}
    if writer == "torch.save":  # the zip format fit itself writes
        torch.save(payload, ckpt / "last.pt")
    else:  # a bare pickle (protocol 2: plain GLOBAL/REDUCE opcodes)
        (ckpt / "last.pt").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(KubetrainError) as info:
        fit(
            TRAIN,
            HyperConfig(width=8),
            SEED,
            train,
            val,
            schema,
            epochs=1,
            checkpoint_dir=str(ckpt),
            verbose=False,
        )
    message = str(info.value)
    assert not marker.exists()  # the command never ran
    assert "\n" not in message
    assert str(ckpt / "last.pt") in message and "delete it" in message
    assert (ckpt / "last.pt").exists()  # left for the user to inspect, not overwritten


def test_a_damaged_checkpoint_is_a_one_line_error(cancer, tmp_path):
    train, val, schema = cancer
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(
        KubetrainError,
        match=r"cannot resume from checkpoint .*last\.pt.*"
        r"delete it",
    ) as info:
        fit(
            TRAIN,
            HyperConfig(width=8),
            SEED,
            train,
            val,
            schema,
            epochs=1,
            checkpoint_dir=str(tmp_path),
            verbose=False,
        )
    assert "\n" not in str(info.value)


def test_a_failed_checkpoint_write_leaves_no_temp_file(cancer, tmp_path, monkeypatch):
    train, val, schema = cancer
    real_save = torch.save
    writes = []

    def disk_full_at_epoch_2(obj, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"partial")  # what a write cut short leaves
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_epoch_2)
    with pytest.raises(KubetrainError) as info:
        fit(
            TRAIN,
            HyperConfig(width=8),
            SEED,
            train,
            val,
            schema,
            epochs=3,
            checkpoint_dir=str(tmp_path),
            verbose=False,
        )
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write checkpoint {tmp_path / 'last.pt'}" in message
    assert "No space left on device" in message
    assert not (tmp_path / "last.tmp").exists()
    # the previous epoch's checkpoint survives intact
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


# --- settings and errors --------------------------------------------------------------


def test_tuned_values_replace_coerces_and_rejects_unknown():
    # KFP hands ints inside dicts back as floats: Section.replace coerces them
    hyper = HyperConfig().replace(
        {"width": 64.0, "batch_size": 32.0, "learning_rate": 0.01, "dropout": 0}
    )
    assert hyper.width == 64 and type(hyper.width) is int
    assert hyper.batch_size == 32 and type(hyper.batch_size) is int
    assert hyper.learning_rate == 0.01 and hyper.dropout == 0.0
    assert HyperConfig().weight_decay == hyper.weight_decay  # everything else unchanged
    assert tuned_values(hyper) == hyper.to_dict()
    with pytest.raises(KubetrainError, match="unknown hyper setting.*epochs"):
        HyperConfig().replace({"epochs": 3, "width": 64})
    with pytest.raises(KubetrainError):
        HyperConfig().replace({"width": "wide"})
    assert set(TUNABLE) == {"learning_rate", "weight_decay", "dropout", "width", "batch_size"}


def test_describe_names_what_a_result_was_trained_with():
    hyper = HyperConfig(width=32)
    shown = describe(TrainConfig(optimizer="sgd", l1=1e-4), hyper, 7, 12)
    assert shown == {
        **hyper.to_dict(),
        "optimizer": "sgd",
        "lr_schedule": "cosine",
        "epochs": 12,
        "model": "auto",
        "l1": 1e-4,
        "seed": 7,
    }
    assert list(shown)[: len(TUNABLE)] == list(TUNABLE)
    resnet = describe(TrainConfig(), hyper, 7, 12, width=False)  # its shape sets its channels
    assert "width" not in resnet and resnet == {k: v for k, v in shown.items() if k != "width"} | {
        "optimizer": "adamw",
        "l1": 0.0,
    }


def test_cnn_on_a_table_is_a_user_error(cancer):
    train, val, schema = cancer
    with pytest.raises(KubetrainError, match="model=cnn needs image data"):
        fit(
            TrainConfig(model="cnn"),
            HyperConfig(),
            SEED,
            train,
            val,
            schema,
            epochs=1,
            verbose=False,
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_is_a_one_line_error(cancer):
    train, val, schema = cancer
    with pytest.raises(KubetrainError) as info:
        fit(
            TrainConfig(device="cuda"),
            HyperConfig(),
            SEED,
            train,
            val,
            schema,
            epochs=1,
            verbose=False,
        )
    message = str(info.value)
    assert "cuda" in message.lower() and "\n" not in message


def test_empty_or_mismatched_splits_are_user_errors(cancer):
    (X, y), (Xv, yv), schema = cancer
    hyper = HyperConfig(width=8)
    with pytest.raises(KubetrainError, match="must not be empty"):
        fit(TRAIN, hyper, SEED, (X, y), (Xv[:0], yv[:0]), schema, epochs=1, verbose=False)
    with pytest.raises(KubetrainError, match="feature count mismatch"):
        fit(TRAIN, hyper, SEED, (X[:, :5], y), (Xv[:, :5], yv), schema, epochs=1, verbose=False)


def test_divergence_names_the_learning_rate(digits):
    train, val, schema = digits
    recipe, hyper = (
        TrainConfig(model="cnn", optimizer="sgd"),
        HyperConfig(learning_rate=10.0, width=16),
    )
    with pytest.raises(KubetrainError, match="diverged at epoch 1.*--learning-rate"):
        fit(recipe, hyper, SEED, train, val, schema, epochs=2, verbose=False)


def test_non_finite_input_is_reported_as_divergence(cancer):
    (X, y), val, schema = cancer
    X = X.copy()
    X[3, 2] = np.inf
    with pytest.raises(KubetrainError, match="--learning-rate"):
        fit(TRAIN, HyperConfig(width=16), SEED, (X, y), val, schema, epochs=2, verbose=False)


@pytest.mark.parametrize("lr", [1.0, 3.0, 10.0])
def test_unstable_sgd_never_returns_a_non_finite_history(cancer, lr):
    """Either training raises the divergence error, or every recorded loss is finite
    (a history with inf would also break the JSON metrics artifacts)."""
    train, val, schema = cancer
    recipe = TrainConfig(optimizer="sgd", patience=100)
    try:
        result = fit(
            recipe,
            HyperConfig(learning_rate=lr, width=32),
            SEED,
            train,
            val,
            schema,
            epochs=5,
            verbose=False,
        )
    except KubetrainError as exc:
        assert "--learning-rate" in str(exc)
        return
    assert all(
        math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in result.history
    )


# --- model bundle ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cancer", "digits"])
def test_model_bundle_round_trip(which, cancer, digits, tmp_path):
    train, (Xv, yv), schema = {"cancer": cancer, "digits": digits}[which]
    result = fit(
        TRAIN, HyperConfig(width=16), SEED, train, (Xv, yv), schema, epochs=1, verbose=False
    )
    save_model(tmp_path / "model", result.model, result.spec, {"note": "round trip"})
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "info.json",
        "sha256.json",
        "spec.json",
        "weights.pt",
    ]
    model, spec, info = load_model(tmp_path / "model")
    assert spec == result.spec and info == {"note": "round trip"}
    assert not model.training
    assert torch.equal(predict_proba(model, Xv), predict_proba(result.model, Xv))


def test_loading_a_directory_without_weights_is_a_user_error(tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(KubetrainError, match="no weights.pt"):
        load_model(tmp_path)
    with pytest.raises(KubetrainError, match="no weights.pt"):
        load_model(tmp_path / "missing")


def test_the_batch_grows_with_big_splits_and_stays_for_small_ones():
    from kubetrain.training.loop import MAX_SCALED_BATCH, REFERENCE_ROWS, effective_batch

    assert effective_batch(64, 1_797) == 64  # digits-sized: what was given or tuned
    assert effective_batch(64, REFERENCE_ROWS) == 64
    assert effective_batch(64, 2 * REFERENCE_ROWS) == 128
    assert effective_batch(64, 700_000) == 2048  # a 1M-row table's training split
    assert effective_batch(64, 10**8) == MAX_SCALED_BATCH
    assert effective_batch(8192, 10**8) == 8192  # an explicit big batch is never cut


def test_validation_is_scored_in_chunks_with_the_whole_split_result(monkeypatch) -> None:
    import contextlib

    from torch import nn

    from kubetrain.training import loop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    X, y = torch.randn(1000, 5), torch.randint(0, 3, (1000,))
    objective = loop.Objective()
    whole = loop._evaluate(model, X, y, contextlib.nullcontext, objective)
    monkeypatch.setattr(loop, "EVAL_ROWS", 64)  # 16 chunks, the last one short
    chunked = loop._evaluate(model, X, y, contextlib.nullcontext, objective)
    with torch.no_grad():
        logits = model(X)
    loss, acc = "validation-loss", "validation-accuracy"
    assert whole[loss] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert whole[acc] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert chunked[loss] == pytest.approx(whole[loss], rel=1e-6) and chunked[acc] == whole[acc]
