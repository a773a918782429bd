"""Train: one PyTorch loop for every caller.

The final training, each local Optuna trial and each Katib trial call `fit`,
so tuned values mean the same thing everywhere. `fit` takes only the sections
that decide training (the shared recipe `TrainConfig`, the tunable
`HyperConfig`, the seed and an epoch count), never a whole `RunConfig`: a
trial and the final training differ only in what they pass. A split that fits
the memory budget stays resident on the device as tensors (index batching is
several times faster than a DataLoader on small rows); a bigger sharded split
is streamed through a DataLoader (`kubetrain.training.stream`).

Inside a torch.distributed process group (`kubetrain.training.distributed.init`, under
torchrun) `fit` trains data-parallel: the model is wrapped in DDP, each rank
trains on its own slice of every epoch's permutation with ``batch_size //
world`` rows per step (the global batch stays ``batch_size``), validation is
sharded and all-reduced so every rank sees the same numbers and takes the same
early-stopping decision, and only rank 0 logs and writes checkpoints. Outside
a group nothing changes.

Images are augmented per batch on the training device with the policy the augment
stage recorded in the split's schema (`kubetrain.training.batch_augment`): crops,
flips, rotation, colour jitter, cutout and, as options, mixup/cutmix with soft
targets. The draws come from a generator on the device, reseeded every epoch
from (seed, epoch, rank), so a run and its resume augment alike.

On CUDA the loop also: lays conv nets and their batches out channels_last (the
layout tensor cores take without transposes), runs under bf16 autocast,
``torch.compile``s the network (`TrainConfig.torch_compile`; a failure is logged
in one line and training continues uncompiled), keeps the split on the GPU when
it fits (`DEVICE_SHARE` of the free memory; else pinned host memory, copied
batch by batch without blocking) and syncs with the host once per epoch, not
per step. On the CPU each of these is a no-op. Image pixels stay uint8 (`Stored`,
or streamed as stored) until a batch is on the device, where a 256-entry table
decodes them: a quarter of the bytes resident and copied.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data.datasets import Schema
from kubetrain.training import checkpoint, distributed, stream
from kubetrain.training.batch_augment import AugmentPolicy, augment_batch, mix, recorded
from kubetrain.training.models import ModelSpec, build, read_info, spec_for
from kubetrain.training.objective import Objective
from kubetrain.training.resnet import load_initial_weights
from kubetrain.training.stream import Stored, Streamed

#: Settings a tuner may override: exactly the `HyperConfig` section.
TUNABLE: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HyperConfig))

#: Called after each epoch with (epoch, metrics); returning True stops training
#: (median stopping of a weak trial).
EpochHook = Callable[[int, dict[str, float]], bool]

#: Smallest validation-loss drop that counts as progress for early stopping.
MIN_GAIN = 1e-5

Split = tuple[np.ndarray, np.ndarray]
#: Seconds between the checkpoints written in the middle of a streamed epoch (a streamed
#: epoch over a big split is long: a preemption must not lose all of it).
MID_EPOCH_CHECKPOINT_S = 300.0
#: DataLoader processes that read shards for a streamed split; None: `stream_workers`.
STREAM_WORKERS: int | None = None
#: Share of the GPU's free memory an in-memory split may take on the device; a bigger one
#: stays in pinned host memory and is copied batch by batch.
DEVICE_SHARE = 0.5
#: The `torch.compile` backend (tests use "eager", which traces without generating code).
COMPILE_BACKEND: Any = "inductor"


def stream_workers(device: torch.device, n_shards: int) -> int:
    """Reader processes for a streamed split: none on the CPU, where they would take cores
    from the training itself and add a copy per batch (measured on 2 cores: 0.69x the
    in-memory rows/s with 2 workers, 1.01x with none); on a GPU up to 4, so reading and
    decoding shards overlaps the device's work."""
    if STREAM_WORKERS is not None:
        return min(STREAM_WORKERS, n_shards)
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 2) // 2, n_shards))


@dataclass
class FitResult:
    model: nn.Module
    spec: ModelSpec
    history: list[dict[str, float]]
    best_epoch: int
    metrics: dict[str, float]
    stopped_by_hook: bool = False
    #: Everything that determined the training (`fit_config`); a checkpoint resumes only
    #: a run with the same one.
    config: dict[str, Any] = field(default_factory=dict)


def fit_config(train: TrainConfig, hyper: HyperConfig, seed: int, epochs: int) -> dict[str, Any]:
    """The flat settings that determine a training run (epochs too: the schedule depends on it)."""
    return {**train.to_dict(), **hyper.to_dict(), "seed": seed, "epochs": epochs}


def tuned_values(hyper: HyperConfig) -> dict[str, Any]:
    return hyper.to_dict()


def describe(
    train: TrainConfig, hyper: HyperConfig, seed: int, epochs: int, width: bool = True
) -> dict[str, Any]:
    """The hyperparameters worth showing next to a result (not device or patience: they
    change how a run is executed or cut short, not what it learns; not ``width`` when the
    network has none, `models.uses_width`)."""
    config = fit_config(train, hyper, seed, epochs)
    keys = TUNABLE + ("optimizer", "lr_schedule", "epochs", "model", "l1", "seed")
    return {k: config[k] for k in keys if width or k != "width"}


def trained_hyperparameters(model_path: str | os.PathLike) -> dict[str, Any]:
    """The tunable values the model at ``model_path`` trained with, as the train stage
    recorded them (`describe`: auto ones resolved, no width for a network without one)."""
    recorded = read_info(model_path).get("hyperparameters", {})
    return {k: v for k, v in recorded.items() if k in TUNABLE}


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise KubetrainError(
            "device=cuda but no CUDA GPU is visible; use --device auto "
            "or cpu, or schedule the step on a GPU node"
        )
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def make_optimizer(
    model: nn.Module, train: TrainConfig, hyper: HyperConfig
) -> torch.optim.Optimizer:
    # No weight decay on biases: decaying them only hurts.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": hyper.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    # On a GPU one fused kernel updates every parameter (no per-tensor launches).
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=hyper.learning_rate,
            momentum=train.momentum,
            nesterov=train.momentum > 0,
            **fused,
        )
    if train.optimizer == "adam":
        # Adam's weight_decay is L2 added to the gradient; AdamW decouples it.
        return torch.optim.Adam(groups, lr=hyper.learning_rate, **fused)
    return torch.optim.AdamW(groups, lr=hyper.learning_rate, **fused)


def make_schedule(opt: torch.optim.Optimizer, train: TrainConfig, epochs: int):
    if train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if train.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(epochs // 3, 1), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


#: Up to this many training rows, `batch_size` is the batch; above it the batch grows
#: with the data (see `effective_batch`).
REFERENCE_ROWS = 16_384
#: The largest batch the scaling reaches (a tuned or given batch_size above it is kept).
MAX_SCALED_BATCH = 4096


def effective_batch(batch_size: int, rows: int) -> int:
    """`batch_size` scaled by the data: x2 for every doubling of rows past REFERENCE_ROWS.

    At 64 rows a step a million-row table trains at a quarter of the speed the
    same MLP reaches at 1024, and its epoch takes thousands of steps that each
    see a sliver of the data. Small tables (digits, most CSVs) keep the batch
    they were given or tuned; big ones get proportionally bigger steps, up to
    MAX_SCALED_BATCH. Tuning still searches `batch_size`: the scale applies on top.
    """
    if rows <= REFERENCE_ROWS:
        return batch_size
    factor = 2 ** int(np.floor(np.log2(rows / REFERENCE_ROWS)))
    return max(batch_size, min(batch_size * factor, MAX_SCALED_BATCH))


# --- fit ---------------------------------------------------------------------------------


def fit(
    train: TrainConfig,
    hyper: HyperConfig,
    seed: int,
    train_data: Split | Stored | Streamed,
    val_data: Split,
    schema: Schema,
    epochs: int,
    hook: EpochHook | None = None,
    checkpoint_dir: str | None = None,
    stage: str = "train",
    verbose: bool = True,
) -> FitResult:
    """Train with early stopping on validation loss; returns the best epoch's weights.

    `train_data` is the split in memory (float32 arrays, or uint8 pixels as `Stored`,
    decoded batch by batch on the device), or a `Streamed` sharded split that is
    read batch by batch (see `kubetrain.training.stream`). With
    ``checkpoint_dir`` every epoch ends with a checkpoint there (a streamed
    epoch also writes one every MID_EPOCH_CHECKPOINT_S), and a run of the same
    `fit_config` resumes from it exactly where it stopped (same weights, losses
    and learning rates as never stopping).
    """
    _check_splits(train_data, val_data, schema)
    hyper = hyper.for_kind(schema.kind)  # 0 (auto): the learning rate and batch by kind
    config = fit_config(train, hyper, seed, epochs)
    policy = recorded(schema)
    if policy is not None:  # another policy trains another model: no resume across them
        config["augment_policy"] = policy.to_dict()
    rows = _rows(train_data)
    spec = spec_for(schema, train.model, hyper.width, hyper.dropout, rows)
    loop = training_loop(spec, train, hyper, seed, train_data, val_data, schema, epochs)
    where, objective = loop.where, loop.objective
    verbose = verbose and where.rank == 0
    ckpt = checkpoint.path_in(checkpoint_dir)
    so_far = _resume(loop, ckpt, config, stage if verbose else None)
    # A checkpointed run that had already stopped early has nothing left to train.
    first = so_far.epoch + 1 if so_far.epochs_without_gain < train.patience else epochs + 1
    started, stopped_by_hook = time.perf_counter(), False
    for epoch in range(first, epochs + 1):
        t0 = time.perf_counter()
        lr = loop.opt.param_groups[0]["lr"]  # the rate this epoch trains with
        mid = _mid_epoch_saver(loop, ckpt, config, so_far, epoch)
        train_loss = loop.train_epoch(epoch, resume_at=so_far.position, on_step=mid)
        so_far.position = None
        metrics = loop.validate()
        val_loss, val_score = metrics["validation-loss"], metrics[objective.score_metric]
        _check_finite(epoch, train_loss, val_loss, hyper.learning_rate)
        so_far.record(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                objective.score_key: val_score,
                **({"val_rmse": metrics["validation-rmse"]} if objective.regression else {}),
                "lr": lr,
                "seconds": time.perf_counter() - t0,
            },
            loop.net,
        )
        if ckpt and where.rank == 0:  # before the hook: a preempted trial loses nothing
            checkpoint.save(ckpt, loop.state_dict(config, so_far))
        if verbose:
            _log_epoch(
                stage,
                so_far.history[-1],
                objective,
                epochs,
                progress.eta(started, epoch - first + 1, epochs - first + 1),
            )
        if _hook_stops(hook, epoch, metrics, where.ddp):
            stopped_by_hook = True
            break
        if so_far.epochs_without_gain >= train.patience:
            if verbose:
                progress.log(
                    stage,
                    f"early stop: no validation-loss gain for {train.patience} "
                    f"epochs; best epoch {so_far.best_epoch}",
                )
            break
    return _result(loop, spec, so_far, started, stopped_by_hook, config)


def training_loop(
    spec: ModelSpec,
    train: TrainConfig,
    hyper: HyperConfig,
    seed: int,
    train_data: Split | Stored | Streamed,
    val_data: Split,
    schema: Schema,
    epochs: int = 1,
) -> _Loop:
    """The loop `fit` trains with, for a given network spec, without fit's epochs,
    checkpoints and early stopping: `fit` drives it, `make bench-gpu` times its
    ``train_epoch`` and distillation trains a student with it."""
    hyper = hyper.for_kind(schema.kind)
    seed_everything(seed)
    where = _place(train.device)
    objective = Objective.of(schema, train.regression_loss)
    return _Loop.start(
        spec, train, hyper, seed, epochs, where, train_data, val_data, objective, recorded(schema)
    )


# --- the pieces of fit -------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Where this process trains: its device, and its share of a data-parallel run."""

    device: torch.device
    ddp: bool
    rank: int
    world_size: int


def _place(requested: str) -> _Placement:
    device = pick_device(requested)
    ddp = distributed.is_active()
    rank, local_rank, world_size = distributed.world() if ddp else (0, 0, 1)
    if ddp and device.type == "cuda":  # this rank's GPU (init() made it the current one)
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return _Placement(device, ddp, rank, world_size)


def _rows(train_data: Split | Stored | Streamed) -> int:
    return len(train_data[0]) if isinstance(train_data, tuple) else train_data.rows


def _check_splits(train_data: Split | Stored | Streamed, val_data: Split, schema: Schema) -> None:
    rows, features = (
        (len(train_data[0]), train_data[0].shape[1])
        if isinstance(train_data, tuple)
        else (train_data.rows, train_data.features)
    )
    X_va = val_data[0]
    require(
        rows > 0 and len(X_va) > 0,
        "training and validation splits must not be empty; lower --test-fraction/--val-fraction",
    )
    require(
        features == len(schema.feature_names) == X_va.shape[1],
        f"feature count mismatch: train has {features}, validation {X_va.shape[1]}, "
        f"schema {len(schema.feature_names)}; re-run clean on the same table",
    )


#: Called after each step of a streamed epoch with (batches done, the loss sum so far as
#: a device tensor, rows seen); reading the tensor is a host sync, so only when needed.
StepHook = Callable[[int, torch.Tensor, int], None]


def _mid_epoch_saver(
    loop: _Loop, ckpt: Path | None, config: dict[str, Any], so_far: _Progress, epoch: int
) -> StepHook | None:
    """For a streamed epoch: a step callback that checkpoints every MID_EPOCH_CHECKPOINT_S."""
    if loop.stream is None or ckpt is None or loop.where.rank != 0:
        return None
    last = [time.monotonic()]

    def save(batches: int, loss_sum: torch.Tensor, rows: int) -> None:
        if time.monotonic() - last[0] < MID_EPOCH_CHECKPOINT_S:
            return
        so_far.position = {
            "epoch": epoch,
            "batches": batches,
            "loss_sum": float(loss_sum.item()),
            "rows": rows,
        }
        checkpoint.save(ckpt, loop.state_dict(config, so_far))
        so_far.position, last[0] = None, time.monotonic()

    return save


def _check_finite(epoch: int, train_loss: float, val_loss: float, learning_rate: float) -> None:
    # A non-finite loss would otherwise end up in the history and break the JSON metrics.
    if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
        raise KubetrainError(
            f"training diverged at epoch {epoch} (train loss {train_loss}, "
            f"validation loss {val_loss}); lower --learning-rate "
            f"(now {learning_rate})"
        )


@dataclass
class _Progress:
    """What the epochs so far produced: checkpointed after each epoch, restored on resume."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # on the CPU
    #: Where a streamed epoch stopped mid-way: {"epoch", "batches", "loss_sum", "rows"}.
    position: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        """The last finished epoch (0 before the first)."""
        return int(self.history[-1]["epoch"]) if self.history else 0

    @property
    def epochs_without_gain(self) -> int:
        return self.epoch - self.best_epoch

    def record(self, row: dict[str, float], net: nn.Module) -> None:
        self.history.append(row)
        if row["val_loss"] < self.best_loss - MIN_GAIN:
            self.best_loss, self.best_epoch = row["val_loss"], int(row["epoch"])
            # a copy: the live weights keep training (on the CPU, .cpu() alone would alias)
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()
            }

    def best_row(self) -> dict[str, float]:
        return next((r for r in self.history if r["epoch"] == self.best_epoch), self.history[-1])


def _autocast(device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 on GPUs that have it (faster, no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def _fits_device(nbytes: int, device: torch.device) -> bool:
    """Whether arrays of ``nbytes`` may live on ``device`` (always on the CPU; on a GPU
    within `DEVICE_SHARE` of its free memory, leaving room for activations)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


def _held(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """``t`` in pinned memory when a GPU copies from it (the copies then overlap compute)."""
    return t.pin_memory() if pin and torch.cuda.is_available() else t


def _compile(model: nn.Module, setting: str, where: _Placement) -> nn.Module | None:
    """``torch.compile(model)`` when `TrainConfig.torch_compile` asks for it ('auto': on
    CUDA), else None. Compiling happens at the first step; `_Loop._step` falls back to the
    uncompiled model if it fails there."""
    if setting == "off" or (setting == "auto" and where.device.type != "cuda"):
        return None
    try:
        return torch.compile(model, backend=COMPILE_BACKEND)
    except Exception as exc:  # noqa: BLE001 - no compiler here: train uncompiled
        if where.rank == 0:
            progress.log("train", f"torch.compile unavailable, training uncompiled: {_brief(exc)}")
        return None


def _brief(exc: BaseException) -> str:
    """An exception as one short line (compiler errors span pages)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


@dataclass
class _Loop:
    """What one run trains with and mutates epoch by epoch, and the steps of an epoch."""

    net: nn.Module  # the network itself: checkpointed, evaluated, returned
    model: nn.Module  # what trains: `net`, or `net` inside DDP
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # the per-epoch permutations
    autocast: Callable[[], AbstractContextManager]
    where: _Placement
    seed: int
    l1: float
    objective: Objective
    batch_rows: int  # per step on this rank
    # X, y (None when streamed), X_val, y_val: on the device, or pinned host memory
    data: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]
    stream: Streamed | None = None  # the sharded training split, when it is streamed
    #: ``model`` compiled (`torch.compile`), or None: uncompiled, or compiling failed.
    compiled: nn.Module | None = None
    #: Images: (channels, height, width); None for tables.
    image_shape: tuple[int, int, int] | None = None
    conv: bool = False  # the network takes images (n, c, h, w)
    channels_last: bool = False
    policy: AugmentPolicy | None = None  # per-batch augmentation of a training image batch
    classes: int = 0
    #: the augmentation's draws on the device, and its few scalars on the host (`mix`)
    aug_gen: torch.Generator | None = None
    host_gen: torch.Generator | None = None
    #: uint8 pixels (`Stored`, or a streamed uint8 split): their float32 features, by
    #: stored value, on the device (`features`)
    lut: torch.Tensor | None = None

    @classmethod
    def start(
        cls,
        spec: ModelSpec,
        train: TrainConfig,
        hyper: HyperConfig,
        seed: int,
        epochs: int,
        where: _Placement,
        train_data: Split | Stored | Streamed,
        val_data: Split,
        objective: Objective,
        policy: AugmentPolicy | None = None,
    ) -> _Loop:
        net = build(spec)  # same seed, same initial weights on every rank
        if train.initial_weights:
            load_initial_weights(net, train.initial_weights)
        conv = spec.image_shape is not None and spec.arch not in ("mlp", "tabular")
        channels_last = conv and where.device.type == "cuda"
        net = net.to(where.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = make_optimizer(net, train, hyper)
        X_val, y_val = val_data
        stream = train_data if isinstance(train_data, Streamed) else None
        held = (train_data.X, train_data.y) if isinstance(train_data, Stored) else train_data
        # Whole splits live on the device when they fit (uint8 pixels as stored, a
        # quarter of the bytes): index batching, no host copies.
        arrays = [X_val, y_val] if stream else [*held, X_val, y_val]  # type: ignore[misc]
        resident = _fits_device(sum(a.nbytes for a in arrays), where.device)
        home = where.device if resident else torch.device("cpu")
        pin = not resident  # host memory the GPU copies from without blocking
        lut = None if isinstance(train_data, tuple) else train_data.lut

        def features(a: np.ndarray) -> torch.Tensor:
            stored = a.dtype == np.uint8 and lut is not None  # decoded batch by batch
            t = torch.as_tensor(a, dtype=None if stored else torch.float32, device=home)
            if conv:  # stored as the network takes it: batches come out laid out
                t = t.reshape(len(t), *spec.image_shape)  # type: ignore[misc]
                if channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
            return _held(t, pin)

        def labels(a: np.ndarray) -> torch.Tensor:
            return _held(torch.as_tensor(a, dtype=objective.label_dtype, device=home), pin)

        if stream is None:
            X, y = held  # type: ignore[misc]
            data = (features(X), labels(y), features(X_val), labels(y_val))
            rows = len(X)
        else:
            data, rows = (None, None, features(X_val), labels(y_val)), stream.rows
        batch_rows = min(effective_batch(hyper.batch_size, rows), rows)
        if where.ddp:  # the global batch stays batch_size: each rank takes its share of it
            batch_rows = max(1, batch_rows // where.world_size)
        model = distributed.wrap(net, where.device) if where.ddp else net
        image = spec.image_shape is not None and len(spec.image_shape) == 3
        return cls(
            net=net,
            model=model,
            opt=opt,
            sched=make_schedule(opt, train, epochs),
            gen=torch.Generator().manual_seed(seed),
            autocast=_autocast(where.device),
            where=where,
            seed=seed,
            l1=train.l1,
            objective=objective,
            batch_rows=batch_rows,
            data=data,
            stream=stream,
            compiled=_compile(model, train.torch_compile, where),
            image_shape=tuple(spec.image_shape) if image else None,  # type: ignore[arg-type]
            conv=conv,
            channels_last=channels_last,
            policy=policy if image else None,
            classes=spec.num_classes,
            aug_gen=torch.Generator(device=where.device) if policy and image else None,
            host_gen=torch.Generator() if policy and image else None,
            lut=None if lut is None else torch.as_tensor(lut, device=where.device),
        )

    def train_epoch(
        self,
        epoch: int,
        resume_at: dict[str, Any] | None = None,
        on_step: StepHook | None = None,
    ) -> float:
        """One pass over the training split; its mean loss over every row of every rank.

        The loss sum stays on the device: one host sync per epoch, not per step.
        """
        self._seed_augmentation(epoch)
        if self.stream is not None:
            return self._train_streamed(epoch, resume_at, on_step)
        X, y, _, _ = self.data
        w = self.where
        self.model.train()
        order = torch.randperm(len(X), generator=self.gen)
        if w.ddp:  # same permutation on every rank; each takes its slice (same batch count)
            order = distributed.shard_order(order, w.rank, w.world_size)
            torch.manual_seed(distributed.rank_seed(self.seed, epoch, w.rank))  # own dropout
        order = order.to(X.device)
        total = torch.zeros((), dtype=torch.float64, device=w.device)
        for i in range(0, len(order), self.batch_rows):
            idx = order[i : i + self.batch_rows]
            loss = self._step(self.features(X[idx]), self._to_device(y[idx]))
            total.add_(loss, alpha=len(idx))  # one kernel, no host sync
        self.sched.step()
        # all-reduced (identity on one process): every rank sees the same number
        total_sum, seen = distributed.all_reduce_sum([total.item(), len(order)])
        return total_sum / seen

    def _train_streamed(
        self,
        epoch: int,
        resume_at: dict[str, Any] | None,
        on_step: StepHook | None,
    ) -> float:
        """`train_epoch` over a sharded split: a fixed number of steps on every rank."""
        w, split = self.where, self.stream
        assert split is not None
        self.model.train()
        if w.ddp:
            torch.manual_seed(distributed.rank_seed(self.seed, epoch, w.rank))  # own dropout
        workers = stream_workers(w.device, len(split.manifest["shards"]))
        steps = stream.steps_per_epoch(
            split, self.batch_rows, self.seed, epoch, w.world_size, max(workers, 1)
        )
        done = int(resume_at["batches"]) if resume_at and resume_at["epoch"] == epoch else 0
        total = torch.tensor(
            resume_at["loss_sum"] if done else 0.0, dtype=torch.float64, device=w.device
        )
        seen = int(resume_at["rows"]) if done else 0
        batches = stream.loader(
            split,
            self.batch_rows,
            self.seed,
            epoch,
            w.rank,
            w.world_size,
            workers,
            pin_memory=w.device.type == "cuda",
        )
        for step, (xb, yb) in enumerate(batches):
            if step >= steps:
                break
            if step < done:  # trained before the interruption: the order is the same
                if self.policy is not None:  # and the augmentation draws the same, as then
                    self.training_batch(
                        self.features(xb), yb.to(w.device, self.objective.label_dtype)
                    )
                continue
            xb = self.features(xb)
            yb = yb.to(w.device, dtype=self.objective.label_dtype, non_blocking=True)
            loss = self._step(xb, yb)
            total.add_(loss, alpha=len(yb))
            seen += len(yb)
            if on_step:
                on_step(step + 1, total, seen)
        self.sched.step()
        total_sum, rows = distributed.all_reduce_sum([total.item(), seen])
        return total_sum / max(rows, 1)

    def _seed_augmentation(self, epoch: int) -> None:
        """Each epoch's augmentation draws from (seed, epoch, rank): the same after a resume,
        different on every rank."""
        if self.aug_gen is None or self.host_gen is None:
            return
        s = distributed.rank_seed(self.seed + 1, epoch, self.where.rank)
        self.aug_gen.manual_seed(s)
        self.host_gen.manual_seed(s)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.where.device, non_blocking=True)

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """A batch of rows on the device as float32 features: uint8 pixels cross as bytes
        and are decoded there, through the split's table."""
        X = self._to_device(X)
        if X.dtype != torch.uint8 or self.lut is None:
            return X
        return self.lut[X.long()]

    def training_batch(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network trains on for rows ``X`` (flat) and labels ``y``: images
        augmented (`policy`), mixed with soft targets when mixup/cutmix is on, and laid
        out for the network (`inputs`)."""
        if self.image_shape is None or self.policy is None:
            return self.inputs(X), y
        assert self.aug_gen is not None
        images = augment_batch(X.reshape(len(X), *self.image_shape), self.policy, self.aug_gen)
        if self.policy.mixes and not self.objective.regression:
            images, y = mix(images, y, self.classes, self.policy, self.aug_gen, self.host_gen)
        return self._layout(images), y

    def inputs(self, X: torch.Tensor) -> torch.Tensor:
        """Flat rows as the network takes them: conv nets get (n, c, h, w) images,
        channels_last on CUDA."""
        if self.image_shape is None or not self.conv:
            return X
        return self._layout(X.reshape(len(X), *self.image_shape))

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return images.reshape(len(images), -1)
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )

    def _step(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; its loss, detached, on the device."""
        X, y = self.training_batch(X, y)
        try:
            loss = self._backward(X, y)
        except Exception as exc:
            if self.compiled is None:
                raise
            self.compiled = None  # any compiler failure: go on uncompiled
            if self.where.rank == 0:
                progress.log("train", f"torch.compile failed, training uncompiled: {_brief(exc)}")
            loss = self._backward(X, y)  # a real error fails here too
        self.opt.step()
        return loss.detach()

    def _backward(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(X, y)
        loss.backward()
        return loss

    def _loss(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = self.compiled if self.compiled is not None else self.model
        with self.autocast():
            loss = self.objective.loss(model(X).float(), y)
        if self.l1 > 0:
            loss = loss + self.l1 * sum(p.abs().sum() for p in self.net.parameters() if p.ndim > 1)
        return loss

    def validate(self) -> dict[str, float]:
        """`Objective.score`'s metrics on the validation split, the same on every rank."""
        _, _, X, y = self.data
        w = self.where

        def prepare(xb: torch.Tensor) -> torch.Tensor:
            return self.inputs(self.features(xb))

        if w.ddp:
            return _evaluate_sharded(
                self.net, X, y, self.autocast, self.objective, w.rank, w.world_size, prepare
            )
        return _evaluate(self.model, X, y, self.autocast, self.objective, prepare)

    def state_dict(self, config: dict[str, Any], so_far: _Progress) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values only (`checkpoint.load`
        reads with weights_only=True)."""
        on_cuda = self.where.device.type == "cuda"
        return {
            "config": config,
            "epoch": so_far.epoch,
            "position": so_far.position,
            "history": so_far.history,
            "best": {
                "loss": so_far.best_loss,
                "epoch": so_far.best_epoch,
                "weights": so_far.best_weights,
            },
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": self.sched.state_dict(),
            "generator": self.gen.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.where.device) if on_cuda else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> _Progress:
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        self.gen.set_state(state["generator"].cpu())
        torch.set_rng_state(state["rng"].cpu())  # dropout masks continue as if never stopped
        if self.where.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.where.device)
        best = state["best"]
        return _Progress(
            history=list(state["history"]),
            best_loss=best["loss"],
            best_epoch=best["epoch"],
            best_weights=best["weights"],
            position=state.get("position"),
        )


def _resume(
    loop: _Loop, ckpt: Path | None, config: dict[str, Any], log_stage: str | None
) -> _Progress:
    """The progress of an interrupted run with the same `config`, restored into `loop`;
    a fresh start when there is none (other settings: another run, its checkpoint is
    overwritten)."""
    state, error = None, None
    if ckpt and loop.where.rank == 0:
        try:
            state = checkpoint.load(ckpt, map_location="cpu")
        except KubetrainError as exc:
            error = str(exc)
    if loop.where.ddp:  # rank 0 alone reads; every rank resumes from (or fails on) the same
        state, error = distributed.broadcast_object((state, error))
    if error:
        raise KubetrainError(error)
    if state is None or state.get("config") != config:
        return _Progress()
    so_far = loop.load_state_dict(state)
    if log_stage:
        where = (
            f"epoch {so_far.position['epoch']}, batch {so_far.position['batches']}"
            if so_far.position
            else f"epoch {so_far.epoch}"
        )
        progress.log(log_stage, f"resumed from checkpoint at {where}")
    return so_far


def _log_epoch(
    stage: str, row: dict[str, float], objective: Objective, epochs: int, eta: str
) -> None:
    score = "val_r2" if objective.regression else "val_acc"
    progress.log(
        stage,
        f"epoch {row['epoch']}/{epochs} | train_loss {row['train_loss']:.4f} | "
        f"val_loss {row['val_loss']:.4f} | {score} {row[objective.score_key]:.4f} | "
        f"{row['seconds']:.2f}s/epoch | ETA {eta}",
    )


def _hook_stops(hook: EpochHook | None, epoch: int, metrics: dict[str, float], ddp: bool) -> bool:
    stop = bool(hook and hook(epoch, metrics))
    # no rank may leave the loop alone: the others would hang in the next collective
    return distributed.any_rank(stop) if ddp else stop


def _result(
    loop: _Loop,
    spec: ModelSpec,
    so_far: _Progress,
    started: float,
    stopped_by_hook: bool,
    config: dict[str, Any],
) -> FitResult:
    """The best epoch's model (on the CPU, in eval mode) and its metrics."""
    if so_far.best_weights is not None:
        loop.net.load_state_dict(so_far.best_weights)
    loop.net.eval()
    best = so_far.best_row()
    metrics = {
        **{k: v for k, v in best.items() if k.startswith("val_")},
        "best_epoch": best["epoch"],
        "epochs_run": len(so_far.history),
        "seconds": round(time.perf_counter() - started, 3),
        "device": loop.where.device.type,
        # the global batch after scaling with the data (`effective_batch`)
        "batch_rows": loop.batch_rows * loop.where.world_size,
    }
    if loop.where.ddp:
        metrics["processes"] = loop.where.world_size
    return FitResult(
        model=loop.net.cpu(),
        spec=spec,
        history=so_far.history,
        best_epoch=best["epoch"],
        metrics=metrics,
        stopped_by_hook=stopped_by_hook,
        config=config,
    )


#: Validation rows scored per forward pass: the whole split at once held its hidden
#: activations too (1.5M rows x 128 units: 0.8 GiB a layer in the 10M-row bench).
EVAL_ROWS = 65_536


def _as_is(X: torch.Tensor) -> torch.Tensor:
    return X


@torch.no_grad()
def _sums(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    autocast,
    objective: Objective,
    prepare: Callable[[torch.Tensor], torch.Tensor] = _as_is,
) -> list[float]:
    """`Objective.sums` over ``X`` in `EVAL_ROWS` chunks; ``prepare`` moves and lays out
    a chunk for the network (`_Loop.inputs`)."""
    total: list[float] = []
    for start in range(0, len(y), EVAL_ROWS):
        xb = prepare(X[start : start + EVAL_ROWS])
        yb = y[start : start + EVAL_ROWS].to(xb.device, non_blocking=True)
        with autocast():
            out = model(xb).float()
        part = objective.sums(out, yb)
        total = [a + b for a, b in zip(total, part, strict=True)] if total else part
    return total


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    autocast,
    objective: Objective,
    prepare: Callable[[torch.Tensor], torch.Tensor] = _as_is,
) -> dict[str, float]:
    model.eval()
    return objective.score(_sums(model, X, y, autocast, objective, prepare), len(y))


@torch.no_grad()
def _evaluate_sharded(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    autocast,
    objective: Objective,
    rank: int,
    world_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = _as_is,
) -> dict[str, float]:
    """`_evaluate` over all ranks: each scores rows ``rank::world``, the sums are all-reduced."""
    model.eval()
    Xs, ys = X[rank::world_size], y[rank::world_size]
    sums_here = _sums(model, Xs, ys, autocast, objective, prepare)
    *sums, count = distributed.all_reduce_sum([*sums_here, len(ys)])
    return objective.score(sums, int(count))
