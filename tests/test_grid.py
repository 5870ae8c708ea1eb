"""The fused grid trainer: grouped BatchNorm equals separate BatchNorms, every fused cell equals
its own single run, and a grid's folder reports like a sweep's."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from stitching.build import StitchSettings
from stitching.models import build_model
from stitching.models.grouped import GroupedBatchNorm2d, deinterleave, interleave


def test_grouped_batchnorm_equals_separate_batchnorms_in_train_and_eval():
    torch.manual_seed(0)
    groups, channels = 3, 5
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    separate = [copy.deepcopy(bn) for _ in range(groups)]
    grouped = GroupedBatchNorm2d(copy.deepcopy(bn), groups)
    for step in range(4):
        parts = [torch.randn(6, channels, 4, 4) * (g + 1) + g for g in range(groups)]
        out = deinterleave(grouped.train()(interleave(parts)), groups)
        for part, b, x in zip(out, separate, parts):
            torch.testing.assert_close(part, b.train()(x), atol=1e-5, rtol=1e-5)
    for g, b in enumerate(separate):
        state = grouped.group_state(g)
        torch.testing.assert_close(state["running_mean"], b.running_mean)
        torch.testing.assert_close(state["running_var"], b.running_var)
        assert int(state["num_batches_tracked"]) == int(b.num_batches_tracked) == 4
    parts = [torch.randn(2, channels, 3, 3) for _ in range(groups)]
    torch.testing.assert_close(torch.cat(deinterleave(grouped.eval()(interleave(parts)), groups)),
                               torch.cat([b.eval()(x) for b, x in zip(separate, parts)]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="equal groups"):
        grouped(torch.randn(4, channels, 2, 2))


def _models():
    torch.manual_seed(0)
    front, end = build_model("resnet18", num_classes=10, width=4), build_model("resnet18", num_classes=10, width=4)
    for model in (front, end):  # BatchNorm statistics of a trained model, not the defaults
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(16, 3, 16, 16))
        model.eval()
    return front, end


def _bn_state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def _engine(front, end, cells, objective, dm, update_bn=True, chunk=None, init="dm", kind="affine", front_rank=None,
            adversarial=None, dm_bn_pass=False):
    from stitching.engine import StitchEngine
    from stitching.objectives import make_objective

    settings = StitchSettings(1, 1, len(dm), update_bn, "shared", 1e-2, 1e-4, init=init, kind=kind, rank=2, hidden=3,
                              front_rank=front_rank, dm_bn_pass=dm_bn_pass)
    return StitchEngine(front, end, cells, make_objective(objective), settings, dm, num_classes=10,
                        adversarial=adversarial, seed=3, tail_chunk=chunk)


def _train(engine, batches, test_x, trainer=None):
    from torch.utils.data import DataLoader, TensorDataset

    from stitching.engine import fit_engine

    test = DataLoader(TensorDataset(test_x, torch.arange(len(test_x)) % 10), batch_size=16)
    batches = DataLoader(TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])),
                         batch_size=len(batches[0][0]))
    options = {"accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False, **(trainer or {})}
    return fit_engine(engine, batches, test, options)


def _data():
    generator = torch.Generator().manual_seed(1)
    dm = torch.rand(24, 3, 16, 16, generator=generator)
    batches = [(torch.rand(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(4)]
    return dm, batches, torch.rand(32, 3, 16, 16, generator=generator)


def _assert_cell_equal(fused, single, i, j, front, end, update_bn, test_x, what):
    a, b = fused.network(i, j), single.network(i, j)
    for (name, want), got in zip(b.stitch.state_dict().items(), a.stitch.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{what} f{i}-e{j} {name}")
    for side in ("front", "end"):  # BN running statistics (the front up to the cut, the end tail)
        mine, theirs = _bn_state(getattr(b, side).model), _bn_state(getattr(a, side).model)
        used = [k for k in mine if not torch.equal(mine[k], _bn_state(front if side == "front" else end)[k])]
        assert bool(used) == update_bn
        for key in used:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6, msg=f"{what} {side} {key}")
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(test_x), b.eval()(test_x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("update_bn,chunk", [(True, None), (False, None), (True, 2)])
@pytest.mark.parametrize("objective", ["hint", "fula", "slm", "tlm"])
def test_every_fused_cell_equals_its_own_run(objective, update_bn, chunk):
    """The engine of four cells against four engines of one cell, both under Lightning.
    ``chunk=2``: end layer 4's three stitches pass its tail as two chunks (2 + 1)."""
    front, end = _models()
    dm, batches, test_x = _data()
    pairs = [(2, 4), (4, 4), (6, 4), (4, 7)]
    fused = _engine(front, end, pairs, objective, dm, update_bn, chunk)
    assert len(fused.tails) == (2 if chunk is None else 3)
    results = _train(fused, batches, test_x)
    for i, j in pairs:
        single = _engine(front, end, [(i, j)], objective, dm, update_bn)
        alone = _train(single, batches, test_x)[f"f{i}-e{j}"]
        _assert_cell_equal(fused, single, i, j, front, end, update_bn, test_x, objective)
        for key, value in alone["metrics"].items():
            assert results[f"f{i}-e{j}"]["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert results[f"f{i}-e{j}"]["curve"] == pytest.approx(alone["curve"], rel=1e-5)


def test_the_results_are_read_while_the_engine_is_on_its_device(monkeypatch):
    """Lightning moves the module to the CPU when a stage ends; under DDP on GPUs a metric synced
    there fails (NCCL has no CPU tensors). The test metrics are computed, synced, at the end of
    the test epoch, and :meth:`results` computes nothing after it."""
    front, end = _models()
    dm, batches, test_x = _data()
    engine = _engine(front, end, [(2, 4), (4, 7)], "fula", dm)
    results = _train(engine, batches, test_x)

    def no_sync_here(*args, **kwargs):
        raise AssertionError("a metric computed after the stage ended")

    for metrics in engine.metrics.values():
        for metric in metrics.values():
            monkeypatch.setattr(metric, "compute", no_sync_here)
    again = engine.results()
    for key in ("f2-e4", "f4-e7"):
        assert {"test/acc", "test/loss", "train/loss", "train/acc"} <= set(again[key]["metrics"])
        assert again[key]["metrics"] == results[key]["metrics"]


@pytest.mark.parametrize("case", ["random", "identity", "low_rank", "mlp", "front_rank", "dm", "dm_bn_pass"])
def test_every_stitch_kind_and_start_fuses_alike(case):
    """Random starts are seeded per cell; low-rank, MLP and rank-truncated stitches fuse; so does
    DM's running-statistics pass (each cell's end statistics its own)."""
    front, end = _models()
    dm, batches, test_x = _data()
    pairs = [(2, 4), (4, 4), (5, 6)]
    options = {"init": case} if case in ("random", "identity") else \
        {"front_rank": 2} if case == "front_rank" else {"objective": "dm"} if case == "dm" else \
        {"objective": "dm", "dm_bn_pass": True} if case == "dm_bn_pass" else {"kind": case}
    objective = options.pop("objective", "fula")
    fused = _engine(front, end, pairs, objective, dm, **options)
    _train(fused, batches, test_x)
    for i, j in pairs:
        single = _engine(front, end, [(i, j)], objective, dm, **options)
        _train(single, batches, test_x)
        _assert_cell_equal(fused, single, i, j, front, end, objective != "dm" or case == "dm_bn_pass", test_x, case)


def test_random_starts_differ_between_cells_and_seeds():
    front, end = _models()
    dm, _, _ = _data()
    a = _engine(front, end, [(4, 4), (3, 4)], "hint", dm, init="random")
    b = _engine(front, end, [(4, 4)], "hint", dm, init="random")
    torch.testing.assert_close(a.stitches["f4-e4"].weight, b.stitches["f4-e4"].weight)
    assert not torch.equal(a.stitches["f4-e4"].weight[:, :8], a.stitches["f3-e4"].weight[:, :8])


def test_adversarial_stitching_fuses_with_a_front_per_cell():
    front, end = _models()
    dm, batches, test_x = _data()
    attack = {"alpha": 0.5, "eps": 0.03, "steps": 2, "step_size": 0.01, "random_start": False}
    pairs = [(3, 4), (5, 5)]
    fused = _engine(front, end, pairs, "tlm", dm, adversarial=attack)
    assert set(fused.fronts) == {"f3-e4", "f5-e5"}
    _train(fused, batches[:2], test_x, {"max_epochs": 1})
    for i, j in pairs:  # each cell draws its own adversarial share and start, as in its own run
        single = _engine(front, end, [(i, j)], "tlm", dm, adversarial=attack)
        _train(single, batches[:2], test_x, {"max_epochs": 1})
        _assert_cell_equal(fused, single, i, j, front, end, True, test_x, "adversarial")


@pytest.mark.parametrize("option", [{"max_steps": 3}, {"limit_train_batches": 2}, {"gradient_clip_val": 0.01},
                                    {"gradient_clip_val": 0.001, "gradient_clip_algorithm": "value"},
                                    {"accumulate_grad_batches": 3}, {"limit_test_batches": 1}])
def test_every_trainer_option_acts_on_a_grid_as_on_its_single_runs(option):
    """Each option changes the fused cells exactly as it changes their single runs (and does change them)."""
    front, end = _models()
    dm, batches, test_x = _data()
    pairs = [(2, 4), (4, 4), (4, 7)]
    fused = _engine(front, end, pairs, "fula", dm)
    results = _train(fused, batches, test_x, option)
    plain = _engine(front, end, pairs, "fula", dm)
    baseline = _train(plain, batches, test_x)
    changed = False
    for i, j in pairs:
        single = _engine(front, end, [(i, j)], "fula", dm)
        alone = _train(single, batches, test_x, option)[f"f{i}-e{j}"]
        _assert_cell_equal(fused, single, i, j, front, end, True, test_x, str(option))
        assert results[f"f{i}-e{j}"]["metrics"] == pytest.approx(alone["metrics"], rel=1e-5, abs=1e-6)
        changed |= results[f"f{i}-e{j}"]["metrics"] != pytest.approx(baseline[f"f{i}-e{j}"]["metrics"], rel=1e-6)
    assert changed, f"{option} changed nothing"


def test_a_fused_grid_writes_the_cells_a_sweep_would_and_reports_alike(tiny_config, tmp_path, monkeypatch):
    """The command-line grid against the same cells as single runs: same accuracies and stitches,
    same report (self-accuracy, heatmap), and a rerun that keeps every finished cell."""
    from stitching.grids import cell_config, run_grid
    from stitching.report import report
    from stitching.runs import run

    cfg = tiny_config("objective=fula", "grid.pairs=[[1,1],[1,5],[5,1],[5,5]]", "trainer.limit_train_batches=3",
                      "trainer.max_epochs=2")
    summary = run_grid(cfg, tmp_path / "grid", progress=False)
    assert len(summary["done"]) == 4 and not summary["failed"]
    for i, j in summary["done"]:
        run(cell_config(cfg, i, j), tmp_path / "single" / "fula" / f"f{i}-e{j}")
    for i, j in summary["done"]:
        fused = json.loads((tmp_path / "grid" / "fula" / f"f{i}-e{j}" / "results.json").read_text())
        single = json.loads((tmp_path / "single" / "fula" / f"f{i}-e{j}" / "results.json").read_text())
        assert fused["config_hash"] == single["config_hash"]
        assert fused["metrics"]["test/acc"] == pytest.approx(single["metrics"]["test/acc"], abs=1e-6)  # torchmetrics: float32
        assert fused["metrics"]["train/loss"] == pytest.approx(single["metrics"]["train/loss"], rel=1e-4)
        assert len(fused["curve"]["train/loss"]) == 2  # the mean training loss of each epoch, both ways alike
        assert fused["curve"]["train/loss"] == pytest.approx(single["curve"]["train/loss"], rel=1e-4)
        assert fused["curve"]["train/loss"][-1] == pytest.approx(fused["metrics"]["train/loss"], rel=1e-6)
        a = torch.load(tmp_path / "grid" / "fula" / f"f{i}-e{j}" / "stitch.pt")
        b = torch.load(tmp_path / "single" / "fula" / f"f{i}-e{j}" / "stitch.pt")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    made_fused, made_single = report(tmp_path / "grid"), report(tmp_path / "single")
    assert made_fused["self_accuracy"] == made_single["self_accuracy"] and made_fused["heatmap"].is_file()
    import stitching.grids

    def no_setup(*args, **kwargs):
        raise AssertionError("a finished grid of named cells loads no data and no models")

    monkeypatch.setattr(stitching.grids, "setup", no_setup)
    again = run_grid(cfg, tmp_path / "grid", progress=False)
    assert len(again["skipped"]) == 4 and not again["done"]
    (tmp_path / "grid" / "fula" / "f5-e5" / "results.json").unlink()  # one cell missing: the grid sets up again
    with pytest.raises(AssertionError, match="loads no data"):
        run_grid(cfg, tmp_path / "grid", progress=False)


def test_a_sweep_becomes_one_grid_per_combination_of_the_other_axes():
    from stitching.grids import sweep_grids

    grids = sweep_grids(["experiment=sanity_small"])  # the preset's sweep: 2 end seeds × 4 objectives × 5 × 5 layers
    assert len(grids) == 8
    for rest, cells in grids:
        assert sorted(cells) == [(i, j) for i in (2, 3, 5, 7, 9) for j in (2, 3, 5, 7, 9)]
        assert not any(item.startswith("stitch.") for item in rest) and "experiment=sanity_small" in rest
    assert {tuple(sorted(item for item in rest if item.startswith(("objective", "end.seed")))) for rest, _ in grids} == \
        {(f"end.seed={s}", f"objective={o}") for s in (0, 1) for o in ("dm", "hint", "fula", "tlm")}
    (rest, cells), = sweep_grids(["experiment=demo", "objective=hint"])  # no layer key: the corresponding layers
    assert cells == "diagonal"
    override = sweep_grids(["experiment=sanity_small", "objective=tlm", "end.seed=1", "stitch.front_layer=2,4"])
    assert len(override) == 1 and sorted(override[0][1]) == [(i, j) for i in (2, 4) for j in (2, 3, 5, 7, 9)]


def test_the_grid_command_sweeps_fused_grids_and_reports_them(zoo_dir, tmp_path, capsys):
    from tests.conftest import TINY

    from stitching.grid import main
    from stitching.results.records import collect

    main(["-m", "--no-progress", "--out", str(tmp_path / "sweep"), *TINY, f"paths.zoo_dir={zoo_dir}",
          f"paths.output_dir={tmp_path}", "objective=dm,hint", "stitch.front_layer=1,3", "stitch.end_layer=1,3",
          "trainer.limit_train_batches=2"])
    assert capsys.readouterr().out.count("4 cells trained fused") == 2
    frame, failed = collect(tmp_path / "sweep")
    assert not failed and len(frame) == 8 and set(frame.objective) == {"dm", "hint"}
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), *TINY, "hydra/launcher=slurm"])
    assert "add -m (one job per grid)" in capsys.readouterr().err


def _launched_sweep(launcher: list[str], zoo_dir, tmp_path):
    from tests.conftest import TINY

    from stitching.grid import main
    from stitching.results.records import collect

    with pytest.raises(SystemExit) as done:
        main(["-m", "--no-progress", "--out", str(tmp_path / "sweep"), *TINY, f"paths.zoo_dir={zoo_dir}",
              f"paths.output_dir={tmp_path}", "objective=dm,hint", "stitch.front_layer=1,3", "stitch.end_layer=3",
              "trainer.limit_train_batches=2", *launcher])
    assert done.value.code == 0
    frame, failed = collect(tmp_path / "sweep")
    assert not failed and len(frame) == 4 and set(frame.objective) == {"dm", "hint"}
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]  # one job per grid, each with both of its cells
    for job in jobs:
        cells = sorted(p.parent.name for p in (tmp_path / "sweep" / job).rglob("results.json"))
        assert cells == ["f1-e3", "f3-e3"]
    return frame


def test_a_sweep_of_grids_runs_on_joblib_one_job_per_grid(zoo_dir, tmp_path):
    _launched_sweep(["hydra/launcher=local", "hydra.launcher.n_jobs=2"], zoo_dir, tmp_path)


@pytest.mark.slow
def test_a_sweep_of_grids_runs_on_submitit_one_job_per_grid(zoo_dir, tmp_path):
    """submitit's local executor: the SLURM launcher's job expansion and pickling, offline."""
    _launched_sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], zoo_dir, tmp_path)


def test_settings_that_once_ran_cell_by_cell_now_fuse_and_equal_their_single_runs(tiny_config, tmp_path):
    """A random start and the penultimate CKA at the start (Fig. 6) through the command-line grid."""
    from stitching.grids import cell_config, run_grid
    from stitching.runs import run

    cfg = tiny_config("objective=hint", "stitch.init=random", "evaluation.penultimate_cka=true",
                      "grid.pairs=[[3,3],[5,3]]", "trainer.limit_train_batches=2")
    summary = run_grid(cfg, tmp_path / "grid", progress=False)
    assert len(summary["done"]) == 2 and not summary["failed"]
    for i, j in summary["done"]:
        fused = json.loads((tmp_path / "grid" / "hint" / f"f{i}-e{j}" / "results.json").read_text())
        single = run(cell_config(cfg, i, j), tmp_path / "single" / f"f{i}-e{j}")
        assert fused["timings"]["fused_cells"] == 2
        for key in ("test/acc", "train/loss", "init/penultimate_cka"):
            assert fused["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_the_same_cells_as_one_process(zoo_dir, tmp_path):
    """``trainer.strategy=ddp`` with two gloo processes: every cell recorded once, by the first
    process, and each process's share of every batch makes up the batch one process sees."""
    import os
    import subprocess
    import sys

    from tests.conftest import TINY

    def grid(out, *extra):
        command = [sys.executable, "-m", "stitching.grid", "--no-progress", "--out", str(out), *TINY,
                   f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}", "objective=fula",
                   "grid.pairs=[[2,2],[4,2],[5,6]]", "trainer.limit_train_batches=3", *extra]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    grid(tmp_path / "one")  # trains the base models first, in one process
    out = grid(tmp_path / "two", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")
    assert out.count("3 cells trained fused") == 1  # the second process reports nothing
    for cell in ("f2-e2", "f4-e2", "f5-e6"):
        one = json.loads((tmp_path / "one" / "fula" / cell / "results.json").read_text())
        two = json.loads((tmp_path / "two" / "fula" / cell / "results.json").read_text())
        assert one["status"] == two["status"] == "ok" and one["config_hash"] != two["config_hash"]
        assert 0 < two["metrics"]["test/acc"] <= 1 and abs(two["metrics"]["test/acc"] - one["metrics"]["test/acc"]) < 0.1


def _diverge_in_one_process(rank: int, port: int, out: str) -> None:
    """One process of a two-process gloo run of a two-cell engine; in process 1 alone, the first
    loss of the second step turns NaN. Writes which cells failed, as this process saw it."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    front, end = _models()
    dm, batches, test_x = _data()
    engine = _engine(front, end, [(2, 4), (4, 7)], "fula", dm)
    real, calls = engine.objective.loss, []

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        calls.append(None)
        return value * float("nan") if rank == 1 and len(calls) == 3 else value  # two cells a step: step 1's first

    engine.objective.loss = loss
    results = _train(engine, batches, test_x, {"devices": 2, "strategy": "ddp", "max_epochs": 1})
    Path(out, f"rank{rank}.json").write_text(json.dumps({key: r["error"] is not None for key, r in results.items()}))


@pytest.mark.slow
def test_a_stitch_that_diverges_in_one_ddp_process_fails_in_all_of_them(tmp_path):
    """Each DDP process sees its own share of a batch, so one can meet a non-finite loss the other
    does not; the processes agree, and the first, which writes the records, records the failure."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=_diverge_in_one_process, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
        assert process.exitcode == 0
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1] and sorted(seen[0].values()) == [False, True], seen


def test_a_preset_sweep_on_a_launcher_becomes_one_job_per_grid_with_the_presets_axes_spent(monkeypatch, tmp_path):
    """A preset with its own sweep axes (lm_solu_gelu_small: 16 grids of 3 layers) on a launcher:
    the jobs' overrides name every grid's axes and compose with the preset's sweep emptied."""
    import sys

    from hydra import compose, initialize_config_dir

    import stitching.grid
    from stitching.build import CONF_DIR

    seen = {}

    def record():
        seen["argv"] = sys.argv[2:]

    monkeypatch.setattr(stitching.grid, "grid_job", record)
    assert stitching.grid.launch_grids(["experiment=lm_solu_gelu_small", "hydra/launcher=local"], tmp_path) == 0
    argv = seen["argv"]
    assert "front.seed=0,1" in argv and "end.seed=2,3" in argv and "grid.pairs=[[1,1],[2,2],[3,3]]" in argv
    one = [item.split(",")[0] if not item.split("=", 1)[-1].startswith("[") else item for item in argv]  # one job's
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        job = compose("config", overrides=["experiment=lm_solu_gelu_small", "hydra/launcher=local", *one],
                      return_hydra_config=True)
    assert not job.hydra.sweeper.params  # the preset's axes are the jobs' overrides, not swept again inside a job
