"""``python -m stitching.bench`` — wall time and peak memory, so changes can be compared.

Measures, on the configured data and models (default: the `make run` setup on MNIST-5k):

* one stitch-training epoch per objective (DM: the closed-form solve), and its test pass; for the
  trained objectives also the same epoch as a plain PyTorch loop, its model FLOPs (forward and
  backward convolutions and matrix products), the TFLOP/s achieved and, on a GPU whose peak is
  known (``PEAK_TFLOPS``, or ``--peak-tflops``), the model-FLOPs utilisation;
* ``--profile OBJECTIVE``: one epoch under the PyTorch profiler, the operators that take the time;
* four FuLA cells as a 2-job local sweep (each job on half the cores) against the same sweep
  run sequentially;
* a 9×9 cross-layer grid per objective (every front × end layer pair: DM initialisation, a
  few training batches and the test pass), trained as 81 in-process single runs and as one
  fused grid (:mod:`stitching.grid`), with the speed-up and the largest difference in any
  cell's test accuracy;
* the GeLU/SoLU language-model preset on CPU (``lm_solu_gelu_small``: 48 TLM cells of 16 model
  pairs, one epoch, its own data and models whatever the overrides), as 48 in-process single runs
  and as its sweep of grids (the grids into one end model trained in one engine), with the
  speed-up and the largest difference in any cell's penalty; and its CKA step, minibatch CKA of
  its 16 front × end models in one process (``python -m stitching.similarity -m``).

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
from stitching.errors import NonFiniteError, StitchingError, exit_on_user_error
from stitching.files import hold_folder
from stitching.runtime import build_trainer, precision_autocast, release_memory, speed_up, versions, write_json_atomic
from stitching.build import compose_config, prepare, read_settings
from stitching.engine import ENGINE_KEYS


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


def bench_objectives(overrides: list[str], layer: int, run_dir: Path, peak: float | None = None) -> list[dict]:
    """One epoch per objective (Lightning, as a run trains) and its test pass; for the trained
    objectives also the epoch as a plain PyTorch loop, its model FLOPs, the TFLOP/s achieved and,
    where the device's peak is known (or ``peak`` given), the model-FLOPs utilisation."""
    rows = []
    for objective in ("dm", "hint", "fula", "slm", "tlm"):
        settings = read_settings(compose_config([*overrides, f"objective={objective}", f"stitch.layer={layer}",
                                                 "trainer.max_epochs=1"]))
        prep = prepare(settings)  # base models come from (or go into) the zoo before timing
        options = dict(settings.trainer)
        row = {"what": f"{objective} epoch", "layer": layer, "images": len(prep.datamodule.arrays.train_y)}
        engine = prep.engine
        trainable = engine.objective.trainable
        speed_up(engine, options, parts=[*engine.fronts.values(), *engine.tails.values()])  # as fit_engine applies them
        engine.configure_steps(**{key: options.pop(key, None) for key in ENGINE_KEYS})
        with measure(row):
            if trainable:
                build_trainer(options, run_dir, enable_progress_bar=False).fit(engine, datamodule=prep.datamodule)
        test = {}
        with measure(test):
            build_trainer(options, run_dir, enable_progress_bar=False).test(engine, datamodule=prep.datamodule,
                                                                             verbose=False)
        row["test_seconds"] = test["seconds"]
        extra = ""
        if trainable:
            row["images_per_s"] = round(row["images"] / row["seconds"], 1)
            extra = f"   {row['images_per_s']:.0f} images/s"
            if objective in PLAIN_OBJECTIVES:
                plain = {}
                with measure(plain):
                    plain_loop(prepare(settings), objective)
                row["plain_loop_images_per_s"] = round(row["images"] / plain["seconds"], 1)
                extra += f", a plain PyTorch loop {row['plain_loop_images_per_s']:.0f}"
                row["epoch_tflop"] = round(epoch_flops(prep, objective) / 1e12, 4)
                device = torch.device(prep.settings.device)
                row["dtype"] = compute_dtype(settings.trainer.get("precision"), device.type)
                device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
                row.update(utilisation(row["epoch_tflop"] * 1e12, row["seconds"],
                                       peak_tflops(device_name, row["dtype"], peak)))
                extra += f"; {row['epoch_tflop']:.3f} TFLOP, {row['tflops_per_s'] * 1e3:.1f} GFLOP/s"
                if "mfu" in row:
                    extra += f", MFU {row['mfu']:.1%} of {row['peak_tflops']:g} TFLOP/s ({row['dtype']})"
        rows.append(row)
        print(_line(row) + extra, flush=True)
    return rows


PLAIN_OBJECTIVES = ("hint", "fula", "slm", "tlm")


def plain_loop(prep, objective: str) -> None:
    """One stitching epoch written as a bare PyTorch loop over the same frozen models, batches and
    Adam settings (no Lightning, no logging, no metrics): the throughput to match."""
    step = plain_step(prep, objective)
    for x, y in prep.datamodule.train_dataloader():
        step(x, y)


def plain_step(prep, objective: str, accelerate: bool = True):
    """``step(x, y)``: one stitch-training step of ``objective`` on ``prep``'s models (the stitch
    and the BN statistics change, as in training), under the run's autocast and, with
    ``accelerate``, its ``trainer.channels_last`` / ``compile``."""
    from torch.nn import functional as F

    from stitching.models import cut_point_activations
    from stitching.objectives.losses import slm_loss

    network, reference, j = prep.network, prep.engine.reference, prep.end_layer
    device = prep.settings.device
    network.to(device).train()
    if accelerate:  # channels_last and compile, as the run applies them
        speed_up(network, dict(prep.settings.trainer))
    reference.to(device).eval()
    optimiser = torch.optim.Adam(network.stitch.parameters(), lr=prep.engine.lr,
                                 weight_decay=prep.settings.stitch.weight_decay)

    def relative(a, t):
        return ((a - t).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()

    def step(x, y):
        x, y = x.to(device), y.to(device)
        with precision_autocast(torch.device(device).type, prep.settings.trainer.get("precision")):
            loss = step_loss(x, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def step_loss(x, y):
        with torch.no_grad():
            front, _ = network.front(x)
            if objective == "slm":
                teacher = reference(x)
            elif objective != "tlm":  # TLM reads labels only
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
        elif objective == "slm":
            loss = slm_loss(network.end(a), teacher)
        else:
            loss = F.cross_entropy(network.end(a), y)
        return loss

    return step


def step_flops(step, x, y) -> int:
    """Model FLOPs of one call ``step(x, y)`` (forward and backward matrix products and
    convolutions, as PyTorch's ``FlopCounterMode`` counts them: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(x, y)
    return int(counter.get_total_flops())


def epoch_flops(prep, objective: str) -> int:
    """FLOPs of one stitch-training epoch of ``objective``: one batch counted on copies of the
    models (the run's own stay as they are), scaled by the epoch's number of images."""
    import copy
    from dataclasses import replace

    x, y = next(iter(prep.datamodule.train_dataloader()))
    copied = replace(prep, prepared=copy.deepcopy(prep.prepared))
    return round(step_flops(plain_step(copied, objective, accelerate=False), x, y) * len(prep.datamodule.arrays.train_y) / len(x))


#: dense peak TFLOP/s by device name and compute dtype: ``bf16``/``fp16`` tensor cores, ``tf32``
#: (what a float32 convolution uses on Ampere and newer with cuDNN's TF32 allowed, PyTorch's
#: default) and plain ``fp32``; vendors' data-sheet figures without sparsity
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def compute_dtype(precision, device_type: str) -> str:
    """The dtype a stitching step's convolutions run in under ``trainer.precision`` on this device."""
    precision = str(precision or "32-true")
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if device_type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


def peak_tflops(device_name: str, dtype: str, given: float | None = None) -> float | None:
    """The device's dense peak for ``dtype`` (``given`` wins; ``None``: unknown, no utilisation)."""
    if given is not None:
        return float(given)
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return peaks.get(dtype, peaks.get("fp16") if dtype == "bf16" else None)
    return None


def utilisation(flops: int, seconds: float, peak: float | None) -> dict:
    """Achieved TFLOP/s and, with a known peak, the model-FLOPs utilisation (achieved / peak)."""
    achieved = flops / seconds / 1e12
    row = {"tflops_per_s": round(achieved, 4)}
    if peak:
        row.update(peak_tflops=peak, mfu=round(achieved / peak, 4))
    return row


def profile_epoch(overrides: list[str], objective: str, layer: int, run_dir: Path, rows: int = 15) -> Path:
    """One stitch-training epoch of ``objective`` under the PyTorch profiler: the operators that
    take the time (CPU, and the GPU's kernels on one), written to ``profile_<objective>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    prep = prepare(compose_config([*overrides, f"objective={objective}", f"stitch.layer={layer}"]))
    step = plain_step(prep, objective)
    batches = list(prep.datamodule.train_dataloader())
    step(*batches[0])  # warm-up: one-off allocations and kernel selection stay out of the profile
    cuda = torch.cuda.is_available() and prep.settings.device != "cpu"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for x, y in batches:
            step(x, y)
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows)
    path = run_dir / f"profile_{objective}.txt"
    path.write_text(f"one {objective} epoch, layer {layer}, {len(batches)} batches\n{table}\n")
    print(table, flush=True)
    return path


def bench_grid(overrides: list[str], objective: str, batches: int, run_dir: Path) -> list[dict]:
    """The same 9×9 grid as 81 single runs and fused: two rows, the fused one with its speed-up
    and the largest difference in a cell's test accuracy."""
    import json

    from stitching.grids import cell_config, run_grid
    from stitching.runs import run

    settings = read_settings(compose_config([*overrides, f"objective={objective}", "trainer.max_epochs=1",
                                             f"trainer.limit_train_batches={batches}", "grid.pairs=all"]))
    prepare(cell_config(settings, 1, 1))  # base models come from (or go into) the zoo before timing
    single = {"what": f"9x9 {objective}: 81 single runs", "layer": "all", "images": f"{batches} batches x 81"}
    failed = {"single": [], "fused": []}
    with measure(single):
        for front in range(1, 10):
            for end in range(1, 10):
                try:  # a stitch that diverges (an fp16 loss that overflows, say) is a failed cell, timed all the same
                    run(cell_config(settings, front, end), run_dir / "single" / objective / f"f{front}-e{end}")
                except NonFiniteError:
                    failed["single"].append(f"f{front}-e{end}")
                release_memory()
    print(_line(single), flush=True)
    fused = {"what": f"9x9 {objective}: fused grid", "layer": "all", "images": f"{batches} batches x 81"}
    with measure(fused):
        failed["fused"] = [f"f{i}-e{j}" for (i, j), _ in run_grid(settings, run_dir / "fused", progress=False)["failed"]]
    accuracy = {}
    for kind in ("single", "fused"):
        for path in (run_dir / kind / objective).glob("*/results.json"):
            record = json.loads(path.read_text())
            if record["status"] == "ok":
                accuracy.setdefault(path.parent.name, {})[kind] = record["metrics"]["test/acc"]
    both = [v for v in accuracy.values() if len(v) == 2]
    fused["speedup"] = round(single["seconds"] / fused["seconds"], 2)
    fused["max_acc_difference"] = max((abs(v["single"] - v["fused"]) for v in both), default=float("nan"))
    fused["failed_cells"] = failed
    note = "" if not any(failed.values()) else (
        f"; failed cells: {len(failed['single'])} single ({', '.join(failed['single'])}), "
        f"{len(failed['fused'])} fused ({', '.join(failed['fused'])})")
    print(_line(fused) + f"   {fused['speedup']:.2f}x faster, largest cell accuracy difference "
          f"{fused['max_acc_difference']:.4f} over {len(both)} cells{note}", flush=True)
    return [single, fused]


#: the GeLU/SoLU preset as the language-model measurement runs it (no self-stitch baselines: the cells alone)
LANGUAGE_PRESET = ["experiment=lm_solu_gelu_small", "evaluation.self_baseline=false", "logger=none",
                   "trainer.enable_progress_bar=false"]


def bench_language(run_dir: Path, overrides: list[str] = ()) -> list[dict]:
    """The GeLU/SoLU CPU preset's 48 cells as single runs and as its sweep of grids: two rows,
    the second with its speed-up and the largest difference in a cell's penalty. ``overrides``:
    on the preset (the command line's ``paths.*``, ``zoo.*`` and ``trainer.*`` ones)."""
    import json

    from stitching.build import setup
    from stitching.grids import cell_config, grid_pairs, pairs_override, run_grids, sweep_grids
    from stitching.models import cut_point_names
    from stitching.runs import run

    configs = []
    for k, (rest, cells) in enumerate(sweep_grids([*LANGUAGE_PRESET, *overrides])):
        configs.append((read_settings(compose_config([*rest, f"grid.pairs={pairs_override(cells)}"])), k))
    cells = {}
    for settings, k in configs:  # base models come from (or go into) the zoo before timing
        done = setup(settings, layers=([1], [1]), stitched=False)
        cells[k] = grid_pairs(settings.grid.pairs, len(cut_point_names(done.front)), len(cut_point_names(done.end)))
    total = sum(len(pairs) for pairs in cells.values())
    single = {"what": f"GeLU/SoLU: {total} single runs", "layer": "1-3", "images": f"1 epoch x {total}"}
    with measure(single):
        for settings, k in configs:
            for i, j in cells[k]:
                run(cell_config(settings, i, j), run_dir / "lm_single" / str(k) / f"f{i}-e{j}")
                release_memory()
    print(_line(single), flush=True)
    fused = {"what": f"GeLU/SoLU: {len(configs)} grids fused", "layer": "1-3", "images": f"1 epoch x {total}"}
    with measure(fused):
        run_grids([(settings, run_dir / "lm_fused" / str(k)) for settings, k in configs], progress=False)
    penalty = {}
    for kind in ("single", "fused"):
        for path in (run_dir / f"lm_{kind}").rglob("results.json"):
            key = (path.relative_to(run_dir / f"lm_{kind}").parts[0], path.parent.name)
            penalty.setdefault(key, {})[kind] = json.loads(path.read_text())["metrics"]["test/penalty"]
    fused["speedup"] = round(single["seconds"] / fused["seconds"], 2)
    fused["max_penalty_difference"] = max(abs(v["single"] - v["fused"]) for v in penalty.values())
    print(_line(fused) + f"   {fused['speedup']:.2f}x faster, largest cell penalty difference "
          f"{fused['max_penalty_difference']:.2e} nats/token", flush=True)
    return [single, fused, bench_language_cka(run_dir, overrides)]


def bench_language_cka(run_dir: Path, overrides: list[str] = ()) -> dict:
    """The GeLU/SoLU preset's CKA step (``make lm-solu-gelu-small``): minibatch CKA of every front ×
    end model over token positions, as ``python -m stitching.similarity -m`` computes it, in one process."""
    from stitching.grids import sweep_folders
    from stitching.similarity.compare import config_grids, sweep_pairs

    pairs = sweep_pairs([*LANGUAGE_PRESET, *overrides])
    settings = read_settings(compose_config(pairs[0])).config["similarity"]
    row = {"what": f"GeLU/SoLU: CKA of {len(pairs)} model pairs", "layer": "1-3", "images": "test sequences"}
    with measure(row):
        for combo, folder in zip(pairs, sweep_folders(run_dir / "lm_cka", pairs)):
            config_grids(combo, ["minibatch_cka"], int(settings["images"]), "positions", int(settings["batch_size"]),
                         folder, progress=False)
    print(_line(row), flush=True)
    return row


def bench_parallel(overrides: list[str], run_dir: Path) -> list[dict]:
    """Four FuLA cells as a sweep run one after another and as a 2-job local sweep (each job
    with half the cores), in subprocesses as ``make`` runs them; base models are in the zoo by then."""
    import subprocess

    cells = ["objective=fula", "stitch.layer=3,5,7,9"]
    rows = []
    for label, launcher in (("4 FuLA cells, sequential", []),
                            ("4 FuLA cells, 2 local jobs", ["hydra/launcher=local", "hydra.launcher.n_jobs=2"])):
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
    parser.add_argument("--no-lm", action="store_true", help="skip the GeLU/SoLU language-model preset (single runs "
                        "against its fused grids)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the dtype used (default: a table of known GPUs; "
                             "none on a CPU): the model-FLOPs utilisation is measured against it")
    parser.add_argument("--profile", default=None, metavar="OBJECTIVE",
                        help="also profile one epoch of this objective (hint, fula, slm, tlm): the operators "
                             "that take the time, in profile_<objective>.txt")
    parser.add_argument("--only-profile", action="store_true", help="profile (--profile) and measure nothing else")
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on experiment=demo (or on the experiment= they name)")
    args = parser.parse_args(argv)
    named = any(arg.startswith("experiment=") for arg in args.overrides)
    overrides = args.overrides if named else ["experiment=demo", *args.overrides]  # overrides refine the demo
    overrides = [*overrides, "logger=none", "trainer.enable_progress_bar=false"]
    run_dir = hold_folder(Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S"), "--out")
    if args.profile is not None and args.profile not in PLAIN_OBJECTIVES:
        raise StitchingError(f"--profile {args.profile}: profile one of {', '.join(PLAIN_OBJECTIVES)}")
    if args.only_profile and args.profile is None:
        raise StitchingError("--only-profile needs --profile OBJECTIVE")
    if args.profile is not None:
        print(f"profile: {profile_epoch(overrides, args.profile, args.layer, run_dir).resolve()}")
        if args.only_profile:
            return
    print(f"{'measurement':<34} {'layer':>5} {'fit s':>9} {'test s':>8} {'peak MiB':>10}")
    rows = bench_objectives(overrides, args.layer, run_dir, args.peak_tflops)
    if not args.no_grid:
        for objective in args.grid_objectives.split(","):
            rows += bench_grid(overrides, objective.strip(), args.grid_batches, run_dir)
    if not args.no_parallel:
        rows += bench_parallel(overrides, run_dir)
    if not args.no_lm:  # the preset's own data and models, in the given folders
        rows += bench_language(run_dir, [arg for arg in args.overrides if arg.startswith(("paths.", "zoo.", "trainer."))])
    write_json_atomic(run_dir / "bench.json", {"overrides": overrides, "rows": rows, "versions": versions(),
                                               "threads": torch.get_num_threads()})
    print(f"results in {run_dir.resolve() / 'bench.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
