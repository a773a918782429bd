"""kubetrain.data.column_types: each feature column's type inferred from a sample of real
generated tables, the user's overrides, and every encoding a pure, deterministic function
of JSON params (dates cyclic, text hashed alike in every process); clean takes tables with
names, dates, IDs and junk-laden numbers, fitting every statistic on train only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_clean import by_key, cfg_with, keys_of, planned_split, planted, run_clean, table
from test_clean_stream import assert_close

from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data import column_types as ct
from kubetrain.data.clean import Preprocessor, clean, quality_report
from kubetrain.data.clean_stream import Plan, batch_hashes, clean_streaming
from kubetrain.data.datasets import LABEL, Schema, load_split, load_table, save_table
from kubetrain.data.stats import route

SPLITS = ("train", "validation", "test")
N = 600
FIRST = np.array(["anna", "ben", "carla", "dmitri", "eva", "fatima", "georg", "hiro"])
WORDS = np.array(
    [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "near",
        "old",
        "river",
        "bank",
    ]
)


def mixed_frame(n: int = N, seed: int = 0) -> pd.DataFrame:
    """A table as they come: numbers, junk-laden numbers as text, booleans, categories,
    names, free text, dates in three formats and as epochs, IDs, a constant, a gap."""
    rng = np.random.default_rng(seed)
    price = rng.normal(50, 10, n).round(2).astype(str).astype(object)
    price[[7, 70, 170, 270]] = "n/a?"
    price[[11, 111]] = "—"
    stamps = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 3 * 365, n), unit="D")
    stamps = stamps + pd.to_timedelta(rng.integers(0, 24 * 60, n), unit="min")
    return pd.DataFrame(
        {
            "amount": rng.normal(0, 1, n),
            "count": rng.permutation(n),  # unique integers, but not named like an ID
            "price": price,
            "member": rng.choice(["Yes", "no"], n),
            "active": rng.random(n) < 0.3,
            "colour": rng.choice(["red", "green", "blue"], n),
            "name": [f"{FIRST[i % 8]} {s}son" for i, s in enumerate(rng.integers(0, 150, n))],
            "review": [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(n)],
            "visited": stamps.strftime("%Y-%m-%d %H:%M"),
            "signed": stamps.strftime("%m/%d/%Y"),
            "created_at": (stamps - pd.Timestamp(0)) // pd.Timedelta(seconds=1),
            "seen": stamps,
            "caseid": [f"C{i:06d}X" for i in rng.permutation(n)],
            "row_id": np.arange(n),
            "source": "web",
            "hollow": pd.Series([None] * n, dtype=object),
            LABEL: rng.choice(["a", "b"], n),
        }
    )


EXPECTED = {
    "amount": "numeric",
    "count": "numeric",
    "price": "numeric_text",
    "member": "boolean",
    "active": "boolean",
    "colour": "categorical",
    "name": "high_cardinality",
    "review": "text",
    "visited": "datetime",
    "signed": "datetime",
    "created_at": "datetime",
    "seen": "datetime",
    "caseid": "identifier",
    "row_id": "identifier",
    "source": "constant",
    "hollow": "empty",
}


def typed(frame: pd.DataFrame, image: bool = False, **cfg) -> ct.Typing:
    features = [c for c in frame.columns if c != LABEL]
    arrow = pa.Table.from_pandas(frame, preserve_index=False).schema
    clean_cfg = RunConfig.from_flat(cfg).clean
    return ct.infer_types(
        frame, arrow, features, image, clean_cfg.type_overrides, clean_cfg.dropped_columns
    )


def save(tmp_path: Path, frame: pd.DataFrame, name: str = "table") -> str:
    features = [c for c in frame.columns if c != LABEL]
    classes = sorted(frame[LABEL].unique())
    save_table(tmp_path / name, frame, Schema("table", features, classes))
    return str(tmp_path / name)


# --- inference -------------------------------------------------------------------------


def test_each_type_is_inferred_from_the_values():
    types = typed(mixed_frame())
    assert {c: t.kind for c, t in types.items()} == EXPECTED
    assert types["visited"].how == "iso" and types["signed"].how == "mdy"
    assert types["created_at"].how == ct.EPOCH and types["seen"].how == ct.NATIVE
    notes = "\n".join(ct.notes(types))
    assert "column 'caseid': identifier (100% distinct) — dropped; pass --column-types" in notes
    assert "column 'source': constant ('web') — dropped" in notes
    assert "column 'hollow': empty" in notes


def test_numbers_with_junk_cells_are_numeric_text_with_the_junk_counted():
    price = mixed_frame()["price"]
    t = ct.infer_column("price", price, pa.string())
    assert t.kind == "numeric_text" and t.junk == 6
    assert t.examples == ("n/a?", "—")  # most frequent first
    assert "6 junk cell(s) in the sample become missing: 'n/a?', '—'" in t.note
    values = ct.to_float(price, t.kind)
    assert np.isnan(values).sum() == 6 and values[0] == float(price[0])


@pytest.mark.parametrize(
    "values, arrow_type, kind",
    [
        (["true", "False", "TRUE", None], pa.string(), "boolean"),
        (["1", "0", "0"], pa.string(), "boolean"),  # 0/1 text
        (["y", "n", "n"], pa.string(), "boolean"),
        ([f"{i}.5" for i in range(95)] + ["?"] * 5, pa.string(), "numeric_text"),  # 95%
        (
            [f"{i % 40}.5" for i in range(85)] + [f"x{i % 5}" for i in range(15)],
            pa.string(),
            "categorical",
        ),
        (["2021-03-04", "2021-03-05T10:00:00Z", "2021-03-06 23:59:59"], pa.string(), "datetime"),
        (["31.12.2020", "01.01.2021", "15.06.2021"], pa.string(), "datetime"),
        (["4 Mar 2021", "5 Mar 2021", "6 Apr 2021"], pa.string(), "datetime"),
        ([f"w{i} x y z" for i in range(30)], pa.string(), "text"),  # unique, 4 words
        ([f"code{i}" for i in range(30)], pa.string(), "identifier"),
        ([f"code{i}" for i in range(10)], pa.string(), "categorical"),  # too few to tell
        ([1.6e9, 1.7e9], pa.float64(), "numeric"),  # name says nothing of time
    ],
)
def test_rules(values, arrow_type, kind):
    assert ct.infer_column("x", pd.Series(values), arrow_type).kind == kind


def test_epoch_seconds_only_for_time_names_in_a_plausible_range():
    plausible = pd.Series([1.6e9, 1.7e9, 1.65e9])
    assert ct.infer_column("updated_at", plausible, pa.int64()).kind == "datetime"
    assert ct.infer_column("event_time", plausible, pa.int64()).kind == "datetime"
    assert ct.infer_column("score", plausible, pa.int64()).kind == "numeric"
    assert ct.infer_column("event_time", pd.Series([1.0, 2.0]), pa.int64()).kind == "numeric"


def test_types_come_from_the_first_rows_only():
    n = ct.SAMPLE_ROWS + 50
    frame = pd.DataFrame({"x": np.arange(n) % 7, "source": ["web"] * n, LABEL: "a"})
    frame.loc[ct.SAMPLE_ROWS :, "source"] = "shop"  # after the sample: not seen
    for cut in (1000, 37_000):  # whatever the batches, the same rows
        sample = ct.read_sample(iter([frame.iloc[:cut], frame.iloc[cut:]]))
        assert len(sample) == ct.SAMPLE_ROWS
        assert typed(sample)["source"].kind == "constant"


# --- overrides -------------------------------------------------------------------------


def test_overrides_and_drops():
    types = typed(
        mixed_frame(),
        column_types="caseid=high_cardinality, count=id, name=text",
        drop_columns="amount",
    )
    kinds = {c: t.kind for c, t in types.items()}
    assert kinds["caseid"] == "high_cardinality" and kinds["count"] == "identifier"
    assert kinds["name"] == "text" and kinds["amount"] == "dropped"
    assert types["caseid"].forced and "set by --column-types" in types["caseid"].note
    assert "column 'amount': dropped (--drop-columns)" in ct.notes(types)


def test_forced_datetime_reads_text_numbers_and_dates():
    frame = mixed_frame()
    types = typed(frame, column_types="count=datetime,signed=date,seen=datetime")
    assert types["count"].how == ct.EPOCH and types["signed"].how == "mdy"
    with pytest.raises(KubetrainError, match=r"--column-types colour=datetime: no sampled value"):
        typed(frame, column_types="colour=datetime")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"column_types": "nme=text"}, r"--column-types names column 'nme'.*they are: amount"),
        ({"drop_columns": "amount,prize"}, r"--drop-columns names column 'prize'"),
        ({"column_types": "label=text"}, r"names column 'label', which is not a feature"),
    ],
)
def test_unknown_columns_fail_with_one_line(settings, message):
    with pytest.raises(KubetrainError, match=message) as info:
        typed(mixed_frame(), **settings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"column_types": "name=blob"}, r"unknown type 'blob' for column 'name'; valid types: num"),
        ({"column_types": "name"}, r"entry 'name' is not 'column=type'"),
        ({"column_types": "a=text,a=id"}, r"column 'a' two types"),
        ({"column_types": "a=text", "drop_columns": "a"}, r"'a' is in both"),
    ],
)
def test_bad_settings_fail_when_parsed(settings, message):
    with pytest.raises(KubetrainError, match=message):
        RunConfig.from_flat(settings)


def test_no_feature_left_and_image_tables():
    frame = pd.DataFrame({"only": ["x"] * 30, LABEL: ["a", "b"] * 15})
    with pytest.raises(KubetrainError, match="no feature column is left"):
        typed(frame)
    pixels = pd.DataFrame({"p0": [0] * 30, "p1": range(30), LABEL: ["a", "b"] * 15})
    assert {t.kind for t in typed(pixels, image=True).values()} == {"numeric"}  # constant kept
    with pytest.raises(KubetrainError, match="do not apply to an image table"):
        typed(pixels, image=True, drop_columns="p0")


# --- encodings -------------------------------------------------------------------------


def test_date_features_have_known_values():
    when = pd.Series(["2021-03-04 12:00", "2021-12-31 23:00", None, "junk"])  # Thursday, Friday
    seconds = ct.epoch_seconds(when, "iso")
    assert seconds[0] == pd.Timestamp("2021-03-04 12:00", tz="UTC").timestamp()
    assert np.isnan(seconds[2:]).all()
    earliest = pd.Timestamp("2021-03-01", tz="UTC").timestamp()
    steady, cyclic = ct.date_features(seconds[:2], earliest)
    np.testing.assert_allclose(steady, [[2021, 3.5], [2021, 305 + 23 / 24]])
    tau = 2 * math.pi
    expected = [
        [math.sin(tau * 2 / 12), math.cos(tau * 2 / 12), math.sin(tau * 3 / 7)]
        + [math.cos(tau * 3 / 7), 0.0, -1.0],
        [math.sin(tau * 11 / 12), math.cos(tau * 11 / 12), math.sin(tau * 4 / 7)]
        + [math.cos(tau * 4 / 7), math.sin(tau * 23 / 24), math.cos(tau * 23 / 24)],
    ]
    np.testing.assert_allclose(cyclic, expected, atol=1e-12)
    assert ct.feature_names("when", "datetime")[2] == "when:month_sin"


@pytest.mark.parametrize(
    "values, how",
    [
        (pd.Series(["2021-03-04T00:00:00Z"]), "iso"),
        (pd.Series(["2021-03-04T01:00:00+01:00"]), "iso"),
        (pd.Series(["03/04/2021"]), "mdy"),
        (pd.Series(["04/03/2021"]), "dmy"),
        (pd.Series(["04.03.2021 00:00"]), "dmy_dot"),
        (pd.Series(["2021/03/04"]), "ymd_slash"),
        (pd.Series(["Mar 4, 2021"]), "month_name"),
        (pd.Series([1614816000]), ct.EPOCH),
        (pd.Series(pd.to_datetime(["2021-03-04"])), ct.NATIVE),
    ],
)
def test_every_date_reading_gives_utc_epoch_seconds(values, how):
    assert ct.epoch_seconds(values, how)[0] == 1614816000.0  # 2021-03-04 00:00 UTC


def test_booleans_and_numbers_as_text():
    words = pd.Series(["Yes", " no ", "TRUE", "0", "maybe", None])
    np.testing.assert_array_equal(ct.to_float(words, "boolean"), [1, 0, 1, 0, np.nan, np.nan])
    flags = pd.Series([True, None, False], dtype=object)
    np.testing.assert_array_equal(ct.to_float(flags, "boolean"), [1, np.nan, 0])
    text = pd.Series([" 1.5", "n/a?", "-3e2", None])
    np.testing.assert_array_equal(ct.to_float(text, "numeric_text"), [1.5, np.nan, -300, np.nan])


@pytest.mark.parametrize("kind", ["high_cardinality", "text"])
def test_hashed_features_are_bounded_normalised_and_vocabulary_free(kind):
    width = ct.HASH_WIDTH[kind]
    col = pd.Series(["Anna Smith", "anna smith", None, "", "zz top was here", "Anna Smith"])
    X = ct.hashed(col, kind, width)
    assert X.shape == (6, width) and (X >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(X[[0, 1, 4]], axis=1), 1.0)
    assert not X[2].any() and not X[3].any()  # missing and empty: no n-grams
    np.testing.assert_array_equal(X[0], X[1])  # case does not matter
    np.testing.assert_array_equal(X[0], X[5])
    assert ct.feature_names("name", kind)[7] == "name:h07"
    gap = ct.hashed(pd.Series([None, None], dtype="str"), kind, width)  # a batch of gaps
    assert gap.shape == (2, width) and not gap.any()


def test_similar_names_share_character_trigrams():
    X = ct.hashed(pd.Series(["Smithson", "Smith", "Zhang"]), "high_cardinality", 32)
    assert X[0] @ X[1] > X[0] @ X[2] + 0.3


def test_word_bigrams_tell_word_order():
    X = ct.hashed(pd.Series(["dog bites man", "man bites dog"]), "text", 64)
    assert 0.3 < X[0] @ X[1] < 1.0  # same words, other bigrams


HASH_SCRIPT = """
import json, sys
import pandas as pd
from kubetrain.data.column_types import hashed
values = pd.Series(json.loads(sys.argv[1]))
print(json.dumps({k: hashed(values, k, w).tolist() for k, w in json.loads(sys.argv[2]).items()}))
"""


@pytest.mark.integration  # a second Python process
def test_hashed_features_are_the_same_in_another_process():
    values = ["Anna Smith", "Zoë Müller", "the quick brown fox", "x", None, "日本語 テキスト"]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own hash() would differ
    out = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT, json.dumps(values), json.dumps(ct.HASH_WIDTH)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    there = json.loads(out.stdout)
    for kind, width in ct.HASH_WIDTH.items():
        np.testing.assert_array_equal(
            np.array(there[kind]), ct.hashed(pd.Series(values), kind, width)
        )


def test_params_written_before_column_types_still_transform():
    """A bundle's params from before column types (numeric + categorical only)."""
    old = {
        "numeric": ["x"],
        "categorical": {"c": ["p", "q"]},
        "fill": {"x": 2.0, "c": "q"},
        "bounds": [[0.0], [10.0]],
        "scale": {"kind": "standard", "offset": [1.0, 0.0, 0.0], "scale": [2.0, 1.0, 1.0]},
    }
    prep = Preprocessor(RunConfig().clean, Schema("table", ["x", "c"], ["a", "b"]))
    prep.params = json.loads(json.dumps(old))
    frame = pd.DataFrame({"x": [np.nan, 5.0, 40.0], "c": ["p", None, "r"]})
    expected = [[0.5, 1, 0], [2.0, 0, 1], [4.5, 0, 0]]
    np.testing.assert_allclose(prep.transform(frame), expected)
    assert prep.feature_names() == ["x", "c=p", "c=q"]


# --- the clean stage -------------------------------------------------------------------


def test_a_table_with_names_dates_and_junk_now_cleans(tmp_path):
    frame = mixed_frame()
    cfg = cfg_with(scaling="none", feature_selection=False)  # every encoded column
    stats, splits = run_clean(tmp_path, save(tmp_path, frame), cfg)
    X, _, schema = splits["train"]
    assert not np.isnan(X).any()
    names = schema.feature_names
    assert names[:3] == ["amount", "count", "price"]  # continuous first, then dates' own
    assert "visited:year" in names and "visited:hour_cos" in names and "seen:days" in names
    assert "name:h00" in names and "name:h31" in names and "review:h63" in names
    assert "colour=red" in names and "member" in names
    assert not any(n.startswith(("price=", "caseid", "row_id", "source", "hollow")) for n in names)
    assert len(names) == 3 + 4 * 2 + 2 + 4 * 6 + 3 + 32 + 64
    assert schema.extra["categorical_columns"][0] == 3 + 4 * 2  # the bounded block
    assert stats["column_types"] == EXPECTED
    assert any("'price': numeric_text" in n and "6 junk" in n for n in stats["column_notes"])
    params = schema.extra["preprocessing"]
    json.dumps(params)  # JSON all the way: what serving replays
    assert params["types"]["price"] == "numeric_text" and params["hashed"]["review"]["width"] == 64
    report = quality_report(stats)
    assert "| price | numeric_text | parsed as numbers" in report
    assert "| review | text | 64 hashed word 1-2-gram features |" in report


def test_junk_cells_take_the_training_fill_not_82_one_hot_columns(tmp_path):
    cfg = cfg_with(scaling="none", impute="median")
    tr, va, te = planned_split(cfg)
    reading = np.array([f"{v:.1f}" for v in np.linspace(1, 9, 60)], dtype=object)
    junk = [tr[0], va[0], te[0]]
    reading[junk] = "n/a?"
    frame = planted(cfg, {"reading": reading})
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    assert splits["train"][2].feature_names == ["key", "reading"]
    assert stats["column_types"]["reading"] == "numeric_text"
    train_keys = sorted(by_key(splits, "train"))
    raw = pd.to_numeric(frame.set_index("key")["reading"], errors="coerce")
    median = float(raw[train_keys].median())
    for name, k in zip(SPLITS, keys_of(frame, junk), strict=True):
        assert by_key(splits, name)[k][1] == pytest.approx(median)


def test_date_elapsed_days_count_from_the_earliest_training_date(tmp_path):
    cfg = cfg_with(scaling="none")
    tr, va, te = planned_split(cfg)
    days = pd.Timestamp("2022-01-01") + pd.to_timedelta(np.arange(60) * 3, unit="D")
    when = days.strftime("%Y-%m-%d").to_numpy(dtype=object)
    when[te[0]] = "2019-06-01"  # the earliest date of all is a test row's
    frame = planted(cfg, {"when": when})
    stats, splits = run_clean(tmp_path, table(tmp_path, frame), cfg)
    params = splits["train"][2].extra["preprocessing"]
    train_dates = pd.to_datetime(frame.set_index("key")["when"][sorted(by_key(splits, "train"))])
    earliest = train_dates.min().tz_localize("UTC").timestamp()
    assert params["datetime"]["when"]["earliest"] == earliest
    assert earliest > pd.Timestamp("2019-06-01", tz="UTC").timestamp()
    names = splits["train"][2].feature_names
    days_col = names.index("when:days")
    (early,) = keys_of(frame, [te[0]])
    expected = (pd.Timestamp("2019-06-01", tz="UTC").timestamp() - earliest) / 86400
    assert by_key(splits, "test")[early][days_col] == pytest.approx(expected)
    assert min(row[days_col] for row in by_key(splits, "train").values()) == 0.0


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(impute="mean", outliers="iqr", outlier_action="drop", scaling="minmax"),
        dict(impute="most_frequent", outliers="zscore", column_types="caseid=highcard"),
        dict(impute="drop", drop_columns="review,name"),
    ],
    ids=["default", "iqr-drop", "mode-zscore", "drop"],
)
def test_streaming_equals_in_memory_and_the_reference_fit(tmp_path, changes):
    cfg = RunConfig.from_flat(changes)
    frame = mixed_frame()
    frame.loc[[3, 30, 300], "amount"] = np.nan
    frame.loc[[4, 40], "visited"] = None
    frame.loc[[5, 50], "name"] = None
    path = save(tmp_path, frame)
    mem_paths = [str(tmp_path / f"mem-{n}") for n in SPLITS]
    stream_paths = [str(tmp_path / f"stream-{n}") for n in SPLITS]
    mem = clean(path, *mem_paths, cfg.clean, cfg.seed)
    stream = clean_streaming(path, *stream_paths, cfg.clean, cfg.seed, batch_rows=37)
    assert {k: v for k, v in mem.items() if k != "seconds"} == {
        k: v for k, v in stream.items() if k != "seconds"
    }
    splits = {}
    for name, a, b in zip(SPLITS, mem_paths, stream_paths, strict=True):
        (Xa, ya, sa), (Xb, yb, sb) = load_split(a), load_split(b)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_allclose(Xa, Xb, rtol=1e-6, atol=1e-6)
        assert_close(sa.extra["preprocessing"], sb.extra["preprocessing"])
        splits[name] = Xa
    # the fitted params are what Preprocessor.fit learns from the same training rows
    plan = Plan.of(path, cfg.clean)
    whole, schema = load_table(path)
    # duplicates are judged on what the model sees: the kept columns and the label
    kept = whole[[*plan.kept, LABEL]].drop_duplicates().reset_index(drop=True)
    features = kept.drop(columns=[LABEL])
    if cfg.clean.impute == "drop":
        has_gap = features[plan.kept].isna().any(axis=1).to_numpy()
        kept, features = kept[~has_gap].reset_index(drop=True), features[~has_gap]
    y = kept[LABEL].map(plan.index).to_numpy(np.int64)
    codes = route(
        batch_hashes(kept, plan.numeric),
        y,
        cfg.clean.test_fraction,
        cfg.clean.val_fraction,
        cfg.seed,
    )
    train = features[codes == 0].reset_index(drop=True)
    prep = Preprocessor(cfg.clean, schema).fit(train, plan.types)
    params = load_split(mem_paths[0])[2].extra["preprocessing"]
    assert params["selected"]  # the four copies of one date: feature selection drops three
    prep.params["selected"] = params["selected"]  # (tests/data/test_feature_selection.py)
    assert_close(params, prep.params)
    if not (cfg.clean.outliers != "none" and cfg.clean.outlier_action == "drop"):
        np.testing.assert_allclose(splits["train"], prep.transform(train), rtol=1e-5, atol=1e-5)
