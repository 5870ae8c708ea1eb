"""The command lines as a user runs them: one-line errors, sweeps, reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stitching.errors import StitchingError
from stitching.report import report
from stitching.results.records import collect, missing_cells
from stitching.results.tables import layer_table
from tests.conftest import TINY, train_cli

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path, zoo_dir, *overrides, multirun=False):
    env = {**os.environ, "STITCHING_ZOO": str(zoo_dir), "STITCHING_OUTPUTS": str(tmp_path / "out"),
           "STITCHING_DATA": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "stitching.train", *(["-m"] if multirun else []), *TINY, *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("overrides, message", [
    (["stitch.layer=10"], "error: layer 10 is out of range: this model has cut points 1..9"),
    # range errors are covered in-process by the bad-input battery; here as real processes with the slow tests
    pytest.param(["objective=fula", "objective.weights=[1,-1,1,1,1]"],
                 "error: objective.weights=[1, -1, 1, 1, 1] is out of range", marks=pytest.mark.slow),
    pytest.param(["stitch.dm_samples=0"], "error: stitch.dm_samples=0 is out of range: it must be an integer ≥ 1",
                 marks=pytest.mark.slow),
    (["dataset=cifar10", "dataset.source.download=false"], "error: CIFAR-10 not found in"),
])
def test_bad_input_exits_non_zero_with_one_line(tmp_path, zoo_dir, overrides, message):
    result = _train(tmp_path, zoo_dir, *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr


@pytest.mark.parametrize("override, group", [("objective=distill", "objective"), ("model=vgg", "model"),
                                              ("dataset=imagenet21k", "dataset")])
def test_unknown_group_choice_is_refused_by_name(tmp_path, zoo_dir, override, group):
    result = _train(tmp_path, zoo_dir, override)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"Could not find '{group}/{override.split('=')[1]}'" in result.stderr


def test_a_sweep_survives_a_failing_run_and_the_report_names_it(tmp_path, zoo_dir):
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, zoo_dir, "objective=dm,tlm", "stitch.layer=2,10", f"hydra.sweep.dir={sweep}",
                    multirun=True)
    assert result.returncode == 1, result.stderr[-2000:]  # after every cell ran: the report below sees all four
    assert "[sweep] 2 run(s) failed" in result.stderr
    frame, failed = collect(sweep)
    assert sorted(zip(frame.objective, frame.front_layer)) == [("dm", 2), ("tlm", 2)]
    assert len(failed) == 2 and all("layer 10 is out of range" in f["error"] for f in failed)
    made = report(sweep)
    assert made["plot"].is_file() and made["results"].is_file()
    summary = subprocess.run([sys.executable, "-m", "stitching.report", str(sweep)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0
    assert summary.stdout.count("FAILED") == 2 and summary.stdout.strip().splitlines()[-1].startswith("results in ")


def _record(tmp, name, objective, layer, acc, status="ok"):
    folder = tmp / name
    folder.mkdir(parents=True)
    record = {"status": status, "objective": objective, "front_layer": layer, "end_layer": layer,
              "metrics": {"test/acc": acc}, "base": {"front": {"test_acc": 0.9, "key": "f"},
                                                      "end": {"test_acc": 0.8, "key": "e"}},
              "timings": {"total_s": 1.0}, "config": {}}
    if status != "ok":
        record = {"status": status, "error": "boom"}
    (folder / "results.json").write_text(json.dumps(record))


def test_report_table_orders_objectives_and_skips_broken_records(tmp_path):
    _record(tmp_path, "a", "tlm", 1, 0.5)
    _record(tmp_path, "b", "dm", 1, 0.25)
    _record(tmp_path, "c", "dm", 2, 0.75)
    _record(tmp_path, "d", "dm", 3, 0.0, status="failed")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text("{half a reco")
    frame, failed = collect(tmp_path)
    assert sorted(f["run"] for f in failed) == ["d", "e"]
    table = layer_table(frame)
    assert list(table.columns) == ["dm", "tlm"]
    assert table.loc[1, "dm"] == 25.0 and table.loc[2, "dm"] == 75.0 and table.loc[1, "tlm"] == 50.0


def test_load_runs_is_one_tidy_frame_of_every_run_with_its_status(tmp_path):
    import stitching

    _record(tmp_path, "a", "tlm", 1, 0.5)
    _record(tmp_path, "b", "dm", 2, 0.25)
    _record(tmp_path, "d", "dm", 3, 0.0, status="failed")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text(json.dumps({"status": "ok", "objective": "dm", "metrics": {}}))
    pd.DataFrame([{"objective": "cka", "front_layer": 1, "end_layer": 1, "score": 0.9}]).to_csv(
        tmp_path / "similarity.csv", index=False)
    frame = stitching.load_runs(tmp_path)
    assert list(zip(frame.run, frame.status)) == [("b", "ok"), ("a", "ok"), (".", "ok"), ("d", "failed"),
                                                  ("e", "invalid")]
    assert frame.loc[frame.run == "d", "error"].item() == "boom" and pd.isna(frame.loc[frame.run == "d", "test_acc"].item())
    assert frame.loc[frame.run == "e", "error"].item().startswith("invalid results.json: front_layer = None")
    ok = frame[frame.status == "ok"]
    assert list(ok.score) == [0.25, 0.5, 0.9] and list(ok.objective) == ["dm", "tlm", "cka"]
    assert {"front_model", "front_source", "seconds", "config_hash", "front_layer_name"} <= set(frame.columns)


def test_the_report_exports_every_run_as_parquet(tmp_path):
    _record(tmp_path, "a", "tlm", 1, 0.5)
    _record(tmp_path, "d", "dm", 3, 0.0, status="failed")
    made = report(tmp_path, table_format="parquet")
    table = pd.read_parquet(made["results"])
    assert made["results"].name == "results.parquet" and sorted(table.status) == ["failed", "ok"]
    with pytest.raises(StitchingError, match="--format xlsx: choose csv or parquet"):
        report(tmp_path, table_format="xlsx")


def test_demo_preset_composes_to_the_documented_job():
    from tests.conftest import compose_config

    cfg = compose_config("experiment=demo")
    assert (cfg.model.arch, cfg.model.width, cfg.dataset.name) == ("resnet18", 16, "mnist5k")
    assert cfg.zoo.recipe.epochs == 8 and cfg.trainer.max_epochs == 1
    assert (cfg.front.seed, cfg.end.seed) == (0, 1)


@pytest.mark.slow
def test_demo_preset_runs_one_cell_at_full_demo_size(tmp_path):
    """The `make run` configuration for one cell (trains the two width-16 MNIST-5k models)."""
    from stitching.runs import run
    from tests.conftest import compose_config

    cfg = compose_config("experiment=demo", "objective=fula", "stitch.layer=9", "trainer.enable_progress_bar=false",
                         f"paths.zoo_dir={tmp_path / 'zoo'}", "logger=none")
    record = run(cfg, tmp_path / "run")
    assert record["base"]["front"]["test_acc"] > 0.9 and record["base"]["end"]["test_acc"] > 0.9
    assert record["metrics"]["test/acc"] > 0.85


def test_self_accuracy_on_hand_built_grids():
    import numpy as np

    from stitching.results.tables import self_accuracy

    diagonal = np.eye(4) + 0.1
    assert self_accuracy(diagonal) == 1.0 and self_accuracy(diagonal, directional=False) == 1.0
    # rows 0 and 2 peak on the diagonal; row 1 peaks at column 3; row 3 peaks at column 0
    grid = np.array([[9, 1, 1, 1],
                     [1, 5, 1, 8],
                     [1, 1, 7, 2],
                     [6, 1, 1, 4]], dtype=float)
    assert self_accuracy(grid) == 2 / 4
    # averaged directions: (G + Gᵀ)/2 rows → row 1: [1, 5, 1, 4.5] peaks at 1 (diagonal);
    # row 3: [7.5, 4.5, 1.5, 4] peaks at 0 → 3 of 4 rows
    assert self_accuracy(grid, directional=False) == 3 / 4
    # a tie with the row's best is not a hit; empty rows are skipped
    assert self_accuracy(np.array([[2.0, 2.0], [np.nan, np.nan]])) == 0.0


def test_a_tie_is_counted_apart_from_a_hit():
    import numpy as np

    from stitching.results.tables import diagonal_wins

    rng = np.random.default_rng(0)
    for _ in range(200):  # grids on a coarse scale, so ties are frequent; counted by a plain loop
        n = int(rng.integers(2, 7))
        grid = rng.integers(0, 4, size=(n, n)).astype(float)
        grid[rng.random((n, n)) < 0.1] = np.nan
        hits = ties = rows = 0
        for i in range(n):
            values = [v for v in grid[i] if v == v]
            if not values:
                continue
            rows += 1
            if grid[i, i] == grid[i, i] and grid[i, i] == max(values):
                if sum(v == grid[i, i] for v in values) > 1:
                    ties += 1
                else:
                    hits += 1
        wins = diagonal_wins(grid)
        assert (wins["rows"], wins["hits"], wins["ties"]) == (rows, hits, ties)
    saturated = np.full((9, 9), 0.96)  # every layer at the ceiling: nothing is found
    assert diagonal_wins(saturated) == {"rows": 9, "hits": 0, "ties": 9, "share": 0.0}
    assert diagonal_wins(saturated + 1e-12 * np.eye(9))["ties"] == 9  # float noise is still a tie


def test_report_draws_heatmaps_for_cross_layer_sweeps(tmp_path):
    for front in (1, 2, 3):
        for end in (1, 2, 3):
            folder = tmp_path / f"f{front}e{end}"
            folder.mkdir()
            acc = 0.9 if front == end else 0.5 + 0.1 * (front > end)
            (folder / "results.json").write_text(json.dumps({
                "status": "ok", "objective": "hint", "front_layer": front, "end_layer": end,
                "metrics": {"test/acc": acc}, "timings": {"total_s": 1}, "config": {},
                "base": {"front": {"test_acc": 0.9, "key": "f"}, "end": {"test_acc": 0.9, "key": "e"}}}))
    made = report(tmp_path)
    assert made["heatmap"].is_file()
    assert made["self_accuracy"]["all"]["hint"] == {"self_accuracy": 1.0, "self_accuracy_nondirectional": 1.0,
                                                    "ties": 0, "ties_nondirectional": 0}
    assert (tmp_path / "grid_hint.csv").is_file() and (tmp_path / "self_accuracy.json").is_file()


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    from stitching.build import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True)
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.partition == "gpu"
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2


@pytest.mark.slow
def test_parallel_sweep_shares_base_models(tmp_path):
    """Two joblib workers ask the zoo for the same missing models at once."""
    zoo = tmp_path / "zoo"
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, zoo, "objective=dm", "stitch.layer=3,7", "hydra/launcher=local",
                    "model.width=4", f"hydra.sweep.dir={sweep}", multirun=True)
    assert result.returncode == 0, result.stderr[-2000:]
    frame, failed = collect(sweep)
    assert not failed and sorted(frame.front_layer) == [3, 7]
    assert len(set(frame.front_model)) == 1 and len(list(zoo.glob("*.pt"))) == 2


def test_bench_measures_each_objective(tmp_path, zoo_dir, capsys):
    from stitching.bench import main as bench_main

    bench_main(["--no-grid", "--no-parallel", "--no-lm", "--out", str(tmp_path), "--", *TINY, f"paths.zoo_dir={zoo_dir}",
                f"paths.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    saved = json.loads(next(tmp_path.rglob("bench.json")).read_text())
    assert [row["what"] for row in saved["rows"]] == [f"{o} epoch" for o in ("dm", "hint", "fula", "slm", "tlm")]
    assert all(row["seconds"] >= 0 and row["peak_mib"] > 0 for row in saved["rows"])
    trained = {row["what"].split()[0]: row for row in saved["rows"][1:]}
    assert all(trained[o]["plain_loop_images_per_s"] > 0 for o in ("hint", "fula", "tlm"))
    assert all(row["images_per_s"] > 0 for row in trained.values()) and "a plain PyTorch loop" in out
    assert "fula epoch" in out and out.strip().splitlines()[-1].startswith("results in ")
    assert all(trained[o]["epoch_tflop"] > 0 and trained[o]["tflops_per_s"] > 0 for o in trained)
    assert trained["fula"]["epoch_tflop"] > trained["hint"]["epoch_tflop"]  # FuLA backpropagates through the tail
    assert all("mfu" not in row for row in trained.values())  # a CPU has no known peak


@pytest.mark.slow
def test_the_bench_grid_times_cells_that_diverge_and_compares_the_rest(tmp_path, zoo_dir, monkeypatch, capsys):
    """A diverged cell (as an fp16 loss that overflows on a GPU) is a failed cell in both the single
    runs and the fused grid; the bench finishes, lists them, and compares the cells that ran."""
    import torch

    from stitching.bench import bench_grid
    from stitching.objectives import losses

    real = losses.hint_loss

    def diverge_into_the_last_stage(stitched, target, mask=None):  # end layers 8 and 9: 64 channels at width 8
        loss = real(stitched, target, mask)
        return loss * float("nan") if target.shape[1] == 64 else loss

    monkeypatch.setattr(losses, "hint_loss", diverge_into_the_last_stage)
    single, fused = bench_grid([*TINY, f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}", "logger=none",
                                "trainer.enable_progress_bar=false"], "hint", 1, tmp_path)
    expected = [f"f{i}-e{j}" for i in range(1, 10) for j in (8, 9)]
    assert sorted(fused["failed_cells"]["single"]) == sorted(fused["failed_cells"]["fused"]) == sorted(expected)
    assert fused["max_acc_difference"] < 1e-6 and "over 63 cells; failed cells: 18 single" in capsys.readouterr().out
    assert torch.isfinite(torch.tensor([single["seconds"], fused["seconds"]])).all()


def test_the_bench_counts_a_steps_flops_as_the_closed_form_and_knows_gpu_peaks():
    import torch

    from stitching.bench import compute_dtype, peak_tflops, step_flops, utilisation

    conv = torch.nn.Conv2d(6, 4, kernel_size=1)
    x = torch.randn(5, 6, 7, 3)

    def step(x, y):
        conv(x).sum().backward()

    # forward 2·N·H·W·Cin·Cout; backward as much again for the weight's gradient, and once more
    # for the input's when it needs one (a stitch's input, the frozen front's output, does not)
    forward = 2 * 5 * 7 * 3 * 6 * 4
    assert step_flops(step, x, None) == 2 * forward
    assert step_flops(step, x.requires_grad_(), None) == 3 * forward
    with torch.no_grad():
        assert step_flops(lambda x, y: conv(x), x, None) == forward
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("cpu", "fp32") is None and peak_tflops("cpu", "fp32", given=2.0) == 2.0
    assert compute_dtype("bf16-mixed", "cuda") == "bf16" and compute_dtype("32-true", "cpu") == "fp32"
    assert utilisation(4e12, 2.0, 10.0) == {"tflops_per_s": 2.0, "peak_tflops": 10.0, "mfu": 0.2}
    assert utilisation(4e12, 2.0, None) == {"tflops_per_s": 2.0}


def test_bench_profiles_an_epoch(tmp_path, zoo_dir, capsys):
    from stitching.bench import main as bench_main

    bench_main(["--profile", "hint", "--only-profile", "--out", str(tmp_path), "--", *TINY,
                f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}"])
    text = next(tmp_path.rglob("profile_hint.txt")).read_text()
    assert "one hint epoch" in text and "convolution" in text and "Self CPU" in text
    assert not list(tmp_path.rglob("bench.json"))
    with pytest.raises(SystemExit):
        bench_main(["--profile", "dm", "--out", str(tmp_path)])
    assert "--profile dm: profile one of hint, fula, slm, tlm" in capsys.readouterr().err


def test_wandb_groups_a_sweep_and_receives_its_figures(tmp_path, zoo_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = tmp_path / "mysweep"
    result = _train(tmp_path, zoo_dir, "objective=dm", "stitch.layer=2,9", "logger=wandb",
                    f"hydra.sweep.dir={sweep}", multirun=True)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list(sweep.rglob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    for data in (r.read_bytes() for r in runs):
        assert b"dm_samples" in data and b"final/test/acc" in data  # config and metrics
    # the group is the sweep's name (checked with a name that appears in no path)
    from stitching.runs import run
    from tests.conftest import compose_config

    cfg = compose_config(*TINY, "logger=wandb", "objective=dm", f"paths.zoo_dir={zoo_dir}")
    import time

    run(cfg, tmp_path / "single", sweep_name="group-7f3a")
    (single,) = (tmp_path / "single").rglob("run-*.wandb")
    deadline = time.monotonic() + 60  # W&B's service may still be writing the offline file when finish() returns
    while b"group-7f3a" not in single.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"group-7f3a" in single.read_bytes()
    from stitching.report import log_to_wandb

    log_to_wandb(report(sweep), sweep)
    deadline = time.monotonic() + 60
    while True:
        report_runs = [r for r in sweep.glob("wandb/offline-run-*/run-*.wandb") if r not in runs]
        if (report_runs and b"stitching_plot" in report_runs[0].read_bytes()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert report_runs and b"stitching_plot" in report_runs[0].read_bytes()


def test_a_diverged_cell_is_failed_listed_and_kept_out_of_the_figures(tmp_path, zoo_dir, monkeypatch, capsys):
    """A NaN in the Hint loss at step 3: that cell fails at step 3, the TLM cell finishes,
    the sweep exits 1 after both, and the report keeps the failure out of its figures."""
    from stitching.objectives import losses

    calls = {"n": 0}
    real = losses.hint_loss

    def nan_at_step_three(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(losses, "hint_loss", nan_at_step_three)
    sweep = tmp_path / "sweep"
    code, output = train_cli(["-m", *TINY, f"paths.zoo_dir={zoo_dir}", f"paths.data_dir={tmp_path / 'data'}",
                              "objective=hint,tlm", "stitch.layer=2", f"hydra.sweep.dir={sweep}"], monkeypatch, capsys)
    assert code == 1 and "[sweep] 1 run(s) failed" in output, output[-2000:]
    frame, failed = collect(sweep)
    assert list(frame.objective) == ["tlm"]
    assert len(failed) == 1 and "the loss became nan at training step 3" in failed[0]["error"]
    records = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    (diverged,) = [r for r in records if r["status"] == "failed"]
    assert diverged["diverged"] == {"what": "the loss", "value": "nan", "step": 3}
    made = report(sweep)
    table = pd.read_csv(made["results"])  # every run, the failed one with its status and error and no metric
    assert list(table[table.status == "ok"].objective) == ["tlm"] and list(made["frame"].objective) == ["tlm"]
    failed_row = table[table.status == "failed"].iloc[0]
    assert "the loss became nan" in failed_row.error and pd.isna(failed_row.test_acc)
    assert made["missing"] == []  # the failed cell ran: it is failed, not missing


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name in ("results.json", "stitch.pt")}


def test_a_killed_sweep_resumes_with_only_its_missing_cells(tmp_path, zoo_dir):
    """Kill a sweep after two cells; the same command into the same folder runs only the rest."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    argv = ["objective=dm", "stitch.layer=2,3,4,5", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "STITCHING_ZOO": str(zoo_dir), "STITCHING_OUTPUTS": str(tmp_path / "out"),
           "STITCHING_DATA": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "stitching.train", "-m", *TINY, *argv]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 500
    while len(list(sweep.rglob("results.json"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = _hashes(sweep)
    done = {p.parent for p in sweep.rglob("results.json")}
    assert 2 <= len(done) < 4, finished
    missing = missing_cells(sweep)
    assert len(missing) == 4 - len(done) and all(cell.startswith("stitch.layer=") for cell in missing)

    again = _train(tmp_path, zoo_dir, *argv, multirun=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("[resume]") == len(done)  # skipped, not redone
    assert again.stdout.count("stitched test acc") == 4 - len(done)  # only the missing cells ran
    after = _hashes(sweep)
    assert {k: after[k] for k in finished} == finished  # the finished cells' files are untouched
    frame, failed = collect(sweep)
    assert sorted(frame.front_layer) == [2, 3, 4, 5] and not failed


def test_a_finished_cell_of_another_config_is_never_overwritten(tmp_path, zoo_dir, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    common = ["-m", *TINY, f"paths.zoo_dir={zoo_dir}", f"paths.data_dir={tmp_path / 'data'}",
              "objective=dm", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=cell"]
    code, output = train_cli([*common, "stitch.layer=3"], monkeypatch, capsys)
    assert code == 0, output[-2000:]
    kept = _hashes(sweep)
    code, output = train_cli([*common, "stitch.layer=4"], monkeypatch, capsys)
    assert code == 1 and "holds a finished result of a different config; it is left untouched" in output
    assert _hashes(sweep) == kept and json.loads((sweep / "cell" / "results.json").read_text())["front_layer"] == 3


def test_a_read_only_zoo_costs_the_robust_cache_not_the_metrics(tiny_config, tmp_path, zoo_dir, monkeypatch, capsys):
    """Every write into the zoo fails (as on a read-only or full disk): a warning, and the
    run still records its metrics, the base models' robust accuracy included."""
    import errno

    from stitching import runtime
    from stitching.runs import run

    run(tiny_config("objective=dm", "stitch.layer=3"), tmp_path / "warm")  # the base models are cached
    zoo = str(zoo_dir.resolve())
    real_replace, real_acquire = os.replace, runtime.FileLock.acquire

    def refuse(path):
        if str(Path(path).resolve()).startswith(zoo):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runtime.os, "replace", lambda src, dst: refuse(dst) or real_replace(src, dst))
    monkeypatch.setattr(runtime.FileLock, "acquire",
                        lambda self, *a, **k: refuse(self.lock_file) or real_acquire(self, *a, **k))
    before = sorted(p.name for p in zoo_dir.iterdir())
    record = run(tiny_config("objective=dm", "stitch.layer=3", "attack=pgd", "attack.eval_images=37",
                             "attack.steps=2"), tmp_path / "ro")
    assert record["status"] == "ok" and 0 <= record["metrics"]["test/robust_acc/pgd"] <= 1
    assert 0 <= record["base"]["front"]["robust_acc/pgd"] <= 1
    assert "[cache] warning: could not write" in capsys.readouterr().err
    assert sorted(p.name for p in zoo_dir.iterdir()) == before
    assert json.loads((tmp_path / "ro" / "results.json").read_text())["status"] == "ok"


def test_a_sweep_runs_exactly_the_layers_it_names(tmp_path, zoo_dir):
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, zoo_dir, "objective=dm", "stitch.front_layer=3,5", "stitch.end_layer=5",
                    f"hydra.sweep.dir={sweep}", multirun=True)
    assert result.returncode == 0, result.stderr[-2000:]
    cells = sorted((r["front_layer"], r["end_layer"]) for r in
                   (json.loads(p.read_text()) for p in sweep.rglob("results.json")))
    assert cells == [(3, 5), (5, 5)]


def test_the_nine_layer_sweep_applies_only_when_no_layer_is_named():
    from stitching.train import with_default_layer_sweep

    nine = "stitch.layer=range(1,10)"
    assert with_default_layer_sweep(["-m", "objective=dm,tlm"])[-1] == nine
    assert with_default_layer_sweep(["--multirun", "experiment=demo"])[-1] == nine
    assert nine not in with_default_layer_sweep(["-m", "stitch.front_layer=3,5", "stitch.end_layer=5"])
    assert nine not in with_default_layer_sweep(["-m", "stitch.layer=2"])
    assert nine not in with_default_layer_sweep(["-m", "experiment=fig10_small"])  # its sweep names the layers
    assert with_default_layer_sweep(["objective=dm"]) == ["objective=dm"]  # a single run stays one run


def test_report_averages_seed_pairs_and_shows_their_spread(tmp_path):
    """Runs differing only in seeds are replicates: one panel per pairing (self / two models),
    the mean in tables and grids, the standard deviation beside it."""
    import pandas as pd

    from stitching.results.tables import spread_table, varying_conditions

    accuracies = {(0, 1): 0.8, (1, 2): 0.6, (2, 0): 0.7, (0, 0): 0.95}  # (front seed, end seed) → layer-1 acc
    for (front_seed, end_seed), acc in accuracies.items():
        for front, end in ((1, 1), (2, 2), (1, 2)):
            folder = tmp_path / f"s{front_seed}{end_seed}_f{front}e{end}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps({
                "status": "ok", "objective": "fula", "front_layer": front, "end_layer": end,
                "metrics": {"test/acc": acc if front == end == 1 else 0.5}, "timings": {"total_s": 1},
                "config": {"front": {"seed": front_seed, "arch": "resnet18"}, "end": {"seed": end_seed, "arch": "resnet18"}},
                "base": {"front": {"test_acc": 0.9, "key": f"m{front_seed}"}, "end": {"test_acc": 0.9, "key": f"m{end_seed}"}}}))
    made = report(tmp_path)
    frame = made["frame"]
    assert varying_conditions(frame) == ["pairing"]
    between = frame[frame.pairing == "two models"]
    table = spread_table(between)
    assert table.loc[1, "fula"] == f"{70.0:.2f} ± {pd.Series([80.0, 60.0, 70.0]).std():.2f}"
    assert spread_table(frame[frame.pairing == "self"]).loc[1, "fula"] == 95.0  # one seed pair: no spread
    mean = pd.read_csv(tmp_path / "grid_fula_pairingtwo-models.csv", index_col=0)
    std = pd.read_csv(tmp_path / "grid_fula_pairingtwo-models_std.csv", index_col=0)
    assert mean.loc[1, "1"] == pytest.approx(0.7) and std.loc[1, "1"] == pytest.approx(0.1)
    assert not (tmp_path / "grid_fula_pairingself_std.csv").exists()
    assert "±" in (tmp_path / "table.md").read_text()


def test_a_run_that_does_not_read_a_condition_is_drawn_beside_each_value_and_conditions_are_never_averaged(tmp_path):
    """Fig. 3's layout: DM with and without the running-statistics pass, Hint (which has no such
    pass) beside both; the layer table gives every condition its own column."""
    from stitching.results.records import NOT_READ
    from stitching.results.tables import facets

    runs = [("dm", False, 0.50), ("dm", True, 0.70), ("hint", False, 0.90)]
    for objective, bn_pass, acc in runs:
        folder = tmp_path / f"{objective}_{bn_pass}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({
            "status": "ok", "objective": objective, "front_layer": 3, "end_layer": 3, "metrics": {"test/acc": acc},
            "timings": {"total_s": 1}, "base": {"front": {"test_acc": 0.9, "key": "f"}, "end": {"test_acc": 0.9, "key": "e"}},
            "config": {"objective": {"name": objective}, "stitch": {"dm_bn_pass": bn_pass, "dm_samples": 100}}}))
    frame, _ = collect(tmp_path)
    assert (frame[frame.objective == "hint"].dm_bn_pass == NOT_READ).all()
    assert set(frame[frame.objective == "dm"].dm_bn_pass) == {False, True}
    panels = {label: sorted(rows.objective) for label, rows in facets(frame)}
    assert panels == {"dm_bn_pass=False": ["dm", "hint"], "dm_bn_pass=True": ["dm", "hint"]}
    table = layer_table(frame)
    assert table.loc[3].to_dict() == {"dm (dm_bn_pass=False)": 50.0, "hint": 90.0, "dm (dm_bn_pass=True)": 70.0}


def test_models_in_groups_are_compared_within_and_between_groups_layer_by_layer(tmp_path):
    """The LM paper's Sec. 4 layout: pairs of different models within a group vs across groups,
    from stitching records and similarity rows alike; a model stitched to itself is no pair."""
    import pandas as pd

    from stitching.results.tables import group_table

    groups = {"by": "name", "members": {"g": ["g1", "g2"], "h": ["h1", "h2"]}}
    penalty = {("g1", "g2"): 0.1, ("g2", "g1"): 0.3, ("h1", "h2"): 0.2, ("g1", "h1"): 0.9, ("h2", "g2"): 0.7,
               ("g1", "g1"): 0.0}
    for (front, end), value in penalty.items():
        for layer, scale in ((1, 1.0), (2, 2.0)):
            folder = tmp_path / f"{front}_{end}_{layer}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps({
                "status": "ok", "objective": "tlm", "front_layer": layer, "end_layer": layer,
                "metrics": {"test/penalty": value * scale, "test/adjusted_penalty": value * scale,
                            "test/baseline_loss": 2.0, "test/end_loss": 2.0},
                "timings": {"total_s": 1}, "config": {"groups": groups, "front": {"name": front}, "end": {"name": end}},
                "base": {"front": {"test_acc": None, "key": front}, "end": {"test_acc": None, "key": end}}}))
    cka = pd.DataFrame([{"objective": "cka", "front_layer": 1, "end_layer": 1, "score": s, "front_model": f,
                         "end_model": e, "front_group": f[0], "end_group": e[0]}
                        for f, e, s in (("g1", "g2", 0.9), ("h1", "h2", 0.7), ("g1", "h2", 0.4))])
    (tmp_path / "cka").mkdir()
    cka.to_csv(tmp_path / "cka" / "similarity.csv", index=False)
    made = report(tmp_path)
    table = made["group_table"].set_index(["method", "layer"])
    within, between = -(0.1 + 0.3 + 0.2) / 3, -(0.9 + 0.7) / 2  # the self pair g1 → g1 is left out
    assert table.loc[("tlm", 1), "within − between"] == pytest.approx(within - between, abs=1e-4)
    assert table.loc[("tlm", 2), "within − between"] == pytest.approx(2 * (within - between), abs=1e-4)
    assert table.loc[("tlm", 1), "within"].endswith("(3)") and table.loc[("tlm", 1), "between"].endswith("(2)")
    assert table.loc[("cka", 1), "within − between"] == pytest.approx(0.8 - 0.4, abs=1e-4)
    assert (tmp_path / "groups.png").is_file() and "within − between" in (tmp_path / "groups.md").read_text()
    assert group_table(made["frame"][made["frame"].objective == "cka"]).shape[0] == 1


@pytest.mark.slow
def test_bench_times_the_language_preset_as_single_runs_and_fused_grids(tmp_path):
    """The GeLU/SoLU preset's 48 cells (here on tiny models) as single runs and as its 16 grids:
    every cell measured both ways, the same penalty within float rounding."""
    pytest.importorskip("transformer_lens")
    from stitching.bench import bench_language

    tiny = ["model.width=32", "zoo.recipe.language.tokens=20000", "dataset.train_sequences=64",
            "dataset.test_sequences=16", "dataset.batch_size=16", "trainer=cpu", f"paths.zoo_dir={tmp_path / 'zoo'}",
            f"paths.output_dir={tmp_path}"]
    single, fused, cka = bench_language(tmp_path / "bench", tiny)
    assert single["what"] == "GeLU/SoLU: 48 single runs" and fused["what"] == "GeLU/SoLU: 16 grids fused"
    assert len(list((tmp_path / "bench" / "lm_single").rglob("results.json"))) == 48
    assert len(list((tmp_path / "bench" / "lm_fused").rglob("results.json"))) == 48
    assert fused["speedup"] > 0 and fused["max_penalty_difference"] < 1e-4
    records = [json.loads(path.read_text()) for path in (tmp_path / "bench" / "lm_cka").rglob("similarity.json")]
    assert cka["what"] == "GeLU/SoLU: CKA of 16 model pairs" and cka["seconds"] > 0
    assert len({(r["front"], r["end"]) for r in records}) == 16 and {r["images"] for r in records} == {16}
