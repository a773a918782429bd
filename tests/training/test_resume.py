"""kill -9 during training, then the same command: training resumes at the next epoch.

A real `kubetrain run` (kfp.local, task subprocesses) is killed with SIGKILL
once a few epochs are done; the same command then finds the checkpoint under
`runs/.checkpoints/<key of inputs and settings>` and must end with exactly the
weights of a training that was never interrupted (the train stage run by hand on
the same splits).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

# No tuning, no compression (a gate no model passes: exit 3): the test is about training.
TRAIN_FLAGS = ["--epochs", "30", "--patience", "100", "--width", "64", "--batch-size", "16"]
ARGS = ["--dataset", "breast_cancer", "--tune-trials", "0", "--min-accuracy", "1", *TRAIN_FLAGS]
GATE_FAILED = 3


def command(runs: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "kubetrain"), "run", "--runs-dir", str(runs), *ARGS]


def weights(runs: Path) -> dict[str, torch.Tensor]:
    import json

    summary = json.loads((runs / "latest" / "summary.json").read_text())
    return torch.load(Path(summary["artifacts"]["trained_model"]) / "weights.pt", weights_only=True)


def test_sigkill_then_same_command_resumes_with_identical_weights(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        command(runs),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    seen, deadline = [], time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"train \| epoch 3/30", line) or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and every kfp.local task process
    proc.wait(timeout=30)
    assert any("epoch 3/30" in line for line in seen), "".join(seen)[-3000:]

    again = subprocess.run(command(runs), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == GATE_FAILED, again.stdout[-3000:] + again.stderr
    resumed = re.search(r"resumed from checkpoint at epoch (\d+)", again.stdout)
    assert resumed and int(resumed.group(1)) >= 3, again.stdout[-3000:]
    assert "epoch 1/30" not in again.stdout  # it did not start over

    # The uninterrupted reference: the same train stage, by hand, on the same splits
    # (the pipeline's own cached augment and clean outputs), with no checkpoint at all.
    kfp_root = runs / ".kfp"
    train_split = next(kfp_root.glob("*/augment/augmented"))
    val_split = next(kfp_root.glob("*/clean/validation"))
    reference = tmp_path / "reference"
    straight = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetrain.cli.stage",
            "train",
            "--train-path",
            str(train_split),
            "--val-path",
            str(val_split),
            "--model-path",
            str(reference / "model"),
            "--metrics-path",
            str(reference / "m.json"),
            "--report-path",
            str(reference / "r.html"),
            *TRAIN_FLAGS,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "resumed" not in straight.stderr
    a = weights(runs)
    b = torch.load(reference / "model" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
