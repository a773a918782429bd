"""Knowledge distillation: a smaller student network fitted to the trained model.

The compress stage's pruning and quantization keep the teacher's architecture;
distillation changes it. A narrower network (`student_spec`: an MLP a quarter of the
teacher's width for tables, `StudentCNN` for images) is trained on the teacher's
*softened* outputs (Hinton et al. 2015): with temperature ``T`` the loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
        + (1 - alpha) * cross_entropy(student, label)

so the student learns how the teacher ranks the wrong classes too, not only the right
one; ``T^2`` keeps the soft term's gradients at the hard term's scale. A regression's
student fits the teacher's predictions (mean squared error in units of the target's
standard deviation). The student then competes as one more compression candidate,
judged on the test split like the others.

Bounded so it stays a small part of the stage: at most `MAX_ROWS` training rows (and
`MAX_BYTES` of features), drawn class-stratified in one pass over the split's shards
(`kubetrain.data.batches.stratified_sample`, so a split bigger than memory streams),
and ``epochs`` epochs with the best validation epoch kept.

It trains with the training stage's own loop (`kubetrain.training.loop.training_loop`:
optimizer, schedule, batching, device placement), with one change: the labels the loop
sees are row indices, and the loss (`DistillLoss`) looks up the teacher's outputs and the
true label of each row. Validation, scored by the same loop, uses the true labels.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.core import progress
from kubetrain.data import batches
from kubetrain.data.datasets import Schema
from kubetrain.training.batch_augment import POLICY_KEY
from kubetrain.training.loop import training_loop
from kubetrain.training.models import ModelSpec
from kubetrain.training.objective import Objective

#: Training rows the student sees at most (drawn class-stratified from the split).
MAX_ROWS = 50_000
#: ... and at most this many bytes of float32 features (32x32 RGB images: ~21,800 rows).
MAX_BYTES = 256 * 2**20
#: Validation rows scored per epoch at most.
MAX_VAL_ROWS = 10_000
#: Weight of the soft (teacher) term against the hard-label cross-entropy.
ALPHA = 0.7
#: Student learning rate: AdamW with the cosine schedule, as the train stage uses.
#: Measured on digits (CNN teacher 0.964, student 8/16 channels, 30 epochs): 3e-3 0.938,
#: 1e-2 0.973 test accuracy.
LEARNING_RATE = 1e-2
#: A student still at chance after its first epoch (its outputs collapsed to a constant:
#: a 32x32x3 ResNet-8 teacher's logits reach +-76, and at 1e-2 seed 42's first steps
#: killed the head, validation accuracy 0.10 for 10 epochs) starts again at this share
#: of the rate, at most `RESTARTS` times (there: 0.39 after 10 epochs, the restart included).
RESTART_FACTOR = 1 / 3
RESTARTS = 2
#: Rows an epoch has at least: a smaller split is repeated, so that a few epochs are
#: enough steps (digits' 1,347 rows are 21 steps of 64 rows).
MIN_EPOCH_ROWS = 4096
#: Rows per step.
BATCH_SIZE = 64
#: torch threads while the student trains on the CPU (`distill`) on rows of at most
#: `SMALL_ROW` values (32x32 RGB: 3,072).
CPU_THREADS = 1
SMALL_ROW = 4096

__all__ = ["DistillLoss", "Distilled", "distill", "read_rows", "student_spec", "teacher_outputs"]


def student_spec(teacher: ModelSpec) -> ModelSpec:
    """The student for ``teacher``: the small CNN of `StudentCNN` for images, else an MLP a
    quarter of the teacher's width (at least 16 units), without dropout (the teacher's
    soft targets already regularize it)."""
    conv = teacher.image_shape is not None and teacher.arch not in ("mlp", "tabular")
    return ModelSpec(
        arch="student-cnn" if conv else "mlp",
        num_features=teacher.num_features,
        num_classes=teacher.num_classes,
        width=max(16, teacher.width // 4),
        dropout=0.0,
        image_shape=list(teacher.image_shape) if teacher.image_shape else None,
        class_names=list(teacher.class_names),
        task=teacher.task,
        target=dict(teacher.target),
    )


def read_rows(
    path: str | os.PathLike, seed: int, max_rows: int = MAX_ROWS, max_bytes: int = MAX_BYTES
) -> tuple[np.ndarray, np.ndarray, Schema]:
    """At most ``max_rows`` rows (and ``max_bytes`` of features) of the split at ``path``:
    all of it when it is that small, else a class-stratified sample drawn in one streamed
    pass; with the split's schema."""

    def cap_of(split: batches.Batches) -> int:
        return max(1, min(max_rows, max_bytes // max(1, split.features * 4)))

    def held(split: batches.Batches) -> int:
        # Loaded whole only when every row is wanted: a 6.4M-row split that is sampled
        # was read into memory first (1.9 GiB compress peak at 10M rows, bench-scale).
        return split.nbytes if split.rows <= cap_of(split) else sys.maxsize

    split = batches.open_split(path, held)
    cap = cap_of(split)
    if split.rows <= cap and split.arrays is not None:
        X, y = split.arrays
    else:
        X, y = batches.stratified_sample(split, cap, seed, stage="compress")
    assert split.schema is not None
    return np.asarray(X, np.float32), np.asarray(y), split.schema


@torch.no_grad()
def teacher_outputs(model: nn.Module, X: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """The teacher's raw outputs (class logits, or a regression's values as one column)."""
    model.eval()
    parts = [model(torch.as_tensor(X[i : i + chunk])).float() for i in range(0, len(X), chunk)]
    out = torch.cat(parts) if parts else torch.empty(0)
    return out[:, None] if out.ndim == 1 else out


@dataclass(frozen=True, eq=False)
class DistillLoss(Objective):
    """The loop's objective with the distillation loss for training batches, whose labels
    are row indices into ``teacher`` / ``labels``; `sums` (validation) stays the plain
    objective's, on true labels."""

    teacher: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    labels: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    temperature: float = 4.0
    alpha: float = ALPHA

    def loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        idx = y.long()
        soft = self.teacher[idx]
        if self.regression:
            err = (out.reshape(-1) - soft[:, 0]) / self.scale
            return nn.functional.mse_loss(err, torch.zeros_like(err), reduction=reduction)
        t = self.temperature
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(out / t, dim=1),
            nn.functional.log_softmax(soft / t, dim=1),
            reduction="none",
            log_target=True,
        ).sum(dim=1)
        hard = nn.functional.cross_entropy(out, self.labels[idx], reduction="none")
        per_row = self.alpha * t * t * kl + (1 - self.alpha) * hard
        return per_row.mean() if reduction == "mean" else per_row.sum()

    def sums(self, out: torch.Tensor, y: torch.Tensor) -> list[float]:
        return Objective(self.regression, self.scale, self.huber).sums(out, y)


@dataclass
class Distilled:
    """The trained student and how it was made (for the compression record)."""

    model: nn.Module
    spec: ModelSpec
    rows: int
    epochs: int
    best_epoch: int
    validation: dict[str, float]
    seconds: float


def distill(
    teacher: nn.Module,
    spec: ModelSpec,
    train: tuple[np.ndarray, np.ndarray, Schema],
    validation: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    temperature: float,
    seed: int,
) -> Distilled:
    """Train `student_spec(spec)` on ``train``'s rows against ``teacher``'s outputs for
    ``epochs`` epochs; returns the epoch with the best validation score (accuracy, or
    R^2), ties to the lower validation loss, on the CPU in eval mode.

    Rows of up to `SMALL_ROW` values train with one torch thread (`CPU_THREADS`),
    restored afterwards: their batches are too small to split across threads, and when
    the cores are busy the threads wait on each other. Measured on digits, 2 epochs, a
    shared 2-core machine under load: 0.6 s with one thread, 5.4-15 s with two. Bigger
    images keep every thread: an epoch of 400 rows at 224x224x3 took 23 s with one
    and 15 s with two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS if train[0].shape[1] <= SMALL_ROW else previous)
    rate = LEARNING_RATE
    try:
        soft = teacher_outputs(teacher, train[0])  # once: every restart learns the same
        for restart in range(RESTARTS + 1):
            last = restart == RESTARTS
            out = _distill(soft, spec, train, validation, epochs, temperature, seed, rate, last)
            if out is not None:
                return out
            rate *= RESTART_FACTOR
            progress.log(
                "compress",
                f"the student is at chance after its first epoch; distilling again at "
                f"learning rate {rate:.2g}",
            )
        raise AssertionError("the last try always returns")  # pragma: no cover
    finally:
        torch.set_num_threads(previous)


def _distill(
    soft: torch.Tensor,
    spec: ModelSpec,
    train: tuple[np.ndarray, np.ndarray, Schema],
    validation: tuple[np.ndarray, np.ndarray],
    epochs: int,
    temperature: float,
    seed: int,
    learning_rate: float,
    last_try: bool = False,
) -> Distilled | None:
    """The student distilled from the teacher's outputs ``soft`` (`teacher_outputs`), or
    None when it is still at chance after its first epoch (see `RESTART_FACTOR`) and
    this is not the ``last_try``."""
    started = time.perf_counter()
    X, y, schema = train
    student = student_spec(spec)
    rows = np.tile(np.arange(len(X)), epoch_repeats(X))  # labels: row indices
    # no per-batch augmentation: the teacher's outputs are for the rows as they are
    extra = {k: v for k, v in schema.extra.items() if k != POLICY_KEY}
    plain = dataclasses.replace(schema, extra=extra)
    loop = training_loop(
        student,
        TrainConfig(torch_compile="off"),
        HyperConfig(
            learning_rate=learning_rate,
            width=student.width,
            dropout=0.0,
            batch_size=BATCH_SIZE,
            weight_decay=1e-4,
        ),
        seed,
        (X[rows], rows.astype(np.float32 if schema.regression else np.int64)),
        validation,
        plain,
        epochs,
    )
    device = loop.where.device
    base = loop.objective
    loop.objective = DistillLoss(
        base.regression,
        base.scale,
        base.huber,
        teacher=soft.to(device),
        labels=torch.as_tensor(np.asarray(y if not schema.regression else [], np.int64)).to(device),
        temperature=float(temperature),
    )
    best: tuple[tuple[float, float], int, dict, dict[str, float]] | None = None
    for epoch in range(1, epochs + 1):
        loss = loop.train_epoch(epoch)
        metrics = loop.validate()
        if epoch == 1 and not last_try and _at_chance(metrics, base, validation[1]):
            return None
        key = (metrics[base.score_metric], -metrics["validation-loss"])
        if best is None or key > best[0]:
            best = (key, epoch, copy.deepcopy(loop.net.state_dict()), metrics)
        progress.log(
            "compress",
            f"distill epoch {epoch}/{epochs}: loss {loss:.4f}, "
            f"{base.score_metric} {metrics[base.score_metric]:.4f}",
        )
    assert best is not None  # epochs >= 1
    net = loop.net
    net.load_state_dict(best[2])
    net = net.to("cpu").eval()
    return Distilled(net, student, len(X), epochs, best[1], best[3], time.perf_counter() - started)


def epoch_repeats(X: np.ndarray) -> int:
    """How many times an epoch repeats the student's rows: up to `MIN_EPOCH_ROWS` rows,
    within `MAX_BYTES` of copies. Rows alone made 224x224 images 4,096 copied rows (2.4
    GiB; 3.7 GiB peak) and 147 s an epoch on one CPU thread, for any split size."""
    return max(1, min(-(-MIN_EPOCH_ROWS // max(1, len(X))), MAX_BYTES // max(1, X.nbytes)))


def _at_chance(metrics: dict[str, float], objective: Objective, y: np.ndarray) -> bool:
    """Whether the student scores no better than a constant: the majority class's share
    of the validation rows (a classifier), or R^2 <= 0 (a regression)."""
    score = metrics[objective.score_metric]
    if objective.regression:
        return score <= 0.0
    shares = np.bincount(np.asarray(y, np.int64)) / max(1, len(y))
    return score <= float(shares.max()) + 1e-9
