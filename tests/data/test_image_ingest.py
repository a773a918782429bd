"""Image folders and manifests through ingest, and the synthetic image generator:
real PNG/JPEG/WebP files decoded with Pillow, real bad files, real S3 (SeaweedFS)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data.datasets import LABEL, PIXELS, load_table, pixel_rows
from kubetrain.data.image_ingest import ImageOptions
from kubetrain.data.image_sources import is_image_source
from kubetrain.data.ingest import ingest
from kubetrain.data.synthetic_images import CLASSES, generate_folder, generate_image, main


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """60 generated 32x32 PNGs, 6 per class, with a manifest."""
    return generate_folder(tmp_path_factory.mktemp("gen") / "shapes", images=60, seed=3)


def run(source, tmp_path: Path, options: ImageOptions | None = None, label_column: str = ""):
    """Ingest's metadata, the table's (uint8 (rows, values) pixels, labels) and schema."""
    out = tmp_path / "out" / "table"
    meta = ingest(str(source), label_column, str(out), images=options or ImageOptions())
    frame, schema = load_table(out)
    assert list(frame.columns) == [PIXELS, LABEL]
    pixels = pixel_rows(pa.array(frame[PIXELS], pa.binary(len(schema.feature_names))))
    return meta, (pixels, frame[LABEL].tolist()), schema


def fails(source, tmp_path: Path, options: ImageOptions, *needles: str) -> str:
    """One-line KubetrainError naming `needles`, and nothing left under out/."""
    parent = tmp_path / "out"
    parent.mkdir(exist_ok=True)
    with pytest.raises(KubetrainError) as info:
        ingest(str(source), "", str(parent / "table"), images=options)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    assert list(parent.iterdir()) == [], "a half-written table was left behind"
    return message


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


# --- the generator -------------------------------------------------------------------


def test_generator_is_seeded_balanced_and_varied():
    a, label = generate_image(7, size=32, seed=1)
    b, _ = generate_image(7, size=32, seed=1)
    c, _ = generate_image(7, size=32, seed=2)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and label == 7
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    labels = [generate_image(i, 32)[1] for i in range(30)]
    assert sorted(set(labels)) == list(range(10)) and labels.count(0) == 3
    # colour is no shortcut: the same class spans many mean colours
    means = np.array([generate_image(i * 10, 32)[0].mean((0, 1)) for i in range(20)])
    assert means.std(0).min() > 15


def test_generator_writes_class_folders_and_manifest(folder):
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(CLASSES)
    manifest = pd.read_csv(folder / "manifest.csv")
    assert list(manifest.columns) == ["path", "label"] and len(manifest) == 60
    assert manifest["label"].value_counts().tolist() == [6] * 10
    first = folder / manifest["path"][0]
    with Image.open(first) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), generate_image(0, 32, seed=3)[0])


def test_generator_cli_and_bad_arguments(tmp_path, capsys):
    assert main([str(tmp_path / "g"), "--images", "12", "--size", "16", "--format", "webp"]) == 0
    assert len(list((tmp_path / "g").rglob("*.webp"))) == 12
    assert main([str(tmp_path / "h"), "--images", "0"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "h").exists()


# --- sources ---------------------------------------------------------------------------


def test_folder_ingests_as_an_image_table(folder, tmp_path):
    meta, frame, schema = run(folder, tmp_path)
    assert schema.kind == "image" and schema.image_shape == [3, 32, 32]
    assert meta["rows"] == 60 and meta["features"] == 3072 and meta["kind"] == "image"
    assert schema.class_names == sorted(CLASSES)
    assert meta["class_counts"] == {c: 6 for c in sorted(CLASSES)}
    assert meta["skipped_images"]["count"] == 0 and meta["images_per_second"] > 0
    pixels, labels = frame
    assert pixels.dtype == np.uint8 and pixels.shape == (60, 3072)
    # row 0 is the first file of the first class folder, channel-first like the NPZ path
    first = sorted((folder / "checker").iterdir())[0]
    expected = np.asarray(Image.open(first)).transpose(2, 0, 1).reshape(-1)
    assert labels[0] == "checker"
    np.testing.assert_array_equal(pixels[0], expected)
    parts = list((tmp_path / "out" / "table").glob("part-*.parquet"))
    assert sum(p.stat().st_size for p in parts) < 1.1 * pixels.size  # a byte per value


def test_manifest_csv_and_parquet_with_resizing(folder, tmp_path):
    meta, frame, schema = run(folder / "manifest.csv", tmp_path / "csv", ImageOptions(size=16))
    assert schema.image_shape == [3, 16, 16] and meta["rows"] == 60
    assert frame[1][:3] == ["disc", "ring", "square"]  # the manifest's order
    manifest = pd.read_csv(folder / "manifest.csv")
    manifest["path"] = [str(folder / p) for p in manifest["path"]]  # absolute paths too
    manifest.rename(columns={"label": "class"}).to_parquet(tmp_path / "m.parquet")
    meta2, frame2, _ = run(tmp_path / "m.parquet", tmp_path / "pq", ImageOptions(size=16))
    assert meta2["content_hash"] == meta["content_hash"]


def test_detection_leaves_ordinary_tables_alone(folder, tmp_path):
    assert is_image_source(str(folder)) and is_image_source(str(folder / "manifest.csv"))
    table = tmp_path / "t.csv"
    table.write_text("file,size,label\nreport.txt,3,a\nnotes.doc,4,b\n")
    assert not is_image_source(str(table))
    assert not is_image_source("digits") and not is_image_source(str(tmp_path / "absent"))
    assert is_image_source("s3://bucket/images/") and is_image_source("s3://bucket/images")


def test_jpeg_webp_and_greyscale_sets(tmp_path):
    root = tmp_path / "mixed"
    for i in range(8):
        pixels, label = generate_image(i, 40)
        (root / f"c{label % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{label % 2}" / f"{i}.jpg", quality=90)
        Image.fromarray(pixels).save(root / f"c{label % 2}" / f"{i}.webp")
    meta, frame, schema = run(root, tmp_path, ImageOptions(size=32))
    assert meta["rows"] == 16 and schema.image_shape == [3, 32, 32]
    grey = tmp_path / "grey"
    for i in range(6):
        (grey / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(generate_image(i, 16)[0]).convert("L").save(grey / f"d{i % 2}" / f"{i}.png")
    _, _, schema = run(grey, tmp_path / "g")
    assert schema.image_shape == [1, 16, 16]


# --- bad images ------------------------------------------------------------------------


def spoil(root: Path) -> dict[str, Path]:
    """One image of each kind of trouble, in class folder ``disc``."""
    bad = {
        "corrupt": root / "disc" / "zz-not-an-image.png",
        "truncated": root / "disc" / "zz-truncated.png",
        "channels": root / "disc" / "zz-grey.png",
        "tiny": root / "disc" / "zz-tiny.png",
    }
    bad["corrupt"].write_bytes(b"this is no PNG at all")
    whole = (root / "disc" / "disc-00000.png").read_bytes()
    bad["truncated"].write_bytes(whole[: len(whole) // 2])
    Image.new("L", (32, 32), 128).save(bad["channels"])
    Image.new("RGB", (4, 4), (1, 2, 3)).save(bad["tiny"])
    return bad


def test_bad_images_are_reported_and_skipped(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    spoil(root)
    meta, frame, schema = run(root, tmp_path)
    assert meta["rows"] == 60 and meta["class_counts"]["disc"] == 6
    skipped = meta["skipped_images"]
    assert skipped["count"] == 4
    assert skipped["by_reason"] == {"corrupt": 2, "channels": 1, "tiny": 1}
    assert schema.extra["skipped_images"]["count"] == 4
    assert {Path(e["path"]).name for e in skipped["examples"]} >= {"zz-grey.png", "zz-tiny.png"}


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "channels", "tiny"])
def test_bad_images_stop_the_run_when_asked(folder, tmp_path, kind):
    root = copy_of(folder, tmp_path)
    for name, path in spoil(root).items():
        if name != kind:
            path.unlink()
    message = fails(root, tmp_path, ImageOptions(on_bad="fail"), "--bad-images skip")
    assert "zz-" in message and " object at 0x" not in message
    if kind == "corrupt":
        assert "not an image format Pillow reads" in message


def test_mixed_sizes_need_an_image_size(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    Image.fromarray(generate_image(1, 48)[0]).save(root / "ring" / "big.png")
    fails(root, tmp_path, ImageOptions(), "--image-size", "48x48")
    meta, _, schema = run(root, tmp_path / "ok", ImageOptions(size=24))
    assert meta["rows"] == 61 and schema.image_shape == [3, 24, 24]


def test_sources_that_cannot_be_a_data_set(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", tmp_path, ImageOptions(), "no class subfolders")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(generate_image(i, 16)[0]).save(one / f"{i}.png")
    fails(tmp_path / "one", tmp_path, ImageOptions(), "one class only")
    (tmp_path / "none" / "cls").mkdir(parents=True)
    (tmp_path / "none" / "cls" / "readme.txt").write_text("hi")
    fails(tmp_path / "none", tmp_path, ImageOptions(), "holds no images")
    with pytest.raises(KubetrainError, match="bad_images"):
        ImageOptions(on_bad="ignore")


# --- S3 ------------------------------------------------------------------------------


def test_s3_folder_and_manifest(folder, tmp_path, s3_env):
    bucket = s3_env
    storage.upload(folder, f"s3://{bucket}/sets/shapes")
    local, _, _ = run(folder, tmp_path / "local")
    remote, frame, schema = run(f"s3://{bucket}/sets/shapes/", tmp_path / "s3")
    assert remote["content_hash"] == local["content_hash"] and remote["rows"] == 60
    assert schema.extra["source"] == f"s3://{bucket}/sets/shapes/"
    by_manifest, _, _ = run(f"s3://{bucket}/sets/shapes/manifest.csv", tmp_path / "m")
    assert by_manifest["rows"] == 60 and by_manifest["classes"] == local["classes"]
    (tmp_path / "gone").mkdir()
    with pytest.raises(KubetrainError, match="holds no images"):
        ingest(f"s3://{bucket}/nothing-here/", "", str(tmp_path / "gone" / "t"))


def test_a_folder_fingerprint_changes_with_its_files(folder, tmp_path):
    from kubetrain.local.runner import fingerprint

    root = copy_of(folder, tmp_path)
    before = fingerprint(str(root))
    assert before and fingerprint(str(root)) == before
    Image.fromarray(generate_image(1, 32)[0]).save(root / "ring" / "new.png")
    assert fingerprint(str(root)) != before


def test_large_images_ingest_whole_and_larger_ones_need_an_image_size(tmp_path, monkeypatch):
    root = tmp_path / "large"
    for i in range(4):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (160, 160), (i * 40, i, 0)).save(root / f"c{i % 2}" / f"{i}.png")
    meta, (pixels, _), schema = run(root, tmp_path / "whole")  # 76,800 values: one column
    assert schema.image_shape == [3, 160, 160] and pixels.shape == (4, 76800)
    assert pixels.reshape(4, 3, 160, 160)[1, :, 5, 7].tolist() == [80, 2, 0]  # c0/2.png
    monkeypatch.setattr("kubetrain.data.image_ingest.MAX_VALUES", 3 * 128 * 128)
    fails(root, tmp_path, ImageOptions(), "--image-size N", "160x160x3")
    meta, _, schema = run(root, tmp_path / "ok", ImageOptions(size=32))
    assert schema.image_shape == [3, 32, 32] and meta["rows"] == 4
