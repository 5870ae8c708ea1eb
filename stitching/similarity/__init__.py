"""Structural similarity indices on activation matrices, and the energy-based OOD detector."""

from stitching.similarity.cca import cca_correlations, mean_cca, procrustes_distance, pwcca, svcca
from stitching.similarity.cka import (
    MinibatchCKA,
    SimilarityError,
    hsic_unbiased,
    hsic_unbiased_linear,
    kernel_cka,
    linear_cka,
    rbf_cka,
    unbiased_cka,
)

__all__ = [
    "MinibatchCKA",
    "SimilarityError",
    "cca_correlations",
    "hsic_unbiased",
    "hsic_unbiased_linear",
    "kernel_cka",
    "linear_cka",
    "mean_cca",
    "procrustes_distance",
    "pwcca",
    "rbf_cka",
    "svcca",
    "unbiased_cka",
]
