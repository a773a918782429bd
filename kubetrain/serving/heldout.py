"""The raw rows behind a run's test split: what champion/challenger and the smoke test send.

Why recover them: clean writes the test split encoded (scaled, one-hot, hashed), and a
served model takes raw rows. Clean keeps no pointer from a split row back to its raw
row, so each test row is matched to the raw table row whose encoding, by the bundle's
own fitted preprocessor (`Predictor.features`, clean's ``Preprocessor.transform``), is
exactly that row's features. The table is read in batches and reading stops once the
first ``limit`` test rows are all found, so a large table is not held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kubetrain.core.errors import KubetrainError
from kubetrain.data import batches
from kubetrain.data.datasets import (
    LABEL,
    PIXELS,
    is_image_table,
    pixel_rows,
    table_batches,
    table_record_batches,
)
from kubetrain.serving.predictor import Predictor

#: Test rows scored by champion/challenger and sent by the smoke test, at most.
LIMIT = 500
BATCH_ROWS = 50_000
BATCH_BYTES = 64 * 1024 * 1024  # of an image table's pixels


@dataclass(frozen=True)
class Heldout:
    """Raw test rows as a client sends them (JSON values; images as pixel lists) and
    their truth: class names, or a regression's target values."""

    rows: list[Any]
    truth: list[Any]


def heldout_rows(
    predictor: Predictor, table_path: str, test_path: str, limit: int = LIMIT
) -> Heldout:
    """The first ``limit`` rows of the test split at ``test_path`` as raw rows of the
    ingested table at ``table_path``, encoded by ``predictor``'s bundle (the run's own)."""
    X, y, schema = batches.head(test_path, limit)  # not the whole split: 2M rows at 10M
    wanted: dict[bytes, list[int]] = {}
    for i, x in enumerate(np.ascontiguousarray(X, np.float32)):
        wanted.setdefault(x.tobytes(), []).append(i)
    found: list[Any] = [None] * len(X)
    left = len(X)
    for encoded, client_row in _encoded_batches(predictor, table_path):
        encoded = np.ascontiguousarray(encoded, np.float32)
        for j, row in enumerate(encoded):
            for i in wanted.pop(row.tobytes(), []):
                found[i] = client_row(j)
                left -= 1
        if left == 0:
            break
    if left:
        raise KubetrainError(
            f"{left} of {len(X)} test rows of {test_path} match no row of {table_path} under "
            "the bundle's preprocessor: pass the table and test split of the run that "
            "published the bundle"
        )
    truth = y.tolist() if schema.regression else [schema.class_names[int(c)] for c in y]
    return Heldout(found, truth)


def _encoded_batches(
    predictor: Predictor, table_path: str
) -> Iterator[tuple[np.ndarray, Callable[[int], Any]]]:
    """Per batch of the table: its rows encoded by the bundle's preprocessor (an image
    table's pixels straight from their column) and row ``j`` as a client sends it (JSON
    values; an image as nested pixel lists)."""
    names = [c.name for c in predictor.schema.columns]
    if not predictor.image:
        for frame in table_batches(table_path, BATCH_ROWS):
            raw = frame.drop(columns=[LABEL])
            yield predictor.features(raw), lambda j, raw=raw: _json_row(raw.iloc[j], names)
        return
    shape = predictor.schema.image_shape
    assert shape is not None
    client_shape = shape[1:] if shape[0] == 1 else shape
    if not is_image_table(table_path):  # an NPZ of images or digits: a column per value
        for frame in table_batches(table_path, BATCH_ROWS):
            pixels = np.asarray(frame[names].to_numpy(), np.float64)
            yield (
                predictor.features(frame[names]),
                lambda j, p=pixels: p[j].reshape(client_shape).tolist(),
            )
        return
    for batch in table_record_batches(table_path, max(1, BATCH_BYTES // len(names))):
        pixels = pixel_rows(batch.column(PIXELS))
        yield (
            predictor.pixel_features(pixels),
            lambda j, p=pixels: p[j].reshape(client_shape).tolist(),
        )


def _json_row(row: pd.Series, names: list[str]) -> dict[str, Any]:
    return {name: json_value(row[name]) for name in names}


def json_value(v: Any) -> Any:
    """A raw value as a client sends it: null for missing, dates as ISO text, numbers."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    if isinstance(v, np.generic):
        v = v.item()
        return None if isinstance(v, float) and np.isnan(v) else v
    return v
