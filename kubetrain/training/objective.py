"""What a network is fitted to: classes, or a number.

Classification trains on cross-entropy and scores validation accuracy. A regression
trains on the squared (or Huber) error of the *standardized* target, so one learning
rate suits salaries and probabilities alike, while the network itself outputs the
target's own units (`kubetrain.training.models.Regressor` holds the training split's
mean and standard deviation): evaluation, ONNX and serving need no extra step. It
scores validation R^2, which is higher-is-better like accuracy, so early stopping,
tuning and the quality gate treat both tasks alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kubetrain.data.datasets import Schema


@dataclass(frozen=True)
class Objective:
    regression: bool = False
    #: The training target's standard deviation: errors are measured in units of it.
    scale: float = 1.0
    huber: bool = False

    @classmethod
    def of(cls, schema: Schema, regression_loss: str = "mse") -> Objective:
        if not schema.regression:
            return cls()
        scale = float(schema.extra.get("target", {}).get("std") or 1.0)
        return cls(True, scale, regression_loss == "huber")

    @property
    def score_key(self) -> str:
        """The history's and metrics' name of the validation score."""
        return "val_r2" if self.regression else "val_accuracy"

    @property
    def score_metric(self) -> str:
        """The score as a Katib metric name."""
        return "validation-r2" if self.regression else "validation-accuracy"

    @property
    def label_dtype(self) -> torch.dtype:
        return torch.float32 if self.regression else torch.int64

    def loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if not self.regression:
            return nn.functional.cross_entropy(out, y, reduction=reduction)
        err = (out - y) / self.scale
        if self.huber:
            return nn.functional.huber_loss(err, torch.zeros_like(err), reduction=reduction)
        return nn.functional.mse_loss(err, torch.zeros_like(err), reduction=reduction)

    def sums(self, out: torch.Tensor, y: torch.Tensor) -> list[float]:
        """What a score is made of, summed over rows so ranks and chunks add up:
        [loss, correct] for classes; [loss, squared error, sum y, sum y^2] for numbers."""
        loss = self.loss(out, y, reduction="sum").item()
        if not self.regression:
            return [loss, (out.argmax(1) == y).sum().item()]
        y64 = y.double()
        return [
            loss,
            ((out.double() - y64) ** 2).sum().item(),
            y64.sum().item(),
            (y64**2).sum().item(),
        ]

    def score(self, sums: list[float], rows: int) -> dict[str, float]:
        """Katib-named metrics from `sums` added over every chunk and rank: the loss and
        the score (`score_metric`), and a regression's RMSE."""
        if not self.regression:
            return {"validation-loss": sums[0] / rows, "validation-accuracy": sums[1] / rows}
        loss, sse, total, squares = sums
        sst = squares - total * total / rows
        return {
            "validation-loss": loss / rows,
            "validation-r2": r2(sse, sst),
            "validation-rmse": math.sqrt(sse / rows),
        }


def r2(sse: float, sst: float) -> float:
    """1 - SSE/SST; a constant target scores 1 when fitted exactly, else 0 (no spread to
    explain: the ratio is undefined)."""
    if sst <= 1e-12:
        return 1.0 if sse <= 1e-12 else 0.0
    return 1.0 - sse / sst
