"""Architectures, their cut points and the one interface that cuts them."""

from __future__ import annotations

from stitching.errors import StitchingError
from stitching.models.cutting import (
    Context,
    Cut,
    CutPoint,
    CuttableModel,
    Head,
    Tail,
    cut,
    cut_point_activations,
    cut_point_names,
    resolve_layer,
    split,
)
from stitching.models.inputs import ImageInputs, InputTransform
from stitching.models.layout import Layout
from stitching.models.adapters import LIBRARIES, AdaptedModel, adapt, as_cuttable, cut_points, with_inputs
from stitching.models.anywhere import cut_at, cuttable, named_cut_points
from stitching.models.language import LANGUAGE_ARCHITECTURES, LanguageModel, build_language_model
from stitching.models.resnet import CifarResNet, resnet18, resnet18_nores, resnet34
from stitching.models.vit import CuttableViT, vit_tiny

ARCHITECTURES = {"resnet18": resnet18, "resnet34": resnet34, "resnet18_nores": resnet18_nores,
                 "vit_tiny": vit_tiny}
#: architectures whose depth is a knob (the ResNets' depth is their name)
DEPTH_KNOB = {"vit_tiny"}


def is_transformer(model: CuttableModel) -> bool:
    """Whether the network's activations are token sequences (it trains with the transformer recipe);
    a library model with no cut points of its own is one when it embeds patches."""
    if not model.cut_points:
        return hasattr(getattr(model, "model", model), "patch_embed")
    return model.cut_points[0].layout.kind == "tokens"


def build_model(arch: str, num_classes: int | None = None, width: int | None = 64, depth: int | None = None,
                image_size: int | None = None, name: str | None = None, **kwargs) -> CuttableModel:
    """Instantiate a cuttable network with random weights.

    ``arch`` is a built-in architecture (see :data:`ARCHITECTURES`) or a library
    (``timm``, ``torchvision``) with the library's model ``name``. ``depth`` applies to the
    built-in ViT only; ``image_size`` fixes a transformer's patch grid (convolutional
    networks read any size). ``in_channels``, ``mean`` and ``std`` describe the data.
    """
    if arch in LIBRARIES:
        return _library_model(arch, name, num_classes, image_size, **kwargs)
    if arch in LANGUAGE_ARCHITECTURES:
        return build_language_model(arch, width, depth, **kwargs)
    if arch not in ARCHITECTURES:
        raise StitchingError(
            f"unknown architecture '{arch}'; choose one of {', '.join(sorted([*ARCHITECTURES, *LANGUAGE_ARCHITECTURES]))}, "
            f"or {' / '.join(LIBRARIES)} with model.name"
        )
    width = 64 if width is None else width
    if width < 1:
        raise StitchingError(f"model width must be a positive integer, got {width}")
    if depth is not None:
        if arch not in DEPTH_KNOB:
            raise StitchingError(f"'{arch}' has a fixed depth; model.depth applies to {', '.join(sorted(DEPTH_KNOB))}")
        if depth < 1:
            raise StitchingError(f"model depth must be a positive integer, got {depth}")
        kwargs["depth"] = depth
    if arch.startswith("vit") and image_size is not None:
        if image_size % 4:
            raise StitchingError(f"a ViT with 4×4 patches needs an image size divisible by 4, got {image_size}")
        kwargs["image_size"] = image_size
    return ARCHITECTURES[arch](num_classes=num_classes, width=width, **kwargs)


def _library_model(library: str, name: str | None, num_classes: int, image_size: int | None,
                   in_channels: int = 3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> AdaptedModel:
    """A timm/torchvision model trained on our data: it reads the data's size and normalisation."""
    from stitching.models.adapters import create, library_model

    model = create(library, name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    fixed = hasattr(model, "patch_embed") or hasattr(model, "image_size")
    size = (image_size, image_size) if fixed and image_size else None
    return library_model(model, ImageInputs(in_channels, size, tuple(mean), tuple(std), origin="training data"),
                         name=name)


__all__ = [
    "ARCHITECTURES",
    "LANGUAGE_ARCHITECTURES",
    "LanguageModel",
    "build_language_model",
    "LIBRARIES",
    "AdaptedModel",
    "adapt",
    "as_cuttable",
    "cut_at",
    "cuttable",
    "named_cut_points",
    "with_inputs",
    "CifarResNet",
    "Context",
    "Cut",
    "CutPoint",
    "CuttableModel",
    "CuttableViT",
    "Head",
    "ImageInputs",
    "InputTransform",
    "Layout",
    "Tail",
    "build_model",
    "cut",
    "cut_point_activations",
    "cut_point_names",
    "cut_points",
    "is_transformer",
    "resolve_layer",
    "split",
]
