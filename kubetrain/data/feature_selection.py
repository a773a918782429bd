"""Feature selection on the encoded training matrix (imputed and encoded, not yet scaled).

Selecting after encoding treats every column type alike (numbers, a date's parts,
one-hot categories, hashed text buckets), and scaling changes neither variance
ratios nor correlations nor mutual information. Everything is fitted on the
training split only, from summaries that merge exactly across batches and Spark
tasks (`SelectionStats`, folded beside `kubetrain.data.clean_stream.EncodedStats`):

1. constant: standard deviation below `CONSTANT_STD` x (1 + |mean|);
2. near-constant: one value covers more than `NEAR_CONSTANT_SHARE` of the training
   rows (counted on the hash-chosen row sample: exact while the training split fits
   in it, an estimate beyond);
3. duplicate or highly correlated: |Pearson r| above `MAX_CORRELATION` with an
   earlier kept column drops the later one (the reason names its twin). Columns of
   one source column (a one-hot group, a date's parts, a text column's buckets) are
   not compared with each other, so the encoders' groups stay whole. Skipped, with a
   note, past `MAX_CORRELATION_WIDTH` encoded columns (cross products cost width²);
4. supervised (``--max-features N``): the source columns left are ranked by mutual
   information with the label on the row sample (scikit-learn's
   ``mutual_info_classif``, seeded with the run seed) and the N best are kept. A
   source column's encoded columns are kept or dropped together, ranked by their
   best column's score (a sum would favour wide groups: many categories or hash
   buckets add up noise); N counts source columns, as the table shows them.

Steps 1-3 run when ``feature_selection`` is on (the default); step 4 when
``max_features > 0``. The result is `Selection`: the kept indices into the encoded
width (``Preprocessor.params["selected"]``) and one reason per dropped column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetrain.config.settings import CleanConfig
from kubetrain.core.errors import KubetrainError

#: Constant: standard deviation below this times (1 + |mean|) (zero up to rounding).
CONSTANT_STD = 1e-8
#: Near-constant: one value in more than this share of the training rows.
NEAR_CONSTANT_SHARE = 0.999
#: Highly correlated: |Pearson r| above this with an earlier kept column.
MAX_CORRELATION = 0.98
#: |r| above this is reported as a duplicate rather than a correlation.
DUPLICATE_CORRELATION = 1 - 1e-9
#: Encoded columns above which the correlation step is skipped (a width² matrix per task).
MAX_CORRELATION_WIDTH = 2_000
#: Training rows kept for mutual information and the near-constant share (smallest hashes).
SAMPLE_ROWS = 20_000
#: Cells (rows x columns) the row sample may hold: a wide matrix gets fewer rows (32 MB).
SAMPLE_CELLS = 4_000_000
#: Neighbours of the k-nearest-neighbour mutual information estimate (scikit-learn's default).
MI_NEIGHBORS = 3


class CoMoments:
    """Count, column means and the centred cross-product matrix of a float matrix,
    merged like `kubetrain.data.stats.Moments` (Chan et al.): exact up to rounding in
    any order, and without the cancellation raw sums of squares suffer on large means."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.mean = np.zeros(width)
        self.cross = np.zeros((width, width))

    def add(self, X: np.ndarray) -> None:
        if len(X):
            mean = X.mean(axis=0)
            centred = X - mean
            self._fold(len(X), mean, centred.T @ centred)

    def merge(self, other: CoMoments) -> CoMoments:
        if other.count:
            self._fold(other.count, other.mean, other.cross)
        return self

    def _fold(self, n: int, mean: np.ndarray, cross: np.ndarray) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.cross = self.cross + cross + np.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * n / total
        self.count = total

    def correlation(self) -> np.ndarray:
        """Pearson r of every pair; 0 where a column has no variance."""
        std = np.sqrt(np.clip(np.diag(self.cross), 0, None))
        denom = np.outer(std, std)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(denom > 0, self.cross / np.where(denom > 0, denom, 1.0), 0.0)
        return np.clip(r, -1.0, 1.0)


@dataclass
class RowSample:
    """The training rows with the smallest row-hash keys (at most ``k``), sorted by key:
    the same rows, in the same order, whichever way the table was batched or split."""

    k: int
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    rows: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))

    @classmethod
    def of(cls, X: np.ndarray, keys: np.ndarray, k: int) -> RowSample:
        return cls(k, np.asarray(keys, np.uint64), np.asarray(X, np.float64))._trim()

    def merge(self, other: RowSample) -> RowSample:
        if not len(other.keys):
            return self
        if not len(self.keys):
            return other
        keys = np.concatenate([self.keys, other.keys])
        return RowSample(self.k, keys, np.concatenate([self.rows, other.rows]))._trim()

    def _trim(self) -> RowSample:
        """Keep the ``k`` smallest keys (row hashes are unique after dedupe), sorted."""
        if len(self.keys) > self.k:
            part = np.argpartition(self.keys, self.k - 1)[: self.k]
            self.keys, self.rows = self.keys[part], self.rows[part]
        order = np.argsort(self.keys, kind="stable")
        self.keys, self.rows = self.keys[order], self.rows[order]
        return self


def sample_rows(width: int) -> int:
    """Rows the sample keeps for a matrix this wide (`SAMPLE_ROWS`, fewer past `SAMPLE_CELLS`)."""
    return max(1, min(SAMPLE_ROWS, SAMPLE_CELLS // max(width, 1)))


class SelectionStats:
    """What selection needs beyond the per-column moments: the cross products (for the
    correlation matrix; none past `MAX_CORRELATION_WIDTH`) and a row sample (for the
    near-constant share and mutual information). Folded per batch, merged per worker."""

    def __init__(self, width: int) -> None:
        self.co = CoMoments(width) if width <= MAX_CORRELATION_WIDTH else None
        self.sample = RowSample(sample_rows(width), rows=np.empty((0, width)))

    def add(self, X: np.ndarray, h: np.ndarray) -> None:
        if self.co is not None:
            self.co.add(X)
        self.sample = self.sample.merge(RowSample.of(X, h, self.sample.k))

    def merge(self, other: SelectionStats) -> SelectionStats:
        if self.co is not None and other.co is not None:
            self.co = self.co.merge(other.co)
        self.sample = self.sample.merge(other.sample)
        return self


def labels_of(keys: np.ndarray, hashes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label of each sampled row, looked up by its row hash among the kept rows."""
    order = np.argsort(hashes, kind="stable")
    pos = np.searchsorted(hashes[order], keys)
    found = order[np.minimum(pos, len(order) - 1)]
    if len(keys) and (not len(hashes) or (hashes[found] != keys).any()):
        raise KubetrainError(
            "feature selection sampled a row the routing does not know; re-run clean "
            "(the table changed while it was read)"
        )
    return np.asarray(labels)[found].astype(np.int64)


@dataclass
class Selection:
    """Kept column indices into the encoded width, and why each other column went."""

    kept: list[int]
    dropped: list[dict[str, str]]
    notes: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.dropped)


def select(
    names: list[str],
    sources: list[str],
    moments: Any,
    stats: SelectionStats,
    labels: np.ndarray | None,
    cfg: CleanConfig,
    seed: int,
) -> Selection:
    """Run the steps the settings ask for (module docstring) on the training summaries.

    ``moments`` has per-column ``count``, ``mean`` and ``std`` of the same matrix;
    ``labels`` are the sample's label codes, row for row (needed for ``max_features``)."""
    reasons: dict[int, str] = {}
    notes: list[str] = []
    if cfg.feature_selection:
        _constant(moments.mean, moments.std, reasons)
        _near_constant(stats.sample.rows, moments.count, reasons)
        if stats.co is None:
            notes.append(
                f"correlation check skipped: {len(names)} encoded columns "
                f"(limit {MAX_CORRELATION_WIDTH})"
            )
        else:
            _correlated(stats.co.correlation(), names, sources, reasons)
    if cfg.max_features:
        if labels is None:
            raise KubetrainError("max_features needs the sample's labels; pass them to select")
        _by_information(stats.sample.rows, labels, sources, cfg.max_features, seed, reasons)
    kept = [j for j in range(len(names)) if j not in reasons]
    if not kept:
        raise KubetrainError(
            "feature selection left no feature columns (every one is constant or "
            "near-constant in the training split); check the table's columns or pass "
            "--no-feature-selection"
        )
    dropped = [{"feature": names[j], "reason": reasons[j]} for j in sorted(reasons)]
    return Selection(kept, dropped, notes)


def _constant(mean: np.ndarray, std: np.ndarray, reasons: dict[int, str]) -> None:
    for j in np.flatnonzero(std < CONSTANT_STD * (1 + np.abs(mean))):
        reasons[int(j)] = "constant"


def _near_constant(rows: np.ndarray, count: int, reasons: dict[int, str]) -> None:
    """Columns where one value covers over `NEAR_CONSTANT_SHARE` of the sampled rows."""
    if not len(rows):
        return
    where = "training rows" if len(rows) >= count else f"{len(rows)} sampled training rows"
    for j in range(rows.shape[1]):
        if j in reasons:
            continue
        _, counts = np.unique(rows[:, j], return_counts=True)
        share = counts.max() / len(rows)
        if share > NEAR_CONSTANT_SHARE:
            reasons[j] = f"near-constant (one value in {share:.2%} of {where})"


def _correlated(
    r: np.ndarray, names: list[str], sources: list[str], reasons: dict[int, str]
) -> None:
    """Greedy, in column order: a column whose |r| with an earlier kept column of another
    source exceeds `MAX_CORRELATION` goes; the reason names the most correlated twin."""
    kept: list[int] = []
    src = np.asarray(sources, dtype=object)
    for j in range(len(names)):
        if j in reasons:
            continue
        if kept:
            earlier = np.asarray(kept)
            strength = np.abs(r[j, earlier]) * (src[earlier] != src[j])
            best = int(np.argmax(strength))
            if strength[best] > MAX_CORRELATION:
                twin, value = names[earlier[best]], float(r[j, earlier[best]])
                reasons[j] = (
                    f"duplicate of {twin}"
                    if abs(value) > DUPLICATE_CORRELATION
                    else f"correlated with {twin} (r={value:+.3f})"
                )
                continue
        kept.append(j)


def _by_information(
    rows: np.ndarray,
    labels: np.ndarray,
    sources: list[str],
    max_features: int,
    seed: int,
    reasons: dict[int, str],
) -> None:
    """Keep the `max_features` source columns (groups) with the highest mutual
    information with the label; a group scores its best column's value."""
    remaining = [j for j in range(len(sources)) if j not in reasons]
    groups: dict[str, list[int]] = {}
    for j in remaining:
        groups.setdefault(sources[j], []).append(j)
    if len(groups) <= max_features:
        return
    mi = mutual_information(rows[:, remaining], labels, seed)
    score = dict(zip(remaining, mi.tolist(), strict=True))
    best = {g: max(score[j] for j in cols) for g, cols in groups.items()}
    ranked = sorted(groups, key=lambda g: (-best[g], groups[g][0]))
    for rank, g in enumerate(ranked[max_features:], start=max_features + 1):
        for j in groups[g]:
            reasons[j] = (
                f"not among the {max_features} most informative columns "
                f"(mutual information {best[g]:.4f}, rank {rank} of {len(ranked)})"
            )


def mutual_information(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Mutual information of each column with the label: 0/1 columns as discrete (exact
    counts), the others by the k-nearest-neighbour estimate, seeded for reproducibility."""
    from sklearn.feature_selection import mutual_info_classif

    if not len(X):
        return np.zeros(X.shape[1])
    discrete = ((X == 0) | (X == 1)).all(axis=0)
    return mutual_info_classif(
        X,
        y,
        discrete_features=discrete,
        n_neighbors=MI_NEIGHBORS,
        random_state=seed % 2**32,
    )


def report_lines(stats: dict[str, Any], md: Any, limit: int = 100) -> list[str]:
    """The "Feature selection" section of the quality report: what was kept, and each
    dropped encoded column with its reason. ``md`` makes the user's text inert."""
    if "features_selected" not in stats:
        return []
    dropped = stats.get("features_dropped", [])
    total = stats.get("features_encoded", stats["features_selected"] + len(dropped))
    lines = [
        "",
        "## Feature selection",
        "",
        f"Kept {stats['features_selected']} of {total} encoded features "
        "(fitted on the training split only).",
    ]
    lines += [f"- {md(n)}" for n in stats.get("feature_selection_notes", [])]
    if dropped:
        lines += ["", "| dropped feature | reason |", "|---|---|"]
        lines += [f"| {md(d['feature'])} | {md(d['reason'])} |" for d in dropped[:limit]]
        if len(dropped) > limit:
            lines.append(f"| ... | {len(dropped) - limit} more (stage metadata) |")
    return lines


__all__ = [
    "CONSTANT_STD",
    "DUPLICATE_CORRELATION",
    "MAX_CORRELATION",
    "MAX_CORRELATION_WIDTH",
    "NEAR_CONSTANT_SHARE",
    "SAMPLE_ROWS",
    "CoMoments",
    "RowSample",
    "Selection",
    "SelectionStats",
    "labels_of",
    "mutual_information",
    "report_lines",
    "sample_rows",
    "select",
]
