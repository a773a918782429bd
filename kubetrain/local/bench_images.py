"""`make bench-images`: the image path's speed on this machine's CPU.

Measures, on a generated 10-class RGB folder (`kubetrain.data.synthetic_images`):

* generation: images/s written as PNG;
* ingest: images/s decoded, checked and written as the image table, per thread count;
* clean (`kubetrain.data.clean_images`): images/s deduplicated, split and written as uint8 shards;
* per-batch augmentation (`kubetrain.training.batch_augment`): images/s;
* training steps of the default ResNet for the image size: images/s of a plain
  fp32 loop and of the same loop in channels_last, forward + backward + AdamW.

The GPU counterpart is ``make bench-gpu`` (`kubetrain.local.bench_gpu`: the train
stage's loop against a tuned raw loop); these CPU figures are the baseline it is
read against.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kubetrain.config.settings import CleanConfig
from kubetrain.data.clean_images import clean_images
from kubetrain.data.image_ingest import ImageOptions, ingest_images
from kubetrain.data.synthetic_images import generate_folder
from kubetrain.training.batch_augment import AugmentPolicy, augment_batch
from kubetrain.training.resnet import ResNet, ResNetShape


def _train_rate(shape: list[int], batch: int, steps: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    net = ResNet(shape, 10, ResNetShape.for_image(shape[1], shape[2]))
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-images-") as tmp:
        started = time.perf_counter()
        folder = generate_folder(Path(tmp) / "set", args.images, args.size, workers=2)
        results["generate_images_per_s"] = args.images / (time.perf_counter() - started)
        for workers in (1, 2, 4):
            meta = ingest_images(
                str(folder), "", f"{tmp}/t{workers}", ImageOptions(workers=workers)
            )
            results[f"ingest_images_per_s_{workers}_threads"] = meta["images_per_second"]
        started = time.perf_counter()
        splits = [f"{tmp}/{name}" for name in ("train", "validation", "test")]
        clean_images(f"{tmp}/t1", *splits, CleanConfig(), 0)
        results["clean_images_per_s"] = args.images / (time.perf_counter() - started)
    shape = [3, args.size, args.size]
    x = torch.randn(512, *shape)
    gen = torch.Generator().manual_seed(0)
    policy = AugmentPolicy(cutout=0.25, max_rotation=10.0)
    augment_batch(x, policy, gen)
    started = time.perf_counter()
    for _ in range(3):
        augment_batch(x, policy, gen)
    results["augment_images_per_s"] = 3 * 512 / (time.perf_counter() - started)
    results["train_images_per_s_fp32"] = _train_rate(shape, args.batch, args.steps, False)
    results["train_images_per_s_channels_last"] = _train_rate(shape, args.batch, args.steps, True)
    results["torch_threads"] = torch.get_num_threads()
    for name, value in results.items():
        print(f"{name:36s} {value:>10,.0f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
