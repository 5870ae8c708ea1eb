"""Datasets: embedded defaults, torchvision sources, low-resolution ImageNet."""

from stitching.data.datamodule import ImageDataModule, ImageTensorDataset
from stitching.data.sources import SOURCES, ImageArrays, load_source

__all__ = ["SOURCES", "ImageArrays", "ImageDataModule", "ImageTensorDataset", "load_source"]
