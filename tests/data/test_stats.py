"""Statistics that merge exactly: any batching gives what the whole column gives."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from kubetrain.data.stats import Frequencies, Moments, QuantileSample, route, row_hashes

RNG = np.random.default_rng(7)


def batches(n: int, sizes: list[int]) -> list[slice]:
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == n
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@pytest.mark.parametrize("sizes", [[1000], [1, 999], [300, 300, 400], [10] * 100])
def test_moments_merge_to_the_whole_column(sizes):
    x = RNG.normal(5, 3, 1000)
    x[RNG.random(1000) < 0.05] = np.nan
    merged = functools.reduce(Moments.merge, (Moments.of(x[s]) for s in batches(1000, sizes)))
    present = x[~np.isnan(x)]
    assert merged.count == present.size
    assert merged.mean == pytest.approx(present.mean(), abs=1e-12)
    assert merged.std == pytest.approx(present.std(), abs=1e-12)
    assert (merged.min, merged.max) == (present.min(), present.max())


def test_quantiles_are_exact_up_to_k_rows_whatever_the_batching():
    x = RNG.normal(size=5000)
    keys = row_hashes(pd.DataFrame({"x": x}))
    parts = [QuantileSample.of(x[s], keys[s], k=10_000) for s in batches(5000, [1234, 3766])]
    merged = functools.reduce(QuantileSample.merge, parts)
    for q in (0.25, 0.5, 0.75):
        assert merged.quantile(q) == pytest.approx(np.quantile(x, q), abs=1e-12)


def test_beyond_k_the_sample_is_the_same_in_any_order_and_close():
    x = RNG.exponential(size=20_000)
    keys = row_hashes(pd.DataFrame({"x": x, "i": np.arange(x.size)}))
    one = functools.reduce(
        QuantileSample.merge,
        (QuantileSample.of(x[s], keys[s], k=2000) for s in batches(20_000, [5000] * 4)),
    )
    perm = RNG.permutation(x.size)
    other = functools.reduce(
        QuantileSample.merge,
        (
            QuantileSample.of(x[perm][s], keys[perm][s], k=2000)
            for s in batches(20_000, [7000, 13_000])
        ),
    )
    one, other = one.trimmed(), other.trimmed()  # merges hold extra candidates until read
    assert len(one.values) == 2000
    assert np.array_equal(np.sort(one.values), np.sort(other.values))
    # the bottom-k of the keys, whichever merges trimmed along the way
    assert np.array_equal(np.sort(one.keys), np.sort(keys)[:2000])
    assert one.count == other.count == 20_000
    assert one.quantile(0.5) == pytest.approx(np.median(x), rel=0.08)


def test_frequencies_merge_exactly_in_any_order_and_flag_high_cardinality():
    values = pd.Series(RNG.choice([f"v{i}" for i in range(50)], size=3000))
    parts = [Frequencies.of(values[s], cap=60) for s in batches(3000, [1000, 1000, 1000])]
    a = functools.reduce(Frequencies.merge, parts)
    b = functools.reduce(Frequencies.merge, reversed(parts))
    assert a.counts == b.counts == Counter(values.value_counts().to_dict())
    assert a.mode() == values.value_counts().sort_index().idxmax()
    small = [Frequencies.of(values[s], cap=40) for s in batches(3000, [1000, 2000])]
    assert functools.reduce(Frequencies.merge, small).over_cap  # 50 distinct > 40
    assert functools.reduce(Frequencies.merge, reversed(small)).over_cap


def test_routing_is_stratified_exact_and_independent_of_row_order():
    frame = pd.DataFrame({"x": RNG.normal(size=2000), "y": RNG.integers(0, 3, 2000)})
    hashes, labels = row_hashes(frame), frame["y"].to_numpy()
    split = route(hashes, labels, 0.2, 0.15, seed=42)
    for cls in range(3):
        n = int((labels == cls).sum())
        got = split[labels == cls]
        assert (got == 2).sum() == round(0.2 * n) and (got == 1).sum() == round(0.15 * n)
    perm = RNG.permutation(len(frame))
    assert np.array_equal(route(hashes[perm], labels[perm], 0.2, 0.15, seed=42), split[perm])
    assert not np.array_equal(route(hashes, labels, 0.2, 0.15, seed=43), split)
