"""Subsets that are samples of their whole split, never its first N items.

A split is often ordered (a corpus cut topic by topic, a dataset sorted by class, MNLI by
genre): its first N items are a few topics or classes, and a run on them trains and tests
on the same narrow slice. Both draws here are seeded and spread over the whole split:

* :func:`spread_sample` — ``count`` equal consecutive blocks of the split, one item drawn at
  random from each: every part of an ordered split is represented in proportion to its length
  (systematic sampling with a random draw per stratum).
* :func:`stratified_sample` — each class in proportion to its share of the split (the
  largest-remainder allocation, the items of a class drawn at random).
"""

from __future__ import annotations

import torch


def spread_sample(count: int, total: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``count`` of ``total`` items, one drawn from each of ``count`` equal
    consecutive blocks (all of them when ``count ≥ total``)."""
    if count >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    edges = torch.div(torch.arange(count + 1) * total, count, rounding_mode="floor")
    widths = edges[1:] - edges[:-1]
    offsets = (torch.rand(count, generator=generator) * widths).long().clamp(max=widths - 1)
    return edges[:-1] + offsets


def stratified_sample(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``count`` items with every class in proportion to its share of
    ``labels`` (the rounding remainders go to the classes with the largest ones, then to the
    most frequent); the items of a class are drawn at random."""
    labels = torch.as_tensor(labels)
    total = len(labels)
    if count >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    classes, sizes = torch.unique(labels, return_counts=True)
    exact = sizes.double() * count / total
    take = exact.floor().long()
    order = sorted(range(len(classes)), key=lambda c: (-(exact[c] - take[c]).item(), -sizes[c].item(), c))
    for c in order[: count - int(take.sum())]:
        take[c] += 1
    chosen = []
    for c, label in enumerate(classes):
        members = (labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[: int(take[c])]])
    return torch.cat(chosen).sort().values


def describe(kept: int, total: int, how: str, seed: int) -> dict:
    """What a run records of a subset."""
    return {"kept": int(kept), "of": int(total), "how": how if kept < total else "all", "seed": int(seed)}
