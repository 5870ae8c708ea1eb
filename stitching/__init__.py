"""Measure the functional similarity of neural networks by model stitching."""

__version__ = "0.1.0"
