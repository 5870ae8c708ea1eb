"""Energy-based OOD detectors on internal representations (Balogh & Jelasity 2025).

For cut point j of the end model g, the detector is a copy of the tail g_{>j}, fine-tuned
with the energy-margin loss of Liu et al. (2020) on native activations g_{≤j}(x) of
in-distribution images versus g_{≤j}(x_out) of outlier images. Its energy
``E(a) = −T·logsumexp(tail(a)/T)`` is low for activations like the native ones. A stitch
T(f_{≤i}(x)) whose activations the detector tells apart from g_{≤j}(x) (AUROC far above
0.5) has created out-of-distribution representations.

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


class EnergyDetector(nn.Module):
    """Energy scores of activations at one cut point, from a fine-tuned copy of the end tail."""

    def __init__(self, tail: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.tail = tail
        self.temperature = temperature

    @torch.no_grad()
    def score(self, activations: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        return torch.cat([energy(self.tail(a), self.temperature).cpu() for a in activations.split(batch_size)])


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
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        out_order = torch.randint(len(outliers), (len(images),), generator=generator)
        for start in range(0, len(images) - batch_size + 1 if len(images) >= batch_size else 1, batch_size):
            pick = order[start:start + batch_size]
            x_in, y_in = images[pick].to(device), labels[pick].to(device)
            x_out = outliers[out_order[start:start + batch_size]].to(device)
            with torch.no_grad():
                a_in, a_out = head(x_in)[0], head(x_out)[0]
            logits = tail(torch.cat([a_in, a_out]))
            loss = energy_margin_loss(logits[: len(a_in)], y_in, logits[len(a_in):], m_in, m_out, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
    bar.close()
    return EnergyDetector(tail.eval().requires_grad_(False)).cpu()
