"""The model contract: every network ``stitching`` can cut, and the one interface that cuts it.

A cuttable network (:class:`CuttableModel`) runs as a flat sequence of ``blocks``, the
last producing the output. It declares its **cut points** (1-based index, name, the
position in ``blocks`` whose output is the activation, and the activation's
:class:`~stitching.models.layout.Layout`) and runs in two parts::

    head(inputs) -> (activation, context)
    tail(activation, context, return_features=False) -> output | (output, [later activations])

The :class:`Context` carries what later blocks need besides the activation (attention
mask, position ids, model-specific tables), so a transformer that needs them cuts like a
ResNet. ``tail(*head(x)) == model(x)`` exactly, at every cut point of every adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stitching.errors import StitchingError
from stitching.models.layout import Layout


@dataclass
class Context:
    """What a cut network's later blocks need besides the activation.

    ``attention_mask`` ``[N, T]`` (1 = real token) and ``position_ids`` are facts of the
    inputs, shared by any two models that read the same inputs; ``extras`` holds
    model-specific tables (rotary embeddings, …) keyed by the model that made them.
    """

    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CutPoint:
    """One place a network can be cut: after ``blocks[position]``."""

    index: int  # 1-based, as in the papers
    name: str
    position: int
    layout: Layout


class CuttableModel(nn.Module):
    """Base class of every cuttable network (built-in or an adapter around another library's).

    Subclasses set ``blocks`` (a sequence of callables; the last one returns the output),
    ``cut_points`` (a tuple of :class:`CutPoint`), ``num_classes`` and ``input_spec``; they
    override :meth:`context`, :meth:`embed` and :meth:`run_block` when their blocks need more
    than the activation.
    """

    blocks: Any
    cut_points: tuple[CutPoint, ...] = ()
    num_classes: int | None = None
    input_spec: Any = None

    def context(self, inputs) -> Context:
        """The context of these inputs (default: nothing beyond the activation)."""
        return Context()

    def embed(self, inputs, context: Context) -> torch.Tensor:
        """Inputs → what ``blocks[0]`` reads (default: the inputs themselves)."""
        return inputs

    def run_block(self, position: int, x: torch.Tensor, context: Context) -> torch.Tensor:
        return self.blocks[position](x)

    def forward(self, inputs):
        context = self.context(inputs)
        x = self.embed(inputs, context)
        for position in range(len(self.blocks)):
            x = self.run_block(position, x, context)
        return x


def cut_point_names(model: CuttableModel) -> list[str]:
    return [point.name for point in model.cut_points]


def resolve_layer(model: CuttableModel, layer: int | str) -> int:
    """Return the 1-based cut-point index for ``layer`` (an index or a cut-point name)."""
    names = cut_point_names(model)
    if isinstance(layer, str):
        layer = getattr(model, "aliases", {}).get(layer, layer)  # another name of a cut point
    if isinstance(layer, str) and layer in names:  # a name first, even one that reads as a number ("3")
        return names.index(layer) + 1
    if not names:
        raise StitchingError(f"{getattr(model, 'name', type(model).__name__)} has no numbered cut points: give the "
                             f"layer as a module name (stitching.models.named_cut_points lists them; on the "
                             f"command line, stitch.front_layer=NAME, and a sweep over names for a grid)")
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        raise StitchingError(f"unknown layer '{layer}'; this model's cut points are {_listing(names)}")
    index = int(layer)
    if not 1 <= index <= len(names):
        raise StitchingError(
            f"layer {index} is out of range: this model has cut points 1..{len(names)} ({_listing(names)})"
        )
    return index


def _listing(names: list[str]) -> str:
    if len(names) > 30:
        shown = [f"{i}={n}" for i, n in enumerate(names[:12], 1)]
        return ", ".join(shown) + f", … {len(names)}={names[-1]}"
    return ", ".join(f"{i}={n}" for i, n in enumerate(names, 1))


class Head(nn.Module):
    """Inputs → ``(activation at one cut point, context)``."""

    def __init__(self, model: CuttableModel, point: CutPoint):
        super().__init__()
        self.model = model
        self.point = point

    def forward(self, inputs) -> tuple[torch.Tensor, Context]:
        context = self.model.context(inputs)
        x = self.model.embed(inputs, context)
        for position in range(self.point.position + 1):
            x = self.model.run_block(position, x, context)
        return x, context


class Tail(nn.Module):
    """``(activation at one cut point, context)`` → output, exposing every later cut point.

    ``forward(a, context, return_features=True)`` returns ``(output, [activations of the
    later cut points])``.
    """

    def __init__(self, model: CuttableModel, point: CutPoint):
        super().__init__()
        self.model = model
        self.point = point
        self.feature_positions = [p.position for p in model.cut_points if p.index > point.index]

    def context(self, inputs) -> Context:
        """The context this tail's blocks need for ``inputs`` (the end model's own)."""
        return self.model.context(inputs)

    def forward(self, a: torch.Tensor, context: Context | None = None, return_features: bool = False):
        context = context if context is not None else Context()
        features = []
        wanted = set(self.feature_positions)
        for position in range(self.point.position + 1, len(self.model.blocks)):
            a = self.model.run_block(position, a, context)
            if position in wanted:
                features.append(a)
        return (a, features) if return_features else a


@dataclass
class Cut:
    """A network cut at one point, made once per run: index, name, layout, head and tail."""

    model: CuttableModel
    point: CutPoint
    head: Head
    tail: Tail

    @property
    def index(self) -> int:
        return self.point.index

    @property
    def name(self) -> str:
        return self.point.name

    @property
    def layout(self) -> Layout:
        return self.point.layout

    @property
    def later_layouts(self) -> list[Layout]:
        return [p.layout for p in self.model.cut_points if p.index > self.point.index]


def cut(model: CuttableModel, layer: int | str) -> Cut:
    """Cut ``model`` after cut point ``layer`` (an index or a name); head and tail share its modules."""
    point = model.cut_points[resolve_layer(model, layer) - 1]
    return Cut(model, point, Head(model, point), Tail(model, point))


def split(model: CuttableModel, layer: int | str) -> tuple[Head, Tail]:
    """``(head, tail)`` of ``model`` cut after ``layer``; ``tail(*head(x))`` equals ``model(x)``."""
    c = cut(model, layer)
    return c.head, c.tail


def cut_point_activations(model: CuttableModel, inputs, upto: int | None = None) -> tuple[torch.Tensor | None, list]:
    """Run ``model`` once; return its output and the activation at every cut point.

    With ``upto`` (a 1-based cut point) the pass stops there: the activations of cut
    points ``1..upto`` come back and the output is ``None``.
    """
    positions = {p.position for p in model.cut_points}
    stop = model.cut_points[upto - 1].position if upto is not None else None
    context = model.context(inputs)
    x = model.embed(inputs, context)
    activations = []
    for position in range(len(model.blocks)):
        x = model.run_block(position, x, context)
        if position in positions:
            activations.append(x)
        if position == stop:
            return None, activations
    return x, activations
