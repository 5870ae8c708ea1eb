"""BatchNorm with separate statistics per group of a concatenated batch.

A fused grid runs the stitched activations of G stitches through one copy of an end model's
tail, interleaved along the batch (``[B·G, …]``, sample-major: row ``b·G + g`` is sample ``b``
through stitch ``g``; :func:`interleave`). Every BatchNorm of that copy must behave as G
separate BatchNorms — batch statistics of its own group in training, its own running
statistics updated and read — so each stitch trains exactly as in its own run.
:class:`GroupedBatchNorm2d` does that in one call: a sample-major batch *is* ``[B, G·C, H, W]``
(a view, no copy), so one ``batch_norm`` computes per-(group, channel) statistics.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GroupedBatchNorm2d(nn.Module):
    """``groups`` copies of ``bn``'s statistics over one shared (frozen) affine transform."""

    def __init__(self, bn: nn.BatchNorm2d, groups: int):
        super().__init__()
        self.groups, self.channels = groups, bn.num_features
        self.eps, self.momentum, self.affine = bn.eps, bn.momentum, bn.affine
        self.weight = bn.weight
        self.bias = bn.bias
        mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
        var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
        self.register_buffer("running_mean", mean.detach().repeat(groups).clone())
        self.register_buffer("running_var", var.detach().repeat(groups).clone())
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c = self.groups, self.channels
        n, _, h, w = x.shape
        if n % g:
            raise ValueError(f"a grouped batch of {n} does not split into {g} equal groups")
        folded = x.reshape(n // g, g * c, h, w)  # sample-major: a view of a contiguous batch
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        out = F.batch_norm(folded, self.running_mean, self.running_var, weight, bias, self.training,
                           momentum or 0.0, self.eps)
        return out.reshape(n, c, h, w)

    def group_state(self, index: int) -> dict[str, torch.Tensor]:
        """Group ``index``'s running statistics, as a ``BatchNorm2d`` state dict holds them."""
        part = slice(index * self.channels, (index + 1) * self.channels)
        return {"running_mean": self.running_mean[part].clone(), "running_var": self.running_var[part].clone(),
                "num_batches_tracked": self.num_batches_tracked.clone()}


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """G batches of B → one sample-major batch of B·G (row ``b·G + g`` = ``parts[g][b]``)."""
    return torch.stack(parts, 1).flatten(0, 1)


def deinterleave(batch: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`interleave`: G views of B rows each."""
    return batch.unflatten(0, (-1, groups)).unbind(1)


def group_batchnorms(module: nn.Module, groups: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` (in place) by a :class:`GroupedBatchNorm2d`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, GroupedBatchNorm2d(child, groups))
        else:
            group_batchnorms(child, groups)
    return module


@torch.no_grad()
def load_group(grouped: nn.Module, plain: nn.Module, index: int) -> None:
    """Copy group ``index``'s running statistics from ``grouped`` into the matching plain
    ``BatchNorm2d`` layers of ``plain`` (a model of the same structure)."""
    layers = dict(plain.named_modules())
    for name, module in grouped.named_modules():
        if isinstance(module, GroupedBatchNorm2d):
            for key, value in module.group_state(index).items():
                getattr(layers[name], key).copy_(value)
