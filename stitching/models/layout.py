"""What an activation at a cut point looks like, and the operations that depend on it.

Every cut point declares a :class:`Layout`; the stitch, DM, pooling, similarity
flattening and the losses call the functions here, which dispatch on the layout — never
on a tensor's rank.

* ``conv``: ``[N, C, H, W]``; every spatial position is a sample of a C-dim feature.
* ``tokens``: ``[N, T, D]``; the first ``prefix_tokens`` tokens are class/register
  tokens, the rest are patches on a ``grid`` (vision) or a sequence (text, where an
  attention mask ``[N, T]`` marks the real positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

KINDS = ("conv", "tokens")
POOLS = ("mean", "first", "last")


@dataclass(frozen=True)
class Layout:
    """How to read an activation.

    Args:
        kind: ``conv`` or ``tokens``.
        prefix_tokens: class and register tokens before the patch/sequence tokens.
        grid: ``(rows, columns)`` of the patch tokens of a vision transformer (``None``
            for text and conv maps).
        pool: one vector per input: ``mean`` (spatial mean, mean of the non-prefix real
            tokens), ``first`` (the class token) or ``last`` (the last real token).
    """

    kind: str
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    pool: str = "mean"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown layout kind '{self.kind}'; one of {', '.join(KINDS)}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pooling '{self.pool}'; one of {', '.join(POOLS)}")

    def describe(self) -> str:
        if self.kind == "conv":
            return "conv map [N, C, H, W]"
        extra = [f"{self.prefix_tokens} prefix"] if self.prefix_tokens else []
        if self.grid:
            extra.append(f"{self.grid[0]}×{self.grid[1]} patches")
        return "tokens [N, T, D]" + (f" ({', '.join(extra)})" if extra else "")


CONV = Layout("conv")


def channels(a: torch.Tensor, layout: Layout) -> int:
    """The feature dimension a stitch maps: C of a conv map, D of a token sequence."""
    return a.shape[1] if layout.kind == "conv" else a.shape[-1]


def as_rows(a: torch.Tensor, layout: Layout, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (or tokens) as samples: ``[rows, channels]``; masked tokens left out."""
    if layout.kind == "conv":
        return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    if mask is not None:
        return a[mask.bool()]
    return a.reshape(-1, a.shape[-1])


def pooled(a: torch.Tensor, layout: Layout, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per input ``[N, channels]``, as the layout's ``pool`` says."""
    if layout.kind == "conv":
        return a.mean(dim=(2, 3))
    if layout.pool == "first":
        return a[:, 0]
    body = a[:, layout.prefix_tokens:]
    if mask is None:
        return body.mean(1) if layout.pool == "mean" else body[:, -1]
    real = mask[:, layout.prefix_tokens:].to(a.dtype)
    if layout.pool == "last":
        last = (real.cumsum(1) * real).argmax(1)
        return body[torch.arange(len(a), device=a.device), last]
    return (body * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)


def per_sample(a: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Every feature of an input in one row ``[N, features]`` (fixed-size layouts only)."""
    return a.reshape(len(a), -1)


def masked(a: torch.Tensor, layout: Layout, mask: torch.Tensor | None) -> torch.Tensor:
    """``a`` with padded token positions zeroed (unchanged without a mask or for conv maps)."""
    if mask is None or layout.kind == "conv":
        return a
    return a * mask[..., None].to(a.dtype)


def compatible(front: Layout, end: Layout) -> str | None:
    """``None`` if a stitch can join the layouts, else why not (one line)."""
    if front.kind != end.kind:
        return (f"cannot stitch a {front.describe()} to a {end.describe()}: front and end must both be "
                f"convolutional or both be transformers")
    if front.kind == "tokens" and front.prefix_tokens != end.prefix_tokens:
        return (f"the front's activation has {front.prefix_tokens} prefix (class/register) token(s) but the "
                f"end's has {end.prefix_tokens}; stitch transformers with the same prefix tokens")
    if front.kind == "tokens" and (front.grid is None) != (end.grid is None):
        return "cannot stitch a vision transformer's patch tokens to a text sequence"
    return None


def resize(a: torch.Tensor, front: Layout, end: Layout, size: tuple[int, ...] | None) -> torch.Tensor:
    """Bring a front activation to the end's spatial size: bilinear for conv maps and for the
    patch grid of vision tokens (prefix tokens kept); text sequences are never resized."""
    if size is None:
        return a
    if front.kind == "conv":
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False)
        return a
    if front.grid is None or tuple(front.grid) == tuple(size):
        return a
    prefix, body = a[:, : front.prefix_tokens], a[:, front.prefix_tokens:]
    rows, cols = front.grid
    grid = body.transpose(1, 2).reshape(len(a), -1, rows, cols)
    grid = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


def target_size(a_end: torch.Tensor, end: Layout) -> tuple[int, ...] | None:
    """The spatial size a front activation must be resized to (``None``: nothing to match)."""
    if end.kind == "conv":
        return tuple(a_end.shape[-2:])
    return tuple(end.grid) if end.grid is not None else None
