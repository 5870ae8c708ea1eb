"""Cut anywhere: any image network at any named module whose output is the only path onward,
checked exactly against the forward pass; refused in one line where a cut would be wrong."""

import copy

import pytest
import torch
from torch import nn

import stitching
from stitching.errors import StitchingError
from stitching.models import cut_at, cut_point_activations, split

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

#: families the block adapters do not know, cut at a named module (timm's test models, torchvision)
FAMILIES = [
    ("timm", "test_efficientnet", ["blocks.1", "blocks.3"]),
    ("timm", "test_byobnet", ["stages.1"]),
    ("timm", "test_nfnet", ["stages.0", "stages.2"]),
    ("timm", "test_maxvit", ["stages.1"]),
    ("timm", "test_resnet", ["layer2", "layer3.0"]),  # a known family, at a whole stage
    ("torchvision", "regnet_y_400mf", ["trunk_output.block2"]),
    ("torchvision", "mobilenet_v3_small", ["features.4"]),
]


def _model(library: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if library == "timm":
        return timm.create_model(name, num_classes=10).eval()
    return getattr(torchvision.models, name)(num_classes=10).eval()


@pytest.mark.parametrize(("library", "name", "names"), FAMILIES, ids=[f[1] for f in FAMILIES])
def test_a_named_module_cut_equals_the_forward_pass_exactly(library, name, names):
    model = _model(library, name)
    cuttable = cut_at(model, list(reversed(names)))  # any order: the cut points follow the forward pass
    assert [p.name for p in cuttable.cut_points] == names
    assert all(p.layout.kind == "conv" for p in cuttable.cut_points)
    images = torch.rand(3, cuttable.input_spec.channels, 24, 28)
    with torch.no_grad():
        reference = model(cuttable.transform(images))
        _, activations = cut_point_activations(cuttable, images)
        for index, activation in enumerate(activations, 1):
            head, tail = split(cuttable, index)
            a, context = head(images)
            assert torch.equal(a, activation)
            assert torch.equal(tail(a, context), reference)  # the same operations in the same order
    twin = copy.deepcopy(cuttable)  # a copy runs on its own modules
    for parameter in twin.parameters():
        parameter.data.zero_()
    with torch.no_grad():
        assert torch.equal(cuttable(images), reference)
        assert not torch.equal(twin(images), reference)


class _Shared(nn.Module):
    """A network that runs one convolution twice: no single place to cut it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.conv(x))))


@pytest.mark.parametrize(("make", "names", "message"), [
    (lambda: _model("timm", "test_resnet"), "layer2.0.conv1", r"also reads an earlier value \(a residual connection"),
    (lambda: _model("timm", "test_vit"), "blocks.1.attn", "also reads an earlier value"),
    (lambda: _model("timm", "test_mambaout"), "stages.1", r"channels-last \[N, H, W, C\]"),
    (lambda: _model("torchvision", "swin_t"), "features.3", "channels-last"),
    (lambda: _model("timm", "test_resnet"), "fc", "nothing left to align"),
    (lambda: _model("timm", "test_resnet"), "global_pool", "nothing left to align"),
    (lambda: _model("timm", "test_resnet"), "layer9", "has no module 'layer9'"),
    (lambda: _model("timm", "test_resnet"), ["layer2", "layer2"], "named twice"),
    (lambda: _model("timm", "test_resnet"), [], "at least one module"),
    (lambda: _Shared().eval(), "conv", "runs 2 times"),
])
def test_a_cut_that_would_be_wrong_is_one_line(make, names, message):
    with pytest.raises(StitchingError, match=message):
        cut_at(make(), names)


def test_stitch_cuts_an_unknown_family_at_a_named_module_and_dm_into_itself_is_the_model(pair):
    _, _, images, labels = pair
    model = _model("timm", "test_efficientnet")
    with pytest.raises(StitchingError, match="at a named module"):  # by index: no block adapter knows it
        stitching.stitch(model, model, 2, 2, train=(images, labels))
    result = stitching.stitch(model, model, "blocks.2", "blocks.2", objective="dm", dm_samples=64,
                              train=(images[:64], labels[:64]), test=(images[64:], labels[64:]), update_bn=False,
                              progress=False)
    network = result.network.eval()
    adapted = cut_at(model, "blocks.2")
    with torch.no_grad():  # least squares of a layer onto itself is the identity: the stitched model is the model
        torch.testing.assert_close(network(images[64:]), adapted(images[64:]), atol=1e-3, rtol=1e-3)


def test_a_named_module_network_saves_and_loads_with_its_input_convention(pair, tmp_path):
    front, _, images, labels = pair
    end = _model("torchvision", "mobilenet_v3_small")
    result = stitching.stitch(front, end, "layer2.0", "features.4", objective="hint", epochs=1, batch_size=32,
                              train=(images[:64], labels[:64]), test=(images[64:], labels[64:]), progress=False,
                              end_inputs={"size": 48, "mean": [0.5] * 3, "std": [0.25] * 3})
    path = result.save(tmp_path / "net.pt")
    loaded = stitching.load(path, front, end)  # the raw models: the cut and the convention come from the file
    with torch.no_grad():
        assert torch.equal(loaded(images[64:]), result.network.eval()(images[64:]))
    assert loaded.end.model.input_spec.size == (48, 48)


def test_compare_reads_named_modules_of_any_family(pair):
    _, _, images, _ = pair
    front, end = _model("timm", "test_efficientnet"), _model("timm", "test_byobnet")
    frame = stitching.compare(front, end, images[:40], indices="cka", front_layers=["blocks.1", "blocks.3"],
                              end_layers="stages.1", flatten="pool")
    assert frame.front_name.tolist() == ["blocks.1", "blocks.3"] and frame.value.between(0, 1 + 1e-9).all()


def test_a_plain_user_network_is_cut_where_its_output_is_the_only_path(pair):
    _, _, images, labels = pair
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    points = cut_at(network, ["1", "3"]).cut_points
    assert [p.name for p in points] == ["1", "3"]
    result = stitching.stitch(network, network, "1", "3", objective="fula", epochs=1,
                              train=(images[:, :1][:64], labels[:64]), progress=False)
    assert 0.0 <= result.metrics["test/acc"] <= 1.0


def test_a_named_module_cut_follows_its_model_when_moved_or_cast():
    model = _model("timm", "test_efficientnet")
    cuttable = cut_at(model, "blocks.2")
    images = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        cuttable(images)  # pieces built for float32
        cuttable.double()  # every tensor replaced: the pieces are rebuilt on the new ones
        out = cuttable(images.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, model(cuttable.transform(images.double())))


def test_the_command_line_trains_and_cuts_an_unknown_family_at_a_named_module(tiny_config, tmp_path):
    """A timm family no block adapter knows, trained in the zoo and DM-stitched into itself at a
    named module: the stitched network is the model (its accuracy on the stitching data)."""
    import json

    from stitching.build import read_settings
    from stitching.runs import run

    family = ["model.arch=timm", "model.name=test_efficientnet", "objective=dm", "end.seed=0", "stitch.update_bn=false",
              "trainer.limit_train_batches=2"]
    run(tiny_config(*family, "stitch.layer=blocks.2"), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["front_layer_name"] == saved["end_layer_name"] == "blocks.2"
    assert saved["metrics"]["test/acc"] == pytest.approx(saved["base"]["end"]["test_acc"], abs=0.01)
    network = stitching.load(tmp_path / "run" / "network.pt", *_zoo_pair(tiny_config(*family, "stitch.layer=blocks.2")))
    assert network.front.point.name == "blocks.2"
    with pytest.raises(StitchingError, match="no numbered cut points: give the layer as a module name"):
        from stitching.build import load_models

        cfg = tiny_config(*family, "stitch.layer=3")
        load_models(read_settings(cfg))


def _zoo_pair(cfg):
    from stitching.build import load_models, read_settings

    front, _, end, _ = load_models(read_settings(cfg))
    return front, end
