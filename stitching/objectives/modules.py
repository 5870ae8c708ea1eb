"""One thin LightningModule per objective; the math lives in :mod:`.losses`."""

from __future__ import annotations

import lightning as L
import torch
import torchmetrics
from torch import nn

from stitching.attacks import mix_adversarial, pgd_settings
from stitching.errors import NonFiniteError, StitchingError
from stitching.models.cutting import Head, Tail, cut_point_activations
from stitching.models.language import token_ids
from stitching.objectives import losses
from stitching.objectives.tasks import IGNORE, Classification, NextToken, Representation, task_of
from stitching.stitch_layers import Stitch, TokenStitch


class StitchedNetwork(nn.Module):
    """``h = g_{>j} ∘ T ∘ f_{≤i}`` with frozen front and end.

    The front head and end tail keep ``requires_grad=False``. In training mode their
    BatchNorm layers use batch statistics and update their running statistics, as in the
    papers; ``update_bn=False`` keeps them in eval mode instead, buffers untouched.
    """

    def __init__(self, front: Head, stitch: Stitch | TokenStitch, end: Tail, update_bn: bool = True):
        super().__init__()
        self.front = front
        self.stitch = stitch
        self.end = end
        self.update_bn = update_bn
        for part in (front, end):
            part.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.update_bn:
            self.front.eval()
            self.end.eval()
        return self

    def stitched_activation(self, x) -> torch.Tensor:
        a, _ = self.front(x)
        return self.stitch(a)

    def forward(self, x, return_features: bool = False):
        """Logits, or ``(logits, [a, later cut-point activations…])`` with features.

        The end tail runs with the end model's own context of ``x`` (mask, positions).
        """
        a = self.stitched_activation(x)
        context = self.end.context(x)
        if not return_features:
            return self.end(a, context)
        logits, later = self.end(a, context, return_features=True)
        return logits, [a, *later]


class StitchingModule(L.LightningModule):
    """Shared base: optimiser over the stitch only, accuracy metrics, test loop.

    Args:
        network: the stitched network.
        reference: an untouched copy of the end model, kept in eval mode, for targets.
        end_layer: 1-based cut point j of the end model.
        lr, weight_decay: Adam settings for the stitch.
        num_classes: for the accuracy metrics.
        adversarial: ``alpha`` (share of each batch replaced by PGD examples generated
            against the stitched network) and the PGD settings; ``None`` or α = 0: clean.
    """

    trainable = True  # False: the DM initialisation is final
    needs_task_head = False  # True: the loss reads the end model's predictions

    def __init__(self, network: StitchedNetwork, reference: nn.Module, end_layer: int,
                 num_classes: int, lr: float = 1e-3, weight_decay: float = 1e-4,
                 adversarial: dict | None = None):
        super().__init__()
        self.adversarial = dict(adversarial or {})
        self.network = network
        self.reference = reference.eval().requires_grad_(False)
        self.end_layer = end_layer
        self.lr = lr
        self.weight_decay = weight_decay
        self.curve: list[float] = []  # mean training loss of each finished epoch
        self._epoch_loss = [0.0, 0]
        self.task = task_of(self.reference)
        if self.needs_task_head and isinstance(self.task, Representation):
            raise StitchingError(f"objective {type(self).__name__.removesuffix('Module').lower()} needs an end model "
                                 f"with a task head (a classifier or a language-model head); this end model is a "
                                 f"bare encoder: use dm, hint or fula")
        if float(self.adversarial.get("alpha", 0.0)) > 0 and not isinstance(self.task, Classification):
            raise StitchingError("adversarial stitching (attack.alpha > 0) applies to image classifiers only")
        if self.task.has_accuracy:
            metric = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
            self.train_acc = metric()
            self.test_acc = metric()

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning keeps each submodule's mode at fit start and the zoo hands out eval-mode
        # models, so switch explicitly: BN statistics update unless update_bn=False.
        self.train()
        self._epoch_loss = [0.0, 0]

    def on_train_epoch_end(self) -> None:
        total, count = self._epoch_loss
        if count:
            self.curve.append(float(total) / count)

    @torch.no_grad()
    def reference_targets(self, x, only_end_layer: bool = False) -> list[torch.Tensor]:
        """The reference end model's activations at cut points ``j..k`` (or only at ``j``)."""
        _, activations = cut_point_activations(self.reference, x, self.end_layer if only_end_layer else None)
        return activations[self.end_layer - 1 :]

    def mask(self, x) -> torch.Tensor | None:
        """Real token positions of ``x`` (``None`` for images): padding never enters a loss."""
        return self.reference.context(x).attention_mask

    #: what :meth:`objective_loss` reads: reference activations at the end layer only (``end``),
    #: at every cut point from it on (``all``) or none; the reference's output (``teacher``); the
    #: tail's later activations (``features``); whether the loss backpropagates through the tail
    targets: str | None = None
    needs_teacher = False
    needs_features = False
    tail_grad = True

    def objective_loss(self, stitched: list[torch.Tensor], logits: torch.Tensor, targets: list[torch.Tensor],
                       teacher: torch.Tensor | None, y, mask: torch.Tensor | None) -> torch.Tensor:
        """The objective on one stitched pass: ``stitched`` = ``[a, later activations…]`` (later
        ones only with ``needs_features``), ``targets`` = the reference's activations from the end
        layer on, ``teacher`` = its output. The single run and the fused grid both call this."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, stitched logits)`` for one batch."""
        targets = self.reference_targets(x, only_end_layer=self.targets == "end") if self.targets else []
        teacher = None
        if self.needs_teacher:
            with torch.no_grad():
                teacher = self.reference(x)
        a = self.network.stitched_activation(x)
        context = self.network.end.context(x)
        with torch.set_grad_enabled(self.tail_grad and torch.is_grad_enabled()):
            # a hint objective still runs the tail, so its BN statistics see stitched data
            out = self.network.end(a, context, return_features=self.needs_features)
        logits, later = out if self.needs_features else (out, [])
        return self.objective_loss([a, *later], logits, targets, teacher, y, self.mask(x)), logits

    def configure_optimizers(self):
        return torch.optim.Adam(self.network.stitch.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def training_step(self, batch, batch_idx):
        x, y = self.task.split(batch, train=True)
        alpha = float(self.adversarial.get("alpha", 0.0))
        if alpha > 0:
            x = mix_adversarial(self.network, x, y, alpha, **pgd_settings(self.adversarial))
        loss, logits = self.loss(x, y)
        if not torch.isfinite(loss):  # never train on, and never record, a diverged stitch
            raise NonFiniteError("the loss", float(loss.detach()), self.global_step)
        size = self._size(x, y)
        self._epoch_loss[0] = self._epoch_loss[0] + loss.detach() * size  # a tensor: no device sync per step
        self._epoch_loss[1] += size
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        if self.task.has_accuracy:
            self.train_acc(*self.task.scored(logits, y))
            self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _size(self, x, y) -> int:
        """What a batch's mean is over: inputs, or target tokens for a language model."""
        if isinstance(self.task, NextToken):
            return int((y != IGNORE).sum())
        return len(y) if y is not None else len(token_ids(x)[0]) if isinstance(x, dict) else len(x)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for name, parameter in self.network.stitch.named_parameters():
            if not torch.isfinite(parameter).all():
                bad = parameter[~torch.isfinite(parameter)].flatten()[0]
                raise NonFiniteError(f"stitch weight {name}", bad.item(), self.global_step - 1)

    def test_step(self, batch, batch_idx):
        x, y = self.task.split(batch)
        output = self.network(x)
        size = self._size(x, y)
        if isinstance(self.task, Representation):  # how far the stitched output is from the end's own
            loss = self.task.loss(output, self.reference(x), self.mask(x))
        else:
            loss = self.task.loss(output, y)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=size)
        if self.task.has_accuracy:
            self.test_acc(*self.task.scored(output, y))
            self.log("test/acc", self.test_acc, on_epoch=True, batch_size=size)
        if isinstance(self.task, NextToken):  # the end model's own loss on the same tokens, and the penalty
            end_loss = self.task.loss(self.reference(x), y)
            self.log("test/end_loss", end_loss, on_epoch=True, sync_dist=True, batch_size=size)
            self.log("test/penalty", loss - end_loss, on_epoch=True, sync_dist=True, batch_size=size)


class DMModule(StitchingModule):
    """Direct matching: the closed-form initialisation is the answer; nothing to train."""

    trainable = False


class HintModule(StitchingModule):
    """Structural hint at the stitching point, trained by SGD on the whole training set."""

    targets = "end"
    tail_grad = False

    def objective_loss(self, stitched, logits, targets, teacher, y, mask):
        return losses.hint_loss(stitched[0], targets[0], mask)


class FulaModule(StitchingModule):
    """Functional latent alignment: hints at the stitching point and every later cut point."""

    targets = "all"
    needs_features = True

    def __init__(self, *args, weights="uniform", **kwargs):
        super().__init__(*args, **kwargs)
        num_terms = len(self.reference.cut_points) - self.end_layer + 1
        self.register_buffer("weights", losses.fula_weights(weights, num_terms))

    def objective_loss(self, stitched, logits, targets, teacher, y, mask):
        return losses.fula_loss(stitched, targets, self.weights, mask)


class SlmModule(StitchingModule):
    """Soft-label matching: cross-entropy against the end model's predictions."""

    needs_task_head = True
    needs_teacher = True

    def objective_loss(self, stitched, logits, targets, teacher, y, mask):
        return self.task.soft_loss(logits, teacher, y)


class TlmModule(StitchingModule):
    """Task-loss matching: cross-entropy against the true labels (next tokens for a language model)."""

    needs_task_head = True

    def objective_loss(self, stitched, logits, targets, teacher, y, mask):
        return self.task.loss(logits, y)


OBJECTIVES: dict[str, type[StitchingModule]] = {
    "dm": DMModule,
    "hint": HintModule,
    "fula": FulaModule,
    "slm": SlmModule,
    "tlm": TlmModule,
}


def objective_module(objective: str, network: StitchedNetwork | None, reference: nn.Module, end_layer: int,
                     num_classes: int | None, lr: float = 1e-3, weight_decay: float = 1e-4, weights="uniform",
                     adversarial: dict | None = None) -> StitchingModule:
    """The objective's LightningModule (``weights``: FuLA's hint weights, ignored by the others)."""
    options = {"weights": weights} if objective == "fula" else {}
    return OBJECTIVES[objective](network, reference, end_layer, num_classes, lr=lr, weight_decay=weight_decay,
                                 adversarial=adversarial, **options)
