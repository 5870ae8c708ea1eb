"""The CCA family and orthogonal Procrustes, as pure functions of ``[n, d]`` activations.

* :func:`cca_correlations` — canonical correlations by Björck & Golub: the singular values
  of ``Uₓᵀ U_y`` for orthonormal bases of the centred column spaces.
* :func:`mean_cca` — mean squared canonical correlation (R²_CCA, Kornblith et al. 2019).
* :func:`svcca` — SVD first (components explaining ``keep`` of the variance), then the
  mean canonical correlation (Raghu et al. 2017).
* :func:`pwcca` — correlations weighted by how much of ``x`` each canonical variate
  accounts for (Morcos et al. 2018).
* :func:`procrustes_distance` — ``min_Q ‖X − YQ‖²_F`` over orthogonal Q after centring and
  scaling both to unit Frobenius norm: ``2 − 2‖XᵀY‖_*`` (Ding et al. 2021), in [0, 2].

Everything runs in float64. Directions with (numerically) no variance are dropped, so
rank-deficient inputs are fine; CCA with more directions than inputs can separate is
degenerate (correlations of 1 by construction) and raises a
:class:`~stitching.similarity.SimilarityError` that says what to do.
"""

from __future__ import annotations

import torch

from stitching.similarity.cka import SimilarityError, _pair


def _basis(x: torch.Tensor, keep: float | int | None = None, tol: float = 1e-10):
    """Orthonormal basis ``[n, r]`` of the centred columns of ``x`` and its SVD pieces.

    ``keep``: a fraction of the variance (0 < keep ≤ 1) or a number of components.
    """
    x = x - x.mean(0, keepdim=True)
    u, s, vt = torch.linalg.svd(x, full_matrices=False)
    rank = int((s > tol * s[0]).sum()) if len(s) and s[0] > 0 else 0
    if keep is not None:
        if isinstance(keep, float) and 0 < keep <= 1:
            energy = torch.cumsum(s[:rank] ** 2, 0) / (s[:rank] ** 2).sum()
            rank = min(rank, int((energy < keep - 1e-12).sum()) + 1)
        elif int(keep) >= 1:
            rank = min(rank, int(keep))
        else:
            raise SimilarityError(f"keep must be a variance fraction in (0, 1] or a component count, got {keep}")
    return x, u[:, :rank], s[:rank], vt[:rank]


def _check_rank(n: int, rx: int, ry: int, what: str) -> None:
    if rx + ry > n - 1:
        raise SimilarityError(
            f"{what} is degenerate here: {rx} + {ry} directions cannot be separated by {n} inputs "
            f"(correlations of 1 by construction); use more inputs, fewer features "
            f"(flatten=pool or flatten=positions) or SVCCA with fewer components")


def _cca(x, y, keep_x=None, keep_y=None, what="CCA"):
    x, y = _pair(x, y, what)
    xc, ux, _, _ = _basis(x, keep_x)
    _, uy, _, _ = _basis(y, keep_y)
    _check_rank(len(x), ux.shape[1], uy.shape[1], what)
    a, rho, _ = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    return xc, ux, a, rho.clamp(0.0, 1.0)


def cca_correlations(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Canonical correlations of ``x`` and ``y``, largest first (``min(rank x, rank y)`` of them)."""
    return _cca(x, y)[3]


def mean_cca(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared canonical correlation, R²_CCA; invariant to invertible linear maps."""
    return float((cca_correlations(x, y) ** 2).mean())


def svcca(x: torch.Tensor, y: torch.Tensor, keep: float | int = 0.99) -> float:
    """Mean canonical correlation after keeping each side's top SVD directions."""
    return float(_cca(x, y, keep, keep, "SVCCA")[3].mean())


def pwcca(x: torch.Tensor, y: torch.Tensor) -> float:
    """Projection-weighted CCA: ``Σ αᵢ ρᵢ / Σ αᵢ`` with ``αᵢ = Σⱼ |⟨hᵢ, xⱼ⟩|`` over the
    centred neurons ``xⱼ`` of ``x`` and its unit-norm canonical variates ``hᵢ``."""
    xc, ux, a, rho = _cca(x, y, what="PWCCA")
    variates = ux @ a  # [n, r]: x's canonical variates, orthonormal columns
    alpha = (variates.T @ xc).abs().sum(1)
    return float((alpha * rho).sum() / alpha.sum())


def procrustes_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Orthogonal Procrustes distance ``2 − 2‖XᵀY‖_*`` of centred, unit-norm X and Y."""
    x, y = _pair(x, y, "Procrustes distance")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    x, y = x / x.norm(), y / y.norm()
    # wide activations: XᵀY has the singular values of (XV)ᵀ(YW) for X = USVᵀ, so work in
    # the ≤ n-dimensional row space instead of forming a d×d matrix
    if x.shape[1] > len(x):
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        x = u * s
    if y.shape[1] > len(y):
        u, s, _ = torch.linalg.svd(y, full_matrices=False)
        y = u * s
    nuclear = torch.linalg.svdvals(x.T @ y).sum()
    return float((2 - 2 * nuclear).clamp_min(0.0))
