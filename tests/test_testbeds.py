"""The FuLA testbeds: attacks, shortcuts, class subsets."""

import json

import cv2
import numpy as np
import pytest
import torch

from stitching.attacks import autoattack_accuracy, mix_adversarial, pgd, pgd_settings
from stitching.data.shortcuts import Shortcut, aruco_bits, class_colours
from stitching.errors import StitchingError
from stitching.evaluate import pgd_accuracy, predictions
from stitching.build import build_zoo, compose_config, prepare
from stitching.zoo import ModelSpec
from stitching.runs import run

EPS = 8 / 255
ATTACK = {"eps": EPS, "step_size": 2 / 255, "steps": 10, "random_start": True}


@pytest.fixture()
def trained(tiny_config):
    """A trained tiny digits model (from the session zoo) and 120 test images."""
    prep = prepare(tiny_config("objective=dm"))
    images, labels = prep.datamodule.test_tensors(120)
    return prep.end.eval(), images, labels


def test_pgd_stays_in_the_eps_ball_and_the_image_range(trained):
    model, images, labels = trained
    x_adv = pgd(model, images, labels, **ATTACK)
    assert (x_adv - images).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv - images).abs().max().item() > EPS / 2  # it did move


def test_pgd_lowers_accuracy_and_leaves_the_model_untouched(trained):
    model, images, labels = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = (predictions(model, images, "cpu") == labels).float().mean().item()
    robust = pgd_accuracy(model, images, labels, "cpu", ATTACK)
    assert robust < clean - 0.2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.slow  # ~75 s on 2 cores: the fast suite keeps CI well under 20 minutes
def test_autoattack_is_at_least_as_strong_as_pgd(trained):
    model, images, labels = trained
    x, y = images[:40], labels[:40]
    weak = {**ATTACK, "eps": 2 / 255}  # leave PGD something to miss
    pgd_acc = pgd_accuracy(model, x, y, "cpu", weak)
    aa_acc = autoattack_accuracy(model, x, y, eps=2 / 255, version="rand")
    assert aa_acc <= pgd_acc
    with pytest.raises(StitchingError, match="autoattack_version='fast'"):
        autoattack_accuracy(model, x, y, version="fast")


@pytest.mark.slow
def test_robust_base_model_keeps_more_accuracy_under_pgd(tiny_config):
    budget = "zoo.recipe.robust.eps=0.03137254901960784"  # 8/255: a few epochs make it measurably robust
    plain = prepare(tiny_config("objective=dm", "end.seed=2", "zoo.recipe.epochs=6"))
    robust = prepare(tiny_config("objective=dm", "end.seed=2", "end.robust=true", "zoo.recipe.epochs=6", budget))
    assert "-s2-robust-e6-" in robust.end_record["key"]  # the 8/255 budget keeps the plain name
    assert robust.end_record["recipe"]["robust"] == {"alpha": 0.5, "eps": pytest.approx(8 / 255),
                                                    "step_size": pytest.approx(2 / 255), "steps": 10,
                                                    "random_start": True}
    images, labels = plain.datamodule.test_tensors(200)
    torch.manual_seed(0)
    plain_acc = pgd_accuracy(plain.end.eval(), images, labels, "cpu", ATTACK)
    torch.manual_seed(0)
    robust_acc = pgd_accuracy(robust.end.eval(), images, labels, "cpu", ATTACK)
    assert robust_acc > plain_acc + 0.05, (robust_acc, plain_acc)


def test_attack_budget_defaults_to_the_datasets_standard_and_an_override_wins():
    def attack(*overrides):
        return pgd_settings(compose_config(["logger=none", *overrides]).attack)

    assert attack("dataset=mnist5k") == {"eps": 0.3, "step_size": pytest.approx(0.075), "steps": 10,
                                         "random_start": True}  # Madry et al.'s MNIST budget, step 2.5·ε/steps
    assert attack("dataset=digits")["eps"] == 0.3
    for name in ("cifar10", "svhn"):  # the FuLA paper's 8/255 with 2/255 steps
        assert attack(f"dataset={name}") == {"eps": pytest.approx(8 / 255), "step_size": pytest.approx(2 / 255),
                                             "steps": 10, "random_start": True}
    assert attack("dataset=mnist5k", "attack.eps=0.1")["eps"] == 0.1
    assert attack("dataset=mnist5k", "attack.eps=0.1", "attack.steps=5")["step_size"] == pytest.approx(0.05)
    assert attack("dataset=cifar10", "attack.step_size=0.001")["step_size"] == 0.001


def test_robust_models_train_at_their_datasets_budget_and_their_name_says_so(tiny_config):
    zoo = build_zoo(tiny_config())
    digits = ModelSpec("resnet18", 8, "digits", 2, robust=True)
    assert zoo.robust_recipe(digits)["eps"] == 0.3 and zoo.robust_recipe(digits)["step_size"] == pytest.approx(0.075)
    assert zoo.path(digits).name.startswith("resnet18-w8-digits-s2-robust0.3-e4-")
    cifar = ModelSpec("resnet18", 8, "cifar10", 2, robust=True)
    assert zoo.robust_recipe(cifar)["eps"] == pytest.approx(8 / 255)
    assert zoo.path(cifar).name.startswith("resnet18-w8-cifar10-s2-robust-e4-")
    assert zoo.path(ModelSpec("resnet18", 8, "digits", 2)).name.startswith("resnet18-w8-digits-s2-e4-")


def test_adversarial_stitching_replaces_the_configured_share():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))
    half = mix_adversarial(model, x, y, 0.5, **ATTACK)
    changed = (half != x).flatten(1).any(1)
    assert changed.sum().item() == 4
    assert (mix_adversarial(model, x, y, 1.0, **ATTACK) != x).flatten(1).any(1).all()
    assert torch.equal(mix_adversarial(model, x, y, 0.0, **ATTACK), x)


# -- shortcuts ---------------------------------------------------------------------------

def _marked_window(original, marked):
    rows, cols = torch.nonzero((marked != original).any(0), as_tuple=True)
    return rows.min().item(), cols.min().item(), rows.max().item(), cols.max().item()


@pytest.mark.parametrize("kind", ["pixels", "aruco"])
def test_both_places_the_class_marker_at_the_class_location(kind):
    shortcut = Shortcut(kind, "both", num_classes=10, image_size=32, seed=0)
    image = torch.full((3, 32, 32), 0.5)
    for label in range(10):
        marked = shortcut(image, label, index=label * 7)
        top, left = shortcut.locations[label].tolist()
        patch = marked[:, top : top + 4, left : left + 4]
        if kind == "pixels":
            assert torch.equal(patch, class_colours(10)[label][:, None, None].expand(3, 4, 4))
        else:
            assert torch.equal(patch[0], torch.from_numpy(aruco_bits(label)))
        outside = marked.clone()
        outside[:, top : top + 4, left : left + 4] = 0.5
        assert torch.equal(outside, image)  # nothing else changed
    assert len({tuple(loc) for loc in shortcut.locations.tolist()}) == 10  # distinct class locations


def test_pattern_places_the_class_marker_at_random_locations():
    shortcut = Shortcut("pixels", "pattern", num_classes=10, image_size=32, seed=0)
    image = torch.zeros(3, 32, 32)
    corners = set()
    for index in range(30):
        marked = shortcut(image, 3, index)
        top, left, bottom, right = _marked_window(image, marked)
        assert (bottom - top, right - left) == (3, 3)
        assert torch.equal(marked[:, top : top + 4, left : left + 4], shortcut.markers[3])
        corners.add((top, left))
    assert len(corners) > 20


def test_location_places_noise_at_the_class_location():
    shortcut = Shortcut("pixels", "location", num_classes=10, image_size=32, seed=0)
    image = torch.zeros(3, 32, 32)
    top, left = shortcut.locations[6].tolist()
    patches = [shortcut(image, 6, index)[:, top : top + 4, left : left + 4] for index in range(5)]
    for patch in patches:
        assert patch.min() >= 0 and patch.max() <= 1 and patch.std() > 0.1
    assert not torch.equal(patches[0], patches[1])  # fresh noise per image
    rest = shortcut(image, 6, 0).clone()
    rest[:, top : top + 4, left : left + 4] = 0
    assert torch.equal(rest, image)


def test_shortcuts_are_deterministic_per_seed():
    image = torch.rand(3, 32, 32)
    a = Shortcut("aruco", "pattern", num_classes=10, image_size=32, seed=1)
    b = Shortcut("aruco", "pattern", num_classes=10, image_size=32, seed=1)
    c = Shortcut("aruco", "pattern", num_classes=10, image_size=32, seed=2)
    assert torch.equal(a(image, 4, 17), b(image, 4, 17))
    assert not torch.equal(a(image, 4, 17), c(image, 4, 17))
    assert torch.equal(Shortcut("pixels", "both", 10, 32, seed=5).locations, Shortcut("pixels", "both", 10, 32, seed=5).locations)
    assert not torch.equal(Shortcut("pixels", "both", 10, 32, seed=5).locations, Shortcut("pixels", "both", 10, 32, seed=6).locations)


@pytest.mark.parametrize("label", range(10))
def test_aruco_markers_decode_to_their_class(label):
    shortcut = Shortcut("aruco", "both", num_classes=10, image_size=32, seed=0)
    bits = shortcut.markers[label][0].numpy()
    marker = np.zeros((6, 6), dtype=np.uint8)  # restore the black border, then render large
    marker[1:5, 1:5] = (bits * 255).astype(np.uint8)
    large = np.kron(marker, np.ones((20, 20), dtype=np.uint8))
    canvas = np.full((200, 200), 255, dtype=np.uint8)
    canvas[40:160, 40:160] = large
    detector = cv2.aruco.ArucoDetector(cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50))
    _, ids, _ = detector.detectMarkers(canvas)
    assert ids is not None and ids.flatten().tolist() == [label]


def test_bad_shortcut_settings_are_refused():
    with pytest.raises(StitchingError, match="shortcut.kind='stripes'"):
        Shortcut("stripes", "both", 10, 32)
    with pytest.raises(StitchingError, match="placement='corner'"):
        Shortcut("pixels", "corner", 10, 32)
    with pytest.raises(StitchingError, match="hold only 4 distinct"):
        Shortcut("pixels", "both", 10, 8)


# -- what results.json reports ---------------------------------------------------------------

def test_results_report_each_testbed(tiny_config, tmp_path):
    record = run(tiny_config("objective=hint", "stitch.layer=6", "attack=pgd", "attack.eval_images=60",
                             "attack.alpha=0.5", "shortcut=pixels", "dataset.num_classes_train=4"), tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    metrics = saved["metrics"]
    for key in ("test/acc", "test/acc_shortcut", "test/acc_seen_classes", "test/acc_unseen_classes",
                "test/robust_acc/pgd"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert saved["evaluation"]["attacks"]["pgd"]["images"] == 60
    assert saved["evaluation"]["adversarial_stitching"]["alpha"] == 0.5
    assert saved["evaluation"]["shortcut"]["kind"] == "pixels" and saved["evaluation"]["num_classes_train"] == 4
    assert "robust_acc/pgd" in saved["base"]["end"] and "robust_acc/pgd" in saved["base"]["front"]
    example = saved["evaluation"]["shortcut_examples"]
    assert example.endswith("digits-pixels-both-s0.png") and __import__("pathlib").Path(example).is_file()
    assert record["metrics"] == metrics
    # a clean run reports none of it
    clean = run(tiny_config("objective=hint", "stitch.layer=6"), tmp_path / "c")
    assert set(clean["metrics"]) == {"test/acc", "test/loss", "train/loss", "train/acc"}


@pytest.mark.slow
def test_results_report_autoattack(tiny_config, tmp_path):
    record = run(tiny_config("objective=dm", "attack=autoattack", "attack.eval_images=30"), tmp_path)
    assert record["evaluation"]["attacks"]["autoattack"] == {"images": 30, "eps": 0.3, "version": "rand", "norm": "Linf"}
    assert record["metrics"]["test/robust_acc/autoattack"] <= record["metrics"]["test/acc"]
    assert "robust_acc/autoattack" in record["base"]["end"]


@pytest.mark.slow
def test_tlm_relies_on_a_shortcut_it_is_trained_with(tmp_path):
    """Embedded data, seeded: TLM under a `both` shortcut beats its clean accuracy on marked data."""
    from tests.conftest import compose_config

    cfg = compose_config("dataset=mnist5k", "model=resnet18_narrow", "model.width=8", "zoo.recipe.epochs=3",
                         "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none",
                         "objective=tlm", "shortcut=pixels", "shortcut.placement=both", "stitch.layer=3",
                         "dataset.train_subset=1500", f"paths.zoo_dir={tmp_path / 'zoo'}",
                         f"paths.output_dir={tmp_path}")
    record = run(cfg, tmp_path / "run")
    metrics = record["metrics"]
    print("TLM shortcut", metrics["test/acc_shortcut"], "clean", metrics["test/acc"])
    assert metrics["test/acc_shortcut"] > metrics["test/acc"]
