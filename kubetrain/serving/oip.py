"""The KServe Open Inference Protocol v2 (REST) bodies: requests in, responses out.

Why apart from the server: what the protocol says (tensors, datatypes, shapes) is
checked here, with plain dicts, so the server only routes, and a wrong request gets the
same one line whichever framework carries it.

Inputs a table model takes (one of):

* OIP tensors, one per column (MLServer's and KServe's pandas convention): ``{"inputs":
  [{"name": "age", "datatype": "FP64", "shape": [2], "data": [31, 54]}, {"name": "city",
  "datatype": "BYTES", "shape": [2], "data": ["Oslo", "Lima"]}, ...]}``; numbers as
  FP16/FP32/FP64/INT8-64/UINT8-64, text and dates as BYTES, booleans as BOOL; ``null``
  in ``data`` is a missing value (imputed as in training);
* rows, a kubetrain extension for clients that hold records: ``{"rows": [{"age": 31,
  "city": "Oslo", ...}, ...]}``.

An image model takes one tensor (any name), either raw pixels of shape ``[n, C, H, W]``,
``[n, H, W]`` or ``[n, C*H*W]``, numeric datatype, data flat (row-major) or nested; or
encoded files (PNG, JPEG, WebP, ... as ingest reads them): datatype ``BYTES``, shape
``[n]``, each element the file's base64 text, as KServe's image examples send them (JSON
cannot carry raw bytes). ``{"rows": [image, ...]}`` takes either, each image a nested list
or base64 text.

The response of a classifier has two outputs: ``label`` (BYTES, ``[n]``, the class names)
and ``probabilities`` (FP32, ``[n, classes]``, columns in the order of the model
metadata's ``parameters.class_names``); a regression's has one, ``value`` (FP32, ``[n]``,
the prediction in the target's units).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kubetrain.serving.predictor import Prediction, Predictor
from kubetrain.serving.rows import RowError

NUMERIC = {
    "FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
    "UINT8", "UINT16", "UINT32", "UINT64",
}  # fmt: skip
DATATYPES = NUMERIC | {"BYTES", "BOOL"}


def infer(predictor: Predictor, body: Any, model_version: str) -> dict[str, Any]:
    """The response to an inference request body (parsed JSON), or a `RowError`."""
    if not isinstance(body, dict):
        raise RowError("the request body must be a JSON object with 'inputs' (or 'rows')")
    if "inputs" in body:
        tensors = _tensors(body["inputs"])
        if predictor.image and _encoded(tensors):
            result = predictor.predict_encoded(_flat(tensors[0]))
        elif predictor.image:
            result = predictor.predict_images(_image_tensor(tensors))
        else:
            result = predictor.predict_columns(_column_tensors(tensors))
    elif "rows" in body:
        result = predictor.predict_rows(body["rows"])
    else:
        raise RowError("the request body has no 'inputs' (OIP v2 tensors) and no 'rows'")
    return response(predictor.bundle.name, model_version, result, body.get("id"))


def response(name: str, version: str, result: Prediction, request_id: Any = None) -> dict[str, Any]:
    n, k = result.probabilities.shape
    out: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "outputs": _outputs(result, n, k),
    }
    if request_id is not None:
        out["id"] = str(request_id)
    return out


def _outputs(result: Prediction, n: int, k: int) -> list[dict[str, Any]]:
    if result.values is not None:
        return [{"name": "value", "datatype": "FP32", "shape": [n], "data": result.values.tolist()}]
    return [
        {"name": "label", "datatype": "BYTES", "shape": [n], "data": result.labels},
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [n, k],
            "data": result.probabilities.ravel().tolist(),
        },
    ]


def metadata(predictor: Predictor, version: str) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs, outputs, and the classes in output order."""
    if predictor.image:  # either tensor: pixels, or encoded files (`_encoded`)
        inputs = [
            {"name": "pixels", "datatype": "FP32", "shape": [-1, *predictor.schema.image_shape]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ]
    else:
        inputs = [
            {"name": c.name, "datatype": datatype(c.arrow), "shape": [-1]}
            for c in predictor.schema.kept
        ]
    return {
        "name": predictor.bundle.name,
        "versions": [version],
        "platform": f"kubetrain-{predictor.runtime}",
        "inputs": inputs,
        "outputs": (
            [{"name": "value", "datatype": "FP32", "shape": [-1]}]
            if predictor.regression
            else [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [-1, len(predictor.class_names)],
                },
            ]
        ),
        "parameters": {
            "task": predictor.schema.task,
            "class_names": predictor.class_names,
            "column_types": {c.name: c.kind for c in predictor.schema.kept},
            "ignored_columns": [c.name for c in predictor.schema.columns if c.dropped],
            "test_metrics": {
                k: predictor.metrics.get(k)
                for k in (
                    ("r2", "rmse", "mae")
                    if predictor.regression
                    else ("accuracy", "macro_f1", "roc_auc")
                )
            },
        },
    }


def datatype(arrow_type: Any) -> str:
    """The OIP datatype a column of this Arrow type is sent as."""
    import pyarrow as pa

    if pa.types.is_boolean(arrow_type):
        return "BOOL"
    if pa.types.is_integer(arrow_type):
        return "INT64"
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "FP64"
    return "BYTES"


def _tensors(inputs: Any) -> list[Mapping[str, Any]]:
    if not isinstance(inputs, list) or not inputs:
        raise RowError("'inputs' must be a non-empty list of tensors")
    for t in inputs:
        if not isinstance(t, dict) or not {"name", "datatype", "shape", "data"} <= set(t):
            raise RowError("each input tensor needs name, datatype, shape and data")
        if t["datatype"] not in DATATYPES:
            raise RowError(
                f"input {t['name']!r}: datatype {t['datatype']!r} is not an OIP v2 datatype",
                str(t["name"]),
            )
        shape = t["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RowError(f"input {t['name']!r}: shape must be a list of sizes", str(t["name"]))
    return inputs


def _flat(t: Mapping[str, Any]) -> list[Any]:
    """A tensor's data, flattened row-major, checked against its shape."""
    data = t["data"]
    flat: list[Any] = []
    stack = [data]
    while stack:  # iterative flatten: a deeply nested body cannot exhaust the stack
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    size = int(np.prod(t["shape"])) if t["shape"] else 1
    if len(flat) != size:
        raise RowError(
            f"input {t['name']!r}: shape {t['shape']} holds {size} values, data has {len(flat)}",
            str(t["name"]),
        )
    return flat


def _column_tensors(tensors: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """One tensor per column, each ``[n]`` (or ``[n, 1]``), as columns of raw values."""
    columns: dict[str, list[Any]] = {}
    for t in tensors:
        name, shape = str(t["name"]), t["shape"]
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise RowError(
                f"input {name!r}: shape {shape}; a column is a tensor of shape [n] (one "
                "value per row)",
                name,
            )
        if name in columns:
            raise RowError(f"input {name!r} is sent twice", name)
        values = _flat(t)
        if t["datatype"] == "BOOL":
            values = [v if v is None else bool(v) for v in values]
        columns[name] = values
    return columns


def _encoded(tensors: list[Mapping[str, Any]]) -> bool:
    """Whether an image model was sent encoded files: one BYTES tensor of shape [n]."""
    if len(tensors) != 1 or tensors[0]["datatype"] != "BYTES":
        return False
    if len(tensors[0]["shape"]) != 1:
        raise RowError(
            f"input {tensors[0]['name']!r}: shape {tensors[0]['shape']}; encoded images are a "
            "BYTES tensor of shape [n], one base64 file per image",
            str(tensors[0]["name"]),
        )
    return True


def _image_tensor(tensors: list[Mapping[str, Any]]) -> np.ndarray:
    if len(tensors) != 1:
        raise RowError("an image model takes one input tensor (the images)", "pixels")
    t = tensors[0]
    if t["datatype"] not in NUMERIC:
        raise RowError(
            f"input {t['name']!r}: images are numbers (pixels) or BYTES (encoded files), not "
            f"{t['datatype']}",
            str(t["name"]),
        )
    if len(t["shape"]) < 2:
        raise RowError(
            f"input {t['name']!r}: shape {t['shape']}; images are [n, C, H, W] or [n, H, W]",
            str(t["name"]),
        )
    values = _flat(t)
    if any(v is None or isinstance(v, bool | str) for v in values):
        raise RowError(f"input {t['name']!r}: pixels must all be numbers", str(t["name"]))
    return np.asarray(values, np.float64).reshape(t["shape"])
