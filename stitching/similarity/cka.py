"""Centred kernel alignment (Kornblith et al. 2019), as pure functions of activation matrices.

Every function takes ``[n, d]`` matrices whose rows are the same ``n`` inputs (other
shapes are flattened per sample), computes in float64 and returns a Python float.

* :func:`linear_cka` — the biased (V-statistic) HSIC with linear kernels; the
  feature-space form ``‖YᵀX‖²`` when both widths are below ``n``, the Gram form otherwise.
* :func:`unbiased_cka` — CKA from the unbiased U-statistic HSIC of Song et al. (2012),
  close to 0 for independent inputs even when ``n`` is small.
* :func:`rbf_cka` — Gaussian kernels, bandwidth a fraction of the median distance (Kornblith et al.'s convention).
* :class:`MinibatchCKA` — streams over a dataset: averages per-batch unbiased HSIC
  (Nguyen et al. 2021), for activations too large to hold, and for grids of layers.

A constant input carries no information to align: the functions raise
:class:`~stitching.similarity.SimilarityError` instead of returning NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stitching.errors import StitchingError


class SimilarityError(StitchingError):
    """An index is undefined for these inputs (constant activations, too few samples…)."""


def as_matrix(a: torch.Tensor) -> torch.Tensor:
    """``[n, …]`` → ``[n, d]`` float64 (per-sample flattening)."""
    return a.reshape(len(a), -1).double()


def is_constant(a: torch.Tensor) -> bool:
    """True when every input has the same activation (nothing to compare)."""
    a = a.reshape(len(a), -1)
    return bool(len(a) < 2 or (a.amax(0) - a.amin(0)).max() == 0)


def _pair(x: torch.Tensor, y: torch.Tensor, what: str = "the index") -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] != y.shape[0]:
        raise SimilarityError(f"x and y describe different numbers of inputs: {x.shape[0]} vs {y.shape[0]}")
    for a, side in ((x, "x"), (y, "y")):
        if is_constant(a):
            raise SimilarityError(f"{what} is undefined: {side} is the same for every input (constant activations)")
        if not torch.isfinite(a).all():
            raise SimilarityError(f"{what} is undefined: {side} contains NaN or infinite activations")
    return as_matrix(x), as_matrix(y)


def _ratio(cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor, what: str) -> float:
    for value, side in ((self_x, "x"), (self_y, "y")):
        if not value > 0:
            raise SimilarityError(f"{what} is undefined: the HSIC of {side} with itself is {float(value):.3g} "
                                  f"(constant activations, or too few samples for the estimator)")
    return float(cross / torch.sqrt(self_x * self_y))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA, ``‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)`` with column-centred inputs.

    Invariant to orthogonal transforms and isotropic scaling; 1 for identical inputs.
    """
    x, y = _pair(x, y, "linear CKA")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    n = len(x)
    if x.shape[1] < n and y.shape[1] < n:  # feature space: d×d products
        cross = (y.T @ x).pow(2).sum()
        return _ratio(cross, (x.T @ x).pow(2).sum(), (y.T @ y).pow(2).sum(), "linear CKA")
    k, l = x @ x.T, y @ y.T  # Gram form: n×n products (already centred)
    return _ratio((k * l).sum(), (k * k).sum(), (l * l).sum(), "linear CKA")


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012)'s unbiased HSIC estimator from two ``n×n`` kernel matrices (n ≥ 4).

    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))`` with zeroed diagonals.
    """
    n = k.shape[0]
    if n < 4:
        raise SimilarityError(f"the unbiased HSIC needs at least 4 inputs per batch, got {n}")
    k = k.double().clone().fill_diagonal_(0)
    l = l.double().clone().fill_diagonal_(0)
    k_col, l_row = k.sum(0), l.sum(1)  # 1ᵀK̃ and L̃1: also right for the asymmetric masked kernels of CKNNA
    trace = (k * l.T).sum()  # tr(K̃L̃)
    return (trace + k_col.sum() * l_row.sum() / ((n - 1) * (n - 2)) - 2 * (k_col @ l_row) / (n - 2)) / (n * (n - 3))


def hsic_unbiased_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`hsic_unbiased` of linear kernels in feature space: ``O(n·d₁·d₂)`` time and no
    ``n×n`` matrix, for many inputs (e.g. spatial positions as samples)."""
    x, y = as_matrix(x), as_matrix(y)
    n = len(x)
    if n < 4:
        raise SimilarityError(f"the unbiased HSIC needs at least 4 inputs per batch, got {n}")
    k_diag, l_diag = (x * x).sum(1), (y * y).sum(1)
    trace = (y.T @ x).pow(2).sum() - (k_diag * l_diag).sum()  # Σ_{i≠j} K_ij L_ij
    k_row, l_row = x @ x.sum(0) - k_diag, y @ y.sum(0) - l_diag  # K̃1, L̃1
    return (trace + k_row.sum() * l_row.sum() / ((n - 1) * (n - 2)) - 2 * (k_row @ l_row) / (n - 2)) / (n * (n - 3))


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    x = as_matrix(x)
    return x @ x.T


def rbf_gram(x: torch.Tensor, sigma: float = 0.8) -> torch.Tensor:
    """Gaussian kernel ``exp(−‖xᵢ − xⱼ‖² / (2 σ² m))``, ``m`` the median of the whole matrix of
    squared distances (its zero diagonal and both triangles included): the convention of
    Kornblith et al.'s reference code (``gram_rbf(x, threshold=σ)``), so published values reproduce."""
    x = as_matrix(x)
    sq = (x * x).sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    dist2.fill_diagonal_(0)
    median = _median(dist2.flatten())
    if not median > 0:
        raise SimilarityError("RBF CKA is undefined: most inputs have the same activation (median distance 0)")
    return torch.exp(-dist2 / (2 * sigma**2 * median))


def _median(values: torch.Tensor) -> torch.Tensor:
    """numpy's median: the mean of the two middle values of an even count (torch's is the lower)."""
    n = len(values)
    low = values.kthvalue((n + 1) // 2).values
    return low if n % 2 else (low + values.kthvalue(n // 2 + 1).values) / 2


def _centred(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def kernel_cka(k: torch.Tensor, l: torch.Tensor, unbiased: bool = False) -> float:
    """CKA from two kernel matrices (biased HSIC by default)."""
    if unbiased:
        return _ratio(hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l), "unbiased CKA")
    kc, lc = _centred(k.double()), _centred(l.double())
    return _ratio((kc * lc).sum(), (kc * kc).sum(), (lc * lc).sum(), "CKA")


def unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012)."""
    x, y = _pair(x, y, "unbiased CKA")
    if x.shape[1] < len(x) and y.shape[1] < len(y):  # feature space
        return _ratio(hsic_unbiased_linear(x, y), hsic_unbiased_linear(x, x), hsic_unbiased_linear(y, y),
                      "unbiased CKA")
    return kernel_cka(x @ x.T, y @ y.T, unbiased=True)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float = 0.8, unbiased: bool = False) -> float:
    """RBF-kernel CKA; each side's bandwidth is ``sigma`` × its median distance (:func:`rbf_gram`)."""
    x, y = _pair(x, y, "RBF CKA")
    return kernel_cka(rbf_gram(x, sigma), rbf_gram(y, sigma), unbiased=unbiased)


class _LinearKernel:
    """One layer's linear kernel ``K = XXᵀ`` for :func:`hsic_unbiased`, held as the terms the
    estimator needs: ``diag(K)``, ``K̃1`` and, only where a layer at least as wide as the batch is
    involved, ``K`` itself (formed once). Two narrow layers meet in feature space (``Σ_{i≠j} K_ij L_ij = ‖YᵀX‖²_F − Σ K_ii L_ii``,
    ``O(n·d₁·d₂)``), so a batch of 2 048 tokens of width 64 never forms a 2 048² matrix."""

    def __init__(self, a: torch.Tensor, gram):
        self.x = as_matrix(a)
        n, width = self.x.shape
        if n < 4:
            raise SimilarityError(f"the unbiased HSIC needs at least 4 inputs per batch, got {n}")
        self.wide, self._input, self._form, self._gram = width >= n, a, gram, None
        self.diag = (self.x * self.x).sum(1)
        self.rows = self.x @ self.x.sum(0) - self.diag  # K̃1 (zeroed diagonal)

    @property
    def gram(self) -> torch.Tensor:
        """``K`` itself, formed once, and only when a wide layer meets this one."""
        if self._gram is None:
            self._gram = self._form(self._input)
        return self._gram

    @staticmethod
    def hsic(k: "_LinearKernel", l: "_LinearKernel") -> torch.Tensor:
        n = len(k.x)
        if k.wide or l.wide:
            products = k.gram.mul(l.gram).sum()
        else:
            products = (l.x.T @ k.x).pow(2).sum()
        trace = products - (k.diag * l.diag).sum()  # tr(K̃L̃)
        return (trace + k.rows.sum() * l.rows.sum() / ((n - 1) * (n - 2)) - 2 * (k.rows @ l.rows) / (n - 2)) \
            / (n * (n - 3))


class MinibatchCKA:
    """Streaming CKA for every (front layer, end layer) pair: the average over batches of
    the unbiased HSIC (Nguyen et al. 2021), normalised at the end.

    ``update(xs, ys)`` takes one batch's activations of each model (lists of tensors, one
    per layer, rows = the same inputs); ``compute()`` returns the ``[len(xs), len(ys)]``
    grid. Each layer's Gram matrix is formed once per minibatch, so memory is ``rows²`` per
    layer whatever the layer's width.

    A batch of more than ``max_rows`` rows (every token of a batch of sequences, with positions
    as samples) is split into near-equal minibatches of at most ``max_rows`` rows, after one
    seeded shuffle of its rows (the same for both sides), so each minibatch draws tokens from
    across the batch rather than from one sequence; each minibatch is one term of the average.
    (Unbiased HSIC has the same expectation at any size, so the bound changes the estimate's
    variance, not its target; without it 32 000 tokens make 8 GB Gram matrices.)

    Args:
        kernel: ``"linear"`` or ``"rbf"`` (bandwidth ``sigma`` × the minibatch's median distance).
        max_rows: the most rows one minibatch's Gram matrices have.
        seed: the shuffle's seed.
    """

    def __init__(self, kernel: str = "linear", sigma: float = 0.8, max_rows: int = 2048, seed: int = 0):
        if kernel not in ("linear", "rbf"):
            raise SimilarityError(f"unknown kernel '{kernel}'; choose linear or rbf")
        if max_rows < 4:
            raise SimilarityError(f"max_rows={max_rows}: unbiased HSIC needs at least 4 rows per minibatch")
        self.kernel, self.sigma, self.max_rows = kernel, sigma, max_rows
        self.shuffle = torch.Generator().manual_seed(seed)
        self.cross = self.self_x = self.self_y = None
        self.varied_x: list[bool] = []
        self.varied_y: list[bool] = []
        self.batches = 0

    def _gram(self, a: torch.Tensor) -> torch.Tensor:
        return linear_gram(a) if self.kernel == "linear" else rbf_gram(a, self.sigma)

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        rows = len(xs[0])
        if rows <= self.max_rows:
            return self._add(xs, ys)
        order = torch.randperm(rows, generator=self.shuffle)
        for part in torch.tensor_split(order, -(-rows // self.max_rows)):
            self._add([x[part.to(x.device)] for x in xs], [y[part.to(y.device)] for y in ys])

    def _add(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        if self.kernel == "linear":
            kx, ky = [_LinearKernel(x, self._gram) for x in xs], [_LinearKernel(y, self._gram) for y in ys]
            hsic = _LinearKernel.hsic
        else:
            kx, ky, hsic = [self._gram(x) for x in xs], [self._gram(y) for y in ys], hsic_unbiased
        cross = torch.tensor([[float(hsic(k, l)) for l in ky] for k in kx], dtype=torch.float64)
        self_x = torch.tensor([float(hsic(k, k)) for k in kx], dtype=torch.float64)
        self_y = torch.tensor([float(hsic(l, l)) for l in ky], dtype=torch.float64)
        varied_x, varied_y = [not is_constant(x) for x in xs], [not is_constant(y) for y in ys]
        if self.cross is None:
            self.cross, self.self_x, self.self_y = cross, self_x, self_y
            self.varied_x, self.varied_y = varied_x, varied_y
        else:
            self.varied_x = [a or b for a, b in zip(self.varied_x, varied_x)]
            self.varied_y = [a or b for a, b in zip(self.varied_y, varied_y)]
            self.cross += cross
            self.self_x += self_x
            self.self_y += self_y
        self.batches += 1

    def compute(self) -> torch.Tensor:
        if not self.batches:
            raise SimilarityError("no batches were added to the minibatch CKA")
        for side, varied in (("front", self.varied_x), ("end", self.varied_y)):
            if not all(varied):
                raise SimilarityError(f"minibatch CKA is undefined: {side} layer {varied.index(False) + 1} "
                                      f"is the same for every input (constant activations)")
        grid = torch.empty_like(self.cross)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                grid[i, j] = _ratio(self.cross[i, j], self.self_x[i], self.self_y[j],
                                    f"minibatch CKA (front layer {i + 1}, end layer {j + 1})")
        return grid
