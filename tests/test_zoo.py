import subprocess
import sys
import textwrap

import pytest
import torch

from stitching.errors import StitchingError
from stitching.pretrain import main as pretrain_main
from stitching.zoo import ModelSpec, load_checkpoint

SPEC = ModelSpec(arch="resnet18", width=4, dataset="digits", seed=3)


def _zoo(tmp_path, *overrides):
    from stitching.build import build_zoo
    from tests.conftest import TINY, compose_config

    cfg = compose_config(*TINY, f"paths.zoo_dir={tmp_path}", "zoo.recipe.epochs=1", *overrides)
    return build_zoo(cfg)


def test_a_missing_model_is_trained_once_then_reused(tmp_path, capsys):
    zoo = _zoo(tmp_path)
    model, record = zoo.get(SPEC)
    assert "training base model resnet18-w4-digits-s3-e1" in capsys.readouterr().out
    assert 0.0 < record["test_acc"] <= 1.0 and record["spec"]["seed"] == 3
    assert zoo.path(SPEC).with_suffix(".json").is_file() and zoo.path(SPEC).name.startswith("resnet18-w4-digits-s3-e1-")
    mtime = zoo.path(SPEC).stat().st_mtime_ns
    again, record_again = zoo.get(SPEC)
    assert "training" not in capsys.readouterr().out
    assert zoo.path(SPEC).stat().st_mtime_ns == mtime and record_again == record
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert (a == b).all(), name


def test_training_a_base_model_leaves_the_callers_random_streams_alone(tmp_path):
    import random

    import numpy as np
    import torch

    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    _zoo(tmp_path).get(SPEC)  # trains (and seeds) inside
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_the_listing_shows_where_each_model_came_from(tmp_path, capsys):
    import torch

    from stitching.models.adapters import create
    from stitching.zoo import sha256

    zoo = _zoo(tmp_path)
    zoo.get(SPEC)
    weights = tmp_path / "given.safetensors"
    from safetensors.torch import save_file

    save_file(create("timm", "test_resnet", num_classes=10).state_dict(), str(weights))
    model, record = zoo.get(ModelSpec(arch="timm", width=None, dataset="digits", seed=0, name="test_resnet"),
                            str(weights))
    assert record["source"] == "file" and record["sha256"] == sha256(weights)
    listing = {r["key"]: r for r in zoo.list()}
    assert listing[zoo.path(SPEC).stem]["source"] == "trained here"
    assert listing[record["key"]]["sha256"] == sha256(weights) and listing[record["key"]]["path"] == str(weights)
    pretrain_main(["--list", *__import__("tests.conftest", fromlist=["TINY"]).TINY, f"paths.zoo_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "trained here" in out and "file" in out and sha256(weights)[:12] in out
    assert isinstance(model(torch.rand(1, 3, 16, 16)), torch.Tensor)


def test_seeds_give_different_models(tmp_path):
    zoo = _zoo(tmp_path)
    a, _ = zoo.get(SPEC)
    b, _ = zoo.get(ModelSpec(**{**SPEC.__dict__, "seed": 4}))
    assert not (a.blocks[0].conv.weight == b.blocks[0].conv.weight).all()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(StitchingError, match="cannot be read .*delete it to retrain"):
        load_checkpoint(path)


def test_concurrent_requests_train_the_model_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
        from tests.test_zoo import _zoo, SPEC
        from pathlib import Path
        model, record = _zoo(Path({str(tmp_path)!r})).get(SPEC)
        print("created", record["created"], record["test_acc"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum(out.count("[zoo] training base model") for out in outputs) == 1, outputs
    created = {line for out in outputs for line in out.splitlines() if line.startswith("created")}
    assert len(created) == 1  # both loaded the very same checkpoint
    assert not list(tmp_path.glob("*.tmp"))


def test_pretrain_cli_trains_and_lists(tmp_path, capsys):
    from tests.conftest import TINY

    overrides = [*TINY, f"paths.zoo_dir={tmp_path}", "zoo.recipe.epochs=1", "model.width=4"]
    pretrain_main(["--seeds", "5", "6", "--", *overrides])
    pretrain_main(["--list", "--", *overrides])
    out = capsys.readouterr().out
    assert "resnet18-w4-digits-s5-e1" in out and "resnet18-w4-digits-s6-e1" in out
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--", "model=nonexistent"])
    assert exit_info.value.code == 2
    assert "Could not find 'model/nonexistent'" in capsys.readouterr().err


def test_a_run_waits_for_the_lock_holder_and_then_trains(tmp_path, capsys):
    import threading
    import time

    from filelock import FileLock

    zoo = _zoo(tmp_path)
    holder = FileLock(str(zoo.path(SPEC)) + ".lock", thread_local=False)
    holder.acquire()
    worker = threading.Thread(target=zoo.get, args=(SPEC,))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive() and not zoo.path(SPEC).exists()  # blocked behind the holder
    holder.release()
    worker.join(timeout=120)
    out = capsys.readouterr().out
    assert f"waiting for another run to finish training {zoo.path(SPEC).name}" in out
    assert zoo.path(SPEC).is_file()


# -- a model's identity is everything that determined its weights ----------------------------
WEIGHTS_CHANGE = ["dataset.source.split_seed=1", "dataset.source.image_size=12", "dataset.source.test_fraction=0.3",
                  "dataset.source.channels=1", "dataset.augment.crop_padding=0", "dataset.augment.hflip=true",
                  "dataset.mean=[0.5,0.5,0.5]", "zoo.recipe.lr=0.5", "zoo.recipe.momentum=0.8",
                  "zoo.recipe.weight_decay=0.001", "zoo.recipe.batch_size=32", "trainer.precision=bf16-mixed",
                  "dataset.base_images=100"]
WEIGHTS_KEEP = ["dataset.num_workers=2", "dataset.batch_size=16", "dataset.train_subset=100",
                "dataset.num_classes_train=5", "dataset.attack_eps=0.1", "zoo.recipe.lr=0.1000",
                "zoo.recipe.robust.steps=3", "zoo.recipe.language.tokens=10", "zoo.recipe.transformer.lr=0.5"]


@pytest.mark.parametrize("override", WEIGHTS_CHANGE)
def test_every_setting_that_changes_the_weights_changes_the_models_name(tmp_path, override):
    before, after = _zoo(tmp_path).path(SPEC), _zoo(tmp_path, override).path(SPEC)
    assert before != after and after.name.startswith("resnet18-w4-digits") and "-s3-e1-" in after.name


def test_a_model_trained_on_part_of_the_split_says_so_and_saw_only_that_part(tmp_path):
    whole = _zoo(tmp_path).get(SPEC)[1]
    part = _zoo(tmp_path, "dataset.base_images=200").get(SPEC)[1]
    assert part["key"].startswith("resnet18-w4-digits200-s3-e1-") and part["identity"]["data"]["base_images"] == 200
    assert part["train_images"] == 200 and whole["train_images"] > 1000 and "base_images" not in whole["identity"]["data"]
    with pytest.raises(StitchingError, match=r"base_images=5000 for digits, but its training split has \d+ "
                                             r"images; set it below"):
        _zoo(tmp_path, "dataset.base_images=5000").get(SPEC)


@pytest.mark.parametrize("override", WEIGHTS_KEEP)
def test_settings_that_do_not_reach_a_base_model_keep_its_name(tmp_path, override):
    assert _zoo(tmp_path).path(SPEC) == _zoo(tmp_path, override).path(SPEC)


def test_the_robust_recipe_names_robust_models_only(tmp_path):
    robust = ModelSpec(**{**SPEC.__dict__, "robust": True})
    assert _zoo(tmp_path).path(robust) != _zoo(tmp_path, "zoo.recipe.robust.steps=3").path(robust)


def test_a_model_trained_on_another_split_is_never_reused(tmp_path):
    from stitching.build import build_datamodule
    from tests.conftest import TINY, compose_config

    split0, record0 = _zoo(tmp_path).get(SPEC)
    _, record1 = _zoo(tmp_path, "dataset.source.split_seed=1").get(SPEC)  # trained again, on its own split
    assert record1["key"] != record0["key"] and record1["identity"]["data"]["source"]["split_seed"] == 1
    assert record1["created"] >= record0["created"] and len(list(tmp_path.glob("resnet18-w4-digits-s3-e1-*.pt"))) == 2
    # and the two splits differ, so reusing split 0's model would have tested it on its own training data
    first = build_datamodule(compose_config(*TINY, "dataset.source.split_seed=0"), with_testbeds=False)
    second = build_datamodule(compose_config(*TINY, "dataset.source.split_seed=1"), with_testbeds=False)
    first.setup(), second.setup()
    assert not torch.equal(first.arrays.test_y, second.arrays.test_y) or not torch.equal(first.arrays.test_x, second.arrays.test_x)


def test_a_file_copied_over_another_models_name_is_refused(tmp_path):
    import shutil

    zoo = _zoo(tmp_path)
    zoo.get(SPEC)
    other = ModelSpec(**{**SPEC.__dict__, "seed": 4})
    shutil.copy(zoo.path(SPEC), zoo.path(other))
    with pytest.raises(StitchingError, match=r"holds another model than its name says \(spec.seed: 3 here, 4 wanted\)"):
        zoo.get(other)


def test_a_file_saved_before_identities_were_recorded_is_named_and_retrained(tmp_path, capsys):
    zoo = _zoo(tmp_path)
    zoo.get(SPEC)
    legacy = tmp_path / "resnet18-w4-digits-s3-e1.pt"
    zoo.path(SPEC).rename(legacy)
    strict = _zoo(tmp_path, "zoo.train_missing=false")
    with pytest.raises(StitchingError, match="was saved before zoo files recorded the data and recipe"):
        strict.get(SPEC)
    capsys.readouterr()
    zoo.get(SPEC)
    assert "[zoo] training resnet18-w4-digits-s3-e1-" in capsys.readouterr().out
