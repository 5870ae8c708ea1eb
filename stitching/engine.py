"""The one engine: the stitches of a set of cells, trained together under Lightning.

A *cell* is a pair (front cut point i, end cut point j). A single run is an engine of one
cell; a 9×9 grid is an engine of 81; the grids of a sweep that differ in their models alone (several
fronts into one end, or into several ends that keep no running statistics) are one engine whose
cells also name their grid.
Lightning owns every loop, so precision, ``limit_*``, ``max_steps``, progress bars and logging
mean the same for one cell or many; gradient clipping and accumulation are applied per cell by
the engine (each cell as in its own run). Per batch:

* each front model runs once, to its deepest needed cut point (every cut activation kept, no
  grad), however many grids and ends read it;
  its BatchNorm statistics update exactly as each cell's own front copy would (a cell's head
  only reads layers up to its own cut point);
* each reference end model (an untouched copy in eval mode) runs once, for its cells' targets
  and teacher outputs;
* the stitched activations go through the end tails. An end that keeps no running statistics
  (language models, LayerNorm ViTs) or normalises with ``BatchNorm2d`` passes an end layer's
  stitched batches through one tail copy together, interleaved along the batch, with the
  end's context (attention mask, positions) of the inputs repeated to match, and per-stitch
  BatchNorm statistics (:mod:`stitching.models.grouped`); other ends (other running norms)
  run each cell's stitched activation through a tail of its own;
* one Adam over all stitches (Adam is per parameter: the same steps as separate optimisers);
  each end layer's summed loss is backpropagated before the next is computed, so one end
  layer's graph is in memory at a time.

Adversarial stitching attacks each cell's own stitched network, so each cell then has a front
copy of its own. Random starts are seeded per cell: a cell equals its own single run.
A cell whose loss or stitch turns non-finite stops training and is reported failed; the other
cells go on.
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from torch import nn

from stitching.attacks import mix_adversarial, pgd_settings
from stitching.data.contract import check_batch
from stitching.errors import NonFiniteError, StitchingError
from stitching.models.cutting import CuttableModel, Head, Tail, cut, cut_point_activations
from stitching.models.grouped import deinterleave, group_batchnorms, interleave, load_group
from stitching.models.language import LanguageModel, token_ids
from stitching.models.layout import as_rows, channels, compatible
from stitching.objectives.objective import Objective
from stitching.objectives.tasks import IGNORE, Classification, NextToken, Representation, task_of
from stitching.runtime import Stopwatch, build_trainer, speed_up
from stitching.settings import StitchSettings, check_capacity, default_lr
from stitching.stitch_layers import Stitch, TokenStitch, batches, make_stitch, principal_projection, to_device


def cell_key(i: int, j: int, front: str = "") -> str:
    """A cell's name, as its run folder is named: ``f<i>-e<j>`` (``<front>/f<i>-e<j>`` in an
    engine of several fronts)."""
    return f"{front}/f{i}-e{j}" if front else f"f{i}-e{j}"


def cell_seed(seed: int, i: int, j: int) -> int:
    """The seed of cell ``(i, j)``'s random start: the same in a grid as in its own run."""
    return zlib.crc32(f"{seed}/{i}/{j}".encode())


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


def running_stat_norms(model: nn.Module) -> list[nn.Module]:
    """The normalisation layers of ``model`` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


@dataclass(frozen=True)
class Chunk:
    """Stitches into end layer ``j`` of end model ``end`` that pass one tail together (``fronts``:
    their ``(grid name, front layer)``, in the order they are interleaved)."""

    name: str
    j: int
    fronts: tuple[tuple[str, int], ...]
    grouped: bool  # interleaved through a tail with grouped BatchNorms
    end: str = "end"  # the end model's slot (:attr:`StitchEngine.references`)


def repeat_inputs(inputs, times: int):
    """Every sample ``times`` times in a row, as :func:`~stitching.models.grouped.interleave` orders stitches."""
    if isinstance(inputs, dict):
        return {key: value.repeat_interleave(times, 0) if torch.is_tensor(value) else value
                for key, value in inputs.items()}
    return inputs.repeat_interleave(times, 0)


class StitchEngine(L.LightningModule):
    """Train the stitches of ``cells`` between copies of ``front`` and ``end`` under ``objective``.

    Args:
        front, end: cuttable models; never changed (the engine works on copies). ``front`` may
            be ``{name: model}``: several grids' fronts (names of letters, digits, ``_``, ``-``), into
            the one ``end`` or, with ``end`` as ``{name: model}`` under the same names, each into its
            own; a model given under several names is copied and run once.
        cells: ``[(i, j), …]`` 1-based cut points (front, end); with several fronts ``[(name, i, j), …]``.
        objective: what the stitches minimise (:mod:`stitching.objectives.objective`).
        stitch: how stitches are made, started and trained (:class:`~stitching.settings.StitchSettings`).
        dm_inputs: training inputs for the DM solution (and ``front_rank``'s projection).
        num_classes: for the accuracy metrics (default: the end model's).
        adversarial: ``alpha`` (share of each batch replaced by PGD examples against each cell's
            stitched network) and the PGD settings; ``None`` or α = 0: clean.
        seed: seeds each cell's random start.
        tail_chunk: at most this many of an end layer's stitches pass its tail together (``None``: all).
        device: where the DM solutions are computed.
    """

    def __init__(self, front: CuttableModel | dict[str, CuttableModel], end: CuttableModel, cells: list[tuple],
                 objective: Objective, stitch: StitchSettings, dm_inputs, num_classes: int | None = None,
                 adversarial: dict | None = None, seed: int = 0, tail_chunk: int | None = None, device="cpu"):
        super().__init__()
        self.automatic_optimization = False  # per-cell clipping, and one end layer's graph at a time
        self.statistics_only = False  # True during DM's running-statistics pass (stitch.dm_bn_pass)
        fronts, self.cells = _fronts_and_cells(front, cells)
        ends = _ends_of(end, fronts)
        self.objective, self.settings, self.seed = objective, stitch, int(seed)
        self.adversarial = dict(adversarial or {})
        self.alpha = float(self.adversarial.get("alpha", 0.0) or 0.0)
        # one slot per distinct model: grids that name the same front or end share its copy and its pass
        self._front_canon = _slots(fronts, "shared")
        self._end_of = _slots(ends, "end")
        first: dict[str, str] = {}  # each end slot's first name
        for name, slot in self._end_of.items():
            first.setdefault(slot, name)
        self.references = nn.ModuleDict({slot: copy.deepcopy(ends[name]).to(device).eval().requires_grad_(False)
                                         for slot, name in first.items()})
        self._cell_end = {cell_key(i, j, f): self._end_of[f] for f, i, j in self.cells}
        tasks = [task_of(model) for model in self.references.values()]
        self.task = tasks[0]
        if len({type(task) for task in tasks}) > 1 or len({getattr(m, "num_classes", None)
                                                            for m in self.references.values()}) > 1:
            raise StitchingError("grids trained in one engine need end models of one task and one label set; "
                                 "train these grids apart")
        #: Adam's learning rate: ``stitch.lr``, or its default for this objective and these models
        self.lr = stitch.lr if stitch.lr is not None else default_lr(
            objective.name, all(isinstance(model, LanguageModel) for model in (*fronts.values(), *ends.values())))
        if objective.needs_task_head and isinstance(self.task, Representation):
            raise StitchingError(f"objective {objective.name} needs an end model with a task head (a classifier or a "
                                 f"language-model head); this end model is a bare encoder: use dm, hint or fula")
        if self.alpha > 0 and not isinstance(self.task, Classification):
            raise StitchingError("adversarial stitching (attack.alpha > 0) applies to image classifiers only")
        for f, i, j in self.cells:  # before any copy: layouts that cannot be joined are one line
            problem = compatible(cut(fronts[f], i).layout, cut(ends[f], j).layout)
            if problem:
                raise StitchingError(problem)
        self.num_classes = num_classes if num_classes is not None else self.reference.num_classes
        check_batch(dm_inputs, vocab_size=getattr(self.reference.input_spec, "vocab_size", None),
                    where="the DM samples")  # before any copy or fit
        self.clip_val: float | None = None
        self.clip_algorithm = "norm"
        self.accumulate = 1
        # fronts: one shared copy of each, or one per cell when each cell attacks its own network
        slots = {self._front_slot(f, i, j): f for f, i, j in self.cells}
        self.fronts = nn.ModuleDict({slot: copy.deepcopy(fronts[f]).to(device).requires_grad_(False)
                                     for slot, f in slots.items()})
        self._build_tails(ends, tail_chunk, dm_inputs, device)
        for e, j in sorted({(self._end_of[f], j) for f, _, j in self.cells}):
            weights = objective.hint_weights(len(self.references[e].cut_points) - j + 1)
            if weights is not None:
                self.register_buffer(self._hint_name(e, j), weights.to(device))
        self.stitches = nn.ModuleDict()
        self._initialise(to_device(dm_inputs, device))
        self.metrics = nn.ModuleDict({cell_key(i, j, f): self._cell_metrics() for f, i, j in self.cells})
        self.curves: dict[str, list[float]] = {cell_key(i, j, f): [] for f, i, j in self.cells}
        self.failed: dict[str, NonFiniteError] = {}
        self._last_train: dict[str, dict] = {}
        # the test metrics, computed (and, under DDP, synced) while the engine is still on its device:
        # Lightning moves the module back to the CPU when a stage ends, where a GPU process group cannot sync
        self._last_test: dict[str, dict] = {}
        self._backward_pending = False  # a backward pass since the last optimiser step
        self._batches_seen = 0  # training batches so far (seeds each cell's adversarial draws)
        self.primary = True  # False in the other processes of a DDP run: they write nothing

    # -- construction ------------------------------------------------------------------------
    def _build_tails(self, ends: dict[str, CuttableModel], tail_chunk: int | None, dm_inputs, device) -> None:
        """Chunks of each end model's end layers' stitches and the tail copies they pass through."""
        models = {self._end_of[name]: model for name, model in ends.items()}
        groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for f, i, j in self.cells:
            groups.setdefault((self._end_of[f], j), []).append((f, i))
        order = list(self.references)
        self.chunks, self.tails = [], nn.ModuleDict()
        for e in order:
            norms = running_stat_norms(models[e])
            together = self.alpha == 0 and all(type(m) is nn.BatchNorm2d for m in norms)
            if norms and together:  # grouped BatchNorms see each stitch's batch; a context would need repeating too
                context = self.references[e].context(batches(to_device(dm_inputs, device), 2)[0])
                together = context.attention_mask is None and context.position_ids is None and not context.extras
            mine = {j: fronts for (slot, j), fronts in groups.items() if slot == e}
            size = (tail_chunk or max(len(fronts) for fronts in mine.values())) if together else 1
            prefix = "" if len(order) == 1 else f"{e}_"
            chunks = [Chunk(f"{prefix}{j}_{c}", j, tuple(fronts[k:k + size]),
                            bool(norms) and len(fronts[k:k + size]) > 1, e)
                      for j, fronts in sorted(mine.items()) for c, k in enumerate(range(0, len(fronts), size))]
            shared = None if norms else copy.deepcopy(models[e]).to(device)  # no running statistics: one copy serves all
            for chunk in chunks:
                model = shared if shared is not None else copy.deepcopy(models[e]).to(device)
                if chunk.grouped:
                    group_batchnorms(model, len(chunk.fronts))
                self.tails[chunk.name] = cut(model, chunk.j).tail
            self.chunks += chunks
        self.tails.requires_grad_(False)

    @property
    def reference(self) -> CuttableModel:
        """The (first) reference end model: an untouched copy in eval mode."""
        return next(iter(self.references.values()))

    def _hint_name(self, end: str, j: int) -> str:
        return f"hint_weights_{j}" if len(self.references) == 1 else f"hint_weights_{end}_{j}"

    def _front_slot(self, f: str, i: int, j: int) -> str:
        """The front copy cell ``(f, i, j)`` runs: its front model's shared one, or its own when attacked."""
        return cell_key(i, j, f) if self.alpha > 0 else self._front_canon[f]

    def front_of(self, i: int, j: int, front: str = "") -> CuttableModel:
        return self.fronts[self._front_slot(front, i, j)]

    def _chunk_of(self, i: int, j: int, front: str = "") -> Chunk:
        return next(chunk for chunk in self.chunks
                    if chunk.j == j and chunk.end == self._end_of[front] and (front, i) in chunk.fronts)

    @torch.no_grad()
    def _activations(self, model: CuttableModel, inputs, upto: int | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every cut point's activation (up to ``upto``) on ``inputs`` in eval mode, 100 at a time."""
        mode = model.training
        model.eval()
        parts, masks = [], []
        for part in batches(inputs, 100):
            _, acts = cut_point_activations(model, part, upto=upto)
            parts.append([a.float() for a in acts])
            masks.append(model.context(part).attention_mask)
        model.train(mode)
        stacked = [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]
        return stacked, None if masks[0] is None else torch.cat(masks)

    @torch.no_grad()
    def _initialise(self, inputs) -> None:
        """Make every stitch, project its front if asked, and fit DM (or start it at the
        identity, or at a random map seeded per cell), from one pass of each model."""
        s = self.settings
        # every copy of a front model is identical before training: one pass of each front model
        canon = self._front_canon
        copies = {canon[f]: self.front_of(i, j, f) for f, i, j in self.cells}
        fronts = {c: self._activations(model, inputs, upto=max(i for g, i, _ in self.cells if canon[g] == c))[0]
                  for c, model in copies.items()}
        ends = {e: self._activations(model, inputs, upto=max(j for g, _, j in self.cells if self._end_of[g] == e))
                for e, model in self.references.items()}
        for f, i, j in self.cells:
            front, end = copies[canon[f]], self.references[self._end_of[f]]
            (end_acts, mask) = ends[self._end_of[f]]
            front_layout, end_layout = front.cut_points[i - 1].layout, end.cut_points[j - 1].layout
            a_front, a_end = fronts[canon[f]][i - 1], end_acts[j - 1]
            check_capacity(s.kind, s.rank, s.front_rank, (channels(a_front, front_layout), channels(a_end, end_layout)))
            with torch.random.fork_rng(devices=[]):  # every random number of a cell's stitch is its own
                torch.manual_seed(cell_seed(self.seed, i, j))
                try:
                    stitch = make_stitch(a_front[:2], front_layout, a_end[:2], end_layout,
                                         separate_class_token=s.class_token == "separate", kind=s.kind, rank=s.rank,
                                         hidden=s.hidden).to(a_front.device)
                except ValueError as err:
                    raise StitchingError(str(err)) from None
                if s.init in ("random", "identity"):
                    stitch.initialise(s.init)
            if s.front_rank is not None:
                try:
                    stitch.projection = principal_projection(as_rows(a_front, front_layout, mask), s.front_rank,
                                                             front_layout).to(a_front.device)
                except ValueError as err:
                    raise StitchingError(f"stitch.front_rank={s.front_rank}: {err}; use more stitch.dm_samples") from None
            if s.init == "dm":
                stitch.fit(stitch.prepare(a_front).float(), a_end, mask)
            self.stitches[cell_key(i, j, f)] = stitch

    def _cell_metrics(self) -> nn.ModuleDict:
        mean = lambda: torchmetrics.MeanMetric(nan_strategy="disable")  # noqa: E731 — a NaN is kept, never dropped
        metrics = {"train_loss": mean(), "test_loss": mean()}
        if self.task.has_accuracy:
            metrics["train_acc"] = torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro")
            metrics["test_acc"] = torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro")
        if isinstance(self.task, NextToken):
            metrics["test_end_loss"], metrics["test_penalty"] = mean(), mean()
        return nn.ModuleDict(metrics)

    # -- what a user reads -------------------------------------------------------------------
    def network(self, i: int, j: int, front: str = "") -> StitchedNetwork:
        """Cell ``(i, j)`` (of front ``front`` in an engine of several) as an ordinary stitched
        network: its front (shared or its own), its stitch and an end tail carrying the cell's
        own BatchNorm statistics (a fresh copy when the cell trained interleaved with others)."""
        chunk = self._chunk_of(i, j, front)
        tail = self.tails[chunk.name]
        if chunk.grouped:
            plain = copy.deepcopy(self.references[chunk.end])
            load_group(tail.model, plain, chunk.fronts.index((front, i)))
            tail = cut(plain, j).tail
        return StitchedNetwork(cut(self.front_of(i, j, front), i).head, self.stitches[cell_key(i, j, front)], tail,
                               update_bn=self.settings.update_bn)

    def results(self) -> dict[str, dict]:
        """Per cell: ``metrics`` (test metrics and the last epoch's training ones), ``curve``
        (mean training loss per epoch) and ``error`` (the divergence, or ``None``)."""
        out = {}
        for f, i, j in self.cells:
            key = cell_key(i, j, f)
            metrics = dict(self._last_test.get(key, {}))
            metrics.update({name.replace("_", "/", 1): value for name, value in self._last_train.get(key, {}).items()})
            out[key] = {"metrics": metrics, "curve": list(self.curves[key]), "error": self.failed.get(key)}
        return out

    # -- training ----------------------------------------------------------------------------
    def configure_steps(self, gradient_clip_val=None, gradient_clip_algorithm=None, accumulate_grad_batches=None):
        """``trainer.gradient_clip_val``/``gradient_clip_algorithm`` (each cell's gradient
        clipped on its own, as in its own run) and ``trainer.accumulate_grad_batches``."""
        self.clip_val = None if gradient_clip_val in (None, 0) else float(gradient_clip_val)
        self.clip_algorithm = gradient_clip_algorithm or "norm"
        if self.clip_algorithm not in ("norm", "value"):
            raise StitchingError(f"trainer.gradient_clip_algorithm={self.clip_algorithm}: choose norm or value")
        if self.clip_val is not None and not self.clip_val > 0:
            raise StitchingError(f"trainer.gradient_clip_val={gradient_clip_val} must be positive (or null: no clipping)")
        accumulate = 1 if accumulate_grad_batches is None else accumulate_grad_batches
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise StitchingError(f"trainer.accumulate_grad_batches={accumulate_grad_batches} must be an integer ≥ 1")
        self.accumulate = accumulate

    def configure_optimizers(self):
        return torch.optim.Adam(self.stitches.parameters(), lr=self.lr, weight_decay=self.settings.weight_decay)

    def train(self, mode: bool = True):
        super().train(mode)
        self.references.eval()
        if not self.settings.update_bn:  # BN running statistics stay as they are (eval mode)
            self.fronts.eval()
            self.tails.eval()
        return self

    def on_fit_start(self) -> None:
        batches_per_epoch = self.trainer.num_training_batches
        if batches_per_epoch == 0:
            raise StitchingError("no training batches: the training split is empty or trainer.limit_train_batches "
                                 "rounds to 0 batches; raise it (a fraction of the batches, or a count ≥ 1)")

    def on_train_epoch_start(self) -> None:
        # Lightning keeps each submodule's mode at fit start and the zoo hands out eval-mode
        # models, so switch explicitly: BN statistics update unless update_bn=False.
        self.train()
        for metrics in self.metrics.values():
            for name in ("train_loss", "train_acc"):
                if name in metrics:
                    metrics[name].reset()

    def on_train_epoch_end(self) -> None:
        logged = {}
        for key, metrics in self.metrics.items():
            if not metrics["train_loss"].update_count:
                continue
            epoch = {name: float(metrics[name].compute()) for name in ("train_loss", "train_acc") if name in metrics}
            self._last_train[key] = epoch
            self.curves[key].append(epoch["train_loss"])
            prefix = "" if len(self.cells) == 1 else f"{key}/"
            logged.update({f"{prefix}{name.replace('_', '/', 1)}": value for name, value in epoch.items()})
        if logged:
            self.log_dict(logged, on_step=False, on_epoch=True, rank_zero_only=True)

    def check_data(self, batch, where: str) -> None:
        """One line if ``batch`` breaks the data contract (:mod:`stitching.data.contract`)."""
        check_batch(batch, self.num_classes if isinstance(self.task, Classification) else None,
                    getattr(self.reference.input_spec, "vocab_size", None), isinstance(self.task, Classification), where)

    def training_step(self, batch, batch_idx):
        self.check_data(batch, "the training data")
        if self.statistics_only:  # DM's running-statistics pass: the stitched passes run, nothing trains
            with torch.no_grad():
                for _ in self._passes(self.task.split(batch, train=True)[0], train=False):
                    pass
            return None
        x, y = self.task.split(batch, train=True)
        size = self._size(x, y)
        self._batches_seen += 1
        live, pending = [], []
        # DDP reduces gradients once per step, so a distributed step backpropagates every end layer at
        # once, after the processes agree on which losses are finite (each saw its own share of the batch)
        one_backward = self.trainer.world_size > 1
        for group in self._passes(x, y, train=True):
            group = [(key, logits, loss) for key, logits, loss in group if key not in self.failed]
            if one_backward:
                pending.extend(group)
                continue
            total = self._finite(group, agreed_finite([loss for _, _, loss in group], False), y, size) if group else []
            if total:  # stitches of different end layers share nothing: gradients accumulate apart
                self.manual_backward(torch.stack(total).sum() / self.accumulate)
                self._backward_pending = True
                live.extend(t.detach() for t in total)
        if pending:  # every process keeps the same cells, so all of them backpropagate, or none
            total = self._finite(pending, agreed_finite([loss for _, _, loss in pending], True), y, size)
            if total:
                self.manual_backward(torch.stack(total).sum() / self.accumulate)
                self._backward_pending = True
                live.extend(t.detach() for t in total)
        # a window in which every loss was non-finite has no gradient to step on (and a mixed-precision
        # loss scaler, which never scaled a loss, refuses to step)
        if self._steps_now(batch_idx) and self._backward_pending:
            optimiser = self.optimizers()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            self._backward_pending = False
            self._check_weights()
        if live:
            self.log("train/loss", torch.stack(live).mean(), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=size, rank_zero_only=True)
        if len(self.failed) == len(self.cells):
            self.trainer.should_stop = True

    def _finite(self, group, finite: list[bool], y, size) -> list[torch.Tensor]:
        """The losses of ``group`` (``(key, logits, loss)``) that are finite; a cell whose loss is not
        fails here, never trained on or recorded again; the metrics take the finite ones."""
        kept = []
        for (key, logits, loss), ok in zip(group, finite):
            if not ok:  # never train on, and never record, a diverged stitch
                value = float(loss.detach())
                here = not math.isfinite(value)  # else it diverged on another process's share of the batch
                self.failed[key] = NonFiniteError("the loss" if here else "the loss in another process",
                                                  value if here else float("nan"), self.global_step)
                continue
            metrics = self.metrics[key]
            metrics["train_loss"].update(loss.detach(), size)
            if "train_acc" in metrics:
                metrics["train_acc"].update(*self.task.scored(logits.detach(), y))
            kept.append(loss)
        return kept

    def _steps_now(self, batch_idx: int) -> bool:
        """Step after every ``accumulate`` batches and at the end of an epoch (as Lightning's own accumulation)."""
        last = batch_idx + 1 == self.trainer.num_training_batches or self.trainer.is_last_batch
        return (batch_idx + 1) % self.accumulate == 0 or last

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.clip_val is None:
            return
        for key, stitch in self.stitches.items():  # each cell's gradient on its own, as in its own run
            if key in self.failed:
                continue
            if self.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(stitch.parameters(), self.clip_val)
            else:
                torch.nn.utils.clip_grad_value_(stitch.parameters(), self.clip_val)

    def _check_weights(self) -> None:
        """Fail each live stitch with a non-finite weight: one check for all of them (on a GPU one
        host synchronisation per step, not one per parameter)."""
        live = [(key, name, parameter) for key, stitch in self.stitches.items() if key not in self.failed
                for name, parameter in stitch.named_parameters()]
        if not live:
            return
        finite = torch.stack([torch.isfinite(parameter).all() for _, _, parameter in live]).tolist()
        for (key, name, parameter), ok in zip(live, finite):
            if not ok and key not in self.failed:
                bad = parameter[~torch.isfinite(parameter)].flatten()[0].item()
                self.failed[key] = NonFiniteError(f"stitch weight {name}", bad, self.global_step - 1)

    def _size(self, x, y) -> int:
        """What a batch's mean is over: inputs, or target tokens for a language model."""
        if isinstance(self.task, NextToken):
            return int((y != IGNORE).sum())
        return len(y) if y is not None else len(token_ids(x)[0]) if isinstance(x, dict) else len(x)

    # -- the fused pass ------------------------------------------------------------------------
    def _lanes(self, x, y, train: bool):
        """``(inputs, chunks)``: one lane over the shared fronts, or (adversarial stitching)
        one per cell, on that cell's own adversarial batch."""
        if self.alpha == 0 or not train:
            yield x, self.chunks
            return
        settings = pgd_settings(self.adversarial)
        for chunk in self.chunks:
            (f, i), j = chunk.fronts[0], chunk.j
            if cell_key(i, j, f) in self.failed:
                continue
            # the attack's randomness is the cell's own: the same in a grid as in its own run
            generator = torch.Generator().manual_seed(cell_seed(self.seed, i, j) + self._batches_seen)
            yield mix_adversarial(self.network_view(i, j, f), x, y, self.alpha, generator=generator, **settings), [chunk]

    def network_view(self, i: int, j: int, front: str = "") -> StitchedNetwork:
        """Cell ``(i, j)``'s network over the engine's own modules (a tail of its own: chunks of one)."""
        return StitchedNetwork(cut(self.front_of(i, j, front), i).head, self.stitches[cell_key(i, j, front)],
                               self.tails[self._chunk_of(i, j, front).name], update_bn=self.settings.update_bn)

    def _passes(self, x, y=None, train: bool = True):
        """Per tail pass, every cell's ``(key, output, loss)`` on one batch (loss ``None`` in
        the test pass), one pass at a time: a caller that backpropagates each group before
        asking for the next keeps one pass's graph in memory, not the grid's."""
        objective = self.objective
        for inputs, chunks in self._lanes(x, y, train):
            cells_here = [(f, i, chunk.j) for chunk in chunks for f, i in chunk.fronts]
            deepest: dict[str, int] = {}  # each front copy runs once, to the deepest cut point read from it
            for f, i, j in cells_here:
                slot = self._front_slot(f, i, j)
                deepest[slot] = max(i, deepest.get(slot, 0))
            ends_here = list(dict.fromkeys(chunk.end for chunk in chunks))
            with torch.no_grad():
                activations = {slot: cut_point_activations(self.fronts[slot], inputs, upto=upto)[1]
                               for slot, upto in deepest.items()}
                references = {e: (None, []) for e in ends_here}  # each end's (teacher, targets)
                if train and (objective.targets or objective.needs_teacher):
                    for e in ends_here:
                        deepest_end = None if objective.targets == "all" or objective.needs_teacher else \
                            max(chunk.j for chunk in chunks if chunk.end == e)
                        references[e] = cut_point_activations(self.references[e], inputs, upto=deepest_end)
            masks = {e: self.references[e].context(inputs).attention_mask for e in ends_here}
            contexts = {}
            for chunk in chunks:
                (teacher, targets_all), mask = references[chunk.end], masks[chunk.end]
                tail = self.tails[chunk.name]
                together = len(chunk.fronts)
                context = contexts.get((id(tail.model), together))
                if context is None:  # interleaved stitches read each input's context as many times in a row
                    context = contexts[(id(tail.model), together)] = tail.context(
                        inputs if together == 1 else repeat_inputs(inputs, together))
                stitched = [self.stitches[cell_key(i, chunk.j, f)](activations[self._front_slot(f, i, chunk.j)][i - 1])
                            for f, i in chunk.fronts]
                features = train and objective.needs_features
                with torch.set_grad_enabled(torch.is_grad_enabled() and objective.tail_grad):
                    # a hint objective still runs the tail, so its BN statistics see stitched data
                    joined = interleave(stitched) if len(stitched) > 1 else stitched[0]
                    result = tail(joined, context, return_features=features)
                logits, later = result if features else (result, [])
                if len(stitched) > 1:
                    logits = deinterleave(logits, len(stitched))
                    later = [deinterleave(part, len(stitched)) for part in later]
                else:
                    logits, later = (logits,), [(part,) for part in later]
                group = []
                for g, (f, i) in enumerate(chunk.fronts):
                    loss = None
                    if train:
                        j = chunk.j
                        targets = [] if objective.targets is None else (
                            [targets_all[j - 1]] if objective.targets == "end" else targets_all[j - 1:])
                        loss = objective.loss([stitched[g], *[part[g] for part in later]], logits[g], targets, teacher,
                                              y, mask, self.task, getattr(self, self._hint_name(chunk.end, j), None))
                    group.append((cell_key(i, chunk.j, f), logits[g], loss))
                yield group

    # -- test ----------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        for metrics in self.metrics.values():
            for name, metric in metrics.items():
                if name.startswith("test_"):
                    metric.reset()

    def on_test_epoch_end(self) -> None:
        self._last_test = {key: {name.replace("_", "/", 1): float(metric.compute()) for name, metric in metrics.items()
                                 if name.startswith("test_") and metric.update_count}
                           for key, metrics in self.metrics.items()}

    def test_step(self, batch, batch_idx):
        self.check_data(batch, "the test data")
        x, y = self.task.split(batch)
        size = self._size(x, y)
        own = {e: None for e in self.references}  # each end model's own output
        if isinstance(self.task, (NextToken, Representation)):
            with torch.no_grad():
                own = {e: model(x) for e, model in self.references.items()}
        masks = {e: model.context(x).attention_mask for e, model in self.references.items()}
        end_loss = {e: self.task.loss(out, y) if isinstance(self.task, NextToken) else None for e, out in own.items()}
        for group in self._passes(x, train=False):
            for key, output, _ in group:
                if key in self.failed:
                    continue
                metrics, e = self.metrics[key], self._cell_end[key]
                if isinstance(self.task, Representation):  # how far the stitched output is from the end's own
                    loss = self.task.loss(output, own[e], masks[e])
                else:
                    loss = self.task.loss(output, y)
                metrics["test_loss"].update(loss, size)
                if "test_acc" in metrics:
                    metrics["test_acc"].update(*self.task.scored(output, y))
                if end_loss[e] is not None:
                    metrics["test_end_loss"].update(end_loss[e], size)
                    metrics["test_penalty"].update(loss - end_loss[e], size)


def agreed_finite(losses: list[torch.Tensor], distributed: bool) -> list[bool]:
    """Whether each loss is finite (one host synchronisation for all of them); ``distributed``: in
    every process of the run, so a stitch whose loss diverged on one process's share of the batch
    fails in all of them."""
    flags = torch.stack([torch.isfinite(loss.detach()).all() for loss in losses]).to(torch.int32)
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    return [bool(flag) for flag in flags.tolist()]


def _fronts_and_cells(front, cells) -> tuple[dict[str, CuttableModel], list[tuple[str, int, int]]]:
    """``({name: front model}, [(front name, i, j), …])``: one front is named ``""``."""
    several = isinstance(front, dict)
    fronts = dict(front) if several else {"": front}
    if several and (not fronts or not all(isinstance(name, str) and re.fullmatch(r"[\w-]+", name) for name in fronts)):
        raise StitchingError(f"several fronts are named by letters, digits, _ and -; got {sorted(map(str, fronts))}")
    try:
        normal = [(str(c[0]), int(c[1]), int(c[2])) if several else ("", int(c[0]), int(c[1])) for c in cells]
        wrong = [c for c in cells if len(c) != (3 if several else 2)]
    except (TypeError, ValueError, IndexError):
        normal, wrong = [], [None]
    if wrong:
        raise StitchingError("cells are (front layer, end layer) pairs" + (
            ", named by their front: (front name, front layer, end layer)" if several else ""))
    unknown = sorted({f for f, _, _ in normal} - set(fronts))
    if unknown:
        raise StitchingError(f"cells name unknown fronts {unknown}; the fronts are {sorted(fronts)}")
    normal = list(dict.fromkeys(normal))
    if not normal:
        raise StitchingError("no cells to train: give at least one (front layer, end layer) pair")
    return fronts, normal


def _ends_of(end, fronts: dict[str, CuttableModel]) -> dict[str, CuttableModel]:
    """``{grid name: end model}``: the one end for every front, or ``end`` given per front name."""
    if not isinstance(end, dict):
        return {name: end for name in fronts}
    if set(end) != set(fronts):
        raise StitchingError(f"several end models are named as the fronts, one per front: fronts {sorted(fronts)}, "
                             f"ends {sorted(map(str, end))}")
    return {name: end[name] for name in fronts}


def _slots(models: dict[str, nn.Module], single: str) -> dict[str, str]:
    """Each name's slot: the first name that holds the same model object (``single`` where that
    name is empty, or where one model serves every name)."""
    first: dict[int, str] = {}
    for name, model in models.items():
        first.setdefault(id(model), name)
    if len(first) == 1:
        return {name: single for name in models}
    return {name: first[id(model)] or single for name, model in models.items()}


#: ``trainer`` settings the engine applies per cell (Lightning's own apply to automatic optimisation only)
ENGINE_KEYS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


def fit_engine(engine: StitchEngine, train, test, trainer: dict | None = None, logger=False, run_dir=None,
               watch=None) -> dict[str, dict]:
    """Train every stitch (unless the objective is closed-form or ``max_epochs`` is 0), then
    test; returns :meth:`StitchEngine.results`.

    ``train``/``test``: data loaders; ``trainer``: Lightning Trainer settings (``max_epochs``,
    ``accelerator``, ``precision``, ``limit_*_batches``, ``max_steps``…), the same for one cell
    as for a grid.
    """
    watch = watch or Stopwatch()
    options = {"accelerator": "auto", "devices": 1, "max_epochs": 1, **(trainer or {})}
    engine.configure_steps(**{key: options.pop(key, None) for key in ENGINE_KEYS})
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="stitch-"))
    speed_up(engine, options, parts=[*engine.fronts.values(), *{id(t.model): t for t in engine.tails.values()}.values()])
    if options.get("strategy") == "ddp":  # a cell that failed leaves its stitch out of the step
        options["strategy"] = "ddp_find_unused_parameters_true"
    with watch.section("fit_s"):
        if engine.objective.trainable and options.get("max_epochs", 0) != 0 and options.get("max_steps", -1) != 0:
            fitter = build_trainer(options, run_dir, logger=logger)
            fitter.fit(engine, train_dataloaders=train)
        elif engine.settings.dm_bn_pass:  # one epoch of the training data, front and end BN in train mode
            engine.statistics_only = True
            try:
                build_trainer({**options, "max_epochs": 1, "max_steps": -1}, run_dir, logger=logger).fit(
                    engine, train_dataloaders=train)
            finally:
                engine.statistics_only = False
    with watch.section("test_s"):
        # every process tests every batch (no padded shards): the synced metrics are the test set's own
        tester = build_trainer(options, run_dir, logger=logger, enable_progress_bar=False, use_distributed_sampler=False)
        tester.test(engine, dataloaders=test, verbose=False)
    engine.primary = tester.is_global_zero
    return engine.results()
