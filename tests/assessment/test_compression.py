"""Compress stage: real tiny models trained on sklearn digits, exported, pruned,
quantized and measured with ONNX Runtime. Runs in a few seconds on 2 cores."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kubetrain.assessment import compression
from kubetrain.assessment.compression import (
    choose,
    compress,
    export_onnx,
    onnx_predict,
    verify_export,
)
from kubetrain.core.errors import KubetrainError
from kubetrain.training.models import ModelSpec, build, load_model, predict_proba, save_model

NUM_FEATURES = 64
CLASSES = [str(i) for i in range(10)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y
    )
    return X_train, X_test, y_train, y_test


def _train(spec: ModelSpec, X: np.ndarray, y: np.ndarray, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(Xt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model, X, y) -> float:
    return float((predict_proba(model, X).argmax(1).numpy() == y).mean())


@pytest.fixture(scope="module")
def mlp_case(digits, tmp_path_factory):
    """Standardized digits, MLP width 128: (bundle dir, X_test, y_test)."""
    X_train, X_test, y_train, y_test = digits
    mean, std = X_train.mean(0), X_train.std(0)
    std = np.where(std > 0, std, 1.0)  # constant pixels: avoid dividing by ~0
    scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    spec = ModelSpec(
        arch="mlp",
        num_features=NUM_FEATURES,
        num_classes=10,
        width=128,
        dropout=0.1,
        class_names=CLASSES,
    )
    model = _train(spec, scale(X_train), y_train, epochs=10)
    assert _accuracy(model, scale(X_test), y_test) > 0.9
    bundle = tmp_path_factory.mktemp("mlp") / "model"
    save_model(bundle, model, spec)
    return bundle, scale(X_test), y_test


@pytest.fixture(scope="module")
def cnn_case(digits, tmp_path_factory):
    """Digits scaled to [0, 1] as 1x8x8 images, SmallCNN: (bundle dir, X_test, y_test)."""
    X_train, X_test, y_train, y_test = digits
    spec = ModelSpec(
        arch="cnn",
        num_features=NUM_FEATURES,
        num_classes=10,
        width=64,
        dropout=0.1,
        image_shape=[1, 8, 8],
        class_names=CLASSES,
    )
    model = _train(spec, X_train / 16.0, y_train, epochs=8)
    assert _accuracy(model, X_test / 16.0, y_test) > 0.9
    bundle = tmp_path_factory.mktemp("cnn") / "model"
    save_model(bundle, model, spec)
    return bundle, (X_test / 16.0).astype(np.float32), y_test


@pytest.fixture(scope="module")
def empty_cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def compressed(mlp_case, cnn_case, tmp_path_factory, empty_cwd):
    """compress() of both models with the defaults, run from an empty cwd."""
    out = {}
    with contextlib.chdir(empty_cwd):
        for name, (bundle, X, y) in {"mlp": mlp_case, "cnn": cnn_case}.items():
            out_dir = tmp_path_factory.mktemp(f"{name}-compressed") / "out"
            result = compress(bundle, X, y, accuracy_budget=0.01, prune_amount=0.5, out_dir=out_dir)
            out[name] = (result, out_dir, bundle, X, y)
    return out


def _variant(result, name):
    return next(v for v in result["variants"] if v["name"] == name)


def _weights(path):
    """Weight matrices/kernels (rank >= 2 initializers) of an ONNX file."""
    return [
        numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if len(t.dims) >= 2
    ]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_fp32_onnx_matches_pytorch(compressed, arch):
    result, out_dir, bundle, X, y = compressed[arch]
    model, spec, _ = load_model(bundle)
    reference = predict_proba(model, X).numpy()
    probs = onnx_predict(out_dir / "fp32.onnx", X)
    assert np.array_equal(probs.argmax(1), reference.argmax(1))
    assert np.abs(probs - reference).max() < 1e-4
    fp32 = _variant(result, "fp32")
    assert fp32["max_abs_diff"] < 1e-4
    assert fp32["accuracy"] == pytest.approx(result["baseline_accuracy"])
    assert result["baseline_accuracy"] == pytest.approx(float((reference.argmax(1) == y).mean()))

    # graph contract: named input/output, dynamic batch, raw logits out
    session = ort.InferenceSession(str(out_dir / "fp32.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (
        (inp.name, outp.name)
        == (result["input_name"], result["output_name"])
        == ("features", "logits")
    )
    assert isinstance(inp.shape[0], str) and inp.shape[1] == spec.num_features
    for batch in (1, 3):
        logits = session.run(None, {"features": X[:batch]})[0]
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(
            logits, model(torch.from_numpy(X[:batch])).detach().numpy(), atol=1e-4
        )
    opsets = {o.domain: o.version for o in onnx.load(str(out_dir / "fp32.onnx")).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == result["onnx_opset"]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_pruning_zeroes_the_requested_share_of_weights(compressed, arch):
    result, out_dir, *_ = compressed[arch]
    pruned = _weights(out_dir / "pruned.onnx")
    zeros = sum(int(w.size - np.count_nonzero(w)) for w in pruned)
    total = sum(w.size for w in pruned)
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    dense = _weights(out_dir / "fp32.onnx")
    assert sum(int(w.size - np.count_nonzero(w)) for w in dense) / total < 0.01
    assert _variant(result, "pruned")["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    # zeros cost full width in the raw file; only compression turns them into savings
    v = {name: _variant(result, name) for name in compression.VARIANTS}
    assert v["pruned"]["bytes"] == pytest.approx(v["fp32"]["bytes"], rel=0.01)
    assert v["pruned"]["gzip_bytes"] < 0.75 * v["fp32"]["gzip_bytes"]
    assert v["pruned-int8"]["gzip_bytes"] < 0.85 * v["int8"]["gzip_bytes"]


@pytest.mark.parametrize("arch,int8_op", [("mlp", "MatMulInteger"), ("cnn", "ConvInteger")])
def test_int8_is_much_smaller_and_keeps_accuracy(compressed, arch, int8_op):
    result, out_dir, *_ = compressed[arch]
    fp32, int8 = _variant(result, "fp32"), _variant(result, "int8")
    assert int8["bytes"] < 0.4 * fp32["bytes"]
    assert int8["bytes"] == (out_dir / "int8.onnx").stat().st_size
    assert int8_op in {n.op_type for n in onnx.load(str(out_dir / "int8.onnx")).graph.node}
    assert int8["accuracy"] >= result["baseline_accuracy"] - 0.02
    for v in result["variants"]:
        assert 0 < v["cpu_latency_ms"] < 100 and math.isfinite(v["cpu_latency_ms"])
        assert 0 < v["gzip_bytes"] < v["bytes"]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_choice_respects_budget_and_is_smallest(compressed, arch):
    result, out_dir, *_ = compressed[arch]
    assert [v["name"] for v in result["variants"]] == list(compression.VARIANTS)
    floor = result["baseline_accuracy"] - result["accuracy_budget"] - 1e-9
    for v in result["variants"]:
        assert v["within_budget"] == (v["name"] == "fp32" or v["accuracy"] >= floor)
    chosen = _variant(result, result["chosen"])
    assert chosen["within_budget"]
    assert chosen["gzip_bytes"] == min(
        v["gzip_bytes"] for v in result["variants"] if v["within_budget"]
    )
    assert (out_dir / "model.onnx").read_bytes() == (out_dir / chosen["file"]).read_bytes()
    assert json.loads((out_dir / "compression.json").read_text()) == json.loads(json.dumps(result))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["compression.json", "model.onnx"] + [f"{n}.onnx" for n in compression.VARIANTS]
    )


def test_no_stray_files_in_cwd(compressed, empty_cwd):
    assert list(empty_cwd.iterdir()) == []


def _v(name, accuracy, gzip_bytes):
    return {"name": name, "accuracy": accuracy, "gzip_bytes": gzip_bytes}


def test_choose_picks_smallest_within_budget():
    variants = [
        _v("fp32", 0.97, 1000),
        _v("pruned", 0.965, 600),
        _v("int8", 0.95, 250),
        _v("pruned-int8", 0.94, 180),
    ]
    assert choose(variants, baseline=0.97, budget=0.03) == "pruned-int8"
    assert choose(variants, baseline=0.97, budget=0.02) == "int8"
    assert choose(variants, baseline=0.97, budget=0.01) == "pruned"
    assert choose(variants, baseline=0.97, budget=0.0) == "fp32"
    # exactly on the boundary counts, despite 0.97 - 0.01 != 0.96 in floats
    assert choose([_v("fp32", 0.97, 9), _v("int8", 0.96, 1)], 0.97, 0.01) == "int8"


def test_choose_falls_back_to_fp32_and_breaks_ties_by_order():
    # int8 variants lose accuracy, pruning too: only fp32 is left at budget 0
    variants = [
        _v("fp32", 0.90, 1000),
        _v("pruned", 0.89, 600),
        _v("int8", 0.50, 250),
        _v("pruned-int8", 0.40, 180),
    ]
    assert choose(variants, baseline=0.90, budget=0.0) == "fp32"
    # fp32 qualifies even if its measured accuracy dipped (a near-tie flip)
    assert choose([_v("fp32", 0.89, 1000), _v("int8", 0.5, 10)], 0.90, 0.0) == "fp32"
    assert choose([_v("fp32", 0.9, 100), _v("pruned", 0.9, 100)], 0.9, 0.0) == "fp32"
    with pytest.raises(ValueError):
        choose([_v("int8", 0.5, 10)], 0.9, 0.0)


def test_int8_that_loses_accuracy_is_rejected(mlp_case, tmp_path):
    """A huge-scale input column ruins per-tensor dynamic activation quantization:
    the other features all round to zero. The fp32 function is unchanged (the
    column's weights are scaled down by the same factor), so only int8 suffers."""
    bundle, X, y = mlp_case
    model, spec, _ = load_model(bundle)
    column, factor = int(np.argmax(X.std(0))), 1e4
    with torch.no_grad():
        model.net[0].weight[:, column] /= factor
    X_big = X.copy()
    X_big[:, column] *= factor
    save_model(tmp_path / "outlier", model, spec)

    strict = compress(
        tmp_path / "outlier",
        X_big,
        y,
        accuracy_budget=0.0,
        prune_amount=0.0,
        out_dir=tmp_path / "strict",
    )
    assert [v["name"] for v in strict["variants"]] == ["fp32", "int8"]  # prune 0: skipped
    int8 = _variant(strict, "int8")
    assert int8["accuracy"] < strict["baseline_accuracy"] - 0.1
    assert not int8["within_budget"]
    assert strict["chosen"] == "fp32"
    assert (tmp_path / "strict" / "model.onnx").read_bytes() == (
        tmp_path / "strict" / "fp32.onnx"
    ).read_bytes()

    lax = compress(
        tmp_path / "outlier",
        X_big,
        y,
        accuracy_budget=1.0,
        prune_amount=0.0,
        out_dir=tmp_path / "lax",
    )
    assert lax["chosen"] == "int8"


def _assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_wrong_feature_count_is_a_clear_error_and_writes_nothing(mlp_case, tmp_path):
    bundle, X, y = mlp_case
    parent = tmp_path / "artifacts"
    parent.mkdir()
    with pytest.raises(KubetrainError) as excinfo:
        compress(bundle, X[:, :30], y, out_dir=parent / "out")
    _assert_one_line_error(excinfo, "30", "64", "test split")
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"X": np.zeros((0, NUM_FEATURES), np.float32), "y": np.zeros(0, np.int64)}, "empty"),
        ({"accuracy_budget": -0.1}, "accuracy_budget"),
        ({"accuracy_budget": 1.5}, "accuracy_budget"),
        ({"accuracy_budget": float("nan")}, "accuracy_budget"),
        ({"prune_amount": 1.0}, "prune_amount"),
        ({"prune_amount": -0.5}, "prune_amount"),
        ({"y": np.zeros(3, np.int64)}, "rows"),
        ({"y": np.full(450, 10, np.int64)}, "classes"),
    ],
)
def test_bad_input_is_rejected_before_writing(mlp_case, tmp_path, kwargs, needle):
    bundle, X, y = mlp_case
    args = {"X": X, "y": y, **kwargs}
    assert len(X) == 450
    with pytest.raises(KubetrainError) as excinfo:
        compress(bundle, out_dir=tmp_path / "out", **args)
    _assert_one_line_error(excinfo, needle)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_no_partial_out_dir(mlp_case, tmp_path, monkeypatch):
    bundle, X, y = mlp_case

    def broken(src, dst):
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(compression, "quantize_int8", broken)
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        compress(bundle, X, y, out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verify_export_flags_mismatches():
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    assert verify_export(ref, ref + 1e-6) < 1e-4
    with pytest.raises(KubetrainError) as excinfo:
        verify_export(ref, ref + np.array([[1e-3, -1e-3, 0], [0, 0, 0]], np.float32))
    _assert_one_line_error(excinfo, "does not match PyTorch")
    with pytest.raises(KubetrainError):  # clear-margin class flip
        verify_export(ref, ref[:, [1, 0, 2]])
    tie = np.array([[0.50002, 0.49998, 0.0]], np.float32)
    verify_export(tie, tie[:, [1, 0, 2]])  # flip inside the tolerance: not an export fault


def test_dynamo_exporter_gives_the_same_contract(mlp_case, tmp_path):
    bundle, X, _ = mlp_case
    model, spec, _ = load_model(bundle)
    assert export_onnx(model, spec.num_features, tmp_path / "d.onnx", exporter="dynamo") == "dynamo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]  # no .data sidecar
    probs = onnx_predict(tmp_path / "d.onnx", X)
    assert verify_export(predict_proba(model, X).numpy(), probs) < 1e-4
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)


def test_latency_measurement_is_bounded(compressed):
    import time

    result, out_dir, *_ = compressed["cnn"]
    start = time.perf_counter()
    ms = compression.measure_latency(out_dir / "int8.onnx", NUM_FEATURES, max_seconds=0.05)
    assert time.perf_counter() - start < 2.0
    assert 0 < ms < 100


# --- streamed: a test split over the memory budget ------------------------------------


@pytest.fixture
def sharded_mlp(mlp_case, tmp_path, monkeypatch):
    """The MLP case's 450 test rows as 5 shards, streamed in batches of 100 rows (70
    rounded up to whole ONNX Runtime calls of 50 rows)."""
    from kubetrain.data import batches, shards
    from kubetrain.data.datasets import Schema

    bundle, X, y = mlp_case
    schema = Schema("table", [f"p{i}" for i in range(NUM_FEATURES)], CLASSES)
    shards.write(tmp_path / "test", X, y, schema, max_rows_per_shard=100)
    monkeypatch.setattr(batches, "BATCH_BYTES", 70 * NUM_FEATURES * 4)
    monkeypatch.setattr(compression, "ONNX_BATCH", 50)
    return bundle, X, y, str(tmp_path / "test")


def test_streamed_compression_picks_the_same_variant(sharded_mlp, tmp_path, capsys):
    bundle, X, y, test = sharded_mlp
    arrays = compress(bundle, X, y, accuracy_budget=0.01, prune_amount=0.5, out_dir=tmp_path / "a")
    whole = compression.compress_split(
        bundle, test, 0.01, 0.5, out_dir=tmp_path / "w", budget=10**9
    )
    assert "streaming" not in capsys.readouterr().out
    streamed = compression.compress_split(
        bundle, test, 0.01, 0.5, out_dir=tmp_path / "s", budget=1000
    )
    out = capsys.readouterr().out
    assert "streaming: the test split (450 rows)" in out and "scored 450/450 rows" in out
    for result in (whole, streamed):
        assert result["chosen"] == arrays["chosen"] and result["num_test"] == 450
        assert result["baseline_accuracy"] == arrays["baseline_accuracy"]
        for v, ref in zip(result["variants"], arrays["variants"], strict=True):
            assert v["name"] == ref["name"] and v["accuracy"] == ref["accuracy"]
            assert v["within_budget"] == ref["within_budget"]
            assert v["max_abs_diff"] == pytest.approx(ref["max_abs_diff"], abs=1e-6)
            assert v["bytes"] == ref["bytes"] and v["gzip_bytes"] == ref["gzip_bytes"]
    # int8 scores depend on the rows scored together, so the chunks are the same on
    # both paths: all figures come out the same
    assert [v["max_abs_diff"] for v in whole["variants"]] == [
        v["max_abs_diff"] for v in arrays["variants"]
    ]
    assert [v["max_abs_diff"] for v in streamed["variants"]][2:] == [
        v["max_abs_diff"] for v in arrays["variants"]
    ][2:]


def test_a_bad_streamed_split_is_refused_and_writes_nothing(sharded_mlp, tmp_path):
    from kubetrain.data import shards
    from kubetrain.data.datasets import Schema

    bundle, X, y, _ = sharded_mlp
    schema = Schema("table", [f"p{i}" for i in range(NUM_FEATURES)], CLASSES)
    X_bad = X.copy()
    X_bad[400, 3] = np.nan  # in the last shard: found while scoring, after the exports
    shards.write(tmp_path / "nan", X_bad, y, schema, max_rows_per_shard=100)
    out = tmp_path / "out"
    with pytest.raises(KubetrainError) as excinfo:
        compression.compress_split(bundle, tmp_path / "nan", out_dir=out, budget=1000)
    _assert_one_line_error(excinfo, "NaN")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan", "test"]
    short = Schema("table", [f"p{i}" for i in range(30)], CLASSES)
    shards.write(tmp_path / "short", X[:, :30], y, short, max_rows_per_shard=100)
    with pytest.raises(KubetrainError) as excinfo:
        compression.compress_split(bundle, tmp_path / "short", out_dir=out, budget=1000)
    _assert_one_line_error(excinfo, "30", "64", "test split")
    assert not out.exists()
