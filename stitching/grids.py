"""Layer grids as data: which cells ``grid.pairs`` names, each cell's config, a whole grid
trained by one engine and recorded cell by cell, and a ``-m`` sweep planned as whole grids
(the library behind ``python -m stitching.grid``, the bench and the claims).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from stitching import CONF_DIR, LAYER_KEYS
from stitching.build import cell_run, make_engine, setup
from stitching.engine import cell_key, fit_engine
from stitching.errors import StitchingError
from stitching.models import cut_point_names
from stitching.runs import config_hash, failure_record, finish_run, finished_record, initial_metrics
from stitching.runtime import Stopwatch

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
    """Train and record every cell of ``grid.pairs`` in one engine; returns ``{"done",
    "skipped", "failed", "cells", "timings"}``."""
    watch = Stopwatch()
    out = Path(out)
    done = setup(cfg, watch, layers=([1], [1]), stitched=False)
    settings = done.settings
    pairs = grid_pairs(OmegaConf.to_container(cfg.grid, resolve=True).get("pairs"),
                       len(cut_point_names(done.front)), len(cut_point_names(done.end)))
    folder = lambda i, j: out / settings.objective / cell_key(i, j)  # noqa: E731
    todo, skipped = [], []
    for i, j in pairs:  # a rerun keeps what it finished
        (skipped if finished_record(folder(i, j), config_hash(cell_config(cfg, i, j))) else todo).append((i, j))
    summary = {"done": [], "skipped": skipped, "failed": [], "cells": len(pairs), "primary": True}
    if not todo:
        summary["timings"] = watch.report()
        return summary
    engine = make_engine(done, todo, watch,
                         tail_chunk=tail_chunk(cfg.grid.get("tail_samples", "auto"), done.datamodule.batch_size,
                                               settings.device))
    runs = {cell: cell_run(done, engine, cell) for cell in todo}
    initial = {cell: initial_metrics(cell_config(cfg, *cell), prep, watch) for cell, prep in runs.items()}
    trainer = {**settings.trainer, "enable_progress_bar": progress and settings.trainer.get("enable_progress_bar", True)}
    results = fit_engine(engine, done.datamodule.train_dataloader(), done.datamodule.test_dataloader(), trainer,
                         run_dir=out / settings.objective, watch=watch)
    if not engine.primary:  # another process of a DDP run: the first one writes the cells
        summary.update(primary=False, timings=watch.report())
        return summary
    shared = watch.report()
    share = {k: round(v / len(todo), 3) for k, v in shared.items()}
    for (i, j), prep in tqdm(runs.items(), desc="cells", disable=not progress, leave=False):
        cell, run_dir, result = cell_config(cfg, i, j), folder(i, j), results[cell_key(i, j)]
        run_dir.mkdir(parents=True, exist_ok=True)
        if result["error"] is not None:
            failure_record(cell, run_dir, result["error"])
            summary["failed"].append(((i, j), str(result["error"])))
            continue
        cell_watch = Stopwatch()
        finish_run(cell, prep, {**result["metrics"], **initial[(i, j)]}, cell_watch, run_dir,
                   timings={**{f"grid_{k}": v for k, v in share.items()}, "total_s": share["total_s"]
                            + cell_watch.report()["total_s"], "fused_cells": len(todo)},
                   curve={"train/loss": result["curve"]} if result["curve"] else None)
        summary["done"].append((i, j))
    summary["timings"] = watch.report()
    return summary


def preset_sweep(overrides: list[str]) -> dict:
    """The ``hydra.sweeper.params`` of the preset ``overrides`` name (``{}``: none)."""
    params = {}
    for arg in overrides:
        if arg.startswith("experiment="):
            preset = CONF_DIR / "experiment" / f"{arg.split('=', 1)[1]}.yaml"
            if preset.is_file():
                params = OmegaConf.to_container(OmegaConf.load(preset)).get("hydra", {}).get("sweeper", {}) \
                    .get("params", {}) or {}
    return params


def sweep_grids(overrides: list[str]) -> list[tuple[list[str], list[tuple[int, int]] | str]]:
    """A ``-m`` sweep (the command line's and its preset's ``hydra.sweeper.params``) as whole
    grids: ``(overrides of one grid, its cells)`` for every combination of the axes other than
    the layer keys; the layer keys' combinations become the grid's cells (none given: the
    corresponding layers, as ``stitching.train -m``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = preset_sweep(overrides)
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
