"""Raw inputs to the pandas frame clean's preprocessor reads, checked against the schema.

Why through Arrow: the pipeline read the table with ``pyarrow`` (Parquet batches turned
into pandas by ``to_pandas``), and clean's encodings depend on the pandas dtypes that
produced (an integer column's categories read "3", a double's "3.0"; text is pandas'
string dtype). Building each served column as an Arrow array of the table's own type
and converting it the same way gives the preprocessor the very frame it saw in training.

What counts as a violation (`RowError`, one line naming the column): an unknown column,
a kept column absent from a row (send ``null`` for a missing value: it is imputed as in
training), a value of the wrong JSON type for the column (a string for a number, a
number for text, a fraction for an integer column, true/false for a number), and a
value that does not parse as the column's type (a date that is not a date, a boolean
word that is not one, numbers-as-text that are not numbers). The pipeline read such
junk cells as missing; a served request that has them is refused instead, since it is
almost always a client bug. Dropped columns (identifiers, constants) may be sent and
are ignored. Unseen categories are not violations: they encode as no category, as a
test row's unseen category did.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from kubetrain.core.errors import KubetrainError
from kubetrain.data.column_types import to_float
from kubetrain.data.image_decode import Target, decode
from kubetrain.data.raw_schema import Column, InputSchema

#: Column names listed in an "unknown column" message before "...".
SHOWN_COLUMNS = 12


class RowError(KubetrainError):
    """A raw input that violates the schema; ``column`` names it (None: not one column)."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


def table_frame(rows: Sequence[Any], schema: InputSchema) -> pd.DataFrame:
    """Rows (JSON objects keyed by column name) as the frame clean's preprocessor reads."""
    if not isinstance(rows, list | tuple):
        raise RowError("rows must be a list of JSON objects keyed by column name")
    known = schema.by_name
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RowError(f"row {i} is not a JSON object keyed by column name")
        for name in row:
            if name not in known:
                raise RowError(f"row {i}: unknown column {name!r}; {_listed(schema)}", name)
        for col in schema.kept:
            if col.name not in row:
                raise RowError(
                    f"row {i} has no column {col.name!r} ({col.kind}); send null for a "
                    "missing value",
                    col.name,
                )
    return columns_frame({c.name: [row[c.name] for row in rows] for c in schema.kept}, schema)


def columns_frame(columns: dict[str, Sequence[Any]], schema: InputSchema) -> pd.DataFrame:
    """Columns of raw values (each the same length; every kept column present) as the
    frame clean's preprocessor reads; unknown names and dropped columns are refused and
    ignored as in `table_frame`."""
    known = schema.by_name
    for name in columns:
        if name not in known:
            raise RowError(f"unknown column {name!r}; {_listed(schema)}", name)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise RowError(f"columns differ in length ({sorted(lengths)}); send one value per row")
    arrays = []
    for col in schema.kept:
        if col.name not in columns:
            raise RowError(
                f"column {col.name!r} ({col.kind}) is missing; send null for a missing value",
                col.name,
            )
        arrays.append(_column(col, columns[col.name]))
    frame = pa.Table.from_arrays(arrays, names=[c.name for c in schema.kept]).to_pandas()
    for col in schema.kept:
        _check_parsed(col, frame[col.name])
    return frame


def image_rows(pixels: np.ndarray, schema: InputSchema) -> np.ndarray:
    """Images (``(n, C, H, W)``, ``(n, H, W)`` or ``(n, C*H*W)`` numbers) as rows of
    values (``(n, C*H*W)``, row-major, as ingested) that `Preprocessor.transform_pixels`
    encodes, checked: the model's shape, numbers, finite."""
    assert schema.image_shape is not None
    width = int(np.prod(schema.image_shape))
    if pixels.ndim < 2 or int(np.prod(pixels.shape[1:])) != width:
        shape = ", ".join(map(str, schema.image_shape))
        grey = ", ".join(map(str, schema.image_shape[1:]))
        raise RowError(
            f"'pixels': images of shape {list(pixels.shape)}; this model takes (n, {shape})"
            + (f" or (n, {grey})" if schema.image_shape[0] == 1 else ""),
            "pixels",
        )
    if not np.issubdtype(pixels.dtype, np.number) or np.issubdtype(pixels.dtype, np.bool_):
        raise RowError(f"'pixels' must be numbers, got {pixels.dtype}", "pixels")
    flat = pixels.reshape(len(pixels), width)
    if np.issubdtype(flat.dtype, np.floating) and not np.isfinite(flat).all():
        raise RowError("'pixels' must be finite numbers (no NaN or infinity)", "pixels")
    return flat


def image_target(schema: InputSchema) -> Target:
    """The shape ingest brought every image to, as `image_decode.decode` takes it: a square
    model resizes (shorter side, centre crop) as ``--image-size`` did, so a file of the
    model's own size passes unchanged and another size is brought to it; a non-square
    model (ingested at its images' own size) takes only that size."""
    assert schema.image_shape is not None
    channels, height, width = schema.image_shape
    if height == width:
        return Target(channels, height)
    return Target(channels, 0, (height, width))


def decode_images(images: Sequence[Any], schema: InputSchema) -> np.ndarray:
    """Encoded image files (bytes, or base64 text) as ``(n, C, H, W)`` uint8 pixels, decoded
    by ingest's own `kubetrain.data.image_decode.decode`; a file it would have skipped
    (corrupt, tiny, greyscale in a colour model, ...) is a `RowError` with its reason."""
    if not isinstance(images, list | tuple):
        raise RowError("images must be a list of encoded files (base64 text)", "image")
    target = image_target(schema)
    out = []
    for i, item in enumerate(images):
        if isinstance(item, str):
            try:
                item = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise RowError(f"image {i} is not base64 text", "image") from None
        if not isinstance(item, bytes | bytearray):
            raise RowError(f"image {i} is not an encoded file (base64 text)", "image")
        decoded = decode(bytes(item), target)
        if decoded.pixels is None:
            raise RowError(f"image {i}: {decoded.reason}: {decoded.detail}", "image")
        out.append(decoded.pixels)
    if not out:
        return np.zeros((0, *schema.image_shape), np.uint8)  # type: ignore[misc]
    return np.stack(out)


def _column(col: Column, values: Sequence[Any]) -> pa.Array:
    """One column's values as an Arrow array of the table's type, or a `RowError`."""
    t = col.arrow
    values = _as_text(col, values)
    for i, v in enumerate(values):
        if v is not None and not _fits(t, v):
            raise RowError(
                f"row {i}: column {col.name!r} ({col.kind}) takes {_wanted(t)}, got {_shown(v)}",
                col.name,
            )
    try:
        if pa.types.is_temporal(t):  # ISO text, read as Arrow reads a text column's cast
            return pa.array(values, pa.string()).cast(t)
        if pa.types.is_integer(t):
            return pa.array([None if v is None else int(v) for v in values], t)
        return pa.array(values, t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RowError(
            f"column {col.name!r} ({col.kind}) takes {_wanted(t)}: {first}", col.name
        ) from None


def _as_text(col: Column, values: Sequence[Any]) -> Sequence[Any]:
    """Numbers for a numbers-as-text column and true/false for a yes/no text column, as
    the text they stand for: the preprocessor reads either back to the same number."""
    if not (pa.types.is_string(col.arrow) or pa.types.is_large_string(col.arrow)):
        return values
    if col.kind == "numeric_text":
        plain = (int, float)
        return [repr(v) if isinstance(v, plain) and not isinstance(v, bool) else v for v in values]
    if col.kind == "boolean":
        return [str(v).lower() if isinstance(v, bool) else v for v in values]
    return values


def _fits(t: pa.DataType, v: Any) -> bool:
    """Whether the JSON value ``v`` has the JSON type a column of Arrow type ``t`` takes."""
    number = isinstance(v, int | float) and not isinstance(v, bool)
    if pa.types.is_boolean(t):
        return isinstance(v, bool)
    if pa.types.is_integer(t):
        return number and math.isfinite(v) and float(v).is_integer()
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return number
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_temporal(t):
        return isinstance(v, str)
    return True  # other Arrow types: pyarrow's own conversion decides


def _wanted(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "true/false"
    if pa.types.is_integer(t):
        return "whole numbers"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "numbers"
    if pa.types.is_temporal(t):
        return "ISO dates or times as text (2021-03-04T10:00:00)"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    return f"values of Arrow type {t}"


def _check_parsed(col: Column, values: pd.Series) -> None:
    """Refuse a value present but unreadable as the column's type (junk, see the module
    docstring): the preprocessor would read it as missing."""
    if col.kind not in ("numeric_text", "boolean", "datetime"):
        return
    read = to_float(values, col.kind, col.how)
    bad = np.flatnonzero(values.notna().to_numpy() & np.isnan(read))
    if len(bad):
        raise RowError(
            f"row {int(bad[0])}: column {col.name!r} ({col.kind}) cannot read "
            f"{_shown(values.iloc[int(bad[0])])}; send null for a missing value",
            col.name,
        )


def _listed(schema: InputSchema) -> str:
    names = [c.name for c in schema.kept]
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN_COLUMNS else ""
    return f"the model's columns are {', '.join(names[:SHOWN_COLUMNS])}{more}"


def _shown(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
