"""Projected gradient descent under L∞, in pixel space ([0, 1]; models normalise inside)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, step_size: float = 2 / 255,
        steps: int = 10, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted L∞ PGD maximising the cross-entropy of ``model`` (Madry et al. 2018).

    The model is put in eval mode while the attack runs (no BatchNorm statistics are
    updated by the attack's own forward passes) and restored afterwards; its parameters
    receive no gradient.

    Args:
        x: ``[N, C, H, W]`` clean images in [0, 1].
        y: ``[N]`` labels.
        eps, step_size, steps: radius, step and number of steps (paper: 8/255, 2/255, 10).
        random_start: start from a uniform point of the ε-ball.

    Returns:
        Adversarial images with ``‖x_adv − x‖_∞ ≤ eps`` and values in [0, 1].
    """
    was_training = model.training
    model.eval()
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x) * 2 - 1
        x_adv = (x + eps * noise).clamp(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()


#: the budget where neither the attack config nor the dataset names one (8/255: natural images)
DEFAULT_EPS = 8 / 255


def pgd_settings(attack, default_eps: float | None = None) -> dict:
    """``eps, step_size, steps, random_start`` of an attack config, as :func:`pgd` takes them.

    A null ``eps`` is ``default_eps`` (a dataset's standard budget, else 8/255); a null
    ``step_size`` is 2.5 · eps / steps (Madry et al.'s rule: 2/255 at 8/255 and 10 steps).
    """
    eps = attack.get("eps")
    eps = float(eps if eps is not None else default_eps if default_eps is not None else DEFAULT_EPS)
    steps, step = int(attack["steps"]), attack.get("step_size")
    return {"eps": eps, "step_size": 2.5 * eps / steps if step is None else float(step), "steps": steps,
            "random_start": bool(attack.get("random_start", True))}


def mix_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float,
                    generator: torch.Generator | None = None, **attack) -> torch.Tensor:
    """Replace a random share ``alpha`` of the batch by PGD examples against ``model``
    (``generator``, a CPU one: which share, and the attack's random start)."""
    if alpha <= 0:
        return x
    count = len(x) if alpha >= 1 else int(round(alpha * len(x)))
    if count == 0:
        return x
    chosen = torch.randperm(len(x), generator=generator).to(x.device)[:count]
    mixed = x.clone()
    mixed[chosen] = pgd(model, x[chosen], y[chosen], generator=generator, **attack)
    return mixed
