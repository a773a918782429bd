"""The bundle's raw-input side in process: schema checks, both input forms, S3 bundles.

The bundles are real (trained by the stage functions, `conftest`); what is checked here
without a server is what a request cannot show cheaply: every violation names its
column in one line, OIP column tensors and rows give the same answer, a bundle without
the serving files or with a damaged file is refused, and an S3 bundle serves the same.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import Trained
from kubetrain.cli.main import main
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.data import raw_schema
from kubetrain.serving import oip
from kubetrain.serving.bundle import open_bundle
from kubetrain.serving.predictor import Predictor
from kubetrain.serving.rows import RowError


@pytest.fixture(scope="module")
def table(table_bundle: Trained) -> Predictor:
    return Predictor(open_bundle(str(table_bundle.bundle)))


def test_the_bundle_holds_what_serving_needs(table_bundle):
    files = {f["path"] for f in storage.read_manifest(str(table_bundle.bundle))}
    assert {"model.onnx", "pytorch/weights.pt", "metrics.json", "model_card.md"} <= files
    assert {raw_schema.SCHEMA_FILE, raw_schema.PREPROCESSOR_FILE} <= files
    schema, params = raw_schema.read(table_bundle.bundle)
    kinds = {c.name: (c.kind, c.dropped) for c in schema.columns}
    assert kinds == {
        "customer_id": ("identifier", True),
        "amount": ("numeric", False),
        "plan": ("categorical", False),
        "review": ("text", False),
        "signup": ("datetime", False),
    }
    assert sorted(schema.class_names) == ["no", "yes"]
    assert params["categorical"]["plan"] == ["basic", "plus", "pro"]


def test_rows_and_column_tensors_agree_with_the_pipeline(table, table_bundle):
    rows = table_bundle.test_rows
    by_rows = table.predict_rows(rows)
    columns = {c.name: [r[c.name] for r in rows] for c in table.schema.kept}
    by_columns = table.predict_columns(columns)
    np.testing.assert_array_equal(by_rows.probabilities, by_columns.probabilities)
    np.testing.assert_allclose(by_rows.probabilities, table_bundle.probabilities, atol=1e-6)
    assert by_rows.labels == [table.class_names[i] for i in by_rows.probabilities.argmax(1)]


def test_missing_values_and_unseen_categories_are_served_as_in_training(table, table_bundle):
    row = {**table_bundle.test_rows[0], "amount": None, "plan": "enterprise", "signup": None}
    extra = {**table_bundle.test_rows[0], "customer_id": 12345}  # a dropped column: ignored
    result = table.predict_rows([row, extra])
    assert result.probabilities.shape == (2, 2)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"amount": "12.5"}, "amount"),
        ({"amount": False}, "amount"),
        ({"plan": 1}, "plan"),
        ({"review": {"text": "x"}}, "review"),
        ({"signup": "31/31/2021"}, "signup"),
        ({"signup": 20210304}, "signup"),
        ({"zipcode": "0150"}, "zipcode"),
    ],
)
def test_each_violation_is_one_line_naming_the_column(table, table_bundle, change, column):
    with pytest.raises(RowError) as caught:
        table.predict_rows([table_bundle.test_rows[0], {**table_bundle.test_rows[0], **change}])
    message = str(caught.value)
    assert caught.value.column == column and f"'{column}'" in message and "\n" not in message
    assert message.startswith("row 1") or "unknown column" in message


def test_oip_bodies_are_checked_before_the_model(table, table_bundle):
    row = table_bundle.test_rows[0]
    good = [
        {
            "name": c.name,
            "datatype": oip.datatype(c.arrow),
            "shape": [1, 1],
            "data": [[row[c.name]]],
        }
        for c in table.schema.kept
    ]
    reply = oip.infer(table, {"inputs": good, "id": 7}, "v1")
    assert reply["id"] == "7" and reply["outputs"][1]["shape"] == [1, 2]
    for body, words in [
        ({"inputs": good[:-1]}, "'signup'"),
        ({"inputs": [*good, good[0]]}, "sent twice"),
        ({"inputs": [{**good[0], "shape": [2]}, *good[1:]]}, "holds 2 values"),
        ({"inputs": [{**good[0], "shape": [1, 2]}, *good[1:]]}, "one value per row"),
        ({"rows": "amount=3"}, "list"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(RowError, match=words):
            oip.infer(table, body, "v1")


def test_a_bundle_without_serving_files_or_damaged_is_refused(table_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(table_bundle.bundle, old)
    manifest = json.loads((old / storage.MANIFEST).read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != raw_schema.SCHEMA_FILE]
    (old / storage.MANIFEST).write_text(json.dumps(manifest))
    (old / raw_schema.SCHEMA_FILE).unlink()
    with pytest.raises(KubetrainError, match="publish the model again"):
        Predictor(open_bundle(str(old)))
    damaged = tmp_path / "damaged"
    shutil.copytree(table_bundle.bundle, damaged)
    (damaged / raw_schema.PREPROCESSOR_FILE).write_text("{}")
    with pytest.raises(KubetrainError, match="does not match"):
        open_bundle(str(damaged))
    with pytest.raises(KubetrainError, match="not a published bundle"):
        open_bundle(str(tmp_path))


def test_the_cli_refuses_a_bad_bundle_in_one_line(tmp_path, capsys):
    assert main(["serve", "--bundle", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err
    assert main(["serve", "--bundle", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_a_bundle_on_s3_serves_the_same(table_bundle, s3_env, tmp_path):
    files = tmp_path / "files"
    shutil.copytree(table_bundle.bundle, files, ignore=shutil.ignore_patterns(storage.MANIFEST))
    uri = storage.publish(str(files), f"s3://{s3_env}/models/churn/v1/")
    bundle = open_bundle(uri, cache_dir=tmp_path / "cache")
    assert (bundle.name, bundle.version) == ("churn", "v1")
    result = Predictor(bundle).predict_rows(table_bundle.test_rows[:20])
    np.testing.assert_allclose(result.probabilities, table_bundle.probabilities[:20], atol=1e-6)


def test_a_regression_bundle_serves_values_equal_to_the_pipeline(regression_bundle):
    t = regression_bundle
    predictor = Predictor(open_bundle(str(t.bundle)))
    assert predictor.regression and predictor.class_names == []
    result = predictor.predict_rows(t.test_rows)
    assert result.regression and result.labels == [] and result.probabilities.shape[1] == 0
    np.testing.assert_allclose(result.values, t.probabilities[:, 0], rtol=1e-6, atol=1e-4)
    assert t.evaluation["r2"] > 0.5  # a model worth serving: the values track the target
    reply = oip.infer(predictor, {"rows": t.test_rows[:3]}, "v1")
    assert [o["name"] for o in reply["outputs"]] == ["value"]
    assert reply["outputs"][0]["shape"] == [3]
    meta = oip.metadata(predictor, "v1")
    assert meta["parameters"]["task"] == "regression"
    assert set(meta["parameters"]["test_metrics"]) == {"r2", "rmse", "mae"}
    assert meta["parameters"]["test_metrics"]["r2"] == pytest.approx(t.evaluation["r2"])
    with pytest.raises(RowError, match="'plan'"):
        predictor.predict_rows([{**t.test_rows[0], "plan": 3}])


def test_encoded_images_decode_as_ingest_does(digits_bundle):
    """Digits' raw pixels (0..16) as 8-bit greyscale PNG files: decoded by ingest's
    decoder, they give the pipeline's own probabilities; a file ingest would skip is
    refused in one line naming the image."""
    import base64
    import io

    from PIL import Image

    t = digits_bundle
    predictor = Predictor(open_bundle(str(t.bundle)))
    files = []
    for image in t.test_rows[:40]:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8), "L").save(buffer, "PNG")
        files.append(base64.b64encode(buffer.getvalue()).decode())
    result = predictor.predict_rows(files)
    np.testing.assert_allclose(result.probabilities, t.probabilities[:40], atol=1e-6)
    reply = oip.infer(
        predictor,
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": files[:2]}]},
        "v1",
    )
    np.testing.assert_allclose(
        np.reshape(reply["outputs"][1]["data"], (2, -1)), t.probabilities[:2], atol=1e-6
    )
    colour = io.BytesIO()
    Image.new("RGB", (8, 8)).save(colour, "PNG")
    for bad, words in [
        (base64.b64encode(b"not an image").decode(), "image 1: corrupt"),
        (base64.b64encode(colour.getvalue()).decode(), "image 1: channels"),
        ("%%%", "image 1 is not base64"),
    ]:
        with pytest.raises(RowError, match=words) as caught:
            predictor.predict_rows([files[0], bad])
        assert caught.value.column == "image" and "\n" not in str(caught.value)


def test_images_are_encoded_from_their_array_as_from_a_frame_of_their_values(digits_bundle):
    """The pixel path skips the frame of a column per value (seconds per 224x224 image):
    its features are the frame path's, bit for bit, and a non-finite pixel is refused in
    one line naming 'pixels'."""
    import pandas as pd

    predictor = Predictor(open_bundle(str(digits_bundle.bundle)))
    pixels = np.asarray(digits_bundle.test_rows, np.float64).reshape(
        len(digits_bundle.test_rows), -1
    )
    frame = pd.DataFrame(pixels, columns=[c.name for c in predictor.schema.columns])
    assert np.array_equal(predictor.pixel_features(pixels), predictor.features(frame))
    bad = pixels[:2].copy()
    bad[1, 5] = np.nan
    with pytest.raises(RowError, match="finite") as caught:
        predictor.predict_images(bad)
    assert caught.value.column == "pixels" and "\n" not in str(caught.value)
