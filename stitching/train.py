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
    """Hydra callback: a run or sweep folder that cannot be written is one line before any work."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(Path(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _check(folder: Path, key: str) -> None:
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            print(f"error: cannot write the run folder {folder} ({err.strerror or type(err).__name__}); "
                  f"set a writable {key} or paths.output_dir", file=sys.stderr)
            sys.exit(2)


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
    from stitching.errors import NonFiniteError, StitchingError
    from stitching.runs import ResultExists, config_hash, failure_record, finished_record, run, score, summary
    from stitching.runtime import release_memory

    try:
        digest = config_hash(cfg)
        record = finished_record(run_dir, digest)
        if record is not None:  # a rerun sweep keeps what it finished
            print(f"[resume] {run_dir} is finished for this config; kept as it is")
            return score(record)
        record = run(cfg, run_dir, sweep_name=Path(hydra_cfg.sweep.dir).name if sweeping else None)
    except Exception as err:
        release_memory()
        if isinstance(err, ResultExists):
            _REFUSED.append(str(run_dir))
        else:
            failure_record(cfg, run_dir, err)
        if sweeping:  # one bad cell must not end the sweep
            print(f"[sweep] run {run_dir} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        if isinstance(err, NonFiniteError):
            print(f"error: {err} ({run_dir / 'results.json'})", file=sys.stderr)
            sys.exit(1)
        if isinstance(err, StitchingError):
            print(f"error: {err}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *with_default_layer_sweep(sys.argv[1:])]
    main()
