"""`make bench-scale`'s table generator and reference clean, at 2,000 rows.

The benchmark's numbers are only as honest as its inputs: the table must have the
shape, missing values, duplicates and categories the issue describes, and the pandas +
scikit-learn yardstick must really produce the three splits. No timing is asserted
here; the benchmark itself measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.local import bench_scale
from kubetrain.local.bench_scale import (
    CATEGORIES,
    CLASSES,
    LABEL,
    MISSING,
    NUMERIC,
    generate_table,
    reference_clean,
)

ROWS = 2_000


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2,000-row table written in three chunks (the chunked path the 10M file takes)."""
    path = tmp_path_factory.mktemp("bench") / "table.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_scale, "CHUNK_ROWS", 700)
        meta = generate_table(path, ROWS, seed=7)
    return path, meta


def test_table_shape_and_columns(table: tuple[Path, dict]) -> None:
    path, meta = table
    frame = pd.read_parquet(path)
    assert frame.shape == (ROWS, 30)
    assert meta["rows"] == ROWS and meta["columns"] == 30
    assert list(frame.columns) == [*NUMERIC, *CATEGORIES, LABEL]
    assert all(pd.api.types.is_float_dtype(frame[c]) for c in NUMERIC)
    assert sorted(frame[LABEL].unique()) == list(range(CLASSES))
    assert frame[LABEL].value_counts().min() > ROWS * 0.1  # every class well represented


def test_table_missing_values(table: tuple[Path, dict]) -> None:
    frame = pd.read_parquet(table[0])
    for column, share in MISSING.items():
        assert abs(frame[column].isna().mean() - share) < 0.03, column
    assert frame.drop(columns=list(MISSING)).notna().all().all()  # only where planned


def test_table_duplicates(table: tuple[Path, dict]) -> None:
    path, meta = table
    frame = pd.read_parquet(path)
    assert int(frame.duplicated().sum()) == meta["duplicate_rows"] == 20  # 7 + 7 + 6


def test_table_categoricals(table: tuple[Path, dict]) -> None:
    frame = pd.read_parquet(table[0])
    for column, values in CATEGORIES.items():
        assert not pd.api.types.is_numeric_dtype(frame[column])
        assert set(frame[column].dropna()) == set(values), column


def test_table_is_reproducible(table: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_scale, "CHUNK_ROWS", 700)
        generate_table(tmp_path / "again.parquet", ROWS, seed=7)
    pd.testing.assert_frame_equal(
        pd.read_parquet(table[0]), pd.read_parquet(tmp_path / "again.parquet")
    )


def test_reference_clean_writes_three_splits(table: tuple[Path, dict], tmp_path: Path) -> None:
    path, meta = table
    result = reference_clean(path, tmp_path)
    assert result["rows_in"] == ROWS
    assert result["duplicates_removed"] == meta["duplicate_rows"]
    splits = result["splits"]
    assert set(splits) == {"train", "validation", "test"}
    assert sum(s["rows"] for s in splits.values()) == ROWS - meta["duplicate_rows"]
    one_hot = sum(len(v) for v in CATEGORIES.values())
    for name, split in splits.items():
        with np.load(tmp_path / f"{name}.npz") as arrays:
            X, y = arrays["X"], arrays["y"]
        assert X.shape == (split["rows"], len(NUMERIC) + one_hot) and X.dtype == np.float32
        assert len(y) == split["rows"] and set(np.unique(y)) == set(range(CLASSES))
        assert np.isfinite(X).all()  # imputed
    with np.load(tmp_path / "train.npz") as arrays:
        X = arrays["X"]
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-4)  # scaled on train
    assert splits["test"]["rows"] == pytest.approx(0.2 * (ROWS - 20), abs=2)
