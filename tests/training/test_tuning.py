"""Tune stage library (`kubetrain.training.tuning`): Katib's search-space vocabulary on Optuna.

Real studies run on a small breast_cancer split (3 trials x 2 epochs each); the
early-stopping, objective and failure tests replace `fit` (or `run_trial`) with a
scripted learning curve so the outcome is exact and instant. No KFP, no Katib."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from kubetrain.config.settings import TUNE_ALGORITHMS, HyperConfig, TrainConfig, TuneConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import Schema
from kubetrain.training import tuning
from kubetrain.training.loop import TUNABLE
from kubetrain.training.tuning import (
    GRID_POINTS,
    MEDIANSTOP,
    Param,
    for_algorithm,
    make_pruner,
    make_sampler,
    run_trial,
    search_space,
    tune,
)

SEED = 42
TRAIN = TrainConfig()  # the recipe every trial shares


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def one_core(monkeypatch):
    """`tune` gives each parallel trial cpu_count // tune_parallel torch threads; on a
    shared CI box one thread per trial is fastest for these tiny networks."""
    monkeypatch.setattr(tuning.os, "cpu_count", lambda: 1)


@pytest.fixture(scope="module")
def cancer():
    """160 standardized training rows and 100 validation rows of breast_cancer."""
    data = load_breast_cancer()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    X_tr, X_va, y_tr, y_va = train_test_split(
        X, y, train_size=160, test_size=100, random_state=0, stratify=y
    )
    mean, std = X_tr.mean(0), X_tr.std(0)
    scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    schema = Schema("table", list(data.feature_names), list(data.target_names))
    return (scale(X_tr), y_tr), (scale(X_va), y_va), schema


def _in_space(params: dict, space: list[Param]) -> bool:
    """Whether `params` is a point of the (Katib-style) search space."""
    if set(params) != {p.name for p in space}:
        return False
    for p in space:
        value = params[p.name]
        if p.type == "categorical":
            if value not in [p.cast(v) for v in p.values]:
                return False
        elif not (p.min <= value <= p.max) or (
            p.type == "int"
            and (not isinstance(value, int) or (p.step and (value - p.min) % p.step))
        ):
            return False
    return True


class ScriptedFit:
    """Stands in for `kubetrain.training.loop.fit`: each call plays a scripted learning curve
    through the trial's hook, like the real loop, and returns what `fit` would."""

    def __init__(self, curve):
        self.curve = curve  # (trial's HyperConfig, call index, epoch) -> (accuracy, loss)
        self.calls = 0
        self.lock = threading.Lock()
        self.hypers: list[HyperConfig] = []  # each trial's tunables, as fit received them
        self.shared: list[tuple] = []  # (recipe, seed, epochs) of each call

    def __call__(self, train, hyper, seed, train_data, val_data, schema, epochs, hook=None, **_):
        with self.lock:
            index, self.calls = self.calls, self.calls + 1
            self.hypers.append(hyper)
            self.shared.append((train, seed, epochs))
        history, stopped = [], False
        for epoch in range(1, epochs + 1):
            acc, loss = self.curve(hyper, index, epoch)
            history.append((acc, loss))
            if hook and hook(epoch, {"validation-accuracy": acc, "validation-loss": loss}):
                stopped = True
                break
        acc, loss = min(history, key=lambda h: h[1])
        return SimpleNamespace(
            metrics={"val_accuracy": acc, "val_loss": loss, "epochs_run": len(history)},
            stopped_by_hook=stopped,
        )


# --- search space ---------------------------------------------------------------------


def test_search_space_covers_the_tunable_settings():
    space = search_space()
    assert [p.name for p in space] == list(TUNABLE)
    kinds = {p.name: p.type for p in space}
    assert kinds == {
        "learning_rate": "double",
        "weight_decay": "double",
        "dropout": "double",
        "width": "int",
        "batch_size": "categorical",
    }
    for p in space:
        if p.type != "categorical":
            assert p.min < p.max


def test_grid_turns_ranges_into_categorical_points():
    space = search_space()
    grid = {p.name: p for p in for_algorithm(space, "grid")}
    original = {p.name: p for p in space}
    assert all(p.type == "categorical" for p in grid.values())

    lr = [float(v) for v in grid["learning_rate"].values]  # log-uniform: geometric points
    assert len(lr) == GRID_POINTS
    assert lr[0] == pytest.approx(original["learning_rate"].min)
    assert lr[-1] == pytest.approx(original["learning_rate"].max)
    ratios = [b / a for a, b in zip(lr, lr[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-2)
    wd = [float(v) for v in grid["weight_decay"].values]
    assert wd == pytest.approx([1e-6, 1e-4, 1e-2])

    dropout = [float(v) for v in grid["dropout"].values]  # uniform: evenly spaced points
    assert dropout == pytest.approx(list(np.linspace(0.0, 0.5, GRID_POINTS)))

    width = [int(v) for v in grid["width"].values]  # ints: on the range and on its step
    w = original["width"]
    assert width == sorted(set(width)) and len(width) == GRID_POINTS
    assert width[0] == w.min and width[-1] == w.max
    assert all((v - w.min) % w.step == 0 for v in width)

    assert grid["batch_size"] == original["batch_size"]  # already finite
    for algorithm in TUNE_ALGORITHMS:
        if algorithm != "grid":
            assert for_algorithm(space, algorithm) == space


def test_param_cast():
    cat = Param("x", "categorical", values=("32", "0.25", "1e-06", "relu"))
    assert cat.cast("32") == 32 and type(cat.cast("32")) is int
    assert cat.cast("0.25") == 0.25
    assert cat.cast("1e-06") == 1e-06
    assert cat.cast("relu") == "relu"
    assert Param("w", "int", 1, 10).cast("64.0") == 64
    assert Param("d", "double", 0, 1).cast("0.5") == 0.5


def test_every_katib_algorithm_has_a_sampler_and_unknown_is_an_error():
    space = search_space()
    for algorithm in TUNE_ALGORITHMS:
        sampler = make_sampler(algorithm, 0, for_algorithm(space, algorithm), trials=5)
        assert isinstance(sampler, optuna.samplers.BaseSampler)
    with pytest.raises(KubetrainError, match="unknown tune algorithm"):
        make_sampler("hyperband", 0, space, 5)
    pruner = make_pruner("medianstop")
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)


# --- real studies ---------------------------------------------------------------------


def test_a_resnet_is_tuned_without_the_width_it_does_not_use(cancer):
    """A ResNet's channels come from its shape: searching `width` spread 3 trials over a
    value without effect. The small CNN (digits) and the table networks keep it."""
    from kubetrain.training.models import uses_width

    rng = np.random.default_rng(0)
    image = Schema("image", [f"pixel_{i}" for i in range(3 * 16 * 16)], ["a", "b"], [3, 16, 16])
    digits = Schema("image", [f"p{i}" for i in range(64)], ["a", "b"], [1, 8, 8])
    assert not uses_width("auto", image) and not uses_width("resnet20", image)
    assert uses_width("auto", digits) and uses_width("auto", cancer[2])
    assert "width" not in [p.name for p in search_space(width=False)]
    X = rng.normal(size=(48, 3 * 16 * 16)).astype(np.float32)
    y = np.repeat([0, 1], 24)
    cfg = TuneConfig(cv_folds=0, tune_trials=2, tune_epochs=1, tune_time_budget=0)
    best, rows, _ = tune(TRAIN, cfg, SEED, (X[:32], y[:32]), (X[32:], y[32:]), image)
    assert rows and all("width" not in r["params"] for r in rows) and "width" not in best
    best, rows, _ = tune(TRAIN, cfg, SEED, *cancer)
    assert all("width" in r["params"] for r in rows if r["params"])


@pytest.mark.parametrize("algorithm", TUNE_ALGORITHMS)
def test_tune_with_every_algorithm(cancer, algorithm):
    train, val, schema = cancer
    cfg = TuneConfig(cv_folds=0, tune_algorithm=algorithm, tune_trials=3, tune_epochs=2)
    seen = []
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema, on_trial=seen.append)
    assert len(rows) == cfg.tune_trials == len(seen)
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert all(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
    assert _in_space(best, search_space())
    if algorithm == "grid":  # and exactly on the grid
        assert _in_space(best, for_algorithm(search_space(), "grid"))
    for row in rows:
        assert _in_space(row["params"], for_algorithm(search_space(), algorithm))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    top = max(done, key=lambda r: r["value"])  # accuracy is maximized
    assert best == top["params"]
    assert all(0.0 <= r["value"] <= 1.0 for r in done)


def test_parallel_trials(cancer):
    train, val, schema = cancer
    cfg = TuneConfig(
        cv_folds=0,
        tune_algorithm="random",
        tune_trials=3,
        tune_parallel=2,
        tune_epochs=2,
        tune_early_stopping="none",
    )
    before = torch.get_num_threads()
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    assert torch.get_num_threads() == before  # the thread split is undone
    assert len(rows) == 3 and [r["number"] for r in rows] == [0, 1, 2]
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert _in_space(best, search_space())


def test_parallel_trials_really_overlap(cancer, monkeypatch):
    """Two trials must be inside `fit` at the same time, or the barrier times out."""
    train, val, schema = cancer
    barrier = threading.Barrier(2, timeout=10)

    def curve(hyper, index, epoch):
        if epoch == 1 and index < 2:
            barrier.wait()
        return 0.9, 0.3

    monkeypatch.setattr(tuning, "fit", ScriptedFit(curve))
    cfg = TuneConfig(
        cv_folds=0, tune_algorithm="random", tune_trials=4, tune_parallel=2, tune_epochs=2
    )
    _, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    assert len(rows) == 4


def test_run_trial_reports_both_metrics(cancer):
    train, val, schema = cancer
    cfg = TuneConfig(cv_folds=0, tune_epochs=2)
    # a trial's values as Katib hands them over: ints as floats, categoricals as strings
    params = {
        "learning_rate": 5e-3,
        "weight_decay": 1e-4,
        "dropout": 0.1,
        "width": 32.0,
        "batch_size": "64",
    }
    hyper = HyperConfig().replace(params)
    out = run_trial(TRAIN, hyper, cfg, SEED, train, val, schema)
    assert {"validation-accuracy", "validation-loss"} <= set(out)
    assert 0.5 < out["validation-accuracy"] <= 1.0
    assert 0.0 < out["validation-loss"] < 1.0
    assert out["epochs"] == 2 and out["stopped"] is False  # tune_epochs, not the final epochs
    stopped = run_trial(TRAIN, hyper, cfg, SEED, train, val, schema, hook=lambda epoch, m: True)
    assert stopped["epochs"] == 1 and stopped["stopped"] is True
    with pytest.raises(KubetrainError, match="unknown hyper setting.*optimizer"):
        HyperConfig().replace({**params, "optimizer": "sgd"})  # the recipe is not tunable


# --- early stopping, objectives and failures (scripted curves) -------------------------


def test_medianstop_prunes_trials_below_the_median(cancer, monkeypatch):
    train, val, schema = cancer
    # the first three trials learn well; later ones stay far below their median
    fake = ScriptedFit(lambda hyper, index, epoch: (0.9, 0.3) if index < 3 else (0.5, 0.7))
    monkeypatch.setattr(tuning, "fit", fake)
    cfg = TuneConfig(
        cv_folds=0,
        tune_algorithm="random",
        tune_trials=5,
        tune_epochs=6,
        tune_early_stopping="medianstop",
    )
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    for row in rows[3:]:  # stopped at Katib's start_step, not before, not after
        assert row["epochs"] == MEDIANSTOP["start_step"]
        assert row["intermediate"] == [0.5] * MEDIANSTOP["start_step"]
    assert all(r["epochs"] == 6 for r in rows[:3])
    assert best in [r["params"] for r in rows[:3]]


def test_no_early_stopping_prunes_nothing(cancer, monkeypatch):
    train, val, schema = cancer
    fake = ScriptedFit(lambda hyper, index, epoch: (0.9, 0.3) if index < 3 else (0.5, 0.7))
    monkeypatch.setattr(tuning, "fit", fake)
    cfg = TuneConfig(
        cv_folds=0,
        tune_algorithm="random",
        tune_trials=5,
        tune_epochs=6,
        tune_early_stopping="none",
    )
    _, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 5
    assert all(r["epochs"] == 6 for r in rows)
    # each trial trains the shared recipe with its own sampled values, for tune_epochs
    assert set(fake.hypers) == {HyperConfig().replace(r["params"]) for r in rows}
    assert fake.shared == [(TRAIN, SEED, 6)] * 5


@pytest.mark.parametrize("objective", ["validation-accuracy", "validation-loss"])
def test_objective_direction(cancer, monkeypatch, objective):
    """Accuracy and loss both grow with the learning rate here, so the best trial is the
    highest rate when accuracy is maximized and the lowest when loss is minimized."""
    train, val, schema = cancer
    fake = ScriptedFit(
        lambda hyper, index, epoch: (hyper.learning_rate * 10, hyper.learning_rate * 50)
    )
    monkeypatch.setattr(tuning, "fit", fake)
    cfg = TuneConfig(
        cv_folds=0, tune_algorithm="random", tune_trials=5, tune_epochs=2, tune_objective=objective
    )
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(done) == 5
    rates = [r["params"]["learning_rate"] for r in done]
    assert len(set(rates)) == 5
    if objective == "validation-loss":
        assert best["learning_rate"] == min(rates)
        assert all(r["value"] == pytest.approx(r["params"]["learning_rate"] * 50) for r in done)
    else:
        assert best["learning_rate"] == max(rates)
        assert all(r["value"] == pytest.approx(r["params"]["learning_rate"] * 10) for r in done)


def test_real_loss_objective_picks_the_lowest_loss(cancer):
    train, val, schema = cancer
    cfg = TuneConfig(
        cv_folds=0,
        tune_algorithm="random",
        tune_trials=3,
        tune_epochs=2,
        tune_objective="validation-loss",
        tune_early_stopping="none",
    )
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    lowest = min(rows, key=lambda r: r["value"])
    assert best == lowest["params"]
    assert all(r["value"] > 0 for r in rows)


def test_too_many_failed_trials_stop_the_study(cancer, monkeypatch):
    train, val, schema = cancer
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise KubetrainError("training diverged at epoch 1; lower --learning-rate")

    monkeypatch.setattr(tuning, "run_trial", failing)
    cfg = TuneConfig(cv_folds=0, tune_algorithm="random", tune_trials=8, tune_max_failed=1)
    with pytest.raises(
        KubetrainError,
        match=r"2 tuning trials failed .*maxFailedTrialCount 1"
        r".*diverged",
    ):
        tune(TRAIN, cfg, SEED, train, val, schema)
    assert len(calls) == 2  # stopped as soon as the limit was passed, not after 8 trials


def test_failures_within_the_limit_are_recorded(cancer, monkeypatch):
    train, val, schema = cancer
    fake = ScriptedFit(lambda hyper, index, epoch: (0.9, 0.3))
    real_run_trial = tuning.run_trial
    calls = []

    def sometimes_failing(*args, **kwargs):
        calls.append(1)
        if len(calls) in (1, 3):
            raise KubetrainError("training diverged at epoch 1; lower --learning-rate")
        return real_run_trial(*args, **kwargs)

    monkeypatch.setattr(tuning, "fit", fake)
    monkeypatch.setattr(tuning, "run_trial", sometimes_failing)
    cfg = TuneConfig(cv_folds=0, tune_algorithm="random", tune_trials=5, tune_max_failed=2)
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema)
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "diverged" in rows[0]["error"] and rows[0]["value"] is None
    assert best in [r["params"] for r in rows if r["state"] == "COMPLETE"]


# --- the time budget --------------------------------------------------------------------


def test_a_spent_time_budget_stops_the_study_after_one_completed_trial(cancer, capsys):
    """A budget gone before the first trial ends: that trial still runs to the end and is
    the result; no other starts."""
    train, val, schema = cancer
    cfg = TuneConfig(cv_folds=0, tune_trials=20, tune_epochs=2, tune_time_budget=1e-9)
    best, rows, facts = tune(TRAIN, cfg, SEED, train, val, schema)
    assert [r["state"] for r in rows] == ["COMPLETE"]
    assert rows[0]["epochs"] == 2 and best == rows[0]["params"]
    assert facts == {"trials_run": 1, "time_budget_s": 1e-9, "stopped_by_time_budget": True}
    out = capsys.readouterr().out
    assert "kubetrain | tune | time budget 1e-09 s reached after 1 of 20 trials" in out
    trial_line = next(line for line in out.splitlines() if "trial 1/20 (#0)" in line)
    assert trial_line.endswith("| ETA 0s")  # no more than the budget leaves, not 19 trials'


def test_trials_running_when_the_budget_ends_stop_once_one_completed(cancer):
    """Two trials in parallel, each longer than the budget: the first to finish completes
    with all its epochs (a study always gets one result), the other is stopped at its next
    epoch (pruned), and no third starts."""
    train, val, schema = cancer
    cfg = TuneConfig(
        cv_folds=0,
        tune_algorithm="random",
        tune_trials=10,
        tune_parallel=2,
        tune_epochs=100,
        tune_early_stopping="none",
        tune_time_budget=0.05,
    )
    recipe = TrainConfig(patience=1000)  # every trial runs its 100 epochs
    best, rows, facts = tune(recipe, cfg, SEED, train, val, schema)
    assert sorted(r["state"] for r in rows) == ["COMPLETE", "PRUNED"]
    done = next(r for r in rows if r["state"] == "COMPLETE")
    assert done["epochs"] == 100
    assert all(r["seconds"] > cfg.tune_time_budget for r in rows)
    assert facts["trials_run"] == 2 and facts["stopped_by_time_budget"] is True
    assert best == done["params"]


def test_no_budget_or_an_ample_one_runs_every_trial(cancer):
    train, val, schema = cancer
    for budget in (0.0, -1.0, 3600.0):
        cfg = TuneConfig(cv_folds=0, tune_trials=2, tune_epochs=1, tune_time_budget=budget)
        _, rows, facts = tune(TRAIN, cfg, SEED, train, val, schema)
        assert len(rows) == 2
        assert facts == {
            "trials_run": 2,
            "time_budget_s": max(budget, 0.0),
            "stopped_by_time_budget": False,
        }


def test_no_completed_trial_falls_back_to_the_configured_values(cancer, capsys):
    """Features with a NaN column make every trial diverge (a real FAIL): within
    tune_max_failed the study ends without a result, and the train step keeps the
    configured hyperparameters (empty best) instead of the run failing."""
    (X, y), val, schema = cancer
    X = X.copy()
    X[:, 0] = np.nan
    cfg = TuneConfig(cv_folds=0, tune_trials=2, tune_epochs=1, tune_max_failed=3)
    best, rows, facts = tune(TRAIN, cfg, SEED, (X, y), val, schema)
    assert best == {} and [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert facts["note"].startswith("no tuning trial completed (2 FAIL); the train step uses")
    assert "diverged" in facts["note"] and facts["note"] in capsys.readouterr().out
    assert HyperConfig().replace(best) == HyperConfig()  # what the train stage applies
    # with the budget spent at once, trials go on one at a time until one completes
    # or the failure limit ends the study, as without a budget
    cfg = TuneConfig(
        cv_folds=0, tune_trials=10, tune_epochs=1, tune_max_failed=2, tune_time_budget=1e-9
    )
    with pytest.raises(KubetrainError, match=r"3 tuning trials failed .*diverged"):
        tune(TRAIN, cfg, SEED, (X, y), val, schema)


# --- a training split over the memory budget ------------------------------------------


@pytest.fixture
def sharded_cancer(cancer, tmp_path):
    """The 160 training rows as 4 shards and the 100 validation rows, saved."""
    from kubetrain.data import shards
    from kubetrain.data.datasets import save_split

    (X, y), (Xv, yv), schema = cancer
    shards.write(tmp_path / "train", X, y, schema, max_rows_per_shard=40)
    save_split(tmp_path / "val", Xv, yv, schema)
    return str(tmp_path / "train"), str(tmp_path / "val"), X, y


def test_tuning_over_the_budget_trains_on_a_stratified_sample(sharded_cancer, monkeypatch, capsys):
    from kubetrain.stages import TuneRequest, tune_here

    train, val, X, y = sharded_cancer
    budget = 80 * X.shape[1] * 4  # half of it holds 40 of the 160 rows
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", str(budget))
    cfg = TuneConfig(cv_folds=0, tune_algorithm="random", tune_trials=2, tune_epochs=1)
    best, rows, extra = tune_here(TuneRequest(train, val, TRAIN, cfg, SEED))
    out = capsys.readouterr().out
    assert "trials train on a stratified sample of 40 rows (seed 42)" in out
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)
    assert _in_space(best, search_space())
    assert extra == {
        "backend": "optuna",
        "trials_run": 2,
        "time_budget_s": cfg.tune_time_budget,
        "stopped_by_time_budget": False,
    }
    (Xs, ys), _ = tuning.tuning_split(train, SEED, budget)
    assert len(ys) == 40 and np.bincount(ys).tolist() == (np.bincount(y) // 4).tolist()
    tags = [next(i for i, r in enumerate(X) if np.array_equal(r, s)) for s in Xs]
    assert tags == sorted(set(tags)) and (ys == y[tags]).all()  # real rows, in order
    again = tuning.tuning_split(train, SEED, budget)[0][0]
    np.testing.assert_array_equal(again, Xs)  # the same sample for the same seed
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", str(10**9))
    capsys.readouterr()
    (Xw, _), _ = tuning.tuning_split(train, SEED)
    np.testing.assert_array_equal(Xw, X)  # within the budget: every row, as before
    assert "sample" not in capsys.readouterr().out


def test_a_big_split_within_the_budget_is_sampled_for_trials(sharded_cancer, monkeypatch, capsys):
    """A trial only ranks hyperparameters: past MAX_TRIAL_ROWS it trains on a stratified
    sample, even when the whole split would fit in memory."""
    train, _, X, y = sharded_cancer
    monkeypatch.setattr(tuning, "MAX_TRIAL_ROWS", 80)
    (Xs, ys), _ = tuning.tuning_split(train, SEED, budget=10**9)
    assert len(ys) == 80 and np.bincount(ys).tolist() == (np.bincount(y) // 2).tolist()
    assert "stratified sample of 80 of the training split's 160 rows" in capsys.readouterr().out


# --- the configured values as the first trial -------------------------------------------


def test_the_configured_values_are_the_first_trial_and_win_unless_beaten(cancer, monkeypatch):
    """The baseline trains first with exactly the configured values; a study whose other
    trials all score lower returns it, and one with a better trial returns that."""
    train, val, schema = cancer
    configured = HyperConfig(
        learning_rate=4e-3, weight_decay=2e-4, dropout=0.25, width=96, batch_size=128
    )
    mine = lambda hyper: hyper == configured  # noqa: E731
    cfg = TuneConfig(cv_folds=0, tune_algorithm="tpe", tune_trials=4, tune_epochs=2)
    fake = ScriptedFit(lambda hyper, index, epoch: (0.95, 0.1) if mine(hyper) else (0.8, 0.4))
    monkeypatch.setattr(tuning, "fit", fake)
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema, baseline=configured)
    assert fake.hypers[0] == configured and rows[0]["baseline"] is True
    assert not any(r.get("baseline") for r in rows[1:]) and len(rows) == 4
    assert HyperConfig().replace(best) == configured
    fake = ScriptedFit(lambda hyper, index, epoch: (0.5, 0.9) if mine(hyper) else (0.8, 0.4))
    monkeypatch.setattr(tuning, "fit", fake)
    best, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema, baseline=configured)
    assert fake.hypers[0] == configured and HyperConfig().replace(best) != configured
    assert best == max(rows, key=lambda r: r["value"])["params"]


def test_a_configured_value_outside_the_space_is_left_to_the_sampler(cancer, capsys):
    """batch_size 100 is no categorical choice and dropout 0.8 is past the range: Optuna
    would refuse them, so the first trial samples those two and keeps the rest."""
    train, val, schema = cancer
    configured = HyperConfig(learning_rate=5e-3, dropout=0.8, batch_size=100, width=64)
    space = search_space()
    assert tuning.baseline_params(configured, space) == {
        "learning_rate": 5e-3,
        "weight_decay": HyperConfig().weight_decay,
        "width": 64,
    }
    assert tuning.baseline_params(HyperConfig(width=100), space).get("width") is None  # off step
    cfg = TuneConfig(cv_folds=0, tune_algorithm="random", tune_trials=2, tune_epochs=1)
    _, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema, baseline=configured)
    first = rows[0]["params"]
    assert rows[0]["baseline"] and first["learning_rate"] == 5e-3 and first["width"] == 64
    assert first["batch_size"] in (32, 64, 128) and first["dropout"] <= 0.5
    assert "trial #0 is the configured values (baseline): learning_rate=0.005" in (
        capsys.readouterr().out
    )


def test_grid_search_runs_its_own_points_only(cancer):
    train, val, schema = cancer
    cfg = TuneConfig(cv_folds=0, tune_algorithm="grid", tune_trials=2, tune_epochs=1)
    _, rows, _ = tune(TRAIN, cfg, SEED, train, val, schema, baseline=HyperConfig(dropout=0.3))
    grid = for_algorithm(search_space(), "grid")
    assert not any(r.get("baseline") for r in rows)
    assert all(_in_space(r["params"], grid) for r in rows)


def test_the_tune_stage_passes_the_configured_values_as_the_baseline(sharded_cancer):
    from kubetrain.stages import TuneRequest, tune_here

    train, val, _, _ = sharded_cancer
    cfg = TuneConfig(cv_folds=0, tune_algorithm="random", tune_trials=2, tune_epochs=1)
    configured = HyperConfig(learning_rate=5e-3, dropout=0.2, batch_size=32)
    _, rows, _ = tune_here(TuneRequest(train, val, TRAIN, cfg, SEED, hyper=configured))
    assert rows[0]["baseline"] and HyperConfig().replace(rows[0]["params"]) == configured
    _, rows, _ = tune_here(TuneRequest(train, val, TRAIN, cfg, SEED))  # none: all sampled
    assert not any(r.get("baseline") for r in rows)


def test_skipped_tuning_says_which_values_the_kind_of_data_sets(tmp_path, capsys):
    from kubetrain.stages import default_hyperparameters_stage

    trials, report = str(tmp_path / "trials"), str(tmp_path / "report.html")
    best, _ = default_hyperparameters_stage(trials, report, HyperConfig(), TuneConfig())
    assert best["learning_rate"] == best["batch_size"] == 0  # the train step resolves them
    assert "(learning_rate and batch_size 0: auto, set by the kind of data)" in (
        capsys.readouterr().out
    )
    default_hyperparameters_stage(trials, report, HyperConfig(batch_size=16), TuneConfig())
    out = capsys.readouterr().out
    assert "(learning_rate 0: auto" in out and "batch_size 0" not in out
