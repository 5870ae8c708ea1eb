"""The model contract on other libraries' networks: timm and torchvision, exact cuts, DM, weights."""

import json
import re

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer

from stitching.api import prepare_stitch
from stitching.errors import StitchingError
from stitching.models import adapt, as_cuttable, build_model, cut_point_activations, split
from stitching.models.adapters import create
from stitching.runs import run


def _library_models():
    """Every adapter family at random initialisation (offline: timm's test models)."""
    torch.manual_seed(0)
    registers = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                                  reg_tokens=4, class_token=True, global_pool="token")
    return {
        "timm test_resnet": timm.create_model("test_resnet"),
        "timm test_convnext": timm.create_model("test_convnext"),
        "timm test_vit": timm.create_model("test_vit"),
        "timm ViT with registers": registers,
        "torchvision resnet18": torchvision.models.resnet18(),
        "torchvision vit_b_16": torchvision.models.vit_b_16(),
    }


MODELS = _library_models()


def _images(model, n=2, seed=1):
    size = model.input_spec.size or (32, 32)
    return torch.rand(n, model.input_spec.channels, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tail_of_head_is_the_library_forward_at_every_cut_point(name):
    original = MODELS[name].eval()
    model = adapt(original).eval()
    x = _images(model)
    with torch.no_grad():
        expected = original(model.transform(x))  # the library's own forward on its own input convention
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        _, everything = cut_point_activations(model, x)
        for point in model.cut_points:
            head, tail = split(model, point.name)
            a, context = head(x)
            torch.testing.assert_close(tail(a, context), expected, rtol=0, atol=0)
            _, later = tail(a, context, return_features=True)
            assert len(later) == len(model.cut_points) - point.index
            for got, want in zip([a, *later], everything[point.index - 1:]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cut_points_are_named_after_the_librarys_modules():
    resnet = adapt(MODELS["torchvision resnet18"])
    assert [p.name for p in resnet.cut_points] == ["maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                                   "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    vit = adapt(MODELS["timm ViT with registers"])
    assert [p.name for p in vit.cut_points] == ["blocks.0", "blocks.1", "blocks.2"]
    layout = vit.cut_points[0].layout
    assert (layout.kind, layout.prefix_tokens, layout.grid, layout.pool) == ("tokens", 5, (4, 4), "first")
    convnext = adapt(MODELS["timm test_convnext"])
    assert convnext.cut_points[0].name == "stem" and convnext.cut_points[-1].name.startswith("stages.3.blocks.")
    tv_vit = adapt(MODELS["torchvision vit_b_16"])
    assert len(tv_vit.cut_points) == 12 and tv_vit.cut_points[0].name == "encoder.layers.encoder_layer_0"
    assert tv_vit.input_spec.size == (224, 224) and tv_vit.input_spec.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name, layer", [("timm test_resnet", "layer2.0"), ("timm test_convnext", "stages.1.blocks.1"),
                                         ("timm test_vit", "blocks.2"), ("timm ViT with registers", "blocks.1"),
                                         ("torchvision resnet18", "layer3.1"),
                                         ("torchvision vit_b_16", "encoder.layers.encoder_layer_5")])
def test_dm_self_stitch_keeps_the_models_outputs(name, layer):
    model = adapt(MODELS[name]).eval()
    is_big = name.endswith("vit_b_16")
    x = _images(model, n=6 if is_big else 24, seed=2)
    prepared = prepare_stitch(model, model, layer, layer, x, objective="dm")
    network = prepared.network.eval()
    with torch.no_grad():
        expected = model(x[:4])
        got = network(x[:4])
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_dm_recovers_a_map_planted_between_a_timm_and_a_torchvision_resnet18():
    torch.manual_seed(3)
    ours = create("timm", "resnet18").eval()
    theirs = torchvision.models.resnet18().eval()
    theirs.load_state_dict(ours.state_dict())  # the same network, in torchvision's format
    # plant a channel permutation with positive scales at the stem: BN (eval) is affine per
    # channel and ReLU and max-pooling commute with positive scaling, so the torchvision
    # stem output is exactly diag(s) P times timm's
    channels = ours.conv1.out_channels
    perm, scale = torch.randperm(channels), torch.rand(channels) + 0.5
    with torch.no_grad():
        theirs.conv1.weight.copy_(ours.conv1.weight[perm])
        theirs.bn1.weight.copy_(ours.bn1.weight[perm] * scale)
        theirs.bn1.bias.copy_(ours.bn1.bias[perm] * scale)
        theirs.bn1.running_mean.copy_(ours.bn1.running_mean[perm])
        theirs.bn1.running_var.copy_(ours.bn1.running_var[perm])
    front, end = adapt(ours), adapt(theirs)
    x = torch.rand(4, 3, 64, 64)
    prepared = prepare_stitch(front, end, "maxpool", "maxpool", x, objective="dm")
    planted = torch.zeros(channels, channels)
    planted[torch.arange(channels), perm] = scale
    stitch = prepared.network.stitch
    torch.testing.assert_close(stitch.conv.weight[:, :, 0, 0], planted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stitch.conv.bias, torch.zeros(channels), atol=1e-4, rtol=0)


def test_models_by_name_read_their_own_pretrained_input_convention():
    model = adapt(timm.create_model("test_vit"))
    assert model.input_spec.size == (160, 160) and model.input_spec.origin == "timm pretrained config"
    x = torch.rand(2, 3, 32, 32)  # data at their own size are resized inside
    assert model(x).shape == (2, 1000)
    spec = model.input_spec.reconcile(1, (32, 32), "front")
    assert spec["resized"] and spec["grey_repeated"] and spec["model"] == [3, 160, 160]
    with pytest.raises(StitchingError, match="reads 3-channel images but the stitching data have 4 channels"):
        model.input_spec.reconcile(4, (32, 32), "front")


def test_unknown_names_and_families_are_one_line_with_suggestions():
    with pytest.raises(StitchingError, match="timm has no model 'resnet81'; did you mean .*resnet18"):
        create("timm", "resnet81")
    with pytest.raises(StitchingError, match="torchvision has no model 'vit_b_61'; did you mean .*vit_b_16"):
        create("torchvision", "vit_b_61")
    with pytest.raises(StitchingError, match="cannot cut a .*Sequential at its blocks; stitching cuts timm ResNet.*"
                       "any model at a named module"):
        as_cuttable(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_pretrained_offline_says_which_file_to_fetch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub")
    with pytest.raises(StitchingError, match="cannot fetch pretrained timm weights for 'resnet18' .*download "
                                             "model.safetensors from the Hugging Face repo timm/resnet18"):
        create("timm", "resnet18", pretrained=True)


def test_a_timm_model_trained_here_is_cuttable_and_cached(tiny_config, tmp_path):
    cfg = tiny_config("model=timm", "model.name=test_resnet", "objective=dm", "stitch.layer=layer2.0",
                      "end.seed=0")
    record = run(cfg, tmp_path / "self")
    assert record["base"]["end"]["key"].startswith("timm-test_resnet-digits-s0-e4-")
    assert record["base"]["end"]["source"]["kind"] == "trained here"
    assert abs(record["metrics"]["test/acc"] - record["base"]["end"]["test_acc"]) <= 0.01


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_local_timm_checkpoint_round_trip_records_its_hash(tiny_config, tmp_path, suffix):
    from stitching.zoo import sha256

    torch.manual_seed(4)
    model = create("timm", "test_resnet", num_classes=10)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)  # a training checkpoint, as timm's scripts write
    cfg = tiny_config("objective=hint", "front.arch=timm", "front.name=test_resnet", f"front.checkpoint={path}",
                      "stitch.front_layer=layer2.0", "stitch.end_layer=4", "trainer.limit_train_batches=2")
    record = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    source = saved["base"]["front"]["source"]
    assert source == {"kind": "file", "path": str(path), "hub": None, "sha256": sha256(path), "library": "timm",
                      "name": "test_resnet"}
    assert saved["inputs"]["front"]["model"] == [3, 160, 160] and saved["inputs"]["front"]["resized"]
    assert saved["inputs"]["end"]["resized"] is False
    assert 0 <= record["base"]["front"]["test_acc"] <= 1  # measured on the stitching data
    from stitching.build import prepare

    loaded = prepare(cfg).front
    with torch.no_grad():  # the network that was stitched is the one saved
        x = torch.rand(2, 3, 16, 16)
        torch.testing.assert_close(loaded(x), as_cuttable(model.eval())(x), rtol=0, atol=0)
        assert not torch.equal(loaded(x), build_model("timm", 10, name="test_resnet").eval()(x))


def test_a_checkpoint_that_does_not_fit_names_the_keys(tiny_config, tmp_path):
    from stitching.build import prepare

    path = tmp_path / "wrong.pt"
    torch.save(create("timm", "test_convnext").state_dict(), path)
    cfg = tiny_config("front.arch=timm", "front.name=test_resnet", f"front.checkpoint={path}")
    with pytest.raises(StitchingError, match=r"does not fit timm model 'test_resnet': missing keys conv1\.0\.weight.*"
                                             r"unexpected keys stem\.0\.weight"):
        prepare(cfg)


def test_bad_model_settings_are_refused_before_any_work(tiny_config):
    from stitching.build import read_settings

    with pytest.raises(StitchingError, match="torchvision has no model 'resnet';"):
        read_settings(tiny_config("model=torchvision", "model.name=resnet", "model.pretrained=true"))
    with pytest.raises(StitchingError, match="front.pretrained=true applies to timm and torchvision models"):
        read_settings(tiny_config("front.pretrained=true"))
    with pytest.raises(StitchingError, match="model.name is required for timm models"):
        read_settings(tiny_config("model=timm"))


def test_bad_model_input_on_the_command_line_is_one_line(tmp_path, zoo_dir, monkeypatch, capsys):
    from tests.conftest import TINY, train_cli

    wrong_keys, four_channels = tmp_path / "convnext.pt", tmp_path / "four.pt"
    torch.save(create("timm", "test_convnext").state_dict(), wrong_keys)
    torch.save(create("timm", "test_resnet", num_classes=10, in_channels=4).state_dict(), four_channels)
    timm_front = ["front.arch=timm", "front.name=test_resnet"]
    cases = [
        (["model=timm", "model.name=resnet81"], "error: timm has no model 'resnet81'; did you mean"),
        ([*timm_front, f"front.checkpoint={wrong_keys}"],
         f"error: checkpoint {wrong_keys} does not fit timm model 'test_resnet': missing keys"),
        (["model=timm", "model.name=resnet18", "model.pretrained=true"],
         "error: cannot fetch pretrained timm weights for 'resnet18'"),
        ([*timm_front, f"front.checkpoint={four_channels}"],
         "error: the front model reads 4-channel images but the stitching data have 3 channels"),
    ]
    for number, (overrides, message) in enumerate(cases):  # in this process: the CLI's own error path
        code, output = train_cli([*TINY, f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}",
                                  f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / str(number)}",
                                  *overrides], monkeypatch, capsys)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in output, (overrides, output[-1500:])
        assert len(errors) == 1 and errors[0].startswith(message), (overrides, errors)


def test_a_given_models_input_convention_is_a_setting(tiny_config, tmp_path, capsys):
    """Weights trained at the data's own size and normalisation, given as a plain timm state dict:
    read by the library's pretrained convention they score less; told their own, they score what
    they scored when trained."""
    from stitching.build import build_zoo, side_spec

    common = ("model=timm", "model.name=test_resnet", "objective=dm", "stitch.layer=layer2.0", "end.seed=0")
    trained, zoo_record = build_zoo(tiny_config(*common)).get(side_spec(tiny_config(*common).end))
    weights = tmp_path / "mine.pt"
    torch.save(trained.model.state_dict(), weights)
    mean, std = zoo_record["model_kwargs"]["mean"], zoo_record["model_kwargs"]["std"]
    given = (*common, f"front.checkpoint={weights}")
    capsys.readouterr()
    default = run(tiny_config(*given), tmp_path / "default")
    out = capsys.readouterr()
    assert re.search(r"\[inputs\] front: 3×16×16 → 3×\d+×\d+, resized; normalised by mean \[.*\(timm pretrained config\)",
                     out.out), out.out
    assert default["inputs"]["front"]["resized"] and "pretrained config" in default["inputs"]["front"]["from"]
    told = run(tiny_config(*given, "front.input.size=16", f"front.input.mean={mean}", f"front.input.std={std}"),
               tmp_path / "told")
    assert not told["inputs"]["front"]["resized"] and "given: size, mean, std (front.input)" in told["inputs"]["front"]["from"]
    assert told["base"]["front"]["test_acc"] == pytest.approx(zoo_record["test_acc"], abs=1e-6)
    assert default["base"]["front"]["test_acc"] < told["base"]["front"]["test_acc"] - 0.05
    print("given timm weights at the pretrained convention", default["base"]["front"]["test_acc"],
          "at their own", told["base"]["front"]["test_acc"])
    if default["base"]["front"]["test_acc"] <= 0.15:  # near chance for 10 classes: said, with the transform
        assert "near chance for 10 classes: it was given 3×16×16 images as" in default["base"]["front"]["warning"]
    # the Python API: the same weights, the same two conventions
    import stitching
    from stitching.build import build_datamodule

    datamodule = build_datamodule(tiny_config(*common))
    datamodule.setup()
    images, labels = datamodule.test_tensors()
    raw = create("timm", "test_resnet", num_classes=10)
    raw.load_state_dict(torch.load(weights))
    data = (images[:256], labels[:256])
    plain = stitching.stitch(raw, trained, 4, 4, objective="dm", train=data, progress=False, dm_samples=256)
    own = stitching.stitch(raw, trained, 4, 4, objective="dm", train=data, progress=False, dm_samples=256,
                           front_inputs={"size": 16, "mean": mean, "std": std})
    assert own.warnings == [] and own.metrics["test/acc"] > plain.metrics["test/acc"]
    if default["base"]["front"]["test_acc"] <= 0.15:
        assert len(plain.warnings) == 1 and plain.warnings[0].startswith("[inputs] warning: the front model scores")


def test_input_conventions_are_checked_in_one_line():
    from stitching.models import with_inputs

    model = create("timm", "test_resnet", num_classes=10)
    spec = with_inputs(model, {"size": 16, "mean": 0.5, "std": [0.25]}, "front").input_spec
    assert spec.size == (16, 16) and spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
    again = with_inputs(with_inputs(model, {"size": 16}), {"mean": [0.1, 0.2, 0.3]}).input_spec
    assert again.size == (16, 16) and again.mean == (0.1, 0.2, 0.3)  # a later convention refines an earlier one
    for inputs, message in [({"colour": 3}, "unknown key.s. colour"), ({"channels": 1}, "channels=1 is out of range"),
                            ({"std": -1}, "std=-1 is out of range"), ({"size": [16]}, "size=.16. is out of range"),
                            ({"mean": [0.1, 0.2]}, "mean=.0.1, 0.2. is out of range"), ("16px", "must be a dict")]:
        with pytest.raises(StitchingError, match=message):
            with_inputs(model, inputs, "front")
    with pytest.raises(StitchingError, match="front_inputs applies to timm and torchvision models"):
        with_inputs(build_model("resnet18", num_classes=10, width=4), {"size": 16}, "front")
