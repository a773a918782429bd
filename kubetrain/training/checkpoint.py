"""The resumable state of one training run on disk (``<checkpoint_dir>/last.pt``).

A checkpoint directory is often a shared volume (a PVC, a mounted bucket), so
``last.pt`` is untrusted input: it is read with ``torch.load(weights_only=True)``,
whose unpickler builds only tensors, plain containers, numbers and strings and
refuses every other global, so a crafted file cannot run code. `fit` therefore
saves only such values (RNG states as tensors, history as lists of dicts of
numbers, the settings as a flat dict).

Writes go to ``last.tmp`` and are renamed over ``last.pt``: a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from kubetrain.core.errors import KubetrainError
from kubetrain.data.shards import MANIFEST

FILENAME = "last.pt"


def path_in(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """Where `fit` keeps its checkpoint under ``checkpoint_dir`` (None: no checkpointing)."""
    return Path(checkpoint_dir) / FILENAME if checkpoint_dir else None


def load(path: Path, map_location: torch.device | str) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is none yet.

    Anything that is not a plain kubetrain checkpoint (a crafted pickle, a
    truncated write from another tool, a file of another format) is refused in
    one line: resuming from it silently, or starting over without saying so,
    would both hide the problem.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise KubetrainError(
            f"refused to resume from checkpoint {path}: it holds Python objects "
            "a kubetrain checkpoint never contains (it may be crafted to run "
            "code); delete it to train from the start"
        ) from None
    except Exception as exc:  # noqa: BLE001 - RuntimeError (bad zip), EOFError, OSError, ...
        reason = str(exc).strip().split("\n")[0].split(". ")[0][:200] or "unreadable"
        raise KubetrainError(
            f"cannot resume from checkpoint {path} ({type(exc).__name__}: "
            f"{reason}); delete it to train from the start"
        ) from None
    if not isinstance(state, dict):
        raise KubetrainError(
            f"cannot resume from checkpoint {path}: it holds a "
            f"{type(state).__name__}, not a kubetrain checkpoint; delete it "
            "to train from the start"
        )
    return state


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically; a failed write leaves no ``.tmp`` behind."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports ENOSPC as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise KubetrainError(
            f"cannot write checkpoint {path} ({type(exc).__name__}: {exc}); "
            f"check free space and write access under {path.parent}"
        ) from None


# --- where checkpoints live --------------------------------------------------------------


def key(train_path: str, val_path: str, settings: Mapping[str, Any]) -> str:
    """What determines a training run: both splits' contents and every setting fit reads.

    A retried task, a re-run after a crash, a re-submitted run with the same
    inputs and a re-created Katib trial pod all compute the same key, so they
    find the same checkpoint; any other input or setting gets a fresh one.
    """
    digest = hashlib.sha256()
    for split in (train_path, val_path):
        # a sharded split's manifest holds every shard's sha256: hashing it stands for the
        # data without reading gigabytes of shards again at every start
        files = (
            [Path(split) / MANIFEST]
            if (Path(split) / MANIFEST).is_file()
            else sorted(p for p in Path(split).rglob("*") if p.is_file())
        )
        for path in files:
            digest.update(path.relative_to(split).as_posix().encode())
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def stable_dir(root: str, train_path: str, val_path: str, settings: Mapping[str, Any]) -> str:
    """``<root>/<key>``: a checkpoint place that outlives any one run's output folder."""
    return f"{root.rstrip('/')}/{key(train_path, val_path, settings)}"


EpochHook = Callable[[int, dict[str, float]], bool]


@contextlib.contextmanager
def mirrored(checkpoint_dir: str | None) -> Iterator[tuple[str | None, EpochHook | None]]:
    """A local folder for `fit`'s checkpoint, mirrored to ``checkpoint_dir`` when it is s3://.

    `fit` writes checkpoints to a local folder; for object storage the last
    one is fetched first and uploaded after every epoch (the epoch hook runs
    right after the checkpoint is written), so a preempted pod loses at most
    the epoch in flight. Yields (folder for fit, hook to pass to fit or None).
    """
    if not checkpoint_dir or not checkpoint_dir.startswith("s3://"):
        yield checkpoint_dir, None
        return
    from kubetrain.core import storage

    remote = f"{checkpoint_dir.rstrip('/')}/{FILENAME}"
    with tempfile.TemporaryDirectory(prefix="kubetrain-ckpt-") as local:
        if storage.exists(remote):
            storage.download(remote, Path(local) / FILENAME)

        def upload(epoch: int, metrics: dict[str, float]) -> bool:
            if (Path(local) / FILENAME).is_file():  # a cross-validated trial writes none
                storage.upload(Path(local) / FILENAME, remote)
            return False

        yield local, upload


def chain(*hooks: EpochHook | None) -> EpochHook | None:
    """One epoch hook calling each given one in order; it stops when any of them says stop."""
    present = [h for h in hooks if h is not None]
    if not present:
        return None

    def both(epoch: int, metrics: dict[str, float]) -> bool:
        return any([h(epoch, metrics) for h in present])  # every hook runs, every epoch

    return both
