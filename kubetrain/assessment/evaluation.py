"""Evaluate: held-out test metrics, the curves the Kubeflow UI draws, and the quality gate."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm
from torch import nn

from kubetrain.core import progress
from kubetrain.core.errors import require
from kubetrain.data import batches
from kubetrain.data.batches import Batches
from kubetrain.training import challenger
from kubetrain.training.models import load_model, predict_proba
from kubetrain.training.objective import r2

ROC_POINTS = 200  # the KFP UI and JSON artifacts stay small
#: Bytes per class score the metrics take at their peak: scikit-learn sorts float64
#: copies of every score for the ROC curves (55 measured on 3M rows x 3 classes).
METRIC_BYTES_PER_SCORE = 64


def _thin(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> dict[str, list[float]]:
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
    # sklearn's first threshold is +inf (nothing predicted positive): not valid JSON
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return {
        "fpr": fpr[keep].tolist(),
        "tpr": tpr[keep].tolist(),
        "thresholds": np.clip(thr[keep], 0.0, 1.0).tolist(),
    }


def roc_curves(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict[str, dict]:
    """Per-class one-vs-rest curves plus the micro average (what KFP's single ROC shows)."""
    onehot = np.eye(len(class_names), dtype=bool)[y]  # bool: 1/8 of the memory of float64
    curves: dict[str, dict] = {}
    for k, name in enumerate(class_names):
        if 0 < onehot[:, k].sum() < len(y):
            fpr, tpr, thr = skm.roc_curve(onehot[:, k], proba[:, k])
            curves[name] = _thin(fpr, tpr, thr) | {"auc": float(skm.auc(fpr, tpr))}
    fpr, tpr, thr = skm.roc_curve(onehot.ravel(), proba.ravel())
    curves["micro"] = _thin(fpr, tpr, thr) | {"auc": float(skm.auc(fpr, tpr))}
    return curves


def _macro_auc(y: np.ndarray, proba: np.ndarray, present: np.ndarray) -> float | None:
    """One-vs-rest ROC-AUC averaged over the classes present (scikit-learn's macro "ovr"
    when all are); the binary AUC for two classes; None with a single class."""
    if len(present) < 2:
        return None
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    return float(np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in present]))


def compute_metrics(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    require(len(y) > 0, "the test split is empty; lower --test-fraction only if data allow")
    labels = list(range(len(class_names)))
    pred = proba.argmax(1)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    # macro averages over the classes the test split has: a class clean dropped as too
    # rare to split has no test rows, and would count as a zero in every average
    present = np.unique(y)
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision_macro": float(np.mean(p[present])),
        "recall_macro": float(np.mean(r[present])),
        "macro_f1": float(np.mean(f[present])),
        "roc_auc": _macro_auc(y, proba, present),
        "log_loss": float(skm.log_loss(y, np.clip(proba, 1e-7, 1), labels=labels)),
        "per_class": [
            {
                "class": n,
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, n in enumerate(class_names)
        ],
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "class_names": list(class_names),
        "roc": roc_curves(y, proba, class_names),
        "test_rows": int(len(y)),
    }


#: Test metrics of the challenger shown beside the network's (and kept in its JSON).
CHALLENGER_METRICS = (
    "accuracy",
    "macro_f1",
    "precision_macro",
    "recall_macro",
    "roc_auc",
    "log_loss",
)
REGRESSION_METRICS = ("r2", "rmse", "mae")
#: Points of the predicted-vs-actual and residual plots (an even sample of the rows).
PLOT_POINTS = 2000


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """RMSE, MAE and R^2 of ``pred`` against ``y``, plus an even sample of the pairs for
    the predicted-vs-actual and residual plots."""
    require(len(y) > 0, "the test split is empty; lower --test-fraction only if data allow")
    y64, p64 = np.asarray(y, np.float64), np.asarray(pred, np.float64).reshape(-1)
    err = p64 - y64
    sse = float((err**2).sum())
    keep = np.unique(np.linspace(0, len(y64) - 1, min(len(y64), PLOT_POINTS)).round().astype(int))
    return {
        "task": "regression",
        "r2": r2(sse, float(((y64 - y64.mean()) ** 2).sum())),
        "rmse": float(np.sqrt(sse / len(y64))),
        "mae": float(np.abs(err).mean()),
        "target_mean": float(y64.mean()),
        "target_std": float(y64.std()),
        "points": {"actual": y64[keep].tolist(), "predicted": p64[keep].tolist()},
        "test_rows": int(len(y64)),
    }


def task_metrics(y: np.ndarray, scores: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """`compute_metrics` for classes, `regression_metrics` for numbers (no class names)."""
    if not class_names:
        return regression_metrics(y, scores)
    return compute_metrics(y, scores, class_names)


def gate(
    metrics: dict[str, Any],
    min_accuracy: float,
    max_gap_to_baseline: float = -1.0,
    min_r2: float = 0.5,
) -> tuple[bool, str]:
    """Pass when the test accuracy reaches ``min_accuracy`` (a regression's R^2
    ``min_r2``) and, with ``max_gap_to_baseline`` >= 0, the challenger beats the network
    by no more than that. One line says why; a failure names only the checks that failed."""
    name, setting, floor = (
        ("R^2", "min_r2", min_r2) if "r2" in metrics else ("accuracy", "min_accuracy", min_accuracy)
    )
    value = metrics["r2" if "r2" in metrics else "accuracy"]
    accurate = value >= floor
    checks = [(accurate, f"test {name} {value:.4f} {'>=' if accurate else '<'} {setting} {floor}")]
    if max_gap_to_baseline >= 0:
        checks.append(gap_check(metrics.get("gap_to_challenger"), max_gap_to_baseline))
    ok = all(passed for passed, _ in checks)
    shown = [text for passed, text in checks if ok or not passed]
    return ok, f"quality gate {'passed' if ok else 'failed'}: {'; '.join(shown)}"


def gap_check(gap: float | None, max_gap: float) -> tuple[bool, str]:
    """``(passed, why)`` of the challenger check; without a challenger there is nothing to
    compare (images, challenger=false), which the reason says instead of failing."""
    if gap is None:
        return True, "no gradient-boosting challenger to compare (max_gap_to_baseline unused)"
    close = gap <= max_gap
    if gap <= 0:
        return True, f"the network matches or beats gradient boosting (gap {gap:+.3f})"
    return close, (
        f"gradient boosting beats the network by {gap:.3f} "
        f"{'<=' if close else '>'} max_gap_to_baseline {max_gap}"
    )


#: Features (float32 rows) -> class probabilities (float32, rows x classes).
Scorer = Callable[[np.ndarray], np.ndarray]


def score_split(
    split: Batches, scorers: Sequence[Scorer], num_classes: int, stage: str = "evaluate"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(y, [class probabilities float32 per scorer])`` of every row of ``split``,
    in one pass batch by batch: memory is one batch of features plus rows x classes of
    scores per scorer (the metrics and curves need every score). A regression's ``y`` is
    float32 and its scores one column of predicted values (``num_classes`` 1)."""
    regression = split.schema is not None and split.schema.regression
    y = np.empty(split.rows, np.float32 if regression else np.int64)
    probas = [np.empty((split.rows, num_classes), np.float32) for _ in scorers]
    at = 0
    for X, yb in batches.logged(split, stage, "predicted"):
        n = len(yb)
        require(
            at + n <= split.rows,
            f"the test split holds more than the {split.rows} rows its manifest lists; "
            "re-run the clean stage",
        )
        if n:
            for proba, score in zip(probas, scorers, strict=True):
                proba[at : at + n] = score(X)
            y[at : at + n] = yb
            at += n
    return y[:at], [proba[:at] for proba in probas]


def predict_split(
    model: nn.Module, split: Batches, num_classes: int, stage: str = "evaluate"
) -> tuple[np.ndarray, np.ndarray]:
    """``(y, class probabilities float32)`` of the network on every row of ``split``."""
    y, (proba,) = score_split(split, [network_scorer(model)], num_classes, stage)
    return y, proba


def network_scorer(model: nn.Module) -> Scorer:
    return lambda X: predict_proba(model, X).numpy()


def held_bytes(split: Batches, num_classes: int, scorers: int = 1) -> int:
    """What evaluating ``split`` in memory holds at its peak: the split, its labels, every
    scorer's scores and the metrics' copies of one scorer's (`METRIC_BYTES_PER_SCORE`)."""
    scores = num_classes * (METRIC_BYTES_PER_SCORE + 4 * (scorers - 1))
    return split.nbytes + split.rows * (8 + scores)


def challenger_metrics(
    y: np.ndarray, proba: np.ndarray, class_names: list[str], saved: dict[str, Any]
) -> dict[str, Any]:
    """The challenger's test metrics (`CHALLENGER_METRICS`) and what the train stage
    recorded about it (validation accuracy, iterations, rows, sample)."""
    full = task_metrics(y, proba, class_names)
    keys = CHALLENGER_METRICS if class_names else REGRESSION_METRICS
    return {k: full[k] for k in keys} | {
        k.removeprefix("challenger_"): v for k, v in saved.items() if k.startswith("challenger_")
    }


def comparison_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Network vs gradient boosting, one row per test metric (the report's table)."""
    rival = result["challenger"]
    keys = REGRESSION_METRICS if result.get("task") == "regression" else CHALLENGER_METRICS
    return [
        {
            "metric": k,
            "network": result[k],
            "gradient boosting": rival[k],
            "challenger - network": rival[k] - result[k],
        }
        for k in keys
    ]


def evaluate(
    model_path: str,
    test_path: str,
    min_accuracy: float,
    budget: int | None = None,
    max_gap_to_baseline: float = -1.0,
    min_r2: float = 0.5,
) -> dict[str, Any]:
    """The evaluate stage: metrics on the test split plus the gate decision.

    The split is predicted in memory when it fits the memory budget, else batch by
    batch from its shards; the metrics are the same either way (`score_split`). A
    gradient-boosting challenger saved in the bundle is scored in the same pass and
    reported beside the network (``challenger``, ``gap_to_challenger``)."""
    started = time.perf_counter()
    model, spec, info = load_model(model_path)
    rival = challenger.load(model_path)
    scorers = [network_scorer(model)]
    if rival is not None and spec.task == "regression":
        scorers.append(lambda X: challenger.predict(rival["model"], X)[:, None])
    elif rival is not None:
        scorers.append(lambda X: challenger.predict_proba(rival["model"], X, spec.num_classes))
    split = batches.open_split(
        test_path, lambda s: held_bytes(s, spec.num_classes, len(scorers)), budget
    )
    require(
        split.features == spec.num_features,
        f"test split has {split.features} features but the model expects "
        f"{spec.num_features}; evaluate with the test split from the same clean run",
    )
    if split.streamed:
        progress.log(
            "evaluate", f"streaming: the test split ({split.rows:,} rows) is over the memory budget"
        )
    y, (proba, *rival_proba) = score_split(split, scorers, spec.num_classes)
    assert split.schema is not None
    class_names = split.schema.class_names
    del split  # a split held in memory is freed before the metrics copy the scores
    result = task_metrics(y, proba, class_names)
    if rival is not None:
        score = "r2" if spec.task == "regression" else "accuracy"
        result["challenger"] = challenger_metrics(y, rival_proba[0], class_names, rival)
        result["gap_to_challenger"] = result["challenger"][score] - result[score]
    passed, reason = gate(result, min_accuracy, max_gap_to_baseline, min_r2)
    result.update(
        stage="evaluate",
        gate="pass" if passed else "fail",
        gate_reason=reason,
        min_accuracy=min_accuracy,
        min_r2=min_r2,
        max_gap_to_baseline=max_gap_to_baseline,
        seconds=round(time.perf_counter() - started, 3),
    )
    return result
