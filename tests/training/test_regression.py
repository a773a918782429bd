"""Regression as a task: the objective, the network's output units, clean's splits of a
numeric label, evaluation, the gate, the challenger and compression."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kubetrain.assessment import compression, evaluation
from kubetrain.config.settings import CleanConfig, HyperConfig, TrainConfig
from kubetrain.data import shards
from kubetrain.data.clean import clean
from kubetrain.data.ingest import ingest
from kubetrain.training import challenger
from kubetrain.training.loop import fit
from kubetrain.training.models import load_model, save_model
from kubetrain.training.objective import Objective, r2

pytestmark = pytest.mark.unit


def test_r2_and_rmse_match_their_definitions_over_any_chunking() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, 500)
    pred = y + rng.normal(0, 3, 500)
    objective = Objective(regression=True, scale=10.0)
    chunks = [
        objective.sums(torch.tensor(pred[i : i + 64]), torch.tensor(y[i : i + 64]))
        for i in range(0, 500, 64)
    ]
    metrics = objective.score([sum(c[k] for c in chunks) for k in range(4)], 500)
    sse, sst = ((pred - y) ** 2).sum(), ((y - y.mean()) ** 2).sum()
    assert metrics["validation-r2"] == pytest.approx(1 - sse / sst)
    assert metrics["validation-rmse"] == pytest.approx(np.sqrt(sse / 500))
    # the loss is measured in units of the target's deviation: MSE / scale^2
    assert metrics["validation-loss"] == pytest.approx(sse / 500 / 100.0)
    assert (r2(0.0, 0.0), r2(1.0, 0.0)) == (1.0, 0.0)  # a constant target


def test_huber_pulls_less_than_mse_on_an_outlying_target() -> None:
    out, y = torch.tensor([0.0, 0.0]), torch.tensor([0.5, 10.0])
    mse = Objective(regression=True).loss(out, y, "none")
    huber = Objective(regression=True, huber=True).loss(out, y, "none")
    assert huber[0] == pytest.approx(mse[0] / 2)  # squared within one deviation
    assert huber[1] == pytest.approx(10.0 - 0.5)  # linear beyond it
    assert huber[1] < mse[1] / 10


def table(tmp_path, rows: int = 1500, seed: int = 0):
    """A numeric target of two numeric columns and a category, as a CSV."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "a": rng.normal(size=rows),
            "b": rng.uniform(-2, 2, rows),
            "kind": rng.choice(["x", "y", "z"], rows),
        }
    )
    frame["price"] = (
        1000
        + 300 * frame.a
        - 150 * frame.b**2
        + 200 * (frame.kind == "x")
        + rng.normal(0, 20, rows)
    )
    path = tmp_path / "prices.csv"
    frame.to_csv(path, index=False)
    return path, frame


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    path, frame = table(tmp)
    ingest(str(path), "price", str(tmp / "table"))
    meta = clean(
        str(tmp / "table"),
        str(tmp / "train"),
        str(tmp / "val"),
        str(tmp / "test"),
        CleanConfig(),
        7,
    )
    return tmp, frame, meta


def test_clean_stratifies_a_numeric_label_on_its_quantiles_and_records_the_target(splits):
    tmp, frame, meta = splits
    assert meta["task"] == "regression"
    assert sum(s["rows"] for s in meta["splits"].values()) == len(frame)
    X, y, schema = shards.read_all(tmp / "train")
    assert y.dtype == np.float32 and schema.task == "regression"
    # the scaler of the network's output is the training split's, exactly
    assert schema.extra["target"]["mean"] == pytest.approx(float(y.astype(np.float64).mean()))
    assert schema.extra["target"]["std"] == pytest.approx(float(y.astype(np.float64).std()))
    # every split spans the target's range alike: deciles of each within a few percent
    deciles = np.quantile(frame.price, np.linspace(0.1, 0.9, 9))
    for name in ("train", "val", "test"):
        _, part, _ = shards.read_all(tmp / name)
        share = np.bincount(np.searchsorted(deciles, part), minlength=10) / len(part)
        assert np.abs(share - 0.1).max() < 0.03, (name, share)


def test_the_network_learns_in_the_targets_units_and_evaluation_gates_on_r2(splits, tmp_path):
    tmp, _, _ = splits
    Xt, yt, schema = shards.read_all(tmp / "train")
    Xv, yv, _ = shards.read_all(tmp / "val")
    result = fit(TrainConfig(), HyperConfig(), 0, (Xt, yt), (Xv, yv), schema, 25)
    assert result.metrics["val_r2"] > 0.9 and "val_rmse" in result.metrics
    with torch.no_grad():  # predictions are prices, not standardized values
        pred = result.model(torch.as_tensor(Xv)).numpy()
    assert abs(pred.mean() - yv.mean()) < 0.1 * yv.std()
    save_model(tmp_path / "model", result.model, result.spec, {})
    model, spec, _ = load_model(tmp_path / "model")
    assert (spec.task, spec.num_classes) == ("regression", 1)
    rival = challenger.fit_challenger(challenger.batches.of(Xt, yt, schema), (Xv, yv), 0)
    assert rival.meta["challenger_val_r2"] > 0.9
    challenger.save(tmp_path / "model", rival)
    out = evaluation.evaluate(str(tmp_path / "model"), str(tmp / "test"), 0.99, min_r2=0.8)
    assert out["task"] == "regression" and out["gate"] == "pass", out["gate_reason"]
    assert out["rmse"] > 0 and out["mae"] <= out["rmse"]
    assert out["gap_to_challenger"] == pytest.approx(out["challenger"]["r2"] - out["r2"])
    assert len(out["points"]["actual"]) == len(out["points"]["predicted"]) == out["test_rows"]
    strict = evaluation.evaluate(str(tmp_path / "model"), str(tmp / "test"), 0.0, min_r2=0.9999)
    assert strict["gate"] == "fail" and "test R^2" in strict["gate_reason"]
    assert "min_r2 0.9999" in strict["gate_reason"]

    summary = compression.compress_split(
        tmp_path / "model", tmp / "test", out_dir=tmp_path / "onnx", error_budget=0.05
    )
    base = summary["baseline_rmse"]
    assert base == pytest.approx(out["rmse"], rel=1e-4)
    for v in summary["variants"]:
        assert v["within_budget"] == (v["name"] == "fp32" or v["rmse"] <= base * 1.05 + 1e-9)
    chosen = next(v for v in summary["variants"] if v["name"] == summary["chosen"])
    assert chosen["within_budget"] and "accuracy" not in chosen
    values = compression.onnx_predict(tmp_path / "onnx" / "fp32.onnx", Xv[:5])
    assert values.shape == (5, 1)  # the predicted prices, no softmax
    np.testing.assert_allclose(values[:, 0], pred[:5], rtol=1e-4, atol=1e-2)


def test_auto_picks_the_tabular_network_for_small_tables_and_it_regresses(splits) -> None:
    from kubetrain.training.models import AUTO_TABULAR_MAX_ROWS, choose_arch

    tmp, _, _ = splits
    Xt, yt, schema = shards.read_all(tmp / "train")
    assert choose_arch("auto", schema, len(yt)) == "tabular"
    assert choose_arch("auto", schema, AUTO_TABULAR_MAX_ROWS + 1) == "mlp"
    Xv, yv, _ = shards.read_all(tmp / "val")
    result = fit(TrainConfig(), HyperConfig(), 0, (Xt, yt), (Xv, yv), schema, 12)
    assert result.spec.arch == "tabular"
    assert result.metrics["val_r2"] > 0.9  # the members' mean value, not a softmax of one
