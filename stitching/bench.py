"""``python -m stitching.bench`` — wall time and peak memory, so changes can be compared.

Measures, on the configured data and models (default: the `make run` setup on MNIST-5k):

* one stitch-training epoch per objective (DM: the closed-form solve), and its test pass;
* four FuLA cells as a 2-job local sweep (each job on half the cores) against the same sweep
  run sequentially;
* a 9×9 cross-layer grid per objective (every front × end layer pair: DM initialisation, a
  few training batches and the test pass), trained as 81 in-process single runs and as one
  fused grid (:mod:`stitching.grid`), with the speed-up and the largest difference in any
  cell's test accuracy.

Peak memory is the process's peak resident set size during each measurement on CPU, and
``torch.cuda.max_memory_allocated`` on a GPU. Prints a table and writes ``bench.json``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from stitching.errors import exit_on_user_error
from stitching.runtime import build_trainer, release_memory, versions, write_json_atomic
from stitching.build import compose_config, prepare


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def measure(result: dict):
    """Fill ``result`` with ``seconds`` and ``peak_mib`` for the enclosed block."""
    cuda = torch.cuda.is_available()
    peak = [_rss_mib()]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
        result["seconds"] = round(time.perf_counter() - start, 3)
        stop.set()
        sampler.join()
        result["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20 if cuda else peak[0], 1)
        result["memory"] = "cuda allocated" if cuda else "process RSS"


def bench_objectives(overrides: list[str], layer: int, run_dir: Path) -> list[dict]:
    rows = []
    for objective in ("dm", "hint", "fula", "slm", "tlm"):
        cfg = compose_config([*overrides, f"objective={objective}", f"stitch.layer={layer}", "trainer.max_epochs=1"])
        prep = prepare(cfg)  # base models come from (or go into) the zoo before timing
        options = dict(cfg.trainer)
        row = {"what": f"{objective} epoch", "layer": layer, "images": len(prep.datamodule.arrays.train_y)}
        with measure(row):
            if prep.module.trainable:
                build_trainer(options, run_dir, enable_progress_bar=False).fit(prep.module, datamodule=prep.datamodule)
        test = {}
        with measure(test):
            build_trainer(options, run_dir, enable_progress_bar=False).test(prep.module, datamodule=prep.datamodule,
                                                                             verbose=False)
        row["test_seconds"] = test["seconds"]
        extra = ""
        if prep.module.trainable:
            row["images_per_s"] = round(row["images"] / row["seconds"], 1)
            extra = f"   {row['images_per_s']:.0f} images/s"
            if objective in PLAIN_OBJECTIVES:
                plain = {}
                with measure(plain):
                    plain_loop(prepare(cfg), objective)
                row["plain_loop_images_per_s"] = round(row["images"] / plain["seconds"], 1)
                extra += f", a plain PyTorch loop {row['plain_loop_images_per_s']:.0f}"
        rows.append(row)
        print(_line(row) + extra, flush=True)
    return rows


PLAIN_OBJECTIVES = ("hint", "fula", "tlm")


def plain_loop(prep, objective: str) -> None:
    """One stitching epoch written as a bare PyTorch loop over the same frozen models, batches and
    Adam settings (no Lightning, no logging, no metrics): the throughput to match."""
    from torch.nn import functional as F

    from stitching.models import cut_point_activations

    network, reference, j = prep.module.network, prep.module.reference, prep.end_layer
    device = prep.settings.device
    network.to(device).train()
    reference.to(device).eval()
    optimiser = torch.optim.Adam(network.stitch.parameters(), lr=prep.settings.stitch.lr,
                                 weight_decay=prep.settings.stitch.weight_decay)

    def relative(a, t):
        return ((a - t).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()

    for x, y in prep.datamodule.train_dataloader():
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            front, _ = network.front(x)
            if objective != "tlm":  # TLM reads labels only
                _, targets = cut_point_activations(reference, x, None if objective == "fula" else j)
        a = network.stitch(front)
        if objective == "hint":
            with torch.no_grad():
                network.end(a)  # the tail's BN statistics see stitched data, as in the objective
            loss = relative(a, targets[j - 1])
        elif objective == "fula":
            _, later = network.end(a, return_features=True)
            stitched = [a, *later]
            loss = sum(relative(s, t) for s, t in zip(stitched, targets[j - 1:])) / len(stitched)
        else:
            loss = F.cross_entropy(network.end(a), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def bench_grid(overrides: list[str], objective: str, batches: int, run_dir: Path) -> list[dict]:
    """The same 9×9 grid as 81 single runs and fused: two rows, the fused one with its speed-up
    and the largest difference in a cell's test accuracy."""
    import json

    from stitching.grid import cell_config, run_grid
    from stitching.runs import run

    cfg = compose_config([*overrides, f"objective={objective}", "trainer.max_epochs=1",
                          f"trainer.limit_train_batches={batches}", "grid.pairs=all"])
    prepare(cell_config(cfg, 1, 1))  # base models come from (or go into) the zoo before timing
    single = {"what": f"9x9 {objective}: 81 single runs", "layer": "all", "images": f"{batches} batches x 81"}
    with measure(single):
        for front in range(1, 10):
            for end in range(1, 10):
                run(cell_config(cfg, front, end), run_dir / "single" / objective / f"f{front}-e{end}")
                release_memory()
    print(_line(single), flush=True)
    fused = {"what": f"9x9 {objective}: fused grid", "layer": "all", "images": f"{batches} batches x 81"}
    with measure(fused):
        run_grid(cfg, run_dir / "fused", progress=False)
    accuracy = {}
    for kind in ("single", "fused"):
        for path in (run_dir / kind / objective).glob("*/results.json"):
            accuracy.setdefault(path.parent.name, {})[kind] = json.loads(path.read_text())["metrics"]["test/acc"]
    fused["speedup"] = round(single["seconds"] / fused["seconds"], 2)
    fused["max_acc_difference"] = max(abs(v["single"] - v["fused"]) for v in accuracy.values())
    print(_line(fused) + f"   {fused['speedup']:.2f}x faster, largest cell accuracy difference "
          f"{fused['max_acc_difference']:.4f}", flush=True)
    return [single, fused]


def bench_parallel(overrides: list[str], run_dir: Path) -> list[dict]:
    """Four FuLA cells as a sweep run one after another and as a 2-job local sweep (each job
    with half the cores), in subprocesses as ``make`` runs them; base models are in the zoo by then."""
    import subprocess

    cells = ["objective=fula", "stitch.layer=3,5,7,9"]
    rows = []
    for label, launcher in (("4 FuLA cells, sequential", []),
                            ("4 FuLA cells, 2 local jobs", ["hydra/launcher=local", "hydra.launcher.n_jobs=2", *EXTRA])):
        row = {"what": label, "layer": "3-9", "images": "1 epoch x 4"}
        command = [sys.executable, "-m", "stitching.train", "-m", *overrides, *cells, *launcher,
                   f"hydra.sweep.dir={run_dir / label.replace(' ', '_').replace(',', '')}"]
        with measure(row):
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the bench sweep failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(row)
        print(_line(row) + ("" if not launcher else f"   {rows[0]['seconds'] / row['seconds']:.2f}x the sequential "
                            f"sweep's speed"), flush=True)
    rows[-1]["speedup"] = round(rows[0]["seconds"] / rows[-1]["seconds"], 2)
    return rows


def _line(row: dict) -> str:
    test = f"{row['test_seconds']:>8.2f}" if "test_seconds" in row else f"{'':>8}"
    return f"{row['what']:<34} {str(row['layer']):>5} {row['seconds']:>9.2f} {test} {row['peak_mib']:>10.1f}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stitching.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=5, help="stitching layer for the per-objective epochs")
    parser.add_argument("--grid-objectives", default="hint,fula,tlm", help="objectives of the 9x9 grids (comma-separated)")
    parser.add_argument("--grid-batches", type=int, default=4, help="training batches per grid cell")
    parser.add_argument("--no-grid", action="store_true", help="skip the 9x9 grids")
    parser.add_argument("--no-parallel", action="store_true", help="skip the 2-job local sweep against a sequential one")
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=demo)")
    args = parser.parse_args(argv)
    overrides = args.overrides or ["experiment=demo"]
    overrides = [*overrides, "logger=none", "trainer.enable_progress_bar=false"]
    run_dir = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'measurement':<34} {'layer':>5} {'fit s':>9} {'test s':>8} {'peak MiB':>10}")
    rows = bench_objectives(overrides, args.layer, run_dir)
    if not args.no_grid:
        for objective in args.grid_objectives.split(","):
            rows += bench_grid(overrides, objective.strip(), args.grid_batches, run_dir)
    if not args.no_parallel:
        rows += bench_parallel(overrides, run_dir)
    write_json_atomic(run_dir / "bench.json", {"overrides": overrides, "rows": rows, "versions": versions(),
                                               "threads": torch.get_num_threads()})
    print(f"results in {run_dir.resolve() / 'bench.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
