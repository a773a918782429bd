"""Stage metadata stays small enough for KFP's command lines; user text in reports is inert."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kubetrain.data.clean import quality_report
from kubetrain.stages import METADATA_ITEMS, compact


def test_three_thousand_classes_travel_as_a_small_summary():
    counts = {f"class-{i}": i for i in range(3000)}
    meta = {
        "rows": 10,
        "classes": list(counts),
        "class_counts": counts,
        "splits": {"train": {"class_counts": counts}},
    }
    small = compact(meta)
    assert len(small["classes"]) == len(small["class_counts"]) == METADATA_ITEMS
    assert small["classes_total"] == small["class_counts_total"] == 3000
    assert small["splits"]["train"]["class_counts_total"] == 3000
    assert len(json.dumps(small)) < 10_000 < len(json.dumps(meta))


def test_class_names_in_the_quality_report_are_inert():
    stats = {
        "rows_in": 2,
        "duplicates_removed": 0,
        "impute": "median",
        "missing_values": 0,
        "outliers": "none",
        "features_out": 1,
        "scaling": "standard",
        "splits": {
            "train": {"rows": 2, "class_counts": {"<script>alert(1)</script>": 1, "a|b": 1}}
        },
    }
    report = quality_report(stats)
    assert "<script>" not in report and "&lt;script&gt;" in report
    assert "a\\|b" in report  # a pipe would split the table cell


@pytest.mark.integration
def test_the_stage_cli_loads_without_torch_or_matplotlib():
    """Every KFP step is a fresh process: ingest and clean must not pay torch's import
    (1.5 s here) or matplotlib's; the stages that train or draw load them themselves."""
    code = (
        "import sys, kubetrain.cli.stage; "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
