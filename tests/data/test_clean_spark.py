"""kubetrain.data.clean_spark: PySpark in local mode (for real) gives the local engine's
splits, class counts and fitted statistics, and fails with the local engine's one lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_clean_stream import SPLITS, assert_close, raw_frame, write_table

from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data import shards
from kubetrain.data.clean_spark import Routing, clean_spark, session
from kubetrain.data.clean_stream import clean_streaming
from kubetrain.data.datasets import LABEL, Schema, load_split, save_table

pytestmark = pytest.mark.integration  # a real Spark JVM and Python workers


@pytest.fixture(scope="module")
def spark(s3_env_module):
    """One local-mode session for the module, started after the S3 variables are set:
    Spark's Python workers inherit the environment the JVM started with."""
    return session(cores=2)


def sorted_rows(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows as a canonical set: the engines write the same rows in different orders."""
    both = np.column_stack([X, y]).astype(np.float64)
    return both[np.lexsort(both.T[::-1])]


def both_engines(tmp_path: Path, table: str, cfg, spark):
    out = {}
    for engine in ("local", "spark"):
        paths = [str(tmp_path / engine / name) for name in SPLITS]
        if engine == "local":
            meta = clean_streaming(table, *paths, cfg.clean, cfg.seed, batch_rows=97)
        else:
            meta = clean_spark(table, *paths, cfg.clean, cfg.seed, spark=spark)
        out[engine] = meta, {n: load_split(p) for n, p in zip(SPLITS, paths, strict=True)}
    return out["local"], out["spark"]


CASES = [
    {},
    {"impute": "mean", "outliers": "iqr", "outlier_action": "drop"},
    {"impute": "drop", "outliers": "zscore", "scaling": "minmax"},
    {"scaling": "robust", "outliers": "iqr"},
]


@pytest.mark.parametrize(
    "changes", CASES, ids=lambda c: "-".join(map(str, c.values())) or "default"
)
def test_spark_matches_the_local_engine(tmp_path: Path, spark, changes) -> None:
    table = write_table(tmp_path, raw_frame())
    cfg = RunConfig.from_flat({"seed": 11, **changes})
    (local, local_splits), (remote, spark_splits) = both_engines(tmp_path, table, cfg, spark)

    assert remote["engine"] == "spark"
    for key in ("rows_in", "duplicates_removed", "missing_values", "splits", "features_out"):
        assert remote[key] == local[key], key
    for key in ("rows_dropped_missing", "outliers_dropped", "outliers_clipped_rows"):
        assert remote.get(key) == local.get(key), key
    for name in SPLITS:
        X1, y1, schema1 = local_splits[name]
        X2, y2, schema2 = spark_splits[name]
        assert X1.shape == X2.shape
        np.testing.assert_allclose(sorted_rows(X1, y1), sorted_rows(X2, y2), rtol=1e-6, atol=1e-6)
        assert schema2.feature_names == schema1.feature_names
        assert_close(schema1.extra["preprocessing"], schema2.extra["preprocessing"])


def test_spark_types_and_encodes_columns_like_the_local_engine(tmp_path: Path, spark) -> None:
    """Dates (text, epoch, Arrow timestamps), names, free text, junk-laden numbers,
    booleans, IDs and an empty column: the same typing, params and rows on both engines."""
    from test_column_types import mixed_frame, save

    frame = mixed_frame(seed=2)
    frame.loc[[3, 30], "amount"] = np.nan
    frame.loc[[4, 40], "visited"] = None
    table = save(tmp_path, frame)
    cfg = RunConfig.from_flat(
        {"seed": 3, "outliers": "iqr", "column_types": "caseid=highcard", "drop_columns": "count"}
    )
    (local, local_splits), (remote, spark_splits) = both_engines(tmp_path, table, cfg, spark)
    for key in ("rows_in", "splits", "features_out", "column_types", "column_notes"):
        assert remote[key] == local[key], key
    assert local["column_types"]["seen"] == "datetime" and local["features_out"] > 100
    for name in SPLITS:
        X1, y1, schema1 = local_splits[name]
        X2, y2, schema2 = spark_splits[name]
        np.testing.assert_allclose(sorted_rows(X1, y1), sorted_rows(X2, y2), rtol=1e-6, atol=1e-6)
        assert schema2.feature_names == schema1.feature_names
        assert_close(schema1.extra["preprocessing"], schema2.extra["preprocessing"])


def test_spark_selects_the_features_the_local_engine_selects(tmp_path: Path, spark) -> None:
    """Cross products and the row sample merge across tasks: the same columns go, for
    the same reasons (mutual information included), and the splits hold the same rows."""
    from test_feature_selection import selection_frame, write

    table = write(tmp_path, selection_frame())
    cfg = RunConfig.from_flat({"seed": 7, "max_features": 3, "outliers": "zscore"})
    (local, local_splits), (remote, spark_splits) = both_engines(tmp_path, table, cfg, spark)
    assert local["features_dropped"] and remote["features_dropped"] == local["features_dropped"]
    for key in ("features_out", "features_selected", "features_encoded", "splits"):
        assert remote[key] == local[key], key
    for name in SPLITS:
        X1, y1, schema1 = local_splits[name]
        X2, y2, schema2 = spark_splits[name]
        assert schema2.feature_names == schema1.feature_names == ["x", "z", *COLOURS]
        assert schema2.extra["categorical_columns"] == schema1.extra["categorical_columns"]
        np.testing.assert_allclose(sorted_rows(X1, y1), sorted_rows(X2, y2), rtol=1e-6, atol=1e-6)
        assert_close(schema1.extra["preprocessing"], schema2.extra["preprocessing"])


COLOURS = ["colour=blue", "colour=green", "colour=red"]


def test_spark_reads_every_part_and_splits_are_complete_datasets(tmp_path: Path, spark) -> None:
    table = write_table(tmp_path, raw_frame(seed=3))
    paths = [str(tmp_path / name) for name in SPLITS]
    meta = clean_spark(table, *paths, RunConfig().clean, 5, spark=spark)
    for name, path in zip(SPLITS, paths, strict=True):
        manifest = shards.read_manifest(path)
        assert manifest["rows"] == meta["splits"][name]["rows"]
        assert all(s["name"].startswith("part-") for s in manifest["shards"])
        assert not list(Path(path).parent.glob(f".{name}.*"))  # no staging left behind
    assert "preprocessing" in shards.read_manifest(paths[0])["stats"]


def test_a_damaged_table_part_fails_with_one_line_naming_it(tmp_path: Path, spark) -> None:
    table = Path(write_table(tmp_path, raw_frame()))
    meta = json.loads((table / "meta.json").read_text())
    parts = meta["parts"]  # ingest's tables carry a sha256 per part
    victim = table / parts[0]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    paths = [str(tmp_path / name) for name in SPLITS]
    with pytest.raises(KubetrainError) as err:
        clean_spark(str(table), *paths, RunConfig().clean, 1, spark=spark)
    message = str(err.value)
    assert "\n" not in message and parts[0]["name"] in message and "sha256" in message
    assert not any(Path(p).exists() for p in paths)


def test_rare_classes_are_dropped_like_the_local_engine(tmp_path: Path, spark) -> None:
    frame = raw_frame()
    frame.loc[:3, "label"] = "rare"
    table = write_table(tmp_path, frame)
    meta_path = Path(table) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["class_names"] = [*meta["class_names"], "rare"]
    meta_path.write_text(json.dumps(meta))
    (local, _), (remote, _) = both_engines(tmp_path, table, RunConfig(), spark)
    assert remote["classes_dropped"] == local["classes_dropped"] == ["rare"]
    assert remote["rows_dropped_rare_classes"] == local["rows_dropped_rare_classes"] > 0
    assert remote["splits"] == local["splits"]


def test_routing_lookup_marks_unknown_rows() -> None:
    routing = Routing.of(np.array([9, 3, 5], np.uint64), np.array([2, 0, 1]))
    got = routing.lookup(np.array([3, 4, 5, 9, 10], np.uint64))
    assert got.tolist() == [0, -1, 1, 2, -1]
    assert Routing.of(np.empty(0, np.uint64), np.empty(0)).lookup(np.array([1], np.uint64))[0] == -1


def test_the_spark_driver_entrypoint_writes_splits_then_meta(tmp_path: Path, spark) -> None:
    from kubetrain.cli import spark_clean

    table = write_table(tmp_path, raw_frame())
    out = {name: str(tmp_path / "out" / name) for name in ("train", "validation", "test")}
    meta_path = tmp_path / "out" / "meta.json"
    argv = ["--table", table, "--meta", str(meta_path), "--seed", "4", "--impute", "mean"]
    for name, path in out.items():
        argv += [f"--{name}", path]
    assert spark_clean.main(argv) == 0
    meta = json.loads(meta_path.read_text())
    assert meta["impute"] == "mean" and meta["engine"] == "spark"
    assert shards.read_manifest(out["train"])["rows"] == meta["splits"]["train"]["rows"]
    assert spark_clean.main([*argv[:-2], "--test", str(tmp_path / "t"), "--impute", "bad"]) == 2


def test_spark_writes_splits_to_s3(tmp_path: Path, spark, s3_env_module) -> None:
    table = write_table(tmp_path, raw_frame())
    uris = [f"s3://{s3_env_module}/spark/{name}" for name in SPLITS]
    meta = clean_spark(table, *uris, RunConfig().clean, 2, spark=spark)
    local = [str(tmp_path / name) for name in SPLITS]
    clean_streaming(table, *local, RunConfig().clean, 2)
    for uri, path in zip(uris, local, strict=True):
        X1, y1, _ = load_split(path)
        X2, y2, _ = shards.read_all(uri)
        np.testing.assert_allclose(sorted_rows(X1, y1), sorted_rows(X2, y2), atol=1e-6)
    assert meta["splits"]["train"]["rows"] == shards.read_manifest(uris[0])["rows"]


def test_the_clean_stage_cli_runs_the_spark_engine(tmp_path: Path, spark, capsys) -> None:
    from kubetrain.cli import stage

    table = write_table(tmp_path, raw_frame())
    paths = {name: str(tmp_path / name) for name in ("train", "val", "test")}
    argv = ["clean", "--table-path", table, "--report-path", str(tmp_path / "report.md")]
    for name, path in paths.items():
        argv += [f"--{name}-path", path]
    assert stage.main([*argv, "--engine", "spark"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["engine"] == "spark"
    assert shards.read_manifest(paths["train"])["rows"] == meta["splits"]["train"]["rows"]
    assert "Data quality" in (tmp_path / "report.md").read_text()


def test_a_regression_splits_alike_on_both_engines(tmp_path: Path, spark) -> None:
    """A numeric label: the same quantile-stratified routing, float targets and training
    target moments (the network's output scale) on Spark as locally."""
    frame = raw_frame()
    rng = np.random.default_rng(1)
    frame[LABEL] = [
        repr(float(v)) for v in 10 * np.nan_to_num(frame.x1) + rng.normal(size=len(frame))
    ]
    path = tmp_path / "table"
    save_table(path, frame, Schema("table", ["x1", "x2", "cat"], [], task="regression"))
    cfg = RunConfig.from_flat({"seed": 5})
    (local, local_splits), (remote, spark_splits) = both_engines(tmp_path, str(path), cfg, spark)
    assert local["task"] == remote["task"] == "regression"
    assert remote["splits"].keys() == local["splits"].keys()
    for name in local["splits"]:
        a, b = local["splits"][name]["target"], remote["splits"][name]["target"]
        assert a["count"] == b["count"] and a["mean"] == pytest.approx(b["mean"], rel=1e-9)
    for name in SPLITS:
        X1, y1, schema1 = local_splits[name]
        X2, y2, schema2 = spark_splits[name]
        assert y1.dtype == y2.dtype == np.float32
        np.testing.assert_allclose(sorted_rows(X1, y1), sorted_rows(X2, y2), rtol=1e-6, atol=1e-6)
        assert schema1.extra["target"] == pytest.approx(schema2.extra["target"], rel=1e-9)
