"""The gradient-boosting challenger (`kubetrain.training.challenger`): trained on the train
stage's splits, saved in the model bundle, scored by evaluate beside the network and
gated on the gap. Real models on small generated tables; no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubetrain.assessment.evaluation import evaluate, gate
from kubetrain.config.settings import RunConfig
from kubetrain.core.integrity import MANIFEST
from kubetrain.data import batches
from kubetrain.data.datasets import Schema, load_split, save_split
from kubetrain.stages import evaluate_stage, train_stage
from kubetrain.training import challenger

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 7
CLASSES = ["even", "odd"]


def xor_table(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two informative features whose signs XOR into the class, plus two of noise: trees
    split on it at once, a network needs epochs (so the gap has a known sign)."""
    X = np.random.default_rng(seed).uniform(-1, 1, size=(rows, 4)).astype(np.float32)
    return X, ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(np.int64)


SCHEMA = Schema("table", ["a", "b", "noise1", "noise2"], CLASSES)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("xor")
    paths = {}
    for name, rows, seed in (("train", 800, 0), ("validation", 200, 1), ("test", 300, 2)):
        save_split(root / name, *xor_table(rows, seed), SCHEMA)
        paths[name] = str(root / name)
    return paths


def fitted(splits: dict[str, str], **kw) -> challenger.Challenger:
    X, y, schema = load_split(splits["train"])
    Xv, yv, _ = load_split(splits["validation"])
    return challenger.fit_challenger(batches.of(X, y, schema), (Xv, yv), SEED, **kw)


def test_challenger_beats_chance_on_a_separable_table(splits):
    rival = fitted(splits)
    meta = rival.meta
    assert meta["challenger_val_accuracy"] > 0.9  # chance is 0.5
    assert 0 < meta["challenger_iterations"] <= challenger.MAX_ITER
    assert meta["challenger_train_rows"] == 800 and meta["challenger_sampled"] is False
    assert meta["challenger_seconds"] >= 0


def test_challenger_is_deterministic_for_a_seed(splits):
    X, _ = xor_table(100, 9)
    a, b = fitted(splits), fitted(splits)
    assert a.meta["challenger_iterations"] == b.meta["challenger_iterations"]
    np.testing.assert_array_equal(
        challenger.predict_proba(a.model, X, 2), challenger.predict_proba(b.model, X, 2)
    )


def test_time_limit_stops_adding_iterations(splits, capsys):
    rival = fitted(splits, time_limit_s=0.0)
    assert rival.meta["challenger_iterations"] == challenger.ROUND_ITERATIONS
    out = capsys.readouterr().out
    assert f"stopped at {challenger.ROUND_ITERATIONS} iterations by the time limit" in out


def test_images_and_switched_off_skip_with_a_note():
    images = Schema("image", [f"p{i}" for i in range(16)], CLASSES, image_shape=[1, 4, 4])
    X = np.zeros((20, 1, 4, 4), np.float32)
    y = np.arange(20) % 2
    skipped = challenger.train_beside(True, (X, y), images, "unused", (X, y), SEED)
    assert skipped.model is None
    assert skipped.meta == {
        "challenger_note": "skipped: image data (gradient boosting is a bar for tables)"
    }
    off = challenger.train_beside(False, (X, y), SCHEMA, "unused", (X, y), SEED)
    assert off.model is None and "off" in off.meta["challenger_note"]


def test_over_the_memory_budget_it_fits_a_stratified_sample(splits, monkeypatch, capsys):
    split = batches.streamed(splits["train"])
    Xv, yv, _ = load_split(splits["validation"])
    whole = challenger.fit_challenger(split, (Xv, yv), SEED, budget=10**9)  # streamed, fits
    assert whole.meta["challenger_train_rows"] == 800 and not whole.meta["challenger_sampled"]
    budget = challenger.held_bytes(split) // 4  # a sample of about 1/8 of the rows
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", str(budget))
    first = challenger.fit_challenger(split, (Xv, yv), SEED)
    again = challenger.fit_challenger(batches.streamed(splits["train"]), (Xv, yv), SEED)
    rows = first.meta["challenger_train_rows"]
    assert first.meta["challenger_sampled"] is True and 50 <= rows <= 150
    assert again.meta == {**first.meta, "challenger_seconds": again.meta["challenger_seconds"]}
    out = capsys.readouterr().out
    assert f"fitting on a stratified sample of {rows:,} of the training split's 800 rows" in out


def test_a_big_training_split_is_sampled_to_max_rows(splits, monkeypatch) -> None:
    monkeypatch.setattr(challenger, "MAX_ROWS", 300)
    Xv, yv, _ = load_split(splits["validation"])
    rival = challenger.fit_challenger(batches.streamed(splits["train"]), (Xv, yv), SEED)
    assert rival.meta["challenger_sampled"] is True
    assert 290 <= rival.meta["challenger_train_rows"] <= 300


# --- through the train and evaluate stages -------------------------------------------


def trained(splits: dict[str, str], out: Path, **settings) -> dict:
    cfg = RunConfig.from_flat({"width": 16, "batch_size": 32, "seed": SEED, **settings})
    out.mkdir(parents=True, exist_ok=True)
    return train_stage(
        splits["train"],
        splits["validation"],
        str(out / "model"),
        str(out / "metrics.json"),
        str(out / "report.html"),
        cfg.train,
        cfg.hyper,
        cfg.final,
        cfg.seed,
    )


@pytest.fixture(scope="module")
def weak_network(splits, tmp_path_factory) -> tuple[Path, dict]:
    """One epoch at a tiny learning rate: the network stays near chance on XOR."""
    out = tmp_path_factory.mktemp("weak")
    return out, trained(splits, out, epochs=1, learning_rate=1e-5)


def test_train_saves_the_challenger_and_evaluate_reports_it(splits, weak_network, tmp_path):
    out, meta = weak_network
    assert meta["challenger_val_accuracy"] > 0.9 and meta["challenger_seconds"] >= 0
    listed = json.loads((out / "model" / MANIFEST).read_text())["files"]
    assert challenger.FILENAME in listed  # checksummed with the weights
    assert "Gradient-boosting challenger" in (out / "report.html").read_text()

    gate_cfg = RunConfig().gate
    result = evaluate_stage(
        str(out / "model"),
        splits["test"],
        str(tmp_path / "evaluation.json"),
        str(tmp_path / "report.html"),
        gate_cfg,
    )
    rival = result["challenger"]
    assert rival["accuracy"] > 0.9 and 0.9 < rival["roc_auc"] <= 1
    assert {"macro_f1", "log_loss", "val_accuracy", "iterations"} <= set(rival)
    assert result["gap_to_challenger"] == pytest.approx(rival["accuracy"] - result["accuracy"])
    assert result["gap_to_challenger"] > 0.2  # the weak network is far behind
    report = (tmp_path / "report.html").read_text()
    assert "Network vs gradient boosting" in report
    assert json.loads((tmp_path / "evaluation.json").read_text())["challenger"] == rival


def test_the_gap_gate_fails_and_passes_as_configured(splits, weak_network):
    out, _ = weak_network
    model, test = str(out / "model"), splits["test"]
    failed = evaluate(model, test, min_accuracy=0.0, max_gap_to_baseline=0.02)
    gap = failed["gap_to_challenger"]
    assert failed["gate"] == "fail"
    assert failed["gate_reason"] == (
        f"quality gate failed: gradient boosting beats the network by {gap:.3f} "
        "> max_gap_to_baseline 0.02"
    )
    passed = evaluate(model, test, min_accuracy=0.0, max_gap_to_baseline=0.9)
    assert passed["gate"] == "pass" and "<= max_gap_to_baseline 0.9" in passed["gate_reason"]
    off = evaluate(model, test, min_accuracy=0.0)  # the default: not gated on the gap
    assert off["gate"] == "pass" and "gradient boosting" not in off["gate_reason"]


def test_a_bundle_without_challenger_evaluates_as_before(splits, tmp_path):
    meta = trained(splits, tmp_path, epochs=1, challenger=False)
    assert "challenger_val_accuracy" not in meta and "off" in meta["challenger_note"]
    assert not (tmp_path / "model" / challenger.FILENAME).exists()
    result = evaluate(str(tmp_path / "model"), splits["test"], 0.0, max_gap_to_baseline=0.02)
    assert "challenger" not in result and result["gate"] == "pass"
    assert "no gradient-boosting challenger to compare" in result["gate_reason"]


def test_gate_messages():
    assert gate({"accuracy": 0.95, "gap_to_challenger": 0.034}, 0.9, 0.02) == (
        False,
        "quality gate failed: gradient boosting beats the network by 0.034 "
        "> max_gap_to_baseline 0.02",
    )
    ok, reason = gate({"accuracy": 0.95, "gap_to_challenger": -0.01}, 0.9, 0.02)
    assert ok and "the network matches or beats gradient boosting (gap -0.010)" in reason
    ok, reason = gate({"accuracy": 0.8, "gap_to_challenger": 0.05}, 0.9, 0.02)
    assert not ok and reason.count(";") == 1 and "min_accuracy 0.9" in reason
    assert gate({"accuracy": 0.95, "gap_to_challenger": 0.5}, 0.9) == (
        True,
        "quality gate passed: test accuracy 0.9500 >= min_accuracy 0.9",
    )


def test_early_stopping_scores_a_bounded_sample_of_the_validation_split(monkeypatch) -> None:
    Xv = np.arange(50, dtype=np.float32).reshape(25, 2)
    yv = np.arange(25) % 2
    assert challenger.early_stopping_rows((Xv, yv), 1)[1] is yv  # small: all of it
    monkeypatch.setattr(challenger, "EARLY_STOPPING_ROWS", 10)
    X1, y1 = challenger.early_stopping_rows((Xv, yv), 1)
    X2, _ = challenger.early_stopping_rows((Xv, yv), 1)
    assert len(y1) == 10 and np.array_equal(X1, X2)  # deterministic for a seed
    rows = (X1[:, 0] / 2).astype(int)
    assert np.all(np.diff(rows) > 0) and np.array_equal(yv[rows], y1)  # real rows, in order
