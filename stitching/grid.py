"""``python -m stitching.grid`` — every stitch of a layer grid trained in one pass per batch.

The same overrides as ``python -m stitching.train``; ``grid.pairs`` picks the cells: ``all``
front × end cut points (default), ``diagonal`` (the corresponding layers of a stitching plot)
or an explicit list ``[[i, j], …]``. Per batch:

* the front runs once, to its deepest needed cut point (every cut activation kept, no grad);
  its BatchNorm statistics update exactly as each cell's own front copy would;
* the reference end model runs once, for every cell's targets and teacher outputs;
* for each end layer j, the stitched activations of all its front layers go through one copy
  of the end tail together, concatenated along the batch, with per-stitch BatchNorm
  statistics (:mod:`stitching.models.grouped`), so every cell sees its own batch statistics
  and keeps its own running statistics, as in its own run;
* one Adam over all stitches (Adam is per-parameter: the same steps as separate optimisers);
  the summed loss gives each stitch the gradient of its own loss.

DM initialisations come from one pass over the DM samples and the test pass is fused the same
way. Every cell then gets an ordinary run folder, ``<out>/<objective>/f<i>-e<j>/results.json``
with its stitch and testbed metrics, so ``stitching.report`` and the sanity checks read a grid as
they read a sweep; a rerun skips finished cells. Settings a fused pass cannot reproduce —
language models, adversarial stitching (``attack.alpha > 0``), ``evaluation.penultimate_cka``,
``stitch.init=random``, BatchNorm variants other than ``BatchNorm2d`` in the end tail — run as
single runs, cell by cell, in the same folder layout.

Examples: ``python -m stitching.grid --out outputs/grid experiment=small objective=hint grid.pairs=all``;
``python -m stitching.grid -m experiment=sanity_small`` (one grid per objective × end seed, each
with the preset's 25 cells).
"""

from __future__ import annotations

import argparse
import copy
import re
from itertools import islice
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from stitching.errors import NonFiniteError, StitchingError, exit_on_user_error
from stitching.models import cut, cut_point_activations
from stitching.models.grouped import deinterleave, group_batchnorms, interleave, load_group
from stitching.models.layout import as_rows
from stitching.objectives import StitchedNetwork, objective_module
from stitching.runtime import Stopwatch, precision_autocast, release_memory
from stitching.stitch_layers import make_stitch, principal_projection, to_device
from stitching.train import LAYER_KEYS

PAIRS = ("all", "diagonal")


def grid_pairs(spec, front_count: int, end_count: int) -> list[tuple[int, int]]:
    """The cells ``(front layer, end layer)`` of ``grid.pairs``."""
    if spec is None or spec == "all":
        return [(i, j) for i in range(1, front_count + 1) for j in range(1, end_count + 1)]
    if spec == "diagonal":
        return [(k, k) for k in range(1, min(front_count, end_count) + 1)]
    try:
        pairs = [(int(i), int(j)) for i, j in spec]
    except (TypeError, ValueError):
        raise StitchingError(f"grid.pairs={spec}: give all, diagonal or a list of [front, end] cut points") from None
    bad = [(i, j) for i, j in pairs if not (1 <= i <= front_count and 1 <= j <= end_count)]
    if bad or not pairs:
        raise StitchingError(f"grid.pairs: cell {bad[0] if bad else '[]'} is out of range: the front has cut points "
                             f"1..{front_count}, the end 1..{end_count}")
    return list(dict.fromkeys(pairs))


def cannot_fuse(cfg: DictConfig, settings, text: bool) -> str | None:
    """Why these settings must run as single runs (``None``: they fuse)."""
    if text:
        return "language models run as single runs (their padding masks differ per batch)"
    if float(settings.attack.get("alpha", 0) or 0) > 0:
        return "adversarial stitching (attack.alpha > 0) attacks each stitched network on its own"
    if cfg.evaluation.penultimate_cka:
        return "evaluation.penultimate_cka evaluates each DM-initialised network on its own"
    if settings.stitch.init == "random":
        return "stitch.init=random draws each stitch's own random start"
    return None


def _unsupported_norms(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._NormBase) and type(m) is not nn.BatchNorm2d})


class FusedGrid(nn.Module):
    """The stitches of ``pairs`` between ``front`` and ``end`` under one objective, trained together.

    ``front``/``end`` are copied, never changed. ``stitch`` is the run's
    :class:`~stitching.build.StitchSettings`; ``dm_inputs`` the DM samples; ``chunk``: at most
    this many of an end layer's stitches pass its tail together (``None``: all).
    """

    def __init__(self, front: nn.Module, end: nn.Module, pairs: list[tuple[int, int]], objective: str, dm_inputs,
                 stitch, weights="uniform", num_classes: int | None = None, device="cpu",
                 chunk: int | None = None):
        super().__init__()
        self.pairs, self.objective, self.update_bn = list(pairs), objective, stitch.update_bn
        self.settings = stitch
        self.front = copy.deepcopy(front).to(device).requires_grad_(False)
        self.reference = copy.deepcopy(end).to(device).eval().requires_grad_(False)
        self.deepest = max(i for i, _ in self.pairs)
        self.groups = {j: [i for i, jj in self.pairs if jj == j] for j in sorted({j for _, j in self.pairs})}
        unsupported = _unsupported_norms(end)
        if unsupported:
            raise StitchingError(f"cannot fuse an end model with {', '.join(unsupported)}; run the cells as single runs")
        # an end layer's stitches pass its tail ``chunk`` at a time (all at once: None); each
        # chunk has its own tail copy, whose grouped BatchNorms hold that chunk's statistics
        size = chunk or max(len(fronts) for fronts in self.groups.values())
        self.chunks = {j: [fronts[k:k + size] for k in range(0, len(fronts), size)] for j, fronts in self.groups.items()}
        self.tails = nn.ModuleDict({f"{j}_{c}": cut(group_batchnorms(copy.deepcopy(end), len(part)), j).tail
                                    for j, parts in self.chunks.items() for c, part in enumerate(parts)})
        self.tails.to(device).requires_grad_(False)
        classes = num_classes if num_classes is not None else end.num_classes
        # one loss provider per end layer: the objective's own loss, read by every cell into j
        self.providers = {j: objective_module(objective, None, self.reference, j, classes, stitch.lr,
                                              stitch.weight_decay, weights) for j in self.groups}
        for provider in self.providers.values():
            provider.to(device)
        self.stitches = nn.ModuleDict()
        self._initialise(to_device(dm_inputs, device))
        self.device = torch.device(device)

    @staticmethod
    def key(i: int, j: int) -> str:
        return f"f{i}-e{j}"

    @torch.no_grad()
    def _initialise(self, inputs) -> None:
        """Make every stitch, project its front if asked, and fit DM, from one pass of each model."""
        s = self.settings
        self.front.eval()
        _, fronts = cut_point_activations(self.front, inputs, upto=self.deepest)
        _, ends = cut_point_activations(self.reference, inputs)
        mask = self.reference.context(inputs).attention_mask
        for i, j in self.pairs:
            front_layout, end_layout = self.front.cut_points[i - 1].layout, self.reference.cut_points[j - 1].layout
            stitch = make_stitch(fronts[i - 1][:2], front_layout, ends[j - 1][:2], end_layout,
                                 separate_class_token=s.class_token == "separate", kind=s.kind, rank=s.rank,
                                 hidden=s.hidden).to(fronts[i - 1].device)
            if s.front_rank is not None:
                rows = as_rows(fronts[i - 1].float(), front_layout, self.front.context(inputs).attention_mask)
                stitch.projection = principal_projection(rows, s.front_rank, front_layout).to(rows.device)
            if s.init == "dm":
                stitch.fit(stitch.prepare(fronts[i - 1]).float(), ends[j - 1].float(), mask)
            else:
                stitch.initialise(s.init)
            self.stitches[self.key(i, j)] = stitch

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.stitches.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        if not self.update_bn:  # BN running statistics stay as they are (eval mode)
            self.front.eval()
            self.tails.eval()
        return self

    def passes(self, x, y=None, need_loss: bool = True):
        """Per tail pass (an end layer's stitches, or a chunk of them), every cell's ``(key,
        logits, loss)`` on one batch (loss ``None`` unless asked), one pass at a time: a caller
        that backpropagates each group before asking for the next keeps one pass's graph in
        memory, not the grid's."""
        with torch.no_grad():
            _, fronts = cut_point_activations(self.front, x, upto=self.deepest)
            teacher, targets_all = (cut_point_activations(self.reference, x) if need_loss else (None, None))
        mask = self.reference.context(x).attention_mask
        for j, c, front_layers in ((j, c, part) for j, parts in self.chunks.items() for c, part in enumerate(parts)):
            provider, tail = self.providers[j], self.tails[f"{j}_{c}"]
            stitched = [self.stitches[self.key(i, j)](fronts[i - 1]) for i in front_layers]
            with torch.set_grad_enabled(torch.is_grad_enabled() and provider.tail_grad):
                # a hint objective still runs the tail, so its BN statistics see stitched data
                result = tail(interleave(stitched), tail.context(x),
                              return_features=need_loss and provider.needs_features)
            logits, later = result if (need_loss and provider.needs_features) else (result, [])
            logits = deinterleave(logits, len(stitched))
            later = [deinterleave(part, len(stitched)) for part in later]
            if need_loss:
                targets = [] if provider.targets is None else (
                    [targets_all[j - 1]] if provider.targets == "end" else targets_all[j - 1:])
            group = []
            for g, i in enumerate(front_layers):
                loss = None
                if need_loss:
                    loss = provider.objective_loss([stitched[g], *[part[g] for part in later]], logits[g], targets,
                                                   teacher, y, mask)
                group.append((self.key(i, j), logits[g], loss))
            yield j, group

    def cell_network(self, i: int, j: int, end_copy: nn.Module) -> StitchedNetwork:
        """Cell ``(i, j)`` as an ordinary stitched network: the trained front (shared), its stitch
        and ``end_copy``'s tail carrying the cell's own BatchNorm statistics."""
        c = next(c for c, part in enumerate(self.chunks[j]) if i in part)
        load_group(self.tails[f"{j}_{c}"].model, end_copy, self.chunks[j][c].index(i))
        return StitchedNetwork(cut(self.front, i).head, self.stitches[self.key(i, j)], cut(end_copy, j).tail,
                               update_bn=self.update_bn)


class _Tally:
    """Weighted mean loss and accuracy of each cell over an epoch (as Lightning's epoch logs)."""

    def __init__(self):
        self.loss, self.correct, self.count = {}, {}, {}

    def add(self, key: str, loss: float | None, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = len(y)
        self.count[key] = self.count.get(key, 0) + n
        self.correct[key] = self.correct.get(key, 0) + int((logits.argmax(-1) == y).sum())
        if loss is not None:
            self.loss[key] = self.loss.get(key, 0.0) + float(loss) * n

    def metrics(self, key: str, prefix: str) -> dict[str, float]:
        n = self.count[key]
        out = {f"{prefix}/acc": self.correct[key] / n}
        if key in self.loss:
            out[f"{prefix}/loss"] = self.loss[key] / n
        return out


def train_grid(grid: FusedGrid, train_batches, epochs: int, progress: bool = True,
               limit_batches: int | None = None,
               precision: str | None = None) -> tuple[dict[str, dict], dict[str, NonFiniteError], dict[str, list]]:
    """Train every stitch; returns each cell's last-epoch ``train/loss``, ``train/acc``, the
    cells whose loss or stitch turned non-finite (they stop training; the others go on) and
    each cell's mean training loss per epoch (its curve)."""
    optimiser = grid.configure_optimizer()
    failed: dict[str, NonFiniteError] = {}
    curves: dict[str, list[float]] = {}
    tally = _Tally()
    step = 0
    for _ in range(epochs):
        grid.train()
        tally = _Tally()
        epoch = islice(train_batches, limit_batches) if limit_batches is not None else train_batches
        for x, y in tqdm(epoch, desc="grid epoch", disable=not progress, leave=False):
            x, y = x.to(grid.device), y.to(grid.device)
            optimiser.zero_grad(set_to_none=True)
            stepped = False
            groups = grid.passes(x, y)
            while True:  # one end layer at a time: its graph is freed by its backward
                with precision_autocast(grid.device.type, precision):
                    group = next(groups, None)
                if group is None:
                    break
                total = []
                for key, logits, loss in group[1]:
                    if key in failed:
                        continue
                    if not torch.isfinite(loss):
                        failed[key] = NonFiniteError("the loss", float(loss.detach()), step)
                        continue
                    tally.add(key, loss.detach(), logits.detach(), y)
                    total.append(loss)
                if total:  # stitches of different end layers share nothing: gradients accumulate apart
                    torch.stack(total).sum().backward()
                    stepped = True
            if stepped:
                optimiser.step()
            for key, stitch in grid.stitches.items():
                if key in failed:
                    continue
                for name, parameter in stitch.named_parameters():
                    if not torch.isfinite(parameter).all():
                        failed[key] = NonFiniteError(f"stitch weight {name}", parameter[~torch.isfinite(parameter)]
                                                     .flatten()[0].item(), step)
                        break
            step += 1
        for key in tally.loss:
            curves.setdefault(key, []).append(tally.metrics(key, "train")["train/loss"])
    return {key: tally.metrics(key, "train") for key in tally.count}, failed, curves


@torch.no_grad()
def test_grid(grid: FusedGrid, test_batches, precision: str | None = None) -> dict[str, dict]:
    """Every cell's ``test/acc`` and ``test/loss`` (cross-entropy) from one fused test pass."""
    grid.eval()
    tally = _Tally()
    for x, y in test_batches:
        x, y = x.to(grid.device), y.to(grid.device)
        with precision_autocast(grid.device.type, precision):
            cells = [cell for _, group in grid.passes(x, need_loss=False) for cell in group]
        for key, logits, _ in cells:
            tally.add(key, nn.functional.cross_entropy(logits.float(), y), logits, y)
    return {key: tally.metrics(key, "test") for key in tally.count}


# -- the command line ----------------------------------------------------------------------
def cell_config(cfg: DictConfig, i: int, j: int) -> DictConfig:
    """``cfg`` as the single run of cell ``(i, j)`` would have it."""
    cell = copy.deepcopy(cfg)
    OmegaConf.update(cell, "stitch.front_layer", i, merge=False)
    OmegaConf.update(cell, "stitch.end_layer", j, merge=False)
    return cell


def tail_chunk(tail_samples, batch_size: int, device) -> int | None:
    """Stitches per tail pass from ``grid.tail_samples`` (``auto``: 256 samples on a CPU, where a
    larger batch falls out of the caches and each sample costs more; all of them on a GPU)."""
    if tail_samples == "auto":
        tail_samples = None if torch.device(device).type == "cuda" else 256
    return None if tail_samples is None else max(1, int(tail_samples) // int(batch_size))


def run_grid(cfg: DictConfig, out: Path, progress: bool = True) -> dict:
    """Train and record every cell of ``grid.pairs``; returns ``{"done", "skipped", "failed", "fused", "timings"}``."""
    from stitching.api import Prepared
    from stitching.build import Run, build_datamodule, check_compatible, is_text, load_models, read_settings, \
        reconcile_inputs
    from stitching.models import cut_point_names
    from stitching.runs import config_hash, failure_record, finish_run, finished_record, run

    watch = Stopwatch()
    settings = read_settings(cfg)
    out = Path(out)
    with watch.section("data_s"):
        datamodule = build_datamodule(cfg)
        datamodule.setup()
        datamodule.stream_seed, datamodule.device = settings.seed, settings.device  # as a single run's
    with watch.section("zoo_s"):
        front, front_record, end, end_record = load_models(cfg, settings, ([1], [1]), stitched=False,
                                                           datamodule=datamodule)
    pairs = grid_pairs(OmegaConf.to_container(cfg.grid, resolve=True).get("pairs"), len(cut_point_names(front)),
                       len(cut_point_names(end)))
    objective = settings.objective
    folder = lambda i, j: out / objective / FusedGrid.key(i, j)  # noqa: E731
    todo, skipped = [], []
    for i, j in pairs:  # a rerun keeps what it finished
        (skipped if finished_record(folder(i, j), config_hash(cell_config(cfg, i, j))) else todo).append((i, j))
    summary = {"done": [], "skipped": skipped, "failed": [], "fused": True, "cells": len(pairs)}
    reason = cannot_fuse(cfg, settings, is_text(datamodule))
    if reason is None:
        unsupported = _unsupported_norms(end)
        reason = f"the end model has {', '.join(unsupported)}" if unsupported else None
    if reason is not None or not todo:
        summary["fused"] = False
        if todo:
            print(f"[grid] {reason}: {len(todo)} single runs", file=sys.stderr)
        for i, j in tqdm(todo, desc="single runs", disable=not progress):
            cell = cell_config(cfg, i, j)
            try:
                run(cell, folder(i, j))
                summary["done"].append((i, j))
            except Exception as err:
                failure_record(cell, folder(i, j), err)
                summary["failed"].append(((i, j), f"{type(err).__name__}: {err}"))
            release_memory()
        summary["timings"] = watch.report()
        return summary
    inputs = reconcile_inputs(front, end, datamodule)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    samples = datamodule.sample_train_images(settings.stitch.dm_samples, seed=settings.seed)
    check_compatible(front, end, datamodule, samples[:2])
    with watch.section("dm_init_s"):
        grid = FusedGrid(front, end, todo, objective, samples, settings.stitch, settings.fula_weights,
                         datamodule.num_classes, settings.device,
                         chunk=tail_chunk(cfg.grid.get("tail_samples", "auto"), datamodule.batch_size, settings.device))
    if settings.trainer.get("channels_last") and grid.device.type == "cuda":  # GPUs only, as speed_up
        grid.to(memory_format=torch.channels_last)
    if settings.trainer.get("compile"):
        for tail in grid.tails.values():
            tail.compile()
    trainer = settings.trainer
    epochs = int(trainer.get("max_epochs", 1) or 0) if grid.providers[todo[0][1]].trainable else 0
    loader = datamodule.train_dataloader()
    limit = trainer.get("limit_train_batches")
    limit = int(len(loader) * limit) if isinstance(limit, float) else limit  # as Lightning reads it
    with watch.section("fit_s"):
        train_metrics, failed, curves = train_grid(grid, loader, epochs, progress, limit, trainer.get("precision"))
    with watch.section("test_s"):
        test_metrics = test_grid(grid, datamodule.test_dataloader(), trainer.get("precision"))
    shared = watch.report()
    share = {k: round(v / len(todo), 3) for k, v in shared.items()}
    end_copies = {j: copy.deepcopy(end).to(settings.device) for j in grid.groups}
    for i, j in tqdm(todo, desc="cells", disable=not progress, leave=False):
        key, cell = FusedGrid.key(i, j), cell_config(cfg, i, j)
        run_dir = folder(i, j)
        run_dir.mkdir(parents=True, exist_ok=True)
        if key in failed:
            failure_record(cell, run_dir, failed[key])
            summary["failed"].append(((i, j), str(failed[key])))
            continue
        network = grid.cell_network(i, j, end_copies[j])
        module = objective_module(objective, network, grid.reference, j, datamodule.num_classes,
                                  settings.stitch.lr, settings.stitch.weight_decay, settings.fula_weights)
        cell_settings = replace(settings, stitch=replace(settings.stitch, front_layer=i, end_layer=j))
        prep = Run(cell_settings, datamodule, front, end, front_record, end_record, inputs,
                   Prepared(cut(grid.front, i), cut(end_copies[j], j), module))
        cell_watch = Stopwatch()
        metrics = {**test_metrics[key], **train_metrics.get(key, {})}
        finish_run(cell, prep, metrics, cell_watch, run_dir,
                   timings={**{f"grid_{k}": v for k, v in share.items()}, "total_s": share["total_s"]
                            + cell_watch.report()["total_s"], "fused_cells": len(todo)},
                   curve={"train/loss": curves[key]} if key in curves else None)
        summary["done"].append((i, j))
    summary["timings"] = watch.report()
    return summary


def sweep_grids(overrides: list[str]) -> list[tuple[list[str], list[tuple[int, int]] | str]]:
    """A ``-m`` sweep (the command line's and its preset's ``hydra.sweeper.params``) as whole
    grids: ``(overrides of one grid, its cells)`` for every combination of the axes other than
    the layer keys; the layer keys' combinations become the grid's cells (none given: the
    corresponding layers, as ``stitching.train -m``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from stitching import CONF_DIR

    params = {}
    for arg in overrides:
        if arg.startswith("experiment="):
            preset = CONF_DIR / "experiment" / f"{arg.split('=', 1)[1]}.yaml"
            if preset.is_file():
                params = OmegaConf.to_container(OmegaConf.load(preset)).get("hydra", {}).get("sweeper", {}) \
                    .get("params", {}) or {}
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in overrides if "=" in arg}
    swept = [f"{key}={value}" for key, value in params.items() if key not in given] + list(overrides)
    try:
        combos = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(swept), None)[0]
    except Exception as err:  # Hydra's own first line names the bad override
        raise StitchingError(str(err).splitlines()[0]) from None
    grids: dict[tuple, list] = {}
    for combo in combos:
        layers = {key: value for key, value in (item.split("=", 1) for item in combo) if key in LAYER_KEYS}
        rest = tuple(item for item in combo if item.split("=", 1)[0] not in LAYER_KEYS)
        cells = grids.setdefault(rest, [])
        if layers:
            shared = layers.get("stitch.layer")
            cells.append((int(layers.get("stitch.front_layer", shared)), int(layers.get("stitch.end_layer", shared))))
    return [(list(rest), list(dict.fromkeys(cells)) if cells else "diagonal") for rest, cells in grids.items()]


def _folder_name(number: int, overrides: list[str], varying: set[str]) -> str:
    parts = [item for item in overrides if item.split("=", 1)[0] in varying]
    return "_".join([str(number), *(re.sub(r"[^\w.=-]+", "-", item) for item in parts)])


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from stitching.build import compose_config

    parser = argparse.ArgumentParser(prog="python -m stitching.grid", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="a sweep: one whole grid per combination of the swept keys other than the layers "
                             "(their combinations, and a preset's, are each grid's cells)")
    parser.add_argument("--out", default=None, help="the grid's (or sweep's) folder (default: outputs/grids/<time>); "
                        "an existing one resumes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for stitching.train (grid.pairs=all|diagonal|"
                        "[[i,j],…]; default: experiment=demo)")
    args = parser.parse_args(argv)
    overrides = args.overrides or ["experiment=demo"]
    launcher = [arg for arg in overrides if arg.startswith(("hydra/launcher", "hydra.launcher"))]
    if launcher:
        raise StitchingError(f"{launcher[0]}: a fused grid trains in this process; on a cluster submit one "
                             f"`python -m stitching.grid` per grid, or sweep single runs with python -m stitching.train -m")
    out = Path(args.out) if args.out else Path("outputs/grids") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if args.multirun:
        grids = sweep_grids(overrides)
        varying = {key for key in {item.split("=", 1)[0] for rest, _ in grids for item in rest}
                   if len({item for rest, _ in grids for item in rest if item.split("=", 1)[0] == key}) > 1}
        plan = [(rest, cells, out / _folder_name(k, rest, varying)) for k, (rest, cells) in enumerate(grids)]
    else:
        plan = [(overrides, None, out)]
    configs = []
    for rest, cells, folder in plan:  # every grid's config is read (and checked) before any is trained
        extra = [] if cells is None else [f"grid.pairs={_pairs_override(cells)}"]
        configs.append((compose_config([*rest, *extra]), folder))
    failed = 0
    for cfg, folder in configs:
        summary = run_grid(cfg, folder, progress=not args.no_progress)
        how = "fused" if summary["fused"] else "as single runs"
        print(f"{cfg.objective.name}: {len(summary['done'])} cells trained {how}, {len(summary['skipped'])} already "
              f"finished, {len(summary['failed'])} failed; {summary['timings']['total_s']:.1f}s; cells in "
              f"{folder.resolve()}")
        for (i, j), error in summary["failed"]:
            print(f"  FAILED f{i}-e{j}: {error}", file=sys.stderr)
        failed += len(summary["failed"])
        release_memory()
    if failed:
        print(f"[grid] {failed} cell(s) failed; `python -m stitching.report {out}` lists them", file=sys.stderr)
        sys.exit(1)


def _pairs_override(cells) -> str:
    return cells if isinstance(cells, str) else "[" + ",".join(f"[{i},{j}]" for i, j in cells) + "]"


if __name__ == "__main__":
    main(sys.argv[1:])
