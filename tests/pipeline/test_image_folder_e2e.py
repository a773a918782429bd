"""End to end: a generated image folder in S3 (SeaweedFS) through the real `kubetrain`
CLI (kfp.local): ingest lists and decodes it from the bucket, a ResNet trains, evaluate
and compress take it, the bundle is published back to the bucket, and deploy decides
champion/challenger on the raw test images. (A local folder
differs only in listing, which tests/data/test_image_ingest.py checks against S3.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain.config.settings import HyperConfig
from kubetrain.core import storage
from kubetrain.data.synthetic_images import generate_folder
from kubetrain.serving.challenge import load_bundle

pytestmark = pytest.mark.e2e


def test_s3_image_folder_trains_a_resnet_compresses_and_publishes(tmp_path, s3_env):
    folder = generate_folder(tmp_path / "shapes", images=300, size=16, seed=1)
    storage.upload(folder, f"s3://{s3_env}/sets/shapes")
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubetrain"),
            "run",
            "--runs-dir",
            str(runs),
            "--dataset",
            f"s3://{s3_env}/sets/shapes/",
            "--publish-uri",
            f"s3://{s3_env}/models",
            "--model-name",
            "shapes",
            "--deploy",
            "--tune-trials",
            "0",
            "--epochs",
            "2",
            "--min-accuracy",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((runs / "latest" / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status.pop("tune") == "skipped"  # --tune-trials 0
    assert set(status.values()) == {"succeeded"}, status
    spec = json.loads((Path(summary["artifacts"]["trained_model"]) / "spec.json").read_text())
    assert spec["arch"] == "resnet" and spec["image_shape"] == [3, 16, 16]
    assert summary["compressed"]["format"] == "onnx" and summary["compressed"]["bytes"] > 0
    assert storage.is_published(summary["published"])
    # what the ResNet trained with: the image learning rate and batch (auto), no width
    image = HyperConfig().for_kind("image")
    best = summary["best_hyperparameters"]
    assert "width" not in best and best["batch_size"] == image.batch_size
    assert best["learning_rate"] == image.learning_rate
    card = storage.read_bytes(summary["published"].rstrip("/") + "/model_card.md").decode()
    assert f"- learning_rate: {image.learning_rate}" in card and "- width:" not in card
    # deploy ran after publish: locally the champion/challenger decision is recorded
    # (no earlier version of "shapes" is published, so the new model wins)
    assert "deploy" in status  # and succeeded, like every stage above
    assert "no model is served yet" in summary["deploy_decision"], summary["deploy_decision"]
    # the published bundle serves encoded images straight from the bucket
    predictor = load_bundle(summary["published"], "onnx")
    files = sorted(folder.glob("*/*.png"))[:4]
    out = predictor.predict_encoded([f.read_bytes() for f in files])
    assert len(out.labels) == 4 and set(out.labels) <= set(predictor.class_names)
    # 300 images and 2 epochs prove the plumbing, not learning: 10 classes of shapes need
    # ~1,000+ images and 10+ epochs (tests/training/test_resnet.py checks that it learns)
    assert 0 <= summary["test_metrics"]["accuracy"] <= 1
