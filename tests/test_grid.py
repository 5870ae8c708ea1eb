"""The fused grid trainer: grouped BatchNorm equals separate BatchNorms, every fused cell equals
its own single run, and a grid's folder reports like a sweep's."""

import copy
import json

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


@pytest.mark.parametrize("update_bn,chunk", [(True, None), (False, None), (True, 2)])
@pytest.mark.parametrize("objective", ["hint", "fula", "tlm"])
def test_every_fused_cell_equals_its_own_run(objective, update_bn, chunk):
    """``chunk=2``: end layer 4's three stitches pass its tail as two chunks (2 + 1)."""
    from stitching.api import prepare_stitch
    from stitching.grid import FusedGrid

    front, end = _models()
    generator = torch.Generator().manual_seed(1)
    dm = torch.rand(24, 3, 16, 16, generator=generator)
    batches = [(torch.rand(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(4)]
    test_x = torch.rand(32, 3, 16, 16, generator=generator)
    pairs = [(2, 4), (4, 4), (6, 4), (4, 7)]
    settings = StitchSettings(1, 1, 24, update_bn, "shared", 1e-2, 1e-4)
    grid = FusedGrid(front, end, pairs, objective, dm, settings, num_classes=10, chunk=chunk)
    assert len(grid.tails) == (2 if chunk is None else 3)
    optimiser = grid.configure_optimizer()
    for x, y in batches:
        grid.train()
        optimiser.zero_grad()
        torch.stack([loss for _, group in grid.passes(x, y) for _, _, loss in group]).sum().backward()
        optimiser.step()
    for i, j in pairs:
        single = prepare_stitch(front, end, i, j, dm, objective, lr=1e-2, update_bn=update_bn).module
        single_optimiser = single.configure_optimizers()
        for x, y in batches:
            single.train()
            single_optimiser.zero_grad()
            single.loss(x, y)[0].backward()
            single_optimiser.step()
        fused = grid.cell_network(i, j, copy.deepcopy(end))
        for (name, a), b in zip(single.network.stitch.state_dict().items(), fused.stitch.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{objective} f{i}-e{j} {name}")
        for side in ("front", "end"):  # BN running statistics (the front up to the cut, the end tail)
            mine, theirs = _bn_state(getattr(single.network, side).model), _bn_state(getattr(fused, side).model)
            used = [k for k in mine if not torch.equal(mine[k], _bn_state(front if side == "front" else end)[k])]
            assert bool(used) == update_bn
            for key in used:
                torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6, msg=f"{side} {key}")
        with torch.no_grad():
            assert torch.equal(single.network.eval()(test_x).argmax(1), fused.eval()(test_x).argmax(1))


def test_a_fused_grid_writes_the_cells_a_sweep_would_and_reports_alike(tiny_config, tmp_path):
    """The command-line grid against the same cells as single runs: same accuracies and stitches,
    same report (self-accuracy, heatmap), and a rerun that keeps every finished cell."""
    from stitching.grid import cell_config, run_grid
    from stitching.report import report
    from stitching.runs import run

    cfg = tiny_config("objective=fula", "grid.pairs=[[1,1],[1,5],[5,1],[5,5]]", "trainer.limit_train_batches=3",
                      "trainer.max_epochs=2")
    summary = run_grid(cfg, tmp_path / "grid", progress=False)
    assert summary["fused"] and len(summary["done"]) == 4 and not summary["failed"]
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
    again = run_grid(cfg, tmp_path / "grid", progress=False)
    assert len(again["skipped"]) == 4 and not again["done"]


def test_a_sweep_becomes_one_grid_per_combination_of_the_other_axes():
    from stitching.grid import sweep_grids

    grids = sweep_grids(["experiment=sanity_small"])  # the preset's sweep: 2 end seeds × 4 objectives × 5 × 5 layers
    assert len(grids) == 8
    for rest, cells in grids:
        assert sorted(cells) == [(i, j) for i in (1, 3, 5, 7, 9) for j in (1, 3, 5, 7, 9)]
        assert not any(item.startswith("stitch.") for item in rest) and "experiment=sanity_small" in rest
    assert {tuple(sorted(item for item in rest if item.startswith(("objective", "end.seed")))) for rest, _ in grids} == \
        {(f"end.seed={s}", f"objective={o}") for s in (0, 1) for o in ("dm", "hint", "fula", "tlm")}
    (rest, cells), = sweep_grids(["experiment=demo", "objective=hint"])  # no layer key: the corresponding layers
    assert cells == "diagonal"
    override = sweep_grids(["experiment=sanity_small", "objective=tlm", "end.seed=1", "stitch.front_layer=2,4"])
    assert len(override) == 1 and sorted(override[0][1]) == [(i, j) for i in (2, 4) for j in (1, 3, 5, 7, 9)]


def test_the_grid_command_sweeps_fused_grids_and_reports_them(zoo_dir, tmp_path, capsys):
    from tests.conftest import TINY

    from stitching.grid import main
    from stitching.report import collect

    main(["-m", "--no-progress", "--out", str(tmp_path / "sweep"), *TINY, f"paths.zoo_dir={zoo_dir}",
          f"paths.output_dir={tmp_path}", "objective=dm,hint", "stitch.front_layer=1,3", "stitch.end_layer=1,3",
          "trainer.limit_train_batches=2"])
    assert capsys.readouterr().out.count("4 cells trained fused") == 2
    frame, failed = collect(tmp_path / "sweep")
    assert not failed and len(frame) == 8 and set(frame.objective) == {"dm", "hint"}
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), *TINY, "hydra/launcher=slurm"])
    assert "a fused grid trains in this process" in capsys.readouterr().err
