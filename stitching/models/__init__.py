"""Architectures, their cut points and the one interface that cuts them."""

from __future__ import annotations

from torch import nn

from stitching.errors import StitchingError
from stitching.models.cutting import (
    cut_point_activations,
    cut_point_names,
    resolve_layer,
    split,
)
from stitching.models.resnet import CifarResNet, resnet18, resnet18_nores, resnet34
from stitching.models.vit import CuttableViT, vit_tiny

ARCHITECTURES = {"resnet18": resnet18, "resnet34": resnet34, "resnet18_nores": resnet18_nores,
                 "vit_tiny": vit_tiny}
#: architectures whose depth is a knob (the ResNets' depth is their name)
DEPTH_KNOB = {"vit_tiny"}


def is_transformer(arch: str) -> bool:
    return arch.startswith("vit")


def build_model(arch: str, num_classes: int, width: int = 64, depth: int | None = None,
                image_size: int | None = None, **kwargs) -> nn.Module:
    """Instantiate a cuttable network by name (see :data:`ARCHITECTURES`).

    ``depth`` applies to transformers only; ``image_size`` fixes a transformer's patch
    grid (convolutional networks read any size).
    """
    if arch not in ARCHITECTURES:
        raise StitchingError(
            f"unknown architecture '{arch}'; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    if width < 1:
        raise StitchingError(f"model width must be a positive integer, got {width}")
    if depth is not None:
        if arch not in DEPTH_KNOB:
            raise StitchingError(f"'{arch}' has a fixed depth; model.depth applies to {', '.join(sorted(DEPTH_KNOB))}")
        if depth < 1:
            raise StitchingError(f"model depth must be a positive integer, got {depth}")
        kwargs["depth"] = depth
    if is_transformer(arch) and image_size is not None:
        if image_size % 4:
            raise StitchingError(f"a ViT with 4×4 patches needs an image size divisible by 4, got {image_size}")
        kwargs["image_size"] = image_size
    return ARCHITECTURES[arch](num_classes=num_classes, width=width, **kwargs)


__all__ = [
    "ARCHITECTURES",
    "CifarResNet",
    "CuttableViT",
    "build_model",
    "cut_point_activations",
    "cut_point_names",
    "is_transformer",
    "resolve_layer",
    "split",
]
