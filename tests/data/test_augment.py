"""kubetrain.data.augment: table oversampling and jitter that leaves one-hot columns
alone; images pass through with their per-batch policy recorded."""

from __future__ import annotations

import numpy as np
import pytest

from kubetrain.config.settings import RunConfig
from kubetrain.data import augment as augment_mod
from kubetrain.data import batches, shards
from kubetrain.data.augment import augment, augment_arrays
from kubetrain.data.clean import clean
from kubetrain.data.datasets import Schema, load_split, save_split
from kubetrain.data.ingest import ingest


def cfg_with(**changes) -> RunConfig:
    """Oversampling on unless a test says otherwise: most tests here are about it."""
    return RunConfig.from_flat({"oversample": True, **changes})


def of(cfg: RunConfig) -> tuple:
    """What augment reads: its section and the seed."""
    return cfg.augment, cfg.seed


@pytest.fixture(scope="module")
def digits_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    ingest("digits", "", str(root / "table"))
    clean(
        str(root / "table"),
        str(root / "train"),
        str(root / "val"),
        str(root / "test"),
        RunConfig().clean,
        RunConfig().seed,
    )
    X, y, schema = load_split(root / "train")
    return X[:300], y[:300], schema


def image_schema(h: int, w: int) -> Schema:
    return Schema(
        kind="image",
        feature_names=[f"pixel_{i}" for i in range(h * w)],
        class_names=["a", "b"],
        image_shape=[1, h, w],
    )


def asymmetric_images(n: int = 40) -> np.ndarray:
    """An 'L' shape (not symmetric left-right or up-down), scaled differently per row."""
    img = np.zeros((6, 7), np.float32)
    img[1:5, 1] = 1.0
    img[4, 1:4] = 1.0
    img[1, 5] = 0.5
    return (img[None] * np.linspace(1.0, 2.0, n)[:, None, None]).reshape(n, -1)


# --- images --------------------------------------------------------------------------


def test_images_pass_through_with_the_policy_recorded(tmp_path, digits_train):
    X, y, schema = digits_train
    save_split(tmp_path / "train", X[:50], y[:50], schema)
    policy = {"crop_min_area": 0.8, "flip_horizontal": False}
    meta = augment(
        str(tmp_path / "train"), str(tmp_path / "out"), cfg_with(augment_copies=2).augment, 42,
        policy=policy,
    )  # fmt: skip
    assert meta["kind"] == "image" and meta["rows_before"] == meta["rows_after"] == 50
    assert meta["copies"] == 0 and meta["policy"] == policy
    assert meta["class_counts_after"] == meta["class_counts_before"]
    X_out, y_out, schema_out = load_split(tmp_path / "out")
    np.testing.assert_array_equal(X_out, X[:50])  # no copies, nothing changed
    np.testing.assert_array_equal(y_out, y[:50])
    assert schema_out.image_shape == [1, 8, 8]
    assert schema_out.extra[augment_mod.POLICY_KEY] == policy
    # augmentation off: no policy, and a policy from an earlier run does not survive
    augment(str(tmp_path / "out"), str(tmp_path / "off"), cfg_with().augment, 42, policy=None)
    assert augment_mod.POLICY_KEY not in load_split(tmp_path / "off")[2].extra


def test_streamed_images_pass_through(tmp_path, monkeypatch):
    X = asymmetric_images(90).astype(np.float32)
    y = np.arange(len(X)) % 2
    shards.write(tmp_path / "train", X, y, image_schema(6, 7), max_rows_per_shard=20)
    monkeypatch.setattr(batches, "BATCH_BYTES", 25 * 42 * 4)
    cfg = cfg_with()
    meta = augment(str(tmp_path / "train"), str(tmp_path / "out"), cfg.augment, 1, 1000, {"a": 1})
    X_out, y_out, schema = load_split(tmp_path / "out")
    assert meta["rows_after"] == 90 and meta["class_counts_after"] == {"a": 45, "b": 45}
    np.testing.assert_array_equal(X_out, X)
    assert schema.extra[augment_mod.POLICY_KEY] == {"a": 1}


# --- tables --------------------------------------------------------------------------


def table_split(counts=(12, 5, 3)):
    """Continuous columns 0-1 (column 0 spaced 5 apart, an identity even after jitter),
    one-hot columns 2-3 (as clean writes them: scaled)."""
    rng = np.random.default_rng(5)
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    n = len(y)
    onehot = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)] * 3.0 - 1.0
    continuous = np.stack([np.arange(n) * 5.0, rng.normal(size=n)], axis=1)
    X = np.concatenate([continuous.astype(np.float32), onehot], axis=1)
    schema = Schema(
        kind="table",
        feature_names=["x0", "x1", "c=p", "c=q"],
        class_names=["big", "mid", "small"],
        extra={"categorical_columns": [2, 3]},
    )
    return X, y, schema


def test_oversampling_balances_classes():
    X, y, schema = table_split()
    X_aug, y_aug = augment_arrays(X, y, schema, *of(cfg_with(augment_copies=0, oversample=True)))
    assert np.bincount(y_aug).tolist() == [12, 12, 12]
    np.testing.assert_array_equal(X_aug[: len(X)], X)
    np.testing.assert_array_equal(y_aug[: len(y)], y)


@pytest.mark.parametrize("copies", [1, 3])
def test_copies_keep_the_balance(copies):
    X, y, schema = table_split()
    X_aug, y_aug = augment_arrays(X, y, schema, *of(cfg_with(augment_copies=copies)))
    assert np.bincount(y_aug).tolist() == [12 * (1 + copies)] * 3


def test_jitter_leaves_one_hot_columns_alone():
    X, y, schema = table_split()
    X_aug, y_aug = augment_arrays(X, y, schema, *of(cfg_with(augment_copies=2, noise_std=0.3)))
    extra = X_aug[len(X) :]
    assert set(np.unique(extra[:, 2:])) <= set(np.unique(X[:, 2:]))  # still -1/2 exactly
    assert (extra[:, 2:].sum(1) == 1.0).all()  # one 'hot' (2) and one 'cold' (-1) each
    # each jittered row is a source row moved on the continuous columns only
    for row, label in zip(extra, y_aug[len(X) :], strict=False):
        same_class = X[y == label]
        nearest = same_class[np.abs(same_class[:, :2] - row[:2]).sum(1).argmin()]
        np.testing.assert_array_equal(row[2:], nearest[2:])
    last = X_aug[-36:-16]  # the last copy of the 36 balanced rows starts with the originals
    assert 0.2 < (last[:, :2] - X[:, :2]).std() < 0.4
    np.testing.assert_array_equal(last[:, 2:], X[:, 2:])


def test_no_copies_no_oversampling_is_identity():
    X, y, schema = table_split()
    X_aug, y_aug = augment_arrays(X, y, schema, *of(cfg_with(augment_copies=0, oversample=False)))
    np.testing.assert_array_equal(X_aug, X)
    np.testing.assert_array_equal(y_aug, y)


def test_table_augmentation_deterministic():
    X, y, schema = table_split()
    first = augment_arrays(X, y, schema, *of(cfg_with(seed=1)))
    again = augment_arrays(X, y, schema, *of(cfg_with(seed=1)))
    other = augment_arrays(X, y, schema, *of(cfg_with(seed=2)))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


# --- the stage -----------------------------------------------------------------------


def test_augment_stage_metadata(tmp_path):
    X, y, schema = table_split()
    save_split(tmp_path / "train", X, y, schema)
    meta = augment(
        str(tmp_path / "train"),
        str(tmp_path / "out"),
        cfg_with(augment_copies=1, oversample=True).augment,
        42,
    )
    assert meta["stage"] == "augment" and meta["kind"] == "table" and meta["copies"] == 1
    assert meta["rows_before"] == 20 and meta["rows_after"] == 72
    assert meta["class_counts_before"] == {"big": 12, "mid": 5, "small": 3}
    assert meta["class_counts_after"] == {"big": 24, "mid": 24, "small": 24}
    X_out, y_out, schema_out = load_split(tmp_path / "out")
    assert len(X_out) == len(y_out) == 72
    assert schema_out == schema
    np.testing.assert_array_equal(X_out[:20], X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train"]  # no temp dirs


# --- streamed: a training split over the memory budget -----------------------------------


def sharded_table(tmp_path, monkeypatch, counts=(300, 70, 12)):
    """An imbalanced table as shards of 50 rows, streamed in batches of 40; the first
    column tags each row (rows are recognisable after augmenting)."""
    rng = np.random.default_rng(8)
    y = rng.permutation(np.concatenate([np.full(c, k) for k, c in enumerate(counts)]))
    X = np.concatenate(
        [np.arange(len(y))[:, None] * 5.0, rng.normal(size=(len(y), 1)), np.eye(2)[y % 2]],
        axis=1,
    ).astype(np.float32)
    _, _, schema = table_split()
    shards.write(tmp_path / "train", X, y, schema, max_rows_per_shard=50)
    monkeypatch.setattr(batches, "BATCH_BYTES", 40 * X.shape[1] * 4)
    return str(tmp_path / "train"), X, y.astype(np.int64), schema


def run_augment(tmp_path, train, name, budget, **changes):
    cfg = cfg_with(**changes)
    meta = augment(train, str(tmp_path / name), cfg.augment, cfg.seed, budget=budget)
    X, y, _ = load_split(tmp_path / name)
    return meta, X, y


def rows_of(X: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in X]


@pytest.mark.parametrize("changes", [{}, {"augment_copies": 2}, {"oversample": False}])
def test_streamed_augment_writes_the_in_memory_counts(tmp_path, monkeypatch, capsys, changes):
    train, X, y, schema = sharded_table(tmp_path, monkeypatch)
    whole, _, y_whole = run_augment(tmp_path, train, "whole", 10**9, **changes)
    assert "streaming" not in capsys.readouterr().out
    meta, X_out, y_out = run_augment(tmp_path, train, "streamed", 1000, **changes)
    out = capsys.readouterr().out
    assert "streaming: the training split (382 rows" in out
    assert "augmented 382/382 rows" in out  # progress lines of the streamed pass
    assert meta["class_counts_after"] == whole["class_counts_after"]
    assert meta["class_counts_before"] == whole["class_counts_before"]
    assert meta["rows_after"] == whole["rows_after"] == len(y_out)
    assert np.bincount(y_out).tolist() == np.bincount(y_whole).tolist()
    expected = augment_mod.counts_after(np.bincount(y), schema, cfg_with(**changes).augment)
    assert np.bincount(y_out).tolist() == expected.tolist()
    # every original row is there, exactly once and unchanged (jittered rows all moved)
    originals = set(rows_of(X))
    assert sum(r in originals for r in rows_of(X_out)) == len(X)
    assert set(rows_of(X_out)) >= originals


def test_streamed_augment_draws_extra_rows_from_the_whole_split(tmp_path, monkeypatch):
    train, X, y, _ = sharded_table(tmp_path, monkeypatch)
    _, X_out, y_out = run_augment(tmp_path, train, "out", 1000, augment_copies=0)
    added = np.array([r not in set(rows_of(X)) for r in rows_of(X_out)])
    # classes of 300, 70 and 12 rows: each grows toward 300, at most 4x its rows
    assert added.sum() == len(y_out) - len(y) == (280 - 70) + (48 - 12)
    source = np.rint(X_out[added, 0] / 5).astype(int)  # column 0 is 5x the source row
    assert (y[source] == y_out[added]).all()  # drawn from the row's own class
    rare = source[y_out[added] == 2]
    assert set(rare) <= set(np.flatnonzero(y == 2)) and len(set(rare)) >= 8  # 36 of 12 rows
    mid = source[y_out[added] == 1]
    assert mid.min() < 50 and mid.max() > 330  # from every part of the split


def test_streamed_augment_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    train, *_ = sharded_table(tmp_path, monkeypatch)
    first = run_augment(tmp_path, train, "a", 1000, seed=3)
    again = run_augment(tmp_path, train, "b", 1000, seed=3)
    other = run_augment(tmp_path, train, "c", 1000, seed=4)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[2], again[2])
    assert not np.array_equal(first[1], other[1])


def test_one_batch_is_the_in_memory_augmentation(tmp_path):
    """The in-memory path is the streamed path with one batch: the same rows."""
    X, y, schema = table_split()
    cfg = cfg_with(augment_copies=2, noise_std=0.3)
    X_aug, y_aug = augment_arrays(X, y, schema, cfg.augment, cfg.seed)
    pieces = list(
        augment_mod.augment_batches(
            [(X, y)], np.bincount(y), schema, cfg.augment, cfg.seed, chunk_rows=5
        )
    )
    np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), X_aug)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), y_aug)
    assert max(len(p[1]) for p in pieces) == 20  # the originals; augmented rows in fives


def test_auto_copies_add_one_copy_to_small_splits_and_none_to_big_ones(tmp_path, monkeypatch):
    from kubetrain.data import augment as augment_module

    train, X, y, _ = sharded_table(tmp_path, monkeypatch)
    meta, _, y_small = run_augment(tmp_path, train, "small", 10**9, oversample=False)
    assert meta["copies"] == 1 and len(y_small) == 2 * len(y)
    monkeypatch.setattr(augment_module, "AUTO_COPIES_MAX_ROWS", len(y) - 1)
    meta, _, y_big = run_augment(tmp_path, train, "big", 10**9, oversample=False)
    assert meta["copies"] == 0 and len(y_big) == len(y)
    meta, _, y_set = run_augment(tmp_path, train, "set", 10**9, oversample=False, augment_copies=2)
    assert meta["copies"] == 2 and len(y_set) == 3 * len(y)  # a value set is honoured
