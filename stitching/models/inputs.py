"""What a model reads, and how the stitching data are brought to it.

Every image model takes images in [0, 1] at the data's own resolution; the model's
:class:`InputTransform` resizes them to its input size, repeats a grey channel when it
reads colour, and normalises with its own mean and std. Two models with different input
conventions thus read the same batch, and ``results.json`` records what was done.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stitching.errors import StitchingError


@dataclass(frozen=True)
class ImageInputs:
    """An image model's input convention.

    Args:
        channels: colour channels the first layer reads.
        size: ``(height, width)`` the model expects, or ``None`` for any size.
        mean: per-channel mean subtracted from images in [0, 1].
        std: per-channel standard deviation they are divided by.
        origin: where these settings come from (``training data``, ``pretrained config``…).
    """

    channels: int
    size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str = "training data"

    def reconcile(self, data_channels: int, data_size: tuple[int, int], side: str = "model") -> dict:
        """How data of ``data_channels × data_size`` reach this model, or a one-line error."""
        if data_channels not in (self.channels, 1):
            raise StitchingError(
                f"the {side} model reads {self.channels}-channel images but the stitching data have "
                f"{data_channels} channels; use data and models with the same channels")
        size = tuple(self.size) if self.size is not None else tuple(data_size)
        return {"data": [data_channels, *data_size], "model": [self.channels, *size],
                "resized": size != tuple(data_size), "grey_repeated": data_channels != self.channels,
                "mean": list(self.mean), "std": list(self.std), "from": self.origin}

    def record(self) -> dict:
        return asdict(self)


class InputTransform(nn.Module):
    """Images in [0, 1] → the model's input: resize (bilinear, antialiased), grey → colour, normalise."""

    def __init__(self, spec: ImageInputs):
        super().__init__()
        self.size = tuple(spec.size) if spec.size is not None else None
        self.channels = spec.channels
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std


def near_chance(side: str, accuracy: float, classes: int, inputs: dict | None) -> str | None:
    """A warning when a given classifier scores near chance on data of its own classes: most
    often its input convention is not the one it was trained with."""
    if accuracy > 1.5 / classes:
        return None
    how = ""
    if inputs and "model" in inputs:
        how = (f" it was given {'×'.join(map(str, inputs['data']))} images as {'×'.join(map(str, inputs['model']))}, "
               f"mean {[round(v, 4) for v in inputs['mean']]} std {[round(v, 4) for v in inputs['std']]} "
               f"({inputs['from']});")
    return (f"[inputs] warning: the {side} model scores {accuracy:.1%} on the stitching data, near chance for "
            f"{classes} classes:{how} if it was trained at another size or normalisation, set {side}.input.* "
            f"(stitch(..., {side}_inputs=...)) to it")
