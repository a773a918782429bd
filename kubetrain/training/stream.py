"""Training batches streamed from a sharded split, for splits that do not fit in memory.

`fit` keeps a split on the device when it fits the memory budget (index
batching is fastest). A bigger split is streamed: each epoch the shards are
shuffled with the seed and dealt to the (DDP rank x DataLoader worker) slots,
each slot reads its shards one by one into a shuffle buffer and yields
batches (uint8 pixels as stored: `fit` decodes them on the device), and the
loop runs a fixed number of steps, the same on every rank (DDP would hang on a
rank that runs out first). Memory per worker is one shard
plus the buffer. With fewer shards than slots (a split just over the budget, many
ranks) each shard is read by several slots, each keeping every k-th of its rows,
so no rank is left without batches.

The order of batches is a function of (seed, epoch) alone: the DataLoader
interleaves its workers' batches in a fixed order, so a run resumed in the
middle of an epoch skips exactly the batches it had trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kubetrain.core.memory import fits
from kubetrain.data import shards

#: Rows a worker's shuffle buffer holds before it starts yielding batches.
BUFFER_ROWS = 65_536


@dataclass(frozen=True)
class Streamed:
    """A sharded split that `fit` reads batch by batch instead of holding it."""

    uri: str
    rows: int
    features: int
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str) -> Streamed:
        manifest = shards.read_manifest(uri)
        return cls(str(uri), int(manifest["rows"]), int(manifest["features"]), manifest)

    @property
    def stored_uint8(self) -> bool:
        return self.manifest.get("dtype", "float32") == "uint8"

    @property
    def nbytes(self) -> int:
        """The features' bytes in memory: as stored for uint8 pixels (`Stored`), else float32."""
        return self.rows * self.features * (1 if self.stored_uint8 else 4)

    @property
    def lut(self) -> np.ndarray | None:
        """The stored value -> feature table of uint8 pixels (`shards.decoder`), else None."""
        return shards.decoder(self.manifest)


@dataclass(frozen=True)
class Stored:
    """A uint8 image split held as stored, with the table that decodes it: a quarter of
    the float32 bytes in host memory, on the GPU and in every host-to-device copy.
    `fit` decodes each batch on the training device (``lut[X]``), which gives exactly
    the float32 features `shards.read_all` would have (the same table)."""

    X: np.ndarray  # uint8 (rows, features)
    y: np.ndarray
    lut: np.ndarray  # float32 (256,)

    @property
    def rows(self) -> int:
        return len(self.y)

    @property
    def features(self) -> int:
        return int(self.X.shape[1])

    def decoded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X float32, y)``: what a reader that does not decode batches on a device takes."""
        return self.lut[self.X], self.y


def training_split(path: str, budget: int | None = None) -> tuple[Any, Any]:
    """The training split as `fit` takes it: in memory when it fits the budget (the fast
    path; uint8 pixels as `Stored`), else `Streamed` from its shards. Returns (split,
    schema)."""
    from kubetrain.data.datasets import load_split

    if shards.is_sharded(path):
        split = Streamed.open(path)
        if not fits(split.nbytes, budget):
            return split, shards.read_schema(path)
        if split.stored_uint8:
            X, y, schema = shards.read_all(path, raw=True)
            return Stored(X, y, split.lut), schema  # type: ignore[arg-type]
    X, y, schema = load_split(path)
    return (X, y), schema


def deal(n_shards: int, seed: int, epoch: int, slot: int, slots: int) -> list[int]:
    """The shards slot `slot` of `slots` reads in `epoch`: a seeded shuffle, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    return [int(i) for i in order[slot::slots]]


def portion(
    n_shards: int, seed: int, epoch: int, slot: int, slots: int
) -> tuple[list[int], int, int]:
    """What slot `slot` of `slots` reads in `epoch`: (shards, part, parts), the slot keeping
    rows ``part::parts`` of each. With at least as many shards as slots that is `deal`'s
    shards whole (part 0 of 1); with fewer, slot s takes shard s mod n of the seeded order
    and shares it with the other slots mapped to it, so every slot gets rows."""
    if n_shards >= slots:
        return deal(n_shards, seed, epoch, slot, slots), 0, 1
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    first = slot % n_shards
    return [int(order[first])], slot // n_shards, len(range(first, slots, n_shards))


def steps_per_epoch(
    split: Streamed, batch_rows: int, seed: int, epoch: int, world: int, workers: int
) -> int:
    """Steps every rank runs in `epoch`: what the rank dealt the fewest rows can fill."""
    rows = [int(s["rows"]) for s in split.manifest["shards"]]
    per_rank = []
    for rank in range(world):
        held = 0
        for w in range(workers):
            mine, part, parts = portion(len(rows), seed, epoch, rank * workers + w, world * workers)
            held += sum(len(range(part, rows[i], parts)) for i in mine)
        per_rank.append(held)
    return max(1, min(per_rank) // batch_rows)


class ShardStream(IterableDataset):
    """One rank's training batches for one epoch (see the module docstring)."""

    def __init__(
        self,
        split: Streamed,
        batch_rows: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        buffer_rows: int = BUFFER_ROWS,
    ):
        self.split, self.batch_rows, self.seed, self.epoch = split, batch_rows, seed, epoch
        self.rank, self.world, self.buffer_rows = rank, world, max(buffer_rows, batch_rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        listed = self.split.manifest["shards"]
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = 0
        mine, part, parts = portion(len(listed), self.seed, self.epoch, slot, slots)
        for index in mine:
            # as stored: uint8 pixels cross to the device as bytes and are decoded there
            X, y = shards.read_shard(self.split.uri, self.split.manifest, listed[index], raw=True)
            if parts > 1:  # a shard shared with other slots: every parts-th row from part
                X, y = X[part::parts], y[part::parts]
            xs.append(X)
            ys.append(y)
            held += len(y)
            if held >= self.buffer_rows:
                X_all, y_all = np.concatenate(xs), np.concatenate(ys)
                keep = yield from self._batches(X_all, y_all, rng, final=False)
                xs, ys, held = [X_all[keep:]], [y_all[keep:]], len(y_all) - keep
        if held:
            yield from self._batches(np.concatenate(xs), np.concatenate(ys), rng, final=True)

    def _batches(
        self, X: np.ndarray, y: np.ndarray, rng: np.random.Generator, final: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffle the buffer in place and yield its full batches (and the rest when final);
        returns how many rows were yielded."""
        order = rng.permutation(len(y))
        X[:], y[:] = X[order], y[order]
        full = len(y) // self.batch_rows * self.batch_rows
        end = len(y) if final else full
        for start in range(0, end, self.batch_rows):
            stop = min(start + self.batch_rows, end)
            yield torch.from_numpy(X[start:stop]), torch.from_numpy(y[start:stop])
        return end


def loader(
    split: Streamed,
    batch_rows: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    workers: int,
    pin_memory: bool,
) -> DataLoader:
    """The epoch's batches as a DataLoader (`workers` processes read shards in parallel)."""
    # Its own generator: a DataLoader draws a seed for its workers when iterated, and from
    # torch's global generator that draw would shift the dropout masks of the steps after
    # it (a run resumed mid-epoch iterates at another moment than one that never stopped).
    return DataLoader(
        ShardStream(split, batch_rows, seed, epoch, rank, world),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
    )
