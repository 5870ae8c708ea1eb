"""The neighbourhood, RSA and predictivity measures against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stitching.similarity import SimilarityError
from stitching.similarity.alignment import cknna, linear_predictivity, mutual_knn, rsa


def _data(n=60, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _rotation(d, seed=1):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _knn_sets(a, k):  # brute force: cosine similarity, self excluded
    a = a.numpy()
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    sim = unit @ unit.T
    return [set(np.argsort(-np.where(np.arange(len(a)) == i, -np.inf, sim[i]))[:k]) for i in range(len(a))]


def test_mutual_knn_counts_shared_neighbours_like_a_loop_does():
    x, y = _data(), _data(seed=2)
    y = 0.5 * x[:, :8] @ torch.randn(8, 10, dtype=torch.float64) + y[:, :10]  # partly related
    k = 5
    expected = np.mean([len(a & b) / k for a, b in zip(_knn_sets(x, k), _knn_sets(y, k))])
    assert mutual_knn(x, y, k) == pytest.approx(expected, abs=1e-12)
    assert mutual_knn(x, x @ _rotation(12) * 3.0, k) == pytest.approx(1.0)  # cosine neighbours: rotation, scale
    unrelated = [mutual_knn(_data(400, 8, s), _data(400, 8, s + 100), 10) for s in range(3)]
    assert np.mean(unrelated) == pytest.approx(10 / 399, abs=0.01)  # chance: k / (n − 1)


def test_cknna_is_the_unbiased_hsic_over_shared_neighbour_pairs():
    x, y = _data(40, 6), _data(40, 5, seed=3)
    y = y + x[:, :5]
    k = 8

    def hsic1(kk, ll):  # Song et al.'s estimator, from its definition
        n = len(kk)
        kk, ll = kk.copy(), ll.copy()
        np.fill_diagonal(kk, 0)
        np.fill_diagonal(ll, 0)
        one = np.ones(n)
        return (np.trace(kk @ ll) + (one @ kk @ one) * (one @ ll @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ kk @ ll @ one) / (n * (n - 3))

    def mask(gram):  # each row's k largest off-diagonal entries
        m = np.zeros_like(gram)
        for i, row in enumerate(gram):
            order = [j for j in np.argsort(-row) if j != i][:k]
            m[i, order] = 1
        return m

    kx, ky = (x @ x.T).numpy(), (y @ y.T).numpy()
    mx, my = mask(kx), mask(ky)
    both = mx * my
    expected = hsic1(kx * both, ky * both) / np.sqrt(hsic1(kx * mx, kx * mx) * hsic1(ky * my, ky * my))
    assert cknna(x, y, k) == pytest.approx(expected, rel=1e-9)
    assert cknna(x, x @ _rotation(6), k) == pytest.approx(1.0)


def test_rsa_equals_spearman_of_scipy_rdms():
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    x, y = _data(30, 7), _data(30, 9, seed=4)
    y[:, :7] += x
    expected = spearmanr(pdist(x.numpy(), "correlation"), pdist(y.numpy(), "correlation")).statistic
    assert rsa(x, y) == pytest.approx(expected, abs=1e-10)
    tied = torch.tensor([[0.0, 1, 2], [0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]], dtype=torch.float64)
    expected = spearmanr(pdist(tied.numpy(), "correlation"), pdist(x[:5, :3].numpy(), "correlation")).statistic
    assert rsa(tied, x[:5, :3]) == pytest.approx(expected, abs=1e-10)  # tied dissimilarities: average ranks


def _sklearn_r2(x, y, alpha, folds):
    """Held-out R² pooled over KFold's contiguous folds, by scikit-learn's Ridge."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    x, y = x.numpy(), y.numpy()
    error = total = 0.0
    for train, test in KFold(folds).split(x):
        model = Ridge(alpha=alpha).fit(x[train], y[train])
        error += ((y[test] - model.predict(x[test])) ** 2).sum()
        total += ((y[test] - y[test].mean(0)) ** 2).sum()
    return 1 - error / total


def test_linear_predictivity_matches_scikit_learn_ridge_with_k_fold():
    x = _data(53, 6)
    y = x @ torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5 * _data(53, 4, 6)
    assert linear_predictivity(x, y, alpha=2.0, folds=5) == pytest.approx(_sklearn_r2(x, y, 2.0, 5), abs=1e-9)
    wide = _data(20, 50, 7)  # more features than inputs: the dual form
    target = wide @ torch.randn(50, 3, dtype=torch.float64)
    assert linear_predictivity(wide, target, alpha=0.5, folds=4) == pytest.approx(_sklearn_r2(wide, target, 0.5, 4),
                                                                                   abs=1e-8)
    assert linear_predictivity(x, x, alpha=1e-8) == pytest.approx(1.0, abs=1e-6)


def test_undefined_inputs_raise_one_clear_error():
    x = _data(10, 3)
    with pytest.raises(SimilarityError, match="1 ≤ k < n"):
        mutual_knn(x, x, k=10)
    with pytest.raises(SimilarityError, match="folds"):
        linear_predictivity(x, x, folds=6)
    with pytest.raises(SimilarityError, match="constant"):
        rsa(torch.ones(10, 3), x)
