"""Train: one PyTorch loop for every caller.

The final training, each local Optuna trial and each Katib trial call `fit`,
so tuned values mean the same thing everywhere. Data stay resident on the
device as tensors (no DataLoader: the datasets this template targets fit in
memory, and index batching is several times faster on small rows).

Inside a torch.distributed process group (`kubetrain.training.distributed.init`, under
torchrun) `fit` trains data-parallel: the model is wrapped in DDP, each rank
trains on its own slice of every epoch's permutation with ``batch_size //
world`` rows per step (the global batch stays ``batch_size``), validation is
sharded and all-reduced so every rank sees the same numbers and takes the same
early-stopping decision, and only rank 0 logs and writes checkpoints. Outside
a group nothing changes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kubetrain.training import distributed

from kubetrain.core import progress
from kubetrain.config.settings import RunConfig
from kubetrain.data.datasets import Schema
from kubetrain.core.errors import KubetrainError, require
from kubetrain.training.models import ModelSpec, build, spec_for

#: Settings a tuner may override; everything else comes from the RunConfig.
TUNABLE = ("learning_rate", "weight_decay", "dropout", "width", "batch_size")

#: Called after each epoch with (epoch, metrics); returning True stops training
#: (median stopping of a weak trial).
EpochHook = Callable[[int, dict[str, float]], bool]


@dataclass
class FitResult:
    model: nn.Module
    spec: ModelSpec
    history: list[dict[str, float]]
    best_epoch: int
    metrics: dict[str, float]
    stopped_by_hook: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def with_hyperparameters(cfg: RunConfig, hyperparameters: dict[str, Any]) -> RunConfig:
    """Apply tuned values (KFP returns ints inside dicts as floats: coerced here)."""
    unknown = sorted(set(hyperparameters) - set(TUNABLE))
    require(not unknown, f"cannot tune {', '.join(unknown)}; tunable settings are "
                         f"{', '.join(TUNABLE)}")
    merged = cfg.to_dict() | dict(hyperparameters)
    return RunConfig.from_dict(merged)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise KubetrainError("device=cuda but no CUDA GPU is visible; use --device auto "
                             "or cpu, or schedule the step on a GPU node")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on biases: decaying them only hurts.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        # Adam's weight_decay is L2 added to the gradient; AdamW decouples it.
        return torch.optim.Adam(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def make_schedule(opt: torch.optim.Optimizer, cfg: RunConfig, epochs: int):
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(epochs // 3, 1), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, autocast) -> tuple[float, float]:
    model.eval()
    with autocast():
        logits = model(X).float()
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


@torch.no_grad()
def _evaluate_sharded(model: nn.Module, X: torch.Tensor, y: torch.Tensor, autocast, rank: int,
                      world_size: int) -> tuple[float, float]:
    """`_evaluate` over all ranks: each scores rows ``rank::world``, the sums are all-reduced."""
    model.eval()
    Xs, ys = X[rank::world_size], y[rank::world_size]
    loss_sum = correct = 0.0
    if len(ys):
        with autocast():
            logits = model(Xs).float()
        loss_sum = nn.functional.cross_entropy(logits, ys, reduction="sum").item()
        correct = (logits.argmax(1) == ys).sum().item()
    loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, len(ys)])
    return loss_sum / count, correct / count


def fit(cfg: RunConfig, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        schema: Schema, epochs: int | None = None, hook: EpochHook | None = None,
        checkpoint_dir: str | None = None, stage: str = "train", verbose: bool = True) -> FitResult:
    """Train with early stopping on validation loss; returns the best epoch's weights."""
    epochs = epochs or cfg.epochs
    X_tr, y_tr = train
    X_va, y_va = val
    require(len(X_tr) > 0 and len(X_va) > 0, "training and validation splits must not be "
                                             "empty; lower --test-fraction/--val-fraction")
    require(X_tr.shape[1] == len(schema.feature_names) == X_va.shape[1],
            f"feature count mismatch: train has {X_tr.shape[1]}, validation {X_va.shape[1]}, "
            f"schema {len(schema.feature_names)}; re-run clean on the same table")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    ddp = distributed.is_active()
    rank, local_rank, world_size = distributed.world() if ddp else (0, 0, 1)
    if ddp and device.type == "cuda":  # this rank's GPU (init() made it the current one)
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    verbose = verbose and rank == 0
    spec = spec_for(schema, cfg.model, cfg.width, cfg.dropout)
    net = build(spec).to(device)  # same seed, same initial weights on every rank
    model = distributed.wrap(net, device) if ddp else net
    opt = make_optimizer(net, cfg)
    sched = make_schedule(opt, cfg, epochs)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else (
        lambda: torch.autocast("cpu", enabled=False))
    # Whole splits live on the device; index batching avoids per-batch host copies.
    Xt = torch.as_tensor(X_tr, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y_tr, dtype=torch.int64, device=device)
    Xv = torch.as_tensor(X_va, dtype=torch.float32, device=device)
    yv = torch.as_tensor(y_va, dtype=torch.int64, device=device)
    weights = [p for p in net.parameters() if p.ndim > 1]
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history = 1, []
    best = {"loss": float("inf"), "epoch": 0, "state": None}
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    bad_epochs = 0
    state = None
    if ckpt and rank == 0 and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu" if ddp else device, weights_only=False)
    if ddp:  # rank 0 alone reads the checkpoint; every rank resumes from the same state
        state = distributed.broadcast_object(state)
    if state is not None:
        # The schedule depends on the epoch count, so a checkpoint resumes only the same run.
        if state.get("config") == cfg.to_dict() and state.get("epochs") == epochs:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["schedule"])
            history, best = state["history"], state["best"]
            start_epoch = state["epoch"] + 1
            bad_epochs = state["epoch"] - best["epoch"]
            gen.set_state(state["generator"])
            torch.set_rng_state(state["rng"].cpu())  # dropout masks continue as if never stopped
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
            if verbose:
                progress.log(stage, f"resumed from checkpoint at epoch {state['epoch']}")
    if bad_epochs >= cfg.patience:  # the checkpointed run had already stopped early
        start_epoch = epochs + 1
    stopped_by_hook, started = False, time.perf_counter()
    n, bs = len(Xt), min(cfg.batch_size, len(Xt))
    if ddp:  # the global batch stays batch_size: each rank takes its share of it
        bs = max(1, bs // world_size)
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        if ddp:  # same permutation on every rank; each takes its slice (same batch count)
            perm = distributed.shard_order(perm, rank, world_size)
            torch.manual_seed(distributed.rank_seed(cfg.seed, epoch, rank))  # own dropout masks
        perm = perm.to(device)
        total = 0.0
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            with autocast():
                loss = nn.functional.cross_entropy(model(Xt[idx]).float(), yt[idx])
            if cfg.l1 > 0:
                loss = loss + cfg.l1 * sum(w.abs().sum() for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if ddp:  # all-reduced: every rank sees the same numbers and decides the same
            total, seen = distributed.all_reduce_sum([total, len(perm)])
            total = total * n / seen  # mean over the rows seen, scaled like the 1-process sum
            val_loss, val_acc = _evaluate_sharded(net, Xv, yv, autocast, rank, world_size)
        else:
            val_loss, val_acc = _evaluate(model, Xv, yv, autocast)
        if not (np.isfinite(val_loss) and np.isfinite(total)):
            raise KubetrainError(f"training diverged at epoch {epoch} (train loss {total / n}, "
                                 f"validation loss {val_loss}); lower --learning-rate "
                                 f"(now {cfg.learning_rate})")
        row = {"epoch": epoch, "train_loss": total / n, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": lr, "seconds": time.perf_counter() - t0}
        history.append(row)
        if val_loss < best["loss"] - 1e-5:
            best = {"loss": val_loss, "epoch": epoch,
                    "state": copy.deepcopy({k: v.detach().cpu() for k, v in
                                            net.state_dict().items()})}
            bad_epochs = 0
        else:
            bad_epochs += 1
        if ckpt and rank == 0:
            _save_checkpoint(ckpt, net, opt, sched, gen, cfg, epochs, epoch, history, best)
        if verbose:
            progress.log(stage, f"epoch {epoch}/{epochs} | train_loss {row['train_loss']:.4f}"
                                f" | val_loss {val_loss:.4f} | val_acc {val_acc:.4f} | "
                                f"{row['seconds']:.2f}s/epoch | ETA "
                                f"{progress.eta(started, epoch - start_epoch + 1, epochs - start_epoch + 1)}")
        stop = bool(hook and hook(epoch, {"validation-accuracy": val_acc,
                                          "validation-loss": val_loss}))
        if ddp:
            stop = distributed.any_rank(stop)  # no rank may leave the loop alone (it would hang)
        if stop:
            stopped_by_hook = True
            break
        if bad_epochs >= cfg.patience:
            if verbose:
                progress.log(stage, f"early stop: no validation-loss gain for {cfg.patience} "
                                    f"epochs; best epoch {best['epoch']}")
            break
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    net.eval()
    best_row = next(r for r in history if r["epoch"] == best["epoch"]) if best["epoch"] else history[-1]
    metrics = {"val_loss": best_row["val_loss"], "val_accuracy": best_row["val_accuracy"],
               "best_epoch": best_row["epoch"], "epochs_run": len(history),
               "seconds": round(time.perf_counter() - started, 3), "device": device.type}
    if ddp:
        metrics["processes"] = world_size
    return FitResult(model=net.cpu(), spec=spec, history=history, best_epoch=best_row["epoch"],
                     metrics=metrics, stopped_by_hook=stopped_by_hook, config=cfg.to_dict())


def _save_checkpoint(path: Path, model, opt, sched, gen, cfg, epochs, epoch, history,
                     best) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    on_cuda = next(model.parameters()).is_cuda
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(), "generator": gen.get_state(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if on_cuda else None,
                "config": cfg.to_dict(), "epochs": epochs, "epoch": epoch,
                "history": history, "best": best}, tmp)
    os.replace(tmp, path)


def tuned_values(cfg: RunConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in TUNABLE}


def describe(cfg: RunConfig) -> dict[str, Any]:
    """The hyperparameters worth showing next to a result."""
    keys = TUNABLE + ("optimizer", "lr_schedule", "epochs", "model", "l1", "seed")
    return {k: getattr(cfg, k) for k in keys if k in dataclasses.asdict(cfg)}
