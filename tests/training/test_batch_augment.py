"""Per-batch image augmentation in torch: each transform checked on real tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubetrain.core.errors import KubetrainError
from kubetrain.training.batch_augment import (
    AugmentPolicy,
    augment_batch,
    mix,
    policy_for,
    preview,
)

OFF = dict(
    crop_min_area=1.0,
    flip_horizontal=False,
    flip_vertical=False,
    max_rotation=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
)


def batch(n: int = 16, c: int = 3, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_everything_off_is_the_identity():
    x = batch()
    torch.testing.assert_close(augment_batch(x, AugmentPolicy(**OFF), gen()), x)


def test_flips_mirror_exactly():
    x = batch()
    out = augment_batch(x, AugmentPolicy(**{**OFF, "flip_horizontal": True}), gen())
    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x, strict=True)]
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 0 < sum(flipped) < len(x)  # about half, not none or all


def test_crop_and_rotation_pad_with_the_mean_and_keep_shape():
    x = torch.full((8, 3, 10, 14), 2.5)
    policy = AugmentPolicy(**{**OFF, "crop_min_area": 0.2, "max_rotation": 40.0})
    out = augment_batch(x, policy, gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x)  # a flat image stays flat: no black corners
    y = augment_batch(batch(h=10, w=14), policy, gen())
    assert torch.isfinite(y).all() and not torch.allclose(y, batch(h=10, w=14))


def test_seeded_and_fresh_per_call():
    x, policy = batch(), AugmentPolicy(cutout=0.3, max_rotation=15.0)
    torch.testing.assert_close(augment_batch(x, policy, gen(1)), augment_batch(x, policy, gen(1)))
    g = gen(1)
    assert not torch.allclose(augment_batch(x, policy, g), augment_batch(x, policy, g))


def test_colour_jitter_is_bounded():
    x = batch(n=64)
    out = augment_batch(x, AugmentPolicy(**{**OFF, "brightness": 0.2}), gen())
    shift = (out - x).mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.2 + 1e-5 and shift.std() > 0.05
    grey = batch(c=1)
    out = augment_batch(grey, AugmentPolicy(**{**OFF, "saturation": 0.5}), gen())
    torch.testing.assert_close(out, grey)  # saturation needs colour


def test_cutout_erases_about_its_share():
    x = batch(n=256, h=20, w=20)
    out = augment_batch(x, AugmentPolicy(**{**OFF, "cutout": 0.5}), gen())
    erased = (out != x).float().mean().item()
    # a 10x10 square centred anywhere: 25% of the image when inside, less at the borders
    assert 0.1 < erased < 0.25


def test_mixup_and_cutmix_give_soft_targets_that_train():
    x, y = batch(n=32), torch.arange(32) % 4
    plain_x, plain_t = mix(x, y, 4, AugmentPolicy(), gen())
    assert plain_x is x and torch.equal(plain_t, F.one_hot(y, 4).float())
    for policy in (AugmentPolicy(mixup_alpha=0.4), AugmentPolicy(cutmix_alpha=1.0)):
        mixed, target = mix(x, y, 4, policy, gen(3))
        assert mixed.shape == x.shape
        torch.testing.assert_close(target.sum(1), torch.ones(32))
        assert (target.max(1).values < 1).any()
        logits = torch.zeros(32, 4, requires_grad=True)
        F.cross_entropy(logits, target).backward()  # probabilities as targets
        assert torch.isfinite(logits.grad).all()
    y = torch.arange(32)  # every partner of another class: its weight is exactly 1 - kept
    mixed, target = mix(x, y, 32, AugmentPolicy(cutmix_alpha=1.0), gen(3))
    kept = (mixed == x).float().mean(dim=(1, 2, 3))  # each image keeps 1 - box share
    own = target[torch.arange(32), y]
    changed = kept < 1
    torch.testing.assert_close(kept[changed], own[changed], atol=1e-5, rtol=0)


def test_mix_takes_its_scalars_from_a_host_generator():
    """On a GPU the loop passes a CPU generator for the weight and box: drawing them from
    the device generator would sync with the host every step."""
    x, y, policy = batch(n=32), torch.arange(32) % 4, AugmentPolicy(cutmix_alpha=1.0)
    first = mix(x, y, 4, policy, gen(3), host=gen(9))
    again = mix(x, y, 4, policy, gen(3), host=gen(9))
    other = mix(x, y, 4, policy, gen(3), host=gen(10))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first[0], other[0])  # another box: the scalars came from `host`


def test_preview_rows_for_the_report():
    x = batch(n=4, c=1, h=8, w=8)
    rows = preview(x.reshape(4, -1).numpy(), [0, 1, 2, 3], [1, 8, 8],
                   AugmentPolicy(mixup_alpha=0.4), seed=0, classes=4)  # fmt: skip
    assert [t for t, _ in rows] == [
        "original",
        "augmented 1",
        "augmented 2",
        "augmented 3",
        "mixed",
    ]
    assert all(r.shape == (4, 1, 8, 8) for _, r in rows)
    torch.testing.assert_close(torch.as_tensor(rows[0][1]), x)


def test_defaults_by_shape_and_bad_policies():
    assert not policy_for([1, 8, 8]).flip_horizontal  # digits keep their orientation
    assert policy_for([3, 32, 32]).flip_horizontal
    with pytest.raises(KubetrainError, match="cutout"):
        AugmentPolicy(cutout=1.5)
    with pytest.raises(KubetrainError, match="crop_min_area"):
        AugmentPolicy(crop_min_area=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu():
    x = batch(n=512, h=32, w=32).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment_batch(x, AugmentPolicy(cutout=0.25, max_rotation=10.0), g)
    mixed, target = mix(out, torch.zeros(512, dtype=torch.long, device="cuda"), 10,
                        AugmentPolicy(cutmix_alpha=1.0), g)  # fmt: skip
    assert mixed.is_cuda and target.is_cuda
