"""ViT-Ti made cuttable: exact cuts, a token-wise stitch, every objective."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from stitching.errors import StitchingError
from stitching.models import CuttableViT, build_model, cut_point_activations, split
from stitching.models.layout import CONV, Layout
from stitching.stitch_layers import TokenStitch, make_stitch

TOKENS = Layout("tokens", prefix_tokens=1, grid=(2, 4), pool="first")
from stitching.build import prepare
from stitching.runs import run

VIT = ("model=vit_tiny_narrow", "model.width=16", "model.depth=4")


def test_the_cut_network_is_timms_vit_and_tail_of_head_is_the_forward():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3,
                            num_heads=2).eval()
    model = CuttableViT.from_timm(vit).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = vit(x)
        torch.testing.assert_close(model(x), expected)
        assert [p.name for p in model.cut_points] == ["block0", "block1", "block2"]
        for layer in range(1, 4):
            head, tail = split(model, layer)
            a, context = head(x)
            assert a.shape == (4, 1 + 16, 32)  # class token + 4×4 patches
            torch.testing.assert_close(tail(a, context), expected)
            _, later = tail(a, context, return_features=True)
            _, every = cut_point_activations(model, x)
            for got, want in zip([a, *later], every[layer - 1:]):
                torch.testing.assert_close(got, want)


def test_build_model_knobs_and_errors():
    model = build_model("vit_tiny", num_classes=10, width=64, depth=2, image_size=16, in_channels=1,
                        mean=(0.5,), std=(0.25,))
    assert len(model.cut_points) == 2 and model.num_classes == 10
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(StitchingError, match="fixed depth"):
        build_model("resnet18", 10, width=4, depth=3)
    with pytest.raises(StitchingError, match="divisible by 4"):
        build_model("vit_tiny", 10, width=16, depth=1, image_size=18)


def test_token_stitch_is_one_affine_map_per_token_and_dm_recovers_it():
    torch.manual_seed(1)
    front, end = torch.randn(30, 9, 6), torch.randn(30, 9, 4)
    stitch = make_stitch(front, TOKENS, end, TOKENS)
    assert isinstance(stitch, TokenStitch) and stitch.channels == (6, 4)
    w, b = torch.randn(4, 6), torch.randn(4)
    target = front @ w.T + b
    stitch.fit(front, target)
    torch.testing.assert_close(stitch.linear.weight.detach(), w, atol=1e-4, rtol=0)
    torch.testing.assert_close(stitch(front), target, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="both be convolutional or both be transformers"):
        make_stitch(torch.randn(2, 4, 3, 3), CONV, end, TOKENS)


def test_dm_self_stitch_of_a_vit_reproduces_its_accuracy(tiny_config, tmp_path):
    cfg = tiny_config(*VIT, "objective=dm", "end.seed=0", "stitch.layer=2")
    record = run(cfg, tmp_path / "dm")
    assert record["front_layer_name"] == "block1" and record["stitch"]["in_channels"] == 16
    assert abs(record["metrics"]["test/acc"] - record["base"]["end"]["test_acc"]) <= 0.005


@pytest.mark.parametrize("objective", ["hint", "fula", "slm", "tlm"])
def test_every_objective_stitches_two_vits(tiny_config, objective):
    cfg = tiny_config(*VIT, f"objective={objective}", "stitch.front_layer=1", "stitch.end_layer=3",
                      "trainer.limit_train_batches=3")
    prep = prepare(cfg)
    stitch = prep.network.stitch
    before = stitch.linear.weight.detach().clone()
    from stitching.engine import fit_engine

    fit_engine(prep.engine, prep.datamodule.train_dataloader(), prep.datamodule.test_dataloader(), dict(cfg.trainer),
               run_dir=cfg.paths.output_dir)
    assert not torch.equal(before, stitch.linear.weight)
    if objective == "fula":  # hints at the end block and every later one
        assert len(prep.engine.hint_weights_3) == 2


def test_a_vit_cannot_be_stitched_to_a_resnet(tiny_config):
    cfg = tiny_config(*VIT, "front.arch=resnet18", "front.width=8", "front.depth=null", "stitch.layer=1")
    with pytest.raises(StitchingError, match="both be convolutional or both be transformers"):
        prepare(cfg)


def test_a_separate_class_token_map_recovers_two_affine_maps():
    torch.manual_seed(2)
    front = torch.randn(40, 9, 5)
    w_cls, b_cls, w_tok, b_tok = torch.randn(3, 5), torch.randn(3), torch.randn(3, 5), torch.randn(3)
    end = torch.cat([front[:, :1] @ w_cls.T + b_cls, front[:, 1:] @ w_tok.T + b_tok], dim=1)
    separate = make_stitch(front, TOKENS, end, TOKENS, separate_class_token=True)
    separate.fit(front, end)
    torch.testing.assert_close(separate(front), end, atol=1e-4, rtol=0)
    shared = make_stitch(front, TOKENS, end, TOKENS)
    shared.fit(front, end)
    assert (shared(front)[:, 0] - end[:, 0]).norm() > 10 * (separate(front)[:, 0] - end[:, 0]).norm()
    with pytest.raises(ValueError, match="applies to ViTs"):
        make_stitch(torch.randn(2, 4, 3, 3), CONV, torch.randn(2, 4, 3, 3), CONV, separate_class_token=True)


def test_class_token_option_reaches_the_stitch(tiny_config):
    prep = prepare(tiny_config(*VIT, "objective=dm", "stitch.layer=2", "stitch.class_token=separate"))
    assert prep.network.stitch.class_linear is not None
    with pytest.raises(StitchingError, match="shared or separate"):
        prepare(tiny_config(*VIT, "objective=dm", "stitch.layer=2", "stitch.class_token=both"))
