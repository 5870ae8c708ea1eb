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

ARCHITECTURES = {"resnet18": resnet18, "resnet34": resnet34, "resnet18_nores": resnet18_nores}


def build_model(arch: str, num_classes: int, width: int = 64, **kwargs) -> nn.Module:
    """Instantiate a cuttable network by name (see :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise StitchingError(
            f"unknown architecture '{arch}'; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    if width < 1:
        raise StitchingError(f"model width must be a positive integer, got {width}")
    return ARCHITECTURES[arch](num_classes=num_classes, width=width, **kwargs)


__all__ = [
    "ARCHITECTURES",
    "CifarResNet",
    "build_model",
    "cut_point_activations",
    "cut_point_names",
    "resolve_layer",
    "split",
]
