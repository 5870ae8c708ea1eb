import pytest
import torch

from stitching.similarity import linear_cka


def _cka_with_centring_matrices(x, y):
    """Kornblith et al.'s definition written out: HSIC with H = I − 11ᵀ/n, linear kernels."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_linear_cka_matches_the_centring_matrix_formula():
    torch.manual_seed(0)
    x, y = torch.randn(40, 7), torch.randn(40, 12)
    y[:, :7] += 2 * x  # some shared structure
    assert linear_cka(x, y) == pytest.approx(_cka_with_centring_matrices(x, y), rel=1e-9)


def test_linear_cka_invariances_and_identity():
    torch.manual_seed(1)
    x = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, x + 4.0) == pytest.approx(1.0)  # centring removes offsets
    assert linear_cka(x, torch.randn(50, 8)) < 0.5
    assert torch.isnan(torch.tensor(linear_cka(x, torch.ones(50, 3))))
