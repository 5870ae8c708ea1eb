"""Structural similarity indices on activation matrices."""

from stitching.similarity.cka import linear_cka

__all__ = ["linear_cka"]
