"""What the end model is for: how a batch splits into inputs and targets, and its task loss.

The objectives are the same five on images and on text; what differs is the end model's
task, read from the end model itself:

* :class:`Classification` — images (``(x, y)`` batches) or a text classifier (a dict
  batch with ``labels``): cross-entropy, accuracy.
* :class:`NextToken` — a causal language model (a dict batch of ``input_ids`` and
  ``attention_mask``, or bare ids): next-token cross-entropy over the real tokens that have
  a real successor, in nats per token. Tests also record the end model's own loss on the
  same tokens and the **stitching penalty** (stitched − end); beside it, the **adjusted
  penalty** (stitched − self-stitched: :func:`adjusted_penalty`) takes out what a stitch
  trained on this corpus gains with no dissimilarity to bridge (``docs/protocols.md``).
* :class:`MaskedToken` — a masked language model (BERT with its MLM head): 15 % of the real
  tokens are replaced by the mask token and predicted; scored like :class:`NextToken`.
"""

from __future__ import annotations

import torch

from stitching.errors import StitchingError
from stitching.models.language import LanguageModel, token_ids
from stitching.objectives import losses

IGNORE = -100


class Classification:
    """One label per input."""

    name = "classification"
    has_accuracy = True

    def split(self, batch, train: bool = False):
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        x, y = batch
        return x, y

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return losses.tlm_loss(logits, y)

    def soft_loss(self, logits: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return losses.slm_loss(logits, teacher)

    def scored(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions, targets)`` for the accuracy metric."""
        return logits, y


class NextToken:
    """A causal language model: position t predicts token t + 1."""

    name = "next_token"
    has_accuracy = False

    def split(self, batch, train: bool = False):
        ids, mask = token_ids(batch)
        labels = ids[:, 1:].masked_fill(~(mask[:, 1:].bool() & mask[:, :-1].bool()), IGNORE)
        return batch, labels

    @staticmethod
    def _predicting(logits: torch.Tensor) -> torch.Tensor:
        """The positions whose output is scored against ``labels`` (position t predicts t + 1)."""
        return logits[:, :-1]

    def _rows(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = labels != IGNORE
        return self._predicting(logits)[keep], labels[keep]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # cross-entropy skips the IGNORE labels itself: no copy of the scored rows
        return losses.tlm_loss(self._predicting(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def soft_loss(self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the end model's predicted distribution, scored tokens only."""
        keep = labels != IGNORE
        return losses.slm_loss(self._predicting(logits)[keep], self._predicting(teacher)[keep])

    def scored(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows(logits, labels)


class MaskedToken(NextToken):
    """A masked language model: a random 15 % of the real tokens become the mask token, and
    the output at each of them predicts the original. Training draws new masks every batch;
    test masks are a function of the batch's tokens, so every run scores the same positions."""

    name = "masked_token"
    rate = 0.15

    def __init__(self, mask_id: int | None, seed: int = 0):
        if mask_id is None:
            raise StitchingError("the masked language model's tokenizer has no mask token; give the model's folder "
                                 "with its tokenizer (model.name), or in Python stitch(..., tokenizer=its tokenizer), "
                                 "so its [MASK] id is known")
        self.mask_id = int(mask_id)
        self.generator = torch.Generator().manual_seed(seed)

    def split(self, batch, train: bool = False):
        ids, mask = token_ids(batch)
        if train:
            generator = self.generator
        else:  # seeded by the content: the same test batch gets the same masks in every run
            generator = torch.Generator().manual_seed(int((ids.long().cpu() * 1_000_003).sum()) % (2**62) + ids.numel())
        chosen = (torch.rand(ids.shape, generator=generator) < self.rate).to(ids.device) & mask.bool()
        masked = dict(batch) if isinstance(batch, dict) else {"input_ids": ids, "attention_mask": mask}
        masked["input_ids"] = ids.masked_fill(chosen, self.mask_id)
        return masked, ids.masked_fill(~chosen, IGNORE)

    @staticmethod
    def _predicting(logits: torch.Tensor) -> torch.Tensor:
        return logits  # position t predicts its own (masked) token


class Representation:
    """An end model with no task head (a bare encoder): its output is a representation.

    DM, Hint and FuLA apply; the test loss is the relative error of the stitched network's
    output against the end model's own (real tokens only).
    """

    name = "representation"
    has_accuracy = False

    def split(self, batch, train: bool = False):
        return batch, None

    def loss(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return losses.relative_error(output, target, mask)

    def soft_loss(self, *args):
        raise NotImplementedError


def task_of(end) -> Classification | NextToken | MaskedToken | Representation:
    """The task of a cuttable end model: next-token prediction for causal language models,
    masked tokens for masked language models, a representation for bare encoders,
    classification otherwise."""
    if isinstance(end, LanguageModel):
        if end.is_causal_lm:
            return NextToken()
        if end.is_masked_lm:
            return MaskedToken(end.mask_id)
        if end.num_classes is None:
            return Representation()
    return Classification()


def adjusted_penalty(metrics: dict, baseline: dict | None) -> dict:
    """``test/baseline_loss`` (the self-stitch baseline's test loss: the end model stitched into
    itself at the end layer, trained the same way) and ``test/adjusted_penalty`` = stitched −
    self-stitched loss; nothing without a baseline."""
    if not baseline:
        return {}
    return {"test/baseline_loss": baseline["test_loss"],
            "test/adjusted_penalty": metrics["test/loss"] - baseline["test_loss"]}
