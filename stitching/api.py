"""Stitching from Python, no Hydra in sight.

    import stitching, timm
    front, end = timm.create_model("resnet18"), timm.create_model("resnet34")
    stitching.cut_points(front)                       # where each can be cut
    result = stitching.stitch(front, end, "layer2.1", "layer3.0", objective="fula",
                              train=(x_train, y_train), test=(x_test, y_test), epochs=3)
    result.metrics["test/acc"], result.stitch, result.network
    result.save("stitched.pt"); network = stitching.load("stitched.pt", front, end)

``front`` and ``end`` are any models an adapter supports (timm, torchvision, the built-in
ones) or networks written against :class:`stitching.models.CuttableModel`; images are in
[0, 1] at the data's resolution (each model resizes and normalises them its own way).
``python -m stitching.train`` is a thin caller of :func:`prepare_stitch` and
:func:`train_stitch`.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from stitching.engine import StitchedNetwork, StitchEngine, cell_key, fit_engine
from stitching.errors import StitchingError
from stitching.models import Cut, ImageInputs, as_cuttable, cut, cut_points, cuttable
from stitching.models.inputs import near_chance
from stitching.models.language import with_tokenizer
from stitching.objectives.objective import make_objective
from stitching.objectives.tasks import NextToken, adjusted_penalty
from stitching.runtime import Stopwatch
from stitching.saving import load
from stitching.saving import save as save_network

__all__ = ["Prepared", "StitchResult", "TokenBatch", "as_loader", "cut_points", "first_inputs", "load", "prepare_stitch",
           "stitch", "train_stitch"]
from stitching.settings import StitchSettings, check_bn_pass, check_capacity, check_class_token, check_init
from stitching.validation import check_arguments, check_trainer


@dataclass
class Prepared:
    """One cell of an engine at its initialisation (DM, identity or random), before training."""

    engine: StitchEngine
    cell: tuple[int, int]
    front_name: str = ""  # which of the engine's fronts, in an engine of several

    @cached_property
    def network(self) -> StitchedNetwork:
        """The cell as a plain stitched network, made when first read (read it after training: a
        cell trained interleaved with others gets a tail copy holding its statistics of that moment)."""
        return self.engine.network(*self.cell, self.front_name)

    @property
    def key(self) -> str:
        """The cell's name among the engine's results."""
        return cell_key(*self.cell, self.front_name)

    @property
    def front(self) -> Cut:
        """The cut of the front copy the stitched network runs."""
        return cut(self.network.front.model, self.cell[0])

    @property
    def end(self) -> Cut:
        """The cut of the end copy whose tail the stitched network runs."""
        return cut(self.network.end.model, self.cell[1])


@dataclass
class StitchResult:
    """What :func:`stitch` returns."""

    network: StitchedNetwork
    metrics: dict[str, float]
    front: Cut
    end: Cut
    module: StitchEngine
    timings: dict[str, float] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)
    given: tuple[nn.Module, nn.Module] | None = field(default=None, repr=False)  # the front and end passed in
    warnings: list[str] = field(default_factory=list)  # e.g. a given model near chance on these data

    @property
    def stitch(self) -> nn.Module:
        return self.network.stitch

    def save(self, path: str | Path) -> Path:
        """Write the stitched network (stitch, changed BatchNorm statistics, cut points, the given
        models' SHA-256) to ``path``; :func:`stitching.load` rebuilds it from the same two models."""
        return save_network(path, self.network, *self.given, provenance={"metrics": self.metrics})


def prepare_stitch(front: nn.Module, end: nn.Module, front_layer: int | str, end_layer: int | str,
                   dm_inputs, objective: str = "fula", lr: float | None = None, weight_decay: float = 1e-4,
                   update_bn: bool = True, class_token: str = "shared", weights="uniform",
                   adversarial: dict | None = None, num_classes: int | None = None, init: str = "dm",
                   kind: str = "affine", rank: int | None = None, hidden: int | None = None,
                   front_rank: int | None = None, seed: int = 0, dm_bn_pass: bool = False) -> Prepared:
    """Cut copies of ``front`` and ``end``, join them by a stitch started at the DM solution on
    ``dm_inputs`` (or as ``init`` says), in a one-cell :class:`~stitching.engine.StitchEngine`.

    ``front``/``end`` themselves are never changed; the reference end model the objectives
    read their targets from is another untouched copy in eval mode. ``init``: ``dm`` (the
    papers), ``identity`` or ``random`` (seeded by ``seed`` and the cell). ``kind``
    (``affine``, ``low_rank`` with ``rank``, ``mlp`` with ``hidden`` units): the stitch's
    capacity. ``front_rank``: project the front activation on its top principal directions
    (fitted on ``dm_inputs``) before the stitch, in DM, training and evaluation. ``dm_bn_pass``
    (DM only): one epoch of the training data through the stitched network, no gradient, so the
    front and end BatchNorm running statistics follow it.
    """
    check_arguments(lr=lr, weight_decay=weight_decay, update_bn=update_bn, rank=rank, hidden=hidden,
                    front_rank=front_rank, seed=seed, dm_bn_pass=dm_bn_pass)
    check_bn_pass(dm_bn_pass, objective, update_bn)
    check_weights(front=front, end=end)
    chosen = make_objective(objective, weights)
    check_class_token(class_token)
    check_init(init, objective)
    check_capacity(kind, rank, front_rank)
    front, end = cuttable(front, [front_layer], side="front"), cuttable(end, [end_layer], side="end")
    cell = (cut(front, front_layer).index, cut(end, end_layer).index)
    settings = StitchSettings(cell[0], cell[1], 0, update_bn, class_token, lr, weight_decay, init, kind, rank, hidden,
                              front_rank, dm_bn_pass)
    engine = StitchEngine(front, end, [cell], chosen, settings, dm_inputs, num_classes=num_classes,
                          adversarial=adversarial, seed=seed)
    return Prepared(engine, cell)


def check_weights(**models: nn.Module) -> None:
    """Each model is a module with real float32 weights on one device (the stitch trains in
    float32; ``trainer={"precision": "bf16-mixed"}`` gives mixed precision), or one line."""
    for side, model in models.items():
        if not isinstance(model, nn.Module):
            raise StitchingError(f"the {side} model is a {type(model).__name__}, not a torch.nn.Module")
        tensors = [*model.parameters(), *model.buffers()]
        if any(t.is_meta for t in tensors):
            raise StitchingError(f"the {side} model has no weights (it is on the meta device); load its weights "
                                 f"first (e.g. model.to_empty(device='cpu') and load_state_dict)")
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
        if dtypes and dtypes != ["float32"]:
            raise StitchingError(f"the {side} model's weights are {'/'.join(dtypes)}; give a float32 model "
                                 f"(model.float()) and ask for mixed precision with trainer={{'precision': 'bf16-mixed'}}")
        devices = {str(t.device) for t in tensors}
        if len(devices) > 1:
            raise StitchingError(f"the {side} model's weights lie on several devices ({', '.join(sorted(devices))}); "
                                 f"move it to one (model.to(device))")


def train_stitch(prepared: Prepared, train, test, trainer: dict | None = None, logger=False,
                 run_dir: str | Path | None = None, watch: Stopwatch | None = None) -> dict[str, float]:
    """Train the stitch (unless the objective is closed-form or ``max_epochs`` is 0), then test.

    ``train``/``test``: data loaders of ``(inputs, labels)``; ``trainer``: Lightning
    Trainer settings (``max_epochs``, ``accelerator``, ``precision``…). Returns the test
    metrics and the last epoch's training metrics; a stitch that diverged raises
    :class:`~stitching.errors.NonFiniteError`.
    """
    result = fit_engine(prepared.engine, train, test, trainer, logger=logger, run_dir=run_dir, watch=watch)
    cell = result[prepared.key]
    if cell["error"] is not None:
        raise cell["error"]
    return cell["metrics"]


def stitch(front: nn.Module, end: nn.Module, front_layer: int | str, end_layer: int | str,
           objective: str = "fula", train=None, test=None, epochs: int = 1, batch_size: int = 128,
           lr: float | None = None, weight_decay: float = 1e-4, dm_samples: int = 100, update_bn: bool = True,
           class_token: str = "shared", weights="uniform", seed: int = 0, trainer: dict | None = None,
           progress: bool = True, init: str = "dm", kind: str = "affine", rank: int | None = None,
           hidden: int | None = None, front_rank: int | None = None, self_baseline: bool | None = None,
           front_inputs: dict | ImageInputs | None = None, end_inputs: dict | ImageInputs | None = None,
           tokenizer=None, dm_bn_pass: bool = False) -> StitchResult:
    """Stitch ``front`` (cut after ``front_layer``) into ``end`` (entered after ``end_layer``).

    Args:
        front: any adapter-supported model (timm, torchvision, built-in, a language model) or a
            :class:`~stitching.models.CuttableModel`; never modified.
        end: the same kinds as ``front``; never modified.
        front_layer: the front's cut point, a 1-based index or a name (see :func:`cut_points`).
        end_layer: the end's cut point, as ``front_layer``.
        objective: ``dm``, ``hint``, ``fula``, ``slm`` or ``tlm``.
        train: a ``DataLoader``, a ``Dataset`` or a tuple ``(images, labels)`` of
            tensors (images ``[N, C, H, W]`` in [0, 1]); for language models token ids
            ``[N, T]`` or a dict of ``input_ids``, ``attention_mask`` (1 = real token, padding on
            the right) and, for a classifier, ``labels``.
        test: the same kinds as ``train``; default ``train``.
        epochs: stitch training epochs (Adam on the stitch only).
        batch_size: stitch training and test batch size.
        lr: Adam's learning rate; ``None``: 1e-3 (the papers), 1e-4 for Hint and FuLA between
            language models (:func:`stitching.settings.default_lr`).
        weight_decay: Adam's weight decay.
        dm_samples: training inputs for the closed-form DM initialisation.
        update_bn: update the copied models' BatchNorm running statistics while stitching
            (``stitch.update_bn``).
        dm_bn_pass: DM only: after the closed-form fit, one epoch of ``train`` through the
            stitched network without gradients, so the BatchNorm running statistics follow it
            (``stitch.dm_bn_pass``; the FuLA paper's Fig. 3).
        class_token: ViT stitches: ``shared`` (one token-wise map) or ``separate``
            (``stitch.class_token``).
        weights: FuLA's layer weights: ``uniform``, ``first``, ``last`` or a list
            (``objective.weights``).
        seed: data order, the DM sample and random starts.
        init: the stitch's start: ``dm``, ``identity`` or ``random`` (``stitch.init``).
        kind: the stitch's capacity: ``affine``, ``low_rank`` or ``mlp`` (``stitch.kind``).
        rank: a ``low_rank`` stitch's rank (``stitch.rank``).
        hidden: an ``mlp`` stitch's hidden units (``stitch.hidden``).
        front_rank: project the front activation on its top principal directions first
            (``stitch.front_rank``).
        progress: show Lightning's progress bar.
        trainer: extra Lightning Trainer settings (``accelerator``, ``precision``…).
        front_inputs: a timm / torchvision front's input convention, when it is not
            its pretrained config's (weights trained at another size or normalisation): a dict of
            any of ``size`` (int or ``[h, w]``), ``channels``, ``mean``, ``std``, or an
            :class:`~stitching.models.ImageInputs`. The images handed in are resized and
            normalised to it; ``result.network`` records it.
        end_inputs: the same for the end model.
        tokenizer: language models: the tokenizer both read (a Hugging Face tokenizer, a folder or
            a ``pkg:`` name). A masked language model needs it for its mask token; front and
            end are then checked to share it.
        self_baseline: language models: also stitch ``end`` into itself at ``end_layer``,
            trained the same way, and report ``test/baseline_loss`` and ``test/adjusted_penalty``
            (stitched − self-stitched loss) beside the raw ``test/penalty``; ``None``: whenever a
            next-token penalty is measured.

    Returns:
        :class:`StitchResult` with the trained ``stitch``, the stitched ``network`` and the
        ``metrics`` (``test/acc``, ``test/loss``, ``train/loss``; for a language model
        ``test/end_loss``, ``test/penalty`` and the adjusted penalty…).
    """
    check_weights(front=front, end=end)
    front = cuttable(front, [front_layer], front_inputs, "front")
    end = cuttable(end, [end_layer], end_inputs, "end")
    if tokenizer is not None:
        front, end = with_tokenizer(front, tokenizer, "front"), with_tokenizer(end, tokenizer, "end")
    if train is None:
        raise StitchingError("stitch() needs training data: train=(images, labels), token ids, a Dataset or a DataLoader")
    if self_baseline not in (None, True, False):
        raise StitchingError(f"self_baseline={self_baseline!r}: give None (auto), True or False")
    check_arguments(epochs=epochs, batch_size=batch_size, dm_samples=dm_samples, seed=seed)
    check_trainer(trainer or {})
    test = test if test is not None else train
    train_loader = as_loader(train, batch_size, shuffle=True, name="training")
    test_loader = as_loader(test, batch_size, shuffle=False, name="test")
    options = {"max_epochs": epochs, "enable_progress_bar": progress, **(trainer or {})}
    settings = dict(objective=objective, lr=lr, weight_decay=weight_decay, update_bn=update_bn, class_token=class_token,
                    weights=weights, init=init, kind=kind, rank=rank, hidden=hidden, front_rank=front_rank, seed=seed,
                    dm_bn_pass=dm_bn_pass)

    def trained(front_model, front_cut, watch):  # the same data order, start and budget for every call
        L.seed_everything(seed, workers=True, verbose=False)
        with watch.section("dm_init_s"):
            prepared = prepare_stitch(front_model, end, front_cut, end_layer, first_inputs(train_loader, dm_samples),
                                      **settings)
        return prepared

    watch = Stopwatch()
    prepared = trained(front, front_layer, watch)
    for name, data in (("the training data", train), ("the test data", test)):  # given tensors: checked whole, now
        if isinstance(data, (tuple, list, dict, torch.Tensor)):
            prepared.engine.check_data(tuple(data) if isinstance(data, list) else data, name)
    warnings = [line for side, model in (("front", front), ("end", end))
                if (line := near_chance_warning(side, model, test_loader, prepared.engine))]
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    next_token = isinstance(prepared.engine.task, NextToken)
    if self_baseline and not next_token:
        raise StitchingError("self_baseline=True applies to language models scored by their next-token penalty; "
                             "leave it None")
    metrics = train_stitch(prepared, train_loader, test_loader, options, watch=watch)
    if next_token and self_baseline is not False:  # the end model into itself, trained the same way
        with watch.section("baseline_s"):
            own = trained(end, end_layer, Stopwatch())
            mine = train_stitch(own, train_loader, test_loader, options)
        metrics.update(adjusted_penalty(metrics, {"test_loss": mine["test/loss"]}))
    return StitchResult(prepared.network, metrics, prepared.front, prepared.end, prepared.engine, watch.report(),
                        list(prepared.engine.curves[prepared.key]), given=(front, end), warnings=warnings)


@torch.no_grad()
def near_chance_warning(side: str, model: nn.Module, loader: DataLoader, engine: StitchEngine,
                        images: int = 512) -> str | None:
    """The given classifier's accuracy on the first ``images`` test images, and a warning when
    it is near chance while its classes are the data's (most often: its input convention)."""
    model = as_cuttable(model)
    if not engine.task.has_accuracy or getattr(model, "num_classes", None) != engine.num_classes \
            or not isinstance(getattr(model, "input_spec", None), ImageInputs):
        return None
    xs, ys = [], []
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return None
        xs.append(batch[0])
        ys.append(batch[1])
        if sum(len(x) for x in xs) >= images:
            break
    x, y = torch.cat(xs)[:images], torch.cat(ys)[:images]
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}  # the given model's own, restored exactly
    model.eval()
    try:
        predicted = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in x.split(128)])
    finally:
        for module, mode in modes.items():
            module.training = mode
    inputs = model.input_spec.reconcile(x.shape[1], tuple(x.shape[2:]), side)
    return near_chance(side, (predicted == y).float().mean().item(), engine.num_classes, inputs)


class TokenBatch(Dataset):
    """Token sequences as a dataset of dicts (``input_ids``, ``attention_mask``, any ``labels``)."""

    def __init__(self, tensors: dict):
        self.tensors = {k: v for k, v in tensors.items() if v is not None}
        sizes = {len(v) for v in self.tensors.values()}
        if len(sizes) != 1:
            raise StitchingError(f"token data of unequal lengths: {', '.join(f'{k} {len(v)}' for k, v in self.tensors.items())}")

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


def as_loader(data, batch_size: int, shuffle: bool, name: str = "given") -> DataLoader:
    """A DataLoader from a DataLoader, a Dataset, an ``(inputs, labels)`` tuple of tensors, or
    token data: ids ``[N, T]`` or a dict with ``input_ids`` (and ``attention_mask``, ``labels``);
    empty data (``name``: which) are one line."""
    if isinstance(data, DataLoader):
        if hasattr(data.dataset, "__len__") and len(data.dataset) == 0:
            raise StitchingError(f"the {name} data are empty")
        return data
    if isinstance(data, dict):
        if "input_ids" not in data:
            raise StitchingError(f"token data need 'input_ids'; got {', '.join(data) or 'an empty dict'}")
        data = TokenBatch(data)
    elif isinstance(data, torch.Tensor) and not data.is_floating_point() and data.dim() == 2:
        data = TokenBatch({"input_ids": data})  # token ids of a language model
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise StitchingError(f"{len(data[0])} inputs but {len(data[1])} labels")
        data = TensorDataset(*data)
    if isinstance(data, Dataset):
        if hasattr(data, "__len__") and len(data) == 0:
            raise StitchingError(f"the {name} data are empty")
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    raise StitchingError(f"cannot read data of type {type(data).__name__}; give a DataLoader, a Dataset, a tuple "
                         f"(images, labels) of tensors, or token ids / a dict of input_ids")


def first_inputs(loader: DataLoader, count: int):
    """The inputs of the first ``count`` examples a loader yields (for the DM fit): a tensor,
    or for token batches a dict of ``input_ids`` and ``attention_mask`` (labels dropped)."""
    if count < 1:
        raise StitchingError(f"the DM initialisation needs at least one sample, got dm_samples={count}")
    taken, total = [], 0
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, dict) else batch[0]
        taken.append(inputs)
        total += len(inputs["input_ids"]) if isinstance(inputs, dict) else len(inputs)
        if total >= count:
            break
    if not taken:
        raise StitchingError("the training data are empty")
    if isinstance(taken[0], dict):
        return {k: torch.cat([part[k] for part in taken])[:count] for k in taken[0]}
    return torch.cat(taken)[:count]
