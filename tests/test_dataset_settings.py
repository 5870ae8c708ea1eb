"""``datasets.<name>.*``: the settings of a dataset that is not the run's own (a side's data in
cross-task stitching, an outlier set) reach that dataset, and a key that would not is refused."""

from __future__ import annotations

import pytest
import torch

from stitching.build import build_datamodule, build_zoo, dataset_config, read_settings
from stitching.errors import StitchingError
from stitching.validation import RULES, STITCHING_ONLY


def test_a_side_dataset_override_reaches_its_data_and_its_base_model_identity(tiny_config):
    plain = tiny_config("front.dataset=mnist5k")
    given = tiny_config("front.dataset=mnist5k", "+datasets.mnist5k.source.image_size=16",
                        "+datasets.mnist5k.augment.crop_padding=2")
    read_settings(given)
    options = dataset_config(given, "mnist5k")
    assert options["source"]["image_size"] == 16 and options["augment"]["crop_padding"] == 2
    assert options["source"]["test_fraction"] == dataset_config(plain, "mnist5k")["source"]["test_fraction"]
    data = build_datamodule(given, "mnist5k", with_testbeds=False)
    data.setup()
    assert tuple(data.arrays.train_x.shape[-2:]) == (16, 16)  # the images the front model trains on
    # a base model trained on other data is another model: its zoo file is never the plain one's
    front = read_settings(given).front.spec
    assert build_zoo(given).path(front) != build_zoo(plain).path(front)
    # the run's own dataset is untouched
    assert dataset_config(given, "digits") == dataset_config(plain, "digits")


@pytest.mark.parametrize("overrides, message", [
    (["+datasets.imagenet21k.batch_size=4"], "datasets.imagenet21k: unknown dataset 'imagenet21k'"),
    (["+datasets.digits.batch_size=4"], "datasets.digits names the run's own dataset: set its settings as dataset."),
    (["+datasets.cifar10.augment.hflip=false"], "datasets.cifar10 applies to no dataset this run reads"),
    (["front.dataset=mnist5k", "+datasets.mnist5k.colour=1"], "datasets.mnist5k.colour is not a setting of dataset "
                                                              "mnist5k"),
    (["front.dataset=mnist5k", "+datasets.mnist5k.source.size=1"], "datasets.mnist5k.source.size is not a setting"),
    (["front.dataset=mnist5k", "+datasets.mnist5k.name=cifar10"], "datasets.mnist5k.name is not a setting"),
    (["front.dataset=mnist5k", "+datasets.mnist5k.source=5"], "datasets.mnist5k.source=5: give its settings by key"),
    (["front.dataset=mnist5k", "+datasets.mnist5k.source.image_size=2"],
     "datasets.mnist5k.source.image_size=2 is out of range: it must be an integer ≥ 4"),
    (["front.dataset=mnist5k", "+datasets.mnist5k.augment.hflip=3"], "datasets.mnist5k.augment.hflip=3 is out of range"),
    (["evaluation.ood.enabled=true", "evaluation.ood.outliers=mnist5k", "+datasets.mnist5k.train_subset=100"],
     "datasets.mnist5k.train_subset chooses the stitching data"),
])
def test_a_dataset_setting_that_would_not_apply_is_one_line(tiny_config, overrides, message):
    with pytest.raises(StitchingError, match=message.replace(".", r"\.").replace("(", r"\(")):
        read_settings(tiny_config(*overrides))


@pytest.mark.parametrize("key", sorted(STITCHING_ONLY))
def test_every_stitching_only_setting_is_refused_for_a_side_dataset(tiny_config, key):
    # mnist5k has no sequences: a key it lacks is "not a setting"; one it has is "chooses the stitching data"
    with pytest.raises(StitchingError, match=f"datasets\\.mnist5k\\.{key} (chooses the stitching data|is not a "
                                             f"setting)"):
        read_settings(tiny_config("front.dataset=mnist5k", f"+datasets.mnist5k.{key}=4"))


def test_every_ranged_dataset_key_is_ranged_for_a_side_dataset_too(tiny_config):
    # the same rules as dataset.<key>: generated from RULES, one bad value per ranged image-data key
    checked = 0
    defaults = dataset_config(tiny_config(), "mnist5k")
    for key, rule in RULES.items():
        if not key.startswith("dataset.") or key.split(".")[1] in STITCHING_ONLY:
            continue
        path = key.split(".", 1)[1]
        node = defaults
        for part in path.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            continue
        bad = "true" if rule.kind != "bool" else "7"
        with pytest.raises(StitchingError, match=f"datasets\\.mnist5k\\.{path}=.* is out of range"):
            read_settings(tiny_config("front.dataset=mnist5k", f"+datasets.mnist5k.{path}={bad}"))
        checked += 1
    assert checked >= 6


def test_settings_added_later_leave_every_config_hash_as_it_was_at_their_earlier_behaviour(tiny_config):
    # records written before a setting existed stay the finished cells of the same config
    import copy

    from stitching.results.schema import ADDED_LATER, config_hash

    config = read_settings(tiny_config()).config
    before = copy.deepcopy(config)
    for dotted, value in ADDED_LATER.items():
        *parents, key = dotted.split(".")
        node = before
        for part in parents:
            node = node[part]
        assert node.pop(key) == value  # the default is the earlier behaviour
    assert config_hash(config) == config_hash(before)
    # away from that value a setting is hashed: another result is another cell
    changed = copy.deepcopy(config)
    changed["evaluation"]["ood"]["detector"] = "separate"
    assert config_hash(changed) != config_hash(config)
    given = read_settings(tiny_config("front.dataset=mnist5k", "+datasets.mnist5k.source.image_size=16")).config
    assert config_hash(given) != config_hash(read_settings(tiny_config("front.dataset=mnist5k")).config)


def test_a_settings_key_the_config_lacks_says_how_to_add_it():
    # a careless user forgets the + before a datasets.<name> key: the one line says to add it
    from stitching.build import compose_config

    with pytest.raises(StitchingError, match=r"Could not override 'datasets\.mnist5k\.source\.image_size'\. \(to "
                                             r"append to your config use \+datasets\.mnist5k\.source\.image_size=16\)"):
        compose_config(["datasets.mnist5k.source.image_size=16"])
    with pytest.raises(StitchingError, match=r"^Could not override 'stitch\.nope'\. \(to append .* \+stitch\.nope=1\)$"):
        compose_config(["stitch.nope=1"])


def test_a_record_hashed_before_groups_left_the_hash_stays_a_finished_result(tiny_config):
    # `groups` only tells the report how to read runs; records whose hash still kept it are read as
    # they are, while a record whose config was changed after its hash was taken is still refused
    import copy
    import hashlib
    import json

    from stitching.results.schema import NOT_HASHED, _drop_added_later, config_hash, problems

    config = read_settings(tiny_config()).config
    assert "groups" in config and "groups" in NOT_HASHED
    kept = _drop_added_later(copy.deepcopy({k: v for k, v in config.items() if k not in NOT_HASHED or k == "groups"}))
    kept["stitch"] = {k: v for k, v in kept["stitch"].items() if k != "layer"}
    older = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert older != config_hash(config)  # written by hand here: the rule of the older records
    record = {"status": "ok", "objective": "dm", "front_layer": 1, "end_layer": 1, "metrics": {"test/acc": 0.5},
              "base": {"front": {"key": "a"}, "end": {"key": "b"}}, "timings": {"total_s": 1.0}, "config": config}
    assert problems({**record, "config_hash": older}) == []
    assert problems({**record, "config_hash": config_hash(config)}) == []
    edited = copy.deepcopy(config)
    edited["seed"] = int(edited["seed"]) + 1
    assert any("was edited" in p for p in problems({**record, "config": edited, "config_hash": older}))


def test_a_test_subset_scores_the_stitch_and_both_models_on_the_same_stratified_images(tiny_config, zoo_dir,
                                                                                        tmp_path):
    # dataset.test_subset: every run tests on the same class-balanced draw, and the base models' accuracies
    # beside the stitch's are measured on those images (by hand here), not the zoo's whole-split numbers
    from collections import Counter

    import pandas as pd

    from stitching.data.sampling import stratified_sample
    from stitching.evaluate import predictions
    from stitching.runs import run

    record = run(tiny_config("dataset.test_subset=60", "objective=dm", "stitch.layer=3"), tmp_path / "run")
    whole = build_datamodule(read_settings(tiny_config()))
    whole.setup()
    pick = stratified_sample(whole.arrays.test_y, 60, seed=0)
    assert record["evaluation"]["subsets"]["test_subset"] == {"kept": 60, "of": len(whole.arrays.test_y),
                                                             "how": "stratified by class", "seed": 0}
    assert record["evaluation"]["test_images"] == 60
    labels = whole.arrays.test_y[pick]
    assert max(Counter(labels.tolist()).values()) - min(Counter(labels.tolist()).values()) <= 1  # digits: balanced
    correct = record["metrics"]["test/acc"] * 60
    assert abs(correct - round(correct)) < 1e-4  # k of 60 images
    settings = read_settings(tiny_config())
    zoo = build_zoo(settings)
    images = whole.test_tensors()[0][pick]
    for side in ("front", "end"):
        spec = getattr(settings, side).spec
        model, zoo_record = zoo.get(spec)
        by_hand = (predictions(model, images, torch.device("cpu")) == labels).float().mean().item()
        assert record["base"][side]["test_acc"] == pytest.approx(by_hand, abs=1e-9)
        assert record["base"][side]["test_images"] == 60
        assert zoo_record["test_acc"] == pytest.approx(  # the zoo keeps the whole split's accuracy
            (predictions(model, whole.test_tensors()[0], torch.device("cpu")) == whole.arrays.test_y).float().mean().item())
    # a base model is the same model with or without a test subset (its name, its weights)
    assert zoo.path(read_settings(tiny_config("dataset.test_subset=60")).end.spec) == zoo.path(settings.end.spec)
    # a similarity grid of the same models reports their accuracy on the same images as the run beside it
    from stitching.similarity.compare import config_grids

    from tests.conftest import TINY

    tiny = [*TINY, f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"]
    config_grids([*tiny, "dataset.test_subset=60"], ["cka"], 40, "pool", 20,
                 tmp_path / "similarity", layers=[3], progress=False)
    rows = pd.read_csv(tmp_path / "similarity" / "similarity.csv")
    assert rows.front_acc.unique().tolist() == pytest.approx([record["base"]["front"]["test_acc"]])
    assert rows.end_acc.unique().tolist() == pytest.approx([record["base"]["end"]["test_acc"]])


def test_a_base_models_cached_scores_are_kept_apart_per_test_subset(tiny_config, tmp_path):
    # the cache beside a checkpoint is keyed by the test images it read: a score on a subset is never
    # handed to a run on the whole split (or on another subset), and each equals its own computation
    from stitching.evaluate import base_accuracy, cached_base_accuracy

    settings = read_settings(tiny_config())
    model, _ = build_zoo(settings).get(settings.end.spec)
    checkpoint = tmp_path / "model.pt"
    for subset in (None, 30, 60, None):
        datamodule = build_datamodule(read_settings(tiny_config(f"dataset.test_subset={subset or 'null'}")))
        datamodule.setup()
        cached = cached_base_accuracy(model, checkpoint, datamodule, torch.device("cpu"))
        assert cached == base_accuracy(model, datamodule, torch.device("cpu"))
        assert len(datamodule.arrays.test_y) == (subset or len(datamodule.arrays.test_y))
    import json
    assert len(json.loads(checkpoint.with_suffix(".accuracy.json").read_text())) == 3


@pytest.mark.parametrize("key, split", [("train_subset", "training"), ("test_subset", "test")])
def test_a_subset_larger_than_its_split_is_said_in_one_line_and_all_is_used(tiny_config, capsys, key, split):
    from stitching.build import check_sizes

    whole = build_datamodule(read_settings(tiny_config()))
    whole.setup()
    datamodule = build_datamodule(read_settings(tiny_config(f"dataset.{key}=100000")))
    datamodule.setup()
    check_sizes(datamodule)
    size = len(getattr(whole.arrays, "train_y" if split == "training" else "test_y"))
    assert len(getattr(datamodule.arrays, "train_y" if split == "training" else "test_y")) == size
    assert capsys.readouterr().err.strip() == (f"[data] dataset.{key}=100000 but the {split} split has {size} "
                                               f"examples: all are used")
