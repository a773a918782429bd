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

from kubetrain.assessment import compression, distill, tradeoff
from kubetrain.assessment.compression import (
    Extras,
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
def test_balanced_choice_is_the_smallest_no_slower_variant_within_budget(compressed, arch):
    result, out_dir, *_ = compressed[arch]
    assert [v["name"] for v in result["variants"]] == list(compression.VARIANTS)
    assert result["objective"] == "balanced"
    floor = result["baseline_accuracy"] - result["accuracy_budget"] - 1e-9
    fp32 = _variant(result, "fp32")
    assert fp32["speedup_b1"] == fp32["speedup_b64"] == 1.0
    for v in result["variants"]:
        assert v["within_budget"] == (v["name"] == "fp32" or v["accuracy"] >= floor)
        assert 0 < v["latency_b1_ms"] == v["cpu_latency_ms"]
        assert v["latency_b64_ms"] > 0
        assert v["ms_per_row_b64"] == pytest.approx(v["latency_b64_ms"] / 64, abs=1e-5)
    fast_enough = [
        v
        for v in result["variants"]
        if v["within_budget"] and tradeoff.slowdown(v, fp32) <= 1 + tradeoff.LATENCY_TOLERANCE
    ]
    chosen = _variant(result, result["chosen"])
    assert chosen in fast_enough
    assert chosen["gzip_bytes"] == min(v["gzip_bytes"] for v in fast_enough)
    # the front: no variant beats a Pareto-optimal one on every axis
    assert [v["pareto"] for v in result["variants"]] == tradeoff.pareto(result["variants"])
    assert any(v["pareto"] for v in result["variants"])
    assert (out_dir / "model.onnx").read_bytes() == (out_dir / chosen["file"]).read_bytes()
    assert json.loads((out_dir / "compression.json").read_text()) == json.loads(json.dumps(result))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["compression.json", "model.onnx"] + [f"{n}.onnx" for n in compression.VARIANTS]
    )


def test_no_stray_files_in_cwd(compressed, empty_cwd):
    assert list(empty_cwd.iterdir()) == []


def _v(name, accuracy, gzip_bytes):
    return {"name": name, "accuracy": accuracy, "gzip_bytes": gzip_bytes}


def choose(variants, baseline, budget):
    """The stage's size rule: the budget marked (`mark_within_budget`), the smallest
    kept (`tradeoff.choose` with objective ``size``)."""
    marked = [dict(v) for v in variants]
    compression.mark_within_budget(marked, baseline, budget)
    return tradeoff.choose(marked, "size")


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
        extras=Extras(objective="size"),
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
    session = compression._session(out_dir / "int8.onnx")
    batch = tradeoff.batch_of(np.zeros((1, NUM_FEATURES), np.float32), 1)
    ms = tradeoff.measure_latencies(
        {"int8": session}, batch, input_name="features", output_name="logits", max_seconds=0.05
    )["int8"]
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
    size = Extras(objective="size")  # the same figures give the same choice (no timing)
    arrays = compress(bundle, X, y, 0.01, 0.5, out_dir=tmp_path / "a", extras=size)
    whole = compression.compress_split(
        bundle, test, 0.01, 0.5, out_dir=tmp_path / "w", budget=10**9, extras=size
    )
    assert "streaming" not in capsys.readouterr().out
    streamed = compression.compress_split(
        bundle, test, 0.01, 0.5, out_dir=tmp_path / "s", budget=1000, extras=size
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


# --- latency-aware choice, static int8, distillation -----------------------------------


def _t(name, accuracy, gzip_bytes, b1, b64, within=True):
    return {
        "name": name,
        "accuracy": accuracy,
        "gzip_bytes": gzip_bytes,
        "latency_b1_ms": b1,
        "latency_b64_ms": b64,
        "within_budget": within,
    }


def test_each_objective_picks_its_variant():
    """The issue's case: int8 smallest but 3.8x slower at batch 1; a student smaller than
    fp32 and faster at both sizes; a static int8 faster at 64 rows, slower at one."""
    variants = [
        _t("fp32", 0.99, 1000, 0.010, 0.40),
        _t("pruned", 0.99, 600, 0.0105, 0.41),  # same graph: within the tolerance
        _t("int8", 0.99, 250, 0.038, 2.4),
        _t("int8-static", 0.985, 300, 0.012, 0.30),
        _t("student", 0.986, 400, 0.008, 0.18),
        _t("student-int8", 0.97, 100, 0.009, 0.15, within=False),
    ]
    assert tradeoff.choose(variants, "size") == "int8"
    assert tradeoff.choose(variants, "balanced") == "student"
    assert tradeoff.choose(variants, "latency") == "student"  # student-int8 is over budget
    variants[4]["within_budget"] = False
    assert tradeoff.choose(variants, "balanced") == "pruned"
    assert tradeoff.choose(variants, "latency") == "fp32"  # pruned is 5% slower, no faster
    with pytest.raises(ValueError):
        tradeoff.choose(variants, "fastest")
    with pytest.raises(ValueError):
        tradeoff.choose(variants[1:], "size")


def test_pareto_marks_the_variants_nothing_beats_on_every_axis():
    variants = [
        _t("fp32", 0.99, 1000, 0.0098, 0.39),  # 2% faster than pruned: timing noise
        _t("pruned", 0.99, 600, 0.010, 0.40),  # beats fp32: smaller, as fast within 10%
        _t("int8", 0.99, 250, 0.038, 2.4),  # smallest
        _t("slow", 0.98, 700, 0.020, 0.50),  # beaten by pruned on every axis
        _t("student", 0.95, 400, 0.008, 0.18),  # fastest
    ]
    assert tradeoff.pareto(variants) == [False, True, True, False, True]
    regression = [{k: v for k, v in d.items() if k != "accuracy"} for d in variants[:2]]
    regression[0]["rmse"], regression[1]["rmse"] = 1.0, 2.0  # lower is better
    assert tradeoff.pareto(regression) == [True, True]


def test_interleaved_latency_is_a_bounded_median(compressed):
    result, out_dir, *_ = compressed["cnn"]
    sessions = {n: compression._session(out_dir / f"{n}.onnx") for n in ("fp32", "int8")}
    rows = np.zeros((3, NUM_FEATURES), np.float32)
    batch = tradeoff.batch_of(rows, 64)
    assert batch.shape == (64, NUM_FEATURES) and batch.flags.c_contiguous
    ms = tradeoff.measure_latencies(
        sessions, batch, input_name="features", output_name="logits", max_seconds=0.01
    )
    assert set(ms) == {"fp32", "int8"} and all(0 < v < 1000 for v in ms.values())


def test_compress_objective_setting_is_checked():
    from kubetrain.config.settings import CompressConfig

    assert CompressConfig().compress_objective == "balanced"
    with pytest.raises(KubetrainError, match="compress_objective='fast'"):
        CompressConfig(compress_objective="fast")
    with pytest.raises(KubetrainError, match="distill_epochs"):
        CompressConfig(distill_epochs=-1)


@pytest.fixture(scope="module")
def with_training_rows(cnn_case, digits, tmp_path_factory, empty_cwd):
    """compress() of the digits CNN given its training rows: static int8 and a student."""
    from kubetrain.data.datasets import Schema

    bundle, X, y = cnn_case
    X_train, _, y_train, _ = digits
    schema = Schema("image", [f"p{i}" for i in range(NUM_FEATURES)], CLASSES, [1, 8, 8])
    rows = ((X_train / 16.0).astype(np.float32), y_train, schema)
    out_dir = tmp_path_factory.mktemp("cnn-trained") / "out"
    with contextlib.chdir(empty_cwd):
        result = compress(
            bundle,
            X,
            y,
            out_dir=out_dir,
            extras=Extras(train=rows, distill_epochs=2, seed=1),
        )
    return result, out_dir


def test_static_int8_and_student_are_built_measured_and_judged(with_training_rows, empty_cwd):
    result, out_dir = with_training_rows
    names = [v["name"] for v in result["variants"]]
    assert names == list(compression.VARIANTS) + list(compression.TRAINED_VARIANTS)
    assert result["calibration_rows"] == compression.CALIBRATION_ROWS
    assert result["not_built"] == {}
    # static int8: QDQ pairs around the conv layers, int8 kernels, calibrated ranges
    graph = onnx.load(str(out_dir / "int8-static.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "ConvInteger" not in ops
    kernels = [i for i in graph.initializer if len(i.dims) == 4]
    assert kernels and all(i.data_type == onnx.TensorProto.INT8 for i in kernels)
    static = _variant(result, "int8-static")
    assert static["accuracy"] >= result["baseline_accuracy"] - 0.03
    assert static["bytes"] < _variant(result, "fp32")["bytes"] / 2
    # the student: a smaller CNN, trained as recorded, scored like every variant
    record = result["distillation"]
    assert record["student"] == {"arch": "student-cnn", "width": 16}
    assert record["rows"] == 1347 and record["epochs"] == 2 and 1 <= record["best_epoch"] <= 2
    student = _variant(result, "student")
    assert student["bytes"] < _variant(result, "fp32")["bytes"] / 2
    assert student["accuracy"] > 0.5  # 2 epochs: learning, not necessarily within budget
    for v in result["variants"]:
        assert v["within_budget"] == (
            v["name"] == "fp32"
            or v["accuracy"] >= result["baseline_accuracy"] - result["accuracy_budget"] - 1e-9
        )
    assert (out_dir / "model.onnx").read_bytes() == (
        out_dir / f"{result['chosen']}.onnx"
    ).read_bytes()
    assert list(empty_cwd.iterdir()) == []


def test_distillation_loss_is_the_soft_and_hard_mix():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2])
    loss = distill.DistillLoss(teacher=teacher, labels=labels, temperature=2.0, alpha=0.7)
    rows = torch.tensor([0, 1])
    hard = torch.nn.functional.cross_entropy(teacher, labels)
    # a student that equals the teacher pays only the hard part
    assert float(loss.loss(teacher.clone(), rows)) == pytest.approx(0.3 * float(hard))
    worse = float(loss.loss(torch.zeros(2, 3), rows))
    assert worse > 0.3 * float(torch.nn.functional.cross_entropy(torch.zeros(2, 3), labels))
    # validation sums stay the plain cross-entropy on true labels
    assert loss.sums(teacher, labels)[1] == 1.0  # row 0 right, row 1 wrong
    regression = distill.DistillLoss(True, 2.0, teacher=torch.tensor([[1.0], [3.0]]))
    assert float(regression.loss(torch.tensor([1.0, 5.0]), rows)) == pytest.approx(0.5)


def test_student_specs_are_smaller_networks():
    table = ModelSpec("tabular", 20, 3, 128, 0.1, class_names=["a", "b", "c"])
    assert (distill.student_spec(table).arch, distill.student_spec(table).width) == ("mlp", 32)
    image = ModelSpec("resnet8", 3072, 10, 128, 0.1, image_shape=[3, 32, 32])
    student = build(distill.student_spec(image))
    teacher_params = sum(
        p.numel() for p in build(ModelSpec("cnn", 3072, 10, 128, 0.1, [3, 32, 32])).parameters()
    )
    assert sum(p.numel() for p in student.parameters()) < teacher_params / 4
    assert student(torch.zeros(2, 3072)).shape == (2, 10)


def test_training_rows_are_capped_by_a_stratified_sample(tmp_path, monkeypatch):
    from kubetrain.data import batches, shards
    from kubetrain.data.datasets import Schema

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5)).astype(np.float32)
    y = np.repeat(np.arange(3), 200)
    shards.write(
        tmp_path / "train",
        X,
        y,
        Schema("table", list("abcde"), ["x", "y", "z"]),
        max_rows_per_shard=100,
    )
    X_all, y_all, schema = distill.read_rows(tmp_path / "train", seed=0)
    assert len(X_all) == 600 and schema.num_classes == 3
    X_few, y_few, _ = distill.read_rows(tmp_path / "train", seed=0, max_rows=90)
    assert len(X_few) == 90 and np.bincount(y_few).tolist() == [30, 30, 30]
    X_bytes, _, _ = distill.read_rows(tmp_path / "train", seed=0, max_bytes=20 * 5 * 4)
    assert len(X_bytes) <= 21
    # a sample is streamed: the split is never loaded whole, however much memory is free
    loaded = []
    monkeypatch.setattr(batches, "load_split", lambda *a: loaded.append(a) or 1 / 0)
    X_streamed, _, _ = distill.read_rows(tmp_path / "train", seed=0, max_rows=90)
    assert not loaded and np.array_equal(X_streamed, X_few)


def test_an_epoch_repeats_small_splits_within_the_byte_bound():
    """Digits-sized rows repeat to MIN_EPOCH_ROWS; big images stop at MAX_BYTES of copies
    (224x224 rows were repeated to 4,096 rows, 2.4 GiB, whatever the split's size)."""
    digits = np.zeros((1347, 64), np.float32)
    assert len(digits) * distill.epoch_repeats(digits) >= distill.MIN_EPOCH_ROWS
    for rows in (1, 100, 445):
        big = np.zeros((rows, 3 * 224 * 224), np.float32)
        repeats = distill.epoch_repeats(big)
        assert repeats >= 1 and repeats * big.nbytes <= max(big.nbytes, distill.MAX_BYTES)
    assert distill.epoch_repeats(np.zeros((100, 3 * 224 * 224), np.float32)) == 4


def test_regression_student_fits_the_teachers_values():
    """A regression's student is an MLP fitted to the teacher's predictions (MSE)."""
    from kubetrain.data.datasets import Schema

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    target = {"mean": 10.0, "std": 3.0}
    spec = ModelSpec("mlp", 6, 1, 32, 0.0, task="regression", target=target)
    torch.manual_seed(0)
    teacher = build(spec).eval()
    y = predict_proba(teacher, X).numpy()[:, 0]  # the teacher is exact on these
    schema = Schema("table", list("abcdef"), [], extra={"target": target}, task="regression")
    made = distill.distill(
        teacher, spec, (X, y, schema), (X[:50], y[:50]), epochs=3, temperature=4.0, seed=0
    )
    assert made.spec.arch == "mlp" and made.spec.task == "regression"
    assert made.validation["validation-r2"] > 0.5


def test_report_shows_the_pareto_front(with_training_rows):
    from kubetrain import stages
    from kubetrain.report import plots

    result, _ = with_training_rows
    sections = stages.compression_sections(result, result["accuracy_budget"])
    front = next(s for s in sections if "Pareto" in s.title)
    assert front.images[0].startswith(plots.PNG_MAGIC)
    table = front.tables[0]
    assert [row["name"] for row in table] == [v["name"] for v in result["variants"]]
    assert [row["pareto"] for row in table] == [v["pareto"] for v in result["variants"]]
    assert sum(row["chosen"] for row in table) == 1
    assert any(s.title == "Distilled student" for s in sections)
    assert plots.compression_pareto([]) != front.images[0]  # "no data" figure, no error


def test_a_static_int8_graph_the_runtime_refuses_is_left_out(tmp_path):
    """The tabular network's per-column embeddings are a batched MatMul, whose per-channel
    int8 weights ONNX Runtime's QLinearMatMul refuses: that variant is noted, not fatal."""
    from dataclasses import asdict

    from kubetrain.data.datasets import Schema
    from kubetrain.training.models import TabularShape

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    spec = ModelSpec("tabular", 6, 2, 16, 0.0, class_names=["a", "b"])
    spec.tabular = asdict(TabularShape())
    torch.manual_seed(0)
    save_model(tmp_path / "model", build(spec).eval(), spec)
    schema = Schema("table", list("abcdef"), ["a", "b"])
    result = compress(
        tmp_path / "model",
        X[:60],
        y[:60],
        prune_amount=0.0,
        out_dir=tmp_path / "out",
        extras=Extras(train=(X[60:], y[60:], schema)),
    )
    assert "int8-static" not in [v["name"] for v in result["variants"]]
    assert "QLinearMatMul" in result["not_built"]["int8-static"]
    assert "\n" not in result["not_built"]["int8-static"]
    assert not (tmp_path / "out" / "int8-static.onnx").exists()


def test_a_regression_gets_a_student_judged_on_rmse(tmp_path):
    from kubetrain.data import shards
    from kubetrain.data.datasets import Schema

    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    target = {"mean": 10.0, "std": 3.0}
    spec = ModelSpec("mlp", 6, 1, 64, 0.0, task="regression", target=target)
    torch.manual_seed(0)
    teacher = build(spec).eval()
    y = predict_proba(teacher, X).numpy()[:, 0] + rng.normal(0, 0.1, 400).astype(np.float32)
    schema = Schema("table", list("abcdef"), [], extra={"target": target}, task="regression")
    for name, rows in (
        ("train", slice(0, 250)),
        ("val", slice(250, 300)),
        ("test", slice(300, 400)),
    ):
        shards.write(tmp_path / name, X[rows], y[rows], schema)
    save_model(tmp_path / "model", teacher, spec)
    result = compression.compress_split(
        tmp_path / "model",
        tmp_path / "test",
        out_dir=tmp_path / "out",
        train_path=tmp_path / "train",
        val_path=tmp_path / "val",
        extras=Extras(distill_epochs=1, objective="latency"),
    )
    names = [v["name"] for v in result["variants"]]
    assert "student" in names and result["distillation"]["student"]["arch"] == "mlp"
    assert result["objective"] == "latency" and "baseline_rmse" in result
    allowed = result["baseline_rmse"] * (1 + result["error_budget"]) + 1e-9
    for v in result["variants"]:
        assert v["within_budget"] == (v["name"] == "fp32" or v["rmse"] <= allowed)
    assert [v["pareto"] for v in result["variants"]] == tradeoff.pareto(result["variants"])
    assert result["chosen"] == tradeoff.choose(result["variants"], "latency")


def test_a_student_at_chance_is_recognised_for_a_restart():
    """`distill` restarts a student whose first epoch left it no better than a constant."""
    from kubetrain.training.objective import Objective

    y = np.array([0, 0, 0, 1, 2])  # the majority class is 60% of the rows
    classifier = Objective(False)
    assert distill._at_chance({"validation-accuracy": 0.6}, classifier, y)
    assert not distill._at_chance({"validation-accuracy": 0.8}, classifier, y)
    regression = Objective(True)
    assert distill._at_chance({"validation-r2": -0.1}, regression, y)
    assert not distill._at_chance({"validation-r2": 0.3}, regression, y)
