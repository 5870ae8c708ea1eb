"""How sure a similarity score is: a bootstrap interval over inputs and a permutation null.

* :func:`bootstrap_interval` — resample the ``n`` inputs (rows of both matrices together) with
  replacement, recompute the index, and report the percentile interval: how much the score
  would move with another sample of inputs of the same size.
* :func:`permutation_null` — the index between ``x`` and a row-shuffled ``y`` (the pairing of
  inputs destroyed, each representation's own structure kept): the score two unrelated
  representations of this ``n`` and these widths reach by chance, and the one-sided p-value
  of the observed score under it.

Both take any ``index(x, y) -> float`` of :mod:`stitching.similarity` and a seed, so a grid's
intervals are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stitching.similarity.cka import SimilarityError

Index = Callable[[torch.Tensor, torch.Tensor], float]


def _scores(index: Index, x: torch.Tensor, y: torch.Tensor, draws: int, rows: Callable, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        pick_x, pick_y = rows(len(x), generator)
        try:
            values.append(index(x[pick_x], y[pick_y]))
        except SimilarityError:  # a draw the index cannot score (e.g. all rows alike): left out
            continue
    if len(values) < max(2, draws // 2):
        raise SimilarityError(f"only {len(values)} of {draws} resamples could be scored; use more inputs")
    return np.asarray(values, dtype=float)


def bootstrap_interval(index: Index, x: torch.Tensor, y: torch.Tensor, draws: int = 200, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``index(x, y)`` over inputs (rows resampled in pairs)."""
    if not 0 < level < 1:
        raise SimilarityError(f"the interval's level must be in (0, 1), got {level}")

    def rows(n, generator):
        pick = torch.randint(n, (n,), generator=generator)
        return pick, pick

    values = _scores(index, x, y, draws, rows, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Null:
    """The permutation null of one score."""

    mean: float  # what unrelated representations score on average
    q95: float  # 95th percentile: a score above it is above chance at 5 %
    p_value: float  # (1 + #{null ≥ observed}) / (1 + permutations)


def permutation_null(index: Index, x: torch.Tensor, y: torch.Tensor, observed: float | None = None,
                     permutations: int = 200, seed: int = 0) -> Null:
    """The index between ``x`` and row-shuffled ``y``; ``observed`` defaults to ``index(x, y)``."""
    observed = index(x, y) if observed is None else observed

    def rows(n, generator):
        return torch.arange(n), torch.randperm(n, generator=generator)

    values = _scores(index, x, y, permutations, rows, seed)
    return Null(float(values.mean()), float(np.percentile(values, 95)),
                float((1 + (values >= observed).sum()) / (1 + len(values))))
