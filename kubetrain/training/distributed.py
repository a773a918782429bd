"""Data-parallel training (DDP) over ``torch.distributed``: one process per rank.

Who starts the processes: ``torchrun`` (``python -m torch.distributed.run``),
either here (`run_local_ddp`, what ``--nproc N`` uses) or in each pod of a
Kubeflow Trainer ``TrainJob`` (see `kubetrain.cluster.trainjob`). torchrun reads the
topology from ``--nnodes/--nproc-per-node/--node-rank/--master-addr/
--master-port`` or, when a flag is absent, from ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``: exactly the variables Trainer's torch plugin sets on the
trainer container. Each worker it starts gets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; `world` reads those.

How training splits (see `kubetrain.training.loop.fit`): every rank holds the whole
(small) split, draws the same per-epoch permutation from the same seed and
trains on its own slice of it (`shard_order`: ``rank::world``, padded so every
rank runs the same number of batches; DDP would hang otherwise). The global
batch stays ``batch_size`` (``batch_size // world`` rows per rank), so N
processes follow nearly the same trajectory as one. Losses and accuracies are
all-reduced, so every rank takes the same early-stopping decision; only rank 0
logs, writes checkpoints and writes outputs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from kubetrain.core.errors import KubetrainError, require

#: Module every rank runs (``torchrun -m kubetrain.cli.train_entry ...``).
ENTRY_MODULE = "kubetrain.cli.train_entry"
#: What `kubetrain.cli.train_entry` writes under ``--output`` (rank 0 only); meta.json comes last.
OUTPUT_MODEL, OUTPUT_METRICS, OUTPUT_REPORT, OUTPUT_META = (
    "model",
    "metrics.json",
    "report.html",
    "meta.json",
)
#: Marker of the one line a failing rank prints before exiting non-zero.
FAILED = re.compile(r"rank (\d+) failed: (.*)$")
RANK_PREFIX = re.compile(r"^\[rank(\d+)\]:\s*(.*)$")


class World(NamedTuple):
    rank: int
    local_rank: int
    world_size: int


def world(environ: dict[str, str] | None = None) -> World:
    """This process's ``(rank, local_rank, world_size)``: (0, 0, 1) outside torchrun.

    An initialized process group is authoritative; otherwise the variables
    torchrun gives each worker (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``).
    """
    env = os.environ if environ is None else environ
    try:
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        size = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise KubetrainError(
            f"RANK={env.get('RANK')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r}, "
            f"WORLD_SIZE={env.get('WORLD_SIZE')!r} must be whole numbers; start the "
            "processes with torchrun (it sets them)"
        ) from None
    if environ is None and dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    require(
        size >= 1 and 0 <= rank < size and local_rank >= 0,
        f"RANK={rank} is not within WORLD_SIZE={size}; start the processes with torchrun",
    )
    return World(rank, local_rank, size)


def is_active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def init(backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[World]:
    """Join the process group torchrun describes for the block; leave it afterwards.

    Backend: ``nccl`` when CUDA is visible (each rank on GPU ``LOCAL_RANK``),
    else ``gloo``; pass ``gloo`` to train on CPU on a GPU machine. Outside
    torchrun (``WORLD_SIZE`` unset or 1) nothing is initialized and the block
    runs as the single process it is.
    """
    me = world()
    if me.world_size == 1 or dist.is_initialized():
        yield me
        return
    require(
        dist.is_available(),
        "this torch build has no torch.distributed; install the standard torch wheel",
    )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    require(backend in ("nccl", "gloo"), f"backend={backend!r}: use nccl (GPUs) or gloo (CPU)")
    if backend == "nccl":
        require(
            torch.cuda.is_available() and me.local_rank < torch.cuda.device_count(),
            f"rank {me.rank} needs GPU {me.local_rank} but "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are "
            "visible; request one GPU per process (numProcPerNode = GPUs per node)",
        )
        torch.cuda.set_device(me.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield world()
    finally:
        dist.destroy_process_group()


# --- splitting the data ------------------------------------------------------------


def shard_order(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice ``rank::world`` of ``order``, padded by wrapping around.

    Every rank gets ``ceil(n / world)`` indices, so all ranks run the same
    number of batches; the slices are disjoint except for the fewer than
    ``world`` padded ones, and together they cover ``order``.
    """
    n = len(order)
    require(n > 0, "cannot shard an empty split")
    require(0 <= rank < world_size, f"rank {rank} is not within world size {world_size}")
    per_rank = -(-n // world_size)
    padded = order.repeat(-(-per_rank * world_size // n))[: per_rank * world_size]
    return padded[rank::world_size]


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one rank's dropout masks in one epoch (distinct per rank, same on resume)."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63


# --- collectives ---------------------------------------------------------------------


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (unchanged outside a group)."""
    if not is_active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (a shared stop decision)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


# --- local launcher ------------------------------------------------------------------


def torchrun_command(nproc: int, args: Sequence[str], module: str = ENTRY_MODULE) -> list[str]:
    """The command that runs ``module`` on ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]


def run_local_ddp(
    nproc: int,
    args: Sequence[str],
    module: str = ENTRY_MODULE,
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> None:
    """Run ``module`` with ``args`` on ``nproc`` local processes via torchrun; wait for it.

    Output streams through ``echo`` (default: this process's stdout) as it
    comes. A non-zero exit raises `KubetrainError` with the failing rank's own
    error line (the first rank to fail, as torchrun reports it).
    """
    require(
        isinstance(nproc, int) and nproc >= 1,
        f"nproc={nproc!r}: the number of training processes must be at least 1",
    )
    echo = echo or (lambda line: print(line, flush=True))
    child_env = dict(os.environ if env is None else env)
    # torchrun pins OMP_NUM_THREADS=1 when unset; the ranks share this machine's cores.
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    tail: deque[str] = deque(maxlen=400)
    try:
        proc = subprocess.Popen(
            torchrun_command(nproc, args, module),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env,
            bufsize=1,
        )
    except OSError as exc:
        raise KubetrainError(
            f"cannot start torchrun ({exc}); is torch installed in {sys.executable}?"
        ) from None
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            echo(line)
    if proc.returncode != 0:
        raise KubetrainError(
            f"distributed training over {nproc} processes failed: {failure_reason(list(tail))}"
        )


def failure_reason(lines: Sequence[str]) -> str:
    """The failing rank's error from torchrun's output (its 'Root Cause' rank first)."""
    root = None
    for i, line in enumerate(lines):
        if "Root Cause" in line:
            for follow in lines[i : i + 8]:
                m = re.search(r"rank\s*:\s*(\d+)", follow)
                if m:
                    root = int(m.group(1))
                    break
    failures: dict[int, str] = {}
    for line in lines:
        m = FAILED.search(line)
        if m:
            failures.setdefault(int(m.group(1)), m.group(2).strip())
    if root is not None and root in failures:
        return f"rank {root}: {failures[root]}"
    user = [(r, msg) for r, msg in failures.items() if msg.startswith(KubetrainError.LOG_PREFIX)]
    if user or failures:
        rank, msg = (user or sorted(failures.items()))[0]
        return f"rank {rank}: {msg}"
    # An uncaught exception: torch prefixes the worker's traceback lines with [rankN]:.
    errors = [
        ln.strip()
        for ln in lines
        if re.search(r"(Error|Exception)\b.*:", ln) and "ChildFailedError" not in ln
    ]
    prefixed = [m for m in (RANK_PREFIX.match(ln) for ln in errors) if m]
    own = [m for m in prefixed if root is None or int(m.group(1)) == root] or prefixed
    if own:
        return f"rank {own[-1].group(1)}: {own[-1].group(2)}"
    last = errors[-1] if errors else next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    where = f"rank {root}: " if root is not None else ""
    return f"{where}{last or 'no output'}"


def inside_worker(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is already one rank of a torchrun job."""
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or "1") > 1 or "TORCHELASTIC_RUN_ID" in env


def should_launch(nproc: int) -> bool:
    """Whether the train stage should start ``nproc`` local processes (not when it is one)."""
    return nproc > 1 and not inside_worker()


def train_distributed(
    train_path: str,
    val_path: str,
    hyperparameters: dict[str, Any] | None,
    model_path: str,
    metrics_path: str,
    report_path: str,
    settings: dict[str, Any] | None,
    nproc: int,
    checkpoint_dir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`kubetrain.stages.train_stage` over ``nproc`` local DDP processes: same outputs, same meta.

    Runs ``torchrun --standalone --nproc-per-node N -m kubetrain.cli.train_entry``,
    whose rank 0 writes through ``train_stage`` into a temporary folder; the
    files then move to ``model_path``, ``metrics_path`` and ``report_path``.
    """
    from kubetrain.data.datasets import atomic_dir, atomic_file

    require(isinstance(nproc, int) and nproc >= 1, f"nproc={nproc!r} must be at least 1")
    require(
        not inside_worker(),
        "train_distributed was called inside a torchrun worker; "
        "the train stage launches processes only when should_launch()",
    )
    with tempfile.TemporaryDirectory(prefix="kubetrain-ddp-") as tmp:
        out = Path(tmp) / "out"
        args = [
            "--train",
            str(train_path),
            "--validation",
            str(val_path),
            "--output",
            str(out),
            "--hyperparameters",
            json.dumps(hyperparameters or {}),
            "--settings",
            json.dumps(settings or {}),
        ]
        if checkpoint_dir:
            args += ["--checkpoint-dir", str(checkpoint_dir)]
        run_local_ddp(nproc, args, echo=echo)
        require(
            (out / OUTPUT_META).is_file(),
            f"distributed training wrote no {OUTPUT_META} under {out}; see the log above",
        )
        with atomic_dir(model_path) as dest:
            shutil.copytree(out / OUTPUT_MODEL, dest, dirs_exist_ok=True)
        for name, target in ((OUTPUT_METRICS, metrics_path), (OUTPUT_REPORT, report_path)):
            with atomic_file(target) as dest:
                shutil.copyfile(out / name, dest)
        return json.loads((out / OUTPUT_META).read_text())
