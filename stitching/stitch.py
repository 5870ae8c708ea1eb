"""The stitch layer and its closed-form direct-matching (DM) solution."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def positions_as_samples(activation: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` (conv map) or ``[N, T, D]`` (tokens) → ``[N·positions, channels]``."""
    if activation.dim() == 4:
        return activation.permute(0, 2, 3, 1).reshape(-1, activation.shape[1])
    if activation.dim() == 3:
        return activation.reshape(-1, activation.shape[-1])
    if activation.dim() == 2:
        return activation
    raise ValueError(f"cannot stitch activations of shape {tuple(activation.shape)}")


@torch.no_grad()
def _load_affine(layer: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy an ``[out, in]`` matrix and an ``[out]`` bias into a 1×1 convolution or a linear layer."""
    layer.weight.copy_(weight.reshape_as(layer.weight).to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))


class Stitch(nn.Module):
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

    def resize(self, a: torch.Tensor) -> torch.Tensor:
        if self.out_size is not None and tuple(a.shape[-2:]) != self.out_size:
            a = F.interpolate(a, size=self.out_size, mode="bilinear", align_corners=False)
        return a

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.conv(self.resize(a))

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def channels(self) -> tuple[int, int]:
        return self.conv.in_channels, self.conv.out_channels

    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a ``[out, in]`` matrix and an ``[out]`` bias into the 1×1 convolution."""
        _load_affine(self.conv, weight, bias)


class TokenStitch(nn.Module):
    """A linear map on the embedding dimension, with bias, applied to every token.

    Args:
        in_channels: the front model's embedding width at cut point i.
        out_channels: the end model's embedding width at cut point j.
        tokens: the end model's token count; the front's must match (same patch grid).
        separate_class_token: give the class token (position 0) its own affine map; DM
            then fits it on class tokens alone instead of as 1 of every ``tokens`` rows.
    """

    def __init__(self, in_channels: int, out_channels: int, tokens: int | None = None,
                 separate_class_token: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=True)
        self.class_linear = nn.Linear(in_channels, out_channels, bias=True) if separate_class_token else None
        self.out_size = (int(tokens),) if tokens is not None else None

    def resize(self, a: torch.Tensor) -> torch.Tensor:
        if self.out_size is not None and a.shape[1] != self.out_size[0]:
            raise ValueError(f"the front model has {a.shape[1]} tokens but the end model {self.out_size[0]}; "
                             f"stitch ViTs with the same patch grid")
        return a

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = self.resize(a)
        if self.class_linear is None:
            return self.linear(a)
        return torch.cat([self.class_linear(a[:, :1]), self.linear(a[:, 1:])], dim=1)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def channels(self) -> tuple[int, int]:
        return self.linear.in_features, self.linear.out_features

    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        _load_affine(self.linear, weight, bias)

    @torch.no_grad()
    def fit(self, front: torch.Tensor, end: torch.Tensor) -> None:
        """Least squares over every token (and, with a separate class map, over class tokens alone)."""
        if self.class_linear is None:
            self.set_affine(*dm_solution(front, end))
            return
        self.set_affine(*dm_solution(front[:, 1:], end[:, 1:]))
        _load_affine(self.class_linear, *dm_solution(front[:, 0], end[:, 0]))


def make_stitch(a_front: torch.Tensor, a_end: torch.Tensor, separate_class_token: bool = False) -> nn.Module:
    """The stitch joining activations shaped like ``a_front`` to ones shaped like ``a_end``:
    a 1×1 convolution between conv maps, a token-wise linear map between token sequences
    (``separate_class_token``: its own map for the class token; token sequences only)."""
    if a_front.dim() == 4 and a_end.dim() == 4:
        if separate_class_token:
            raise ValueError("stitch.class_token=separate applies to ViTs; convolutional maps have no class token")
        return Stitch(a_front.shape[1], a_end.shape[1], tuple(a_end.shape[-2:]))
    if a_front.dim() == 3 and a_end.dim() == 3:
        return TokenStitch(a_front.shape[-1], a_end.shape[-1], a_end.shape[1], separate_class_token)
    kinds = {4: "a convolutional map", 3: "a token sequence"}
    raise ValueError(f"cannot stitch {kinds.get(a_front.dim(), tuple(a_front.shape))} to "
                     f"{kinds.get(a_end.dim(), tuple(a_end.shape))}; stitch two CNNs or two ViTs")


def dm_solution(front: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map from front to end activations, by the pseudo-inverse.

    Every spatial position (or token) of every sample is one equation, so the solution
    minimises ``Σ_n Σ_p ‖W a_{n,p} + b − t_{n,p}‖²``; computed in float64.

    Args:
        front: ``[N, C_in, H, W]`` front activations, already at the end map's size.
        end: ``[N, C_out, H, W]`` end activations.

    Returns:
        ``(weight [C_out, C_in], bias [C_out])`` in ``front``'s dtype.
    """
    x = positions_as_samples(front).double()
    y = positions_as_samples(end).double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    solution = torch.linalg.pinv(x1) @ y  # [C_in + 1, C_out]
    return solution[:-1].T.to(front.dtype), solution[-1].to(front.dtype)


@torch.no_grad()
def fit_dm(stitch: Stitch | TokenStitch, front_head: nn.Module, end_head: nn.Module, images: torch.Tensor, batch_size: int = 100) -> None:
    """Initialise ``stitch`` with the DM solution on ``images`` (both heads in eval mode)."""
    modes = [m.training for m in (front_head, end_head)]
    front_head.eval()
    end_head.eval()
    device = stitch.weight.device
    fronts, ends = [], []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        fronts.append(stitch.resize(front_head(chunk)).float())
        ends.append(end_head(chunk).float())
    if isinstance(stitch, TokenStitch):
        stitch.fit(torch.cat(fronts), torch.cat(ends))
    else:
        stitch.set_affine(*dm_solution(torch.cat(fronts), torch.cat(ends)))
    for module, mode in zip((front_head, end_head), modes):
        module.train(mode)
