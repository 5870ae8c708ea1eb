import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stitching.data import ImageDataModule, ImageTensorDataset, load_source
from stitching.data.sources import FASHION_MNIST_INSTALLED
from stitching.errors import StitchingError


def test_mnist5k_is_real_embedded_data_with_a_deterministic_split():
    arrays = load_source("mnist5k")
    assert arrays.train_x.shape == (4000, 3, 32, 32) and arrays.test_x.shape == (1000, 3, 32, 32)
    assert arrays.train_x.dtype == torch.uint8
    assert torch.bincount(arrays.test_y).tolist() == [100] * 10
    assert arrays.train_x[:, :, :2].max() == 0  # the 28×28 digits are padded, not stretched
    again = load_source("mnist5k")
    assert torch.equal(arrays.test_x, again.test_x) and torch.equal(arrays.train_y, again.train_y)
    other = load_source("mnist5k", split_seed=1)
    assert not torch.equal(arrays.test_x, other.test_x)


def test_digits_upsampled_to_the_configured_size():
    arrays = load_source("digits", image_size=16)
    assert arrays.train_x.shape[1:] == (3, 16, 16)
    assert len(arrays.train_y) + len(arrays.test_y) == 1797


def test_augmentation_crops_with_padding_and_flips():
    image = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    plain = ImageTensorDataset(image, torch.tensor([0]))
    assert torch.equal(plain[0][0], image[0].float() / 255)
    torch.manual_seed(0)
    shifted = ImageTensorDataset(image, torch.tensor([0]), crop_padding=2)
    outputs = {tuple(shifted[0][0][0].flatten().tolist()) for _ in range(40)}
    assert len(outputs) > 5  # different crops
    assert any(0.0 in out for out in outputs)  # zero padding shows up
    flips = ImageTensorDataset(image, torch.tensor([0]), hflip=True)
    seen = {tuple(flips[0][0][0, 0].tolist()) for _ in range(40)}
    assert seen == {tuple((torch.arange(4.0) / 255).tolist()), tuple((torch.arange(3.0, -1, -1) / 255).tolist())}


def test_class_subset_and_normalisation():
    full = ImageDataModule("digits", num_classes=10, source={"image_size": 16})
    subset = ImageDataModule("digits", num_classes=10, num_classes_train=3, source={"image_size": 16})
    subset.setup()
    assert set(subset.arrays.train_y.tolist()) == {0, 1, 2}
    assert set(subset.arrays.test_y.tolist()) == set(range(10))  # evaluation keeps every class
    mean, std = full.normalization()
    x = full.train_dataset(augment=False)
    stacked = torch.stack([x[i][0] for i in range(len(x))])
    assert mean == pytest.approx(stacked.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert std == pytest.approx(stacked.std(dim=(0, 2, 3)).tolist(), abs=1e-4)


def test_dm_samples_are_seeded_and_unaugmented():
    dm = ImageDataModule("digits", num_classes=10, augment={"crop_padding": 2}, source={"image_size": 16})
    a, b = dm.sample_train_images(100, seed=3), dm.sample_train_images(100, seed=3)
    assert a.shape == (100, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, dm.sample_train_images(100, seed=4))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-batches-py"), ("svhn", "train_32x32.mat")])
def test_offline_torchvision_dataset_names_the_expected_folder(tmp_path, name, expected):
    with pytest.raises(StitchingError, match=expected) as info:
        load_source(name, data_dir=tmp_path, download=False)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def _write_batch(path, labels, rng):
    data = rng.integers(0, 256, size=(len(labels), 3 * 8 * 8), dtype=np.uint8)
    with open(path, "wb") as fh:
        pickle.dump({"data": data, "labels": list(labels), "mean": data.mean(0)}, fh)
    return data


def test_ls_imagenet10_reads_batch_files_and_draws_classes_by_seed(tmp_path):
    folder = tmp_path / "imagenet8"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1, 21), 3)  # 20 source classes, 1-based, 3 images each
    train = _write_batch(folder / "train_data_batch_1", labels, rng)
    _write_batch(folder / "train_data_batch_2", labels, rng)
    _write_batch(folder / "val_data", labels, rng)
    arrays = load_source("ls_imagenet10", data_dir=tmp_path, image_size=8, num_source_classes=20, class_seed=0)
    chosen = np.sort(np.random.default_rng(0).choice(20, size=10, replace=False)) + 1
    assert arrays.train_x.shape == (60, 3, 8, 8) and arrays.test_x.shape == (30, 3, 8, 8)
    assert sorted(set(arrays.train_y.tolist())) == list(range(10))
    first = np.flatnonzero(labels == chosen[0])[0]
    assert torch.equal(arrays.train_x[0], torch.from_numpy(train[first].reshape(3, 8, 8)))
    other = load_source("ls_imagenet10", data_dir=tmp_path, image_size=8, num_source_classes=20, class_seed=1)
    assert not torch.equal(arrays.train_x, other.train_x)


def test_ls_imagenet10_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(StitchingError, match="imagenet32 and it could not be downloaded.*train_data_batch_"):
        load_source("ls_imagenet10", data_dir=tmp_path)


def _stream_images(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=generator), torch.arange(n) % 10


def test_batched_crops_are_windows_of_the_padded_image():
    from torch.nn import functional as F

    from stitching.data.datamodule import crop_batch

    x = torch.rand(16, 3, 12, 12)
    offsets = torch.randint(0, 5, (16, 2), generator=torch.Generator().manual_seed(0))
    cropped = crop_batch(x, 2, offsets)
    for b, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(cropped[b], F.pad(x[b], (2, 2, 2, 2))[:, top:top + 12, left:left + 12])


def test_the_batch_stream_flips_and_crops_only_as_configured_and_repeats_by_seed():
    from stitching.data.datamodule import BatchStream

    images, labels = _stream_images()
    plain = BatchStream(images, labels, 16, seed=3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3 * 1_000_003))
    batches = list(plain)
    assert len(plain) == len(batches) == 3
    # no augmentation: the images themselves, in the seed's order, every one once
    assert torch.equal(torch.cat([x for x, _ in batches]), images[order].float() / 255)
    assert torch.equal(torch.cat([y for _, y in batches]), labels[order])
    stream = BatchStream(images, labels, 40, hflip=True, seed=1)
    pick_order = torch.randperm(40, generator=torch.Generator().manual_seed(1 * 1_000_003))
    (x, y), = list(stream)
    base = images[pick_order].float() / 255
    flipped = [bool(torch.equal(x[b], base[b].flip(-1))) for b in range(40)]
    kept = [bool(torch.equal(x[b], base[b])) for b in range(40)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    cropping = BatchStream(images, labels, 40, crop_padding=2, seed=1)
    (cropped, _), = list(cropping)
    assert not any(torch.equal(cropped[b], base[b].flip(-1)) and not torch.equal(base[b], base[b].flip(-1))
                   for b in range(40))  # no flip when hflip is off
    again = BatchStream(images, labels, 40, crop_padding=2, seed=1)
    assert torch.equal(next(iter(again))[0], cropped)  # same seed, same first epoch
    assert not torch.equal(next(iter(again))[0], cropped)  # the next epoch draws anew


def test_batched_shortcut_markers_are_pixel_identical_to_per_image_ones():
    from stitching.data.datamodule import BatchStream
    from stitching.data.shortcuts import Shortcut

    images, labels = _stream_images()
    for placement in ("pattern", "location", "both"):
        shortcut = Shortcut("pixels", placement, 10, 12, channels=3, size=3, seed=5)
        stream = BatchStream(images, labels, 16, shortcut=shortcut, seed=2)
        order = torch.randperm(40, generator=torch.Generator().manual_seed(2 * 1_000_003))
        for start, (x, y) in zip(range(0, 40, 16), stream):
            for b, index in enumerate(order[start:start + 16].tolist()):
                expected = shortcut(images[index].float() / 255, labels[index], index)
                assert torch.equal(x[b], expected), (placement, index)


def test_synthetic_images_are_cifar_sized_seeded_noise_and_compose():
    from stitching.build import compose_config

    arrays = load_source("synthetic", train_images=40, test_images=8, seed=3)
    assert arrays.train_x.shape == (40, 3, 32, 32) and arrays.train_x.dtype == torch.uint8
    assert arrays.test_x.shape == (8, 3, 32, 32) and set(arrays.train_y.tolist()) <= set(range(10))
    assert arrays.train_x.float().std() > 60  # uniform on 0..255: std 73.9
    again = load_source("synthetic", train_images=40, test_images=8, seed=3)
    assert torch.equal(arrays.train_x, again.train_x) and torch.equal(arrays.test_y, again.test_y)
    assert not torch.equal(arrays.train_x, load_source("synthetic", train_images=40, test_images=8, seed=4).train_x)
    cfg = compose_config(["dataset=synthetic"])
    assert cfg.dataset.source.train_images == 50000 and cfg.dataset.source.num_classes == 10


def test_subsets_are_spread_over_the_whole_split_not_its_first_items():
    """One draw per equal block (every block hit once, seeded), classes in their proportions
    (counted independently), and a topic-ordered corpus sampled from all of its topics."""
    from collections import Counter

    from stitching.data.sampling import spread_sample, stratified_sample
    from stitching.data.text import TextDataModule

    picked = spread_sample(10, 103, seed=4)
    edges = [k * 103 // 10 for k in range(11)]  # one in each tenth
    assert all(edges[k] <= picked[k] < edges[k + 1] for k in range(10))
    assert torch.equal(picked, spread_sample(10, 103, seed=4)) and not torch.equal(picked, spread_sample(10, 103, seed=5))
    assert torch.equal(spread_sample(200, 103), torch.arange(103))
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)  # sorted by class, as many splits are
    chosen = stratified_sample(labels, 20, seed=1)
    assert Counter(labels[chosen].tolist()) == {0: 12, 1: 6, 2: 2} and len(set(chosen.tolist())) == 20
    assert Counter(labels[stratified_sample(labels, 7, seed=1)].tolist()) == {0: 4, 1: 2, 2: 1}  # 4.2, 2.1, 0.7
    corpus = TextDataModule(train_sequences=40, test_sequences=8)
    corpus.setup()
    whole = TextDataModule()
    whole.setup()
    rows = {tuple(row.tolist()): k for k, row in enumerate(whole.arrays.train)}
    where = sorted(rows[tuple(row.tolist())] for row in corpus.arrays.train)
    assert where[-1] > 0.9 * len(whole.arrays.train) and where[0] < 0.1 * len(whole.arrays.train)
    assert corpus.subsets["train_sequences"] == {"kept": 40, "of": len(whole.arrays.train),
                                                 "how": "one per equal block of the split", "seed": 0}


def _fashion_mnist_installed():
    found = (Path(FASHION_MNIST_INSTALLED) / "t10k-labels-idx1-ubyte.gz").is_file()
    if not found and os.environ.get("STITCHING_REQUIRE_FMNIST"):  # CI installs it: a skip there would hide a failure
        pytest.fail("Fashion-MNIST is not installed although STITCHING_REQUIRE_FMNIST is set: run make data-fmnist")
    return found


@pytest.mark.skipif(not _fashion_mnist_installed(), reason="dataset-fashion-mnist is not installed (make data-fmnist)")
def test_fashion_mnist_is_read_from_the_installed_package(tmp_path):
    data = load_source("fmnist", data_dir=tmp_path, download=False, installed=FASHION_MNIST_INSTALLED)
    assert data.train_x.shape == (60_000, 3, 32, 32) and data.test_x.shape == (10_000, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8
    assert torch.bincount(data.train_y).tolist() == [6_000] * 10 and torch.bincount(data.test_y).tolist() == [1_000] * 10
    with gzip.open(f"{FASHION_MNIST_INSTALLED}/t10k-images-idx3-ubyte.gz") as f:  # the idx format read by hand
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{FASHION_MNIST_INSTALLED}/t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    assert np.array_equal(data.test_x[:, 0, 2:30, 2:30].numpy(), raw) and np.array_equal(data.test_y.numpy(), labels)
    assert data.test_x[:, :, :2].max() == 0 and torch.equal(data.test_x[:, 0], data.test_x[:, 2])  # padded, grey ×3
    again = load_source("fmnist", data_dir=tmp_path, download=False, installed=tmp_path / "gone")  # unpacked once
    assert torch.equal(again.test_x, data.test_x)


def test_fashion_mnist_missing_says_how_to_install_it(tmp_path):
    with pytest.raises(StitchingError, match=r"Fashion-MNIST is neither in .* nor installed in .*: install it with "
                                             r"make data-fmnist"):
        load_source("fmnist", data_dir=tmp_path, download=False, installed=tmp_path / "nowhere")
