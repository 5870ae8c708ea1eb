"""The stitch layers and their closed-form direct-matching (DM) solution.

Which stitch joins two cut points follows from their declared layouts
(:mod:`stitching.models.layout`): a 1×1 convolution between conv maps, a linear map on
the embedding dimension applied to every token between token sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from stitching.models import layout as layouts
from stitching.models.layout import Layout


@torch.no_grad()
def _load_affine(layer: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy an ``[out, in]`` matrix and an ``[out]`` bias into a 1×1 convolution or a linear layer."""
    layer.weight.copy_(weight.reshape_as(layer.weight).to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))


class _AffineStitch(nn.Module):
    """Shared by both stitches: the affine layer's weights, resizing to the end's spatial size,
    the DM fit. Subclasses name their (shared) affine layer in ``affine``."""

    front_layout: Layout
    end_layout: Layout
    out_size: tuple[int, ...] | None

    @property
    def affine(self) -> nn.Conv2d | nn.Linear:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.affine.weight

    @property
    def channels(self) -> tuple[int, int]:
        """``(in, out)`` feature sizes of the map."""
        return self.affine.weight.shape[1], self.affine.weight.shape[0]

    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a ``[out, in]`` matrix and an ``[out]`` bias into the affine layer."""
        _load_affine(self.affine, weight, bias)

    def resize(self, a: torch.Tensor) -> torch.Tensor:
        return layouts.resize(a, self.front_layout, self.end_layout, self.out_size)

    @torch.no_grad()
    def initialise(self, kind: str) -> None:
        """Start from ``identity`` (the ``[out, in]`` identity, zero bias: the front's channels
        passed through, the peers' ``eye``) or ``random`` (PyTorch's default initialisation, the
        peers' ``rand``); ``dm`` is :meth:`fit`."""
        layers = [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for layer in layers:
            if kind == "identity":
                out, inp = layer.weight.shape[:2]
                _load_affine(layer, torch.eye(out, inp), torch.zeros(out))
            elif kind == "random":
                layer.reset_parameters()
            else:
                raise ValueError(f"unknown stitch initialisation '{kind}'")

    @torch.no_grad()
    def fit(self, front: torch.Tensor, end: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Least squares from resized front to end activations over every real position."""
        self.set_affine(*dm_solution(layouts.as_rows(front, self.front_layout, mask),
                                     layouts.as_rows(end, self.end_layout, mask)))


class Stitch(_AffineStitch):
    """A 1×1 convolution with bias, after bilinear resizing of the front map if needed.

    Args:
        in_channels: channels of the front model's activation at cut point i.
        out_channels: channels of the end model's activation at cut point j.
        out_size: the end map's spatial size ``(H, W)``; the front map is resized to it
            (bilinear, as in Balogh & Jelasity 2025) when the sizes differ.
    """

    def __init__(self, in_channels: int, out_channels: int, out_size: tuple[int, int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.out_size = tuple(out_size) if out_size is not None else None
        self.front_layout = self.end_layout = layouts.CONV

    @property
    def affine(self) -> nn.Conv2d:
        return self.conv

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.conv(self.resize(a))


class TokenStitch(_AffineStitch):
    """A linear map on the embedding dimension, with bias, applied to every token.

    Works for any sequence length. Between vision transformers whose patch grids differ,
    the front's patch tokens are resized bilinearly on their grid first (prefix tokens kept).

    Args:
        in_channels: the front model's embedding width at cut point i.
        out_channels: the end model's embedding width at cut point j.
        front_layout, end_layout: the two cut points' token layouts.
        separate_class_token: give the class token (position 0) its own affine map; DM
            then fits it on class tokens alone instead of as one row among all tokens.
    """

    def __init__(self, in_channels: int, out_channels: int, front_layout: Layout | None = None,
                 end_layout: Layout | None = None, separate_class_token: bool = False):
        super().__init__()
        self.front_layout = front_layout or Layout("tokens")
        self.end_layout = end_layout or self.front_layout
        self.out_size = tuple(self.end_layout.grid) if self.end_layout.grid is not None else None
        if separate_class_token and self.end_layout.prefix_tokens < 1:
            raise ValueError("stitch.class_token=separate needs a class token; this layout has no prefix tokens")
        self.linear = nn.Linear(in_channels, out_channels, bias=True)
        self.class_linear = nn.Linear(in_channels, out_channels, bias=True) if separate_class_token else None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = self.resize(a)
        if self.class_linear is None:
            return self.linear(a)
        return torch.cat([self.class_linear(a[:, :1]), self.linear(a[:, 1:])], dim=1)

    @property
    def affine(self) -> nn.Linear:
        return self.linear

    @torch.no_grad()
    def fit(self, front: torch.Tensor, end: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Least squares over every real token (with a separate class map: class tokens alone)."""
        if self.class_linear is None:
            super().fit(front, end, mask)
            return
        rest = mask[:, 1:] if mask is not None else None
        self.set_affine(*dm_solution(layouts.as_rows(front[:, 1:], self.front_layout, rest),
                                     layouts.as_rows(end[:, 1:], self.end_layout, rest)))
        _load_affine(self.class_linear, *dm_solution(front[:, 0], end[:, 0]))


def make_stitch(a_front: torch.Tensor, front_layout: Layout, a_end: torch.Tensor, end_layout: Layout,
                separate_class_token: bool = False) -> Stitch | TokenStitch:
    """The stitch joining activations like ``a_front`` (declared ``front_layout``) to ones like
    ``a_end``: a 1×1 convolution between conv maps, a token-wise linear map between token
    sequences (``separate_class_token``: its own map for the class token)."""
    problem = layouts.compatible(front_layout, end_layout)
    if problem:
        raise ValueError(problem)
    c_in, c_out = layouts.channels(a_front, front_layout), layouts.channels(a_end, end_layout)
    if front_layout.kind == "conv":
        if separate_class_token:
            raise ValueError("stitch.class_token=separate applies to ViTs; convolutional maps have no class token")
        return Stitch(c_in, c_out, layouts.target_size(a_end, end_layout))
    return TokenStitch(c_in, c_out, front_layout, end_layout, separate_class_token)


def dm_solution(front: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map from front to end rows, by the pseudo-inverse, in float64.

    Args:
        front: ``[rows, C_in]`` — every spatial position (or real token) of every sample.
        end: ``[rows, C_out]``, the matching rows of the end model.

    Returns:
        ``(weight [C_out, C_in], bias [C_out])`` minimising ``Σ_r ‖W x_r + b − y_r‖²``, in
        ``front``'s dtype.
    """
    x, y = front.double(), end.double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    solution = torch.linalg.pinv(x1) @ y  # [C_in + 1, C_out]
    return solution[:-1].T.to(front.dtype), solution[-1].to(front.dtype)


def batches(inputs, size: int):
    """Split a batch of inputs (a tensor, or a dict of tensors sharing the first dimension)."""
    if isinstance(inputs, dict):
        count = len(next(iter(inputs.values())))
        return [{k: v[s:s + size] for k, v in inputs.items()} for s in range(0, count, size)]
    return list(inputs.split(size))


def to_device(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


@torch.no_grad()
def fit_dm(stitch: Stitch | TokenStitch, front_head: nn.Module, end_head: nn.Module, inputs,
           batch_size: int = 100) -> None:
    """Initialise ``stitch`` with the DM solution on ``inputs`` (both heads in eval mode).

    ``front_head``/``end_head`` return ``(activation, context)``; padded tokens (the end
    context's attention mask) are left out of the least squares.
    """
    modes = [m.training for m in (front_head, end_head)]
    front_head.eval()
    end_head.eval()
    device = stitch.weight.device
    fronts, ends, masks = [], [], []
    for chunk in batches(inputs, batch_size):
        chunk = to_device(chunk, device)
        a_front, _ = front_head(chunk)
        a_end, context = end_head(chunk)
        fronts.append(stitch.resize(a_front).float())
        ends.append(a_end.float())
        masks.append(context.attention_mask)
    mask = None if masks[0] is None else torch.cat(masks)
    stitch.fit(torch.cat(fronts), torch.cat(ends), mask)
    for module, mode in zip((front_head, end_head), modes):
        module.train(mode)
