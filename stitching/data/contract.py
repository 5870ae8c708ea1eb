"""The data contract every batch keeps, from the command line's data modules and from any
data handed to the Python API alike, checked where the data are read.

* images: a floating-point ``[N, C, H, W]`` tensor, every value finite and in [0, 1] (each
  model resizes and normalises them its own way; uint8 images are divided by 255 first);
* labels of a classifier: integer class indices, one per input, within the end model's classes;
* token ids: integers within the model's vocabulary; an attention mask of 0 and 1;
* no split is empty.

A batch that breaks it is one :class:`~stitching.errors.StitchingError` line saying what is
wrong and what to give instead, never a traceback from deep inside a model and never a
metric computed on it.
"""

from __future__ import annotations

import math

import torch

from stitching.errors import StitchingError


def check_batch(batch, num_classes: int | None = None, vocab_size: int | None = None, labelled: bool = False,
                where: str = "the data") -> None:
    """Raise one line if ``batch`` (``(images, labels)``, images alone, token ids or a dict of
    ``input_ids``/``attention_mask``/``labels``) breaks the contract; ``labelled``: a classifier's
    batch, which must carry labels."""
    problem = batch_problem(batch, num_classes, vocab_size, labelled)
    if problem:
        raise StitchingError(f"{where} break the input contract: {problem}")


def batch_problem(batch, num_classes: int | None = None, vocab_size: int | None = None,
                  labelled: bool = False) -> str | None:
    labels = None
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            return f"a dict batch needs input_ids; got {', '.join(map(str, batch)) or 'nothing'}"
        problem = _tokens(batch["input_ids"], vocab_size) or _mask(batch.get("attention_mask"))
        labels = batch.get("labels")
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            return f"a batch is (inputs, labels); got {len(batch)} parts"
        inputs, labels = batch
        problem = _tokens(inputs, vocab_size) if vocab_size is not None else _images(inputs)
        if not problem and isinstance(labels, torch.Tensor) and labels.dim() >= 1 and len(labels) != len(inputs):
            problem = f"{len(inputs)} inputs but {len(labels)} labels"
    elif isinstance(batch, torch.Tensor):
        problem = _tokens(batch, vocab_size) if vocab_size is not None else _images(batch)
    else:
        return f"a batch of type {type(batch).__name__}; give tensors, (images, labels) or a dict of input_ids"
    if problem:
        return problem
    if labelled and labels is None:
        return "the end model is a classifier but the data carry no labels"
    return _labels(labels, num_classes) if labels is not None and labelled else None


def _images(x) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"images of type {type(x).__name__}; give a float tensor [N, C, H, W]"
    if not x.is_floating_point():
        return (f"images are {str(x.dtype).removeprefix('torch.')}; give floating-point images in [0, 1]"
                + (" (uint8: divide by 255)" if x.dtype == torch.uint8 else ""))
    if x.dim() != 4 or 0 in x.shape:
        return f"images must be a non-empty [N, C, H, W] tensor; got shape {tuple(x.shape)}"
    low, high = torch.aminmax(x)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):  # a NaN or an infinity anywhere shows here
        return f"{int((~torch.isfinite(x)).sum())} image value(s) are NaN or infinite"
    if low < 0 or high > 1:
        return (f"image values lie in [{low:.4g}, {high:.4g}], not [0, 1]"
                + ("; images in [0, 255]: divide by 255" if high > 1.5 else "; give unnormalised images in [0, 1]"))
    return None


def _tokens(ids, vocab_size: int | None) -> str | None:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        kind = str(ids.dtype).removeprefix("torch.") if isinstance(ids, torch.Tensor) else type(ids).__name__
        return f"token ids are {kind}; give integer ids"
    if ids.dim() != 2 or 0 in ids.shape:
        return f"token ids must be a non-empty [N, T] tensor; got shape {tuple(ids.shape)}"
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        return f"token ids lie in {low}..{high}, outside the vocabulary 0..{vocab_size - 1 if vocab_size else '?'}"
    return None


def _mask(mask) -> str | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not bool(((mask == 0) | (mask == 1)).all()):
        return "the attention mask must hold 0 (padding) and 1 (real token)"
    return None


def _labels(y, num_classes: int | None) -> str | None:
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
        kind = str(y.dtype).removeprefix("torch.") if isinstance(y, torch.Tensor) else type(y).__name__
        return f"labels are {kind}; give integer class indices"
    if y.dim() != 1:
        return (f"labels must be one class index per input, shape [N]; got {tuple(y.shape)}"
                + (" (one-hot? give labels.argmax(1))" if y.dim() == 2 else ""))
    if len(y) == 0:
        return "there are no labels"
    low, high = torch.stack([y.min(), y.max()]).tolist()
    if low < 0 or (num_classes is not None and high >= num_classes):
        return f"labels lie in {low}..{high}, outside the end model's classes 0..{num_classes - 1 if num_classes else '?'}"
    return None
