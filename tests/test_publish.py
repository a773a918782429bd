"""Publishing the model bundle: layout, model card, atomic manifest; local and real S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain import stages

from kubetrain.core import storage
from kubetrain.config.settings import RunConfig
from kubetrain.core.errors import KubetrainError
from kubetrain.assessment.publish import publish_model, version_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real (small) wine model through ingest -> clean -> train -> evaluate -> compress."""
    d = tmp_path_factory.mktemp("stages")
    cfg = dict(epochs=8, width=32, seed=3)
    meta = stages.ingest_stage("wine", "", str(d / "raw"), str(d / "profile.md"))
    stages.clean_stage(str(d / "raw"), str(d / "train"), str(d / "val"), str(d / "test"),
                       str(d / "clean.md"), {})
    stages.train_stage(str(d / "train"), str(d / "val"), {}, str(d / "model"),
                       str(d / "metrics.json"), str(d / "train.html"), cfg)
    stages.evaluate_stage(str(d / "model"), str(d / "test"), str(d / "eval.json"),
                          str(d / "eval.html"), 0.5)
    stages.compress_stage(str(d / "model"), str(d / "test"), str(d / "small"),
                          str(d / "small.html"), {})
    return d, meta


def bundle_args(d: Path, meta: dict):
    return (str(d / "model"), str(d / "small"), str(d / "eval.json"), meta,
            {"learning_rate": 0.002, "width": 32})


def test_bundle_on_s3_is_complete_and_atomic(trained, s3_env):
    d, meta = trained
    uri = publish_model(*bundle_args(d, meta), f"s3://{s3_env}/models", "wine-clf",
                        version="v1")
    assert uri == f"s3://{s3_env}/models/wine-clf/v1/"
    assert storage.is_published(uri)
    files = {f["path"] for f in storage.read_manifest(uri)}
    assert {"model.onnx", "pytorch/weights.pt", "pytorch/spec.json", "metrics.json",
            "compression.json", "model_card.md"} <= files
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
        publish_model(str(d / "model"), str(d / "model"), str(d / "eval.json"), meta, {},
                      str(tmp_path / "r"), "m")
    assert not (tmp_path / "r").exists()


def test_model_name_must_be_a_safe_path_segment():
    with pytest.raises(KubetrainError, match="model_name"):
        RunConfig(model_name="../etc")
