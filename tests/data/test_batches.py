"""kubetrain.data.batches: a split dealt as one batch when it fits the memory budget and
streamed from its shards when it does not; per-batch shares that add up exactly; a
stratified, deterministic sample in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from kubetrain.data import batches, shards
from kubetrain.data.datasets import Schema, save_split_npz

SCHEMA = Schema("table", ["a", "b", "c"], ["x", "y", "z"])


def table(counts=(500, 120, 30), seed=0):
    """Rows tagged by their index in column 0, classes in blocks shuffled together."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.concatenate([np.full(c, k) for k, c in enumerate(counts)]))
    X = rng.normal(size=(len(y), 3)).astype(np.float32)
    X[:, 0] = np.arange(len(y))
    return X, y.astype(np.int64)


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    """The table as 7 shards, streamed in batches of 50 rows."""
    X, y = table()
    shards.write(tmp_path / "split", X, y, SCHEMA, max_rows_per_shard=100)
    monkeypatch.setattr(batches, "BATCH_BYTES", 50 * 3 * 4)
    return str(tmp_path / "split"), X, y


def test_a_split_within_the_budget_is_one_batch_and_one_over_it_streams(sharded, tmp_path):
    path, X, y = sharded
    whole = batches.open_split(path, budget=10**9)
    assert not whole.streamed and whole.rows == 650 and whole.features == 3
    [(Xb, yb)] = list(whole)
    np.testing.assert_array_equal(Xb, X)
    np.testing.assert_array_equal(yb, y)
    split = batches.open_split(path, budget=1000)
    assert split.streamed and split.rows == 650 and split.class_counts.tolist() == [500, 120, 30]
    got = list(split)
    assert len(got) == 13 and all(len(b[1]) == 50 for b in got)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), X)
    # what the caller holds decides: 2x the split is over a budget the split alone fits
    assert batches.open_split(path, lambda s: 2 * s.nbytes, budget=whole.nbytes).streamed
    assert not batches.open_split(path, budget=whole.nbytes).streamed
    save_split_npz(tmp_path / "npz", X, y, SCHEMA)  # the old format cannot stream
    assert not batches.open_split(str(tmp_path / "npz"), budget=1).streamed


def test_a_streamed_pass_logs_about_once_a_shard(sharded, capsys):
    path, _, _ = sharded
    split = batches.open_split(path, budget=1000)
    assert sum(len(y) for _, y in batches.logged(split, "demo", "read")) == 650
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "| demo |" in ln]
    assert 6 <= len(lines) <= 8 and "read 650/650 rows" in lines[-1]
    whole = batches.open_split(path, budget=10**9)
    list(batches.logged(whole, "demo", "read"))
    assert capsys.readouterr().out == ""  # one batch in memory: nothing to report


def test_spread_shares_add_up_exactly_and_follow_the_batches():
    rng = np.random.default_rng(1)
    counts = np.array([1000, 37, 3, 0])
    totals = np.array([0, 963, 997, 0])  # up to the majority, as oversampling asks
    y = rng.permutation(np.repeat(np.arange(4), counts))
    before, shares = np.zeros(4, np.int64), []
    for part in np.array_split(y, 17):
        here = np.bincount(part, minlength=4)
        share = batches.spread(totals, counts, before, here)
        assert (share[here == 0] == 0).all()  # no rows of a class: none of its share
        before += here
        shares.append(share)
    assert np.sum(shares, axis=0).tolist() == totals.tolist()
    sample = np.array([500, 10, 3, 0])  # totals <= counts: never more than the batch has
    before = np.zeros(4, np.int64)
    for part in np.array_split(y, 17):
        here = np.bincount(part, minlength=4)
        assert (batches.spread(sample, counts, before, here) <= here).all()
        before += here


def test_stratified_sample_keeps_class_shares_and_is_deterministic(sharded):
    path, X, y = sharded
    split = batches.open_split(path, budget=1000)
    Xs, ys = batches.stratified_sample(split, 130, seed=4)
    assert np.bincount(ys).tolist() == [100, 24, 6]  # a fifth of each class
    tags = Xs[:, 0].astype(int)
    assert (np.diff(tags) > 0).all()  # distinct rows, in stored order
    np.testing.assert_array_equal(Xs, X[tags])
    np.testing.assert_array_equal(ys, y[tags])
    assert tags.min() < 100 and tags.max() > 550  # from along the whole split
    again = batches.stratified_sample(batches.open_split(path, budget=1000), 130, seed=4)
    np.testing.assert_array_equal(again[0], Xs)
    other = batches.stratified_sample(batches.open_split(path, budget=1000), 130, seed=5)
    assert not np.array_equal(other[0], Xs)
    tiny = batches.stratified_sample(batches.open_split(path, budget=1000), 5, seed=4)[1]
    assert set(tiny.tolist()) == {0, 1, 2}  # every class present, however small the sample


def test_head_reads_the_first_rows_of_a_split_of_either_format(sharded, tmp_path):
    path, X, y = sharded
    for rows in (1, 130, 10_000):  # within the first shard, across shards, past the end
        Xh, yh, schema = batches.head(path, rows)
        np.testing.assert_array_equal(Xh, X[:rows])
        np.testing.assert_array_equal(yh, y[:rows])
        assert schema == SCHEMA
    save_split_npz(tmp_path / "old", X, y, SCHEMA)
    Xh, yh, _ = batches.head(tmp_path / "old", 130)
    np.testing.assert_array_equal(Xh, X[:130])
    np.testing.assert_array_equal(yh, y[:130])
