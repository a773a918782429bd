"""kubetrain.data.packed_json: per-pixel runs written as a count and read back as they were;
everything else written as it is."""

from __future__ import annotations

import json

import pytest

from kubetrain.data.packed_json import MARK, MIN_RUN, pack, pixel_names, unpack

pytestmark = pytest.mark.unit

N = 3 * 32 * 32


def image_metadata(n: int = N) -> dict:
    names = pixel_names(n)
    return {
        "schema": {"kind": "image", "feature_names": names, "image_shape": [3, 32, 32]},
        "preprocessing": {
            "types": dict.fromkeys(names, "numeric"),
            "numeric": names,
            "fill": {name: i / 7 for i, name in enumerate(names)},
            "scale": {"kind": "standard", "offset": [120.5], "scale": [60.25]},
        },
        "columns": [{"name": name, "type": "numeric", "dropped": False} for name in names],
    }


def round_trip(value):
    return unpack(json.loads(json.dumps(pack(value))))


def test_an_image_schema_round_trips_and_its_runs_are_written_as_counts():
    meta = image_metadata()
    text = json.dumps(pack(meta))
    assert round_trip(meta) == meta
    packed = json.loads(text)
    assert packed["schema"]["feature_names"] == {MARK: N}
    assert packed["preprocessing"]["types"] == {MARK: N, "each": "numeric"}
    assert packed["columns"] == {MARK: N, "record": {"type": "numeric", "dropped": False}}
    assert packed["preprocessing"]["fill"] == {MARK: N, "values": [i / 7 for i in range(N)]}
    assert len(text) < len(json.dumps(meta)) / 3  # what is left is the fill values


def test_pack_leaves_its_argument_as_it_was():
    meta = image_metadata()
    before = json.dumps(meta)
    pack(meta)
    assert json.dumps(meta) == before


@pytest.mark.parametrize(
    "value",
    [
        # a table's columns, digits' row/column names, a short run, a run out of order
        {"feature_names": ["age", "income"], "types": {"age": "numeric"}},
        {"feature_names": [f"pixel_{r}_{c}" for r in range(64) for c in range(64)]},
        {"feature_names": pixel_names(MIN_RUN - 1)},
        {"feature_names": pixel_names(MIN_RUN)[::-1]},
        {"feature_names": [*pixel_names(MIN_RUN)[:-1], "pixel_x"]},
        # records that differ in more than the name stay records
        {
            "columns": [
                {"name": n, "type": "numeric" if i else "boolean"}
                for i, n in enumerate(pixel_names(MIN_RUN))
            ]
        },
        # a table whose columns happen to be named like the mark
        {"types": {MARK: "numeric", "each": "boolean", "b": "numeric"}, "fill": {MARK: 3.0}},
    ],
)
def test_anything_but_an_exact_pixel_run_is_written_as_it_is(value):
    assert pack(value) == value
    assert round_trip(value) == value


def test_equal_container_values_are_not_shared_after_unpacking():
    names = pixel_names(MIN_RUN)
    back = round_trip({name: {"how": "year"} for name in names})
    back["pixel_0"]["how"] = "changed"
    assert back["pixel_1"] == {"how": "year"}


def test_an_image_input_schema_is_written_small_and_read_back_as_it_was(tmp_path):
    """A bundle's schema.json for 32x32 RGB: no per-pixel Arrow schema, columns packed."""
    import pyarrow as pa

    from kubetrain.data.raw_schema import Column, InputSchema

    columns = [Column(name, "numeric", pa.uint8(), False) for name in pixel_names(N)]
    image = InputSchema("image", columns, ["a", "b"], [3, 32, 32])
    text = json.dumps(pack(image.to_json()))
    assert len(text) < 1_000 and "arrow_schema" not in text
    assert InputSchema.from_json(unpack(json.loads(text))) == image
    # a table keeps its exact Arrow types
    table = InputSchema("table", [Column("when", "datetime", pa.timestamp("ms"), False)], [], None)
    back = InputSchema.from_json(unpack(json.loads(json.dumps(pack(table.to_json())))))
    assert back == table and back.columns[0].arrow == pa.timestamp("ms")
