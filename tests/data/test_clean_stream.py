"""kubetrain.data.clean_stream: the batch-by-batch clean fits exactly what the in-memory
Preprocessor fits on the same training rows, dedupes across batches and splits exactly
stratified, whatever the batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data.clean import Preprocessor
from kubetrain.data.clean_stream import batch_hashes, clean_streaming
from kubetrain.data.datasets import LABEL, Schema, load_split, load_table, save_table
from kubetrain.data.stats import route

SPLITS = ("train", "validation", "test")
CLASSES = ["a", "b", "c"]


def raw_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 330
    y = np.repeat(CLASSES, [130, 110, 90])
    x1 = rng.normal(size=n) * 3 + 1
    x1[rng.random(n) < 0.12] = np.nan
    x1[5] = 40.0  # an outlier
    x2 = rng.integers(0, 6, n)  # ties: most_frequent has work to do
    cat = rng.choice(["p", "q", "r", None], n, p=[0.5, 0.3, 0.15, 0.05])
    frame = pd.DataFrame({"x1": x1, "x2": x2, "cat": cat, LABEL: y})
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    dupes = frame.iloc[[3, 17, 40, 41, 100, 250]]  # exact copies, some spanning batches
    return pd.concat([frame, dupes, frame.iloc[[3]]], ignore_index=True)


def write_table(tmp_path: Path, frame: pd.DataFrame) -> str:
    path = tmp_path / "table"
    schema = Schema(kind="table", feature_names=["x1", "x2", "cat"], class_names=CLASSES)
    save_table(path, frame, schema)
    return str(path)


def run(tmp_path: Path, table: str, cfg, batch_rows: int, tag: str):
    paths = [str(tmp_path / f"{name}-{tag}") for name in SPLITS]
    stats = clean_streaming(table, *paths, cfg.clean, cfg.seed, batch_rows=batch_rows)
    return stats, {name: load_split(p) for name, p in zip(SPLITS, paths, strict=True)}


def expected(table: str, cfg, numeric=("x1", "x2")):
    """The rows `clean_streaming` should keep and route, rebuilt from the whole table."""
    frame, schema = load_table(table)
    numeric = list(numeric)
    hashes = batch_hashes(frame, numeric)
    _, first = np.unique(hashes, return_index=True)
    keep = np.zeros(len(frame), bool)
    keep[first] = True
    features = frame.drop(columns=[LABEL])
    if cfg.clean.impute == "drop":
        keep &= ~features.isna().any(axis=1).to_numpy()
    kept = features[keep].reset_index(drop=True)
    y = frame.loc[keep, LABEL].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(np.int64)
    codes = route(hashes[keep], y, cfg.clean.test_fraction, cfg.clean.val_fraction, cfg.seed)
    return schema, kept, y, codes


def assert_close(a, b, path="params"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_close(u, v, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9), path
    else:
        assert a == b, path


CASES = [
    dict(scaling="standard", impute="mean"),
    dict(scaling="minmax", impute="median"),
    dict(scaling="standard", impute="most_frequent"),
    dict(scaling="minmax", impute="most_frequent"),
    dict(scaling="standard", impute="median", outliers="zscore", outlier_threshold=2.0),
    dict(scaling="minmax", impute="mean", outliers="iqr", outlier_threshold=1.0),
    dict(
        scaling="standard",
        impute="median",
        outliers="iqr",
        outlier_threshold=1.0,
        outlier_action="drop",
    ),
    dict(scaling="none", impute="drop"),
    dict(scaling="standard", impute="drop", outliers="zscore", outlier_threshold=2.0),
    dict(scaling="robust", impute="median"),
    dict(scaling="robust", impute="mean", outliers="iqr", outlier_threshold=1.0),
]


def test_robust_scaling_centres_continuous_columns_on_median_and_iqr(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({"scaling": "robust"})
    _, splits = run(tmp_path, write_table(tmp_path, raw_frame()), cfg, batch_rows=50, tag="r")
    X, _, schema = splits["train"]
    n = schema.feature_names.index("x2") + 1  # x1, x2: the continuous columns, first
    q1, median, q3 = np.percentile(X[:, :n], [25, 50, 75], axis=0)
    np.testing.assert_allclose(median, 0, atol=1e-6)
    np.testing.assert_allclose(q3 - q1, 1, atol=1e-6)
    # the one-hot columns are standardized as before
    np.testing.assert_allclose(X[:, n:].mean(0), 0, atol=1e-5)


@pytest.mark.parametrize("changes", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_streaming_matches_in_memory_fit_on_the_same_rows(tmp_path: Path, changes) -> None:
    cfg = RunConfig.from_flat(changes)
    frame = raw_frame()
    table = write_table(tmp_path, frame)
    stats, splits = run(tmp_path, table, cfg, batch_rows=37, tag="small")
    schema, kept, y, codes = expected(table, cfg)

    # (b) duplicates: exactly the in-memory count, and none survives
    assert stats["rows_in"] == len(frame)
    assert stats["duplicates_removed"] == len(frame) - len(frame.drop_duplicates())
    assert stats["missing_values"] == int(frame.drop_duplicates().isna().sum().sum())
    assert not kept.assign(label=y).duplicated().any()

    # (a) exactly stratified: round(fraction * n) per class
    for s, name, fraction in ((2, "test", cfg.clean.test_fraction), (1, "validation", None)):
        fraction = fraction if fraction is not None else cfg.clean.val_fraction
        _, ys, _ = splits[name]
        for k in range(len(CLASSES)):
            assert (ys == k).sum() == round(fraction * (y == k).sum()) == (codes[y == k] == s).sum()

    # (c) the fitted params equal the in-memory Preprocessor's on the same training rows
    train_rows = kept[codes == 0].reset_index(drop=True)
    prep = Preprocessor(cfg.clean, schema).fit(train_rows)
    params = splits["train"][2].extra["preprocessing"]
    assert_close(params, prep.params)

    # (d) the transformed train split equals Preprocessor.transform of those rows
    y_train = y[codes == 0]
    if cfg.clean.outliers != "none" and cfg.clean.outlier_action == "drop":
        out = prep.outlier_mask(train_rows)
        assert stats["outliers_dropped"] == int(out.sum()) > 0
        train_rows, y_train = train_rows[~out].reset_index(drop=True), y_train[~out]
    X, ys, _ = splits["train"]
    np.testing.assert_array_equal(ys, y_train)
    np.testing.assert_allclose(X, prep.transform(train_rows), rtol=1e-6, atol=1e-6)
    for s, name in ((1, "validation"), (2, "test")):
        Xs, ys, _ = splits[name]
        np.testing.assert_array_equal(ys, y[codes == s])
        rows = kept[codes == s].reset_index(drop=True)
        np.testing.assert_allclose(Xs, prep.transform(rows), rtol=1e-6, atol=1e-6)
    assert stats["splits"]["train"]["rows"] == len(y_train)

    # (e) the batch size changes nothing
    stats_big, splits_big = run(tmp_path, table, cfg, batch_rows=10_000, tag="big")
    assert_close(splits_big["train"][2].extra["preprocessing"], params)
    for name in SPLITS:
        np.testing.assert_array_equal(splits_big[name][1], splits[name][1])
        np.testing.assert_allclose(splits_big[name][0], splits[name][0], rtol=1e-6, atol=1e-6)
        assert stats_big["splits"][name] == stats["splits"][name]


def test_metadata_keys_match_the_in_memory_clean(tmp_path: Path) -> None:
    from kubetrain.data.clean import clean

    for changes in (dict(), dict(impute="drop", outliers="zscore")):
        cfg = RunConfig.from_flat(changes)
        table = write_table(tmp_path, raw_frame())
        paths = [str(tmp_path / f"m-{n}") for n in SPLITS]
        mem = clean(table, *paths, cfg.clean, cfg.seed)
        stream = clean_streaming(table, *paths, cfg.clean, cfg.seed, batch_rows=50)
        assert set(stream) == set(mem)
        for key in ("rows_in", "duplicates_removed", "missing_values", "features_out"):
            assert stream[key] == mem[key]
        for name in SPLITS:  # same sizes per split (both round per class)...
            assert abs(stream["splits"][name]["rows"] - mem["splits"][name]["rows"]) <= 3


def test_too_many_categories_and_rare_classes_fail_with_one_line(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({})
    frame = raw_frame()
    frame["cat"] = [f"id{i}" for i in range(len(frame))]
    table = write_table(tmp_path / "ids", frame)
    stats, _ = run(tmp_path, table, cfg, batch_rows=37, tag="ids")  # an identifier: dropped
    assert stats["column_types"]["cat"] == "identifier"
    forced = RunConfig.from_flat({"column_types": "cat=categorical"})
    with pytest.raises(KubetrainError, match="distinct text values"):
        run(tmp_path, table, forced, batch_rows=37, tag="ids2")
    rare = raw_frame()
    rare.loc[rare.index[:3], LABEL] = "c"
    rare = rare[(rare[LABEL] != "c") | (rare.index < 3)]
    table = write_table(tmp_path / "rare", rare)
    stats, _ = run(tmp_path, table, cfg, batch_rows=37, tag="rare")  # two classes remain
    assert stats["classes_dropped"] == ["c"] and stats["rows_dropped_rare_classes"] == 3


@pytest.mark.parametrize("scaling", ["standard", "minmax"])
def test_image_tables_get_one_scalar_scaler_like_in_memory(tmp_path: Path, scaling) -> None:
    rng = np.random.default_rng(1)
    n, pixels = 120, 12
    frame = pd.DataFrame(
        rng.integers(0, 256, (n, pixels)), columns=[f"p{i}" for i in range(pixels)]
    )
    frame[LABEL] = np.repeat(CLASSES, [50, 40, 30])
    path = tmp_path / "images"
    save_table(
        path,
        frame,
        Schema("image", list(frame.columns[:-1]), CLASSES, image_shape=[1, 3, 4]),
    )
    cfg = RunConfig.from_flat({"scaling": scaling})
    _, splits = run(tmp_path, str(path), cfg, batch_rows=37, tag="img")
    schema, kept, _, codes = expected(str(path), cfg, frame.columns[:-1])
    prep = Preprocessor(cfg.clean, schema).fit(kept[codes == 0].reset_index(drop=True))
    assert_close(splits["train"][2].extra["preprocessing"], prep.params)


def test_the_clean_stage_streams_a_table_over_the_memory_budget(tmp_path, monkeypatch, capsys):
    from kubetrain.config.settings import CleanConfig
    from kubetrain.data.datasets import load_split
    from kubetrain.data.ingest import ingest
    from kubetrain.stages import clean_stage

    ingest("wine", "", str(tmp_path / "table"))
    outs = [str(tmp_path / n) for n in ("train", "val", "test", "report.md")]
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", "1000")
    meta = clean_stage(str(tmp_path / "table"), *outs, CleanConfig(), 42)
    assert "streaming: the table" in capsys.readouterr().out
    X, y, _ = load_split(outs[0])
    assert len(y) == meta["splits"]["train"]["rows"] > 0 and not np.isnan(X).any()
    assert "Data quality" in Path(outs[3]).read_text()
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", str(10**10))
    clean_stage(str(tmp_path / "table"), *[o + "2" for o in outs], CleanConfig(), 42)
    assert "streaming" not in capsys.readouterr().out  # it fits: the in-memory clean


def test_rows_differing_only_in_a_dropped_column_are_duplicates(tmp_path: Path) -> None:
    """An ID the model never sees must not make copies of a row count as different rows
    (they could land in train and test both)."""
    plain = write_table(tmp_path / "plain", raw_frame())
    frame = raw_frame()
    frame["rowno"] = np.arange(len(frame))
    table = write_table(tmp_path, frame)
    keep_all = RunConfig.from_flat({"seed": 1})
    drop_id = RunConfig.from_flat({"seed": 1, "drop_columns": "rowno"})
    reference, reference_splits = run(tmp_path, plain, keep_all, 50, "plain")
    with_id, _ = run(tmp_path, table, keep_all, 50, "all")
    without, splits = run(tmp_path, table, drop_id, 50, "dropped")
    assert with_id["duplicates_removed"] == 0  # every row differs in rowno
    assert without["duplicates_removed"] == reference["duplicates_removed"] > 0
    for name in SPLITS:  # the same rows, routed alike, as if the column never existed
        np.testing.assert_array_equal(splits[name][0], reference_splits[name][0])


def test_holding_the_arrow_batches_or_rereading_the_parts_writes_the_same_splits(
    tmp_path: Path, monkeypatch
) -> None:
    """Under the budget pass 1 keeps the table's Arrow batches for the later passes; over
    it (a 1-byte budget) every pass reads the parts again. Both write the same splits."""
    table = write_table(tmp_path, raw_frame(3))
    cfg = RunConfig()
    held_stats, held = run(tmp_path, table, cfg, batch_rows=40, tag="held")
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", "1")
    streamed_stats, streamed = run(tmp_path, table, cfg, batch_rows=40, tag="streamed")
    for name in SPLITS:
        assert np.array_equal(held[name][0], streamed[name][0])
        assert np.array_equal(held[name][1], streamed[name][1])
    assert held_stats["splits"] == streamed_stats["splits"]


def test_a_table_that_would_not_fit_is_not_held_from_its_first_batch(
    tmp_path: Path, monkeypatch
) -> None:
    """Holding decides on the first batch, extrapolated to the table's rows: a table
    over the budget is never held (not filled up to the budget and then let go)."""
    from kubetrain.data.clean_stream import HeldBatches

    table = write_table(tmp_path, raw_frame(3))
    first = HeldBatches(table, 40)
    frames = list(first.first_read())
    assert first.batches is not None and len(first.batches) == len(frames) > 2
    per_batch = first.batches[0].nbytes
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", str(per_batch * 2))  # > 1 batch, < table
    over = HeldBatches(table, 40)
    seen = []
    for frame in over.first_read():
        seen.append(over.batches)  # decided at the first batch already
        assert len(frame)
    assert seen[0] is None and over.batches is None


def test_read_ahead_and_write_behind_keep_order_and_raise_the_first_error() -> None:
    from kubetrain.data.clean_stream import read_ahead, write_behind

    assert list(read_ahead(iter(range(50)), 2)) == list(range(50))

    def broken():
        yield 1
        raise KubetrainError("part 7 is damaged")

    with pytest.raises(KubetrainError, match="part 7 is damaged"):
        list(read_ahead(broken(), 2))
    written: list[int] = []
    write_behind(written.append, ((i,) for i in range(20)))
    assert written == list(range(20))

    def write(i: int) -> None:
        if i == 3:
            raise OSError("disk full")
        written.append(i)

    written.clear()
    with pytest.raises(OSError, match="disk full"):
        write_behind(write, ((i,) for i in range(20)))
    assert written == [0, 1, 2]  # nothing after the failed write


def test_medians_come_from_the_rows_under_the_hash_cut_whatever_the_batching() -> None:
    """A median is that of the column's values in the k training rows with the smallest
    hashes; a column with fewer than 256 values there takes its 256 smallest-hash values."""
    import functools

    import pyarrow as pa

    from kubetrain.config.settings import CleanConfig
    from kubetrain.data.clean_stream import MIN_MEDIAN_SAMPLE, FillStats, sample_cut
    from kubetrain.data.column_types import infer_types

    rng = np.random.default_rng(7)
    n = 6000
    dense = rng.exponential(size=n)
    sparse = np.where(rng.random(n) < 0.9, np.nan, rng.normal(size=n))
    frame = pd.DataFrame({"dense": dense, "sparse": sparse})
    h = rng.permutation(np.arange(1, n + 1, dtype=np.uint64) * np.uint64(2**40))
    types = infer_types(frame, pa.Schema.from_pandas(frame), ["dense", "sparse"])
    cut = sample_cut(h, k=1000)
    assert (h <= cut).sum() == 1000

    def fold(sizes):
        parts, start = [], 0
        for size in sizes:
            acc = FillStats(CleanConfig(), types, cut)
            acc.add(
                frame.iloc[start : start + size].reset_index(drop=True), h[start : start + size]
            )
            parts.append(acc)
            start += size
        return functools.reduce(FillStats.merge, parts).params()["fill"]

    one, other = fold([n]), fold([1234, 3000, 1766])
    assert one == other
    assert one["dense"] == pytest.approx(np.median(dense[h <= cut]), abs=0)
    present = ~np.isnan(sparse)
    assert (present & (h <= cut)).sum() < MIN_MEDIAN_SAMPLE  # too few under the cut
    smallest = np.argsort(np.where(present, h, np.uint64(2**64 - 1)))[:MIN_MEDIAN_SAMPLE]
    assert one["sparse"] == pytest.approx(np.median(sparse[smallest]), abs=1e-12)
