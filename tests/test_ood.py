"""Energy-based OOD detection on internal activations."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from stitching.models import split
from stitching.similarity.ood import (
    auroc,
    energy,
    energy_margin_loss,
    fit_energy_detector,
    fit_separate_detector,
    outlier_images,
)
from stitching.build import prepare
from stitching.runs import run


def test_energy_and_the_margin_loss_match_their_closed_forms():
    logits = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    expected = -torch.tensor([np.log(2.0), np.log(np.exp(3.0) + np.exp(1.0))], dtype=torch.float32)
    torch.testing.assert_close(energy(logits), expected)
    torch.testing.assert_close(energy(logits, temperature=2.0), -2 * torch.logsumexp(logits / 2, 1))
    labels = torch.tensor([0, 0])
    # in-energies −0.69 and −3.13 are above m_in = −25: squared hinges; out-energy −3.13 is above m_out = −7: none
    e_in = expected
    by_hand = (torch.nn.functional.cross_entropy(logits, labels)
               + 0.1 * ((e_in + 25) ** 2).mean() + 0.1 * torch.relu(-7 - expected[1:]).pow(2).mean())
    torch.testing.assert_close(energy_margin_loss(logits, labels, logits[1:]), by_hand)
    assert float(energy_margin_loss(logits, labels, logits[1:], m_in=10.0, m_out=-100.0)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)))


def test_auroc_matches_sklearn_including_ties():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, generator=g) + 1, torch.randn(70, generator=g)
    labels = np.r_[np.ones(50), np.zeros(70)]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(labels, torch.cat([pos, neg]).numpy()), rel=1e-12)
    pos, neg = torch.randint(0, 4, (40,), generator=g).float(), torch.randint(0, 3, (30,), generator=g).float()
    labels = np.r_[np.ones(40), np.zeros(30)]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(labels, torch.cat([pos, neg]).numpy()), rel=1e-12)
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5


def test_patch_shuffle_keeps_the_pixels_and_moves_the_patches():
    images = torch.rand(3, 3, 16, 16)
    shuffled = outlier_images(images, "patch_shuffle", seed=1)
    assert shuffled.shape == images.shape and not torch.equal(shuffled, images)
    torch.testing.assert_close(shuffled.flatten(1).sort(1).values, images.flatten(1).sort(1).values)
    torch.testing.assert_close(outlier_images(images, "patch_shuffle", seed=1), shuffled)


def test_the_detector_separates_outliers_and_not_native_from_native(tiny_config):
    prep = prepare(tiny_config("objective=dm", "stitch.layer=3"))
    data = prep.datamodule
    images, labels = data.arrays.train_x.float().div(255), data.arrays.train_y
    detector = fit_energy_detector(prep.end, 3, images, labels, outlier_images(images, "noise", seed=0),
                                   epochs=2, batch_size=64)
    test, _ = data.test_tensors()
    head, _ = split(prep.end, 3)
    with torch.no_grad():
        native = detector.score(head.eval()(test)[0])
        outliers = detector.score(head(outlier_images(test, "noise", seed=5))[0])
    assert auroc(outliers, native) > 0.9
    half = len(native) // 2
    assert abs(auroc(native[:half], native[half:]) - 0.5) < 0.1


def test_the_separate_detector_is_a_new_network_that_learns_the_activations_and_rejects_outliers(tiny_config):
    prep = prepare(tiny_config("objective=dm", "stitch.layer=3"))
    data = prep.datamodule
    images, labels = data.arrays.train_x[:800].float().div(255), data.arrays.train_y[:800]
    before = {k: v.clone() for k, v in prep.end.state_dict().items()}
    detector = fit_separate_detector(prep.end, 3, images, labels, outlier_images(images, "noise", seed=0),
                                     num_classes=10, width=8, pretrain_epochs=3, epochs=2, batch_size=64)
    assert all(torch.equal(before[k], v) for k, v in prep.end.state_dict().items())  # the end model is untouched
    _, tail = split(prep.end, 3)
    tail_ids = {id(p) for p in tail.parameters()}
    assert not tail_ids & {id(p) for p in detector.parameters()}  # its own weights, not the end tail's
    test, test_labels = data.test_tensors()
    head, _ = split(prep.end, 3)
    with torch.no_grad():
        native = head.eval()(test)[0]
        outliers = head(outlier_images(test, "noise", seed=5))[0]
    accuracy = (detector.logits(native).argmax(1) == test_labels).float().mean()
    assert accuracy > 0.5  # it classifies the activations it guards (10 classes: chance 0.1)
    assert auroc(detector.score(outliers), detector.score(native)) > 0.9
    # the same seed gives the same detector (initialisation and batches)
    again = fit_separate_detector(prep.end, 3, images, labels, outlier_images(images, "noise", seed=0),
                                  num_classes=10, width=8, pretrain_epochs=3, epochs=2, batch_size=64)
    assert torch.equal(again.score(native), detector.score(native))


def test_a_separate_detector_needs_its_settings_and_they_need_it(tiny_config):
    from stitching.build import read_settings
    from stitching.errors import StitchingError

    with pytest.raises(StitchingError, match="detector=separate trains a new network: set evaluation.ood.pretrain_epochs "
                                             "and evaluation.ood.width"):
        read_settings(tiny_config("evaluation.ood.enabled=true", "evaluation.ood.detector=separate"))
    with pytest.raises(StitchingError, match="evaluation.ood.width=16 applies to evaluation.ood.detector=separate only"):
        read_settings(tiny_config("evaluation.ood.enabled=true", "evaluation.ood.width=16"))
    with pytest.raises(StitchingError, match="evaluation.ood.detector=energy is out of range: it must be separate or tail"):
        read_settings(tiny_config("evaluation.ood.detector=energy"))


def test_a_stitching_run_reports_ood_auroc_and_caches_the_detector(tiny_config, tmp_path, zoo_dir):
    overrides = ("objective=tlm", "stitch.layer=3", "evaluation.ood.enabled=true", "evaluation.ood.epochs=1",
                 "evaluation.ood.eval_images=200", "evaluation.ood.heldout=noise")
    record = run(tiny_config(*overrides), tmp_path / "a")
    metrics = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["ood/auroc"] <= 1.0 and 0.0 <= metrics["ood/auroc_outliers"] <= 1.0
    assert 0.0 <= metrics["ood/auroc_heldout"] <= 1.0  # a family the detector never saw in fitting
    assert record["evaluation"]["ood"]["end_layer"] == 3
    cached = sorted(zoo_dir.glob("*.ood-l3-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = run(tiny_config(*overrides), tmp_path / "b")
    assert cached[0].stat().st_mtime_ns == stamp  # the second run reused the detector
    assert again["metrics"]["ood/auroc_outliers"] == pytest.approx(metrics["ood/auroc_outliers"])
    # the same settings on other training data (a subset, a class split): another detector, never the cached one
    run(tiny_config(*overrides, "dataset.train_subset=300"), tmp_path / "c")
    run(tiny_config(*overrides, "dataset.num_classes_train=5"), tmp_path / "d")
    assert len(set(zoo_dir.glob("*.ood-l3-*.pt"))) == 3 and cached[0].stat().st_mtime_ns == stamp
    # a separate detector is another file, read back by a second run
    separate = (*overrides, "evaluation.ood.detector=separate", "evaluation.ood.pretrain_epochs=1",
                "evaluation.ood.width=8")
    first = run(tiny_config(*separate), tmp_path / "e")
    assert len(set(zoo_dir.glob("*.ood-l3-*.pt"))) == 4 and 0.0 <= first["metrics"]["ood/detector_acc"] <= 1.0
    second = run(tiny_config(*separate), tmp_path / "f")
    assert len(set(zoo_dir.glob("*.ood-l3-*.pt"))) == 4
    assert second["metrics"]["ood/auroc_outliers"] == pytest.approx(first["metrics"]["ood/auroc_outliers"])


def test_the_report_draws_ood_auroc_over_a_front_by_end_grid(tmp_path):
    from stitching.report import report

    for front in (2, 3):
        for end in (2, 3):
            folder = tmp_path / f"f{front}e{end}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps({
                "status": "ok", "objective": "tlm", "front_layer": front, "end_layer": end,
                "metrics": {"test/acc": 0.9, "ood/auroc": 0.5 + 0.1 * abs(front - end)},
                "timings": {"total_s": 1}, "config": {},
                "base": {"front": {"test_acc": 0.9, "key": "f"}, "end": {"test_acc": 0.9, "key": "e"}}}))
    made = report(tmp_path)
    assert made["ood_heatmap"].is_file() and made["ood_heatmap"].name == "heatmap_ood_auroc.png"
    assert set(made["self_accuracy"]["all"]) == {"tlm"}  # the accuracy grid's, never the AUROC grid's
