"""Layer grids as data: which cells ``grid.pairs`` names, each cell's config, a whole grid
trained by one engine and recorded cell by cell, and a ``-m`` sweep planned as whole grids
(the library behind ``python -m stitching.grid``, the bench and the claims).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from stitching import CONF_DIR, LAYER_KEYS
from stitching.build import Settings, as_settings, beside_front, beside_models, setup
from stitching.engine import running_stat_norms
from stitching.errors import StitchingError, config_error
from stitching.models import cut_point_names
from stitching.objectives.tasks import task_of
from stitching.runs import Grid, cell_config, pending_cells, record_grids
from stitching.runtime import Stopwatch, release_memory

__all__ = ["PAIRS", "cell_config", "grid_pairs", "preset_sweep", "pairs_override", "run_grid", "run_grids",
           "sweep_grids", "tail_chunk"]

PAIRS = ("all", "diagonal")


def grid_pairs(spec, front_count: int, end_count: int) -> list[tuple[int, int]]:
    """The cells ``(front layer, end layer)`` of ``grid.pairs``."""
    if spec is None or spec == "all":
        return [(i, j) for i in range(1, front_count + 1) for j in range(1, end_count + 1)]
    if spec == "diagonal":
        return [(k, k) for k in range(1, min(front_count, end_count) + 1)]
    pairs = listed_pairs(spec)
    bad = [(i, j) for i, j in pairs if not (1 <= i <= front_count and 1 <= j <= end_count)]
    if bad or not pairs:
        raise StitchingError(f"grid.pairs: cell {bad[0] if bad else '[]'} is out of range: the front has cut points "
                             f"1..{front_count}, the end 1..{end_count}")
    return list(dict.fromkeys(pairs))


def listed_pairs(spec) -> list[tuple[int, int]]:
    """The cells a ``grid.pairs`` list names, unchecked against any model."""
    try:
        return [(int(i), int(j)) for i, j in spec]
    except (TypeError, ValueError):
        raise StitchingError(f"grid.pairs={spec}: give all, diagonal or a list of [front, end] cut points") from None


def tail_chunk(tail_samples, batch_size: int, device) -> int | None:
    """Stitches per tail pass from ``grid.tail_samples`` (``auto``: 256 samples on a CPU, where a
    larger batch falls out of the caches and each sample costs more; all of them on a GPU)."""
    if tail_samples == "auto":
        tail_samples = None if torch.device(device).type == "cuda" else 256
    return None if tail_samples is None else max(1, int(tail_samples) // int(batch_size))


def run_grid(settings: Settings | DictConfig, out: Path, progress: bool = True,
             folders: dict[tuple[int, int], Path] | None = None) -> dict:
    """Train and record every cell of ``grid.pairs`` in one engine (``folders``: each cell's own
    folder); returns ``{"done", "skipped", "failed", "cells", "timings"}``."""
    return run_grids([(settings, out)], progress, folders=[folders])[0]


def run_grids(grids: list[tuple[Settings | DictConfig, Path]], progress: bool = True,
              report: Callable[[int, dict], None] | None = None,
              folders: list[dict[tuple[int, int], Path] | None] | None = None) -> list[dict]:
    """Train and record several grids, each in its folder; one summary per grid (as
    :func:`run_grid`'s), each also handed to ``report(index, summary)`` as soon as it is made.
    ``folders``: per grid, each cell's own folder (``None``: ``<out>/<objective>/f<i>-e<j>``).

    Grids whose settings differ in their models alone, into ends that keep no running
    statistics (language models, LayerNorm ViTs), train in one engine: the data are set up once,
    each model is loaded, copied and run once per batch however many grids name it, and an end
    layer's tail takes every front's stitches into it in one pass (ends of another task or label
    set than the first's stay apart). Other grids train one engine each, one after another (grids
    that differ in their front alone still share their data and end)."""
    summaries: list[dict | None] = [None] * len(grids)

    def finished(k: int, summary: dict) -> None:
        summaries[k] = summary
        if report is not None:
            report(k, summary)
    read = [(as_settings(given), Path(out)) for given, out in grids]  # each config read once
    folders = folders or [None] * len(grids)
    grouped: dict[str, list[int]] = {}  # in the order of their first grid
    for k, (settings, _) in enumerate(read):
        grouped.setdefault(beside_models(settings), []).append(k)
    for group in grouped.values():
        watch, members, base, together = Stopwatch(), [], None, False
        for k in group:
            settings, out = read[k]
            if settings.grid.pairs not in (None, *PAIRS):  # a rerun of a finished grid reads no data, no models
                cells = list(dict.fromkeys(listed_pairs(settings.grid.pairs)))
                if not pending_cells(settings, cells, out, folders[k]):
                    finished(k, {"done": [], "skipped": cells, "failed": [], "cells": len(cells), "primary": True,
                                 "timings": Stopwatch().report()})
                    continue
            own = watch if base is None or together else Stopwatch()
            # an engine's grids share one setup of the data; so do grids into one end, as before
            shared = base if base is not None and (together or beside_front(settings) == beside_front(base.settings)) \
                else None
            done = setup(settings, own, layers=([1], [1]), stitched=False, like=shared)
            if base is None:  # an end with running statistics would need a tail copy per front: one engine each
                base, together = done, not running_stat_norms(done.end)
            if together and not running_stat_norms(done.end) and one_task(done.end, base.end):
                members.append((k, _grid(done, out, folders[k])))
            else:
                finished(k, record_grids([_grid(done, out, folders[k])], own, progress, _chunk(done))[0])
                release_memory()
        if members:
            for (k, _), summary in zip(members, record_grids([grid for _, grid in members], watch, progress,
                                                             _chunk(base))):
                finished(k, summary)
        del members, base
        release_memory()
    return summaries


def one_task(end, other) -> bool:
    """Whether two end models score their cells alike (one task, one label set): only then can
    their grids share an engine."""
    return type(task_of(end)) is type(task_of(other)) and getattr(end, "num_classes", None) == \
        getattr(other, "num_classes", None)


def _grid(done, out: Path, folders: dict[tuple[int, int], Path] | None = None) -> Grid:
    settings = done.settings
    pairs = grid_pairs(settings.grid.pairs, len(cut_point_names(done.front)), len(cut_point_names(done.end)))
    missing = [cell for cell in pairs if folders and cell not in folders]
    if missing:
        raise StitchingError(f"grid cell {missing[0]} has no folder of its own among the folders given")
    return Grid(settings, done, pairs, out, folders)


def _chunk(done) -> int | None:
    return tail_chunk(done.settings.grid.tail_samples, done.datamodule.batch_size, done.settings.device)


def pairs_override(cells) -> str:
    """``grid.pairs`` as an override value: ``all``/``diagonal`` as they are, cells as ``[[i,j],…]``."""
    return cells if isinstance(cells, str) else "[" + ",".join(f"[{i},{j}]" for i, j in cells) + "]"


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


def sweep_folders(out: Path, combos: list[list[str]]) -> list[Path]:
    """One folder per combination of a sweep, ``<out>/<k>_<key=value of every key that varies>``."""
    values: dict[str, set[str]] = {}
    for combo in combos:
        for item in combo:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {key for key, seen in values.items() if len(seen) > 1}
    return [out / "_".join([str(k), *(re.sub(r"[^\w.=-]+", "-", item) for item in combo
                                      if item.split("=", 1)[0] in varying)])
            for k, combo in enumerate(combos)]


def sweep_combos(overrides: list[str], preset_axes: Callable[[str], bool] = lambda key: True) -> list[list[str]]:
    """A ``-m`` sweep's combinations: the command line's comma-separated values and its preset's
    ``hydra.sweeper.params`` whose key ``preset_axes`` keeps (a key given on the command line
    replaces the preset's axis), expanded as Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = preset_sweep(overrides)
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in overrides if "=" in arg}
    swept = [f"{key}={value}" for key, value in params.items() if key not in given and preset_axes(key)] \
        + list(overrides)
    try:
        return [list(combo) for combo in
                BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(swept), None)[0]]
    except Exception as err:  # Hydra's own first line names the bad override
        raise config_error(err) from None


def sweep_grids(overrides: list[str]) -> list[tuple[list[str], list[tuple[int, int]] | str]]:
    """A ``-m`` sweep (the command line's and its preset's ``hydra.sweeper.params``) as whole
    grids: ``(overrides of one grid, its cells)`` for every combination of the axes other than
    the layer keys; the layer keys' combinations become the grid's cells (none given: the
    corresponding layers, as ``stitching.train -m``)."""
    grids: dict[tuple, list] = {}
    for combo in sweep_combos(overrides):
        layers = {key: value for key, value in (item.split("=", 1) for item in combo) if key in LAYER_KEYS}
        rest = tuple(item for item in combo if item.split("=", 1)[0] not in LAYER_KEYS)
        cells = grids.setdefault(rest, [])
        if layers:
            shared = layers.get("stitch.layer")
            cells.append((int(layers.get("stitch.front_layer", shared)), int(layers.get("stitch.end_layer", shared))))
    return [(list(rest), list(dict.fromkeys(cells)) if cells else "diagonal") for rest, cells in grids.items()]
