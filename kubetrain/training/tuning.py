"""Tune: Katib's vocabulary, Optuna's engine.

The search space, algorithm names, early-stopping rule and trial limits are
written the way a Katib Experiment has them, and the local backend maps each to
the Optuna sampler/pruner Katib itself runs for that name. One trial function,
`run_trial`, serves the local study and the Katib trial container, so local
and cluster tuning cannot drift apart.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetrain.config.settings import HyperConfig, TrainConfig, TuneConfig
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.core.memory import memory_budget
from kubetrain.data import batches
from kubetrain.data.datasets import Schema
from kubetrain.training import folds
from kubetrain.training.loop import EpochHook, Split, fit
from kubetrain.training.models import uses_width

GOALS = {
    "validation-accuracy": "maximize",
    "validation-loss": "minimize",
    "validation-r2": "maximize",
    "validation-rmse": "minimize",
}
#: What a trial reports, per task (the objective is one of them).
TASK_METRICS = {
    False: ("validation-accuracy", "validation-loss"),
    True: ("validation-r2", "validation-rmse", "validation-loss"),
}


def objective_for(tune: TuneConfig, regression: bool) -> TuneConfig:
    """`tune` with ``tune_objective`` settled for the task: ``auto`` becomes accuracy or
    R^2, and a metric the task does not have is refused in one line."""
    metrics = TASK_METRICS[regression]
    if tune.tune_objective == "auto":
        return tune.replace({"tune_objective": metrics[0]})
    if tune.tune_objective not in metrics:
        task = "regression" if regression else "classification"
        raise KubetrainError(
            f"tune_objective={tune.tune_objective} does not apply to a {task}; use "
            f"{', '.join(metrics)} or auto"
        )
    return tune


MEDIANSTOP = {"min_trials_required": 3, "start_step": 4}  # Katib's defaults
GRID_POINTS = 3  # values per continuous parameter when the algorithm is grid
#: Share of the memory budget a training sample for tuning may take (`tuning_split`):
#: the validation split, the trials' networks and their batches need the rest.
SAMPLE_SHARE = 0.5


@dataclass(frozen=True)
class Param:
    """One Katib `parameters[]` entry: parameterType double|int|categorical."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    values: tuple[str, ...] = field(default_factory=tuple)
    log: bool = False  # Katib feasibleSpace.distribution: logUniform

    def cast(self, value: Any) -> Any:
        if self.type == "int":
            return int(float(value))
        if self.type == "double":
            return float(value)
        # categorical values travel as strings (Katib); numbers come back as numbers
        try:
            number = float(value)
            return int(number) if number.is_integer() and "." not in str(value) else number
        except ValueError:
            return value


def search_space(width: bool = True) -> list[Param]:
    """Learning rate, weight decay, dropout, width and batch size; without ``width`` for
    a network that has none to set (`models.uses_width`: a ResNet's channels come from
    its shape), where searching it only spread a few trials over a value without effect."""
    return [
        Param("learning_rate", "double", 3e-4, 1e-2, log=True),
        Param("weight_decay", "double", 1e-6, 1e-2, log=True),
        Param("dropout", "double", 0.0, 0.5),
        *([Param("width", "int", 32, 256, step=32)] if width else []),
        Param("batch_size", "categorical", values=("32", "64", "128")),
    ]


def for_algorithm(space: list[Param], algorithm: str) -> list[Param]:
    """Grid search needs finite values: continuous ranges become GRID_POINTS values.

    Katib's grid rejects doubles without a step, and a log-uniform range is
    better gridded geometrically, so both backends get the same categorical list.
    """
    if algorithm != "grid":
        return space
    out = []
    for p in space:
        if p.type == "double" and p.step is None:
            points = (
                np.geomspace(p.min, p.max, GRID_POINTS)
                if p.log
                else np.linspace(p.min, p.max, GRID_POINTS)
            )
            out.append(Param(p.name, "categorical", values=tuple(f"{v:.3g}" for v in points)))
        elif p.type == "int":
            step = p.step or 1  # grid points stay on the feasible space's step
            points = np.linspace(p.min, p.max, GRID_POINTS)
            points = p.min + np.round((points - p.min) / step) * step
            values = np.unique(np.clip(points, p.min, p.max).astype(int))
            out.append(Param(p.name, "categorical", values=tuple(str(v) for v in values)))
        else:
            out.append(p)
    return out


def make_sampler(algorithm: str, seed: int, space: list[Param], trials: int):
    """The Optuna sampler behind each Katib algorithm name."""
    import optuna.samplers as s

    startup = min(10, max(2, trials // 3))
    if algorithm == "random":
        return s.RandomSampler(seed=seed)
    if algorithm == "grid":
        grid = {p.name: list(p.values) for p in space}
        return s.GridSampler(grid, seed=seed)
    if algorithm in ("tpe", "multivariate-tpe"):
        return s.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=algorithm == "multivariate-tpe"
        )
    if algorithm == "cmaes":
        return s.CmaEsSampler(seed=seed, n_startup_trials=1, warn_independent_sampling=False)
    if algorithm == "sobol":
        return s.QMCSampler(qmc_type="sobol", seed=seed, warn_independent_sampling=False)
    if algorithm == "bayesianoptimization":
        return s.GPSampler(seed=seed, n_startup_trials=startup)
    raise KubetrainError(f"unknown tune algorithm {algorithm!r}")


def make_pruner(early_stopping: str):
    import optuna.pruners as p

    if early_stopping == "medianstop":
        return p.MedianPruner(
            n_startup_trials=MEDIANSTOP["min_trials_required"],
            n_warmup_steps=MEDIANSTOP["start_step"],
        )
    return p.NopPruner()


def baseline_params(hyper: HyperConfig, space: list[Param]) -> dict[str, Any]:
    """The configured values of `hyper` that lie in `space`, as Optuna takes them (a
    categorical value as its string): the study's first trial (`tune`'s ``baseline``).
    A value outside the space is left to the sampler: Optuna refuses it."""
    out: dict[str, Any] = {}
    for p in space:
        value = getattr(hyper, p.name)
        if p.type == "categorical":
            text = next((v for v in p.values if p.cast(v) == value), None)
            if text is not None:
                out[p.name] = text
        elif p.min <= value <= p.max and (p.step is None or (value - p.min) % p.step == 0):
            out[p.name] = value
    return out


def suggest(trial, space: list[Param]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in space:
        if p.type == "double":
            values[p.name] = trial.suggest_float(
                p.name, p.min, p.max, log=p.log, step=None if p.log else p.step
            )
        elif p.type == "int":
            values[p.name] = trial.suggest_int(
                p.name, int(p.min), int(p.max), step=int(p.step or 1), log=p.log
            )
        else:
            values[p.name] = p.cast(trial.suggest_categorical(p.name, list(p.values)))
    return values


#: Training rows a tuning trial trains on at most (a stratified sample beyond): a trial
#: only ranks hyperparameters, and on a 50,000-row table (65,000 after augmentation) one
#: trial on every row took longer than the whole 120 s time budget.
MAX_TRIAL_ROWS = 32_768


def tuning_split(
    path: str, seed: int, budget: int | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], Schema]:
    """The training split trials train on: whole when it has at most `MAX_TRIAL_ROWS` rows
    and fits the memory budget, else a stratified sample of at most that many rows (and
    `SAMPLE_SHARE` of the budget). Returns ``((X, y), schema)``.

    A sample, not shards streamed like the train stage: a study runs
    ``tune_trials x tune_epochs`` epochs, several trials at once, and streaming
    every shard each epoch would cost more than the final training; a trial only
    has to rank hyperparameters, which millions of rows do as well as all of
    them. The sample keeps each class's share and is spread evenly along the
    split (`kubetrain.data.batches.stratified_sample`); the same split and seed
    give the same rows. The train stage still trains on every row.
    """
    split = batches.open_split(path, budget=budget)
    assert split.schema is not None
    if not split.streamed and split.rows <= MAX_TRIAL_ROWS:
        assert split.arrays is not None
        return split.arrays, split.schema
    if not split.streamed:
        X, y = batches.stratified_sample(split, MAX_TRIAL_ROWS, seed, stage="tune")
        progress.log(
            "tune",
            f"trials train on a stratified sample of {len(y):,} of the training split's "
            f"{split.rows:,} rows (at most {MAX_TRIAL_ROWS:,}: enough to rank "
            "hyperparameters); the train stage uses every row",
        )
        return (X, y), split.schema
    limit = int((memory_budget() if budget is None else budget) * SAMPLE_SHARE)
    rows = max(1, min(MAX_TRIAL_ROWS, limit // max(1, split.features * 4)))
    X, y = batches.stratified_sample(split, rows, seed, stage="tune")
    progress.log(
        "tune",
        f"the training split ({split.rows:,} rows) is over the memory budget: trials train on "
        f"a stratified sample of {len(y):,} rows (seed {seed}); the train stage uses every row",
    )
    return (X, y), split.schema


def run_trial(
    train: TrainConfig,
    hyper: HyperConfig,
    tune: TuneConfig,
    seed: int,
    train_data: Split,
    val_data: Split,
    schema: Schema,
    hook: EpochHook | None = None,
    checkpoint_dir: str | None = None,
) -> dict[str, float]:
    """One trial: train for `tune_epochs` with the trial's `hyper`; returns its final metrics.

    With ``checkpoint_dir`` a trial whose pod was preempted resumes where it stopped.
    With K-fold cross-validation (`folds.folds_for`) the trial trains once per fold of
    the training and validation rows together and returns the folds' mean (``folds``:
    each fold's metrics); ``hook`` then sees the running mean after each fold, and a
    preempted trial starts again (no checkpoint).

    Called by the local Optuna study and by the Katib trial entrypoint, so a trial
    means the same on both; the final training shares `train`, not the epoch count.
    """
    k = folds.folds_for(tune, len(train_data[1]) + len(val_data[1]), schema.image_shape)
    if k:
        return _cross_validated(train, hyper, tune, seed, train_data, val_data, schema, hook, k)
    result = fit(
        train,
        hyper,
        seed,
        train_data,
        val_data,
        schema,
        epochs=tune.tune_epochs,
        hook=hook,
        checkpoint_dir=checkpoint_dir,
        verbose=False,
        stage="tune",
    )
    return {
        **_validation_metrics(result.metrics),
        "epochs": result.metrics["epochs_run"],
        "stopped": result.stopped_by_hook,
    }


def _validation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The best epoch's scores as Katib metrics: val_accuracy -> validation-accuracy."""
    return {f"validation-{k[4:]}": float(v) for k, v in metrics.items() if k.startswith("val_")}


def _cross_validated(
    train: TrainConfig,
    hyper: HyperConfig,
    tune: TuneConfig,
    seed: int,
    train_data: Split,
    val_data: Split,
    schema: Schema,
    hook: EpochHook | None,
    k: int,
) -> dict[str, Any]:
    epochs: list[int] = []

    def fit_fold(part: Split, held: Split) -> dict[str, float]:
        result = fit(
            train, hyper, seed, part, held, schema, tune.tune_epochs, verbose=False, stage="tune"
        )
        epochs.append(int(result.metrics["epochs_run"]))
        return _validation_metrics(result.metrics)

    stopped = [False]

    def after_fold(i: int, so_far: list[dict[str, float]]) -> bool:
        stopped[0] = bool(hook and hook(i + 1, _mean(so_far)))
        return stopped[0]

    per_fold = folds.cross_validate(
        fit_fold, train_data, val_data, k, schema.regression, after_fold
    )
    return {**_mean(per_fold), "epochs": sum(epochs), "stopped": stopped[0], "folds": per_fold}


def _mean(per_fold: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([f[name] for f in per_fold])) for name in per_fold[0]}


def tune(
    train: TrainConfig,
    tune: TuneConfig,
    seed: int,
    train_data: Split,
    val_data: Split,
    schema: Schema,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    baseline: HyperConfig | None = None,
) -> tuple[dict[str, Any], list[dict], dict[str, Any]]:
    """Run the study; returns (best hyperparameters, trials table, study facts).

    Each trial's `HyperConfig` is the defaults with the sampled values applied: the
    search space covers every tunable, so no value of the caller's leaks into a trial.
    With ``baseline`` (the configured values) the first trial runs those values that lie
    in the space (Optuna's ``enqueue_trial``; not with grid search, whose points are
    fixed): the study then returns other values only when a trial scored better than
    them on validation. A few short trials rank hyperparameters noisily (on 2,000
    generated 32x32 images, 3 ten-epoch trials picked values that tested 0.8975 and 0.865
    where others tested 0.955), and a baseline the team already trusts should not lose
    to a noisier pick.

    `tune_time_budget` (> 0) is Optuna's ``timeout``: no trial starts once it has
    passed and trials already running finish. The budget never ends a study without a
    completed trial: past it, trials run one at a time until one completes (however
    long it takes), `tune_trials` have run or `tune_max_failed` is passed. When no trial
    completed (all failed within `tune_max_failed`) the best hyperparameters are
    empty, so the train step keeps the configured values, and the facts say why.
    The facts (`trials_run`, `time_budget_s`, `stopped_by_time_budget`, `note`) go
    into the tune step's metadata.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = objective_for(tune, schema.regression)
    width = uses_width(train.model, schema, len(train_data[1]))
    space = for_algorithm(search_space(width), tune.tune_algorithm)
    k = folds.folds_for(tune, len(train_data[1]) + len(val_data[1]), schema.image_shape)
    goal = GOALS[tune.tune_objective]
    study = optuna.create_study(
        direction=goal,
        sampler=make_sampler(tune.tune_algorithm, seed, space, tune.tune_trials),
        pruner=make_pruner(tune.tune_early_stopping),
    )
    first = (
        baseline_params(baseline.for_kind(schema.kind), space)
        if baseline and tune.tune_algorithm != "grid"
        else {}
    )
    if first:
        study.enqueue_trial(first)
    total, started, lock = tune.tune_trials, time.perf_counter(), threading.Lock()
    budget = tune.tune_time_budget if tune.tune_time_budget > 0 else None
    rows: list[dict[str, Any]] = []
    progress.log(
        "tune",
        f"{tune.tune_algorithm} search, {total} trials x {tune.tune_epochs} "
        f"epochs, {tune.tune_parallel} in parallel, objective "
        f"{tune.tune_objective} ({goal}), early stopping "
        f"{tune.tune_early_stopping}, time budget "
        f"{'none' if budget is None else f'{budget:g} s'}"
        + (f", {k}-fold cross-validation (mean over folds)" if k else "")
        + (f"; trial #0 is the configured values (baseline): {_shown(first)}" if first else ""),
    )

    def objective(trial) -> float:
        params = suggest(trial, space)
        curve: list[float] = []

        def hook(epoch: int, metrics: dict[str, float]) -> bool:
            value = metrics[tune.tune_objective]
            curve.append(value)
            trial.report(value, epoch)
            return trial.should_prune() or over_budget()

        t0 = time.perf_counter()
        row = {"number": trial.number, "params": params, "intermediate": curve}
        if first and trial.number == 0:  # the enqueued trial is always the first created
            row["baseline"] = True
        try:
            hyper = HyperConfig().replace(params)
            metrics = run_trial(train, hyper, tune, seed, train_data, val_data, schema, hook)
        except KubetrainError as exc:  # e.g. diverged: a failed trial, like Katib's
            row.update(
                state="FAIL", value=None, error=str(exc), seconds=round(time.perf_counter() - t0, 3)
            )
            _record(row)
            raise _TrialFailed(str(exc)) from None
        value = metrics[tune.tune_objective]
        row.update(
            state="PRUNED" if metrics["stopped"] else "COMPLETE",
            value=value,
            epochs=metrics["epochs"],
            seconds=round(time.perf_counter() - t0, 3),
        )
        if "folds" in metrics:
            row["folds"] = metrics["folds"]
        _record(row)
        if metrics["stopped"]:
            raise optuna.TrialPruned()
        return value

    def over_budget() -> bool:
        """Past the time budget with a trial completed, running trials stop at their next
        epoch (pruned): the budget bounds the study, not just when trials may start."""
        if budget is None or time.perf_counter() - started < budget:
            return False
        with lock:
            return best_of(rows, goal) is not None

    def _record(row: dict[str, Any]) -> None:
        with lock:
            rows.append(row)
            best = best_of(rows, goal)
            best_text = f"best {best['value']:.4f} (#{best['number']})" if best else "best -"
            value = "-" if row["value"] is None else f"{row['value']:.4f}"
            progress.log(
                "tune",
                f"trial {len(rows)}/{total} (#{row['number']}) | {row['state']} "
                f"{value} | {best_text} | {row['seconds']:.1f}s | ETA "
                f"{progress.eta(started, len(rows), total, budget)}",
            )
            failed = sum(r["state"] == "FAIL" for r in rows)
            if failed > tune.tune_max_failed:
                study.stop()
        if on_trial:
            on_trial(row)

    threads = max(1, (os.cpu_count() or 1) // tune.tune_parallel)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        study.optimize(
            objective,
            n_trials=total,
            timeout=budget,
            n_jobs=tune.tune_parallel,
            catch=(_TrialFailed,),
        )
        # Optuna checks the clock before each trial, so a budget spent before a trial
        # completed (a tiny one, or a first trial that failed) would leave no result:
        # past the budget, trials run one at a time until one completes.
        while (
            budget is not None
            and best_of(rows, goal) is None
            and len(rows) < total
            and _counts(rows).get("FAIL", 0) <= tune.tune_max_failed
        ):
            progress.log(
                "tune", f"time budget {budget:g} s reached before a trial completed: one more"
            )
            ran = len(rows)
            study.optimize(objective, n_trials=1, catch=(_TrialFailed,))
            if len(rows) == ran:  # the sampler stopped the study (a finished grid)
                break
    finally:
        torch.set_num_threads(previous)
    elapsed = time.perf_counter() - started
    failed = sum(r["state"] == "FAIL" for r in rows)
    if failed > tune.tune_max_failed:
        raise KubetrainError(
            f"{failed} tuning trials failed (maxFailedTrialCount "
            f"{tune.tune_max_failed}); first error: "
            f"{next(r['error'] for r in rows if r['state'] == 'FAIL')}"
        )
    # Fewer trials than asked with the budget spent: the timeout stopped the study (a grid
    # sampler that ran out of points stops it too, but only once every point has run).
    grid_done = tune.tune_algorithm == "grid" and len(rows) >= grid_points(space)
    by_budget = budget is not None and len(rows) < total and elapsed >= budget and not grid_done
    if by_budget:
        progress.log(
            "tune", f"time budget {budget:g} s reached after {len(rows)} of {total} trials"
        )
    facts: dict[str, Any] = {
        "trials_run": len(rows),
        "time_budget_s": budget or 0.0,
        "stopped_by_time_budget": by_budget,
    }
    rows.sort(key=lambda r: r["number"])
    best = best_of(rows, goal)
    if best is None:
        states = ", ".join(f"{n} {s}" for s, n in _counts(rows).items()) or "none ran"
        errors = [r["error"] for r in rows if r["state"] == "FAIL"]
        facts["note"] = (
            f"no tuning trial completed ({states}); the train step uses the configured "
            "hyperparameters" + (f" (first error: {errors[0]})" if errors else "")
        )
        progress.log("tune", facts["note"])
        return {}, rows, facts
    if "folds" in best:
        facts["cv"] = {"folds": len(best["folds"]), "per_fold": best["folds"]}
        facts["cv"] |= folds.summary(best["folds"])
    return dict(best["params"]), rows, facts


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def grid_points(space: list[Param]) -> int:
    """How many points a grid over `space` (`for_algorithm(..., "grid")`) has."""
    return math.prod(len(p.values) for p in space)


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["state"]] = out.get(r["state"], 0) + 1
    return out


class _TrialFailed(Exception):
    """A trial that raised: recorded as FAIL, counted against maxFailedTrialCount."""


def best_of(trials: list[dict[str, Any]], goal: str) -> dict[str, Any] | None:
    done = [
        t
        for t in trials
        if t.get("state") == "COMPLETE" and t.get("value") is not None and math.isfinite(t["value"])
    ]
    if not done:
        return None
    return (max if goal == "maximize" else min)(done, key=lambda t: t["value"])
