"""Raw rows or images in, class probabilities (or a regression's values) out: a published
bundle, ready to serve.

Why it reuses clean instead of its own encoder: the model only means anything on
clean's exact encoding. The bundle's ``preprocessor.json`` is the fitted
`kubetrain.data.clean.Preprocessor`'s params, and `Predictor.features` applies them with
``Preprocessor.transform``, the same call clean's apply step
(`kubetrain.data.clean_stream.apply_batch`) makes for every row of the test split. So a
raw test row served here gets the features, and then the probabilities, that the
evaluate stage scored.

Two runtimes: ``pytorch`` (default) runs ``pytorch/``, the network evaluate measured and
the quality gate passed, with evaluate's own scorer (`kubetrain.training.models.
predict_proba`); ``onnx`` runs ``model.onnx``, the variant compress kept (smaller; an int8
variant's scores differ from the network's within compress's accuracy budget), with
compress's scorer (`kubetrain.assessment.compression.onnx_predict`). A regression
bundle's network is a `kubetrain.training.models.Regressor`, whose one output is already
in the target's units (both runtimes): that number is the prediction, nothing is
applied to it.

Images come as pixel arrays or as encoded files (PNG, JPEG, WebP, ...); files are
decoded by ingest's own `kubetrain.data.image_decode.decode` to the model's shape, so a
served photo gets the pixels an ingested one got.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kubetrain.config.settings import CleanConfig
from kubetrain.core.errors import KubetrainError, require
from kubetrain.data import raw_schema as input_schema
from kubetrain.data.clean import Preprocessor
from kubetrain.data.datasets import Schema
from kubetrain.data.raw_schema import InputSchema
from kubetrain.serving import rows as raw
from kubetrain.serving.bundle import Bundle

RUNTIMES = ("pytorch", "onnx")


@dataclass(frozen=True)
class Prediction:
    """Per row: the class name and every class's probability (`class_names` order), or
    for a regression (``values`` set, no classes) the predicted value."""

    labels: list[str]
    probabilities: np.ndarray  # float32 (rows, classes); (rows, 0) for a regression
    class_names: list[str]
    values: np.ndarray | None = None  # float32 (rows,): a regression's predictions

    @property
    def regression(self) -> bool:
        return self.values is not None


class Predictor:
    """A bundle's preprocessor and model, loaded once; `predict_rows` and `predict_images`
    take raw inputs (`kubetrain.serving.rows` checks them) and return a `Prediction`."""

    def __init__(self, bundle: Bundle, runtime: str = "pytorch") -> None:
        require(runtime in RUNTIMES, f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        self.bundle, self.runtime = bundle, runtime
        self.schema, params = input_schema.read(bundle.root)
        require(
            self.schema.regression or bool(self.schema.class_names),
            f"{bundle.source}: its schema.json has no classes and is not a regression; "
            "publish the model again with this kubetrain",
        )
        self.prep = preprocessor(params, self.schema)
        self._score = _scorer(bundle, runtime)
        self.num_features = len(self.prep.feature_names())
        self.metrics = bundle.json("metrics.json")

    @property
    def class_names(self) -> list[str]:
        return self.schema.class_names

    @property
    def image(self) -> bool:
        return self.schema.kind == "image"

    @property
    def regression(self) -> bool:
        return self.schema.regression

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """Clean's encoding of raw ``frame`` (float32, rows x model inputs)."""
        return self.prep.transform(frame)

    def predict_frame(self, frame: pd.DataFrame) -> Prediction:
        if not len(frame):
            return self.predict_features(np.zeros((0, self.num_features), np.float32))
        return self.predict_features(self.features(frame))

    def predict_features(self, X: np.ndarray) -> Prediction:
        """The prediction for rows already encoded (`features`, `pixel_features`)."""
        if self.regression:
            scores = (
                np.asarray(self._score(X), np.float32) if len(X) else np.zeros((0, 1), np.float32)
            )
            return Prediction([], np.zeros((len(scores), 0), np.float32), [], scores[:, 0])
        if not len(X):
            empty = np.zeros((0, len(self.class_names)), np.float32)
            return Prediction([], empty, self.class_names)
        proba = np.asarray(self._score(X), np.float32)
        labels = [self.class_names[i] for i in proba.argmax(axis=1)]
        return Prediction(labels, proba, self.class_names)

    def pixel_features(self, pixels: np.ndarray) -> np.ndarray:
        """Clean's encoding of images given as arrays of pixel values (see `predict_images`)."""
        return self.prep.transform_pixels(raw.image_rows(np.asarray(pixels), self.schema))

    def predict_rows(self, rows: Sequence[Any]) -> Prediction:
        """Table rows (JSON objects keyed by column name); an image model takes images
        here: pixel arrays, or encoded files as base64 text (`predict_encoded`)."""
        if self.image:
            if isinstance(rows, list | tuple) and rows and all(isinstance(r, str) for r in rows):
                return self.predict_encoded(rows)
            return self.predict_images(_pixels(rows))
        return self.predict_frame(raw.table_frame(rows, self.schema))

    def predict_columns(self, columns: dict[str, Sequence[Any]]) -> Prediction:
        """Table columns (one list of raw values per column name, equal lengths)."""
        require(not self.image, "this is an image model: send pixel arrays, not columns")
        return self.predict_frame(raw.columns_frame(columns, self.schema))

    def predict_images(self, pixels: np.ndarray) -> Prediction:
        """Images as arrays of pixel values, encoded straight from the array: no frame of a
        column per value (seconds per 224x224 image)."""
        require(self.image, "this is a table model: send rows keyed by column name")
        return self.predict_features(self.pixel_features(pixels))

    def predict_encoded(self, images: Sequence[str | bytes]) -> Prediction:
        """Encoded image files (bytes, or base64 text as JSON carries them), decoded as
        ingest decodes them (`kubetrain.serving.rows.decode_images`)."""
        require(self.image, "this is a table model: send rows keyed by column name")
        return self.predict_images(raw.decode_images(images, self.schema))


def preprocessor(params: dict[str, Any], schema: InputSchema) -> Preprocessor:
    """Clean's `Preprocessor` with the bundle's fitted params, as clean builds it for its
    apply step (`kubetrain.data.clean_stream.Plan.preprocessor`): ``transform`` reads only
    the params; the config and schema matter to fitting, which never happens here."""
    names = [c.name for c in schema.kept]
    prep = Preprocessor(
        CleanConfig(), Schema(schema.kind, names, schema.class_names, schema.image_shape)
    )
    prep.params = params
    return prep


def _scorer(bundle: Bundle, runtime: str):
    """Features -> class probabilities with the pipeline's own scorer for the runtime."""
    if runtime == "onnx":
        from kubetrain.assessment.compression import _session, onnx_predict

        path = bundle.root / "model.onnx"
        if not path.is_file():
            raise KubetrainError(f"{bundle.source} has no model.onnx; serve --runtime pytorch")
        session = _session(path)
        return lambda X: onnx_predict(path, X, session=session)
    from kubetrain.training.models import load_model, predict_proba

    model, _, _ = load_model(bundle.root / "pytorch")
    return lambda X: predict_proba(model, X).numpy()


def _pixels(images: Sequence[Any]) -> np.ndarray:
    """A list of images (nested lists of numbers) as one array, or a `RowError`."""
    if not isinstance(images, list | tuple):
        raise raw.RowError("images must be a list of pixel arrays", "pixels")
    try:
        return np.asarray(images, dtype=np.float64)
    except (TypeError, ValueError):
        raise raw.RowError(
            "images must be equally shaped arrays of numbers (one per image)", "pixels"
        ) from None
