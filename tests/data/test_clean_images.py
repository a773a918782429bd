"""kubetrain.data.clean_images: an image table (one uint8 pixels column) cleaned into uint8
split shards whose decode is the pixel scaler; real PNG folders through real ingest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kubetrain.config.settings import AugmentConfig, CleanConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.data import clean_images as images_module
from kubetrain.data import shards
from kubetrain.data.augment import augment
from kubetrain.data.datasets import LABEL, PIXELS, is_image_table, load_table, pixel_rows
from kubetrain.data.ingest import ingest
from kubetrain.data.packed_json import pixel_names
from kubetrain.data.synthetic_images import generate_folder
from kubetrain.stages import clean_stage

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    """150 generated 32x32 PNGs, plus 3 byte-equal copies in their own class (duplicates)
    and one image copied into another class (the same pixels under two labels: kept)."""
    root = generate_folder(tmp_path_factory.mktemp("img") / "shapes", images=150, seed=5)
    (root / "manifest.csv").unlink()
    for i, src in enumerate(sorted((root / "disc").iterdir())[:3]):
        shutil.copy(src, root / "disc" / f"zz-copy-{i}.png")
    shutil.copy(sorted((root / "ring").iterdir())[0], root / "star" / "zz-from-ring.png")
    out = tmp_path_factory.mktemp("table") / "table"
    ingest(str(root), "", str(out))
    return str(out)


def table_rows(path: str) -> tuple[np.ndarray, list[str]]:
    frame, schema = load_table(path)
    column = pa.array(frame[PIXELS], pa.binary(len(schema.feature_names)))
    return pixel_rows(column), frame[LABEL].tolist()


def clean(table: str, tmp_path: Path, **settings) -> tuple[dict, list[str]]:
    paths = [str(tmp_path / name) for name in SPLITS]
    meta = clean_stage(table, *paths, str(tmp_path / "report.md"), CleanConfig(**settings), 7)
    return meta, paths


def stored(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's pixels as stored (uint8) and labels."""
    parts = list(shards.iter_batches(path, raw=True))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_splits_keep_uint8_pixels_and_decode_to_clean_scaled_features(table, tmp_path):
    assert is_image_table(table)
    pixels, labels = table_rows(table)
    meta, paths = clean(table, tmp_path)
    assert meta["rows_in"] == 154 and meta["duplicates_removed"] == 3
    assert sum(meta["splits"][s]["rows"] for s in SPLITS) == 151
    split_rows = {s: stored(p) for s, p in zip(SPLITS, paths, strict=True)}
    # every table row but the three copies lands in exactly one split, as it was ingested
    kept = sorted(
        (row.tobytes(), int(y)) for X, Y in split_rows.values() for row, y in zip(X, Y, strict=True)
    )
    classes = shards.read_schema(paths[0]).class_names
    pairs = zip(pixels, labels, strict=True)
    unique = sorted({(row.tobytes(), classes.index(y)) for row, y in pairs})
    assert kept == unique and len(unique) == 151  # the ring image under "star" is kept too
    # the decode is the training pixels' mean and deviation, one scalar for every pixel
    train = split_rows["train"][0].astype(np.float64)
    manifest = shards.read_manifest(paths[0])
    assert manifest["dtype"] == "uint8"
    assert manifest["decode"]["offset"] == pytest.approx(train.mean(), rel=1e-12)
    assert manifest["decode"]["scale"] == pytest.approx(train.std(), rel=1e-9)
    X, y, schema = shards.read_all(paths[0])
    d = manifest["decode"]
    np.testing.assert_array_equal(X, ((train - d["offset"]) / d["scale"]).astype(np.float32))
    assert schema.extra["preprocessing"]["scale"]["offset"] == [d["offset"]]
    assert schema.image_shape == [3, 32, 32] and schema.feature_names == pixel_names(3072)
    # on disk, the per-pixel names, types and fill are counts (they were 96% of the file)
    prep = schema.extra["preprocessing"]
    assert prep["types"] == dict.fromkeys(schema.feature_names, "numeric")
    assert prep["fill"] == dict.fromkeys(schema.feature_names, pytest.approx(train.mean()))
    on_disk = (Path(paths[0]) / shards.MANIFEST).read_text()
    assert '"$pixels": 3072' in on_disk and len(on_disk) < 10_000
    # stratified: each class's rows are split alike (within one row of the fractions)
    counts = np.array([meta["splits"][s]["class_counts"][c] for c in classes for s in SPLITS])
    assert counts.reshape(len(classes), 3)[:, 0].min() >= 5


def test_routing_does_not_depend_on_the_batch_size(table, tmp_path, monkeypatch):
    _, paths = clean(table, tmp_path / "whole")
    monkeypatch.setattr(images_module, "BATCH_IMAGES", 7)
    _, small = clean(table, tmp_path / "small")
    for a, b in zip(paths, small, strict=True):
        for x, z in zip(stored(a), stored(b), strict=True):
            np.testing.assert_array_equal(x, z)


@pytest.mark.parametrize("scaling", ["minmax", "none"])
def test_other_scalers_become_the_decode(table, tmp_path, scaling):
    _, paths = clean(table, tmp_path, scaling=scaling)
    raw, _ = stored(paths[0])
    X, _, _ = shards.read_all(paths[0])
    if scaling == "none":
        np.testing.assert_array_equal(X, raw.astype(np.float32))
    else:
        low, high = int(raw.min()), int(raw.max())
        np.testing.assert_allclose(X, (raw - low) / (high - low), rtol=1e-6)
        assert X.min() == 0.0 and X.max() == 1.0


def test_spark_is_not_asked_to_clean_images(table, tmp_path):
    def spark(_request):
        raise AssertionError("an image table went to the Spark engine")

    paths = [str(tmp_path / name) for name in SPLITS]
    meta = clean_stage(table, *paths, str(tmp_path / "r.md"), CleanConfig(), 7, cleaner=spark)
    assert meta["duplicates_removed"] == 3


def test_augment_copies_the_uint8_split_with_the_policy(table, tmp_path):
    _, paths = clean(table, tmp_path)
    policy = {"flip_horizontal": True}
    meta = augment(paths[0], str(tmp_path / "aug"), AugmentConfig(), 0, policy=policy)
    assert meta["rows_after"] == meta["rows_before"] and meta["copies"] == 0
    after = shards.read_manifest(tmp_path / "aug")
    before = shards.read_manifest(paths[0])
    assert after["dtype"] == "uint8" and after["decode"] == before["decode"]
    assert after["schema"]["extra"]["augment_policy"] == policy
    assert after["stats"] == before["stats"]
    np.testing.assert_array_equal(stored(str(tmp_path / "aug"))[0], stored(paths[0])[0])


def test_table_settings_for_columns_are_refused_in_one_line(table, tmp_path):
    with pytest.raises(KubetrainError, match="do not apply to an image table") as info:
        clean(table, tmp_path, drop_columns="pixel_3")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "train").exists()
