"""Neighbourhood, geometry and prediction measures the field compares against, as pure
functions of two ``[n, d]`` activation matrices whose rows are the same ``n`` inputs.

* :func:`mutual_knn` — mutual k-nearest-neighbour alignment (Huh et al. 2024, "The platonic
  representation hypothesis"): the mean share of each input's k nearest neighbours (cosine
  similarity, itself excluded) that the two representations agree on. 1 for the same
  neighbourhoods; about ``k / (n − 1)`` for unrelated ones.
* :func:`cknna` — centred kernel nearest-neighbour alignment (the same paper): unbiased HSIC of
  linear kernels restricted to the pairs that are neighbours in both representations, normalised
  like CKA (each side's self-alignment over its own neighbour pairs).
* :func:`rsa` — representational similarity analysis (Kriegeskorte et al. 2008): the Spearman
  correlation of the two representational dissimilarity matrices (correlation distance between
  inputs, upper triangle).
* :func:`linear_predictivity` — cross-validated ridge regression from ``x`` to ``y``: the R² of the
  held-out predictions, pooled over ``y``'s columns (1 = ``y`` is a linear function of ``x``). Not
  symmetric: it asks how much of ``y`` ``x`` carries.

All compute in float64 and return a Python float; undefined inputs raise
:class:`~stitching.similarity.SimilarityError`.
"""

from __future__ import annotations

import torch

from stitching.similarity.cka import SimilarityError, _pair, hsic_unbiased

#: the pairwise measures hold ``n × n`` float64 matrices: beyond this many inputs, refuse
MAX_PAIRWISE = 16_384


def _pairwise(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _pair(x, y, what)
    if len(x) > MAX_PAIRWISE:
        raise SimilarityError(f"{what} compares every pair of inputs: {len(x)} rows need "
                              f"{len(x) ** 2 * 8 / 2**30:.0f} GiB per matrix; use at most {MAX_PAIRWISE} "
                              f"(fewer inputs, or flatten=pool instead of positions)")
    return x, y


def _neighbours(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, n]`` 0/1 mask of each row's ``k`` most similar other rows."""
    n = len(similarity)
    if not 1 <= k < n:
        raise SimilarityError(f"k = {k} nearest neighbours needs 1 ≤ k < n = {n} inputs")
    ranked = similarity.clone().fill_diagonal_(float("-inf"))
    mask = torch.zeros_like(similarity)
    return mask.scatter_(1, ranked.topk(k, dim=1).indices, 1.0)


def _cosine(a: torch.Tensor) -> torch.Tensor:
    unit = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean over inputs of ``|kNN_x(i) ∩ kNN_y(i)| / k`` (cosine neighbours, self excluded)."""
    x, y = _pairwise(x, y, "mutual k-NN")
    shared = _neighbours(_cosine(x), k) * _neighbours(_cosine(y), k)
    return float(shared.sum(1).mean() / k)


def cknna(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """CKA's unbiased HSIC over neighbour pairs only: ``H(K∘M, L∘M) / √(H(K∘Mₓ, K∘Mₓ) H(L∘M_y, L∘M_y))``
    with ``M = Mₓ ∘ M_y`` the pairs that are among the k nearest in both (linear kernels)."""
    x, y = _pairwise(x, y, "CKNNA")
    k_x, k_y = x @ x.T, y @ y.T
    near_x, near_y = _neighbours(k_x, k), _neighbours(k_y, k)
    both = near_x * near_y
    cross = hsic_unbiased(k_x * both, k_y * both)
    self_x, self_y = hsic_unbiased(k_x * near_x, k_x * near_x), hsic_unbiased(k_y * near_y, k_y * near_y)
    for value, side in ((self_x, "x"), (self_y, "y")):
        if not value > 0:
            raise SimilarityError(f"CKNNA is undefined: the neighbour alignment of {side} with itself is "
                                  f"{float(value):.3g} (too few inputs for k = {k})")
    return float(cross / torch.sqrt(self_x * self_y))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), as Spearman's ρ needs."""
    order = torch.argsort(v)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    values, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    if len(values) < len(v):  # ties: every member gets the mean rank of its group
        sums = torch.zeros(len(values), dtype=v.dtype).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a @ b) / (a.norm() * b.norm())


def rsa(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation of the two RDMs (1 − Pearson correlation between inputs)."""
    x, y = _pairwise(x, y, "RSA")
    if len(x) < 3:
        raise SimilarityError(f"RSA needs at least 3 inputs, got {len(x)}")
    upper = torch.triu_indices(len(x), len(x), offset=1)
    rdms = []
    for a, side in ((x, "x"), (y, "y")):
        if a.shape[1] < 2 or bool((a.std(1) == 0).any()):
            raise SimilarityError(f"RSA is undefined: an input of {side} has the same value in every feature "
                                  f"(correlation distance needs variation across features)")
        centred = a - a.mean(1, keepdim=True)
        unit = centred / centred.norm(dim=1, keepdim=True)
        rdms.append((1 - unit @ unit.T)[upper[0], upper[1]])
    return float(_pearson(_ranks(rdms[0]), _ranks(rdms[1])))


def linear_predictivity(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, folds: int = 5) -> float:
    """Held-out R² of ridge regression ``y ≈ x W + b`` (penalty ``alpha``), ``folds``-fold
    cross-validated over contiguous blocks of inputs: ``1 − Σ‖y − ŷ‖² / Σ‖y − ȳ_fold‖²``."""
    x, y = _pair(x, y, "linear predictivity")
    n = len(x)
    if not 2 <= folds <= n // 2:
        raise SimilarityError(f"{folds}-fold cross-validation needs 2 ≤ folds ≤ n / 2 = {n // 2} inputs")
    error = total = 0.0
    sizes = [n // folds + (i < n % folds) for i in range(folds)]  # contiguous blocks, the first ones one longer
    bounds = [sum(sizes[:i]) for i in range(folds + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        test = torch.zeros(n, dtype=torch.bool)
        test[start:stop] = True
        mean_x, mean_y = x[~test].mean(0), y[~test].mean(0)
        a, b = x[~test] - mean_x, y[~test] - mean_y
        if a.shape[1] <= a.shape[0]:  # (AᵀA + αI)⁻¹ Aᵀ B, or its dual form for wide x
            weights = torch.linalg.solve(a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
        else:
            weights = a.T @ torch.linalg.solve(a @ a.T + alpha * torch.eye(len(a), dtype=a.dtype), b)
        predicted = (x[test] - mean_x) @ weights + mean_y
        error += float(((y[test] - predicted) ** 2).sum())
        total += float(((y[test] - y[test].mean(0)) ** 2).sum())
    if not total > 0:
        raise SimilarityError("linear predictivity is undefined: y does not vary within the held-out folds")
    return 1.0 - error / total
