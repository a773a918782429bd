"""`make bench-gpu` in its quick mode: the same code paths on a CPU, a few images."""

from __future__ import annotations

import json

from kubetrain.local import bench_gpu


def test_quick_mode_reports_both_loops_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench_gpu.main(["--quick", "--models", "lenet", "--images", "48", "--output", str(out)])
        == 0
    )
    results = json.loads(out.read_text())
    (case,) = results["cases"]
    assert case["model"] == "lenet-28x28x1" and case["shape"] == [1, 28, 28]
    for loop in ("stage", "stage_augmented", "raw"):
        assert case[loop]["img_s"] > 0 and case[loop]["compiled"] is False  # auto: CUDA only
    assert case["ratio"] == case["stage"]["img_s"] / case["raw"]["img_s"]
    assert results["ddp"]["skipped"]
    printed = capsys.readouterr().out
    assert "ratio" in printed and "DDP scaling: skipped" in printed
