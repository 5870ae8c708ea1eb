"""CIFAR-style ResNets (3×3 stem, no max-pool) with a width knob.

Every network here is *cuttable* (:class:`~stitching.models.cutting.CuttableModel`): it
runs as a flat sequence ``blocks`` (stem, every residual block, classifier head) and
declares the nine cut points of the FuLA paper, each a conv map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from stitching.models.cutting import CuttableModel, CutPoint
from stitching.models.inputs import ImageInputs
from stitching.models.layout import CONV


class Normalize(nn.Module):
    """Per-channel standardisation, kept inside the model so inputs stay in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Stem(nn.Module):
    """Normalisation, then 3×3 conv → BN → ReLU (no max-pool: inputs are 32×32)."""

    def __init__(self, in_channels: int, width: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(self.normalize(x))))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions; ``residual=False`` drops the skip connection entirely."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if residual and (stride != 1 or in_planes != planes):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class ClassifierHead(nn.Module):
    """Global average pool → linear classifier."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CifarResNet(CuttableModel):
    """ResNet for small images.

    Args:
        depths: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet18.
        num_classes: size of the classifier output.
        width: channels of the stem and first stage (64 in the paper); stages use
            width, 2·width, 4·width, 8·width.
        residual: ``False`` gives the plain network of the FuLA paper's appendix.
        mean, std: input normalisation applied inside the stem.

    Cut points (1-based, as in the paper): the stem's output, then the first and the last
    block of each stage — nine in all, for every depth.
    """

    def __init__(
        self,
        depths: Sequence[int],
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
        residual: bool = True,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ):
        super().__init__()
        blocks: list[nn.Module] = [Stem(in_channels, width, mean, std)]
        names = ["stem"]
        cut_points = [("stem", 0)]
        in_planes = width
        for stage, depth in enumerate(depths):
            planes = width * 2**stage
            for b in range(depth):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, residual))
                names.append(f"layer{stage + 1}.{b}")
                in_planes = planes
                if b == 0 or b == depth - 1:
                    cut_points.append((names[-1], len(blocks) - 1))
        blocks.append(ClassifierHead(in_planes, num_classes))
        names.append("head")
        self.blocks = nn.ModuleList(blocks)
        self.block_names = names
        self.cut_points = tuple(CutPoint(i, name, position, CONV) for i, (name, position) in enumerate(cut_points, 1))
        self.num_classes = num_classes
        self.input_spec = ImageInputs(channels=in_channels, size=None, mean=tuple(mean), std=tuple(std))


def resnet18(**kwargs) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), **kwargs)


def resnet18_nores(**kwargs) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), residual=False, **kwargs)
