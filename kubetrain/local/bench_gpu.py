"""`make bench-gpu`: the train stage's loop against a tuned raw PyTorch loop, in img/s.

For each model and shape of issue 11's table (a LeNet-style CNN on 28x28x1, a
ConvNet 64-256-256 with BatchNorm on 32x32x3, the default ResNet on 32x32x3),
on the same synthetic tensors (50,000 images, batch 512 by default), one run
times:

* ``stage``: `kubetrain.training.loop`'s ``train_epoch``, the code every
  training and tuning trial runs (channels_last, bf16 autocast, torch.compile,
  fused AdamW, the images resident on the device as uint8 and decoded per batch,
  as the train stage holds an image split, one host sync per epoch), without
  augmentation; ``stage+aug``: the same with the default per-batch augmentation
  policy of the shape (what an image run trains with);
* ``raw``: a hand-written loop on the same network: float32 data on the device,
  ``randperm`` batches, bf16 autocast, channels_last, ``torch.compile``, fused
  AdamW, ``zero_grad(set_to_none=True)``, no host sync.

It prints img/s, the ratio stage / raw (target >= 1.0) and the GPU utilisation
sampled (``nvidia-smi``) while each loop ran; with several GPUs it also runs
the stage's loop data-parallel (torchrun, NCCL) on all of them and prints the
scaling efficiency, img/s on N GPUs / (N x img/s on one), at the same batch
per GPU (target >= 0.9).

Runs anywhere: on a CPU (``--quick``: a few hundred images, small batches) it
exercises the same code paths, with compile off unless ``--compile on``. A
failing ``torch.compile`` is reported in the results and the loop goes on
uncompiled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.config.settings import AugmentConfig, HyperConfig, TrainConfig
from kubetrain.data.augment import POLICY_KEY
from kubetrain.data.datasets import Schema
from kubetrain.training import distributed, loop, models
from kubetrain.training.batch_augment import policy_from
from kubetrain.training.models import ModelSpec, spec_for
from kubetrain.training.stream import Stored


class ConvNet(nn.Module):
    """The table's "ConvNet 64-256-256 with BatchNorm": three conv-BN-ReLU-pool blocks of
    64, 256 and 256 channels, global max pool, linear head."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        channels, _, _ = spec.image_shape or (3, 32, 32)
        self.shape = tuple(spec.image_shape or (3, 32, 32))
        layers: list[nn.Module] = []
        for out in (64, 256, 256):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.reshape(-1, *self.shape))
        return self.head(torch.amax(h, dim=(2, 3)))


models.ARCHITECTURES.setdefault("bench-convnet", ConvNet)


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # a kubetrain architecture (the ConvNet registered above)
    shape: tuple[int, int, int]


CASES = (
    Case("lenet-28x28x1", "cnn", (1, 28, 28)),
    Case("convnet-64-256-256-bn-32x32x3", "bench-convnet", (3, 32, 32)),
    Case("resnet-default-32x32x3", "resnet", (3, 32, 32)),
)
CLASSES = 10


def schema_of(shape: tuple[int, int, int], policy: dict[str, Any] | None) -> Schema:
    c, h, w = shape
    return Schema(
        kind="image",
        feature_names=[f"p{i}" for i in range(c * h * w)],
        class_names=[str(i) for i in range(CLASSES)],
        image_shape=[c, h, w],
        extra={POLICY_KEY: policy} if policy else {},
    )


def synthetic(n: int, shape: tuple[int, int, int], seed: int) -> Stored:
    """Random uint8 images and labels with a standardizing decode, as clean stores an image
    split: the stage trains on them as the train stage does (resident as uint8, decoded
    per batch on the device); the raw loop on their float32 features. The throughput
    does not depend on content."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (n, int(np.prod(shape))), dtype=np.uint8)
    lut = ((np.arange(256) - 127.5) / 73.9).astype(np.float32)  # a uniform byte's mean, sd
    return Stored(X, rng.integers(0, CLASSES, n).astype(np.int64), lut)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuSampler:
    """Mean GPU utilisation (%) while the block runs, from ``nvidia-smi`` every 0.2 s
    (None without a GPU or nvidia-smi)."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [*query, f"--id={self.index}"], capture_output=True, text=True, timeout=5
                ).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def stage_rate(
    case: Case,
    data: Stored,
    batch: int,
    epochs: int,
    compile_setting: str,
    augment: bool,
) -> dict[str, Any]:
    """img/s of `loop.training_loop`'s ``train_epoch`` (after one warm-up epoch, which
    compiles), and whether it ran compiled."""
    policy = policy_from(AugmentConfig(), list(case.shape)).to_dict() if augment else None
    schema = schema_of(case.shape, policy)
    hyper = HyperConfig(batch_size=batch, dropout=0.0)
    train = TrainConfig(
        model="cnn" if case.arch == "cnn" else "resnet", torch_compile=compile_setting
    )
    spec = spec_for(schema, train.model, hyper.width, hyper.dropout, data.rows)
    spec.arch = case.arch if case.arch != "resnet" else spec.arch
    val = (data.lut[data.X[:batch]], data.y[:batch])
    lp = loop.training_loop(spec, train, hyper, 0, data, val, schema, epochs + 1)
    # the batch as given: fit would grow it with the rows (`loop.effective_batch`)
    lp.batch_rows = max(1, batch // lp.where.world_size)
    device = lp.where.device
    lp.train_epoch(1)  # warm-up: compiles, fills the allocator's cache
    _sync(device)
    with GpuSampler(device) as gpu:
        started = time.perf_counter()
        for epoch in range(2, epochs + 2):
            lp.train_epoch(epoch)
        _sync(device)
        seconds = time.perf_counter() - started
    rows = data.rows // lp.where.world_size * lp.where.world_size
    return {
        "img_s": rows * epochs / seconds,
        "compiled": lp.compiled is not None,
        "gpu_util": gpu.mean,
        "seconds": seconds,
    }


def raw_rate(
    case: Case,
    data: Stored,
    batch: int,
    epochs: int,
    compile_setting: str,
) -> dict[str, Any]:
    """img/s of a tuned hand-written loop on the same network, data (as float32 on the
    device) and batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    schema = schema_of(case.shape, None)
    spec = spec_for(schema, "cnn" if case.arch == "cnn" else "resnet", 128, 0.0, data.rows)
    spec.arch = case.arch if case.arch != "resnet" else spec.arch
    net = models.build(spec).to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    layout = torch.channels_last if cuda else torch.contiguous_format
    features, labels = data.decoded()
    X = torch.as_tensor(features, device=device).reshape(len(features), *case.shape)
    X = X.contiguous(memory_format=layout)
    y = torch.as_tensor(labels, device=device)
    opt = torch.optim.AdamW(
        net.parameters(), lr=2e-3, weight_decay=1e-4, **({"fused": True} if cuda else {})
    )
    use_compile = compile_setting == "on" or (compile_setting == "auto" and cuda)
    compiled: nn.Module | None = None
    error = ""
    if use_compile:
        try:
            compiled = torch.compile(net)
        except Exception as exc:  # noqa: BLE001 - reported, then eager
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    bf16 = cuda and torch.cuda.is_bf16_supported()

    def step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()

    def epoch() -> None:
        nonlocal compiled, error
        order = torch.randperm(len(y), device=device)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            if compiled is not None:
                try:
                    step(compiled, X[idx], y[idx])
                    continue
                except Exception as exc:  # noqa: BLE001 - reported, then eager
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    compiled = None
            step(net, X[idx], y[idx])

    net.train()
    epoch()  # warm-up
    _sync(device)
    with GpuSampler(device) as gpu:
        started = time.perf_counter()
        for _ in range(epochs):
            epoch()
        _sync(device)
        seconds = time.perf_counter() - started
    out = {
        "img_s": len(y) * epochs / seconds,
        "compiled": compiled is not None,
        "gpu_util": gpu.mean,
        "seconds": seconds,
    }
    if error:
        out["compile_error"] = error
    return out


def _guarded(fn, *args: Any) -> dict[str, Any]:
    """``fn(*args)``, or its failure as a result row: one broken case does not end the run."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the results
        return {"img_s": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def run_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for case in CASES:
        if args.models and case.name.split("-")[0] not in args.models:
            continue
        data = synthetic(args.images, case.shape, 0)
        stage = _guarded(stage_rate, case, data, args.batch, args.epochs, args.compile, False)
        aug = _guarded(stage_rate, case, data, args.batch, args.epochs, args.compile, True)
        raw = _guarded(raw_rate, case, data, args.batch, args.epochs, args.compile)
        ratio = stage["img_s"] / raw["img_s"] if stage.get("img_s") and raw.get("img_s") else None
        rows.append(
            {
                "model": case.name,
                "shape": list(case.shape),
                "batch": args.batch,
                "images": args.images,
                "stage": stage,
                "stage_augmented": aug,
                "raw": raw,
                "ratio": ratio,
            }
        )
        _print_row(rows[-1])
    return rows


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: dict[str, Any]) -> None:
    s, a, r = row["stage"], row["stage_augmented"], row["raw"]
    print(
        f"{row['model']:32s} stage {_fmt(s.get('img_s')):>9} img/s "
        f"(compiled {s.get('compiled')}, GPU {_fmt(s.get('gpu_util'), '.0f')}%) | "
        f"stage+aug {_fmt(a.get('img_s')):>9} | raw {_fmt(r.get('img_s')):>9} img/s "
        f"(compiled {r.get('compiled')}, GPU {_fmt(r.get('gpu_util'), '.0f')}%) | "
        f"ratio {_fmt(row['ratio'], '.2f')} (target >= 1.0)",
        flush=True,
    )
    for name, part in (("stage", s), ("stage+aug", a), ("raw", r)):
        for key in ("error", "compile_error"):
            if part.get(key):
                print(f"  {name} {key}: {part[key]}", flush=True)


# --- data-parallel scaling --------------------------------------------------------------


def ddp_worker(args: argparse.Namespace) -> int:
    """One torchrun rank: the stage's loop on the default ResNet at ``args.batch`` images
    per GPU; rank 0 writes img/s to ``args.output``."""
    case = next(c for c in CASES if c.arch == "resnet")
    with distributed.init() as me:
        data = synthetic(args.images, case.shape, 0)
        result = stage_rate(
            case, data, args.batch * me.world_size, args.epochs, args.compile, False
        )
        if me.rank == 0 and args.output:
            Path(args.output).write_text(json.dumps({**result, "world": me.world_size}))
    return 0


def ddp_scaling(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """img/s of the stage's loop on ``gpus`` GPUs vs on one (torchrun both times)."""
    rates: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-gpu-") as tmp:
        for n in (1, gpus):
            out = Path(tmp) / f"ddp{n}.json"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={n}", "-m", "kubetrain.local.bench_gpu", "--ddp-worker",
                "--images", str(args.images * n), "--batch", str(args.batch),
                "--epochs", str(args.epochs), "--compile", args.compile, "--output", str(out),
            ]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                return {"gpus": gpus, "error": f"torchrun on {n} GPU(s) failed: {' | '.join(tail)}"}
            rates[n] = json.loads(out.read_text())["img_s"]
    efficiency = rates[gpus] / (gpus * rates[1])
    return {
        "gpus": gpus,
        "img_s_1": rates[1],
        f"img_s_{gpus}": rates[gpus],
        "efficiency": efficiency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after a warm-up")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument(
        "--models", default="", help="comma-separated subset: lenet,convnet,resnet (all if empty)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred images, small batches (CPU check)"
    )
    parser.add_argument("--output", default="", help="write the results as JSON here")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        args.images, args.batch, args.epochs = min(args.images, 96), min(args.batch, 32), 1
    if args.ddp_worker:
        return ddp_worker(args)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"bench-gpu on {device}, torch {torch.__version__}: {args.images:,} images, "
        f"batch {args.batch}, {args.epochs} timed epoch(s) after a warm-up, compile {args.compile}",
        flush=True,
    )
    results: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cases": run_cases(args),
    }
    gpus = torch.cuda.device_count() if cuda else 0
    if gpus > 1:
        results["ddp"] = ddp_scaling(args, gpus)
        d = results["ddp"]
        print(
            f"DDP scaling on {gpus} GPUs: "
            + (d["error"] if "error" in d else f"efficiency {d['efficiency']:.2f} (target >= 0.9)"),
            flush=True,
        )
    else:
        results["ddp"] = {"gpus": gpus, "skipped": "needs several GPUs"}
        print(f"DDP scaling: skipped ({gpus} GPU(s); needs several)", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
