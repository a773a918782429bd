"""kubetrain.data.datasets' table format: bounded Parquet parts plus meta.json (written last,
with every part's rows, size and sha256), read back in row order, checked part by part;
tables of the previous format (one data.parquet) still read."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import (
    LABEL,
    ContentHash,
    Schema,
    content_hash,
    load_table,
    numeric_columns,
    save_table,
    table_arrow_schema,
    table_batches,
    table_files,
    table_schema,
    table_writer,
)

SCHEMA = Schema("table", ["n", "f", "s", "b"], ["x", "y"], extra={"source": "test"})


def frame(rows: int = 50) -> pd.DataFrame:
    """Ints, floats with gaps, text with gaps, booleans and labels."""
    i = np.arange(rows)
    return pd.DataFrame(
        {
            "n": i * 3,
            "f": np.where(i % 7 == 3, np.nan, i / 4),
            "s": pd.Series([None if k % 5 == 1 else f"t{k % 3}" for k in i], dtype="str"),
            "b": i % 2 == 0,
            LABEL: np.where(i % 3 == 0, "x", "y"),
        }
    )


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def write_parts(path: Path, data: pd.DataFrame, **bounds) -> dict:
    """Write `data` in batches of 9 rows; the schema is set at the end, as ingest does."""
    table = pa.Table.from_pandas(data, preserve_index=False)
    with table_writer(path, Schema("table", [], []), **bounds) as writer:
        for start in range(0, len(data), 9):
            writer.write(table.slice(start, 9).to_batches()[0])
        writer.schema = SCHEMA
    return json.loads((path / "meta.json").read_text())


def test_parts_round_trip_in_row_order(tmp_path):
    data = frame(50)
    meta = write_parts(tmp_path / "t", data, part_rows=12)
    names = [f"part-{i:05d}.parquet" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["meta.json", *names]
    assert [p["name"] for p in meta["parts"]] == names
    assert [p["rows"] for p in meta["parts"]] == [12, 12, 12, 12, 2]
    assert meta["rows"] == 50
    for part in meta["parts"]:
        path = tmp_path / "t" / part["name"]
        assert part["bytes"] == path.stat().st_size and len(part["sha256"]) == 64
    assert {k: meta[k] for k in asdict(SCHEMA)} == asdict(SCHEMA)
    assert table_schema(tmp_path / "t") == SCHEMA
    assert table_files(tmp_path / "t") == [tmp_path / "t" / n for n in names]
    schemas = {pq.read_schema(p) for p in table_files(tmp_path / "t")}
    assert len(schemas) == 1 and table_arrow_schema(tmp_path / "t") == schemas.pop()
    loaded, schema = load_table(tmp_path / "t")
    assert schema == SCHEMA
    pd.testing.assert_frame_equal(loaded, data)
    batches = list(table_batches(tmp_path / "t", 5))
    assert all(0 < len(b) <= 5 for b in batches)
    joined = pd.concat(batches, ignore_index=True)
    pd.testing.assert_frame_equal(joined.astype(data.dtypes.to_dict()), data)


def test_parts_and_row_groups_are_bounded_in_bytes(tmp_path, monkeypatch):
    from kubetrain.data import datasets

    monkeypatch.setattr(datasets, "TABLE_ROW_GROUP_BYTES", 2_000)
    data = pd.DataFrame({"v": np.arange(4000, dtype=np.float64), LABEL: ["a", "b"] * 2000})
    with table_writer(tmp_path / "t", SCHEMA, part_bytes=20_000) as writer:
        writer.write(pa.Table.from_pandas(data, preserve_index=False))
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert len(meta["parts"]) > 3 and sum(p["rows"] for p in meta["parts"]) == 4000
    for path in table_files(tmp_path / "t"):
        info = pq.ParquetFile(path).metadata
        assert info.num_rows * 13 <= 20_000 + 13  # about 13 bytes a row of Arrow data
        assert info.num_row_groups > 1
        assert all(
            info.row_group(g).num_rows * 13 <= 2_000 + 13 for g in range(info.num_row_groups)
        )
    pd.testing.assert_frame_equal(load_table(tmp_path / "t")[0], data)


def test_save_table_keeps_dtypes(tmp_path):
    data = frame(30)
    data["c"] = pd.Categorical(["p", "q", "p"] * 10)
    save_table(tmp_path / "t", data, SCHEMA)
    assert [p.name for p in table_files(tmp_path / "t")] == ["part-00000.parquet"]
    pd.testing.assert_frame_equal(load_table(tmp_path / "t")[0], data)


def test_an_empty_frame_still_has_its_columns_on_disk(tmp_path):
    save_table(tmp_path / "t", frame(0), SCHEMA)
    assert table_arrow_schema(tmp_path / "t").names == ["n", "f", "s", "b", LABEL]
    assert len(load_table(tmp_path / "t")[0]) == 0
    assert list(table_batches(tmp_path / "t", 10)) == []


def test_the_previous_format_still_reads(tmp_path):
    """One data.parquet and a meta.json without parts, as save_table used to write."""
    data = frame(20)
    root = tmp_path / "old"
    root.mkdir()
    data.to_parquet(root / "data.parquet", index=False)
    (root / "meta.json").write_text(json.dumps(asdict(SCHEMA), indent=2))
    loaded, schema = load_table(root)
    assert schema == table_schema(root) == SCHEMA
    pd.testing.assert_frame_equal(loaded, data)
    assert table_files(root) == [root / "data.parquet"]
    assert table_arrow_schema(root).names == list(data.columns)
    assert sum(len(b) for b in table_batches(root, 7)) == 20


def test_a_batch_that_does_not_fit_fails_and_publishes_nothing(tmp_path):
    out = tmp_path / "t"
    with pytest.raises(KubetrainError) as info, table_writer(out, SCHEMA) as writer:
        writer.write(pa.table({"a": [1, 2], LABEL: ["x", "y"]}))
        writer.write(pa.table({"b": [1, 2], LABEL: ["x", "y"]}))
    assert "same columns" in one_line(info)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with table_writer(out, SCHEMA) as writer:  # types that cast are cast
        writer.write(pa.table({"a": [1.5, 2.0], LABEL: ["x", "y"]}))
        writer.write(pa.table({"a": [3, 4], LABEL: ["x", "y"]}))
    assert load_table(out)[0]["a"].tolist() == [1.5, 2.0, 3.0, 4.0]


def test_a_failed_write_keeps_the_previous_table(tmp_path):
    save_table(tmp_path / "t", frame(10), SCHEMA)
    with pytest.raises(RuntimeError), table_writer(tmp_path / "t", SCHEMA) as writer:
        writer.write(pa.Table.from_pandas(frame(40), preserve_index=False))
        raise RuntimeError("the source broke halfway")
    assert len(load_table(tmp_path / "t")[0]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_part_fails_in_one_line_naming_it(tmp_path, damage):
    write_parts(tmp_path / "t", frame(50), part_rows=20)
    part = tmp_path / "t" / "part-00001.parquet"
    body = part.read_bytes()
    if damage == "flip":
        part.write_bytes(body[:100] + bytes([body[100] ^ 1]) + body[101:])
    elif damage == "truncate":
        part.write_bytes(body[:-10])
    else:
        part.unlink()
    expected = {"flip": "sha256 does not match", "truncate": "expected", "delete": "missing"}
    for read in (load_table, lambda p: list(table_batches(p, 8))):
        with pytest.raises(KubetrainError) as info:
            read(tmp_path / "t")
        message = one_line(info)
        assert "part-00001.parquet" in message and expected[damage] in message
        assert "re-run ingest" in message


def test_a_part_damaged_after_a_read_is_checked_again(tmp_path):
    """A stage reads a table several times and hashes each part once; a part changed
    after that (a new mtime) is hashed again, so the damage is still caught."""
    write_parts(tmp_path / "t", frame(50), part_rows=20)
    assert sum(len(b) for b in table_batches(tmp_path / "t", 8)) == 50  # checked here
    part = tmp_path / "t" / "part-00001.parquet"
    body, mtime = part.read_bytes(), part.stat().st_mtime_ns
    part.write_bytes(body[:100] + bytes([body[100] ^ 1]) + body[101:])
    os.utime(part, ns=(mtime + 1_000_000, mtime + 1_000_000))  # whatever the clock's tick
    with pytest.raises(KubetrainError, match=r"part-00001\.parquet is damaged: its sha256"):
        list(table_batches(tmp_path / "t", 8))


def test_not_a_table(tmp_path):
    with pytest.raises(KubetrainError) as info:
        load_table(tmp_path)
    assert "no meta.json" in one_line(info)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(KubetrainError) as info:
        table_schema(tmp_path)
    assert "damaged" in one_line(info) and "re-run ingest" in one_line(info)
    (tmp_path / "meta.json").write_text(json.dumps(asdict(SCHEMA)))  # old format, no file
    with pytest.raises(KubetrainError) as info:
        table_files(tmp_path)
    assert "no data.parquet" in one_line(info)


def test_content_hash_does_not_depend_on_batching():
    """Batches with and without missing values read the same int column as float64
    and int64; the hash must not see the difference."""
    data = pd.DataFrame(
        {
            "n": pd.array([1, 2, None, 4, 5, 6], dtype="Int64"),
            "s": ["a", None, "c", "a", "b", "c"],
            "b": [True, False, None, True, True, False],
            LABEL: ["x", "y"] * 3,
        }
    )
    whole = content_hash(data)
    table = pa.Table.from_pandas(data, preserve_index=False)
    numeric = numeric_columns(table.schema.empty_table().to_pandas())
    assert numeric == ["n"]
    for size in (1, 2, 4):
        digest = ContentHash(list(data.columns), numeric)
        for batch in table.to_batches(max_chunksize=size):
            digest.update(batch.to_pandas())  # "n": int64 in some batches, float64 in others
        assert digest.hexdigest() == whole
    changed = data.copy()
    changed.loc[5, "n"] = 7
    assert content_hash(changed) != whole
    assert content_hash(data.rename(columns={"s": "t"})) != whole
