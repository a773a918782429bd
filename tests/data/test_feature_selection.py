"""kubetrain.data.feature_selection: on a real generated table, the clean drops constant,
near-constant, duplicate, correlated and (with --max-features) uninformative encoded
columns with the right reasons, keeps one-hot groups whole, writes splits whose width
and schema describe the kept columns, and selects alike whatever the batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.clean import Preprocessor, clean, quality_report
from kubetrain.data.clean_stream import clean_streaming
from kubetrain.data.datasets import LABEL, Schema, load_split, save_table
from kubetrain.data.feature_selection import (
    MAX_CORRELATION_WIDTH,
    CoMoments,
    RowSample,
    SelectionStats,
    select,
)

SPLITS = ("train", "validation", "test")
CLASSES = ["a", "b"]
N = 6000


def selection_frame(n: int = N, seed: int = 0) -> pd.DataFrame:
    """Two informative numbers and an informative category, then what selection should
    drop: a copy of x, x plus a little noise (r = 0.99), a value in 3 rows of 6000, a
    date within one year and without a time (constant year and hour parts), and noise:
    a number and a category."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=n) + y
    sigma = np.sqrt(x.var() * (1 / 0.99**2 - 1))
    rare = np.zeros(n)
    rare[[10, 2000, 4000]] = 2.5
    day = pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 360, n), unit="D")
    return pd.DataFrame(
        {
            "x": x,
            "x_copy": x,
            "x_near": x + rng.normal(size=n) * sigma,
            "z": rng.normal(size=n) + 0.8 * y,
            "noise": rng.normal(size=n),
            "rare": rare,
            "colour": np.where(rng.random(n) < 0.8, np.where(y == 1, "red", "blue"), "green"),
            "shade": rng.choice(["light", "mid", "dark"], n),
            "day": day.strftime("%Y-%m-%d"),
            LABEL: np.asarray(CLASSES)[y],
        }
    )


def write(tmp_path: Path, frame: pd.DataFrame) -> str:
    path = tmp_path / "table"
    features = [c for c in frame.columns if c != LABEL]
    save_table(path, frame, Schema(kind="table", feature_names=features, class_names=CLASSES))
    return str(path)


def run(tmp_path: Path, table: str, tag: str, batch_rows: int | None = None, **changes):
    """The clean (in memory, or streamed in ``batch_rows`` batches): (metadata, splits)."""
    cfg = RunConfig.from_flat({"seed": 7, **changes})
    paths = [str(tmp_path / tag / name) for name in SPLITS]
    if batch_rows is None:
        meta = clean(table, *paths, cfg.clean, cfg.seed)
    else:
        meta = clean_streaming(table, *paths, cfg.clean, cfg.seed, batch_rows=batch_rows)
    return meta, {name: load_split(p) for name, p in zip(SPLITS, paths, strict=True)}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("selection"), selection_frame())


@pytest.fixture(scope="module")
def full(table, tmp_path_factory):
    """The clean with selection switched off: every encoded column."""
    out = tmp_path_factory.mktemp("full")
    return run(out, table, "full", feature_selection=False)


@pytest.fixture(scope="module")
def selected(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("selected")
    return run(out, table, "selected", max_features=3)


def reasons(meta) -> dict[str, str]:
    return {d["feature"]: d["reason"] for d in meta["features_dropped"]}


def test_the_right_columns_go_for_the_right_reasons(selected) -> None:
    why = reasons(selected[0])
    for name in ("day:year", "day:hour_sin", "day:hour_cos"):
        assert why.pop(name) == "constant"
    assert why.pop("rare").startswith("near-constant (one value in 99.9")
    assert why.pop("x_copy") == "duplicate of x"
    assert why.pop("x_near") == "correlated with x (r=+0.990)"
    uninformative = {"noise", "shade=dark", "shade=light", "shade=mid"}
    uninformative |= {f"day:{p}" for p in ("days", "month_sin", "month_cos", "dow_sin", "dow_cos")}
    assert set(why) == uninformative
    assert all(r.startswith("not among the 3 most informative columns") for r in why.values())
    assert selected[0]["features_selected"] == selected[0]["features_out"] == 5


def test_one_hot_groups_are_kept_or_dropped_whole(selected) -> None:
    why = reasons(selected[0])
    shade = {why[f"shade={v}"] for v in ("dark", "light", "mid")}
    assert len(shade) == 1  # one reason, one rank: the group went as one
    names = selected[1]["train"][2].feature_names
    assert names == ["x", "z", "colour=blue", "colour=green", "colour=red"]


def test_splits_hold_exactly_the_kept_columns_scaled_as_before(selected, full) -> None:
    meta, splits = selected
    full_meta, full_splits = full
    full_names = full_splits["train"][2].feature_names
    assert full_meta["features_dropped"] == [] and full_meta["features_out"] == len(full_names)
    assert meta["features_encoded"] == len(full_names) == full_meta["features_encoded"]
    for name in SPLITS:
        X, y, schema = splits[name]
        X_all, y_all, _ = full_splits[name]
        kept = [full_names.index(f) for f in schema.feature_names]
        assert X.shape[1] == len(schema.feature_names) == meta["features_out"]
        np.testing.assert_array_equal(y, y_all)
        # bounds and scaler are fitted on every encoded column and sliced: same values
        np.testing.assert_allclose(X, X_all[:, kept], rtol=1e-6, atol=1e-6)
        assert schema.extra["categorical_columns"] == [2, 3, 4]  # the colour group
        params = schema.extra["preprocessing"]
        assert params["selected"] == kept
    assert "selected" not in full_splits["train"][2].extra["preprocessing"]


def test_unsupervised_steps_alone_keep_every_informative_and_noise_column(table, tmp_path):
    meta, splits = run(tmp_path, table, "default")
    assert set(reasons(meta)) == {"day:year", "day:hour_sin", "day:hour_cos", "rare"} | {
        "x_copy",
        "x_near",
    }
    assert "noise" in splits["train"][2].feature_names
    assert "shade=mid" in splits["train"][2].feature_names


def test_in_memory_and_streamed_cleans_select_identically(selected, table, tmp_path) -> None:
    meta, splits = selected
    streamed, streamed_splits = run(tmp_path, table, "stream", batch_rows=97, max_features=3)
    assert streamed["features_dropped"] == meta["features_dropped"]
    for name in SPLITS:
        X1, y1, schema1 = splits[name]
        X2, y2, schema2 = streamed_splits[name]
        assert schema2.feature_names == schema1.feature_names
        assert (
            schema2.extra["preprocessing"]["selected"]
            == (schema1.extra["preprocessing"]["selected"])
        )
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_allclose(X1, X2, rtol=1e-6, atol=1e-6)


def test_switched_off_everything_is_kept(full) -> None:
    meta, splits = full
    names = splits["train"][2].feature_names
    assert {"x_copy", "x_near", "rare", "day:year", "noise", "shade=mid"} <= set(names)
    assert meta["features_selected"] == meta["features_encoded"] == len(names)


def test_the_quality_report_lists_what_was_dropped_and_why(selected) -> None:
    text = quality_report(selected[0])
    section = text.split("## Feature selection", 1)[1]
    assert "Kept 5 of " in section
    assert "| x_copy | duplicate of x |" in section
    assert "| day:year | constant |" in section


def test_params_without_a_selection_transform_every_column() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "c": ["p", "q", "p", "q"]})
    prep = Preprocessor(RunConfig().clean, Schema("table", ["a", "c"], CLASSES)).fit(frame)
    assert "selected" not in prep.params and prep.feature_names() == ["a", "c=p", "c=q"]
    full = prep.transform(frame)
    prep.params["selected"] = [0, 2]
    assert prep.feature_names() == ["a", "c=q"] and prep.encoded_names() == ["a", "c=p", "c=q"]
    np.testing.assert_array_equal(prep.transform(frame), full[:, [0, 2]])
    assert prep.sources() == ["a", "c", "c"]


def test_cross_products_and_row_samples_merge_exactly_in_any_order() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 4)) + 1e6  # large means: no cancellation from raw sums
    X[:, 1] = X[:, 0] * 2 + rng.normal(size=500) * 0.1
    keys = rng.permutation(np.arange(500, dtype=np.uint64) * 7919)
    parts = [(X[i : i + 37], keys[i : i + 37]) for i in range(0, 500, 37)]
    whole, merged = CoMoments(4), CoMoments(4)
    whole.add(X)
    for part, _ in reversed(parts):
        one = CoMoments(4)
        one.add(part)
        merged = merged.merge(one)
    np.testing.assert_allclose(merged.correlation(), np.corrcoef(X.T), atol=1e-9)
    np.testing.assert_allclose(merged.correlation(), whole.correlation(), atol=1e-12)
    sample = RowSample(50, rows=np.empty((0, 4)))
    for part, k in parts[::-1]:
        sample = sample.merge(RowSample.of(part, k, 50))
    order = np.argsort(keys)[:50]
    np.testing.assert_array_equal(sample.keys, keys[order])
    np.testing.assert_array_equal(sample.rows, X[order])


def test_a_very_wide_matrix_skips_the_correlation_step_with_a_note() -> None:
    width = MAX_CORRELATION_WIDTH + 1
    stats = SelectionStats(width)
    X = np.random.default_rng(2).normal(size=(20, width))
    stats.add(X, np.arange(20, dtype=np.uint64))
    assert stats.co is None
    moments = CoMoments(width)  # count and mean; std from its diagonal
    moments.add(X)
    moments.std = np.sqrt(np.diag(moments.cross) / moments.count)
    names = [f"f{j}" for j in range(width)]
    chosen = select(names, names, moments, stats, None, RunConfig().clean, 0)
    assert chosen.kept == list(range(width)) and not chosen.changed
    assert chosen.notes == [f"correlation check skipped: {width} encoded columns (limit 2000)"]


def test_max_features_is_checked_where_it_is_parsed() -> None:
    with pytest.raises(KubetrainError, match="max_features=-1 is out of range"):
        RunConfig.from_flat({"max_features": -1})
    assert RunConfig.from_flat({"max_features": "4"}).clean.max_features == 4


def test_images_keep_every_pixel(tmp_path: Path) -> None:
    """Pixels keep their grid (a CNN reads them as an image): no selection, a note."""
    rng = np.random.default_rng(3)
    pixels = np.zeros((90, 12))
    pixels[:, 1:] = rng.integers(0, 256, (90, 11))  # pixel 0 is blank everywhere
    frame = pd.DataFrame(pixels, columns=[f"p{i}" for i in range(12)])
    frame[LABEL] = np.repeat(CLASSES, [50, 40])
    path = tmp_path / "images"
    schema = Schema("image", list(frame.columns[:-1]), CLASSES, image_shape=[1, 3, 4])
    save_table(path, frame, schema)
    meta, splits = run(tmp_path, str(path), "img", max_features=2)
    assert meta["features_dropped"] == [] and meta["features_out"] == 12
    assert meta["feature_selection_notes"] == [
        "max_features ignored: an image's pixels keep their grid"
    ]
    assert splits["train"][0].shape[1] == 12
