"""The objectives as pure functions of tensors.

Notation as in DESIGN.md: ``a = T(f_{≤i}(x))`` is the stitched activation; targets
``g_{≤l}(x)`` come from an untouched end model. Norms are per sample, then averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from stitching.errors import StitchingError

_EPS = 1e-12


def relative_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of ``‖pred_n − target_n‖_F / ‖target_n‖_F`` over samples ``n``.

    ``mask`` ``[N, T]`` (token sequences): only real positions (1) enter either norm.
    """
    if mask is not None:
        keep = mask[..., None].to(pred.dtype)
        pred, target = pred * keep, target * keep
    diff = (pred - target).flatten(1).norm(dim=1)
    scale = target.flatten(1).norm(dim=1).clamp_min(_EPS)
    return (diff / scale).mean()


def hint_loss(stitched: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Structural hint at the stitching point: ``relative_error(a, g_{≤j}(x))``."""
    return relative_error(stitched, target, mask)


def fula_loss(stitched: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_l C_l · relative_error(stitched_l, targets_l)`` for cut points ``l = j..k``.

    Args:
        stitched: ``[a, g_{j<·≤j+1}(a), …, g_{j<·≤k}(a)]`` — never the logits.
        targets: ``[g_{≤j}(x), …, g_{≤k}(x)]`` from the reference end model.
        weights: ``C``, one non-negative weight per term, summing to 1.
        mask: ``[N, T]`` real token positions of token sequences (``None``: every position).
    """
    if not len(stitched) == len(targets) == len(weights):
        raise ValueError(f"{len(stitched)} activations, {len(targets)} targets, {len(weights)} weights")
    total = stitched[0].new_zeros(())
    for weight, pred, target in zip(weights.tolist(), stitched, targets):
        if weight:
            total = total + weight * relative_error(pred, target, mask)
    return total


def slm_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the end model's soft labels ``softmax(g(x))``."""
    return -(teacher_logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def tlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy against the true labels (the mean over those that are not ``ignore_index``)."""
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def fula_weights(spec, num_terms: int) -> torch.Tensor:
    """Turn a config value into the weight vector ``C`` over ``num_terms`` hints.

    ``spec`` is ``"uniform"`` (the paper's default), ``"first"`` (only the structural
    hint: Hint), ``"first:n"`` (uniform over the first n hints — progressively deeper
    guidance, FuLA paper Fig. 11; capped at ``num_terms``), ``"last"`` (only the
    penultimate layer's hint, Fig. 6), or an explicit list of ``num_terms`` non-negative
    numbers (normalised to sum to 1).
    """
    if isinstance(spec, str) and spec.startswith("first:") and spec[6:].isdigit() and int(spec[6:]) > 0:
        n = min(int(spec[6:]), num_terms)
        spec = [1.0] * n + [0.0] * (num_terms - n)
    if isinstance(spec, str):
        named = {"uniform": [1.0] * num_terms, "first": [1.0] + [0.0] * (num_terms - 1),
                 "last": [0.0] * (num_terms - 1) + [1.0]}
        if spec not in named:
            raise StitchingError(
                f"objective.weights='{spec}' is not understood; use uniform, first, first:N, last or a list of {num_terms} numbers"
            )
        values = named[spec]
    else:
        values = [float(v) for v in spec]
    if len(values) != num_terms:
        raise StitchingError(
            f"objective.weights has {len(values)} entries but this end layer has {num_terms} hint terms "
            f"(one per cut point from the end layer to the last); give {num_terms} numbers"
        )
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise StitchingError(f"objective.weights must be finite and non-negative with a positive sum, got {values}")
    weights = torch.tensor(values, dtype=torch.float32)
    return weights / weights.sum()
