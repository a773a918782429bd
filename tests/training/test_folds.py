"""K-fold cross-validation: fold assignment and a cross-validated tuning trial."""

from __future__ import annotations

import numpy as np
import pytest

from kubetrain.config.settings import HyperConfig, RunConfig, TuneConfig
from kubetrain.data.datasets import Schema
from kubetrain.training import folds
from kubetrain.training.tuning import run_trial

pytestmark = pytest.mark.unit


def data(rows: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1.2)
    return X, y


def test_folds_are_stratified_balanced_and_independent_of_row_order() -> None:
    X, y = data()
    fold = folds.assign(X, y, 5, regression=False)
    for c in np.unique(y):  # each class dealt evenly: fold sizes differ by at most one
        sizes = np.bincount(fold[y == c], minlength=5)
        assert sizes.max() - sizes.min() <= 1
    order = np.random.default_rng(1).permutation(len(y))
    assert (folds.assign(X[order], y[order], 5, False) == fold[order]).all()
    # float noise far below the hashed precision (another engine's rounding) moves no row
    noisy = X * (1 + 1e-9)
    assert (folds.assign(noisy, y, 5, False) == fold).all()


def test_a_regression_is_stratified_on_target_deciles() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1000, 3)).astype(np.float32)
    y = (X[:, 0] * 10 + rng.normal(size=1000)).astype(np.float32)
    fold = folds.assign(X, y, 4, regression=True)
    deciles = np.quantile(y, np.linspace(0.1, 0.9, 9))
    for k in range(4):
        share = (
            np.bincount(np.searchsorted(deciles, y[fold == k]), minlength=10) / (fold == k).sum()
        )
        assert np.abs(share - 0.1).max() < 0.02


@pytest.mark.parametrize(
    ("setting", "rows", "expected"),
    [(-1, 1000, 5), (-1, 50_000, 0), (0, 100, 0), (1, 100, 0), (3, 10**6, 3)],
)
def test_auto_folds_depend_on_the_rows(setting, rows, expected) -> None:
    assert folds.folds_for(TuneConfig(cv_folds=setting), rows) == expected


def test_auto_folds_skip_images_a_resnet_takes_but_keep_digits() -> None:
    auto = TuneConfig(cv_folds=-1)
    assert folds.folds_for(auto, 1797, [1, 8, 8]) == 5  # digits: seconds per fit
    assert folds.folds_for(auto, 2000, [3, 32, 32]) == 0  # minutes per fit on a CPU
    assert folds.folds_for(TuneConfig(cv_folds=3), 2000, [3, 32, 32]) == 3  # as set


def test_a_cross_validated_trial_scores_the_mean_of_its_folds() -> None:
    X, y = data(500)
    Xv, yv = data(150, seed=1)
    schema = Schema("table", [f"f{i}" for i in range(4)], ["a", "b", "c"])
    cfg = RunConfig.from_flat({"tune_epochs": 3, "cv_folds": 3})
    seen: list[tuple[int, float]] = []

    def hook(step: int, metrics: dict[str, float]) -> bool:
        seen.append((step, metrics["validation-accuracy"]))
        return False

    out = run_trial(cfg.train, HyperConfig(), cfg.tune, 0, (X, y), (Xv, yv), schema, hook)
    assert len(out["folds"]) == 3 and not out["stopped"]
    accuracies = [f["validation-accuracy"] for f in out["folds"]]
    assert out["validation-accuracy"] == pytest.approx(np.mean(accuracies))
    assert [s for s, _ in seen] == [1, 2, 3]  # the running mean after each fold
    assert seen[-1][1] == pytest.approx(out["validation-accuracy"])
    summary = folds.summary(out["folds"])
    assert summary["validation-accuracy_std"] == pytest.approx(np.std(accuracies))

    def stop_now(step: int, metrics: dict[str, float]) -> bool:
        return True

    pruned = run_trial(cfg.train, HyperConfig(), cfg.tune, 0, (X, y), (Xv, yv), schema, stop_now)
    assert pruned["stopped"] and len(pruned["folds"]) == 1
