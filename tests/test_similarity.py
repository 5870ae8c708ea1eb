"""Every index against an independent computation (numpy / scipy, explicit formulas)."""

import itertools

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import pdist, squareform

from stitching.similarity import (
    MinibatchCKA,
    SimilarityError,
    cca_correlations,
    hsic_unbiased,
    hsic_unbiased_linear,
    linear_cka,
    mean_cca,
    procrustes_distance,
    pwcca,
    rbf_cka,
    svcca,
    unbiased_cka,
)


def _related(n, d1, d2, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g)
    y = torch.randn(n, d2, generator=g) * noise
    y[:, : min(d1, d2)] += 2 * x[:, : min(d1, d2)]
    return x, y


def _hsic_centring(k, l):
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _cka_centring(k, l):
    """Kornblith et al.'s definition written out with H = I − 11ᵀ/n."""
    return _hsic_centring(k, l) / np.sqrt(_hsic_centring(k, k) * _hsic_centring(l, l))


@pytest.mark.parametrize("shape", [(40, 7, 12), (20, 50, 30)], ids=["feature-space", "gram-form"])
def test_linear_cka_matches_the_centring_matrix_formula(shape):
    x, y = _related(*shape)
    xn, yn = x.double().numpy(), y.double().numpy()
    assert linear_cka(x, y) == pytest.approx(_cka_centring(xn @ xn.T, yn @ yn.T), rel=1e-9)


def test_cka_invariances_and_identity():
    x, _ = _related(50, 8, 8, seed=1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))
    for index in (linear_cka, unbiased_cka, rbf_cka):
        assert index(x, x) == pytest.approx(1.0)
        assert index(x, 3.5 * x @ q) == pytest.approx(1.0)  # orthogonal map, isotropic scale
        assert index(x, x + 4.0) == pytest.approx(1.0)  # offsets are centred away
    assert linear_cka(x, torch.randn(50, 8)) < 0.5


def test_unbiased_hsic_is_the_u_statistic():
    """Mean over ordered distinct 4-tuples of k_ij l_ij + k_ij l_qr − 2 k_ij l_iq (Song et al. 2012)."""
    x, y = _related(7, 3, 4, seed=3)
    k, l = (x.double() @ x.double().T).numpy(), (y.double() @ y.double().T).numpy()
    terms = [k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
             for i, j, q, r in itertools.permutations(range(7), 4)]
    assert float(hsic_unbiased(torch.from_numpy(k), torch.from_numpy(l))) == pytest.approx(np.mean(terms), rel=1e-9)
    assert float(hsic_unbiased_linear(x, y)) == pytest.approx(np.mean(terms), rel=1e-9)  # feature-space form
    wide_x, wide_y = _related(12, 30, 40, seed=14)  # gram path (d > n) vs feature path on the same data
    g = torch.Generator().manual_seed(15)
    tall_x, tall_y = wide_x @ torch.randn(30, 5, generator=g), wide_y @ torch.randn(40, 6, generator=g)
    assert unbiased_cka(tall_x, tall_y) == pytest.approx(
        float(hsic_unbiased(tall_x.double() @ tall_x.double().T, tall_y.double() @ tall_y.double().T)
              / torch.sqrt(hsic_unbiased_linear(tall_x, tall_x) * hsic_unbiased_linear(tall_y, tall_y))), rel=1e-9)


def test_debiased_cka_is_near_zero_for_independent_inputs_where_biased_is_not():
    biased, debiased = [], []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
        biased.append(linear_cka(x, y))
        debiased.append(unbiased_cka(x, y))
    assert np.mean(biased) > 0.4
    assert abs(np.mean(debiased)) < 0.05


def test_rbf_cka_follows_the_reference_bandwidth_convention_and_tends_to_linear_cka():
    x, y = _related(30, 6, 9, seed=4)
    xn, yn = x.double().numpy(), y.double().numpy()

    def gram(a, threshold):  # Kornblith et al.'s gram_rbf: median of all n² squared distances
        d2 = squareform(pdist(a)) ** 2
        return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))

    for sigma in (0.2, 0.4, 0.8, 1.0):
        assert rbf_cka(x, y, sigma=sigma) == pytest.approx(_cka_centring(gram(xn, sigma), gram(yn, sigma)), rel=1e-9)
    assert rbf_cka(x[:29], y[:29]) == pytest.approx(_cka_centring(gram(xn[:29], 0.8), gram(yn[:29], 0.8)), rel=1e-9)
    # a very wide kernel is linear to first order: exp(-d²/2s²) ≈ 1 - ‖xi‖²/2s² - ‖xj‖²/2s² + xi·xj/s²
    assert rbf_cka(x, y, sigma=1e3) == pytest.approx(linear_cka(x, y), abs=1e-4)


def test_minibatch_cka_matches_the_full_data_computation():
    """Tolerance 0.01 on 3 000 inputs in 30 batches of 100 (the ratio of averaged unbiased
    HSICs is consistent; the gap is sampling noise)."""
    x, y = _related(3000, 20, 30, seed=5, noise=2.0)
    stream = MinibatchCKA()
    for xb, yb in zip(x.split(100), y.split(100)):
        stream.update([xb, xb[:, :10]], [yb])
    grid = stream.compute()
    assert grid.shape == (2, 1)
    assert float(grid[0, 0]) == pytest.approx(linear_cka(x, y), abs=0.01)
    assert float(grid[1, 0]) == pytest.approx(linear_cka(x[:, :10], y), abs=0.01)


@pytest.mark.parametrize("widths", [(6, 9), (40, 9), (40, 50)], ids=["narrow", "mixed", "wide"])
def test_minibatch_linear_cka_equals_the_gram_form_estimator(widths):
    """Narrow layers meet in feature space, wide ones through their Gram matrices: either way each
    minibatch's term is Song et al.'s estimator on the explicit Gram matrices (:func:`hsic_unbiased`,
    itself checked against the U-statistic above), averaged over minibatches as Nguyen et al. do."""
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(32, widths[0], generator=g), torch.randn(32, widths[1], generator=g)) for _ in range(3)]
    batches = [(x, x[:, :1] * 2 + y) if widths[1] > 1 else (x, y) for x, y in batches]  # related, not identical
    stream = MinibatchCKA()
    for x, y in batches:
        stream.update([x, x[:, ::2]], [y])

    def gram(a):
        a = a.double()
        return a @ a.T

    def mean_hsic(pick_x, pick_y):
        return sum(float(hsic_unbiased(gram(pick_x(x, y)), gram(pick_y(x, y)))) for x, y in batches) / len(batches)

    for i, side in enumerate((lambda x, y: x, lambda x, y: x[:, ::2])):
        expected = mean_hsic(side, lambda x, y: y) / np.sqrt(mean_hsic(side, side) *
                                                             mean_hsic(lambda x, y: y, lambda x, y: y))
        assert float(stream.compute()[i, 0]) == pytest.approx(expected, rel=1e-9)


def test_minibatch_cka_bounds_its_gram_matrices_and_keeps_its_target():
    """A batch of more rows than ``max_rows`` (every token of a batch of sequences) is split into
    minibatches of at most ``max_rows`` rows: no Gram matrix is larger, and the estimate still
    matches the full-data CKA (tolerance 0.01, as above). The rows arrive sorted by the factor the
    two sides share, as tokens arrive grouped by sequence: minibatches of consecutive rows would
    each see a narrow slice of it and miss the target, so this also checks the shuffle."""
    g = torch.Generator().manual_seed(7)
    z = torch.sort(torch.randn(3000, 1, generator=g), dim=0).values  # one shared factor, rows sorted by it
    x = z @ torch.randn(1, 20, generator=g) + 0.5 * torch.randn(3000, 20, generator=g)
    y = z @ torch.randn(1, 30, generator=g) + 0.5 * torch.randn(3000, 30, generator=g)
    stream = MinibatchCKA(max_rows=128)
    sizes, add = [], stream._add
    stream._add = lambda xs, ys: sizes.append(len(xs[0])) or add(xs, ys)
    stream.update([x], [y])  # one batch of 3 000 rows (tokens): 24 minibatches of 125
    assert max(sizes) <= 128 and stream.batches == 24
    assert float(stream.compute()[0, 0]) == pytest.approx(linear_cka(x, y), abs=0.01)
    consecutive = MinibatchCKA()
    for xb, yb in zip(x.split(125), y.split(125)):
        consecutive.update([xb], [yb])
    assert abs(float(consecutive.compute()[0, 0]) - linear_cka(x, y)) > 0.02  # what the shuffle prevents
    with pytest.raises(SimilarityError, match="at least 4 rows"):
        MinibatchCKA(max_rows=3)


def _whitened_cross_covariance_correlations(x, y):
    """Canonical correlations as singular values of Σxx^{-1/2} Σxy Σyy^{-1/2}, and x's
    canonical directions, by eigendecompositions."""
    x = x - x.mean(0)
    y = y - y.mean(0)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    wx = inv_sqrt(sxx)
    u, rho, _ = np.linalg.svd(wx @ sxy @ inv_sqrt(syy))
    return rho, x @ wx @ u


def test_cca_correlations_match_the_whitened_cross_covariance():
    x, y = _related(200, 6, 9, seed=6, noise=1.5)
    rho, _ = _whitened_cross_covariance_correlations(x.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(cca_correlations(x, y).numpy(), rho[:6], rtol=1e-8)
    assert mean_cca(x, y) == pytest.approx(np.mean(rho[:6] ** 2), rel=1e-8)


def test_cca_is_invariant_to_invertible_linear_maps():
    x, y = _related(150, 5, 7, seed=7)
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(8)) + 3 * torch.eye(5)
    assert mean_cca(x @ a, y) == pytest.approx(mean_cca(x, y), rel=1e-8)
    assert mean_cca(x, 2 * y + 1) == pytest.approx(mean_cca(x, y), rel=1e-8)
    assert mean_cca(x, x @ a) == pytest.approx(1.0)
    assert svcca(x, x @ a, keep=1.0) == pytest.approx(1.0)
    assert pwcca(x, x @ a) == pytest.approx(1.0)


def test_pwcca_matches_an_independent_weighting():
    x, y = _related(300, 6, 8, seed=9, noise=2.0)
    xn, yn = x.double().numpy(), y.double().numpy()
    rho, variates = _whitened_cross_covariance_correlations(xn, yn)
    variates = variates / np.linalg.norm(variates, axis=0)
    alpha = np.abs(variates.T @ (xn - xn.mean(0))).sum(1)
    assert pwcca(x, y) == pytest.approx(float((alpha * rho[:6]).sum() / alpha.sum()), rel=1e-7)


def test_svcca_keeps_the_top_directions():
    x, y = _related(300, 10, 10, seed=10)
    x[:, 5:] *= 1e-3  # five directions carry almost no variance
    xn, yn = x.double().numpy(), y.double().numpy()

    def top(a, k):
        u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
        return u[:, :k] * s[:k]

    rho, _ = _whitened_cross_covariance_correlations(top(xn, 5), top(yn, 5))
    assert svcca(x, y, keep=5) == pytest.approx(float(rho.mean()), rel=1e-8)
    rho, _ = _whitened_cross_covariance_correlations(top(xn, 5), yn)  # y needs all 10 for 99 %
    assert svcca(x, y, keep=0.99) == pytest.approx(float(rho[:5].mean()), rel=1e-8)


@pytest.mark.parametrize("width", [6, 80], ids=["narrow", "wide"])
def test_procrustes_matches_scipy(width):
    x, y = _related(40, width, width, seed=11)
    xn, yn = x.double().numpy(), y.double().numpy()
    xn, yn = xn - xn.mean(0), yn - yn.mean(0)
    xn, yn = xn / np.linalg.norm(xn), yn / np.linalg.norm(yn)
    r, _ = orthogonal_procrustes(yn, xn)
    assert procrustes_distance(x, y) == pytest.approx(np.linalg.norm(xn - yn @ r) ** 2, rel=1e-8, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(12)))
    assert procrustes_distance(x, 5 * x @ q + 2) == pytest.approx(0.0, abs=1e-10)


def test_constant_rank_deficient_and_degenerate_inputs_give_values_or_clear_errors():
    x, y = _related(60, 4, 4, seed=13)
    constant = torch.ones(60, 3)
    for index in (linear_cka, unbiased_cka, rbf_cka, mean_cca, svcca, pwcca, procrustes_distance):
        with pytest.raises(SimilarityError, match="constant"):
            index(x, constant)
    deficient = torch.cat([x, x[:, :2], 2 * x[:, :1]], dim=1)  # 7 columns, rank 4
    for index in (linear_cka, unbiased_cka, rbf_cka, mean_cca, svcca, pwcca, procrustes_distance):
        assert np.isfinite(index(deficient, y))
    assert mean_cca(deficient, y) == pytest.approx(mean_cca(x, y), rel=1e-8)
    with pytest.raises(SimilarityError, match="degenerate"):
        mean_cca(torch.randn(20, 15), torch.randn(20, 15))
    stream = MinibatchCKA()
    stream.update([x], [constant])
    with pytest.raises(SimilarityError, match="end layer 1"):
        stream.compute()
