"""The sharded dataset format (kubetrain.data.shards) and load_split/save_split on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data import shards
from kubetrain.data.datasets import Schema, load_split, save_split, save_split_npz

TABLE = Schema("table", [f"f{i}" for i in range(22)], ["no", "yes", "maybe"])
IMAGES = Schema(
    "image", [f"p{i}" for i in range(3 * 8 * 8)], [str(d) for d in range(10)], [3, 8, 8]
)


def table(rows: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 22)).astype(np.float32), rng.integers(0, 3, rows)


def shard_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("part-*.parquet"))


# --- round trips ---------------------------------------------------------------------


def test_table_round_trip_and_manifest(tmp_path):
    X, y = table()
    manifest = shards.write(tmp_path / "ds", X, y, TABLE, stats={"mean": np.zeros(2)})
    X2, y2, schema = shards.read_all(tmp_path / "ds")
    assert np.array_equal(X2, X) and np.array_equal(y2, y) and schema == TABLE
    assert X2.dtype == np.float32 and y2.dtype == np.int64
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "_manifest.json",
        "part-00000.parquet",
    ]
    assert manifest == shards.read_manifest(tmp_path / "ds")
    assert manifest["format"] == shards.FORMAT and manifest["version"] == shards.VERSION
    assert manifest["rows"] == 1000 and manifest["features"] == 22
    assert manifest["class_counts"] == np.bincount(y, minlength=3).tolist()
    assert manifest["stats"] == {"mean": [0.0, 0.0]}
    assert Schema.from_json(manifest["schema"]) == TABLE
    (shard,) = manifest["shards"]
    assert shard["name"] == "part-00000.parquet" and shard["rows"] == 1000
    assert shard["bytes"] == (tmp_path / "ds" / shard["name"]).stat().st_size
    assert shard["class_counts"] == manifest["class_counts"] and len(shard["sha256"]) == 64


def test_image_round_trip_flattens_to_the_models_layout(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((50, 3, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 10, 50)
    save_split(tmp_path / "img", images, labels, IMAGES)
    X, y, schema = load_split(tmp_path / "img")
    assert X.shape == (50, 192) and np.array_equal(X.reshape(images.shape), images)
    assert np.array_equal(y, labels) and schema.image_shape == [3, 8, 8]


def test_uint8_pixels_are_stored_as_bytes_and_read_as_decoded_features(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (300, 3 * 8 * 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 300)
    offset, scale = 117.25, 63.5
    with shards.writer(tmp_path / "u8", IMAGES, dtype=np.uint8) as w:
        w.write(pixels[:100], labels[:100])
        w.write(pixels[100:], labels[100:])
        w.decode = {"offset": offset, "scale": scale}
    # what clean's float64 arithmetic gives, cast to float32 as float shards store it
    expected = ((pixels.astype(np.float64) - offset) / scale).astype(np.float32)
    shards.write(tmp_path / "f32", expected, labels, IMAGES)
    X, y, _ = shards.read_all(tmp_path / "u8")
    assert X.dtype == np.float32 and np.array_equal(X, expected) and np.array_equal(y, labels)
    streamed = np.concatenate([b for b, _ in shards.iter_batches(tmp_path / "u8", 64)])
    assert np.array_equal(streamed, expected)
    manifest = shards.read_manifest(tmp_path / "u8")
    assert manifest["dtype"] == "uint8" and manifest["decode"] == {"offset": offset, "scale": scale}
    assert np.array_equal(shards.read_shard(tmp_path / "u8", manifest, manifest["shards"][0])[0], X)
    u8_bytes = sum(p.stat().st_size for p in (tmp_path / "u8").glob("part-*"))
    f32_bytes = sum(p.stat().st_size for p in (tmp_path / "f32").glob("part-*"))
    assert u8_bytes < 1.1 * pixels.size  # a byte per pixel (a list of uint8 takes four)
    assert u8_bytes < f32_bytes / 2


def test_uint8_storage_needs_its_decode(tmp_path):
    with (
        pytest.raises(KubetrainError, match="decode"),
        shards.writer(tmp_path / "u8", IMAGES, dtype=np.uint8) as w,
    ):
        w.write(np.zeros((3, 192), np.uint8), np.zeros(3, int))
    assert not (tmp_path / "u8").exists()
    with (
        pytest.raises(KubetrainError, match="float32 or uint8"),
        shards.writer(tmp_path / "i16", IMAGES, dtype=np.int16),
    ):
        pass


def test_batches_written_one_by_one_equal_one_write(tmp_path):
    X, y = table(1000)
    with shards.writer(tmp_path / "ds", TABLE, max_rows_per_shard=300) as w:
        for start in range(0, 1000, 77):
            w.write(X[start : start + 77], y[start : start + 77])
        assert w.rows == 1000
        w.stats["note"] = "batches"
    X2, y2, _ = shards.read_all(tmp_path / "ds")
    assert np.array_equal(X2, X) and np.array_equal(y2, y)
    manifest = shards.read_manifest(tmp_path / "ds")
    assert [s["rows"] for s in manifest["shards"]] == [300, 300, 300, 100]
    X1, y1 = shards.read_shard(tmp_path / "ds", manifest, manifest["shards"][1])
    assert np.array_equal(X1, X[300:600]) and np.array_equal(y1, y[300:600])
    assert manifest["stats"] == {"note": "batches"}
    assert (
        sum(np.array(s["class_counts"]) for s in manifest["shards"]).tolist()
        == (manifest["class_counts"])
    )


def test_the_writer_copies_what_it_buffers(tmp_path):
    X, y = table(10)
    buffer = X.copy()
    with shards.writer(tmp_path / "ds", TABLE) as w:
        w.write(buffer, y)
        buffer[:] = -1  # a caller reusing its batch buffer
    assert np.array_equal(shards.read_all(tmp_path / "ds")[0], X)


def test_empty_dataset(tmp_path):
    with shards.writer(tmp_path / "ds", TABLE):
        pass
    X, y, _ = shards.read_all(tmp_path / "ds")
    assert X.shape == (0, 22) and y.shape == (0,)
    assert list(shards.iter_batches(tmp_path / "ds", 10)) == []


# --- bounds ---------------------------------------------------------------------------


def test_shard_size_bound_makes_many_small_shards(tmp_path):
    X, y = table(5000)  # 5000 * (22 + 1) * 4 bytes = 460 KB of values
    bound = 32 * 1024
    manifest = shards.write(tmp_path / "ds", X, y, TABLE, shard_bytes=bound)
    rows_per_shard = bound // (22 * 4 + 4)
    assert len(manifest["shards"]) == -(-5000 // rows_per_shard) >= 10
    assert all(s["rows"] <= rows_per_shard for s in manifest["shards"])
    # the bound is on the values; a file adds its Parquet footer and page headers
    assert all(s["bytes"] <= bound + 4096 for s in manifest["shards"])
    assert shard_names(tmp_path / "ds") == [s["name"] for s in manifest["shards"]]
    assert np.array_equal(shards.read_all(tmp_path / "ds")[0], X)


def test_batches_stream_with_bounded_size_and_lazily(tmp_path):
    X, y = table(1050)
    shards.write(tmp_path / "ds", X, y, TABLE, max_rows_per_shard=300)
    batches = list(shards.iter_batches(tmp_path / "ds", batch_rows=64))
    assert all(len(b[0]) == len(b[1]) == 64 for b in batches[:-1]) and len(batches[-1][0]) <= 64
    assert np.array_equal(np.concatenate([b[0] for b in batches]), X)
    assert np.array_equal(np.concatenate([b[1] for b in batches]), y)
    assert all(b[0].flags.writeable for b in batches)
    # lazy: the first batch comes before the last shard is even opened
    stream = shards.iter_batches(tmp_path / "ds", batch_rows=64)
    first, _ = next(stream)
    assert np.array_equal(first, X[:64])
    (tmp_path / "ds" / "part-00003.parquet").unlink()
    with pytest.raises(KubetrainError, match=r"shard .*part-00003\.parquet is missing"):
        list(stream)


# --- damage and failures --------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_altered_shard_is_named(tmp_path):
    X, y = table()
    shards.write(tmp_path / "ds", X, y, TABLE, max_rows_per_shard=400)
    shard = tmp_path / "ds" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    for read in (shards.read_all, lambda p: list(shards.iter_batches(p, 100)), load_split):
        with pytest.raises(KubetrainError) as caught:
            read(tmp_path / "ds")
        message = one_line(caught)
        assert f"shard {shard} is damaged: its sha256 does not match _manifest.json" in message
        assert "--no-cache" in message


def test_truncated_shard_is_named(tmp_path):
    X, y = table()
    shards.write(tmp_path / "ds", X, y, TABLE, max_rows_per_shard=400)
    shard = tmp_path / "ds" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(
        KubetrainError, match=r"part-00002\.parquet is damaged: 100 bytes.*truncated"
    ):
        load_split(tmp_path / "ds")


def test_half_written_dataset_without_manifest_is_refused(tmp_path):
    X, y = table()
    shards.write(tmp_path / "ds", X, y, TABLE)
    (tmp_path / "ds" / shards.MANIFEST).unlink()
    for read in (shards.read_manifest, shards.read_all, load_split):
        with pytest.raises(KubetrainError) as caught:
            read(tmp_path / "ds")
        message = one_line(caught)
        assert message.startswith(f"incomplete dataset {tmp_path / 'ds'}: shards but no")
        assert "re-run the producing stage" in message and "--no-cache" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(KubetrainError, match="is not a sharded dataset"):
        shards.read_all(tmp_path / "empty")
    with pytest.raises(KubetrainError, match=r"no _manifest\.json, no arrays\.npz"):
        load_split(tmp_path / "empty")


def test_damaged_or_newer_manifest_is_refused(tmp_path):
    X, y = table(10)
    shards.write(tmp_path / "ds", X, y, TABLE)
    manifest = tmp_path / "ds" / shards.MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(KubetrainError, match="version 99; this kubetrain reads"):
        shards.read_all(tmp_path / "ds")
    manifest.write_text("{not json")
    with pytest.raises(KubetrainError, match=r"_manifest\.json is damaged \(JSONDecodeError\)"):
        shards.read_all(tmp_path / "ds")


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    X, y = table(1000)
    with (
        pytest.raises(RuntimeError, match="boom"),
        shards.writer(tmp_path / "ds", TABLE, max_rows_per_shard=100) as w,
    ):
        w.write(X[:500], y[:500])  # five shards on disk already
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # replacing a dataset: a failure keeps the old one whole
    shards.write(tmp_path / "ds", X[:10], y[:10], TABLE)
    with (
        pytest.raises(KubetrainError, match="rows but labels"),
        shards.writer(tmp_path / "ds", TABLE) as w,
    ):
        w.write(X, y[:3])
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert np.array_equal(shards.read_all(tmp_path / "ds")[0], X[:10])


def test_labels_must_be_class_indices(tmp_path):
    X, _ = table(4)
    with pytest.raises(KubetrainError, match="label 3 is outside the schema's 3 classes"):
        save_split(tmp_path / "ds", X, np.array([0, 1, 2, 3]), TABLE)
    with (
        pytest.raises(KubetrainError, match="every batch must have the same columns"),
        shards.writer(tmp_path / "ds", TABLE) as w,
    ):
        w.write(X, np.zeros(4, int))
        w.write(X[:, :5], np.zeros(4, int))
    assert not (tmp_path / "ds").exists()


# --- save_split / load_split ------------------------------------------------------------


def test_save_split_writes_shards_and_load_split_still_reads_the_old_format(tmp_path):
    X, y = table(100)
    save_split(tmp_path / "new", X, y, TABLE)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "_manifest.json",
        "part-00000.parquet",
    ]
    save_split_npz(tmp_path / "old", X, y, TABLE)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [
        "arrays.npz",
        "meta.json",
        "sha256.json",
    ]
    for name in ("new", "old"):
        X2, y2, schema = load_split(tmp_path / name)
        assert np.array_equal(X2, X) and np.array_equal(y2, y) and schema == TABLE
        assert X2.dtype == np.float32 and y2.dtype == np.int64


# --- object storage ------------------------------------------------------------------


def s3_keys(bucket: str, prefix: str) -> list[str]:
    s3 = storage.client()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def test_s3_round_trip(s3_env):
    uri = f"s3://{s3_env}/splits/train"
    X, y = table(1000)
    manifest = shards.write(uri, X, y, TABLE, max_rows_per_shard=400, stats={"k": 1})
    assert s3_keys(s3_env, "splits/") == [
        "splits/train/_manifest.json",
        "splits/train/part-00000.parquet",
        "splits/train/part-00001.parquet",
        "splits/train/part-00002.parquet",
    ]
    assert shards.read_manifest(uri) == manifest and manifest["stats"] == {"k": 1}
    X2, y2, schema = load_split(uri)
    assert np.array_equal(X2, X) and np.array_equal(y2, y) and schema == TABLE
    batches = list(shards.iter_batches(uri, batch_rows=128))
    assert max(len(b[1]) for b in batches) == 128
    assert np.array_equal(np.concatenate([b[0] for b in batches]), X)
    # a smaller dataset replaces it whole: no stale shards
    save_split(uri + "/", X[:10], y[:10], TABLE)
    assert s3_keys(s3_env, "splits/") == [
        "splits/train/_manifest.json",
        "splits/train/part-00000.parquet",
    ]
    assert np.array_equal(load_split(uri)[0], X[:10])


def test_s3_damage_and_failures(s3_env):
    uri = f"s3://{s3_env}/ds"
    X, y = table(1000)
    with (
        pytest.raises(RuntimeError, match="boom"),
        shards.writer(uri, TABLE, max_rows_per_shard=100) as w,
    ):
        w.write(X[:450], y[:450])
        raise RuntimeError("boom")
    assert s3_keys(s3_env, "ds/") == []
    shards.write(uri, X, y, TABLE, max_rows_per_shard=400)
    s3 = storage.client()
    body = s3.get_object(Bucket=s3_env, Key="ds/part-00001.parquet")["Body"].read()
    s3.put_object(Bucket=s3_env, Key="ds/part-00001.parquet", Body=body[:-1] + b"\0")
    with pytest.raises(KubetrainError) as caught:
        shards.read_all(uri)
    assert f"shard {uri}/part-00001.parquet is damaged: its sha256" in one_line(caught)
    s3.delete_object(Bucket=s3_env, Key="ds/_manifest.json")
    with pytest.raises(KubetrainError) as caught:
        load_split(uri)
    assert one_line(caught).startswith(f"incomplete dataset {uri}: shards but no")


def test_s3_errors_are_one_line_without_secrets(s3_env, monkeypatch):
    secret = "wrong-secret-key-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(KubetrainError) as caught:
        save_split(f"s3://{s3_env}/ds", *table(10), TABLE)
    message = one_line(caught)
    assert message.startswith(f"S3 request for s3://{s3_env}/ds failed at http")
    assert secret not in message and "AWS_SECRET_ACCESS_KEY" in message
