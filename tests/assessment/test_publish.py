"""Publishing the model bundle: layout, model card, atomic manifest; local and real S3.

Readers (`latest_version`, `fetch_bundle`) only see complete versions, and a
publish with a run id can be retried into the same version.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kubetrain import stages
from kubetrain.assessment.publish import (
    fetch_bundle,
    latest_version,
    model_card,
    publish_model,
    published_versions,
    version_for,
    version_for_run,
)
from kubetrain.config.settings import (
    CleanConfig,
    CompressConfig,
    DataConfig,
    FinalConfig,
    GateConfig,
    HyperConfig,
    PublishConfig,
    TrainConfig,
)
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError

pytestmark = pytest.mark.integration

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real (small) wine model through ingest -> clean -> train -> evaluate -> compress."""
    d = tmp_path_factory.mktemp("stages")
    meta = stages.ingest_stage(str(d / "raw"), str(d / "profile.md"), DataConfig(dataset="wine"))
    stages.clean_stage(
        str(d / "raw"),
        str(d / "train"),
        str(d / "val"),
        str(d / "test"),
        str(d / "clean.md"),
        CleanConfig(),
        seed=3,
    )
    stages.train_stage(
        str(d / "train"),
        str(d / "val"),
        str(d / "model"),
        str(d / "metrics.json"),
        str(d / "train.html"),
        TrainConfig(),
        HyperConfig(width=32),
        FinalConfig(epochs=8),
        seed=3,
    )
    stages.evaluate_stage(
        str(d / "model"),
        str(d / "test"),
        str(d / "eval.json"),
        str(d / "eval.html"),
        GateConfig(min_accuracy=0.5),
    )
    stages.compress_stage(
        str(d / "model"), str(d / "test"), str(d / "small"), str(d / "small.html"), CompressConfig()
    )
    return d, meta


def bundle_args(d: Path, meta: dict):
    return (
        str(d / "model"),
        str(d / "small"),
        str(d / "eval.json"),
        meta,
        {"learning_rate": 0.002, "width": 32},
    )


def test_bundle_on_s3_is_complete_and_atomic(trained, s3_env):
    d, meta = trained
    uri = publish_model(*bundle_args(d, meta), f"s3://{s3_env}/models", "wine-clf", version="v1")
    assert uri == f"s3://{s3_env}/models/wine-clf/v1/"
    assert storage.is_published(uri)
    files = {f["path"] for f in storage.read_manifest(uri)}
    assert {
        "model.onnx",
        "pytorch/weights.pt",
        "pytorch/spec.json",
        "metrics.json",
        "compression.json",
        "model_card.md",
    } <= files
    card = storage.read_bytes(uri + "model_card.md").decode()
    assert meta["content_hash"] in card and "learning_rate: 0.002" in card
    metrics = json.loads(storage.read_bytes(uri + "metrics.json"))
    assert metrics["gate"] == "pass" and 0 < metrics["accuracy"] <= 1
    onnx_bytes = storage.read_bytes(uri + "model.onnx")
    assert onnx_bytes == (d / "small" / "model.onnx").read_bytes()
    assert not [u for u in storage.list_uris(f"s3://{s3_env}/models/") if ".staging-" in u]


def test_publishing_the_same_version_twice_is_refused(trained, s3_env):
    d, meta = trained
    publish_model(*bundle_args(d, meta), f"s3://{s3_env}/models", "m", version="v1")
    with pytest.raises(KubetrainError):
        publish_model(*bundle_args(d, meta), f"s3://{s3_env}/models", "m", version="v1")


def test_bundle_to_a_local_folder_and_default_version(trained, tmp_path):
    d, meta = trained
    uri = publish_model(*bundle_args(d, meta), str(tmp_path / "registry"), "wine-clf")
    version = Path(uri).name
    assert version.startswith("v") and version.endswith(meta["content_hash"][:8])
    assert (Path(uri) / "model.onnx").is_file() and (Path(uri) / "_SUCCESS").is_file()
    assert version_for(meta) != version_for({"content_hash": "0" * 64})


def test_publish_needs_a_compressed_model(trained, tmp_path):
    d, meta = trained
    with pytest.raises(KubetrainError, match="has no model.onnx"):
        publish_model(
            str(d / "model"),
            str(d / "model"),
            str(d / "eval.json"),
            meta,
            {},
            str(tmp_path / "r"),
            "m",
        )
    assert not (tmp_path / "r").exists()


def test_model_name_must_be_a_safe_path_segment():
    with pytest.raises(KubetrainError, match="model_name"):
        PublishConfig(model_name="../etc")


# --- retry-safe publishing and readers (a hand-made bundle: no training needed) ----------


@pytest.fixture
def bundle(tmp_path: Path):
    """The inputs publish_model reads, written by hand; class names come from the data."""
    model, small = tmp_path / "in" / "model", tmp_path / "in" / "small"
    model.mkdir(parents=True)
    small.mkdir()
    (model / "weights.pt").write_bytes(os.urandom(4000))
    (model / "spec.json").write_text('{"width": 32}')
    (model / "info.json").write_text("{}")
    (small / "model.onnx").write_bytes(os.urandom(3000))
    (small / "compression.json").write_text(
        json.dumps(
            {
                "chosen": "fp32",
                "variants": [
                    {"name": "fp32", "bytes": 3000, "accuracy": 0.9, "cpu_latency_ms": 0.05}
                ],
            }
        )
    )
    (tmp_path / "in" / "eval.json").write_text(
        json.dumps(
            {
                "accuracy": 0.9,
                "gate": "pass",
                "gate_reason": "accuracy 0.9000 >= 0.5",
                "class_names": [HOSTILE, "b"],
            }
        )
    )
    meta = {
        "source": "wine",
        "content_hash": "ab" * 32,
        "rows": 10,
        "features": 3,
        "classes": [HOSTILE, "b"],
    }
    return (
        str(model),
        str(small),
        str(tmp_path / "in" / "eval.json"),
        meta,
        {"learning_rate": 0.002, "width": 32},
    )


def test_model_card_escapes_user_text():
    """Class, column and source names come from users' data: none may become HTML or links."""
    dataset = {
        "source": '<img src=x onerror="alert(2)">',
        "content_hash": "ab" * 32,
        "rows": 10,
        "features": 3,
        "classes": [HOSTILE, "*bold*", "a|b", "_x_"],
    }
    hyper = {"learning_rate": 0.002, "width": 32, "note": "[click](javascript:alert(3))\n# Owned"}
    evaluation = {"accuracy": 0.9, "gate_reason": "<b>pass</b>"}
    compression = {"chosen": "<i>fp32</i>", "variants": [{"name": "<i>fp32</i>", "bytes": 1}]}
    card = model_card("<u>clf</u>", "v1", dataset, hyper, evaluation, compression)
    assert "<" not in card and ">" not in card  # no raw HTML at all
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in card
    assert "\\*bold\\*" in card and "a\\|b" in card and "\\_x\\_" in card
    assert "](javascript" not in card and "\\[click\\]\\(javascript:alert\\(3\\)\\)" in card
    assert "\n# Owned" not in card and "\\# Owned" in card  # no forged section
    assert "- learning_rate: 0.002" in card and "- width: 32" in card  # plain text stays plain
    assert "`" + "ab" * 32 + "`" in card and "- accuracy: 0.9000" in card


def test_run_id_gives_a_stable_version_and_retries_succeed(bundle, s3_env):
    registry = f"s3://{s3_env}/models"
    run_id = "3f2b1c9e-5d7a-4e8b-9c0d-1a2b3c4d5e6f"
    assert version_for_run(run_id) == f"run-{run_id}"
    unsafe = version_for_run("a/../b c")  # not a safe path segment: hashed, still stable
    assert unsafe == version_for_run("a/../b c") and re.fullmatch(r"run-[0-9a-f]{16}", unsafe)

    uri = publish_model(*bundle, registry, "wine-clf", run_id=run_id)
    assert uri == f"{registry}/wine-clf/run-{run_id}/" and storage.is_published(uri)
    card = storage.read_bytes(uri + "model_card.md").decode()
    assert HOSTILE not in card and "&lt;script&gt;" in card
    # The step is retried (say the pod was evicted after publishing): same version, success.
    assert publish_model(*bundle, registry, "wine-clf", run_id=run_id) == uri
    # Killed mid-copy: final objects but no manifest. The retry removes and replaces them.
    storage_client = storage.client()
    bucket, key = storage.split_uri(uri)
    storage_client.delete_object(Bucket=bucket, Key=key + "_SUCCESS")
    storage_client.delete_object(Bucket=bucket, Key=key + "model.onnx")
    assert published_versions(registry, "wine-clf") == []
    assert publish_model(*bundle, registry, "wine-clf", run_id=run_id) == uri
    assert {f["path"] for f in storage.read_manifest(uri)} >= {"model.onnx", "model_card.md"}
    assert published_versions(registry, "wine-clf") == [f"run-{run_id}"]
    # Without a run id: a time-based version, as before.
    other = publish_model(*bundle, registry, "wine-clf")
    assert other.rstrip("/").rsplit("/", 1)[-1].endswith("-" + "ab" * 4)


def test_readers_only_see_complete_versions(bundle, s3_env, tmp_path):
    registry = f"s3://{s3_env}/models"
    assert latest_version(registry, "m") is None
    with pytest.raises(KubetrainError, match="holds no published version"):
        fetch_bundle(registry, "m", tmp_path / "none")
    publish_model(*bundle, registry, "m", run_id="run-a")
    # A newer publish that died while copying into place: objects, no manifest.
    storage.write_bytes(f"{registry}/m/run-b/model.onnx", b"half")
    assert published_versions(registry, "m") == ["run-run-a"]
    assert latest_version(registry, "m") == "run-run-a"
    with pytest.raises(KubetrainError, match="run-b/ is not published"):
        fetch_bundle(registry, "m", tmp_path / "b", version="run-b")
    got = fetch_bundle(registry, "m", tmp_path / "latest")
    assert (got / "model.onnx").read_bytes() == Path(bundle[1], "model.onnx").read_bytes()
    names = {p.name for p in got.iterdir()}
    assert {"model_card.md", "metrics.json", "pytorch", "_SUCCESS"} <= names

    local = publish_model(*bundle, str(tmp_path / "registry"), "m", run_id="run-c")
    assert latest_version(str(tmp_path / "registry"), "m") == "run-run-c"
    (tmp_path / "registry" / "m" / "run-d").mkdir()  # no _SUCCESS: not a version
    assert published_versions(str(tmp_path / "registry"), "m") == ["run-run-c"]
    assert (
        fetch_bundle(str(tmp_path / "registry"), "m", tmp_path / "lc") / "model.onnx"
    ).read_bytes() == Path(local, "model.onnx").read_bytes()
