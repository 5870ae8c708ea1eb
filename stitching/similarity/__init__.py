"""Structural similarity indices on activation matrices, and the energy-based OOD detector."""

from stitching.similarity.alignment import cknna, linear_predictivity, mutual_knn, rsa
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
    "cknna",
    "hsic_unbiased",
    "hsic_unbiased_linear",
    "kernel_cka",
    "linear_cka",
    "linear_predictivity",
    "mean_cca",
    "mutual_knn",
    "procrustes_distance",
    "pwcca",
    "rbf_cka",
    "rsa",
    "svcca",
    "unbiased_cka",
]
