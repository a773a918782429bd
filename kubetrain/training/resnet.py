"""A ResNet family in plain torch, for images larger than digits.

torchvision is not used: its wheel forces a multi-GB CUDA build of torch on
these machines, and the CIFAR-style networks small images need are a few
dozen lines. The shape follows He et al. 2016 ("Deep Residual Learning",
section 4.2, the CIFAR variant): a 3x3 stem, then stages of basic blocks (two
3x3 convolutions with BatchNorm and an identity or 1x1 projection shortcut),
each stage halving the resolution and doubling the channels, global average
pooling and one linear layer. ``depth`` counts blocks per stage (ResNet-20 is 3
stages of 3 blocks), ``width`` the first stage's channels.

`ResNetShape.for_image` picks a default by image size, sized for a CPU to
train it in minutes at 32x32 and for a GPU to be worth its time at 64+:

==========  ======  =====  =====  ====================================
image side  stages  depth  width  notes
==========  ======  =====  =====  ====================================
< 16        -       -      -      the small CNN (`models.SmallCNN`)
16..47      3       1      32     ResNet-8, 0.3M params, ~50M MACs
48..111     4       1      32     a stride-2 stem first
>= 112      4       2      64     ResNet-18-like, stride-4 stem
==========  ======  =====  =====  ====================================

Like every network here it takes the flat ``(n, features)`` batch and
reshapes it, so training, evaluation and ONNX export need nothing new.
`load_initial_weights` starts a network from a user's state dict (local or
``s3://``), read with ``torch.load(weights_only=True)``: a crafted pickle cannot
run code.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetrain.core.errors import KubetrainError

#: Images whose shorter side is below this get the small CNN: a ResNet's downsampling
#: stages have nothing left to work on at 8x8.
MIN_SIDE = 16


@dataclass(frozen=True)
class ResNetShape:
    """The sizes of a `ResNet`; stored in the model spec so a bundle rebuilds exactly."""

    stages: int = 3
    depth: int = 1  # basic blocks per stage
    width: int = 32  # channels of the first stage (doubled per stage)
    stem_stride: int = 1  # 2 or 4 for big images: the stages then run at lower resolution

    @classmethod
    def for_image(cls, height: int, width: int, depth: int = 0, channels: int = 0) -> ResNetShape:
        """The default for an image size; `depth` / `channels` (if > 0) override it."""
        side = min(height, width)
        if side >= 112:
            shape = cls(stages=4, depth=2, width=64, stem_stride=4)
        elif side >= 48:
            shape = cls(stages=4, depth=1, width=32, stem_stride=2)
        else:
            shape = cls()
        return cls(shape.stages, depth or shape.depth, channels or shape.width, shape.stem_stride)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BasicBlock(nn.Module):
    """``relu(x' + bn(conv(relu(bn(conv(x))))))``, x' the input or its 1x1 projection
    when the stride or channel count changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (Goyal et al. 2017)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, ``stages`` stages of ``depth`` basic blocks, average pool, dropout, linear."""

    def __init__(
        self,
        image_shape: list[int] | tuple[int, int, int],
        num_classes: int,
        shape: ResNetShape,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels, height, width = image_shape
        self.shape = (channels, height, width)
        stem: list[nn.Module] = [
            nn.Conv2d(channels, shape.width, 3, min(shape.stem_stride, 2), 1, bias=False),
            nn.BatchNorm2d(shape.width),
            nn.ReLU(inplace=True),
        ]
        if shape.stem_stride == 4:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        cin = shape.width
        for stage in range(shape.stages):
            cout = shape.width * 2**stage
            for i in range(shape.depth):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.reshape(-1, *self.shape))))


def load_initial_weights(model: nn.Module, uri: str) -> nn.Module:
    """Start `model` from the state dict at `uri` (a local path or ``s3://`` URI).

    The file is a plain state dict (``torch.save(model.state_dict(), f)``) or a
    kubetrain bundle's ``weights.pt``. Loaded with ``weights_only=True``, so a
    file holding code is refused rather than run. Tensors whose shape differs
    (a classifier head for another number of classes) are left at their
    initial values and named; a file that matches nothing is an error.
    """
    try:
        if uri.startswith("s3://"):
            from kubetrain.core import storage

            data: Any = io.BytesIO(storage.read_bytes(uri))
        else:
            path = Path(uri)
            if not path.is_file():
                raise KubetrainError(
                    f"initial weights {uri} not found; pass a local file or s3:// URI"
                )
            data = path
        state = torch.load(data, map_location="cpu", weights_only=True)
    except KubetrainError:
        raise
    except Exception as exc:  # pickle/zip/torch errors: all mean "not a safe state dict"
        raise KubetrainError(
            f"cannot load initial weights {uri}: {str(exc).strip().splitlines()[0][:200]}; "
            "save them with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KubetrainError(
            f"initial weights {uri} are not a state dict of tensors; save them with "
            "torch.save(model.state_dict(), path)"
        )
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise KubetrainError(
            f"initial weights {uri} match none of the network's {len(own)} tensors "
            f"(first in file: {next(iter(state), 'none')!r}, first expected: "
            f"{next(iter(own))!r}); were they saved from the same architecture and size?"
        )
    model.load_state_dict(fitting, strict=False)
    left = [k for k in own if k not in fitting]
    if left:
        from kubetrain.core import progress

        progress.log(
            "train",
            f"initial weights {uri}: {len(fitting)} of {len(own)} tensors loaded; "
            f"{len(left)} kept at their initial values (first: {left[0]})",
        )
    return model


#: The model names (``--model``): ``resnet`` takes the depth `ResNetShape.for_image`
#: picks; ``resnetN`` fixes it as in He et al.'s CIFAR networks (N = 6 x depth + 2).
RESNET_DEPTHS = {"resnet": 0, "resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5}


def resnet_shape(arch: str, image_shape: list[int] | None) -> dict[str, Any]:
    """The `ResNetShape` (as a dict, for `ModelSpec.resnet`) of model name `arch`."""
    if arch not in RESNET_DEPTHS:
        raise KubetrainError(f"model={arch} unknown; use one of {', '.join(RESNET_DEPTHS)}")
    _, height, width = image_shape or (1, 0, 0)
    return ResNetShape.for_image(height, width, depth=RESNET_DEPTHS[arch]).to_dict()
