"""Evaluate stage library (`kubetrain.assessment.evaluation`): metrics against sklearn and hand
counts, the ROC curves the Kubeflow UI draws, the quality gate, and `evaluate` on a
real saved model and test split. No KFP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from kubetrain.assessment.evaluation import ROC_POINTS, compute_metrics, evaluate, gate, roc_curves
from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import Schema, save_split
from kubetrain.training.loop import fit
from kubetrain.training.models import save_model


def _proba(rng: np.random.Generator, y: np.ndarray, classes: int, signal: float) -> np.ndarray:
    """Noisy float32 softmax scores that lean towards the true class (like a model's)."""
    logits = rng.normal(size=(len(y), classes)) + signal * np.eye(classes)[y]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def _one_hot_scores(pred: np.ndarray, classes: int) -> np.ndarray:
    proba = np.full((len(pred), classes), 0.1 / (classes - 1), np.float32)
    proba[np.arange(len(pred)), pred] = 0.9
    return proba


# --- metrics --------------------------------------------------------------------------


def test_metrics_match_hand_counts():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = compute_metrics(y, _one_hot_scores(pred, 3), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per class: a P=1/2 R=1/2, b P=2/3 R=1, c P=1 R=1/2
    f1 = [0.5, 0.8, 2 / 3]
    assert [c["f1"] for c in m["per_class"]] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert [c["support"] for c in m["per_class"]] == [2, 2, 2]
    assert [c["class"] for c in m["per_class"]] == ["a", "b", "c"]
    assert m["test_rows"] == 6 and m["class_names"] == ["a", "b", "c"]


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=300)
    proba = _proba(rng, y, 4, signal=1.5)
    pred = proba.argmax(1)
    m = compute_metrics(y, proba, ["w", "x", "y", "z"])
    assert 0.4 < m["accuracy"] < 0.95  # a mix of right and wrong answers
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    )
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba), rel=1e-4)
    assert set(m["roc"]) == {"w", "x", "y", "z", "micro"}
    for k, name in enumerate(["w", "x", "y", "z"]):  # one-vs-rest AUC per class
        assert m["roc"][name]["auc"] == pytest.approx(skm.roc_auc_score(y == k, proba[:, k]))


def test_binary_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=200)
    proba = _proba(rng, y, 2, signal=1.0)
    m = compute_metrics(y, proba, ["neg", "pos"])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]))
    assert 0.5 < m["roc_auc"] < 1.0
    assert m["roc"]["pos"]["auc"] == pytest.approx(m["roc_auc"])


def test_roc_curves_are_thinned_and_well_formed():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=3000)
    proba = _proba(rng, y, 3, signal=0.8)
    full = skm.roc_curve(y == 0, proba[:, 0])[0]
    assert len(full) > ROC_POINTS  # so thinning really happens
    curves = roc_curves(y, proba, ["a", "b", "c"])
    assert set(curves) == {"a", "b", "c", "micro"}
    for _name, c in curves.items():
        fpr, tpr, thr = (np.array(c[k]) for k in ("fpr", "tpr", "thresholds"))
        assert 2 <= len(fpr) <= ROC_POINTS and len(fpr) == len(tpr) == len(thr)
        assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert np.all(np.isfinite(thr)) and thr.min() >= 0.0 and thr.max() <= 1.0
        assert np.all(np.diff(thr) <= 0)  # thresholds fall along the curve
        assert 0.5 < c["auc"] <= 1.0
    onehot = np.eye(3)[y]
    assert curves["micro"]["auc"] == pytest.approx(skm.roc_auc_score(onehot.ravel(), proba.ravel()))


def test_a_class_missing_from_the_test_split_does_not_crash():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=50)  # class "c" never occurs
    proba = _proba(rng, y, 3, signal=2.0)
    m = compute_metrics(y, proba, ["a", "b", "c"])
    # a class clean dropped as too rare has no test rows: averages are over the others
    expected_auc = np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in (0, 1)])
    assert m["roc_auc"] == pytest.approx(expected_auc)
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, proba.argmax(1), labels=[0, 1], average="macro", zero_division=0)
    )
    assert m["per_class"][2]["support"] == 0
    assert set(m["roc"]) == {"a", "b", "micro"}  # no curve for the absent class
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, proba.argmax(1)))
    assert np.array(m["confusion_matrix"]).shape == (3, 3)
    # binary with one class only: AUC undefined as well, still no crash
    one = compute_metrics(np.zeros(10, int), _proba(rng, np.zeros(10, int), 2, 2.0), ["neg", "pos"])
    assert one["roc_auc"] is None and one["accuracy"] == 1.0


def test_empty_test_split_is_a_user_error():
    with pytest.raises(KubetrainError, match="empty"):
        compute_metrics(np.zeros(0, int), np.zeros((0, 2), np.float32), ["a", "b"])


# --- gate -----------------------------------------------------------------------------


def test_gate_passes_at_or_above_the_minimum_and_fails_below():
    ok, reason = gate({"accuracy": 0.9}, 0.9)
    assert ok and "passed" in reason and "0.9000" in reason
    assert gate({"accuracy": 0.95}, 0.9)[0]
    ok, reason = gate({"accuracy": 0.8999}, 0.9)
    assert not ok
    assert "failed" in reason and "0.8999" in reason and "min_accuracy 0.9" in reason


# --- evaluate on artifacts ------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A small MLP trained on breast_cancer, saved as a bundle, and the saved test split."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_breast_cancer()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    mean, std = X_tr.mean(0), X_tr.std(0)
    X_tr, X_te = ((X_tr - mean) / std).astype(np.float32), ((X_te - mean) / std).astype(np.float32)
    schema = Schema("table", list(data.feature_names), list(data.target_names))
    cfg = RunConfig.from_flat({"width": 32, "learning_rate": 1e-2})
    result = fit(
        cfg.train, cfg.hyper, cfg.seed, (X_tr, y_tr), (X_te, y_te), schema, 5, verbose=False
    )
    torch.set_num_threads(previous)
    root = tmp_path_factory.mktemp("evaluate")
    save_model(root / "model", result.model, result.spec)
    save_split(root / "test", X_te, y_te, schema)
    short = Schema("table", list(data.feature_names)[:10], list(data.target_names))
    save_split(root / "short", X_te[:, :10], y_te, short)
    return root, X_te, y_te


def test_evaluate_passes_and_fails_the_gate(artifacts):
    root, X, y = artifacts
    passed = evaluate(str(root / "model"), str(root / "test"), min_accuracy=0.9)
    assert passed["gate"] == "pass" and "passed" in passed["gate_reason"]
    assert passed["accuracy"] > 0.9 and passed["test_rows"] == len(y)
    assert passed["stage"] == "evaluate" and passed["min_accuracy"] == 0.9
    assert passed["class_names"] == ["malignant", "benign"]
    assert 0.9 < passed["roc_auc"] <= 1.0
    assert sum(map(sum, passed["confusion_matrix"])) == len(y)
    exactly = evaluate(str(root / "model"), str(root / "test"), passed["accuracy"])
    assert exactly["gate"] == "pass"  # the minimum itself passes
    assert passed["accuracy"] < 1.0
    failed = evaluate(str(root / "model"), str(root / "test"), min_accuracy=1.0)
    assert failed["gate"] == "fail"
    assert "failed" in failed["gate_reason"] and "min_accuracy 1.0" in failed["gate_reason"]
    assert failed["accuracy"] == passed["accuracy"]


def test_evaluate_rejects_a_feature_count_mismatch(artifacts):
    root, _, _ = artifacts
    with pytest.raises(KubetrainError, match="10 features but the model expects 30"):
        evaluate(str(root / "model"), str(root / "short"), 0.9)


def test_evaluate_rejects_paths_that_are_not_artifacts(artifacts, tmp_path):
    root, _, _ = artifacts
    with pytest.raises(KubetrainError, match="no weights.pt"):
        evaluate(str(tmp_path), str(root / "test"), 0.9)
    with pytest.raises(KubetrainError, match="no arrays.npz"):
        evaluate(str(root / "model"), str(tmp_path), 0.9)


# --- streamed: a test split over the memory budget -----------------------------------


def _assert_same(streamed, whole, where="metrics"):
    """Equal up to float noise (1e-6): batch shapes change the last bits of a matmul."""
    if isinstance(whole, dict):
        assert set(streamed) == set(whole), where
        for key in whole:
            if key != "seconds":
                _assert_same(streamed[key], whole[key], f"{where}.{key}")
    elif isinstance(whole, list):
        assert len(streamed) == len(whole), where
        for i, (a, b) in enumerate(zip(streamed, whole, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(whole, float):
        assert streamed == pytest.approx(whole, abs=1e-6, nan_ok=True), where
    else:
        assert streamed == whole, where


def test_streamed_evaluation_gives_the_in_memory_metrics(artifacts, monkeypatch, capsys):
    from kubetrain.data import batches, shards

    root, X, y = artifacts
    schema = shards.read_schema(root / "test")
    shards.write(root / "sharded", X, y, schema, max_rows_per_shard=40)  # 5 shards
    monkeypatch.setattr(batches, "BATCH_BYTES", 30 * X.shape[1] * 4)  # batches of 30 rows
    whole = evaluate(str(root / "model"), str(root / "sharded"), 0.9, budget=10**9)
    assert "streaming" not in capsys.readouterr().out
    streamed = evaluate(str(root / "model"), str(root / "sharded"), 0.9, budget=1000)
    out = capsys.readouterr().out
    assert f"streaming: the test split ({len(y)} rows)" in out
    assert f"predicted {len(y)}/{len(y)} rows" in out
    _assert_same(streamed, whole)
    assert streamed["accuracy"] == whole["accuracy"] and streamed["test_rows"] == len(y)
    with pytest.raises(KubetrainError, match="10 features but the model expects 30"):
        evaluate(str(root / "model"), str(root / "short"), 0.9, budget=1000)
