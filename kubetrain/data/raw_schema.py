"""The raw-input schema a bundle carries (``schema.json``): what a served row must look like.

Why a file of its own: the model takes clean's encoded matrix, but a client sends the
table's raw columns. To turn one into the other exactly as the pipeline did, the server
needs each column's type as clean inferred it (how it is encoded) and the column's Arrow
type in the ingested table (how its values were read into pandas before encoding). Both
are fixed when the table is ingested and cleaned, so publish writes them once, beside
the fitted preprocessor (``preprocessor.json``), and the server reads them back.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kubetrain.core.errors import KubetrainError, require
from kubetrain.data.column_types import DROPPED_KINDS
from kubetrain.data.datasets import LABEL, PIXELS, table_arrow_schema, table_schema
from kubetrain.data.packed_json import pack, unpack

SCHEMA_FILE = "schema.json"
PREPROCESSOR_FILE = "preprocessor.json"
#: Bumped when ``schema.json`` changes shape; the server refuses a newer one. 2: per-pixel
#: columns packed (`kubetrain.data.packed_json`), and an image's without ``arrow_schema``.
FORMAT = 2


@dataclass(frozen=True)
class Column:
    """One raw feature column: its clean type (``numeric``, ``text``, ...), its Arrow
    type in the ingested table, and whether clean left it out of the model."""

    name: str
    kind: str
    arrow: pa.DataType
    dropped: bool
    how: str = ""  # datetime: how clean reads it (`kubetrain.data.column_types.ColumnType`)


@dataclass(frozen=True)
class InputSchema:
    """What the server checks raw inputs against and reads them with."""

    kind: str  # "table" or "image"
    columns: list[Column]  # every feature column of the table, in table order
    class_names: list[str]
    image_shape: list[int] | None  # (channels, height, width) for images
    #: "classification" (`class_names` are the outputs) or "regression" (one number)
    task: str = "classification"

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def kept(self) -> list[Column]:
        """The columns the preprocessor reads (dropped ones, IDs and constants, it does not)."""
        return [c for c in self.columns if not c.dropped]

    @property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "columns": [
                {
                    "name": c.name,
                    "type": c.kind,
                    "arrow": str(c.arrow),
                    "dropped": c.dropped,
                    **({"how": c.how} if c.how else {}),
                }
                for c in self.columns
            ],
            "class_names": self.class_names,
            "image_shape": self.image_shape,
            "task": self.task,
            # the exact Arrow types (the "arrow" strings above are for people); an image's
            # are all uint8, and its serialized schema was 10 MB at 224x224x3
            **({} if self.kind == "image" else {"arrow_schema": _arrow_text(self.columns)}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputSchema:
        require(
            int(data.get("format", 0)) <= FORMAT,
            f"{SCHEMA_FILE} has format {data.get('format')}, newer than this kubetrain "
            f"reads ({FORMAT}); upgrade kubetrain to serve this bundle",
        )
        if "arrow_schema" in data:
            arrow = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["arrow_schema"])))
            type_of = {name: arrow.field(name).type for name in arrow.names}
        else:  # an image: every column uint8
            type_of = {c["name"]: pa.type_for_alias(c["arrow"]) for c in data["columns"]}
        return cls(
            kind=data["kind"],
            columns=[
                Column(
                    c["name"],
                    c["type"],
                    type_of[c["name"]],
                    bool(c["dropped"]),
                    c.get("how", ""),
                )
                for c in data["columns"]
            ],
            class_names=list(data["class_names"]),
            image_shape=data.get("image_shape") or None,
            task=data.get("task", "classification"),
        )


def input_schema(table_path: str, params: dict[str, Any]) -> InputSchema:
    """The schema of the ingested table at ``table_path`` as clean typed it (``params``:
    the fitted `Preprocessor.params`; params without ``types`` predate column types,
    when numeric columns were numbers and every other column a category)."""
    arrow = table_arrow_schema(table_path)
    schema = table_schema(table_path)
    kinds = params.get("types") or {
        **dict.fromkeys(params.get("categorical", {}), "categorical"),
        **dict.fromkeys(params.get("numeric", []), "numeric"),
    }
    dates = params.get("datetime", {})
    if PIXELS in arrow.names:  # an image table: every value of the pixels column is one
        pixel = [Column(name, "numeric", pa.uint8(), False) for name in schema.feature_names]
        return InputSchema("image", pixel, list(schema.class_names), schema.image_shape)
    columns = []
    for f in arrow:
        if f.name == LABEL:
            continue
        kind = kinds.get(f.name, "dropped")
        how = dates.get(f.name, {}).get("how", "")
        columns.append(Column(f.name, kind, f.type, kind in DROPPED_KINDS, how))
    return InputSchema(
        schema.kind, columns, list(schema.class_names), schema.image_shape, schema.task
    )


def write(out: Path, table_path: str, params: dict[str, Any]) -> None:
    """Write ``schema.json`` and ``preprocessor.json`` into the bundle folder ``out``."""
    (out / SCHEMA_FILE).write_text(
        json.dumps(pack(input_schema(table_path, params).to_json()), indent=1)
    )
    (out / PREPROCESSOR_FILE).write_text(json.dumps(pack(params), indent=1))


def read(root: Path) -> tuple[InputSchema, dict[str, Any]]:
    """(input schema, preprocessor params) of the bundle at ``root``."""
    missing = [f for f in (SCHEMA_FILE, PREPROCESSOR_FILE) if not (root / f).is_file()]
    if missing:
        raise KubetrainError(
            f"{root} has no {' or '.join(missing)}: it was published before bundles served "
            "raw rows; publish the model again with this kubetrain"
        )
    data = unpack(json.loads((root / SCHEMA_FILE).read_text()))
    return InputSchema.from_json(data), unpack(json.loads((root / PREPROCESSOR_FILE).read_text()))


def _arrow_text(columns: list[Column]) -> str:
    """The columns' exact Arrow types, serialized as base64 text for JSON."""
    arrow = pa.schema([pa.field(c.name, c.arrow) for c in columns])
    return base64.b64encode(arrow.serialize().to_pybytes()).decode()


__all__ = ["Column", "InputSchema", "input_schema", "read", "write"]
