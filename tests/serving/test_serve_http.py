"""`kubetrain serve` as a real process, over real HTTP (KServe Open Inference Protocol v2).

A table bundle (numeric, categorical, text, date and ID columns) and a digits bundle,
both trained by the pipeline's stage functions: the server's predictions on the raw
test rows equal the evaluate stage's on the test split; a schema violation gets a 400
with one line naming the column and the server keeps serving; batch-1 latency (p50 and
p99 over the test rows, one request each on a kept-alive connection) is printed, not
asserted (a shared 2-core machine says little about speed).
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

from conftest import Trained, served
from kubetrain.data.raw_schema import InputSchema
from kubetrain.serving import oip

pytestmark = pytest.mark.integration

ATOL = 1e-6  # the same network on the same features: equal up to float32 rounding


def call(url: str, body: Any = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or a POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def outputs(reply: dict) -> tuple[list[str], np.ndarray]:
    out = {o["name"]: o for o in reply["outputs"]}
    proba = out["probabilities"]
    return out["label"]["data"], np.asarray(proba["data"], np.float32).reshape(proba["shape"])


def column_tensors(rows: list[dict], schema: InputSchema) -> list[dict]:
    """Rows as OIP v2 tensors, one per column, typed as the model metadata says."""
    return [
        {
            "name": c.name,
            "datatype": oip.datatype(c.arrow),
            "shape": [len(rows)],
            "data": [r[c.name] for r in rows],
        }
        for c in schema.kept
    ]


def latency(url: str, bodies: list[dict]) -> tuple[float, float, list[dict]]:
    """(p50 ms, p99 ms, replies) of one request per body on one kept-alive connection."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    times, replies = [], []
    try:
        for body in bodies:
            data = json.dumps(body).encode()
            start = time.perf_counter()
            conn.request("POST", parsed.path, data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            times.append((time.perf_counter() - start) * 1000)
            assert response.status == 200, payload
            replies.append(json.loads(payload))
    finally:
        conn.close()
    times.sort()
    p99 = times[min(len(times) - 1, int(np.ceil(0.99 * len(times))) - 1)]
    return statistics.median(times), p99, replies


def schema_of(trained: Trained) -> InputSchema:
    from kubetrain.data import raw_schema as schema

    return schema.read(trained.bundle)[0]


@pytest.fixture(scope="module")
def table_server(table_bundle: Trained):
    with served(table_bundle.bundle) as url:
        yield url


@pytest.fixture(scope="module")
def digits_server(digits_bundle: Trained):
    with served(digits_bundle.bundle) as url:
        yield url


def test_health_and_metadata(table_server, table_bundle):
    assert call(f"{table_server}/v2/health/live") == (200, {"live": True})
    assert call(f"{table_server}/v2/health/ready") == (200, {"ready": True})
    assert call(f"{table_server}/v2/models/churn/ready") == (200, {"name": "churn", "ready": True})
    status, meta = call(f"{table_server}/v2/models/churn")
    assert status == 200 and meta["name"] == "churn"
    assert meta["versions"] == [table_bundle.bundle.name]
    inputs = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert inputs == {"amount": "FP64", "plan": "BYTES", "review": "BYTES", "signup": "BYTES"}
    assert meta["parameters"]["column_types"] == {
        "amount": "numeric",
        "plan": "categorical",
        "review": "text",
        "signup": "datetime",
    }
    assert meta["parameters"]["ignored_columns"] == ["customer_id"]
    assert sorted(meta["parameters"]["class_names"]) == ["no", "yes"]
    status, err = call(f"{table_server}/v2/models/other")
    assert status == 404 and "'other'" in err["error"] and "'churn'" in err["error"]


def test_table_tensors_equal_the_pipeline_predictions(table_server, table_bundle):
    t, schema = table_bundle, schema_of(table_bundle)
    status, reply = call(
        f"{table_server}/v2/models/churn/infer",
        {"id": "batch", "inputs": column_tensors(t.test_rows, schema)},
    )
    assert status == 200, reply
    labels, proba = outputs(reply)
    assert reply["id"] == "batch" and reply["model_name"] == "churn"
    np.testing.assert_allclose(proba, t.probabilities, atol=ATOL)
    names = reply_class_names(table_server, "churn")
    assert labels == [names[i] for i in t.probabilities.argmax(1)]
    accuracy = np.mean([a == b for a, b in zip(labels, t.labels, strict=True)])
    assert accuracy == pytest.approx(t.evaluation["accuracy"])


def test_table_rows_at_batch_1_equal_the_pipeline_and_latency(table_server, table_bundle):
    t = table_bundle
    url = f"{table_server}/v2/models/churn/infer"
    p50, p99, replies = latency(url, [{"rows": [row]} for row in t.test_rows])
    proba = np.concatenate([outputs(r)[1] for r in replies])
    np.testing.assert_allclose(proba, t.probabilities, atol=ATOL)
    print(f"\ntable bundle, batch 1 over HTTP: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({len(replies)} requests)")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "column", "words"),
    [
        ({"amount": "lots"}, "amount", "numbers"),
        ({"amount": True}, "amount", "numbers"),
        ({"plan": 3}, "plan", "text"),
        ({"signup": "next tuesday"}, "signup", "cannot read"),
        ({"colour": "red"}, "colour", "unknown column"),
        ({"review": None, "plan": ["a"]}, "plan", "text"),
    ],
)
def test_a_schema_violation_gets_400_naming_the_column_and_serving_goes_on(
    table_server, table_bundle, change, column, words
):
    url = f"{table_server}/v2/models/churn/infer"
    bad = {**table_bundle.test_rows[0], **change}
    status, reply = call(url, {"rows": [table_bundle.test_rows[1], bad]})
    assert status == 400
    assert set(reply) == {"error"} and "\n" not in reply["error"]
    assert f"'{column}'" in reply["error"] and words in reply["error"]
    status, reply = call(url, {"rows": [table_bundle.test_rows[0]]})
    assert status == 200
    np.testing.assert_allclose(outputs(reply)[1], table_bundle.probabilities[:1], atol=ATOL)


def test_bad_requests_get_one_line_and_serving_goes_on(table_server, table_bundle):
    url = f"{table_server}/v2/models/churn/infer"
    row = dict(table_bundle.test_rows[0])
    del row["plan"]
    cases = [
        ({"rows": [row]}, "'plan'"),  # a kept column left out
        ({"inputs": [{"name": "amount", "datatype": "FP64", "shape": [2], "data": [1.0]}]}, "data"),
        ({"inputs": [{"name": "amount", "datatype": "TEXT", "shape": [1], "data": [1]}]}, "TEXT"),
        ({"instances": []}, "inputs"),
    ]
    for body, words in cases:
        status, reply = call(url, body)
        assert status == 400 and words in reply["error"] and "\n" not in reply["error"], reply
    req = urllib.request.Request(url, b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=30)
    assert caught.value.code == 400 and "not JSON" in json.loads(caught.value.read())["error"]
    assert call(url, {"rows": [table_bundle.test_rows[0]]})[0] == 200


def test_digits_images_equal_the_pipeline_predictions_and_latency(digits_server, digits_bundle):
    t = digits_bundle
    url = f"{digits_server}/v2/models/digits/infer"
    images = np.asarray(t.test_rows, np.float32)  # (n, 8, 8) raw pixels, 0..16
    status, reply = call(
        url,
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": [len(images), 8, 8],
                    "data": images.ravel().tolist(),
                }
            ]
        },
    )
    assert status == 200, reply
    labels, proba = outputs(reply)
    np.testing.assert_allclose(proba, t.probabilities, atol=ATOL)
    accuracy = np.mean([a == b for a, b in zip(labels, t.labels, strict=True)])
    assert accuracy == pytest.approx(t.evaluation["accuracy"])
    bodies = [{"rows": [image]} for image in t.test_rows]
    p50, p99, replies = latency(url, bodies)
    proba = np.concatenate([outputs(r)[1] for r in replies])
    np.testing.assert_allclose(proba, t.probabilities, atol=ATOL)
    print(f"\ndigits bundle, batch 1 over HTTP: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({len(replies)} requests)")  # fmt: skip
    status, reply = call(url, {"rows": [np.zeros((7, 7)).tolist()]})
    assert status == 400 and "'pixels'" in reply["error"] and "(n, 1, 8, 8)" in reply["error"]
    assert call(url, {"rows": [t.test_rows[0]]})[0] == 200


def test_onnx_runtime_equals_compress_scoring(table_bundle):
    """--runtime onnx serves model.onnx (compress's kept variant) and scores a batch as
    compress scored the test split (`onnx_predict`)."""
    from kubetrain.assessment.compression import onnx_predict

    t, schema = table_bundle, schema_of(table_bundle)
    with served(t.bundle, "--runtime", "onnx", "--model-name", "churn-onnx") as url:
        status, reply = call(
            f"{url}/v2/models/churn-onnx/infer", {"inputs": column_tensors(t.test_rows, schema)}
        )
        meta = call(f"{url}/v2/models/churn-onnx")[1]
    assert status == 200, reply
    assert meta["platform"] == "kubetrain-onnx"
    expected = onnx_predict(t.bundle / "model.onnx", t.features)
    np.testing.assert_allclose(outputs(reply)[1], expected, atol=ATOL)


def reply_class_names(url: str, name: str) -> list[str]:
    return call(f"{url}/v2/models/{name}")[1]["parameters"]["class_names"]


def test_a_regression_bundle_serves_values_over_http(regression_bundle):
    """Values, not probabilities: column tensors and rows at batch 1 equal the evaluate
    stage's predictions; a violation gets a 400 naming the column, and serving goes on."""
    t, schema = regression_bundle, schema_of(regression_bundle)
    with served(t.bundle) as url:
        infer = f"{url}/v2/models/spend/infer"
        status, reply = call(infer, {"inputs": column_tensors(t.test_rows, schema)})
        assert status == 200, reply
        (out,) = reply["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("value", "FP32", [len(t.test_rows)])
        np.testing.assert_allclose(out["data"], t.probabilities[:, 0], rtol=1e-6, atol=1e-4)
        meta = call(f"{url}/v2/models/spend")[1]
        assert meta["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1]}]
        assert meta["parameters"]["task"] == "regression"
        status, reply = call(infer, {"rows": [{**t.test_rows[0], "signup": "someday"}]})
        assert status == 400 and "'signup'" in reply["error"] and "\n" not in reply["error"]
        p50, p99, replies = latency(infer, [{"rows": [row]} for row in t.test_rows])
    values = [r["outputs"][0]["data"][0] for r in replies]
    np.testing.assert_allclose(values, t.probabilities[:, 0], rtol=1e-6, atol=1e-4)
    print(f"\nregression bundle, batch 1 over HTTP: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({len(replies)} requests)")  # fmt: skip


def test_digits_as_encoded_png_files_over_http(digits_server, digits_bundle):
    """Images as files (a BYTES tensor of base64 PNGs), decoded by ingest's decoder: the
    pipeline's probabilities; a corrupt file gets a 400 and serving goes on."""
    import base64
    import io

    from PIL import Image

    t = digits_bundle
    files = []
    for image in t.test_rows:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8), "L").save(buffer, "PNG")
        files.append(base64.b64encode(buffer.getvalue()).decode())
    url = f"{digits_server}/v2/models/digits/infer"
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": files}
    status, reply = call(url, {"inputs": [tensor]})
    assert status == 200, reply
    np.testing.assert_allclose(outputs(reply)[1], t.probabilities, atol=ATOL)
    junk = base64.b64encode(b"GIF89a but not really").decode()
    status, reply = call(url, {"inputs": [{**tensor, "shape": [1], "data": [junk]}]})
    assert status == 400 and "corrupt" in reply["error"] and "\n" not in reply["error"]
    assert call(url, {"rows": files[:1]})[0] == 200
