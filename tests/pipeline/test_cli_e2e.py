"""End to end: the real `kubetrain` CLI running the whole pipeline through kfp.local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.datasets import load_breast_cancer

pytestmark = pytest.mark.e2e

# one validation split in trials (K-fold costs K fits; the regression run keeps it on)
FAST = [
    "--tune-trials",
    "2",
    "--tune-epochs",
    "2",
    "--epochs",
    "4",
    "--patience",
    "2",
    "--cv-folds",
    "0",
]
STAGES = ["ingest", "clean", "augment", "tune", "train", "evaluate", "compress"]


def kubetrain(runs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "kubetrain"), "run", "--runs-dir", str(runs), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def summary_of(runs: Path) -> dict:
    return json.loads((runs / "latest" / "summary.json").read_text())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    first = kubetrain(runs, *FAST)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    return runs, first, summary_of(runs)


def test_digits_run_trains_tunes_evaluates_and_compresses(digits_run):
    runs, proc, s = digits_run
    assert [st["name"] for st in s["stages"]] == STAGES
    assert all(st["status"] == "succeeded" for st in s["stages"]), s["stages"]
    assert s["test_metrics"]["accuracy"] >= 0.9
    assert 0.9 <= s["test_metrics"]["roc_auc"] <= 1.0
    assert set(s["best_hyperparameters"]) == {
        "learning_rate",
        "weight_decay",
        "dropout",
        "width",
        "batch_size",
    }
    assert isinstance(s["best_hyperparameters"]["width"], int)
    c = s["compressed"]
    assert c["format"] == "onnx" and c["bytes"] > 0 and c["cpu_latency_ms"] > 0
    assert c["accuracy"] >= c["baseline_accuracy"] - s["config"]["accuracy_budget"] - 1e-9
    for key in ("trained_model", "compressed_model", "report"):
        assert Path(s["artifacts"][key]).exists(), key
    report = Path(s["artifacts"]["report"]).read_text()
    # balance, augmentation, trials, curves, confusion matrix, roc, compression
    assert report.count("data:image/png;base64,") >= 7
    # progress reaches the console: stages, epochs, trials, and the closing table
    for text in ("ingest | started", "train | epoch 1/4", "tune | trial 1/2", "test metrics"):
        assert text in proc.stdout
    assert (runs / "latest").is_symlink()


def test_second_identical_run_is_served_from_cache(digits_run):
    runs, _, first = digits_run
    again = kubetrain(runs, *FAST)
    assert again.returncode == 0, again.stderr
    second = summary_of(runs)
    assert second["run_id"] != first["run_id"]
    assert all(st["status"] == "cached" for st in second["stages"]), second["stages"]
    assert second["test_metrics"] == first["test_metrics"]


def test_csv_file_with_tuning_skipped(tmp_path):
    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.rename(columns={"target": "diagnosis"})
    csv = tmp_path / "cancer.csv"
    frame.to_csv(csv, index=False)
    runs = tmp_path / "runs"
    proc = kubetrain(
        runs,
        "--dataset",
        str(csv),
        "--label-column",
        "diagnosis",
        "--tune-trials",
        "0",
        "--epochs",
        "5",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    s = summary_of(runs)
    tune = next(st for st in s["stages"] if st["name"] == "tune")
    assert tune["status"] == "skipped"
    assert s["dataset"]["rows"] == len(frame) and s["dataset"]["kind"] == "table"
    assert s["test_metrics"]["accuracy"] > 0.9
    # the configured values, their 0 (auto) resolved for a table
    assert s["config"]["learning_rate"] == s["config"]["batch_size"] == 0
    best = s["best_hyperparameters"]
    assert (best["learning_rate"], best["batch_size"]) == (2e-3, 64)
    assert best["dropout"] == s["config"]["dropout"]


def test_failed_quality_gate_skips_compression_and_exits_3(tmp_path):
    runs = tmp_path / "runs"
    proc = kubetrain(
        runs,
        "--dataset",
        "wine",
        "--tune-trials",
        "0",
        "--epochs",
        "1",
        "--learning-rate",
        "1e-6",
        "--min-accuracy",
        "0.99",
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr
    s = summary_of(runs)
    assert s["quality_gate"]["passed"] is False
    assert s["compressed"]["skipped"] is True and "quality gate failed" in s["compressed"]["reason"]
    assert s["artifacts"]["compressed_model"] is None
    assert "quality gate failed" in proc.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dataset", "no/such/file.csv"], "not found"),
        (["--epochs", "-1"], "epochs=-1 is out of range"),
        (["--tune-algorithm", "hyperband"], "is not supported; use one of"),
        (["--dataset", "{csv}", "--label-column", "nope"], "label column 'nope' not in"),
    ],
)
def test_bad_input_is_one_line_error_exit_2(tmp_path, args, expected):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n1,2,x\n3,4,y\n")
    args = [a.replace("{csv}", str(csv)) for a in args]
    proc = kubetrain(tmp_path / "runs", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def s3_ddp_run(tmp_path_factory, s3_env_module):
    """One run for two concerns (one pipeline instead of two): the dataset comes from S3
    and the bundle is published there, while tuning uses another Katib algorithm and
    the final training is DDP over two processes."""
    from kubetrain.core import storage

    s3_env = s3_env_module
    folder = tmp_path_factory.mktemp("s3-ddp")
    bunch = load_breast_cancer(as_frame=True)
    local_csv = folder / "cancer.csv"
    bunch.frame.to_csv(local_csv, index=False)
    storage.upload(local_csv, f"s3://{s3_env}/data/cancer.csv")
    runs = folder / "runs"
    proc = kubetrain(
        runs,
        "--dataset",
        f"s3://{s3_env}/data/cancer.csv",
        "--publish-uri",
        f"s3://{s3_env}/models",
        "--model-name",
        "cancer",
        "--nproc",
        "2",
        "--tune-algorithm",
        "cmaes",
        "--tune-trials",
        "2",
        "--tune-epochs",
        "2",
        "--epochs",
        "4",
        "--cv-folds",
        "0",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    return s3_env, summary_of(runs)


def test_s3_dataset_in_and_model_bundle_out(s3_ddp_run):
    """The whole pipeline against a real S3 server: ingest from s3://, publish to s3://."""
    from kubetrain.core import storage

    bucket, s = s3_ddp_run
    assert s["dataset"]["source"] == f"s3://{bucket}/data/cancer.csv"
    publish = next(st for st in s["stages"] if st["name"] == "publish")
    assert publish["status"] == "succeeded"
    versions = {u.split("/")[5] for u in storage.list_uris(f"s3://{bucket}/models/cancer/")}
    assert len(versions) == 1
    uri = f"s3://{bucket}/models/cancer/{versions.pop()}/"
    assert storage.is_published(uri) and s["published"] == uri
    assert s["dataset"]["content_hash"] in storage.read_bytes(uri + "model_card.md").decode()


def test_ddp_over_two_processes_with_another_katib_algorithm(s3_ddp_run):
    _, s = s3_ddp_run
    assert s["config"]["nproc"] == 2 and s["config"]["tune_algorithm"] == "cmaes"
    assert s["test_metrics"]["accuracy"] > 0.85
    info = json.loads((Path(s["artifacts"]["trained_model"]) / "info.json").read_text())
    assert info["metrics"]["processes"] == 2


def test_a_numeric_label_trains_a_regression_end_to_end(tmp_path):
    """A CSV whose label is a measurement: auto picks regression, clean stratifies on its
    quantiles, tuning maximizes R^2, the gate and compression judge R^2 and RMSE, and the
    report plots predicted against actual."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"size": rng.uniform(20, 200, 1200), "rooms": rng.integers(1, 6, 1200)})
    frame["city"] = rng.choice(["north", "south", "east"], 1200)
    frame["price"] = (
        2.5 * frame["size"]
        + 10 * frame.rooms
        + 40 * (frame.city == "north")
        + rng.normal(0, 5, 1200)
    )
    csv = tmp_path / "houses.csv"
    frame.to_csv(csv, index=False)
    runs = tmp_path / "runs"
    proc = kubetrain(
        runs, "--dataset", str(csv), "--label-column", "price", *FAST[:4], "--epochs", "15"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    s = summary_of(runs)
    assert s["task"] == "regression"
    assert all(st["status"] == "succeeded" for st in s["stages"]), s["stages"]
    m = s["test_metrics"]
    assert m["r2"] > 0.8 and 0 < m["mae"] <= m["rmse"]
    assert "validation_metrics" in s and s["validation_metrics"]["val_r2"] > 0.8
    assert s["quality_gate"]["passed"] and "test R^2" in s["quality_gate"]["reason"]
    c = s["compressed"]
    assert c["rmse"] <= c["baseline_rmse"] * (1 + s["config"]["error_budget"]) + 1e-9
    report = Path(s["artifacts"]["report"]).read_text()
    assert "Predicted vs actual" in report and "Validation R^2" not in proc.stdout
    # 1,200 rows: tuning cross-validated (5 folds), its figures beside the test's
    assert s["cross_validation"]["folds"] == 5 and "validation-r2_mean" in s["cross_validation"]
    assert "Cross-validation (best trial)" in report and "held-out test r2" in report
    assert "objective validation-r2 (maximize)" in proc.stdout  # the tuner's first line
    assert "val_r2" in proc.stdout and "R^2" in proc.stdout
