"""``python -m stitching.train`` — stitch two base models at one pair of layers.

A thin Hydra entry point over :func:`stitching.runs.run` (data → base models from the zoo →
cut → DM initialisation → train the stitch → test → ``results.json``). Its module imports
only Hydra: a sweep's launcher starts at once and each job imports torch and Lightning
itself, so local parallel jobs pay that start-up side by side instead of one after the other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stitching import CONF_DIR, LAYER_KEYS
from stitching.jobs import share_threads


_REFUSED: list[str] = []


class OutputFolder(Callback):
    """Hydra callback: a run or sweep folder that cannot be written, or that another command is
    writing into, is one line before any work; the folder is then this command's until it ends."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._hold(Path(config.hydra.run.dir), "hydra.run.dir",
                   "a run writes results.json only when it finishes, so this one kept no result; rerun it")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0):
            print(f"error: hydra.launcher.n_jobs={n_jobs} runs no job; give how many jobs run at once "
                  f"(-1: one per core)", file=sys.stderr)
            sys.exit(2)
        folder = Path(config.hydra.sweep.dir)
        self._hold(folder, "hydra.sweep.dir",
                   f"every finished run of the sweep keeps its results.json in {folder}; rerun the same command "
                   f"with hydra.sweep.dir={folder} to run only the rest")

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        from stitching.files import release_folder

        release_folder(Path(config.hydra.run.dir))  # a sweep holds its sweep folder, not this one

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from stitching.files import release_folder

        release_folder(Path(config.hydra.sweep.dir))

    @staticmethod
    def _hold(folder: Path, key: str, interrupted: str) -> None:
        from stitching.errors import StitchingError, on_interrupt
        from stitching.files import hold_folder

        try:
            hold_folder(folder, f"{key} (paths.output_dir)")
        except StitchingError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        on_interrupt(interrupted)


class SweepStatus(Callback):
    """Hydra callback: after every cell of a sweep has run, exit non-zero if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = []
        for path in sorted(Path(config.hydra.sweep.dir).rglob("results.json")):
            try:
                status = json.loads(path.read_text()).get("status")
            except (OSError, ValueError, AttributeError):
                status = "unreadable"
            if status != "ok":
                failed.append(str(path.parent))
        failed += [cell for cell in _REFUSED if cell not in failed]
        if failed:
            print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed[:5])}"
                  + (" …" if len(failed) > 5 else "") + "; `python -m stitching.report` lists them", file=sys.stderr)
            sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if sweeping:
        n_jobs = (hydra_cfg.get("launcher") or {}).get("n_jobs")
        threads = share_threads(n_jobs)
        if threads is not None and hydra_cfg.job.num < abs(int(n_jobs)):
            print(f"[sweep] {threads} torch thread(s) per job, {n_jobs} jobs at once", file=sys.stderr)
    from stitching.build import read_settings
    from stitching.errors import NonFiniteError, one_line
    from stitching.runs import ResultExists, config_hash, failure_record, finished_record, run, score, summary
    from stitching.runtime import release_memory

    settings = cfg  # until it is read: a config that cannot be is recorded as given
    try:
        settings = read_settings(cfg)
        digest = config_hash(settings.config)
        record = finished_record(run_dir, digest)
        if record is not None:  # a rerun sweep keeps what it finished
            print(f"[resume] {run_dir} is finished for this config; kept as it is")
            return score(record)
        record = run(settings, run_dir, sweep_name=Path(hydra_cfg.sweep.dir).name if sweeping else None)
    except Exception as err:
        release_memory()
        if isinstance(err, ResultExists):
            _REFUSED.append(str(run_dir))
        else:
            try:
                failure_record(settings, run_dir, err)
            except OSError as unwritten:  # the folder took no record: the line below still says why
                print(f"[run] could not record the failure in {run_dir} ({unwritten.strerror})", file=sys.stderr)
        if sweeping:  # one bad cell must not end the sweep
            print(f"[sweep] run {run_dir} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        if isinstance(err, NonFiniteError):
            print(f"error: {err} ({run_dir / 'results.json'})", file=sys.stderr)
            sys.exit(1)
        line = one_line(err)
        if line is not None:  # bad input or a write the disk refused: one line, not a traceback
            print(line, file=sys.stderr)
            sys.exit(2)
        raise
    if record is None:  # a DDP run's other process: the first one reports
        return None
    print(summary(record, run_dir))
    release_memory()  # a sweep's runs share this process under the basic launcher
    return score(record)


def with_default_layer_sweep(argv: list[str]) -> list[str]:
    """A sweep (``-m``) that names no layer — on the command line or in its preset's sweep —
    runs the nine corresponding layers; one that names any layer key runs exactly the cells asked."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    keys = {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg}
    for arg in argv:
        if arg.startswith("experiment="):
            preset = CONF_DIR / "experiment" / f"{arg.split('=', 1)[1]}.yaml"
            if preset.is_file():
                params = OmegaConf.load(preset).get("hydra", {}).get("sweeper", {}).get("params", {}) or {}
                keys |= set(params)
    if keys & set(LAYER_KEYS):
        return argv
    return [*argv, "stitch.layer=range(1,10)"]


def cli() -> None:
    """The command line: an interrupt ends on one line saying what was kept."""
    sys.argv = [sys.argv[0], *with_default_layer_sweep(sys.argv[1:])]
    try:
        main()
    except KeyboardInterrupt as err:
        from stitching.errors import one_line

        print(one_line(err), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
