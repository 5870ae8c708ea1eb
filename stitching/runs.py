"""One stitching run and its record: the library behind ``python -m stitching.train``,
the fused grid's cells, grounding and the bench.

:func:`run` reads top to bottom: data → base models from the zoo → cut → DM initialisation →
train the stitch under the objective → test → ``results.json`` in the run directory
(:func:`finish_run`, which a fused grid calls for each of its cells). A failed run leaves
:func:`failure_record`; :func:`config_hash` and :func:`finished_record` let a rerun keep what
it finished.
"""

from __future__ import annotations

import copy
import json
import sys
import traceback
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from stitching.build import Run, Settings, Setup, as_settings, cell_run, is_text, make_engine, outlier_arrays, prepare, setup
from stitching.data import save_examples
from stitching.data.text import PairDataModule
from stitching.evaluate import (
    base_accuracy,
    cached_robust_metrics,
    evaluation_settings,
    ood_metrics,
    pair_metrics,
    penultimate_cka,
    robust_metrics,
    subset_accuracy,
    testbed_metrics,
)
from stitching.engine import cell_key, fit_engine
from stitching.errors import NonFiniteError, StitchingError
from stitching.models import cut_point_names
from stitching.models.inputs import near_chance
from stitching.objectives.tasks import adjusted_penalty
from stitching.results.schema import config_hash, problems
from stitching.runtime import Stopwatch, build_logger, cache_warning, versions, write_json_atomic
from stitching.saving import save as save_network

#: how far the end model's own test loss may differ between a run and its self-stitch baseline
#: (the same model on the same tokens: only float summation order differs)
END_LOSS_TOLERANCE = 1e-4


def run(settings: Settings | DictConfig, run_dir: Path, sweep_name: str | None = None) -> dict | None:
    """One stitching run (an engine of one cell); returns the record also written to
    ``run_dir/results.json`` (``None`` in a DDP run's other processes, which write nothing). A
    stitch that diverged raises :class:`NonFiniteError`."""
    watch = Stopwatch()
    settings = as_settings(settings)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepare(settings, watch)
    i, j, objective = prep.front_layer, prep.end_layer, settings.objective
    config = settings.config
    logger_options = copy.deepcopy(settings.logger)
    if logger_options.get("group") is None and sweep_name:
        logger_options["group"] = sweep_name  # the runs of one sweep share a W&B group
    logger = build_logger(logger_options, run_dir, run_name=f"{objective}_f{i}_e{j}", config=config)
    try:
        init_metrics = initial_metrics(settings, prep, watch)
        results = fit_engine(prep.engine, prep.datamodule.train_dataloader(), prep.datamodule.test_dataloader(),
                             settings.trainer, logger=logger, run_dir=run_dir, watch=watch)
        if not prep.engine.primary:  # another process of a DDP run: the first one writes the record
            return None
        cell = results[cell_key(i, j)]
        if cell["error"] is not None:
            raise cell["error"]
        with watch.section("baseline_s"):
            baseline = self_baselines(settings, {(i, j): cell["metrics"]}, None, progress=False).get((i, j))
        if isinstance(baseline, BaseException):
            raise baseline
        record = finish_run(settings, prep, {**cell["metrics"], **init_metrics}, watch, run_dir,
                            curve={"train/loss": cell["curve"]} if cell["curve"] else None, baseline=baseline)
        if logger:
            logger.log_metrics({f"final/{k}": v for k, v in record["metrics"].items()})
    finally:  # a W&B run is closed whether the stitching run finished or failed
        if logger and hasattr(logger, "experiment") and settings.logger.get("kind") == "wandb":
            logger.experiment.finish()
    return record


def initial_metrics(settings: Settings, prep: Run, watch: Stopwatch) -> dict:
    """What is measured on the stitched network at its start, before training
    (``evaluation.penultimate_cka``: the DM-initialised network against the end model, Fig. 6)."""
    if not settings.evaluation.penultimate_cka:
        return {}
    with watch.section("init_eval_s"):
        # its start (a fresh view: the run's own is read after training)
        network = prep.engine.network(*prep.prepared.cell, prep.prepared.front_name)
        return {"init/penultimate_cka": penultimate_cka(network, copy.deepcopy(prep.end), prep.datamodule,
                                                        prep.settings.attack, prep.settings.device, prep.settings.seed)}


def finish_run(settings: Settings, prep: Run, metrics: dict, watch: Stopwatch, run_dir: Path,
               timings: dict | None = None, curve: dict | None = None, baseline: dict | None = None) -> dict:
    """Save the trained stitch, evaluate the testbeds and write ``results.json`` (the single
    run's and each cell of a fused grid's); return the record. ``curve``: per-epoch values
    (``{"train/loss": [...]}``), recorded as they are; ``baseline``: the language model's
    self-stitch baseline (:func:`self_baselines`), recorded with the adjusted penalty."""
    network = prep.network
    i, j = prep.front_layer, prep.end_layer
    config = settings.config
    torch.save(network.stitch.state_dict(), run_dir / "stitch.pt")
    save_network(run_dir / "network.pt", network, prep.front, prep.end,
                 provenance={side: {"key": record["key"], "source": _provenance(record)}
                             for side, record in (("front", prep.front_record), ("end", prep.end_record))})
    with watch.section("eval_s"):
        extra, base, evaluation = evaluate_testbeds(settings, prep)
    record = {
        "status": "ok",
        "objective": settings.objective,
        "front_layer": i, "end_layer": j,
        "front_layer_name": cut_point_names(prep.front)[i - 1], "end_layer_name": cut_point_names(prep.end)[j - 1],
        "metrics": {**metrics, **extra, **adjusted_penalty(metrics, baseline)},
        **({"curve": curve} if curve else {}),
        **({"baseline": baseline} if baseline else {}),
        "base": base,
        "evaluation": evaluation,
        "inputs": prep.inputs,
        "stitch": {"parameters": sum(p.numel() for p in network.stitch.parameters()),
                   "kind": network.stitch.kind,
                   "front_rank": network.stitch.projection.rank if network.stitch.projection is not None else None,
                   "dm_rows": getattr(network.stitch, "dm_rows", None),  # least-squares rows of the DM start
                   "lr": prep.engine.lr,  # the learning rate used (stitch.lr, or its default when null)
                   "in_channels": network.stitch.channels[0],
                   "out_channels": network.stitch.channels[1],
                   "out_size": list(network.stitch.out_size) if network.stitch.out_size else None,
                   "layouts": {"front": prep.prepared.front.layout.describe(),
                               "end": prep.prepared.end.layout.describe()}},
        "timings": {**watch.report(), **(timings or {})},
        "versions": versions(),
        "config": config,
        "config_hash": config_hash(config),
    }
    wrong = problems(record)
    if wrong:  # what the report would refuse is never written as a result
        raise StitchingError(f"the run's own record is invalid ({'; '.join(wrong[:3])}); it is recorded as failed")
    write_json_atomic(run_dir / "results.json", record)
    return record


def evaluate_testbeds(settings: Settings, prep: Run) -> tuple[dict, dict, dict]:
    """Testbed metrics of the stitched network, the base models' own, and what was evaluated."""
    attack, device, seed = settings.attack, settings.device, settings.seed
    sides = {"front": settings.front, "end": settings.end}
    datamodule, network = prep.datamodule, prep.network
    if is_text(datamodule):  # language models: the test pass measured the losses and the penalty
        base = {side: {"key": record["key"], "test_acc": record.get("test_acc"), "test_loss": record.get("test_loss"),
                       "dataset": sides[side].spec.dataset, "source": _provenance(record)}
                for side, record in (("front", prep.front_record), ("end", prep.end_record))}
        evaluation = {"kind": "text", "corpus": datamodule.corpus, "tokenizer": datamodule.tokenizer_spec,
                      "context": datamodule.context, "test_sequences": len(datamodule.arrays.test),
                      **({"subsets": datamodule.subsets} if datamodule.subsets else {})}
        if not isinstance(datamodule, PairDataModule):
            return {}, base, evaluation
        # sentence pairs: the classifiers' accuracy on the test split and the challenge set (HANS)
        metrics, scores = pair_metrics(network, {"front": prep.front, "end": prep.end}, datamodule, device)
        for side, values in scores.items():
            base[side].update({k: v for k, v in values.items() if base[side].get(k) is None})
        evaluation["challenge"] = datamodule.challenge
        return metrics, base, evaluation
    metrics = testbed_metrics(network, datamodule, device)
    metrics.update({f"test/{k}": v for k, v in robust_metrics(network, datamodule, attack, device, seed).items()})
    base = {}
    for side, model, record in (("front", prep.front, prep.front_record), ("end", prep.end, prep.end_record)):
        base[side] = {"key": record["key"], "test_acc": record.get("test_acc"), "dataset": sides[side].spec.dataset,
                      "source": _provenance(record)}
        given = base[side]["test_acc"] is None
        # scored on the run's test images, as the stitch is (the zoo's record holds the whole split's)
        on_subset = subset_accuracy(model, record, datamodule, device, sides[side].spec.dataset == settings.dataset)
        if on_subset:
            base[side].update(on_subset)
        elif given and getattr(model, "num_classes", None) == datamodule.num_classes:
            base[side]["test_acc"] = base_accuracy(model, datamodule, device)  # a given model, on these data
        if given and base[side]["test_acc"] is not None:
            warning = near_chance(side, base[side]["test_acc"], datamodule.num_classes, prep.inputs.get(side))
            if warning:
                print(warning, file=sys.stderr, flush=True)
                base[side]["warning"] = warning
        if sides[side].spec.dataset == settings.dataset and (attack["eval_pgd"] or attack["eval_autoattack"]):
            # base models are attacked on their own task only, once per attack setting
            base[side].update(cached_robust_metrics(model, record["path"], datamodule, attack, device, seed))
    ood = settings.evaluation.ood
    if ood["enabled"]:
        metrics.update(ood_metrics(network, prep.end, prep.end_layer, prep.end_record["path"], datamodule,
                                   copy.deepcopy(ood), device, seed,
                                   outlier_dataset=lambda name: outlier_arrays(settings, name)))
    evaluation = evaluation_settings(attack, settings.shortcut, datamodule)
    if datamodule.subsets:  # how the training subset was drawn
        evaluation["subsets"] = datamodule.subsets
    if ood["enabled"]:
        evaluation["ood"] = {**copy.deepcopy(ood), "end_layer": prep.end_layer}
    if datamodule.shortcut is not None:
        shortcut = settings.shortcut
        example = Path(settings.paths.output_dir) / "shortcut_examples" / (
            f"{datamodule.name}-{shortcut['kind']}-{shortcut['placement']}-s{shortcut['seed']}.png")
        try:
            if not example.is_file():
                save_examples(datamodule.shortcut, datamodule.arrays.train_x, datamodule.arrays.train_y, example)
            evaluation["shortcut_examples"] = str(example)
        except OSError as err:  # a picture for people, never worth the run's metrics
            cache_warning(example, err)
    return metrics, base, evaluation


def _provenance(record: dict) -> dict:
    """Where a base model came from: trained here (recipe, seed, epochs) or given (file/hub, SHA-256)."""
    if record.get("source", "trained here") == "trained here":
        return {"kind": "trained here", "path": record.get("path"), "seed": record.get("seed", record.get("spec", {}).get("seed")),
                "epochs": record.get("epochs", record.get("recipe", {}).get("epochs")), "recipe": record.get("recipe"),
                **({"identity": record["identity"]} if record.get("identity") else {}),
                **({"sha256": record["sha256"]} if record.get("sha256") else {})}
    return {"kind": record["source"], **{k: record.get(k) for k in ("path", "hub", "sha256", "library", "name")}}


def summary(record: dict, run_dir: Path) -> str:
    base = record["base"]
    m = record["metrics"]
    lines = [
        f"stitching  {record['objective'].upper()}  front layer {record['front_layer']} ({record['front_layer_name']})"
        f" → end layer {record['end_layer']} ({record['end_layer_name']})",
        f"  front {base['front']['key']:<40} {_base_score(base['front'])}",
        f"  end   {base['end']['key']:<40} {_base_score(base['end'])}",
        _stitched_score(m)
        + (f"   train loss {m['train/loss']:.4f}" if "train/loss" in m else ""),
    ]
    extra = {k: v for k, v in m.items() if k.startswith("test/")
             and k not in ("test/acc", "test/loss", "test/end_loss", "test/penalty", "test/baseline_loss",
                           "test/adjusted_penalty")}
    if extra:
        lines.append("  " + "   ".join(f"{k.removeprefix('test/')} {v:.4f}" for k, v in extra.items()))
    for side in ("front", "end"):
        robust = {k: v for k, v in base[side].items() if k.startswith("robust_acc")}
        if robust:
            lines.append(f"  {side} " + "   ".join(f"{k} {v:.4f}" for k, v in robust.items()))
    lines += [f"  time {record['timings']['total_s']:.1f}s   record {run_dir / 'results.json'}"]
    return "\n".join(lines)


def _stitched_score(m: dict) -> str:
    if "test/penalty" in m:  # a language model
        line = (f"  stitched test loss {m['test/loss']:.4f}   end model's own {m['test/end_loss']:.4f}   "
                f"raw penalty {m['test/penalty']:+.4f} nats/token")
        if "test/adjusted_penalty" in m:
            line += (f"\n  self-stitch baseline {m['test/baseline_loss']:.4f}   "
                     f"adjusted penalty {m['test/adjusted_penalty']:+.4f} nats/token")
        return line
    if "test/acc" in m:
        return f"  stitched test acc {m['test/acc']:.4f}   test loss {m['test/loss']:.4f}"
    return f"  stitched output's relative error to the end model's own {m['test/loss']:.4f}"  # a bare encoder


def _base_score(base: dict) -> str:
    if base.get("test_acc") is None and base.get("test_loss") is not None:
        return f"test loss {base['test_loss']:.4f} nats/token"
    return f"test acc {'—' if base.get('test_acc') is None else format(base['test_acc'], '.4f')}"


def failure_record(given: Settings | DictConfig, run_dir: Path, err: BaseException) -> None:
    """``results.json`` of a run that failed: why, and its config (as given when it could not
    be read into settings)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(given, Settings):
        objective, config = given.objective, given.config
    else:
        objective, config = OmegaConf.select(given, "objective.name"), OmegaConf.to_container(given, resolve=False)
    record = {
        "status": "failed", "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(), "objective": objective, "config": config,
    }
    with suppress(Exception):  # a config that does not resolve has no hash
        record["config_hash"] = config_hash(given.config if isinstance(given, Settings) else given)
    if isinstance(err, NonFiniteError):
        record["diverged"] = {"what": err.what, "value": str(err.value), "step": err.step}
    write_json_atomic(run_dir / "results.json", record)


class ResultExists(StitchingError):
    """The run folder holds a finished result of another config; it is left as it is."""


def finished_record(run_dir: Path, digest: str) -> dict | None:
    """The ``ok`` record already in ``run_dir`` for this config (a resumed sweep skips the cell),
    ``None`` when the cell is to run (no record, or a failed or unreadable one)."""
    path = run_dir / "results.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok" or "metrics" not in record:
        return None
    if config_hash(record.get("config") or {}) != digest:
        raise ResultExists(f"{path} holds a finished result of a different config; it is left untouched: "
                           f"use another hydra.sweep.dir (or hydra.run.dir), or delete that folder to redo it")
    if problems(record):  # not a result the report would read: the cell runs again
        return None
    return record




def score(record: dict) -> float | None:
    """What a cell returns to Hydra's sweeper: accuracy, or a language model's penalty (adjusted
    when it has a self-stitch baseline)."""
    m = record["metrics"]
    return m.get("test/acc", m.get("test/adjusted_penalty", m.get("test/penalty")))


# -- several cells in one engine ---------------------------------------------------------
def cell_config(settings: Settings | DictConfig, i: int, j: int) -> Settings:
    """The settings of the single run of cell ``(i, j)``."""
    return as_settings(settings).for_cell(i, j)


def pending_cells(settings: Settings, cells: list[tuple[int, int]], out: Path,
                  folders: dict[tuple[int, int], Path] | None = None) -> list[tuple[int, int]]:
    """The cells of ``cells`` with no finished record of their own config in their folder
    (``folders[cell]``, else ``<out>/<objective>/f<i>-e<j>``)."""
    return [(i, j) for i, j in cells
            if not finished_record(cell_folder(settings, out, i, j, folders), config_hash(settings.for_cell(i, j).config))]


def cell_folder(settings: Settings, out: Path, i: int, j: int, folders: dict[tuple[int, int], Path] | None = None) -> Path:
    """Where cell ``(i, j)`` is recorded: ``folders[(i, j)]`` when given, else
    ``<out>/<objective>/f<i>-e<j>``."""
    return Path(folders[(i, j)]) if folders else out / settings.objective / cell_key(i, j)


def record_cells(settings: Settings, done: Setup, cells: list[tuple[int, int]], out: Path, watch: Stopwatch,
                 progress: bool = True, tail_chunk: int | None = None) -> dict:
    """Train ``cells`` of ``settings`` in one engine and record each in
    ``<out>/<objective>/f<i>-e<j>/`` (a finished cell of the same config is kept); returns
    ``{"done", "skipped", "failed", "cells", "timings", "primary"}``."""
    return record_grids([Grid(settings, done, cells, out)], watch, progress, tail_chunk)[0]


@dataclass
class Grid:
    """The cells of one grid: its settings, its setup, its cells and its folder (``folders``:
    each cell's own folder instead of ``<out>/<objective>/f<i>-e<j>``)."""

    settings: Settings
    done: Setup
    cells: list[tuple[int, int]]
    out: Path
    folders: dict[tuple[int, int], Path] | None = None
    todo: list[tuple[int, int]] = field(default_factory=list)  # the cells without a finished record
    summary: dict = field(default_factory=dict)

    def folder(self, i: int, j: int) -> Path:
        return cell_folder(self.settings, self.out, i, j, self.folders)


def record_grids(grids: list[Grid], watch: Stopwatch, progress: bool = True, tail_chunk: int | None = None) -> list[dict]:
    """Grids whose settings differ in their models alone, trained in one engine (each front and
    end model runs once per batch, an end's tails take several fronts' stitches at once) and
    recorded each in its own folder as :func:`record_cells` does; one summary per grid. A cell's
    record is that of its own single run."""
    for grid in grids:
        grid.todo = pending_cells(grid.settings, grid.cells, grid.out, grid.folders)  # a rerun keeps what it finished
        grid.summary = {"done": [], "skipped": [cell for cell in grid.cells if cell not in grid.todo], "failed": [],
                        "cells": len(grid.cells), "primary": True}
    live = [grid for grid in grids if grid.todo]
    summaries = [grid.summary for grid in grids]
    if not live:
        for summary in summaries:
            summary["timings"] = watch.report()
        return summaries
    first = live[0]
    for grid in live[1:]:
        if grid.done.datamodule is not first.done.datamodule:
            raise StitchingError("grids trained in one engine share one setup of their data")
    names = [f"g{k}" for k in range(len(live))] if len(live) > 1 else [""]
    cells = [(name, i, j) for name, grid in zip(names, live) for i, j in grid.todo]
    fronts = {name: grid.done.front for name, grid in zip(names, live)} if len(live) > 1 else None
    ends = {name: grid.done.end for name, grid in zip(names, live)} \
        if any(grid.done.end is not first.done.end for grid in live) else None
    engine = make_engine(first.done, cells if fronts else live[0].todo, watch, tail_chunk=tail_chunk, fronts=fronts,
                         ends=ends)
    of = dict(zip(names, live))
    runs = {(name, cell): cell_run(grid.done, engine, cell, name) for name, grid in of.items() for cell in grid.todo}
    initial = {(name, cell): initial_metrics(of[name].settings, prep, watch) for (name, cell), prep in runs.items()}
    settings = first.settings
    trainer = {**settings.trainer, "enable_progress_bar": progress and settings.trainer.get("enable_progress_bar", True)}
    results = fit_engine(engine, first.done.datamodule.train_dataloader(), first.done.datamodule.test_dataloader(),
                         trainer, run_dir=first.out / settings.objective, watch=watch)
    if not engine.primary:  # another process of a DDP run: the first one writes the cells
        for summary in summaries:
            summary.update(primary=False, timings=watch.report())
        return summaries
    baselines = {}
    with watch.section("baseline_s"):
        for name, grid in of.items():
            trained = {(i, j): results[cell_key(i, j, name)]["metrics"] for i, j in grid.todo
                       if results[cell_key(i, j, name)]["error"] is None}
            # a baseline is read from a cell of this grid only where cells sit in the usual layout
            for cell, baseline in self_baselines(grid.settings, trained, None if grid.folders else grid.out,
                                                 progress).items():
                baselines[(name, cell)] = baseline
    share = {k: round(v / len(runs), 3) for k, v in watch.report().items()}
    for (name, (i, j)), prep in tqdm(runs.items(), desc="cells", disable=not progress, leave=False):
        grid = of[name]
        summary = grid.summary
        cell, result = grid.settings.for_cell(i, j), results[cell_key(i, j, name)]
        run_dir = grid.folder(i, j)
        run_dir.mkdir(parents=True, exist_ok=True)
        error = result["error"] if result["error"] is not None else baselines.get((name, (i, j)))
        if isinstance(error, BaseException):
            failure_record(cell, run_dir, error)
            summary["failed"].append(((i, j), str(error)))
            continue
        cell_watch = Stopwatch()
        finish_run(cell, prep, {**result["metrics"], **initial[(name, (i, j))]}, cell_watch, run_dir,
                   timings={**{f"grid_{k}": v for k, v in share.items()}, "total_s": share["total_s"]
                            + cell_watch.report()["total_s"], "fused_cells": len(runs)},
                   curve={"train/loss": result["curve"]} if result["curve"] else None,
                   baseline=baselines.get((name, (i, j))))
        summary["done"].append((i, j))
    for summary in summaries:
        summary["timings"] = watch.report()
    return summaries


# -- the self-stitch baseline of a language-model penalty ---------------------------------
def wants_baseline(settings: Settings, metrics: dict) -> bool:
    """``evaluation.self_baseline``: ``auto`` (a next-token penalty was measured), ``true`` or
    ``false``."""
    return settings.evaluation.self_baseline is not False and "test/penalty" in metrics


def self_baselines(settings: Settings, measured: dict[tuple[int, int], dict], out: Path | None,
                   progress: bool = True) -> dict[tuple[int, int], dict | BaseException]:
    """The self-stitch baseline of every cell ``(i, j)`` of ``settings`` in ``measured`` (its test
    metrics) that measured a language-model penalty: ``{cell: baseline}`` (or the error that
    left the cell without one).

    The baseline of cell ``(i, j)`` is the end model stitched into itself at ``j`` by the same
    objective, data, budget and seed: what training a stitch of this capacity on this corpus
    gains without any dissimilarity to bridge. One per end layer serves a whole grid: a cell
    that is its own baseline (front = end, ``i = j``) or whose baseline is another cell of the
    grid (in ``out``) is read, the others are trained once, together, in a baseline store
    (``paths.baselines_dir``) shared by every run and sweep of the same settings.
    """
    wanted = {cell: metrics for cell, metrics in measured.items() if wants_baseline(settings, metrics)}
    if not wanted:
        return {}
    fresh = {config_hash(settings.for_cell(*cell).config): (cell, metrics) for cell, metrics in wanted.items()}
    found, missing = {}, {}
    objective = settings.objective
    for cell, metrics in wanted.items():
        digest = config_hash(settings.for_cell(*cell).self_stitch().config)
        j = cell[1]
        if digest in fresh:  # the cell itself, or another cell of this grid
            source, values = fresh[digest]
            found[cell] = _baseline(values, digest, (out / objective / cell_key(*source)) if out else None,
                                    "this run" if source == cell else "this grid")
            continue
        record = _finished(out / objective / cell_key(j, j), digest) if out else None
        if record is not None:  # a cell of this grid that an earlier run of it finished
            found[cell] = _baseline(record["metrics"], digest, out / objective / cell_key(j, j), "this grid")
        else:
            missing[cell] = digest
    if missing:
        base = settings.self_stitch()
        store = Path(settings.paths.baselines_dir) / config_hash(base.for_cell(0, 0).config)
        # those an earlier run made are read back with no set-up (no data or model loaded again)
        layers = sorted({j for (_, j), digest in missing.items()
                         if _finished(store / objective / cell_key(j, j), digest) is None})
        summary = {"failed": []}
        try:
            if layers:
                done = setup(base, layers=(layers, layers))
                summary = record_cells(base, done, [(j, j) for j in layers], store, Stopwatch(), progress=progress)
        except (StitchingError, RuntimeError, ValueError) as err:  # every cell waiting on it fails, with why
            summary = {"failed": [((j, j), str(err)) for j in layers]}
        failed = {cell: error for cell, error in summary["failed"]}
        for cell, digest in missing.items():
            j = cell[1]
            folder = store / objective / cell_key(j, j)
            record = _finished(folder, digest)
            found[cell] = _baseline(record["metrics"], digest, folder, "baseline store") if record else StitchingError(
                f"the self-stitch baseline at end layer {j} failed ({failed.get((j, j), 'no record')}); see {folder}")
    for cell, baseline in found.items():  # the same end model on the same tokens, or no baseline at all
        if isinstance(baseline, dict) and abs(baseline["test_end_loss"] - wanted[cell]["test/end_loss"]) > END_LOSS_TOLERANCE:
            found[cell] = StitchingError(
                f"the self-stitch baseline in {baseline['results']} measured the end model's own loss as "
                f"{baseline['test_end_loss']:.6f} but this run measured {wanted[cell]['test/end_loss']:.6f}: it was "
                f"made with other weights or data; delete that folder to remake it")
    return found


def _finished(folder: Path, digest: str) -> dict | None:
    try:
        return finished_record(folder, digest)
    except ResultExists:  # that folder holds another config's cell, not this baseline
        return None


def _baseline(metrics: dict, digest: str, folder: Path | None, where: str) -> dict:
    return {"test_loss": metrics["test/loss"], "test_end_loss": metrics["test/end_loss"], "config_hash": digest,
            "from": where, "results": str(folder / "results.json") if folder else None}
