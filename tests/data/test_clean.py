"""kubetrain.data.clean: duplicates, imputation, categories, outliers and scaling, every
statistic fitted on the training split only, and an honest stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.clean import clean, quality_report
from kubetrain.data.clean_stream import batch_hashes
from kubetrain.data.datasets import LABEL, Schema, load_split, load_table, save_table
from kubetrain.data.ingest import ingest
from kubetrain.data.stats import route, unit_interval

SPLITS = ("train", "validation", "test")  # route's codes 0, 1, 2
TRAIN, VALIDATION, TEST = range(3)
N_PER_CLASS = 30


def cfg_with(**changes) -> RunConfig:
    return RunConfig.from_flat(changes)


def table(
    tmp_path: Path, frame: pd.DataFrame, classes=("a", "b"), kind="table", image_shape=None
) -> str:
    path = tmp_path / "table"
    features = [c for c in frame.columns if c != LABEL]
    save_table(
        path,
        frame,
        Schema(
            kind=kind, feature_names=features, class_names=list(classes), image_shape=image_shape
        ),
    )
    return str(path)


def run_clean(tmp_path: Path, table_path: str, cfg: RunConfig, tag: str = ""):
    paths = [str(tmp_path / f"{name}{tag}") for name in SPLITS]
    stats = clean(table_path, *paths, cfg.clean, cfg.seed)
    splits = {name: load_split(p) for name, p in zip(SPLITS, paths, strict=False)}
    return stats, splits


def labels(n_per_class: int = N_PER_CLASS) -> np.ndarray:
    return np.repeat([0, 1], n_per_class)


def planned_split(cfg: RunConfig, n_per_class: int = N_PER_CLASS):
    """Row positions (classes as `labels`) meant for train, validation and test, in
    route's numbers per class: round(test_fraction * n) test rows, round(val_fraction *
    n) validation rows. A test sets the values of these rows, then `planted` picks keys
    that make clean route every row where it was meant to go."""
    y = labels(n_per_class)
    split = np.full(len(y), TRAIN)
    for cls in np.unique(y):
        rows = np.flatnonzero(y == cls)
        n_test = int(round(cfg.clean.test_fraction * len(rows)))
        n_val = int(round(cfg.clean.val_fraction * len(rows)))
        split[rows[:n_test]] = TEST
        split[rows[n_test : n_test + n_val]] = VALIDATION
    return tuple(np.flatnonzero(split == s) for s in (TRAIN, VALIDATION, TEST))


def routing(frame: pd.DataFrame, cfg: RunConfig) -> np.ndarray:
    """Where clean routes each row of a duplicate-free frame (kept whole): the library's
    own content hashes (features + label) and `route`, classes in schema order."""
    numeric = [c for c in frame.columns if c != LABEL and pd.api.types.is_numeric_dtype(frame[c])]
    y = frame[LABEL].map({"a": 0, "b": 1}).to_numpy(np.int64)
    hashes = content_hashes(frame, numeric)
    return route(hashes, y, cfg.clean.test_fraction, cfg.clean.val_fraction, cfg.seed)


def content_hashes(frame: pd.DataFrame, numeric: list[str]) -> np.ndarray:
    """What clean hashes: the kept feature columns in order, then the label."""
    return batch_hashes(frame[[*(c for c in frame.columns if c != LABEL), LABEL]], numeric)


def planted(cfg: RunConfig, columns: dict[str, np.ndarray], n_per_class: int = N_PER_CLASS):
    """`base_frame` plus ``columns`` (values by row position) with each row routed where
    `planned_split` meant it to go.

    Routing depends on a row's content, so the values are fixed first and the
    free `key` is chosen last: each row gets the smallest unused key whose seeded
    routing draw falls in its split's band (test below 1/3, validation below 2/3,
    train above). `route` sends each class's lowest draws to test and the next to
    validation, so with planned_split's counts every row lands as planned; checked
    with `routing` on the final frame, and each test checks the outputs by key too."""
    frame = base_frame(n_per_class)
    for name, values in columns.items():
        frame[name] = values
    split = np.full(len(frame), TRAIN)
    for s, rows in zip((TRAIN, VALIDATION, TEST), planned_split(cfg, n_per_class), strict=True):
        split[rows] = s
    bands = {TEST: (0.0, 1 / 3), VALIDATION: (1 / 3, 2 / 3), TRAIN: (2 / 3, 1.0)}
    numeric = [c for c in frame.columns if c != LABEL and pd.api.types.is_numeric_dtype(frame[c])]
    used: set[int] = set()
    for i in range(len(frame)):
        lo, hi = bands[split[i]]
        candidates = frame.iloc[[i] * 64].reset_index(drop=True)
        start = 0
        while True:
            keys = np.arange(start, start + 64)
            candidates["key"] = keys.astype(np.float64)
            draw = unit_interval(content_hashes(candidates, numeric), cfg.seed)
            fits = [k for k, d in zip(keys, draw, strict=True) if lo <= d < hi and k not in used]
            if fits:
                break
            start += 64
        used.add(fits[0])
        frame.loc[i, "key"] = float(fits[0])
    assert frame["key"].is_unique
    np.testing.assert_array_equal(routing(frame, cfg), split)
    return frame


def keys_of(frame: pd.DataFrame, rows) -> list[int]:
    return [int(k) for k in frame["key"].to_numpy()[np.asarray(rows, int)]]


def assert_routed_as_planned(splits, frame: pd.DataFrame, cfg: RunConfig) -> None:
    """Each split holds exactly the keys `planned_split` meant for it."""
    for name, rows in zip(SPLITS, planned_split(cfg), strict=True):
        assert sorted(by_key(splits, name)) == sorted(keys_of(frame, rows)), name


def base_frame(n_per_class: int = N_PER_CLASS) -> pd.DataFrame:
    y = labels(n_per_class)
    return pd.DataFrame(
        {"key": np.arange(len(y), dtype=np.float64), LABEL: np.array(["a", "b"])[y]}
    )


def by_key(splits, name: str, column: int = 0) -> dict[int, np.ndarray]:
    """Rows of a split (scaling=none) keyed by the integer `key` feature."""
    X = splits[name][0]
    return {int(round(row[column])): row for row in X}


# --- duplicates ------------------------------------------------------------------------


def test_duplicates_removed_and_counted(tmp_path):
    frame = base_frame()
    frame["x"] = np.arange(len(frame)) * 1.5
    dups = frame.iloc[[3, 3, 40]]
    near = frame.iloc[[5]].assign(**{LABEL: "b"})  # same features, other label: kept
    frame = pd.concat([frame, dups, near], ignore_index=True)
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg_with(scaling="none"))
    assert stats["rows_in"] == 2 * N_PER_CLASS + 4
    assert stats["duplicates_removed"] == 3
    assert sum(s["rows"] for s in stats["splits"].values()) == 2 * N_PER_CLASS + 1
    keys = np.concatenate([splits[n][0][:, 0] for n in SPLITS])
    assert sorted(keys.tolist()) == sorted(list(range(2 * N_PER_CLASS)) + [5])
    report = quality_report(stats)
    assert "| rows in | 64 |" in report
    assert "| exact duplicates removed | 3 |" in report
    assert "| rows out | 61 |" in report


# --- imputation ------------------------------------------------------------------------


def impute_frame(cfg: RunConfig):
    tr, va, te = planned_split(cfg)
    rng = np.random.default_rng(0)
    a = np.full(2 * N_PER_CLASS, 100.0)  # validation/test values: far from train's
    a[tr] = rng.normal(0.0, 1.0, len(tr))
    a[tr[:10]] = 2.0  # train mode 2.0; overall mode 100.0
    missing = [*tr[-3:], va[0], *te[:2]]  # missing in every split
    a[missing] = np.nan
    frame = planted(cfg, {"a": a})
    return frame, sorted(keys_of(frame, missing))


@pytest.mark.parametrize(
    "strategy, statistic",
    [
        ("mean", lambda v: float(np.mean(v))),
        ("median", lambda v: float(np.median(v))),
        ("most_frequent", lambda v: float(pd.Series(v).mode().iloc[0])),
    ],
)
def test_impute_uses_train_statistics(tmp_path, strategy, statistic):
    cfg = cfg_with(impute=strategy, scaling="none")
    frame, missing = impute_frame(cfg)
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert stats["missing_values"] == len(missing) == 6
    assert_routed_as_planned(splits, frame, cfg)
    train_keys = sorted(by_key(splits, "train"))
    raw = frame.set_index("key")["a"]
    expected = statistic(raw[train_keys].dropna().to_numpy())
    overall = statistic(raw.dropna().to_numpy())
    assert abs(expected - overall) > 1.0  # the data tells train-only from all-rows fitting
    seen = 0
    for name in SPLITS:
        rows = by_key(splits, name)
        assert not np.isnan(splits[name][0]).any()
        assert any(k in rows for k in missing), name  # a missing value in every split
        for k in missing:
            if k in rows:
                assert rows[k][1] == pytest.approx(expected, abs=1e-5), (name, k)
                seen += 1
        for k, row in rows.items():  # present values untouched
            if k not in missing:
                assert row[1] == pytest.approx(raw[k], abs=1e-5)
    assert seen == len(missing)
    # the value is also what a serving-time replay would use
    assert splits["test"][2].extra["preprocessing"]["fill"]["a"] == pytest.approx(expected)


def test_impute_drop(tmp_path):
    cfg = cfg_with(impute="drop", scaling="none")
    frame, missing = impute_frame(cfg)
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert stats["rows_dropped_missing"] == len(missing)
    keys = set()
    for name in SPLITS:
        assert not np.isnan(splits[name][0]).any()
        keys |= set(by_key(splits, name))
    assert keys == set(keys_of(frame, range(len(frame)))) - set(missing)
    assert "| rows dropped for missing values | 6 |" in quality_report(stats)


# --- categorical -----------------------------------------------------------------------


def test_categorical_one_hot_learned_on_train(tmp_path):
    cfg = cfg_with(scaling="none")
    tr, va, te = planned_split(cfg)
    colour = np.array(["green"] * 2 * N_PER_CLASS, dtype=object)
    colour[tr] = ["red", "red", "blue", "green"] * (len(tr) // 4) + ["red"] * (len(tr) % 4)
    colour[tr[1]] = None  # missing in train -> train mode 'red'
    colour[va[0]] = None  # missing in validation -> train mode 'red'
    colour[te[0]] = "purple"  # never seen in train
    assert pd.Series(colour).mode().iloc[0] == "green"  # overall mode differs from train's
    assert pd.Series(colour[tr]).mode().iloc[0] == "red"
    frame = planted(cfg, {"colour": colour})
    (purple,) = keys_of(frame, [te[0]])
    colour_of = dict(zip(keys_of(frame, range(len(frame))), colour, strict=True))
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert_routed_as_planned(splits, frame, cfg)
    schema = splits["train"][2]
    assert schema.feature_names == ["key", "colour=blue", "colour=green", "colour=red"]
    assert schema.extra["categorical_columns"] == [1, 2, 3]
    names = ["blue", "green", "red"]
    for name in SPLITS:
        for k, row in by_key(splits, name).items():
            onehot = row[1:4]
            if k == purple:
                assert name == "test" and onehot.tolist() == [0, 0, 0]
            elif colour_of[k] is None:
                assert onehot.tolist() == [0, 0, 1], (name, k)
            else:
                assert onehot.sum() == 1 and names[int(onehot.argmax())] == colour_of[k]


def test_unique_text_column_is_an_identifier_dropped_with_a_note(tmp_path):
    frame = base_frame(200)
    frame["user_id"] = [f"user-{i:04d}" for i in range(len(frame))]
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg_with(scaling="none"))
    assert splits["train"][2].feature_names == ["key"]
    assert stats["column_types"] == {"key": "numeric", "user_id": "identifier"}
    (note,) = stats["column_notes"]
    assert "'user_id': identifier (100% distinct) — dropped" in note
    assert "--column-types user_id=high_cardinality" in note
    report = quality_report(stats)
    assert "## Columns" in report and "| user_id | identifier | dropped |" in report


def test_text_column_forced_categorical_with_too_many_values(tmp_path):
    frame = base_frame(200)
    frame["user_id"] = [f"user-{i:04d}" for i in range(len(frame))]
    out = tmp_path / "train"
    with pytest.raises(KubetrainError) as info:
        run_clean(tmp_path, table(tmp_path, frame), cfg_with(column_types="user_id=categorical"))
    assert "'user_id'" in str(info.value) and "distinct" in str(info.value)
    assert "--column-types user_id=high_cardinality" in str(info.value)
    assert not out.exists() and not (tmp_path / "test").exists()


@pytest.mark.parametrize("empty", [np.nan, None], ids=["float-nan", "null-column"])
def test_all_missing_column_is_dropped_and_noted(tmp_path, empty):
    frame = base_frame()
    frame["x"] = np.random.default_rng(0).normal(size=len(frame))  # not a copy of key
    frame["hollow"] = [empty] * len(frame)
    cfg = cfg_with(impute="drop")  # the empty column's gaps drop no row
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert splits["train"][2].feature_names == ["key", "x"]
    assert stats["column_types"]["hollow"] == "empty"
    assert stats["missing_values"] == 0 and stats["rows_dropped_missing"] == 0
    assert any("'hollow': empty" in n for n in stats["column_notes"])


def test_column_without_training_values(tmp_path):
    cfg = cfg_with()
    _, _, te = planned_split(cfg)
    hollow = np.full(2 * N_PER_CLASS, np.nan)
    hollow[te] = np.arange(len(te), dtype=float)  # values only in test rows
    frame = planted(cfg, {"hollow": hollow})
    with pytest.raises(KubetrainError, match=r"'hollow' has no values.*drop the column"):
        run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert not list(tmp_path.glob("train*")) and not list(tmp_path.glob(".train.*"))


# --- outliers ------------------------------------------------------------------------


def outlier_frame(cfg: RunConfig):
    tr, va, te = planned_split(cfg)
    x = np.random.default_rng(1).normal(0.0, 1.0, 2 * N_PER_CLASS)
    x[tr[0]], x[te[0]] = 50.0, -40.0  # far beyond train's bounds: a train and a test row
    frame = planted(cfg, {"x": x})
    (train_out,) = keys_of(frame, [tr[0]])
    (test_out,) = keys_of(frame, [te[0]])
    return frame, train_out, test_out


def train_bounds(frame, keys, method, t):
    x = frame.set_index("key")["x"][sorted(keys)].to_numpy()
    if method == "zscore":
        return x.mean() - t * x.std(), x.mean() + t * x.std()
    q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
    return q1 - t * (q3 - q1), q3 + t * (q3 - q1)


@pytest.mark.parametrize("method, threshold", [("zscore", 3.0), ("iqr", 1.5)])
def test_outliers_clipped_to_train_bounds(tmp_path, method, threshold):
    cfg = cfg_with(outliers=method, outlier_threshold=threshold, scaling="none")
    frame, train_out, test_out = outlier_frame(cfg)
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert_routed_as_planned(splits, frame, cfg)
    lo, hi = train_bounds(frame, by_key(splits, "train"), method, threshold)
    assert sum(s["rows"] for s in stats["splits"].values()) == len(frame)
    assert stats["outliers_clipped_rows"] >= 2
    raw = frame.set_index("key")["x"]
    for name in SPLITS:
        for k, row in by_key(splits, name).items():
            assert row[1] == pytest.approx(np.clip(raw[k], lo, hi), abs=1e-4), (name, k)
    assert by_key(splits, "train")[train_out][1] == pytest.approx(hi, abs=1e-4)
    assert by_key(splits, "test")[test_out][1] == pytest.approx(lo, abs=1e-4)
    assert "rows with clipped outliers" in quality_report(stats)


def test_outlier_drop_only_touches_train(tmp_path):
    base = cfg_with(outliers="none", scaling="none")
    frame, train_out, test_out = outlier_frame(base)
    path = table(tmp_path, frame)
    kept, all_rows = run_clean(tmp_path, path, base, tag="-none")
    assert_routed_as_planned(all_rows, frame, base)
    cfg = cfg_with(outliers="zscore", outlier_action="drop", scaling="none")
    stats, splits = run_clean(tmp_path, path, cfg)
    assert stats["outliers_dropped"] >= 1
    assert stats["splits"]["train"]["rows"] == (
        kept["splits"]["train"]["rows"] - stats["outliers_dropped"]
    )
    for name in ("validation", "test"):
        assert stats["splits"][name]["rows"] == kept["splits"][name]["rows"]
        assert sorted(by_key(splits, name)) == sorted(by_key(all_rows, name)), name
    # bounds fitted on every training row; exactly the training rows outside them go
    train_keys = set(by_key(all_rows, "train"))
    lo, hi = train_bounds(frame, train_keys, "zscore", 3.0)
    raw = frame.set_index("key")["x"]
    outside = {k for k in train_keys if not lo <= raw[k] <= hi}
    assert train_out in outside and len(outside) == stats["outliers_dropped"]
    assert set(by_key(splits, "train")) == train_keys - outside
    assert by_key(splits, "test")[test_out][1] == pytest.approx(lo, abs=1e-4)  # clipped
    assert "training rows dropped as outliers (zscore)" in quality_report(stats)


# --- scaling -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wine_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("wine") / "table"
    ingest("wine", "", str(path))
    return str(path)


def assert_rows_from(original: np.ndarray, X: np.ndarray) -> None:
    for row in X:
        err = np.abs(original - row).max(axis=1) / (np.abs(row).max() + 1)
        assert err.min() < 1e-5


@pytest.mark.parametrize("scaling", ["standard", "minmax"])
def test_scaling_fitted_on_train_only(tmp_path, wine_table, scaling):
    stats, splits = run_clean(tmp_path, wine_table, cfg_with(scaling=scaling))
    X_train = splits["train"][0].astype(np.float64)
    if scaling == "standard":
        np.testing.assert_allclose(X_train.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(X_train.std(0), 1, atol=1e-4)
        for name in ("validation", "test"):
            X = splits[name][0]
            assert np.abs(X.mean(0)).max() > 0.05 or np.abs(X.std(0) - 1).max() > 0.05
    else:
        np.testing.assert_allclose(X_train.min(0), 0, atol=1e-6)
        np.testing.assert_allclose(X_train.max(0), 1, atol=1e-6)
        others = np.concatenate([splits["validation"][0], splits["test"][0]])
        assert not (np.allclose(others.min(0), 0) and np.allclose(others.max(0), 1))
    params = splits["train"][2].extra["preprocessing"]["scale"]
    assert params["kind"] == scaling and len(params["offset"]) == 13
    original = load_table(wine_table)[0].drop(columns=[LABEL]).to_numpy(np.float64)
    for name in SPLITS:  # every split is the raw rows through the same train statistics
        raw = splits[name][0] * np.asarray(params["scale"]) + np.asarray(params["offset"])
        assert_rows_from(original, raw)


@pytest.fixture(scope="module")
def digits_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    ingest("digits", "", str(root / "table"))
    stats, splits = run_clean(root, str(root / "table"), RunConfig())
    return stats, splits, load_table(root / "table")[0]


def test_images_scaled_with_one_global_scalar(digits_splits):
    stats, splits, frame = digits_splits
    schema = splits["train"][2]
    assert schema.kind == "image" and schema.image_shape == [1, 8, 8]
    scale = schema.extra["preprocessing"]["scale"]
    assert len(scale["offset"]) == 1 and len(scale["scale"]) == 1
    X_train = splits["train"][0].astype(np.float64)
    assert abs(X_train.mean()) < 1e-4 and abs(X_train.std() - 1) < 1e-3
    # per-pixel standardisation would make the always-blank corner pixel 0; one scalar
    # keeps it at the (negative) background level shared by every pixel
    assert X_train[:, 0].std() == 0 and X_train[:, 0].mean() < -0.5
    assert np.ptp(X_train.std(0)) > 0.5  # pixels keep their own spreads
    original = frame.drop(columns=[LABEL]).to_numpy(np.float64)
    for name in SPLITS:
        raw = splits[name][0] * scale["scale"][0] + scale["offset"][0]
        np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)  # digits pixels: 0..16
        assert_rows_from(original, np.round(raw[:50]))
        # pixel relations: differences between pixels keep their ratios
        r = splits[name][0][0].astype(np.float64)
        d_out = r[None, :] - r[:, None]
        d_raw = np.round(raw[0])[None, :] - np.round(raw[0])[:, None]
        np.testing.assert_allclose(d_out * scale["scale"][0], d_raw, atol=1e-3)


# --- split ---------------------------------------------------------------------------


def test_stratified_split_proportions(digits_splits):
    stats, splits, frame = digits_splits
    total = frame[LABEL].value_counts()
    cfg = RunConfig()
    for cls, n in total.items():
        test = stats["splits"]["test"]["class_counts"][cls]
        val = stats["splits"]["validation"]["class_counts"][cls]
        train = stats["splits"]["train"]["class_counts"][cls]
        assert train + val + test == n
        assert test == round(n * cfg.clean.test_fraction), (cls, test, n)
        assert val == round(n * cfg.clean.val_fraction), (cls, val, n)
    for name in SPLITS:
        X, y, _ = splits[name]
        assert stats["splits"][name]["rows"] == len(X) == len(y)


def test_splits_disjoint(digits_splits):
    stats, splits, frame = digits_splits
    assert stats["duplicates_removed"] == 0
    rows = {name: {r.tobytes() for r in splits[name][0]} for name in SPLITS}
    assert sum(len(r) for r in rows.values()) == len(frame)
    assert not rows["train"] & rows["validation"]
    assert not rows["train"] & rows["test"]
    assert not rows["validation"] & rows["test"]


def test_split_reproducible_by_seed(tmp_path):
    frame = base_frame()
    frame["x"] = np.random.default_rng(2).normal(size=len(frame))
    path = table(tmp_path, frame)
    keys = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        _, splits = run_clean(tmp_path, path, cfg_with(seed=seed, scaling="none"), tag=tag)
        keys[tag] = [sorted(by_key(splits, name)) for name in SPLITS]
        all_keys = [k for part in keys[tag] for k in part]
        assert sorted(all_keys) == list(range(len(frame)))  # disjoint and complete
    assert keys["a"] == keys["b"]
    assert keys["a"] != keys["c"]


def test_too_few_rows_per_class(tmp_path):
    frame = pd.DataFrame({"x": np.arange(45, dtype=float), LABEL: ["common"] * 40 + ["rare"] * 5})
    with pytest.raises(KubetrainError) as info:
        run_clean(tmp_path, table(tmp_path, frame, classes=("common", "rare")), RunConfig())
    message = str(info.value)
    assert "'rare'" in message and "'common'" not in message
    assert "fewer than 14 rows" in message and "add rows" in message
    assert not list(tmp_path.glob("train*")) and not list(tmp_path.glob(".*"))


def test_a_rare_class_is_dropped_when_two_others_remain(tmp_path):
    labels = ["a"] * 40 + ["b"] * 40 + ["rare"] * 5
    frame = pd.DataFrame({"x": np.arange(len(labels), dtype=float), LABEL: labels})
    stats, splits = run_clean(
        tmp_path, table(tmp_path, frame, classes=("a", "b", "rare")), RunConfig()
    )
    assert stats["rows_dropped_rare_classes"] == 5 and stats["classes_dropped"] == ["rare"]
    assert all(s["class_counts"]["rare"] == 0 for s in stats["splits"].values())
    assert sum(s["rows"] for s in stats["splits"].values()) == 80
    (anomaly,) = [a for a in stats["anomalies"] if a["kind"] == "rare_classes"]
    assert anomaly["severity"] == "handled" and "'rare'" in anomaly["message"]
    assert "rows dropped: classes too rare to split | 5" in quality_report(stats)


def test_quality_report_counts(tmp_path):
    frame = base_frame()
    frame["x"] = np.where(np.arange(len(frame)) % 7 == 0, np.nan, np.arange(len(frame)))
    frame = pd.concat([frame, frame.iloc[[1, 2]]], ignore_index=True)
    stats, _ = run_clean(tmp_path, table(tmp_path, frame), RunConfig())
    report = quality_report(stats)
    assert report.startswith("# Data quality")
    assert f"| rows in | {len(frame)} |" in report
    assert "| exact duplicates removed | 2 |" in report
    assert "| missing feature values (median) | 9 |" in report
    assert f"| rows out | {len(frame) - 2} |" in report
    assert "| features out | 2 |" in report
    for name in SPLITS:
        s = stats["splits"][name]
        assert f"| {name} | {s['rows']} | a: {s['class_counts']['a']}, b: " in report
