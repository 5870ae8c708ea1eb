"""Robust accuracy by the official AutoAttack (``pyautoattack``)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from stitching.errors import StitchingError

VERSIONS = ("rand", "standard", "plus")


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
                        version: str = "rand", batch_size: int = 250, seed: int = 0) -> float:
    """Accuracy of ``model`` on AutoAttack's adversarial examples for ``(x, y)``.

    ``version="rand"`` (APGD-CE and APGD-DLR with expectation over transformation) is the
    FuLA paper's choice; ``"standard"`` is the usual four-attack ensemble.
    """
    if version not in VERSIONS:
        raise StitchingError(f"attack.autoattack_version='{version}' is not one of {', '.join(VERSIONS)}")
    from pyautoattack import AutoAttack

    logging.getLogger("pyautoattack").setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    adversary = AutoAttack(model, eps=eps, norm="Linf", version=version, device=device, seed=seed)
    x_adv, _ = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    with torch.no_grad():
        correct = (model(x_adv.to(device)).argmax(1) == y.to(device)).float().mean().item()
    model.train(was_training)
    return correct
