"""Centred kernel alignment (Kornblith et al. 2019), as pure functions of activation matrices."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x`` ``[n, d1]`` and ``y`` ``[n, d2]`` (rows: the same n inputs).

    ``‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)`` with column-centred ``Xᶜ``, ``Yᶜ``, in float64.
    Invariant to orthogonal transforms and isotropic scaling; 1 for identical inputs.
    A constant input has no variance to compare: the result is then NaN.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y describe different numbers of inputs: {x.shape[0]} vs {y.shape[0]}")
    x = x.reshape(len(x), -1).double()
    y = y.reshape(len(y), -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / norm) if norm > 0 else float("nan")
