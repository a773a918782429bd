"""Column statistics that merge exactly across batches and workers.

A table larger than memory is cleaned in two passes: pass one folds every
record batch into these summaries (on one machine batch by batch, on Spark one
per partition, then merged), pass two applies what they fitted. Merging is
exact and order-independent, so any batching, any partitioning and any engine
fit the same preprocessor:

* `Moments`: count, mean, M2 (Chan et al.'s parallel variance), min, max.
* `QuantileSample`: a bottom-k sample keyed by each row's content hash. Up to
  `k` rows it holds every value (quantiles are exact); beyond, it is a uniform
  sample chosen by hash, so the same rows are kept whichever way the data was
  split. Median and IQR come from it.
* `Frequencies`: exact value counts, or only "more than `cap` distinct values"
  (a high-cardinality column is flagged, not held).
* `row_hashes`: 64-bit content hashes of rows, for deduplication and for the
  deterministic train/validation/test routing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: Values kept by a `QuantileSample`: exact below this many rows, about 0.3% rank error above.
SAMPLE_SIZE = 100_000
#: A merged `QuantileSample` is trimmed back to k once it holds more than this many times k.
SLACK = 3


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max of the non-missing values."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return cls()
        mean = float(v.mean())
        return cls(
            int(v.size), mean, float(((v - mean) ** 2).sum()), float(v.min()), float(v.max())
        )

    def merge(self, other: Moments) -> Moments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        return Moments(
            n,
            self.mean + delta * other.count / n,
            self.m2 + other.m2 + delta * delta * self.count * other.count / n,
            min(self.min, other.min),
            max(self.max, other.max),
        )

    @property
    def std(self) -> float:
        """Population standard deviation (what the in-memory scaler used: numpy's default)."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0

    def summary(self) -> dict[str, float]:
        """count, mean, std, min and max, for reports."""
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
        }


@dataclass
class QuantileSample:
    """The `k` values with the smallest row-hash keys: mergeable, deterministic."""

    k: int = SAMPLE_SIZE
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    values: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    count: int = 0  # non-missing values seen, kept or not

    @classmethod
    def of(cls, values: np.ndarray, keys: np.ndarray, k: int = SAMPLE_SIZE) -> QuantileSample:
        v = np.asarray(values, dtype=np.float64)
        present = ~np.isnan(v)
        return cls(k, np.asarray(keys, np.uint64)[present], v[present], int(present.sum()))._trim()

    def merge(self, other: QuantileSample) -> QuantileSample:
        """The union's bottom-k. It may hold up to `SLACK` x k candidates until read
        (`quantile`, `trimmed`): trimming takes a partition of every held key, and a
        fold that trimmed after each batch spent most of its time there."""
        k = min(self.k, other.k)
        mine, theirs = self._below(other._cut(k)), other._below(self._cut(k))
        merged = QuantileSample(
            k,
            np.concatenate([mine.keys, theirs.keys]),
            np.concatenate([mine.values, theirs.values]),
            self.count + other.count,
        )
        return merged._trim() if len(merged.keys) > SLACK * k else merged

    def trimmed(self) -> QuantileSample:
        """Exactly the ``k`` values with the smallest keys (ties broken by value)."""
        return self._trim()

    def _cut(self, k: int) -> np.uint64 | None:
        """The largest key that can survive a merge: a side already holding ``k`` values
        keeps nothing above its own largest key (nor above its k-th smallest, but the
        largest costs no partition), so the other side's larger keys are dropped before
        the merge (a streamed fold then copies a few values, not ``k``)."""
        return self.keys.max() if len(self.keys) >= k else None

    def _below(self, cut: np.uint64 | None) -> QuantileSample:
        """This sample without keys above ``cut`` (ties at ``cut`` stay: value decides)."""
        if cut is None:
            return self
        keep = self.keys <= cut
        return QuantileSample(self.k, self.keys[keep], self.values[keep], self.count)

    def _trim(self) -> QuantileSample:
        if len(self.keys) > self.k:
            # the k smallest keys in linear time; only a tie at the k-th key needs a sort,
            # where ties are broken by value, so the kept set never depends on order
            kth = np.partition(self.keys, self.k - 1)[self.k - 1]
            keys, values = self.keys[self.keys <= kth], self.values[self.keys <= kth]
            if len(keys) > self.k:
                keep = np.lexsort((values, keys))[: self.k]
                keys, values = keys[keep], values[keep]
            self.keys, self.values = keys, values
        return self

    def quantile(self, q: float) -> float:
        values = self._trim().values
        if values.size == 0:
            return float("nan")
        return float(np.quantile(values, q))


@dataclass
class Frequencies:
    """Exact value counts of a categorical column, or only the fact that it has over `cap`.

    Past `cap` distinct values the counts are dropped: such a column is not
    one-hot material, and a truncated tail would make merges order-dependent.
    Both outcomes are exact: a union of partial counts exceeds `cap` exactly
    when the whole column does.
    """

    cap: int = 10_000
    counts: Counter = field(default_factory=Counter)
    over_cap: bool = False

    @classmethod
    def of(cls, values: pd.Series, cap: int = 10_000) -> Frequencies:
        counts = Counter(values.dropna().astype(str).value_counts().to_dict())
        return cls(cap, counts)._check()

    def merge(self, other: Frequencies) -> Frequencies:
        if self.over_cap or other.over_cap:
            return Frequencies(min(self.cap, other.cap), Counter(), True)
        return Frequencies(min(self.cap, other.cap), self.counts + other.counts)._check()

    def _check(self) -> Frequencies:
        if len(self.counts) > self.cap:
            self.counts, self.over_cap = Counter(), True
        return self

    def mode(self) -> str:
        """The most frequent value (ties: the smallest), as the in-memory imputer picks it."""
        return min(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if self.counts else ""


def row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's content (column order included, index ignored)."""
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)


def unit_interval(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Each row hash mixed with the seed and mapped to [0, 1): a reproducible draw per row."""
    with np.errstate(over="ignore"):
        mixed = hashes.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
        mixed = (mixed ^ (mixed >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        mixed = (mixed ^ (mixed >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
        mixed ^= mixed >> np.uint64(33)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(2**53)


def route(
    hashes: np.ndarray, labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> np.ndarray:
    """0 = train, 1 = validation, 2 = test for each row: stratified, exact and order-free.

    Within each class rows are ranked by their seeded hash draw; the first
    ``round(test_fraction * n)`` go to test and the next ``round(val_fraction *
    n)`` to validation. Only hashes decide, so every engine, every batching and
    every rerun routes each row the same way.
    """
    draw = unit_interval(hashes, seed)
    out = np.zeros(len(hashes), np.int8)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        order = rows[_by_draw(draw[rows], hashes[rows])]
        n_test = int(round(test_fraction * len(rows)))
        n_val = int(round(val_fraction * len(rows)))
        out[order[:n_test]] = 2
        out[order[n_test : n_test + n_val]] = 1
    return out


def _by_draw(draw: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Positions in order of draw, ties broken by hash: ``np.lexsort((hashes, draw))``,
    which costs ten times a plain sort, done only when two 53-bit draws are equal."""
    order = np.argsort(draw)
    if (np.diff(draw[order]) == 0).any():
        return np.lexsort((hashes, draw))
    return order
