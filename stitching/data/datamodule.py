"""The LightningDataModule every run uses, whatever the source."""

from __future__ import annotations

from functools import lru_cache

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from stitching.data.sampling import describe, stratified_sample
from stitching.data.shortcuts import Shortcut
from stitching.data.sources import ImageArrays, load_source
from stitching.errors import StitchingError


class ImageTensorDataset(Dataset):
    """uint8 images in memory → float images in [0, 1], with the paper's augmentation.

    Args:
        images: ``[N, C, H, W]`` uint8.
        labels: ``[N]`` int64.
        crop_padding: zero padding before a random crop back to the original size (0: off).
        hflip: random horizontal flip with probability 0.5.
        shortcut: adds the class's shortcut marker after augmentation (so it is never cropped).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop_padding: int = 0, hflip: bool = False,
                 shortcut: Shortcut | None = None):
        self.images = images
        self.labels = labels
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.shortcut = shortcut

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255)
        if self.crop_padding:
            p = self.crop_padding
            height, width = image.shape[-2:]
            padded = F.pad(image, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[:, top : top + height, left : left + width]
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.shortcut is not None:
            image = self.shortcut(image, self.labels[index], index)
        return image, self.labels[index]


def crop_batch(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Random crops of a batch: zero-pad ``x`` ``[B, C, H, W]`` by ``padding`` and cut each image's
    ``H × W`` window at its ``offsets[b] = (top, left)`` (each in ``0..2·padding``)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [B, W]
    picked = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()  # [B, H, W, C] → [B, C, H, W], NCHW memory as loaded


class BatchStream:
    """The training split as shuffled, augmented batches made whole on the device.

    Images stay uint8 on ``device``; each batch is gathered, converted, cropped, flipped and
    marked (shortcut) as one tensor — the same distributions as :class:`ImageTensorDataset`'s
    per-image augmentation (crop offsets uniform in ``0..2p`` per axis, flips with probability
    ½, each image's own shortcut marker after augmentation), with no per-image Python per batch.
    The order and the augmentations of epoch ``e`` follow from ``(seed, e)`` alone, so a single
    run and a fused grid with the same seed see the same batches. Under DDP every rank takes
    its share of each batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, crop_padding: int = 0,
                 hflip: bool = False, shortcut: Shortcut | None = None, seed: int = 0, device="cpu"):
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.crop_padding, self.hflip, self.seed = batch_size, crop_padding, hflip, seed
        self.marks = shortcut.table(labels) if shortcut is not None else None  # every image's marker, once
        if self.marks is not None:
            self.marks = tuple(t.to(self.device) for t in self.marks)
        self.size = shortcut.size if shortcut is not None else 0
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.labels), generator=generator)
        rank, world = _rank_and_world()
        for start in range(0, len(order), self.batch_size):
            pick = order[start:start + self.batch_size]
            x, y = self.batch(pick, generator)
            yield (x[rank::world], y[rank::world]) if world > 1 else (x, y)

    def batch(self, pick: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``pick`` (training indices) augmented with draws from ``generator``."""
        on_device = pick.to(self.device)
        x = self.images[on_device].float().div_(255)
        if self.crop_padding:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (len(pick), 2), generator=generator)
            x = crop_batch(x, self.crop_padding, offsets.to(self.device))
        if self.hflip:
            flip = (torch.rand(len(pick), generator=generator) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.marks is not None:
            patches, corners = self.marks
            x = paste_batch(x, patches[on_device], corners[on_device])
        return x, self.labels[on_device]


def paste_batch(x: torch.Tensor, patches: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """``x`` with each image's ``patches[b]`` ``[C, s, s]`` written at ``corners[b] = (top, left)``."""
    b, s = len(x), patches.shape[-1]
    rows = corners[:, :1] + torch.arange(s, device=x.device)
    cols = corners[:, 1:] + torch.arange(s, device=x.device)
    x = x.clone()
    x[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]] = patches.permute(0, 2, 3, 1)
    return x


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@lru_cache(maxsize=4)
def _cached_source(name: str, frozen_options: tuple) -> ImageArrays:
    return load_source(name, **dict(frozen_options))


class ImageDataModule(L.LightningDataModule):
    """Train/test splits of one dataset, deterministic for a given configuration.

    Args:
        name: a source of :mod:`stitching.data.sources`.
        num_classes: classes of the full dataset.
        batch_size, num_workers: loader settings.
        augment: ``{"crop_padding": int, "hflip": bool}`` for the training split.
        mean, std: per-channel normalisation; ``None`` computes it from the training split.
        num_classes_train: keep only classes ``0..k-1`` in the training split (the test
            split keeps every class).
        train_subset: keep only this many training images, each class in proportion (a seeded
            stratified draw; ``None``: all).
        test_subset: test on only this many test images, each class in proportion (a seeded
            stratified draw, the same for every run of a dataset; ``None``: all).
        source: options passed to the source loader (``data_dir``, ``image_size``, …).
        shortcut: ``{kind, placement, size, seed}`` marks every training image with its
            class's shortcut (see :mod:`stitching.data.shortcuts`); ``None`` or kind null: off.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: dict | None = None,
        mean=None,
        std=None,
        num_classes_train: int | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
        source: dict | None = None,
        shortcut: dict | None = None,
        **_ignored,
    ):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = dict(augment or {})
        self._mean, self._std = mean, std
        self.num_classes_train = num_classes_train
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.seed = seed
        self.subsets: dict = {}  # how each subset was drawn, for the record
        self.source = dict(source or {})
        self.shortcut_options = dict(shortcut) if shortcut and shortcut.get("kind") else None
        self.shortcut: Shortcut | None = None
        self.stream_seed, self.device = 0, torch.device("cpu")  # the run's seed and device (set by the run)
        if num_classes_train is not None and not 1 <= num_classes_train <= num_classes:
            raise StitchingError(
                f"dataset.num_classes_train={num_classes_train} must lie in 1..{num_classes}"
            )
        self.arrays: ImageArrays | None = None

    # -- loading ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        arrays = _cached_source(self.name, tuple(sorted(self.source.items())))
        train_x, train_y = arrays.train_x, arrays.train_y
        if self.num_classes_train is not None:
            keep = train_y < self.num_classes_train
            train_x, train_y = train_x[keep], train_y[keep]
        if self.train_subset is not None:  # every class in proportion, drawn at random (seeded)
            self.subsets["train_subset"] = describe(min(self.train_subset, len(train_y)), len(train_y),
                                                    "stratified by class", self.seed)
            pick = stratified_sample(train_y, self.train_subset, self.seed)
            train_x, train_y = train_x[pick], train_y[pick]
        test_x, test_y = arrays.test_x, arrays.test_y
        if self.test_subset is not None:  # the same stratified draw for every run: paired comparisons
            self.subsets["test_subset"] = describe(min(self.test_subset, len(test_y)), len(test_y),
                                                   "stratified by class", self.seed)
            pick = stratified_sample(test_y, self.test_subset, self.seed)
            test_x, test_y = test_x[pick], test_y[pick]
        self.arrays = ImageArrays(train_x, train_y, test_x, test_y)
        if self.shortcut_options:
            self.shortcut = Shortcut(num_classes=self.num_classes, image_size=train_x.shape[-1],
                                     channels=train_x.shape[1], **self.shortcut_options)

    # -- facts the models need ---------------------------------------------------------
    @property
    def in_channels(self) -> int:
        self.setup()
        return self.arrays.train_x.shape[1]

    @property
    def image_size(self) -> int:
        self.setup()
        return int(self.arrays.train_x.shape[-1])

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (or the configured ones)."""
        if self._mean is not None and self._std is not None:
            return list(self._mean), list(self._std)
        self.setup()
        x = self.arrays.train_x.float().div(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()

    # -- datasets and loaders ------------------------------------------------------------
    def train_dataset(self, augment: bool = True) -> ImageTensorDataset:
        self.setup()
        options = self.augment if augment else {}
        return ImageTensorDataset(
            self.arrays.train_x, self.arrays.train_y,
            crop_padding=int(options.get("crop_padding", 0)), hflip=bool(options.get("hflip", False)),
            shortcut=self.shortcut,
        )

    def test_dataset(self, with_shortcut: bool = False) -> ImageTensorDataset:
        """The test split, clean or (``with_shortcut``) carrying every image's class marker."""
        self.setup()
        return ImageTensorDataset(self.arrays.test_x, self.arrays.test_y,
                                  shortcut=self.shortcut if with_shortcut else None)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, drop_last=False,
        )

    def train_dataloader(self) -> BatchStream:
        """The stitching batches: augmented whole on ``self.device``, ordered by ``self.stream_seed``."""
        self.setup()
        return BatchStream(self.arrays.train_x, self.arrays.train_y, self.batch_size,
                           int(self.augment.get("crop_padding", 0)), bool(self.augment.get("hflip", False)),
                           self.shortcut, self.stream_seed, self.device)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset(), shuffle=False)

    def sample_train_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` un-augmented training images in [0, 1] (the DM initialisation's samples).

        With a shortcut configured they carry it, like every other stitching image.
        """
        self.setup()
        count = len(self.arrays.train_y)
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(count, generator=generator)[: min(n, count)]
        images = self.arrays.train_x[pick].float().div(255)
        if self.shortcut is not None:
            images = torch.stack([self.shortcut(img, self.arrays.train_y[i], int(i)) for img, i in zip(images, pick)])
        return images

    def test_tensors(self, n: int | None = None, with_shortcut: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` test images (all when ``None``) and labels, as tensors."""
        dataset = self.test_dataset(with_shortcut)
        count = len(dataset) if n is None else min(n, len(dataset))
        pairs = [dataset[i] for i in range(count)]
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
