"""Per-pixel metadata written as a count instead of one entry per pixel.

An image table has a feature per pixel value (``pixel_0`` .. ``pixel_150527`` at
224x224x3), and the schema, the preprocessor's params, the validation schema and the
model's info each list them: measured on 150 images at 224x224, every split's manifest
was 12-22 MB of JSON (the test split's data 4.5 MB), the model's info 15 MB, and each
stage spent seconds writing and parsing them. In memory nothing changes; on disk
`pack` writes such a run as ``{"$pixels": n, ...}`` and `unpack` expands it, so the
files that carry them (shard manifests, the table's meta.json, info.json,
validation.json, a bundle's schema.json and preprocessor.json) go through these two.

Only runs of at least `MIN_RUN` entries named exactly ``pixel_0 .. pixel_{n-1}`` in
order are packed: a table's own columns, digits' ``pixel_r_c`` and anything out of order
are written as they are.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

MARK = "$pixels"
MIN_RUN = 1024


def pixel_names(n: int) -> list[str]:
    """The feature names ingest gives an image's ``n`` values, row-major."""
    return list(_names(n))


@functools.lru_cache(maxsize=4)
def _names(n: int) -> tuple[str, ...]:
    """Built once per size: formatting 150,528 names took 25 ms, and a stage unpacks
    each of a run's manifests, some several times."""
    return tuple(f"pixel_{i}" for i in range(n))


def _is_run(names: list[Any]) -> bool:
    return (
        len(names) >= MIN_RUN
        and names[0] == "pixel_0"
        and names[-1] == f"pixel_{len(names) - 1}"
        and names == pixel_names(len(names))
    )


def pack(value: Any) -> Any:
    """``value`` with its pixel runs packed (a new object; ``value`` is not changed)."""
    if isinstance(value, dict):
        keys = list(value)
        if _is_run(keys):
            values = list(value.values())
            if all(v == values[0] for v in values):
                return {MARK: len(keys), "each": pack(values[0])}
            return {MARK: len(keys), "values": values}
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and isinstance(value[0], str) and _is_run(value):
            return {MARK: len(value)}
        if len(value) >= MIN_RUN and isinstance(value[0], dict) and "name" in value[0]:
            return _pack_records(value)
        return [pack(v) for v in value]
    return value


def _pack_records(records: list[Any]) -> Any:
    """A list of ``{"name": pixel_i, ...}`` records that are equal but for the name (a
    schema's columns) as ``{"$pixels": n, "record": {...}}``."""
    if not all(isinstance(r, dict) for r in records) or not _is_run(
        [r.get("name") for r in records]
    ):
        return [pack(r) for r in records]
    rest = [{k: v for k, v in r.items() if k != "name"} for r in records]
    if any(r != rest[0] for r in rest):
        return [pack(r) for r in records]
    return {MARK: len(records), "record": rest[0]}


def _packed(value: dict[str, Any]) -> bool:
    """Whether a dict is `pack`'s: the mark with an int count and at most one more key (a
    table column named like the mark is a dict of more keys or of another value)."""
    return (
        type(value.get(MARK)) is int
        and len(value) <= 2
        and set(value) <= {MARK, "each", "values", "record"}
    )


def unpack(value: Any) -> Any:
    """The inverse of `pack`: pixel runs expanded to their entries (in place where it can)."""
    if isinstance(value, dict):
        if _packed(value):
            names = pixel_names(value[MARK])
            if "each" in value:
                each = unpack(value["each"])
                if isinstance(each, dict | list):
                    return {name: copy.deepcopy(each) for name in names}
                return dict.fromkeys(names, each)
            if "values" in value:
                return dict(zip(names, value["values"], strict=True))
            if "record" in value:
                return [{"name": name, **value["record"]} for name in names]
            return names
        for k, v in value.items():
            value[k] = unpack(v)
        return value
    if isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, dict | list):
                value[i] = unpack(v)
    return value
