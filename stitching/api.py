"""Stitching from Python, no Hydra in sight.

    import stitching, timm
    front, end = timm.create_model("resnet18"), timm.create_model("resnet34")
    stitching.cut_points(front)                       # where each can be cut
    result = stitching.stitch(front, end, "layer2.1", "layer3.0", objective="fula",
                              train=(x_train, y_train), test=(x_test, y_test), epochs=3)
    result.metrics["test/acc"], result.stitch, result.network

``front`` and ``end`` are any models an adapter supports (timm, torchvision, the built-in
ones) or networks written against :class:`stitching.models.CuttableModel`; images are in
[0, 1] at the data's resolution (each model resizes and normalises them its own way).
``python -m stitching.train`` is a thin caller of :func:`prepare_stitch` and
:func:`train_stitch`.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from stitching.errors import StitchingError
from stitching.models import Cut, CutPoint, as_cuttable, cut
from stitching.models.layout import channels, compatible
from stitching.objectives import OBJECTIVES, StitchedNetwork, StitchingModule, objective_module
from stitching.runtime import Stopwatch, build_trainer, speed_up
from stitching.stitch_layers import STITCH_KINDS, batches, fit_dm, fit_front_projection, make_stitch

CLASS_TOKEN = ("shared", "separate")
#: where training starts: the DM solution (the papers), the identity map, or a random map
INITS = ("dm", "identity", "random")


def cut_points(model: nn.Module) -> list[CutPoint]:
    """Where ``model`` can be cut: index, name and activation layout of every cut point."""
    return list(as_cuttable(model).cut_points)


@dataclass
class Prepared:
    """A stitched network at its DM initialisation, wrapped in its objective's module."""

    front: Cut  # cut of the front copy the stitched network runs
    end: Cut  # cut of the end copy whose tail the stitched network runs
    module: StitchingModule

    @property
    def network(self) -> StitchedNetwork:
        return self.module.network


@dataclass
class StitchResult:
    """What :func:`stitch` returns."""

    network: StitchedNetwork
    metrics: dict[str, float]
    front: Cut
    end: Cut
    module: StitchingModule
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def stitch(self) -> nn.Module:
        return self.network.stitch


def check_init(init: str, objective: str) -> None:
    """One line for an unknown initialisation, or for DM (whose initialisation is its answer) started elsewhere."""
    if init not in INITS:
        raise StitchingError(f"unknown stitch.init '{init}'; choose one of {', '.join(INITS)}")
    if objective == "dm" and init != "dm":
        raise StitchingError(f"objective dm is the DM solution itself; stitch.init={init} applies to the trained "
                             f"objectives (hint, fula, slm, tlm)")


def check_capacity(kind: str, rank: int | None, front_rank: int | None = None,
                   channels: tuple[int, int] | None = None) -> None:
    """One line for an unknown stitch kind, a low-rank stitch without a rank, or (once the cut
    points' ``channels`` (in, out) are known) a rank the activations do not have."""
    if kind not in STITCH_KINDS:
        raise StitchingError(f"unknown stitch.kind '{kind}'; choose one of {', '.join(STITCH_KINDS)}")
    if kind == "low_rank" and rank is None:
        raise StitchingError("stitch.kind=low_rank needs stitch.rank (the channels the map passes through)")
    if channels is None:
        return
    if kind == "low_rank" and rank > min(channels):
        raise StitchingError(f"stitch.rank={rank} exceeds min({channels[0]}, {channels[1]}) channels of this pair of "
                             f"cut points; give a smaller rank (at full rank use stitch.kind=affine)")
    if front_rank is not None and front_rank > channels[0]:
        raise StitchingError(f"stitch.front_rank={front_rank} exceeds the front's {channels[0]} channels at this cut "
                             f"point; give at most {channels[0]} (or null for no truncation)")


def prepare_stitch(front: nn.Module, end: nn.Module, front_layer: int | str, end_layer: int | str,
                   dm_inputs, objective: str = "fula", lr: float = 1e-3, weight_decay: float = 1e-4,
                   update_bn: bool = True, class_token: str = "shared", weights="uniform",
                   adversarial: dict | None = None, num_classes: int | None = None, init: str = "dm",
                   kind: str = "affine", rank: int | None = None, hidden: int | None = None,
                   front_rank: int | None = None) -> Prepared:
    """Cut deep copies of ``front`` and ``end``, join them by a stitch fitted by DM on
    ``dm_inputs``, and wrap the result in the objective's LightningModule.

    ``front``/``end`` themselves are never changed; the reference end model the objectives
    read their targets from is another untouched copy in eval mode. ``init``: ``dm`` (the
    papers), ``identity`` or ``random`` — where a trained objective starts. ``kind``
    (``affine``, ``low_rank`` with ``rank``, ``mlp`` with ``hidden`` units): the stitch's
    capacity. ``front_rank``: project the front activation on its top principal directions
    (fitted on ``dm_inputs``) before the stitch, in DM, training and evaluation.
    """
    if objective not in OBJECTIVES:
        raise StitchingError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    if class_token not in CLASS_TOKEN:
        raise StitchingError(f"unknown stitch.class_token '{class_token}'; choose shared or separate")
    check_init(init, objective)
    check_capacity(kind, rank, front_rank)
    front, end = as_cuttable(front), as_cuttable(end)
    problem = compatible(cut(front, front_layer).layout, cut(end, end_layer).layout)  # before any copy
    if problem:
        raise StitchingError(problem)
    front_cut, end_cut = cut(copy.deepcopy(front), front_layer), cut(copy.deepcopy(end), end_layer)
    reference = copy.deepcopy(end).eval()
    reference_cut = cut(reference, end_cut.index)
    probe = batches(dm_inputs, 2)[0]
    with torch.no_grad():
        a_front, _ = front_cut.head.eval()(probe)
        a_end, _ = reference_cut.head(probe)
    check_capacity(kind, rank, front_rank, (channels(a_front, front_cut.layout), channels(a_end, end_cut.layout)))
    try:
        stitch_layer = make_stitch(a_front, front_cut.layout, a_end, end_cut.layout,
                                   separate_class_token=class_token == "separate", kind=kind, rank=rank, hidden=hidden)
    except ValueError as err:
        raise StitchingError(str(err)) from None
    network = StitchedNetwork(front_cut.head, stitch_layer, end_cut.tail, update_bn=update_bn)
    if front_rank is not None:
        try:
            fit_front_projection(network.stitch, network.front, dm_inputs, front_rank)
        except ValueError as err:
            raise StitchingError(f"stitch.front_rank={front_rank}: {err}; use more stitch.dm_samples") from None
    if init == "dm":
        fit_dm(network.stitch, network.front, reference_cut.head, dm_inputs)
    else:
        network.stitch.initialise(init)
    classes = num_classes if num_classes is not None else end.num_classes
    module = objective_module(objective, network, reference, end_cut.index, classes, lr=lr,
                              weight_decay=weight_decay, weights=weights, adversarial=adversarial)
    return Prepared(front_cut, end_cut, module)


def train_stitch(prepared: Prepared, train, test, trainer: dict | None = None, logger=False,
                 run_dir: str | Path | None = None, watch: Stopwatch | None = None) -> dict[str, float]:
    """Train the stitch (unless the objective is closed-form or ``max_epochs`` is 0), then test.

    ``train``/``test``: data loaders of ``(inputs, labels)``; ``trainer``: Lightning
    Trainer settings (``max_epochs``, ``accelerator``, ``precision``…). Returns the test
    metrics and the last epoch's training metrics.
    """
    watch = watch or Stopwatch()
    options = {"accelerator": "auto", "devices": 1, "max_epochs": 1, **(trainer or {})}
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="stitch-"))
    module = prepared.module
    speed_up(module.network, options)
    metrics: dict[str, float] = {}
    with watch.section("fit_s"):
        if module.trainable and options.get("max_epochs", 0) != 0:
            fitter = build_trainer(options, run_dir, logger=logger)
            fitter.fit(module, train_dataloaders=train)
            metrics.update({k.removesuffix("_epoch"): float(v) for k, v in fitter.callback_metrics.items()
                            if k.startswith("train/") and not k.endswith("_step")})
    with watch.section("test_s"):
        tester = build_trainer(options, run_dir, logger=logger, enable_progress_bar=False)
        tested = tester.test(module, dataloaders=test, verbose=False)[0]
    return {**{k: float(v) for k, v in tested.items()}, **metrics}


def stitch(front: nn.Module, end: nn.Module, front_layer: int | str, end_layer: int | str,
           objective: str = "fula", train=None, test=None, epochs: int = 1, batch_size: int = 128,
           lr: float = 1e-3, weight_decay: float = 1e-4, dm_samples: int = 100, update_bn: bool = True,
           class_token: str = "shared", weights="uniform", seed: int = 0, trainer: dict | None = None,
           progress: bool = True, init: str = "dm", kind: str = "affine", rank: int | None = None,
           hidden: int | None = None, front_rank: int | None = None) -> StitchResult:
    """Stitch ``front`` (cut after ``front_layer``) into ``end`` (entered after ``end_layer``).

    Args:
        front, end: any adapter-supported model (timm, torchvision, built-in) or a
            :class:`~stitching.models.CuttableModel`; never modified.
        front_layer, end_layer: cut points, 1-based indices or names (see :func:`cut_points`).
        objective: ``dm``, ``hint``, ``fula``, ``slm`` or ``tlm``.
        train, test: a ``DataLoader``, a ``Dataset`` or a tuple ``(images, labels)`` of
            tensors (images ``[N, C, H, W]`` in [0, 1]); for language models token ids
            ``[N, T]`` or a dict of ``input_ids``, ``attention_mask`` (1 = real token, padding on
            the right) and, for a classifier, ``labels``; ``test`` defaults to ``train``.
        epochs, batch_size, lr, weight_decay: stitch training (Adam on the stitch only).
        dm_samples: training inputs for the closed-form DM initialisation.
        update_bn, class_token, weights, init, kind, rank, hidden, front_rank: as
            ``stitch.update_bn``, ``stitch.class_token``, ``objective.weights``, ``stitch.init``,
            ``stitch.kind``… of the command line.
        trainer: extra Lightning Trainer settings (``accelerator``, ``precision``…).

    Returns:
        :class:`StitchResult` with the trained ``stitch``, the stitched ``network`` and the
        ``metrics`` (``test/acc``, ``test/loss``, ``train/loss``…).
    """
    if train is None:
        raise StitchingError("stitch() needs training data: train=(images, labels), token ids, a Dataset or a DataLoader")
    watch = Stopwatch()
    L.seed_everything(seed, workers=True, verbose=False)
    train_loader = as_loader(train, batch_size, shuffle=True)
    test_loader = as_loader(test if test is not None else train, batch_size, shuffle=False)
    with watch.section("dm_init_s"):
        prepared = prepare_stitch(front, end, front_layer, end_layer, first_inputs(train_loader, dm_samples),
                                  objective, lr=lr, weight_decay=weight_decay, update_bn=update_bn,
                                  class_token=class_token, weights=weights, init=init, kind=kind, rank=rank,
                                  hidden=hidden, front_rank=front_rank)
    options = {"max_epochs": epochs, "enable_progress_bar": progress, **(trainer or {})}
    metrics = train_stitch(prepared, train_loader, test_loader, options, watch=watch)
    return StitchResult(prepared.network, metrics, prepared.front, prepared.end, prepared.module, watch.report())


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


def as_loader(data, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader from a DataLoader, a Dataset, an ``(inputs, labels)`` tuple of tensors, or
    token data: ids ``[N, T]`` or a dict with ``input_ids`` (and ``attention_mask``, ``labels``)."""
    if isinstance(data, DataLoader):
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
