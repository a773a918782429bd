"""Champion/challenger: deploy a new model only if it beats the one being served.

Why a pure function apart from the deploy code: the decision is the one thing a team
argues about ("why was my model not deployed?"), so it takes plain numbers, returns
its reason in one line, and is tested without a cluster. Both models are scored on
the same held-out rows (the new run's test split, raw, each through its own bundle's
preprocessor: `kubetrain.serving.heldout`), on the objective metric of the task: test
accuracy for classes, R^2 for a regression (the metrics the quality gate uses).

The challenger must beat the champion by more than ``margin`` (default 0: strictly
better): a tie keeps the model that is serving, so an equal retrain never churns
revisions. No champion (first deploy) or a champion that cannot score the rows (its
schema refuses them: the data changed under it) deploys the challenger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kubetrain.core.errors import require

#: The objective metric of each task; both are "higher is better".
OBJECTIVES = {"classification": "accuracy", "regression": "r2"}


@dataclass(frozen=True)
class Decision:
    """Whether to deploy the challenger, on what numbers, and why (one line)."""

    deploy: bool
    metric: str
    challenger: float
    champion: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def objective_for(task: str) -> str:
    require(task in OBJECTIVES, f"task {task!r} has no objective; use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[task]


def objective_value(metric: str, truth: Sequence[Any], predicted: Sequence[Any]) -> float:
    """``metric`` of ``predicted`` against ``truth``: accuracy of class names, or R^2 of
    numbers (1 - residual / total sum of squares; 0 for a constant truth)."""
    require(len(truth) == len(predicted) > 0, "champion/challenger needs the same rows, > 0")
    if metric == "accuracy":
        return float(np.mean([str(a) == str(b) for a, b in zip(truth, predicted, strict=True)]))
    require(metric == "r2", f"objective metric {metric!r} is not one of accuracy, r2")
    y = np.asarray(truth, np.float64)
    residual = float(np.sum((y - np.asarray(predicted, np.float64)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - residual / total if total > 0 else 0.0


def decide(
    metric: str,
    challenger: float,
    champion: float | None,
    margin: float = 0.0,
    champion_error: str = "",
) -> Decision:
    """Deploy the challenger when there is no champion, the champion could not score the
    rows (``champion_error``), or the challenger's ``metric`` exceeds the champion's by
    more than ``margin``; else keep the champion."""
    require(margin >= 0, f"margin {margin} must be >= 0")
    if champion_error:
        return Decision(
            True, metric, challenger, None, f"the served model cannot score the test rows "
            f"({champion_error}); deploying the new model"
        )  # fmt: skip
    if champion is None:
        return Decision(True, metric, challenger, None, "no model is served yet; deploying")
    shown = f"{metric} {challenger:.4f} (new) against {champion:.4f} (served)"
    if challenger > champion + margin:
        return Decision(True, metric, challenger, champion, f"the new model wins: {shown}")
    needed = f" by more than {margin:g}" if margin else ""
    return Decision(
        False,
        metric,
        challenger,
        champion,
        f"the served model stays: {shown}; the new one must beat it{needed}",
    )
