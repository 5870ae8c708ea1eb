"""``python -m stitching.grid`` — every stitch of a layer grid trained by one engine.

The same overrides as ``python -m stitching.train``; ``grid.pairs`` picks the cells: ``all``
front × end cut points (default), ``diagonal`` (the corresponding layers of a stitching plot)
or an explicit list ``[[i, j], …]``. The cells train together in one
:class:`~stitching.engine.StitchEngine` (a single run is the same engine with one cell): the
front and the reference end model run once per batch for every cell, under the same Lightning
Trainer settings as a single run. In a sweep, the grids that differ in their models alone and
enter ends without running statistics (language models, LayerNorm ViTs) share one engine. Every cell then gets an ordinary run folder,
``<out>/<objective>/f<i>-e<j>/results.json`` with its stitch and testbed metrics, so
``stitching.report`` and the sanity checks read a grid as they read a sweep; a rerun skips
finished cells.

Examples: ``python -m stitching.grid --out outputs/grid experiment=small objective=hint grid.pairs=all``;
``python -m stitching.grid -m experiment=sanity_small`` (one grid per objective × end seed, each
with the preset's 25 cells).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stitching import CONF_DIR
from stitching.build import compose_config, read_settings
from stitching.errors import StitchingError, exit_on_user_error, on_interrupt
from stitching.files import hold_folder
from stitching.grids import pairs_override, preset_sweep, run_grid, run_grids, sweep_folders, sweep_grids
from stitching.jobs import share_threads


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
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
    out = Path(args.out) if args.out else Path("outputs/grids") / time.strftime("%Y-%m-%d_%H-%M-%S")
    hold_folder(out, "--out")
    on_interrupt(f"every finished cell keeps its results.json in {out}; rerun the same command with --out {out} "
                 f"to train only the rest")
    if launcher:
        if not args.multirun:
            raise StitchingError(f"{launcher[0]} launches the jobs of a sweep; add -m (one job per grid)")
        sys.exit(launch_grids(overrides, out))
    if args.multirun:
        grids = sweep_grids(overrides)
        folders = sweep_folders(out, [rest for rest, _ in grids])
        plan = [(rest, cells, folder) for (rest, cells), folder in zip(grids, folders)]
    else:
        plan = [(overrides, None, out)]
    configs = []
    for rest, cells, folder in plan:  # every grid's config is read (and checked) before any is trained
        extra = [] if cells is None else [f"grid.pairs={pairs_override(cells)}"]
        configs.append((read_settings(compose_config([*rest, *extra])), folder))
    gc.collect()
    gc.freeze()  # what importing made lives as long as the process: each grid's collection skips it
    # grids that differ in their models alone, into ends without running statistics, share one engine
    failed = []

    def report(k: int, summary: dict) -> None:
        settings, folder = configs[k]
        _print_summary(settings.objective, summary, folder)
        failed.extend(summary["failed"])

    run_grids(configs, progress=not args.no_progress, report=report)
    if failed:
        print(f"[grid] {len(failed)} cell(s) failed; `python -m stitching.report {out}` lists them", file=sys.stderr)
        sys.exit(1)


def launch_grids(overrides: list[str], out: Path) -> int:
    """A sweep of grids on a Hydra launcher (joblib on this machine, submitit on SLURM…): one
    job per combination of the axes other than the layers, each job one whole grid in
    ``<out>/<job number>/``; the sweep's exit code is non-zero when a cell failed."""
    grids = sweep_grids(overrides)
    cells = grids[0][1]
    axes: dict[str, list[str]] = {}
    for rest, _ in grids:
        for item in rest:
            key, _, value = item.partition("=")
            if value not in axes.setdefault(key, []):
                axes[key].append(value)
    argv = [f"{key}={','.join(values)}" for key, values in axes.items()]
    argv += [f"grid.pairs={pairs_override(cells)}", f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}"]
    if preset_sweep(overrides):  # the preset's own axes are already among the jobs' overrides
        argv.append("hydra.sweeper.params=null")
    saved = sys.argv
    sys.argv = ["stitching.grid", "-m", *argv]
    try:
        grid_job()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    return 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def grid_job(cfg: DictConfig) -> int:
    """One grid as one job of a Hydra launcher, in the job's own folder."""
    hydra_cfg = HydraConfig.get()
    share_threads((hydra_cfg.get("launcher") or {}).get("n_jobs"))
    folder = Path(hydra_cfg.runtime.output_dir)
    try:
        settings = read_settings(cfg)
        summary = run_grid(settings, folder, progress=False)
    except StitchingError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    _print_summary(settings.objective, summary, folder)
    return len(summary["failed"])


def _print_summary(objective: str, summary: dict, folder: Path) -> None:
    if not summary.get("primary", True):  # a DDP run's other process: the first one reports
        return
    print(f"{objective}: {len(summary['done'])} cells trained fused, {len(summary['skipped'])} already "
          f"finished, {len(summary['failed'])} failed; {summary['timings']['total_s']:.1f}s; cells in "
          f"{folder.resolve()}")
    for (i, j), error in summary["failed"]:
        print(f"  FAILED f{i}-e{j}: {error}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
