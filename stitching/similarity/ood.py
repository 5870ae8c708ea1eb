"""Energy-based OOD detectors on internal representations (Balogh & Jelasity 2025).

For cut point j of the end model g, a detector is a classifier of the activations
g_{≤j}(x), fine-tuned with the energy-margin loss of Liu et al. (2020) on native activations of
in-distribution images versus g_{≤j}(x_out) of outlier images (outlier exposure). Its energy
``E(a) = −T·logsumexp(net(a)/T)`` is low for activations like the native ones. A stitch
T(f_{≤i}(x)) whose activations the detector tells apart from g_{≤j}(x) (AUROC far above
0.5) has created out-of-distribution representations. Two kinds of classifier:

* ``separate`` — as the TLM-vs-DM authors' ``exec_train_representation_classifier.py``: a
  separate network (the activation resized to the input images' size, then a freshly
  initialised ResNet18 whose stem reads the activation's channels), trained on the activations
  with cross-entropy, then fine-tuned against the outliers; Adam, weight decay 1e-5, the
  learning rate ×0.1 halfway through the fine-tuning;
* ``tail`` — a copy of the end tail g_{>j}, fine-tuned against the outliers only (SGD with
  momentum and a cosine schedule, as Liu et al. fine-tune a trained classifier).

Outliers, on any machine: ``patch_shuffle`` (the in-distribution images with their
patches permuted: local statistics kept, global structure broken), ``noise`` (uniform
noise images), or the name of another dataset (resized to the in-distribution images).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from stitching.errors import StitchingError
from stitching.models.cutting import split
from stitching.models.resnet import resnet18

OUTLIER_KINDS = ("patch_shuffle", "noise")


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy ``−T·logsumexp(logits / T)`` per row (higher = more out-of-distribution)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def energy_margin_loss(logits_in: torch.Tensor, labels_in: torch.Tensor, logits_out: torch.Tensor,
                       m_in: float = -25.0, m_out: float = -7.0, weight: float = 0.1) -> torch.Tensor:
    """``CE(in) + weight·(E[max(0, E_in − m_in)²] + E[max(0, m_out − E_out)²])`` (Liu et al. 2020)."""
    hinge_in = F.relu(energy(logits_in) - m_in).pow(2).mean()
    hinge_out = F.relu(m_out - energy(logits_out)).pow(2).mean()
    return F.cross_entropy(logits_in, labels_in) + weight * (hinge_in + hinge_out)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve for telling ``positive`` scores (higher) from ``negative``:
    P(p > n) + ½·P(p = n) over all pairs, by ranks (Mann–Whitney U), ties averaged."""
    positive, negative = positive.double().flatten().cpu(), negative.double().flatten().cpu()
    if not len(positive) or not len(negative):
        raise StitchingError("AUROC needs at least one score on each side")
    scores = torch.cat([positive, negative])
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    unique, inverse = torch.unique(sorted_scores, return_inverse=True)
    if len(unique) < len(scores):  # average the ranks of tied scores
        total = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        count = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks[order] = (total / count)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def outlier_images(images: torch.Tensor, kind: str, seed: int = 0, patch: int | None = None) -> torch.Tensor:
    """Outliers made from in-distribution ``images`` [N, C, H, W] in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.rand(images.shape, generator=generator)
    if kind == "patch_shuffle":
        n, c, h, w = images.shape
        p = patch or max(1, h // 4)
        if h % p or w % p:
            raise StitchingError(f"patch_shuffle needs patches that tile {h}×{w} images; got {p}")
        tiles = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c, p, p)
        perms = torch.stack([torch.randperm(tiles.shape[1], generator=generator) for _ in range(n)])
        tiles = tiles[torch.arange(n)[:, None], perms]
        return tiles.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    raise StitchingError(f"unknown outlier kind '{kind}'; choose {', '.join(OUTLIER_KINDS)} or a dataset name")


def match_images(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize ``images`` and adapt their channels to those of ``like`` (for a foreign outlier dataset)."""
    if images.shape[1] != like.shape[1]:
        images = images.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1)
    if images.shape[-2:] != like.shape[-2:]:
        images = F.interpolate(images, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return images.contiguous()


class RepresentationClassifier(nn.Module):
    """A classifier of one cut point's activations: each activation resized (bilinear) to the
    input images' ``size``, then a freshly initialised width-``width`` ResNet18 whose stem reads
    the activation's ``channels``."""

    def __init__(self, channels: int, size: tuple[int, int], num_classes: int, width: int):
        super().__init__()
        self.size = tuple(size)
        self.net = resnet18(num_classes=num_classes, width=width, in_channels=channels, mean=(0.0,) * channels,
                            std=(1.0,) * channels)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4:
            raise StitchingError("a separate OOD detector reads conv activations [N, C, H, W]; use "
                                 "evaluation.ood.detector=tail for token sequences")
        if tuple(a.shape[-2:]) != self.size:
            a = F.interpolate(a, size=self.size, mode="bilinear", align_corners=False)
        return self.net(a)


class EnergyDetector(nn.Module):
    """Energy scores of activations at one cut point, from ``net`` (activations → logits)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.temperature = temperature

    @torch.no_grad()
    def logits(self, activations: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        device = next(self.net.parameters()).device
        return torch.cat([self.net(a.to(device)).cpu() for a in activations.split(batch_size)])

    def score(self, activations: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return energy(self.logits(activations, batch_size), self.temperature)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches of one epoch (the last partial batch dropped when there is a full one)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
        yield order[start:start + batch_size]


def _outlier_exposure(net: nn.Module, head: nn.Module, images, labels, outliers, epochs: int, batch_size: int,
                      optimizer, scheduler, generator: torch.Generator, device, bar, margins: tuple) -> None:
    """``epochs`` of the energy-margin loss on ``net``: each batch of in-distribution activations
    beside as many outlier ones (drawn with replacement), both from the frozen ``head``."""
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        out_order = torch.randint(len(outliers), (len(images),), generator=generator)
        for start in range(0, len(images) - batch_size + 1 if len(images) >= batch_size else 1, batch_size):
            pick = order[start:start + batch_size]
            x_in, y_in = images[pick].to(device), labels[pick].to(device)
            x_out = outliers[out_order[start:start + batch_size]].to(device)
            with torch.no_grad():
                a_in, a_out = head(x_in)[0], head(x_out)[0]
            logits = net(torch.cat([a_in, a_out]))
            loss = energy_margin_loss(logits[: len(a_in)], y_in, logits[len(a_in):], *margins)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()


def fit_separate_detector(end: nn.Module, layer: int, images: torch.Tensor, labels: torch.Tensor,
                          outliers: torch.Tensor, num_classes: int, width: int, pretrain_epochs: int,
                          epochs: int, lr: float = 1e-3, batch_size: int = 128, m_in: float = -25.0,
                          m_out: float = -7.0, weight: float = 0.1, seed: int = 0,
                          device: torch.device | str = "cpu", progress: bool = False) -> EnergyDetector:
    """A :class:`RepresentationClassifier` on ``end``'s cut point ``layer``: ``pretrain_epochs``
    of cross-entropy on the activations of ``images``, then ``epochs`` of the energy-margin loss
    against ``outliers`` (the learning rate ×0.1 after half of them). The activations come from
    ``end``'s frozen, eval-mode head; the classifier's initialisation and batches from ``seed``."""
    head, _ = split(copy.deepcopy(end).to(device), layer)
    head.eval().requires_grad_(False)
    with torch.no_grad():
        sample = head(images[:2].to(device))[0]
    if sample.dim() != 4:
        raise StitchingError(f"cut point {layer} gives token sequences; a separate OOD detector reads conv activations: "
                             f"use evaluation.ood.detector=tail")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RepresentationClassifier(sample.shape[1], tuple(images.shape[-2:]), num_classes, width).to(device)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(images) // batch_size)
    bar = tqdm(total=(pretrain_epochs + epochs) * per_epoch, desc=f"OOD detector (layer {layer})", disable=not progress,
               leave=False)

    def activations(x):
        with torch.no_grad():
            return head(x.to(device))[0]

    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    for _ in range(pretrain_epochs):
        for pick in _batches(len(images), batch_size, generator):
            loss = F.cross_entropy(net(activations(images[pick])), labels[pick].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(1, epochs * per_epoch // 2)], 0.1)
    _outlier_exposure(net, head, images, labels, outliers, epochs, batch_size, optimizer, scheduler, generator, device,
                      bar, (m_in, m_out, weight))
    bar.close()
    return EnergyDetector(net.eval().requires_grad_(False)).cpu()


def fit_energy_detector(end: nn.Module, layer: int, images: torch.Tensor, labels: torch.Tensor,
                        outliers: torch.Tensor, epochs: int = 3, lr: float = 1e-3, batch_size: int = 128,
                        m_in: float = -25.0, m_out: float = -7.0, weight: float = 0.1, seed: int = 0,
                        device: torch.device | str = "cpu", progress: bool = False) -> EnergyDetector:
    """Fine-tune a copy of ``end``'s tail after cut point ``layer`` with the energy-margin loss.

    ``images``/``labels``: in-distribution training data; ``outliers``: images of the
    outlier set. Their activations g_{≤j} come from ``end``'s (frozen, eval-mode) head.
    SGD with momentum 0.9 and a cosine schedule, as Liu et al. fine-tune.
    """
    head, tail = split(copy.deepcopy(end).to(device), layer)
    head.eval().requires_grad_(False)
    tail.train().requires_grad_(True)
    optimizer = torch.optim.SGD(tail.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * max(1, len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"energy detector (layer {layer})", disable=not progress, leave=False)
    _outlier_exposure(tail, head, images, labels, outliers, epochs, batch_size, optimizer, scheduler, generator, device,
                      bar, (m_in, m_out, weight))
    bar.close()
    return EnergyDetector(tail.eval().requires_grad_(False)).cpu()
