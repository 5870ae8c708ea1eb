"""Stitching end to end on tiny real configs (digits, narrow ResNet18, CPU)."""

import json

import pytest
import torch

from stitching.errors import StitchingError
from stitching.models import cut_point_activations
from stitching.objectives import hint_loss
from stitching.engine import fit_engine
from stitching.build import prepare
from stitching.runs import run

RECORD_KEYS = {"status", "objective", "front_layer", "end_layer", "metrics", "base", "stitch", "timings",
               "versions", "config"}


@pytest.mark.parametrize("objective", ["dm", "hint", "fula", "slm", "tlm"])
def test_each_objective_trains_and_writes_a_complete_record(tiny_config, tmp_path, objective):
    record = run(tiny_config(f"objective={objective}", "stitch.layer=4"), tmp_path / objective)
    saved = json.loads((tmp_path / objective / "results.json").read_text())
    assert RECORD_KEYS <= set(saved) and saved["status"] == "ok"
    assert saved["objective"] == objective and saved["front_layer"] == saved["end_layer"] == 4
    assert 0.0 <= saved["metrics"]["test/acc"] <= 1.0
    assert {"train/loss", "train/acc"} <= set(saved["metrics"]) or objective == "dm"
    assert "-s0-e4-" in saved["base"]["front"]["key"] and "-s1-e4-" in saved["base"]["end"]["key"]
    assert 0.0 < saved["base"]["end"]["test_acc"] <= 1.0
    assert {"zoo_s", "dm_init_s", "fit_s", "test_s", "total_s"} <= set(saved["timings"])
    assert saved["config"]["objective"]["name"] == objective and saved["versions"]["torch"]
    assert saved["versions"]["threads"] == str(torch.get_num_threads())  # the float order the numbers came from
    assert (tmp_path / objective / "stitch.pt").is_file()
    assert record["metrics"] == saved["metrics"]


@pytest.mark.parametrize("layer", [1, 5, 9])
def test_dm_self_stitch_reproduces_the_model(tiny_config, tmp_path, layer):
    cfg = tiny_config("objective=dm", "end.seed=0", f"stitch.layer={layer}")
    prep = prepare(cfg)
    # the stitch is (numerically) the identity, so hint and fula losses vanish
    x = prep.datamodule.sample_train_images(64, seed=5)
    with torch.no_grad():
        _, targets = cut_point_activations(prep.engine.reference, x)
        targets = targets[layer - 1:]
        logits, stitched = prep.network.eval()(x, return_features=True)
    assert hint_loss(stitched[0], targets[0]).item() < 1e-3
    from stitching.objectives import fula_loss, fula_weights
    assert fula_loss(stitched, targets, fula_weights("uniform", len(targets))).item() < 1e-3
    record = run(cfg, tmp_path / "dm")
    assert abs(record["metrics"]["test/acc"] - record["base"]["end"]["test_acc"]) <= 0.005


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("update_bn", [True, False])
def test_front_and_end_stay_frozen_while_the_stitch_trains(tiny_config, tmp_path, update_bn):
    cfg = tiny_config("objective=fula", "stitch.layer=3", f"stitch.update_bn={update_bn}")
    prep = prepare(cfg)
    network = prep.network
    front, end, stitch = _snapshot(network.front), _snapshot(network.end), _snapshot(network.stitch)
    reference = _snapshot(prep.engine.reference)
    fit_engine(prep.engine, prep.datamodule.train_dataloader(), prep.datamodule.test_dataloader(), dict(cfg.trainer),
               run_dir=tmp_path)

    for before, part in ((front, network.front), (end, network.end), (reference, prep.engine.reference)):
        for name, tensor in part.named_parameters():
            assert torch.equal(tensor, before[name]), f"parameter {name} changed"
    buffers_changed = [name for part, before in ((network.front, front), (network.end, end))
                       for name, tensor in part.named_buffers()
                       if "running" in name and not torch.equal(tensor, before[name])]
    if update_bn:
        assert buffers_changed, "running statistics should follow the stitching data"
    else:
        assert not buffers_changed
    for name, tensor in prep.engine.reference.named_buffers():
        assert torch.equal(tensor, reference[name]), "the reference end model must stay untouched"
    assert any(not torch.equal(t, stitch[n]) for n, t in network.stitch.state_dict().items())
    optimizer = prep.engine.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in network.stitch.parameters()}


def test_fula_targets_are_the_end_models_own_activations(tiny_config, monkeypatch):
    prep = prepare(tiny_config("objective=fula", "stitch.layer=6"))
    x = prep.datamodule.sample_train_images(8)
    seen, real = [], prep.engine.objective.loss

    def spy(stitched, logits, targets, *rest, **kwargs):
        seen.append(targets)
        return real(stitched, logits, targets, *rest, **kwargs)

    monkeypatch.setattr(prep.engine.objective, "loss", spy)
    for _ in prep.engine._passes(x, torch.zeros(len(x), dtype=torch.long), train=True):
        pass
    targets = seen[0]
    with torch.no_grad():
        _, own = cut_point_activations(prep.end.eval(), x)
    assert len(targets) == 4
    for got, want in zip(targets, own[5:]):
        torch.testing.assert_close(got, want)


def test_cross_layer_stitch_resizes_front_maps(tiny_config, tmp_path):
    record = run(tiny_config("objective=hint", "stitch.front_layer=2", "stitch.end_layer=8"), tmp_path)
    assert record["stitch"]["out_size"] == [2, 2] and record["stitch"]["in_channels"] == 8
    assert record["stitch"]["out_channels"] == 64
    assert record["stitch"]["dm_rows"] == 100 * 2 * 2  # 100 DM samples × the end map's 2×2 positions


@pytest.mark.parametrize("overrides, message", [
    (["stitch.layer=12"], "layer 12 is out of range"),
    (["stitch.front_layer=layer7.0"], "unknown layer 'layer7.0'"),
    (["front.arch=vgg11"], "unknown architecture 'vgg11'"),
    (["front.dataset=imagenet21k"], "unknown dataset 'imagenet21k'"),
    (["objective=fula", "objective.weights=[0.5,-0.5,1,0,0]"], "non-negative"),
    (["objective=fula", "objective.weights=[1,1]"], "has 2 entries but this end layer has 5 hint terms"),
    (["front.checkpoint=/nowhere/model.pt"], "checkpoint /nowhere/model.pt does not exist"),
    (["zoo.train_missing=false", "front.seed=77"], "no base model resnet18-w8-digits-s77-e4-"),
    (["dataset.num_classes_train=11"], "num_classes_train=11 must lie in 1..10"),
])
def test_bad_input_gets_a_clear_error(tiny_config, tmp_path, overrides, message):
    with pytest.raises(StitchingError, match=message.replace("[", r"\[").replace(".", r"\.")):
        run(tiny_config("stitch.layer=5", *overrides), tmp_path)


def test_incompatible_pair_is_refused(tiny_config, tmp_path, zoo_dir):
    # an end model with 5 classes cannot be stitched on 10-class data
    from stitching.models import build_model
    bad = build_model("resnet18", num_classes=5, width=8)
    record = {"key": "five-classes", "test_acc": 0.0,
              "model_kwargs": {"arch": "resnet18", "num_classes": 5, "width": 8}}
    path = tmp_path / "five.pt"
    torch.save({"record": record, "state_dict": bad.state_dict()}, path)
    with pytest.raises(StitchingError, match="end model predicts 5 classes but digits has 10"):
        run(tiny_config(f"end.checkpoint={path}"), tmp_path / "run")


def test_cross_task_front_from_another_dataset(tiny_config, tmp_path):
    # front trained on MNIST-5k (32×32), end and stitching data on digits (16×16)
    record = run(tiny_config("objective=fula", "front.dataset=mnist5k", "zoo.recipe.epochs=1",
                             "stitch.layer=7"), tmp_path)
    assert record["base"]["front"]["key"].startswith("resnet18-w8-mnist5k-s0-e1-")
    assert record["base"]["end"]["key"].startswith("resnet18-w8-digits-s1-e1-")
    assert record["base"]["front"]["dataset"] == "mnist5k" and record["status"] == "ok"


def test_wandb_logger_runs_offline_without_a_key(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(tiny_config("objective=tlm", "logger=wandb", "stitch.layer=8"), tmp_path)
    assert record["status"] == "ok"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_run_does_not_depend_on_whether_base_models_were_cached(tiny_config, tmp_path):
    fresh = run(tiny_config("objective=tlm", "stitch.layer=6", f"paths.zoo_dir={tmp_path / 'zoo'}"), tmp_path / "a")
    cached = run(tiny_config("objective=tlm", "stitch.layer=6", f"paths.zoo_dir={tmp_path / 'zoo'}"), tmp_path / "b")
    assert fresh["metrics"] == cached["metrics"]


def test_a_loss_that_turns_nan_fails_the_run_at_that_step(tiny_config, tmp_path, monkeypatch):
    from stitching.errors import NonFiniteError
    from stitching.objectives import losses

    calls = {"n": 0}
    real = losses.hint_loss

    def nan_at_step_three(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss  # steps 0, 1, 2 fine; step 3 NaN

    monkeypatch.setattr(losses, "hint_loss", nan_at_step_three)
    with pytest.raises(NonFiniteError, match="the loss became nan at training step 3"):
        run(tiny_config("objective=hint", "stitch.layer=3"), tmp_path / "nan")
    assert not (tmp_path / "nan" / "results.json").exists()  # never an ok record


def test_a_loss_non_finite_from_the_first_step_fails_the_run_under_a_loss_scaler(tiny_config, tmp_path, monkeypatch):
    """Under fp16 mixed precision on a GPU, Lightning steps through a loss scaler, which refuses a
    step that no scaled loss preceded; a window whose every loss is non-finite must record the
    failure, not crash. The stitch trains under Lightning's fp16 mixed precision with torch's own
    scaler, on the CPU (where Lightning itself would pick bf16 and no scaler): the GPU's path."""
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    from stitching import engine
    from stitching.errors import NonFiniteError
    from stitching.objectives import losses

    real_build = engine.build_trainer

    def with_a_scaler(*args, **kwargs):  # the stitch's trainers only: the base models stay the zoo's
        trainer = real_build(*args, **kwargs)
        trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        return trainer

    monkeypatch.setattr(engine, "build_trainer", with_a_scaler)
    monkeypatch.setattr(losses, "hint_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteError, match="the loss became nan at training step 0"):
        run(tiny_config("objective=hint", "stitch.layer=3", "trainer.limit_test_batches=1"), tmp_path / "nan")
    assert not (tmp_path / "nan" / "results.json").exists()


def test_a_stitch_weight_that_turns_non_finite_fails_the_run(tiny_config, tmp_path, monkeypatch):
    from stitching.errors import NonFiniteError
    from stitching.engine import StitchEngine

    def infinite_gradient(self, optimizer):  # a finite loss whose gradient overflows: Adam turns the weights to NaN
        for parameter in self.stitches.parameters():
            parameter.grad.fill_(float("inf"))

    monkeypatch.setattr(StitchEngine, "on_before_optimizer_step", infinite_gradient)
    with pytest.raises(NonFiniteError, match="stitch weight .* became (nan|inf|-inf) at training step 0"):
        run(tiny_config("objective=tlm", "stitch.layer=3"), tmp_path / "inf")


def test_a_local_parallel_job_gets_its_share_of_the_cores(monkeypatch):
    import torch

    from stitching.train import share_threads

    before = torch.get_num_threads()
    try:
        assert share_threads(2, cores=8) == 4 and torch.get_num_threads() == 4
        assert share_threads(3, cores=2) == 1 and torch.get_num_threads() == 1  # never below one thread
        assert share_threads(-1, cores=4) == 1  # joblib's -1: a job per core
        assert share_threads(1, cores=8) is None and share_threads(None) is None
    finally:
        torch.set_num_threads(before)


def test_the_train_entry_point_imports_neither_torch_nor_lightning():
    """A sweep's launcher process imports only Hydra; each job imports torch and Lightning itself,
    so local parallel jobs pay that start-up side by side."""
    import subprocess
    import sys

    probe = "import sys, stitching.train; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
