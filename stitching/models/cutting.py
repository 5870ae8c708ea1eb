"""One cutting interface for every cuttable network: ``split(model, layer) -> (head, tail)``.

A cuttable network has ``blocks`` (an ``nn.ModuleList`` run in order, the last block
producing logits) and ``cut_points`` (a list of ``(name, block index)``). Cut points are
addressed 1-based, as in the papers, or by name.
"""

from __future__ import annotations

import torch
from torch import nn

from stitching.errors import StitchingError


def cut_point_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.cut_points]


def resolve_layer(model: nn.Module, layer: int | str) -> int:
    """Return the 1-based cut-point index for ``layer`` (an index or a cut-point name)."""
    names = cut_point_names(model)
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names, 1))
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        if layer in names:
            return names.index(layer) + 1
        raise StitchingError(f"unknown layer '{layer}'; this model's cut points are {listing}")
    index = int(layer)
    if not 1 <= index <= len(names):
        raise StitchingError(
            f"layer {index} is out of range: this model has cut points 1..{len(names)} ({listing})"
        )
    return index


class Head(nn.Module):
    """Input → activation at one cut point."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Tail(nn.Module):
    """Activation at one cut point → logits, exposing every later cut point on the way.

    ``feature_positions`` are positions within ``self.blocks`` whose outputs are cut
    points; ``forward(a, return_features=True)`` returns ``(logits, [those outputs])``.
    """

    def __init__(self, blocks: list[nn.Module], feature_positions: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.feature_positions = feature_positions

    def forward(self, a: torch.Tensor, return_features: bool = False):
        features = []
        wanted = set(self.feature_positions)
        for position, block in enumerate(self.blocks):
            a = block(a)
            if position in wanted:
                features.append(a)
        return (a, features) if return_features else a


def split(model: nn.Module, layer: int | str) -> tuple[Head, Tail]:
    """Cut ``model`` after cut point ``layer``; the parts share the model's modules.

    ``tail(head(x))`` equals ``model(x)``.
    """
    index = resolve_layer(model, layer)
    block_index = model.cut_points[index - 1][1]
    blocks = list(model.blocks)
    later = [b - block_index - 1 for _, b in model.cut_points[index:]]
    return Head(blocks[: block_index + 1]), Tail(blocks[block_index + 1 :], later)


def pooled(a: torch.Tensor) -> torch.Tensor:
    """One vector per input: spatial mean of a conv map, class token of a token sequence."""
    if a.dim() == 4:
        return a.mean(dim=(2, 3))
    if a.dim() == 3:
        return a[:, 0]
    return a.reshape(len(a), -1)


def cut_point_activations(model: nn.Module, x: torch.Tensor, upto: int | None = None) -> tuple[torch.Tensor | None, list]:
    """Run ``model`` once; return its logits and the activation at every cut point.

    With ``upto`` (a 1-based cut point) the pass stops there: the activations of cut
    points ``1..upto`` come back and the logits are ``None``.
    """
    positions = {b for _, b in model.cut_points}
    stop = model.cut_points[upto - 1][1] if upto is not None else None
    activations = []
    for position, block in enumerate(model.blocks):
        x = block(x)
        if position in positions:
            activations.append(x)
        if position == stop:
            return None, activations
    return x, activations
