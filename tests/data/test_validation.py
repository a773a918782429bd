"""Data validation (statistics, schema, anomalies) on generated tables, through the real
ingest and clean: every anomaly kind, fatal vs handled, the report, and inf values that
must never reach training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.config.settings import CleanConfig, RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.clean import Preprocessor, clean, quality_report
from kubetrain.data.column_types import ColumnType, to_float
from kubetrain.data.datasets import LABEL, Schema, load_split, load_table, save_table
from kubetrain.data.ingest import ingest
from kubetrain.data.validation import (
    DISTINCT_CAP,
    TableProfile,
    leakage_anomalies,
    raise_fatal,
    rule_accuracy,
    skew,
    skew_anomalies,
    table_anomalies,
)
from kubetrain.stages import VALIDATION_FILE, clean_stage

SPLITS = ("train", "validation", "test")
NUMERIC = ColumnType("numeric")
CATEGORY = ColumnType("categorical")


def cfg(**changes) -> RunConfig:
    return RunConfig.from_flat(changes)


def noisy_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Features that do not give the label away (nothing should be flagged)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return pd.DataFrame(
        {
            "a": rng.normal(size=n) + 0.5 * y,
            "b": rng.normal(size=n),
            "color": rng.choice(["red", "green", "blue"], n),
            LABEL: np.where(y == 1, "yes", "no"),
        }
    )


def save(tmp_path: Path, frame: pd.DataFrame, extra: dict | None = None) -> str:
    path = tmp_path / "table"
    features = [c for c in frame.columns if c != LABEL]
    classes = sorted(frame[LABEL].unique())
    save_table(path, frame, Schema("table", features, classes, extra=extra or {}))
    return str(path)


def run_clean(tmp_path: Path, table_path: str, config: RunConfig | None = None):
    config = config or cfg()
    paths = [str(tmp_path / name) for name in SPLITS]
    meta = clean(table_path, *paths, config.clean, config.seed)
    return meta, {name: load_split(p) for name, p in zip(SPLITS, paths, strict=True)}


def kinds(meta: dict) -> dict[tuple[str, str], str]:
    """{(column, kind): severity} of the stage's anomalies."""
    return {(a["column"], a["kind"]): a["severity"] for a in meta["anomalies"]}


# --- inf -----------------------------------------------------------------------------


def test_to_float_reads_inf_as_missing():
    numbers = to_float(pd.Series([1.0, np.inf, -np.inf, np.nan]), "numeric")
    text = to_float(pd.Series(["1", "inf", "-Infinity", None]), "numeric_text")
    for values in (numbers, text):
        assert values[0] == 1.0 and np.isnan(values[1:]).all()


def test_inf_is_counted_filled_and_never_reaches_training(tmp_path):
    frame = noisy_frame()
    frame.loc[::7, "a"] = np.inf
    frame.loc[3::11, "b"] = -np.inf
    meta, splits = run_clean(tmp_path, save(tmp_path, frame))
    found = kinds(meta)
    assert found[("a", "infinite_values")] == "handled"
    assert found[("b", "infinite_values")] == "handled"
    stats = meta["validation"]["statistics"]
    assert stats["a"]["inf"] == int(np.isinf(frame["a"]).sum())
    assert np.isfinite(stats["a"]["max"]) and np.isfinite(stats["b"]["min"])
    for X, _, _ in splits.values():
        assert np.isfinite(X).all(), "inf or NaN reached a split"


def test_preprocessor_fit_ignores_inf():
    frame = pd.DataFrame({"a": [1.0, 2.0, np.inf, 3.0, -np.inf]})
    prep = Preprocessor(CleanConfig(), Schema("table", ["a"], ["x", "y"])).fit(frame)
    assert prep.params["fill"]["a"] == 2.0
    assert np.isfinite(prep.transform(frame)).all()


# --- types -----------------------------------------------------------------------------


def test_mixed_types_constant_and_all_missing_columns_are_handled(tmp_path):
    frame = noisy_frame()
    frame["amount"] = frame["a"].round(3).astype(str)
    frame.loc[[5, 50], "amount"] = ["n/a?", "unknown"]
    frame["const"] = 7.0
    frame["nothing"] = pd.Series([None] * len(frame), dtype=object)
    meta, _ = run_clean(tmp_path, save(tmp_path, frame))
    found = kinds(meta)
    assert found[("amount", "mixed_types")] == "handled"
    assert found[("const", "constant")] == "handled"
    assert found[("nothing", "all_missing")] == "handled"
    mixed = next(a for a in meta["anomalies"] if a["kind"] == "mixed_types")
    assert "'unknown'" in mixed["message"] and "treated as missing" in mixed["message"]
    stats = meta["validation"]["statistics"]
    assert stats["amount"]["type"] == "numeric_text" and "mean" in stats["amount"]
    assert stats["nothing"]["missing_pct"] == 100.0
    assert stats["color"]["distinct"] == 3
    assert [v for v, _ in stats["color"]["top"]] == sorted(
        ["red", "green", "blue"], key=lambda v: -(frame["color"] == v).sum()
    )


def test_distinct_values_are_exact_up_to_the_cap():
    col = pd.Series(np.arange(DISTINCT_CAP + 5, dtype=float))
    profile = TableProfile({"x": "numeric"})
    for part in np.array_split(np.arange(len(col)), 4):  # merged batch by batch
        profile.merge(profile.empty().add(pd.DataFrame({"x": col[part]})))
    assert profile.columns["x"].counts is None
    assert profile.columns["x"].count == len(col)
    small = TableProfile({"x": "numeric"}).add(pd.DataFrame({"x": [1.0, 1.0, 2.0]}))
    assert len(small.columns["x"].counts) == 2


# --- ingest: headers and labels --------------------------------------------------------


def write_csv(tmp_path: Path, rows: int = 60) -> Path:
    rng = np.random.default_rng(1)
    spellings = ["Yes", "yes ", " YES", "Yes", "no", "No ", "no"]
    lines = ["x,x,,feat,target"]
    for i in range(rows):
        label = spellings[i % len(spellings)]
        lines.append(f"{rng.normal():.4f},{rng.normal():.4f},{i % 5},{'ab'[i % 2]},{label}")
    path = tmp_path / "source.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_duplicate_and_empty_headers_and_label_variants_through_ingest(tmp_path):
    out = tmp_path / "table"
    meta = ingest(str(write_csv(tmp_path)), "", str(out))
    assert meta["classes"] == ["Yes", "no"]  # most frequent spelling of each
    assert sum(meta["class_counts"].values()) == 60
    frame, schema = load_table(out)
    assert set(frame[LABEL]) == {"Yes", "no"}
    assert [r["column"] for r in schema.extra["renamed_columns"]] == ["x.1", "Unnamed: 2"]

    clean_meta, splits = run_clean(tmp_path, str(out))
    found = kinds(clean_meta)
    assert found[("x.1", "duplicate_header")] == "handled"
    assert found[("Unnamed: 2", "empty_header")] == "handled"
    assert found[(LABEL, "label_case_variants")] == "handled"
    assert splits["train"][2].class_names == ["Yes", "no"]
    merged = next(a for a in clean_meta["anomalies"] if a["kind"] == "label_case_variants")
    assert "'YES'" in merged["message"] and "'Yes'" in merged["message"]


# --- leakage and skew ------------------------------------------------------------------


def test_a_copy_of_the_label_is_flagged_as_leakage(tmp_path):
    frame = noisy_frame(2_000)
    frame["leak"] = np.where(frame[LABEL] == "yes", 10.0, -10.0) + np.random.default_rng(2).normal(
        0, 0.1, len(frame)
    )
    frame["status"] = np.where(frame[LABEL] == "yes", "approved", "rejected")
    meta, _ = run_clean(tmp_path, save(tmp_path, frame))
    flagged = {c for (c, k), s in kinds(meta).items() if k == "leakage" and s == "warning"}
    assert flagged == {"leak", "status"}


def test_leakage_needs_a_balanced_label():
    y = np.r_[np.zeros(950, int), np.ones(50, int)]  # majority 95%: a rule says nothing
    col = pd.Series(y.astype(float))
    assert rule_accuracy(col, y, NUMERIC) == 1.0
    assert leakage_anomalies({"c": NUMERIC}, pd.DataFrame({"c": col}), y) == []


def test_no_leakage_or_skew_on_honest_features(tmp_path):
    meta, _ = run_clean(tmp_path, save(tmp_path, noisy_frame(2_000)))
    assert not [a for a in meta["anomalies"] if a["severity"] != "handled"]


def test_skew_measures():
    rng = np.random.default_rng(3)
    train = pd.Series(rng.normal(0, 1, 500))
    assert skew(train, pd.Series(rng.normal(0, 1, 500)), NUMERIC) < 0.2
    assert skew(train, pd.Series(rng.normal(2, 1, 500)), NUMERIC) == pytest.approx(2, abs=0.2)
    a = pd.Series(["x"] * 50 + ["y"] * 50)
    b = pd.Series(["x"] * 80 + ["y"] * 20)
    assert skew(a, b, CATEGORY) == pytest.approx(0.3)
    assert skew(a, a, CATEGORY) == 0.0
    assert skew(pd.Series([1.0] * 10), pd.Series([2.0] * 10), NUMERIC) is None  # no spread


def test_skew_anomalies_flag_drifted_columns_only():
    rng = np.random.default_rng(4)
    n = 300
    train = pd.DataFrame(
        {"steady": rng.normal(size=n), "drift": rng.normal(size=n), "c": ["x", "y"] * (n // 2)}
    )
    test = pd.DataFrame(
        {"steady": rng.normal(size=n), "drift": rng.normal(3, 1, n), "c": ["x"] * n}
    )
    types = {"steady": NUMERIC, "drift": NUMERIC, "c": CATEGORY}
    found = skew_anomalies(types, train, test)
    assert {a.column for a in found} == {"drift", "c"}
    assert all(a.severity == "warning" and a.kind == "train_test_skew" for a in found)
    assert skew_anomalies(types, train.iloc[:10], test.iloc[:10]) == []  # too few rows


# --- fatal -----------------------------------------------------------------------------


def test_fatal_anomalies_stop_the_stage_with_one_line():
    types = {"a": NUMERIC}
    profile = TableProfile.of_types(types).add(
        pd.DataFrame({"a": [np.inf, -np.inf, np.nan], LABEL: ["x", "y", "x"]})
    )
    found = table_anomalies(types, Schema("table", ["a"], ["x", "y"]), profile)
    assert [(a.kind, a.severity) for a in found] == [
        ("infinite_values", "handled"),
        ("no_usable_feature", "fatal"),
    ]
    with pytest.raises(KubetrainError) as info:
        raise_fatal(a.to_json() for a in found)
    assert "\n" not in str(info.value) and "no usable feature" in str(info.value)
    raise_fatal([found[0].to_json()])  # handled: nothing raised


def test_a_column_of_only_inf_stops_clean(tmp_path):
    frame = noisy_frame()[[LABEL]].assign(a=np.inf)
    frame.loc[::2, "a"] = -np.inf
    with pytest.raises(KubetrainError, match="no usable feature"):
        run_clean(tmp_path, save(tmp_path, frame))


# --- the stage and its report ----------------------------------------------------------


def test_clean_stage_writes_validation_json_and_the_report_section(tmp_path):
    frame = noisy_frame()
    frame.loc[::9, "b"] = np.inf
    frame["const"] = "same"
    table_path = save(tmp_path, frame)
    paths = [str(tmp_path / name) for name in SPLITS]
    report = tmp_path / "report.md"
    config = cfg()
    meta = clean_stage(table_path, *paths, str(report), config.clean, config.seed)
    assert "validation" not in meta  # too big for KFP metadata: it is a file
    assert {a["kind"] for a in meta["anomalies"]} == {"infinite_values", "constant"}
    result = json.loads((Path(paths[0]) / VALIDATION_FILE).read_text())
    assert set(result) == {"rows", "statistics", "schema", "anomalies"}
    assert result["schema"]["classes"] == ["no", "yes"]
    assert {c["name"] for c in result["schema"]["columns"] if c["dropped"]} == {"const"}
    X, _, schema = load_split(paths[0])  # the extra file does not upset the split
    assert np.isfinite(X).all()
    assert schema.extra["preprocessing"]["types"]["const"] == "constant"
    text = report.read_text()
    assert "## Data validation" in text
    assert "| b | numeric |" in text
    assert "- **handled** infinite_values: column 'b' has" in text


def test_report_renders_anomalies_alone():
    stats = {
        "rows_in": 1,
        "duplicates_removed": 0,
        "impute": "median",
        "missing_values": 0,
        "features_out": 1,
        "scaling": "standard",
        "outliers": "none",
        "splits": {"train": {"rows": 1, "class_counts": {"a": 1}}},
        "anomalies": [{"column": "c", "kind": "leakage", "severity": "warning", "message": "m"}],
    }
    text = quality_report(stats)
    assert "## Data validation" in text and "- **warning** leakage: m" in text
    assert "| column | type | missing %" not in text  # no statistics: no table


def test_an_engine_without_statistics_still_reports_what_the_schema_knows(tmp_path):
    """The Spark engine reads the table's Parquet files itself: its plan maps label
    variants to their class and reports the anomalies known without statistics."""
    from kubetrain.data.clean_stream import Plan

    out = tmp_path / "table"
    ingest(str(write_csv(tmp_path)), "", str(out))
    plan = Plan.of(str(out), CleanConfig())
    assert plan.index["YES"] == plan.index["yes"] == plan.index["Yes"]
    found = {(a["column"], a["kind"]) for a in plan.typed_anomalies()}
    assert found == {
        ("x.1", "duplicate_header"),
        ("Unnamed: 2", "empty_header"),
        (LABEL, "label_case_variants"),
    }
