"""A gradient-boosting challenger trained beside the network, on the same splits.

On tables, gradient-boosted trees are the bar a network has to clear: if they
beat it, the user should know before shipping the network. The train stage
fits one on the training split it trained the network on, early-stopped on the
same validation split, and saves it inside the model bundle
(`FILENAME`); the evaluate stage scores both on the test split and reports
them side by side (and may gate on the gap: ``max_gap_to_baseline``).

Why scikit-learn's `HistGradientBoostingClassifier` (and not LightGBM or
XGBoost): it is maintained, it ships with scikit-learn (already a dependency;
no new wheel in the images), it handles missing values natively, and it
early-stops on a given validation set (``X_val``/``y_val``, scikit-learn >= 1.7)
as LightGBM would; its histogram-based boosting is modelled on LightGBM's.
LightGBM is not installed.

Bounded like the stages around it: a training split over the memory budget is
fitted on a deterministic stratified sample (`kubetrain.data.batches.stratified_sample`),
and the boosting stops adding iterations when the next ones would run past
`TIME_LIMIT_S`. Images are skipped: trees on raw pixels are no fair bar for a CNN.

The model is stored with joblib (a pickle): load it only from a bundle this
pipeline wrote; `load` checks the bundle's ``sha256.json`` first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import verify_checksums, write_checksums
from kubetrain.core.memory import fits, memory_budget
from kubetrain.data import batches
from kubetrain.data.batches import Batches
from kubetrain.data.datasets import Schema, load_split
from kubetrain.training.objective import r2

#: The file inside the model bundle (next to weights.pt and spec.json).
FILENAME = "challenger.joblib"
#: Most boosting iterations; early stopping on the validation split usually ends sooner.
MAX_ITER = 300
LEARNING_RATE = 0.1
#: Early stopping: iterations without a better validation log-loss (scikit-learn's default).
PATIENCE = 10
#: Iterations between two looks at the clock.
ROUND_ITERATIONS = 10
#: Wall-clock limit of the fit: a challenger is a yardstick and must not double the stage.
TIME_LIMIT_S = 120.0
#: Most training rows the challenger fits on (a stratified sample beyond).
MAX_ROWS = 200_000
#: Bytes the fit holds per feature value: our float32 copy, scikit-learn's float64
#: copy and its uint8 bins (estimated from the arrays HGB allocates, not measured).
BYTES_PER_VALUE = 13
#: And per row and class: gradients, hessians (float32) and raw predictions (float64).
BYTES_PER_ROW_CLASS = 24
#: Share of the memory budget a sample of an over-budget training split may take.
SAMPLE_SHARE = 0.5
#: Rows scored per `predict_proba` call: scikit-learn copies them as float64.
PREDICT_ROWS = 65_536
#: Below this many rows the booster runs on one thread: on small tables OpenMP's
#: synchronisation costs more than it saves (breast_cancer on a shared 2-core machine:
#: 0.07s per iteration on 2 threads, 0.004s on one).
SERIAL_ROWS = 20_000


def threads(rows: int) -> Any:
    """A context that runs scikit-learn's OpenMP code serially for small inputs."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1 if rows < SERIAL_ROWS else None, user_api="openmp")


@dataclass(frozen=True)
class Challenger:
    """A fitted challenger (``model``) or why there is none, and the train stage metadata."""

    model: Any = None  # HistGradientBoostingClassifier; None when skipped
    meta: dict[str, Any] = field(default_factory=dict)


def skipped(reason: str) -> Challenger:
    progress.log("train", f"challenger skipped: {reason}")
    return Challenger(None, {"challenger_note": f"skipped: {reason}"})


def held_bytes(split: Batches) -> int:
    """What fitting ``split`` whole holds at its peak (`BYTES_PER_VALUE`, `BYTES_PER_ROW_CLASS`)."""
    classes = len(split.class_counts)
    return split.rows * (split.features * BYTES_PER_VALUE + classes * BYTES_PER_ROW_CLASS + 8)


def training_rows(
    split: Batches, seed: int, budget: int | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(X, y, sampled)``: the whole split when it has at most `MAX_ROWS` rows and its
    fit fits the memory budget, else a stratified sample of at most that many rows
    (deterministic for a seed). Boosting's accuracy saturates long before millions of
    rows, and a yardstick must not cost more than the network it measures."""
    per_row = max(1, held_bytes(split) // max(1, split.rows))
    affordable = int((memory_budget() if budget is None else budget) * SAMPLE_SHARE) // per_row
    if split.rows <= MAX_ROWS and fits(held_bytes(split), budget):
        if split.arrays is not None:
            return *split.arrays, False
        X, y, _ = load_split(split.uri)  # streamed for the network, yet small enough here
        return X, y, False
    rows = max(1, min(MAX_ROWS, affordable))
    X, y = batches.stratified_sample(split, rows, seed, stage="train")
    progress.log(
        "train",
        f"challenger: fitting on a stratified sample of {len(y):,} of the training split's "
        f"{split.rows:,} rows (at most {MAX_ROWS:,}, within the memory budget; seed {seed})",
    )
    return X, y, True


def _booster(seed: int, max_iter: int, regression: bool = False) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    kind = HistGradientBoostingRegressor if regression else HistGradientBoostingClassifier
    return kind(
        learning_rate=LEARNING_RATE,
        max_iter=max_iter,
        early_stopping=True,
        scoring="loss",
        n_iter_no_change=PATIENCE,
        warm_start=True,  # grown in rounds of `ROUND_ITERATIONS` (`boost`)
        random_state=seed,
    )


def boost(
    X: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    seed: int,
    time_limit_s: float = TIME_LIMIT_S,
    regression: bool = False,
) -> Any:
    """Fit gradient-boosted trees on ``(X, y)``, early-stopped on ``val`` and time-bound.

    Warm-started in rounds of `ROUND_ITERATIONS`: after each round the clock is
    read, so the fit ends at most one round past ``time_limit_s`` (an estimate
    from the first round alone overshot by 3x on a busy machine). Warm starting
    keeps the early-stopping state: the trees are the ones one fit of that
    length would grow.
    """
    Xv, yv = val
    # a classifier knows only the classes it trained on
    known = np.ones(len(yv), bool) if regression else np.isin(yv, np.unique(y))
    kw = {"X_val": Xv[known], "y_val": yv[known]}
    started = time.perf_counter()
    model = _booster(seed, 0, regression)
    target = 0
    with threads(len(y)):
        while target < MAX_ITER:
            target = min(MAX_ITER, target + ROUND_ITERATIONS)
            model.set_params(max_iter=target)
            model.fit(X, y, **kw)
            spent = time.perf_counter() - started
            if model.n_iter_ < target:  # early stopping ended it
                break
            if spent >= time_limit_s:
                progress.log(
                    "train",
                    f"challenger: stopped at {model.n_iter_} iterations by the time limit "
                    f"({spent:.0f}s of {time_limit_s:.0f}s)",
                )
                break
            if target % (5 * ROUND_ITERATIONS) == 0:
                progress.log("train", f"challenger: {model.n_iter_} iterations in {spent:.1f}s")
    return model


def accuracy(model: Any, X: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    return float((predict_proba(model, X, num_classes).argmax(1) == y).mean()) if len(y) else 0.0


def r2_score(model: Any, X: np.ndarray, y: np.ndarray) -> float:
    return r2(float(((predict(model, X) - y) ** 2).sum()), float(((y - y.mean()) ** 2).sum()))


def predict(model: Any, X: np.ndarray) -> np.ndarray:
    """A regressor's predictions (float32) in chunks of `PREDICT_ROWS`."""
    out = np.zeros(len(X), np.float32)
    with threads(len(X)):
        for i in range(0, len(X), PREDICT_ROWS):
            out[i : i + PREDICT_ROWS] = model.predict(X[i : i + PREDICT_ROWS])
    return out


def predict_proba(model: Any, X: np.ndarray, num_classes: int) -> np.ndarray:
    """Class probabilities (float32, rows x ``num_classes``) in chunks of `PREDICT_ROWS`;
    a class the booster never saw in training gets probability 0."""
    out = np.zeros((len(X), num_classes), np.float32)
    columns = np.asarray(model.classes_, np.int64)
    with threads(len(X)):
        for i in range(0, len(X), PREDICT_ROWS):
            out[i : i + PREDICT_ROWS, columns] = model.predict_proba(X[i : i + PREDICT_ROWS])
    return out


#: Most validation rows early stopping scores each iteration on: scikit-learn copies
#: them as float64 and bins them (1.5M rows cost about 0.6 GiB in the 10M-row bench).
EARLY_STOPPING_ROWS = 100_000


def early_stopping_rows(
    val: tuple[np.ndarray, np.ndarray], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The validation split, or a seeded uniform sample of `EARLY_STOPPING_ROWS` of it
    (in row order): enough to tell when the loss stops falling."""
    Xv, yv = val
    if len(yv) <= EARLY_STOPPING_ROWS:
        return Xv, yv
    keep = np.sort(np.random.default_rng(seed).choice(len(yv), EARLY_STOPPING_ROWS, False))
    return Xv[keep], yv[keep]


def fit_challenger(
    split: Batches,
    val: tuple[np.ndarray, np.ndarray],
    seed: int,
    budget: int | None = None,
    time_limit_s: float = TIME_LIMIT_S,
) -> Challenger:
    """Fit the challenger on ``split`` (early-stopped on ``val``); its validation accuracy
    and cost go into the train stage metadata."""
    assert split.schema is not None
    if split.schema.kind != "table":
        return skipped(f"{split.schema.kind} data (gradient boosting is a bar for tables)")
    started = time.perf_counter()
    X, y, sampled = training_rows(split, seed, budget)
    regression = split.schema.regression
    if len(np.unique(y)) < 2:
        return skipped("the training split holds a single " + ("value" if regression else "class"))
    if not regression and not np.isin(val[1], y).any():
        return skipped("the validation split holds none of the training split's classes")
    progress.log("train", f"challenger: gradient boosting on {len(y):,} rows")
    model = boost(X, y, early_stopping_rows(val, seed), seed, time_limit_s, regression)
    score = (
        {"challenger_val_r2": r2_score(model, *val)}
        if regression
        else {"challenger_val_accuracy": accuracy(model, *val, split.schema.num_classes)}
    )
    meta = {
        **score,
        "challenger_seconds": round(time.perf_counter() - started, 3),
        "challenger_iterations": int(model.n_iter_),
        "challenger_train_rows": int(len(y)),
        "challenger_sampled": sampled,
    }
    name, value = next(iter(score.items()))
    progress.log(
        "train",
        f"challenger: validation {name.removeprefix('challenger_val_')} {value:.4f} after "
        f"{meta['challenger_iterations']} iterations, {meta['challenger_seconds']:.1f}s",
    )
    return Challenger(model, meta)


def train_beside(
    enabled: bool,
    train_data: Any,
    schema: Schema,
    train_path: str,
    val: tuple[np.ndarray, np.ndarray],
    seed: int,
) -> Challenger:
    """What the train stage calls after the network: the split it trained on, held in
    memory (``(X, y)``) or not (streamed, or uint8 `Stored` pixels: then read again here,
    batch by batch, as float32 features). A failing
    challenger is recorded, not raised: a yardstick must not cost the trained network."""
    if not enabled:
        return Challenger(None, {"challenger_note": "off (challenger=false)"})
    if isinstance(train_data, tuple):
        split = batches.of(*train_data, schema)
    else:
        split = batches.streamed(train_path)
    try:
        return fit_challenger(split, val, seed)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return skipped(f"it failed ({type(exc).__name__}: {exc})")


def save(model_dir: str | os.PathLike, challenger: Challenger) -> None:
    """Add the challenger to a saved model bundle and re-write its ``sha256.json``."""
    if challenger.model is None:
        return
    import joblib
    import sklearn

    root = Path(model_dir)
    payload = {"model": challenger.model, "sklearn": sklearn.__version__, **challenger.meta}
    tmp = root / f".{FILENAME}.tmp"
    joblib.dump(payload, tmp)
    os.replace(tmp, root / FILENAME)
    write_checksums(root)


def load(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The challenger saved in a model bundle (``{"model", "challenger_val_accuracy", ...}``),
    or None when the bundle has none (images, challenger=false, older bundles)."""
    import joblib
    import sklearn

    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return None
    verify_checksums(model_dir)
    try:
        return joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways; one line for all
        raise KubetrainError(
            f"{path} cannot be loaded ({type(exc).__name__}: {exc}); this is scikit-learn "
            f"{sklearn.__version__}: evaluate in the image that trained the model, or re-run "
            "the train stage"
        ) from None
