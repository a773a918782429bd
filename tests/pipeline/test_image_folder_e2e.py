"""End to end: a generated image folder through the real `kubetrain` CLI (kfp.local):
ingest decodes it, a ResNet trains, evaluate and compress (pruned int8 ONNX) take it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain.data.synthetic_images import generate_folder

pytestmark = pytest.mark.e2e


def test_image_folder_trains_a_resnet_and_compresses_it(tmp_path):
    folder = generate_folder(tmp_path / "shapes", images=300, size=16, seed=1)
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubetrain"),
            "run",
            "--runs-dir",
            str(runs),
            "--dataset",
            str(folder),
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
    # 300 images and 2 epochs prove the plumbing, not learning: 10 classes of shapes need
    # ~1,000+ images and 10+ epochs (tests/training/test_resnet.py checks that it learns)
    assert 0 <= summary["test_metrics"]["accuracy"] <= 1
