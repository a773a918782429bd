"""The tabular network (`kubetrain.training.models.TabularNet`, ``model=tabular``): it
learns through the library's own `fit`, exports to ONNX as the compress stage does,
is deterministic for a seed, survives a bundle save/load, and passes one-hot
columns through un-embedded. Tiny tables, a few epochs: seconds on 2 cores."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from kubetrain.assessment.compression import compress, export_onnx, onnx_predict
from kubetrain.config.settings import HyperConfig, TrainConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import write_checksums
from kubetrain.data.datasets import Schema
from kubetrain.training.loop import fit
from kubetrain.training.models import (
    ModelSpec,
    TabularNet,
    TabularShape,
    build,
    load_model,
    predict_proba,
    save_model,
    spec_for,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 3
TABULAR = TrainConfig(model="tabular")
HYPER = HyperConfig(width=32, learning_rate=1e-2, batch_size=32)
NUMERIC = 4
LEVELS = 3  # one categorical column, one-hot encoded as the clean stage does
CATEGORICAL = list(range(NUMERIC, NUMERIC + LEVELS))


def _table(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardized numeric columns, then a one-hot block; the class is a half-plane
    over both kinds of column (category 2 moves the boundary), so it is separable."""
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(rows, NUMERIC)).astype(np.float32)
    level = rng.integers(0, LEVELS, rows)
    X = np.hstack([numeric, np.eye(LEVELS, dtype=np.float32)[level]])
    y = (numeric[:, 0] + numeric[:, 1] + 2 * (level == 2) > 1).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema(
        "table",
        [f"x{i}" for i in range(NUMERIC)] + [f"colour={i}" for i in range(LEVELS)],
        ["no", "yes"],
        extra={"categorical_columns": CATEGORICAL},
    )


@pytest.fixture(scope="module")
def trained(schema):
    """`fit` with model=tabular on 400 rows, validated on 200."""
    return fit(
        TABULAR, HYPER, SEED, _table(400, 0), _table(200, 1), schema, epochs=8, verbose=False
    )


def _spec(**tabular) -> ModelSpec:
    return ModelSpec(
        arch="tabular",
        num_features=NUMERIC + LEVELS,
        num_classes=2,
        width=16,
        dropout=0.1,
        class_names=["no", "yes"],
        categorical_columns=CATEGORICAL,
        tabular={**asdict(TabularShape()), **tabular},
    )


def _accuracy(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(model, X).argmax(1).numpy() == y).mean())


# --- learning ---------------------------------------------------------------------------


def test_tabular_learns_a_table_through_fit(trained):
    X, y = _table(200, 1)
    assert trained.spec.arch == "tabular"
    assert trained.metrics["val_accuracy"] > 0.85  # chance is 0.5
    # the reported metric is the returned model's, measured again from the outside
    assert _accuracy(trained.model, X, y) == pytest.approx(trained.metrics["val_accuracy"])
    assert not trained.model.training


def test_output_is_the_log_of_the_members_mean_probability():
    """softmax(output) is the average of the members' softmaxes (what is served)."""
    torch.manual_seed(0)
    model = build(_spec()).eval()
    X = torch.as_tensor(_table(16, 2)[0])
    with torch.no_grad():
        members = torch.softmax(model.member_logits(X), dim=-1)
        served = predict_proba(model, X)
    assert members.shape == (16, TabularShape().members, 2)
    torch.testing.assert_close(served, members.mean(dim=1))
    assert not torch.allclose(members[:, 0], members[:, 1])  # members differ from the start


# --- ONNX -------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exports_to_onnx_and_onnxruntime_matches_torch(trained, tmp_path, exporter):
    path = tmp_path / "model.onnx"
    assert export_onnx(trained.model, NUMERIC + LEVELS, path, exporter=exporter) == exporter
    for rows in (1, 37):  # the batch dimension stays dynamic
        X = _table(rows, 4)[0]
        reference = predict_proba(trained.model, X).numpy()
        np.testing.assert_allclose(onnx_predict(path, X), reference, atol=1e-4)


def test_compress_accepts_a_tabular_bundle(trained, tmp_path):
    """The whole compress stage: export, prune, int8, checks against PyTorch."""
    save_model(tmp_path / "model", trained.model, trained.spec)
    X, y = _table(200, 5)
    result = compress(tmp_path / "model", X, y, accuracy_budget=0.05, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert result["chosen"]


# --- determinism ------------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_model_different_seed_different_model(schema, trained):
    train, val = _table(400, 0), _table(200, 1)
    again = fit(TABULAR, HYPER, SEED, train, val, schema, epochs=8, verbose=False)
    other = fit(TABULAR, HYPER, SEED + 1, train, val, schema, epochs=2, verbose=False)
    assert _same_weights(trained.model, again.model)
    assert [r["val_loss"] for r in trained.history] == [r["val_loss"] for r in again.history]
    assert not _same_weights(trained.model, other.model)


# --- the bundle -------------------------------------------------------------------------


def test_spec_and_weights_survive_save_and_load(trained, tmp_path):
    save_model(tmp_path / "model", trained.model, trained.spec)
    saved = json.loads((tmp_path / "model" / "spec.json").read_text())
    assert saved["tabular"] == asdict(TabularShape())
    assert saved["categorical_columns"] == CATEGORICAL
    # column indices are rebuilt from the spec, not stored (save_model casts to float)
    weights = torch.load(tmp_path / "model" / "weights.pt", weights_only=True)
    assert "numeric" not in weights and "categorical" not in weights

    model, spec, _ = load_model(tmp_path / "model")
    assert spec == trained.spec
    assert isinstance(model, TabularNet)
    X = _table(50, 6)[0]
    torch.testing.assert_close(predict_proba(model, X), predict_proba(trained.model, X))


def test_a_bundle_rebuilds_its_own_shape_not_the_defaults(tmp_path):
    """A network saved with a non-default shape comes back with that shape."""
    spec = _spec(members=2, blocks=1, frequencies=4, embedding_dim=3)
    torch.manual_seed(0)
    model = build(spec).eval()
    save_model(tmp_path / "model", model, spec)
    loaded, _, _ = load_model(tmp_path / "model")
    assert loaded.head_weight.shape[0] == 2 and len(loaded.blocks) == 1
    X = _table(10, 7)[0]
    torch.testing.assert_close(predict_proba(loaded, X), predict_proba(model, X))


def test_bundles_from_before_the_tabular_network_still_load(tmp_path):
    """A spec.json without ``categorical_columns``/``tabular`` (an older MLP bundle)."""
    spec = ModelSpec("mlp", 5, 2, 8, 0.0, class_names=["a", "b"])
    save_model(tmp_path / "old", build(spec), spec)
    old = {k: v for k, v in asdict(spec).items() if k not in ("categorical_columns", "tabular")}
    (tmp_path / "old" / "spec.json").write_text(json.dumps(old))
    (tmp_path / "old" / "sha256.json").unlink()
    write_checksums(tmp_path / "old")
    _, loaded, _ = load_model(tmp_path / "old")
    assert loaded == spec


# --- categorical columns ----------------------------------------------------------------


def test_one_hot_columns_pass_through_and_numeric_ones_are_embedded(schema):
    spec = spec_for(schema, "tabular", 16, 0.0)
    assert spec.categorical_columns == CATEGORICAL
    model = build(spec)
    shape = TabularShape()
    assert model.embed.frequencies.shape == (NUMERIC, shape.frequencies)
    assert model.stem.in_features == NUMERIC * shape.embedding_dim + LEVELS


def test_the_one_hot_columns_are_what_the_network_sees(schema):
    """A class that only the category decides is learned (the columns reach the stem)."""
    X, _ = _table(300, 8)
    y = X[:, NUMERIC + 1].astype(np.int64)  # "is it level 1"
    Xv, _ = _table(150, 9)
    yv = Xv[:, NUMERIC + 1].astype(np.int64)
    result = fit(TABULAR, HYPER, SEED, (X, y), (Xv, yv), schema, epochs=4, verbose=False)
    assert result.metrics["val_accuracy"] > 0.95


def test_a_table_of_only_one_hot_columns_builds_and_exports(tmp_path):
    spec = ModelSpec("tabular", 3, 3, 8, 0.0, categorical_columns=[0, 1, 2])
    spec.tabular = asdict(TabularShape())
    torch.manual_seed(0)
    model = build(spec).eval()
    assert model.embed is None
    X = np.eye(3, dtype=np.float32)
    export_onnx(model, 3, tmp_path / "m.onnx")
    np.testing.assert_allclose(
        onnx_predict(tmp_path / "m.onnx", X), predict_proba(model, X).numpy(), atol=1e-4
    )


def test_a_stale_schema_is_refused(schema):
    stale = Schema("table", schema.feature_names[:5], schema.class_names, extra=schema.extra)
    with pytest.raises(KubetrainError, match="re-run clean"):
        spec_for(stale, "tabular", 16, 0.0)


def test_a_table_without_one_hot_columns_embeds_every_column():
    spec = _spec()
    spec.categorical_columns = []
    assert build(spec).stem.in_features == (NUMERIC + LEVELS) * TabularShape().embedding_dim
