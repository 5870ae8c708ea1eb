"""Datasets: embedded defaults, torchvision sources, low-resolution ImageNet."""

from stitching.data.datamodule import ImageDataModule, ImageTensorDataset
from stitching.data.shortcuts import Shortcut, save_examples
from stitching.data.sources import SOURCES, ImageArrays, load_source

__all__ = ["SOURCES", "ImageArrays", "ImageDataModule", "ImageTensorDataset", "Shortcut", "load_source", "save_examples"]
