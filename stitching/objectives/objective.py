"""The five objectives as plain objects: what each reads, and its pure loss (:mod:`.losses`).

An objective knows nothing of training loops. The engine (:mod:`stitching.engine`) asks it
what one stitched pass must provide — reference activations at the end layer only
(``targets="end"``) or at every cut point from it on (``"all"``), the reference's output
(``needs_teacher``), the tail's later activations (``needs_features``), whether the loss
backpropagates through the tail (``tail_grad``) — and then calls :meth:`Objective.loss`.
"""

from __future__ import annotations

import torch

from stitching.errors import StitchingError
from stitching.objectives import losses


class Objective:
    """Base: a trained objective's reading list and loss.

    ``task`` is the end model's task (:mod:`.tasks`), which decides what the soft and task
    losses mean on images, tokens or a bare encoder.
    """

    name = ""
    trainable = True  # False: the DM initialisation is final
    needs_task_head = False  # True: the loss reads the end model's predictions
    targets: str | None = None  # None | "end" | "all"
    needs_teacher = False
    needs_features = False
    tail_grad = True

    def __init__(self, weights="uniform"):
        self.weights_spec = weights

    def hint_weights(self, num_terms: int) -> torch.Tensor | None:
        """FuLA's weight vector over ``num_terms`` hints (``None`` for the others)."""
        return None

    def loss(self, stitched: list[torch.Tensor], logits: torch.Tensor, targets: list[torch.Tensor],
             teacher: torch.Tensor | None, y, mask: torch.Tensor | None, task,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """The objective on one stitched pass: ``stitched`` = ``[a, later activations…]`` (later
        ones only with ``needs_features``), ``targets`` = the reference's activations from the
        end layer on (or at it only), ``teacher`` = the reference's output, ``mask`` = real tokens."""
        raise NotImplementedError


class DM(Objective):
    """Direct matching: the closed-form initialisation is the answer; nothing to train."""

    name = "dm"
    trainable = False


class Hint(Objective):
    """Structural hint at the stitching point, trained by SGD on the whole training set."""

    name = "hint"
    targets = "end"
    tail_grad = False  # the tail still runs, so its BN statistics see stitched data

    def loss(self, stitched, logits, targets, teacher, y, mask, task, weights=None):
        return losses.hint_loss(stitched[0], targets[0], mask)


class Fula(Objective):
    """Functional latent alignment: hints at the stitching point and every later cut point."""

    name = "fula"
    targets = "all"
    needs_features = True

    def hint_weights(self, num_terms: int) -> torch.Tensor:
        return losses.fula_weights(self.weights_spec, num_terms)

    def loss(self, stitched, logits, targets, teacher, y, mask, task, weights=None):
        return losses.fula_loss(stitched, targets, weights, mask)


class Slm(Objective):
    """Soft-label matching: cross-entropy against the end model's predictions."""

    name = "slm"
    needs_task_head = True
    needs_teacher = True

    def loss(self, stitched, logits, targets, teacher, y, mask, task, weights=None):
        return task.soft_loss(logits, teacher, y)


class Tlm(Objective):
    """Task-loss matching: cross-entropy against the true labels (next tokens for a language model)."""

    name = "tlm"
    needs_task_head = True

    def loss(self, stitched, logits, targets, teacher, y, mask, task, weights=None):
        return task.loss(logits, y)


OBJECTIVES: dict[str, type[Objective]] = {kind.name: kind for kind in (DM, Hint, Fula, Slm, Tlm)}


def make_objective(name: str, weights="uniform") -> Objective:
    """The objective ``name`` (``weights``: FuLA's hint weights; the others have none)."""
    if name not in OBJECTIVES:
        raise StitchingError(f"unknown objective '{name}'; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](weights)
