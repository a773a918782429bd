"""kubetrain.data.ingest: every source type into one canonical table, and every bad input
into one `KubetrainError` line with nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import LABEL, load_table
from kubetrain.data.ingest import ingest, load_source


def run(source, tmp_path: Path, label_column: str = "", task: str = "auto"):
    out = tmp_path / "out" / "table"
    meta = ingest(str(source), label_column, str(out), task=task)
    frame, schema = load_table(out)
    return meta, frame, schema


def fails(source, tmp_path: Path, *needles: str, label_column: str = "", task: str = "auto") -> str:
    """Ingest must raise one-line KubetrainError mentioning `needles`, writing nothing."""
    parent = tmp_path / "out"
    parent.mkdir(parents=True, exist_ok=True)
    out = parent / "table"
    with pytest.raises(KubetrainError) as info:
        ingest(str(source), label_column, str(out), task=task)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    assert not out.exists()
    assert list(parent.iterdir()) == [], "temp dirs left behind"
    return message


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- built-ins -------------------------------------------------------------------------


def test_digits_is_an_image_dataset(tmp_path):
    meta, frame, schema = run("digits", tmp_path)
    assert schema.kind == meta["kind"] == "image"
    assert schema.image_shape == meta["image_shape"] == [1, 8, 8]
    assert len(schema.feature_names) == meta["features"] == 64
    assert meta["rows"] == len(frame) == 1797
    assert schema.class_names == meta["classes"] == [str(i) for i in range(10)]
    assert sum(meta["class_counts"].values()) == 1797
    assert meta["class_counts"]["0"] == 178
    assert list(frame.columns) == schema.feature_names + [LABEL]
    assert meta["missing_values"] == 0
    assert schema.extra["source"] == "digits"
    # pixel values in row-major order: first image's pixel (2, 3) from sklearn
    from sklearn.datasets import load_digits

    assert frame["pixel_2_3"].iloc[0] == load_digits().images[0][2, 3]


@pytest.mark.parametrize(
    "name, rows, features, classes",
    [
        ("breast_cancer", 569, 30, {"malignant": 212, "benign": 357}),
        ("wine", 178, 13, {"class_0": 59, "class_1": 71, "class_2": 48}),
    ],
)
def test_table_builtins(tmp_path, name, rows, features, classes):
    meta, frame, schema = run(name, tmp_path)
    assert schema.kind == "table" and schema.image_shape is None and meta["image_shape"] == []
    assert meta["rows"] == len(frame) == rows
    assert len(schema.feature_names) == features
    assert meta["class_counts"] == classes
    assert sorted(schema.class_names) == sorted(classes)


# --- files ---------------------------------------------------------------------------


def test_csv_with_string_labels_categorical_and_missing(tmp_path):
    path = write_csv(
        tmp_path / "pets.csv",
        "weight,colour,species\n"
        "4.5,black,dog\n"
        ",white,cat\n"
        "3.0,,cat\n"
        "7.25,black,dog\n"
        "2.0,ginger,cat\n",
    )
    meta, frame, schema = run(path, tmp_path, label_column="species")
    assert schema.kind == "table"
    assert schema.feature_names == ["weight", "colour"]
    assert schema.class_names == meta["classes"] == ["cat", "dog"]
    assert meta["class_counts"] == {"cat": 3, "dog": 2}
    assert meta["missing_values"] == 2
    assert frame[LABEL].tolist() == ["dog", "cat", "cat", "dog", "cat"]
    assert frame["weight"].isna().tolist() == [False, True, False, False, False]
    assert frame["weight"].iloc[3] == 7.25
    assert frame["colour"].tolist()[:2] == ["black", "white"] and pd.isna(frame["colour"][2])


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame(
        {"a": [1.0, 2.0, 3.0, 4.0], "b": ["x", "y", "x", "y"], "target": [1, 0, 1, 0]}
    ).to_parquet(path)
    meta, frame, schema = run(path, tmp_path)
    assert schema.feature_names == ["a", "b"]
    assert schema.class_names == ["0", "1"]
    assert frame[LABEL].tolist() == ["1", "0", "1", "0"]
    assert frame["b"].tolist() == ["x", "y", "x", "y"]


def test_npz_images(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.random((12, 5, 6)).astype(np.float32)
    y = np.array([0, 1, 2] * 4)
    np.savez(tmp_path / "imgs.npz", X=X, y=y)
    meta, frame, schema = run(tmp_path / "imgs.npz", tmp_path)
    assert schema.kind == "image" and schema.image_shape == [1, 5, 6]
    assert len(schema.feature_names) == 30 and meta["rows"] == 12
    assert schema.class_names == ["0", "1", "2"]
    np.testing.assert_array_equal(frame[schema.feature_names].to_numpy(), X.reshape(12, -1))


def test_npz_channel_images(tmp_path):
    X = np.zeros((6, 3, 4, 4), np.float32)
    np.savez(tmp_path / "rgb.npz", X=X, y=np.array([0, 1] * 3))
    _, _, schema = run(tmp_path / "rgb.npz", tmp_path)
    assert schema.kind == "image" and schema.image_shape == [3, 4, 4]
    assert len(schema.feature_names) == 48


def test_npz_features(tmp_path):
    X = np.arange(24, dtype=np.float64).reshape(8, 3)
    np.savez(tmp_path / "feats.npz", X=X, y=np.array(["b", "a"] * 4))
    meta, frame, schema = run(tmp_path / "feats.npz", tmp_path)
    assert schema.kind == "table" and schema.image_shape is None
    assert schema.feature_names == ["feature_0", "feature_1", "feature_2"]
    assert schema.class_names == ["a", "b"]
    np.testing.assert_array_equal(frame[schema.feature_names].to_numpy(), X)


def test_s3_csv(tmp_path, s3_env):
    bucket = s3_env
    local = write_csv(tmp_path / "remote.csv", "x1,x2,class\n1,2,a\n3,4,b\n5,6,a\n7,8,b\n")
    uri = f"s3://{bucket}/data/remote.csv"
    storage.upload(local, uri)
    meta, frame, schema = run(uri, tmp_path)
    assert meta["source"] == schema.extra["source"] == uri
    assert meta["rows"] == 4 and schema.class_names == ["a", "b"]
    assert frame["x2"].tolist() == [2, 4, 6, 8]
    # same content locally and remotely: same hash
    local_meta = ingest(str(local), "", str(tmp_path / "local"))
    assert meta["content_hash"] == local_meta["content_hash"]
    (tmp_path / "missing").mkdir()
    fails(f"s3://{bucket}/data/absent.csv", tmp_path / "missing", "absent.csv")


@pytest.mark.parametrize("name", ["label", "target", "class", "Class"])
def test_label_autodetection(tmp_path, name):
    path = write_csv(tmp_path / "t.csv", f"a,{name},b\n1,x,2\n3,y,4\n5,x,6\n")
    meta, frame, schema = run(path, tmp_path)
    assert schema.feature_names == ["a", "b"]
    assert frame[LABEL].tolist() == ["x", "y", "x"]
    assert frame["b"].tolist() == [2, 4, 6]


def test_numeric_classes_sort_numerically(tmp_path):
    path = write_csv(tmp_path / "n.csv", "f,label\n1,10\n2,2\n3,10\n4,2\n5,1\n")
    meta, frame, schema = run(path, tmp_path)
    assert schema.class_names == ["1", "2", "10"]
    assert meta["class_counts"] == {"1": 1, "2": 2, "10": 2}
    # numeric NPZ labels too
    np.savez(tmp_path / "n.npz", X=np.zeros((4, 2)), y=np.array([10, 2, 10, 2]))
    assert load_source(str(tmp_path / "n.npz"))[1].class_names == ["2", "10"]


def test_content_hash_stable_and_sensitive(tmp_path):
    text = "a,b,label\n1.5,x,p\n2.5,y,q\n3.5,x,p\n"
    path = write_csv(tmp_path / "h.csv", text)
    first = ingest(str(path), "", str(tmp_path / "one"))["content_hash"]
    second = ingest(str(path), "", str(tmp_path / "two"))["content_hash"]
    assert first == second and len(first) == 64
    write_csv(path, text.replace("2.5", "2.6"))
    assert ingest(str(path), "", str(tmp_path / "three"))["content_hash"] != first
    write_csv(path, text.replace("y,q", "y,p").replace("3.5,x,p", "3.5,x,q"))
    assert ingest(str(path), "", str(tmp_path / "four"))["content_hash"] != first


def test_rewrite_replaces_previous_output(tmp_path):
    out = tmp_path / "t"
    (out).mkdir()
    (out / "stale.txt").write_text("old")
    ingest("wine", "", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "part-00000.parquet"]


# --- bad input -------------------------------------------------------------------------


def test_missing_file(tmp_path):
    fails(tmp_path / "nope.csv", tmp_path, "nope.csv", "not found", "pass an existing")


def test_unsupported_extension(tmp_path):
    path = write_csv(tmp_path / "data.txt", "a,label\n1,x\n")
    fails(path, tmp_path, "unsupported file type .txt", ".csv", "digits")


@pytest.mark.parametrize("content", ["a,b,label\n", ""], ids=["header-only", "zero-bytes"])
def test_empty_csv(tmp_path, content):
    path = write_csv(tmp_path / "empty.csv", content)
    fails(path, tmp_path, "empty.csv", "is empty", "give a table with a header and data rows")


def test_zero_byte_parquet(tmp_path):
    path = write_csv(tmp_path / "empty.parquet", "")
    fails(path, tmp_path, "cannot parse", "empty.parquet", "valid file")


def test_unknown_label_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", "alpha,beta,gamma\n1,2,x\n3,4,y\n")
    msg = fails(
        path, tmp_path, "'species'", "alpha, beta, gamma", "--label-column", label_column="species"
    )
    assert "not in" in msg


def test_no_label_column_to_guess(tmp_path):
    path = write_csv(tmp_path / "t.csv", "alpha,beta\n1,x\n3,y\n")
    fails(path, tmp_path, "no label column", "alpha, beta", "--label-column")


def test_feature_named_label_is_not_overwritten(tmp_path):
    # 'label' is a feature here; the real labels are in 'species': must not leak
    path = write_csv(tmp_path / "t.csv", "label,species\n1,a\n2,b\n3,a\n")
    fails(path, tmp_path, "feature column named 'label'", "rename", label_column="species")


def test_only_one_class(tmp_path):
    path = write_csv(tmp_path / "one.csv", "a,label\n1,x\n2,x\n3,x\n")
    fails(path, tmp_path, "only one class", "'x'", "at least two")


def test_nan_labels(tmp_path):
    path = write_csv(tmp_path / "nan.csv", "a,label\n1,x\n2,\n3,y\n4,\n5,\n")
    fails(path, tmp_path, "3 missing value(s)", "first at row 1", "fill or drop")


@pytest.mark.parametrize(
    "X, y, needles",
    [
        (np.zeros((5, 3)), np.zeros(4), ("X has 5 rows but y has 4", "must match")),
        (np.zeros((4, 3)), np.zeros((4, 1)), ("y must be 1-D", "(4, 1)")),
        (np.zeros((2, 1, 1, 2, 2)), np.zeros(2), ("X must be", "(2, 1, 1, 2, 2)")),
        (np.array([["a"], ["b"]]), np.array([0, 1]), ("X must be numeric",)),
        (np.zeros((3, 2)), np.array([0.0, np.nan, 1.0]), ("1 missing value(s)", "row 1")),
    ],
    ids=["rows-mismatch", "y-2d", "x-5d", "x-text", "y-nan"],
)
def test_bad_npz_shapes(tmp_path, X, y, needles):
    np.savez(tmp_path / "bad.npz", X=X, y=y)
    fails(tmp_path / "bad.npz", tmp_path, "bad.npz", *needles)


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "arr.npz", data=np.zeros((3, 2)), classes=np.zeros(3))
    fails(tmp_path / "arr.npz", tmp_path, "needs arrays named X and y", "data, classes")


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04truncated", b"plain text"],
    ids=["zero-bytes", "broken-zip", "not-a-zip"],
)
def test_unreadable_npz(tmp_path, content):
    (tmp_path / "broken.npz").write_bytes(content)
    fails(tmp_path / "broken.npz", tmp_path, "cannot read", "as NPZ", "numpy.savez")


def test_npy_saved_as_npz(tmp_path):
    np.save(tmp_path / "single.npy", np.zeros((3, 2)))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    fails(tmp_path / "single.npz", tmp_path, "one array", "numpy.savez")


@pytest.mark.parametrize("uri", ["s3://bad bucket/data.csv", "s3:///data.csv", "s3://"])
def test_malformed_s3_uri(tmp_path, uri):
    fails(uri, tmp_path, "s3://BUCKET/KEY", "bucket")


# --- streaming: batches, parts, CSV blocks -----------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """CSV blocks of 512 bytes (pyarrow infers column types from the first one), batches
    of 40 rows and parts of about 64 rows: a few hundred rows cross every boundary."""
    from kubetrain.data import datasets
    from kubetrain.data import ingest as module

    monkeypatch.setattr(module, "CSV_BLOCK_BYTES", 512)
    monkeypatch.setattr(module, "BATCH_ROWS", 40)
    monkeypatch.setattr(module, "PROGRESS_EVERY", 2)
    monkeypatch.setattr(datasets, "TABLE_PART_BYTES", 64 * 30)  # about 30 bytes a row


def numbered_csv(path: Path, rows: int, line=lambda i: f"{i},{i % 7},{'ab'[i % 2]}") -> Path:
    """A CSV of `rows` rows (columns n, m, label by default); `line(i)` writes row i."""
    lines = ["n,m,label", *(line(i) for i in range(rows))]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_large_csv_streams_into_several_parts(tmp_path, small_blocks, capsys):
    path = numbered_csv(tmp_path / "big.csv", 1000)
    meta, frame, schema = run(path, tmp_path)
    parts = sorted(p.name for p in (tmp_path / "out" / "table").glob("part-*.parquet"))
    assert len(parts) > 3
    assert meta["rows"] == len(frame) == 1000
    assert frame["n"].tolist() == list(range(1000)) and frame["n"].dtype == np.int64
    assert meta["class_counts"] == {"a": 500, "b": 500} and schema.class_names == ["a", "b"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 3 and re.fullmatch(
        r"kubetrain \| ingest \| \d+ rows read \(\d+%, ETA .*\)", lines[0]
    )
    expected = pd.read_csv(path)  # what pandas makes of the same file
    assert frame["m"].tolist() == expected["m"].tolist()


def test_content_hash_and_counts_do_not_depend_on_batching(tmp_path, monkeypatch):
    """Missing values in some batches only (an int column is float64 there)."""
    from kubetrain.data import ingest as module

    def line(i: int) -> str:
        category = "" if i % 31 == 0 else f"c{i % 4}"
        return f"{'' if i % 97 == 5 else i},{i * 0.5},{category},{i % 3}"

    path = tmp_path / "h.csv"
    path.write_text("n,f,c,label\n" + "\n".join(line(i) for i in range(600)) + "\n")
    results = []
    for block, batch in ((1 << 20, 65_536), (300, 7), (1000, 50)):
        monkeypatch.setattr(module, "CSV_BLOCK_BYTES", block)
        monkeypatch.setattr(module, "BATCH_ROWS", batch)
        meta = ingest(str(path), "", str(tmp_path / f"out-{batch}"))
        results.append({k: meta[k] for k in ("content_hash", "class_counts", "missing_values")})
    assert results[0] == results[1] == results[2]
    assert results[0]["class_counts"] == {"0": 200, "1": 200, "2": 200}
    assert results[0]["missing_values"] == 7 + 20


def test_missing_labels_are_counted_across_batches(tmp_path, small_blocks):
    path = numbered_csv(
        tmp_path / "gaps.csv", 300, lambda i: f"{i},{i},{'' if i in (173, 250) else 'ab'[i % 2]}"
    )
    fails(path, tmp_path, "2 missing value(s)", "first at row 173", "fill or drop")


def test_a_number_column_with_text_after_the_first_block_becomes_text(
    tmp_path, small_blocks, capsys
):
    """pyarrow types columns from the first block; pandas makes such a column text."""
    path = numbered_csv(
        tmp_path / "late.csv",
        400,
        lambda i: f"{i},{'unknown' if i == 350 else i % 7},{'ab'[i % 2]}",
    )
    meta, frame, _ = run(path, tmp_path)
    assert "column 'm' holds 'unknown' after its first block" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["table"]  # no temp dirs left
    assert meta["rows"] == 400
    assert not pd.api.types.is_numeric_dtype(frame["m"])
    assert frame["m"][350] == "unknown" and frame["m"][9] == "2"
    assert frame["n"].dtype == np.int64  # the other columns keep their types
    assert pd.read_csv(path)["m"][9] == "2"  # pandas agrees


def test_ints_then_floats_become_floats_and_a_late_first_value_too(tmp_path, small_blocks):
    path = numbered_csv(
        tmp_path / "wider.csv",
        400,
        lambda i: f"{i + 0.5 if i == 399 else i},{i if i > 300 else ''},{'ab'[i % 2]}",
    )
    meta, frame, _ = run(path, tmp_path)
    assert frame["n"].dtype == frame["m"].dtype == np.float64
    assert frame["n"].iloc[-1] == 399.5 and frame["m"].iloc[-1] == 399
    assert meta["missing_values"] == 301


def test_a_row_longer_than_a_block_is_read_with_bigger_blocks(tmp_path, small_blocks):
    long = "w" * 3000
    path = numbered_csv(
        tmp_path / "wide.csv", 300, lambda i: f"{i},{long if i == 200 else 'v'},{'ab'[i % 2]}"
    )
    meta, frame, _ = run(path, tmp_path)
    assert meta["rows"] == 300 and frame["m"][200] == long and frame["m"][199] == "v"


def test_a_few_malformed_rows_are_skipped_and_reported(tmp_path, small_blocks):
    """A broken row or two (a newline inside an unquoted value) should not cost the table."""
    path = numbered_csv(
        tmp_path / "bad.csv", 500, lambda i: f"{i},{i},{'ab'[i % 2]}" + (",9" if i == 411 else "")
    )
    meta, frame, schema = run(path, tmp_path)
    assert meta["rows"] == 499 and 411 not in frame["n"].tolist()
    assert meta["skipped_rows"]["count"] == 1 and "411,411" in meta["skipped_rows"]["examples"][0]
    from kubetrain.data.validation import header_anomalies

    (anomaly,) = header_anomalies(schema)
    assert anomaly.kind == "malformed_rows" and anomaly.severity == "handled"


def test_many_malformed_rows_fail_naming_the_first(tmp_path, small_blocks):
    path = numbered_csv(
        tmp_path / "bad.csv",
        500,
        lambda i: f"{i},{i},{'ab'[i % 2]}" + (",9" if i >= 411 and i % 7 == 0 else ""),
    )
    message = fails(path, tmp_path, "bad.csv", "data row 414", "4 fields", "header has 3")
    assert "fix that row" in message
    short = numbered_csv(tmp_path / "short.csv", 500, lambda i: "7" if i >= 60 else f"{i},{i},a")
    fails(short, tmp_path, "data row 61", "1 fields", "header has 3")


def test_null_markers_as_pandas_reads_them(tmp_path):
    markers = ["NA", "N/A", "NaN", "nan", "null", "NULL", "None", "<NA>", "", "#N/A", "n/a"]
    rows = "".join(f"{m},{m},{'ab'[i % 2]}\n" for i, m in enumerate(markers))
    path = write_csv(tmp_path / "nulls.csv", "x,word,label\n1.5,text,a\n" + rows)
    meta, frame, _ = run(path, tmp_path)
    assert meta["missing_values"] == 2 * len(markers)
    assert frame["x"].dtype == np.float64
    assert frame["word"].isna().sum() == len(markers) and frame["word"][0] == "text"
    assert meta["missing_values"] == int(pd.read_csv(path).drop(columns="label").isna().sum().sum())


def test_csv_columns_as_pandas_names_and_types_them(tmp_path):
    path = write_csv(
        tmp_path / "cols.csv",
        "a,a,,a.1,when,empty,label\n1,2,3,4,2024-01-02,,x\n5,6,7,8,2024-02-03,,y\n",
    )
    _, frame, schema = run(path, tmp_path)
    expected = pd.read_csv(path)
    assert schema.feature_names == [c for c in expected.columns if c != "label"]
    assert schema.feature_names == ["a", "a.2", "Unnamed: 2", "a.1", "when", "empty"]
    assert frame["when"].tolist() == ["2024-01-02", "2024-02-03"]  # dates stay text
    assert frame["empty"].dtype == np.float64 and frame["empty"].isna().all()


def test_parquet_streams_without_its_pandas_index(tmp_path, small_blocks):
    source = pd.DataFrame(
        {
            "v": np.arange(300, dtype=np.float64),
            "c": pd.Categorical(["p", "q", "r"] * 100),
            "target": [1, 2, 3] * 100,
        },
        index=pd.Index(np.arange(300) * 2, name="row_id"),
    )
    source.to_parquet(tmp_path / "src.parquet", row_group_size=50)
    meta, frame, schema = run(tmp_path / "src.parquet", tmp_path)
    assert schema.feature_names == ["v", "c"]  # not row_id
    assert frame["c"].tolist() == ["p", "q", "r"] * 100
    assert schema.class_names == ["1", "2", "3"] and meta["rows"] == 300
    assert frame["v"].tolist() == list(range(300))


def test_s3_streams_csv_and_parquet(tmp_path, s3_env, small_blocks):
    bucket = s3_env
    local = numbered_csv(tmp_path / "s.csv", 600)
    storage.upload(local, f"s3://{bucket}/data/s.csv")
    meta, frame, _ = run(f"s3://{bucket}/data/s.csv", tmp_path / "a")
    assert meta["rows"] == 600 and frame["n"].tolist() == list(range(600))
    assert meta["content_hash"] == ingest(str(local), "", str(tmp_path / "local"))["content_hash"]
    late = numbered_csv(
        tmp_path / "late.csv", 400, lambda i: f"{i},{'x' if i == 390 else i},{'ab'[i % 2]}"
    )
    storage.upload(late, f"s3://{bucket}/data/late.csv")
    _, frame, _ = run(f"s3://{bucket}/data/late.csv", tmp_path / "b")
    assert frame["m"][390] == "x" and frame["m"][5] == "5"
    pd.read_csv(local).to_parquet(tmp_path / "s.parquet")
    storage.upload(tmp_path / "s.parquet", f"s3://{bucket}/data/s.parquet")
    meta, frame, _ = run(f"s3://{bucket}/data/s.parquet", tmp_path / "c")
    assert meta["rows"] == 600 and meta["class_counts"] == {"a": 300, "b": 300}
    bad = numbered_csv(tmp_path / "bad.csv", 300, lambda i: "1,2,3,4" if i >= 250 else f"{i},1,a")
    storage.upload(bad, f"s3://{bucket}/data/bad.csv")
    (tmp_path / "d").mkdir()
    fails(f"s3://{bucket}/data/bad.csv", tmp_path / "d", "data row 251", "4 fields")


def test_a_continuous_numeric_label_is_a_regression_unless_classes_are_asked_for(tmp_path):
    rows = "".join(f"{i},{1000 + 17 * i}.5\n" for i in range(200))
    path = write_csv(tmp_path / "salaries.csv", "years,salary\n" + rows)
    meta, frame, schema = run(path, tmp_path, label_column="salary")
    assert (meta["task"], schema.task, schema.class_names) == ("regression", "regression", [])
    assert sorted(frame["label"].astype(float)) == [1000 + 17 * i + 0.5 for i in range(200)]
    message = fails(
        path,
        tmp_path / "c",
        "200 distinct numbers",
        "--task regression",
        "bin it",
        label_column="salary",
        task="classification",
    )
    assert "\n" not in message
    many = "".join(f"{i},{i % 30}\n" for i in range(3000))  # 30 numeric classes, 100 rows each
    ok = write_csv(tmp_path / "classes.csv", "x,label\n" + many)
    meta, _, schema = run(ok, tmp_path / "ok")
    assert (len(meta["classes"]), schema.task) == (30, "classification")
    # ...which --task regression reads as numbers
    meta, _, schema = run(ok, tmp_path / "reg", task="regression")
    assert (schema.task, schema.class_names) == ("regression", [])


def test_regression_needs_finite_numeric_labels(tmp_path):
    text = write_csv(tmp_path / "t.csv", "x,y\n" + "".join(f"{i},v{i % 3}\n" for i in range(60)))
    fails(text, tmp_path / "a", "'v0'", "not a number", task="regression", label_column="y")
    inf = write_csv(
        tmp_path / "i.csv", "x,y\n" + "".join(f"{i},{i}.5\n" for i in range(60)) + "61,inf\n"
    )
    fails(inf, tmp_path / "b", "'inf'", "not a number", task="regression", label_column="y")
    one = write_csv(tmp_path / "o.csv", "x,y\n" + "".join(f"{i},2.5\n" for i in range(60)))
    fails(one, tmp_path / "c", "single value", task="regression", label_column="y")


def test_a_label_with_too_many_values_to_count_is_no_set_of_classes(tmp_path, monkeypatch):
    from kubetrain.data import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "MAX_COUNTED_LABELS", 50)
    names = write_csv(tmp_path / "n.csv", "x,who\n" + "".join(f"{i},name{i}\n" for i in range(80)))
    fails(names, tmp_path / "a", "over 50 distinct values", label_column="who")
    numbers = write_csv(
        tmp_path / "m.csv", "x,y\n" + "".join(f"{i},{i * 1.5}\n" for i in range(80))
    )
    meta, _, schema = run(numbers, tmp_path / "b", label_column="y")
    assert schema.task == "regression"


def test_a_csv_whose_every_row_is_malformed_names_the_first_not_empty(tmp_path):
    path = write_csv(tmp_path / "bad.csv", "a,b,label\n1,2\n3,4,5,6\n")
    message = fails(path, tmp_path, "data row 1", "2 fields", "header has 3")
    assert "empty" not in message
