import pytest
import torch

from stitching.errors import StitchingError
from stitching.models import ARCHITECTURES, build_model, cut_point_activations, resolve_layer, split


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tail_of_head_is_the_whole_network_at_every_cut_point(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        assert len(model.cut_points) == (12 if arch.startswith("vit") else 9)
        for layer in range(1, len(model.cut_points) + 1):
            head, tail = split(model, layer)
            torch.testing.assert_close(tail(*head(x)), full, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tail_exposes_every_later_cut_point(arch):
    model = build_model(arch, num_classes=10, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, activations = cut_point_activations(model, x)
        k = len(model.cut_points)
        for layer in range(1, k + 1):
            head, tail = split(model, layer)
            tail_logits, later = tail(*head(x), return_features=True)
            torch.testing.assert_close(tail_logits, logits)
            assert len(later) == k - layer
            for got, want in zip(later, activations[layer:]):
                torch.testing.assert_close(got, want)


def test_cut_points_are_stem_then_first_and_last_block_of_each_stage():
    assert [p.name for p in build_model("resnet18", 10, width=4).cut_points] == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert [p.name for p in build_model("resnet34", 10, width=4).cut_points] == [
        "stem", "layer1.0", "layer1.2", "layer2.0", "layer2.3", "layer3.0", "layer3.5", "layer4.0", "layer4.2"]


def test_resnet_without_residuals_has_no_skip_connections():
    plain = build_model("resnet18_nores", 10, width=4)
    assert not any(block.residual for block in plain.blocks[1:-1])
    assert not any("shortcut.0" in name for name, _ in plain.named_modules())
    assert any("shortcut.0" in name for name, _ in build_model("resnet18", 10, width=4).named_modules())


def test_width_scales_channels():
    model = build_model("resnet18", 10, width=16)
    x = torch.rand(1, 3, 32, 32)
    _, activations = cut_point_activations(model.eval(), x)
    assert [a.shape[1] for a in activations] == [16, 16, 16, 32, 32, 64, 64, 128, 128]
    assert [a.shape[-1] for a in activations] == [32, 32, 32, 16, 16, 8, 8, 4, 4]


def test_layers_by_name_and_bad_layers():
    model = build_model("resnet18", 10, width=4)
    assert resolve_layer(model, "layer2.0") == 4
    assert resolve_layer(model, "7") == 7
    with pytest.raises(StitchingError, match="out of range: this model has cut points 1..9"):
        resolve_layer(model, 10)
    with pytest.raises(StitchingError, match="out of range"):
        resolve_layer(model, 0)
    with pytest.raises(StitchingError, match="unknown layer 'layer9.0'"):
        resolve_layer(model, "layer9.0")
    with pytest.raises(StitchingError, match="unknown architecture 'vgg'"):
        build_model("vgg", 10)


def test_activations_can_stop_at_a_cut_point():
    model = build_model("resnet18", 10, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, everything = cut_point_activations(model, x)
        none, first_four = cut_point_activations(model, x, upto=4)
    assert none is None and len(first_four) == 4 and logits is not None
    for got, want in zip(first_four, everything):
        torch.testing.assert_close(got, want)
