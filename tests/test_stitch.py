import torch
from torch.nn import functional as F

from stitching.models import Context
from stitching.models.layout import CONV, as_rows
from stitching.stitch_layers import Stitch, dm_solution, fit_dm


class _Head(torch.nn.Module):
    """A plain module as a head of the model contract: ``x → (activation, context)``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), Context()


def test_dm_equals_an_independent_lstsq_solve():
    torch.manual_seed(0)
    front = torch.randn(20, 6, 5, 5)
    end = torch.randn(20, 4, 5, 5)
    stitch = Stitch(6, 4, out_size=(5, 5))
    stitch.fit(front, end)
    weight, bias = stitch.conv.weight[:, :, 0, 0].detach(), stitch.conv.bias.detach()
    # the same least-squares problem written independently: one row per (sample, y, x)
    rows = front.double().movedim(1, -1).reshape(-1, 6)
    targets = end.double().movedim(1, -1).reshape(-1, 4)
    design = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.double)], 1)
    expected = torch.linalg.lstsq(design, targets, driver="gelsd").solution
    torch.testing.assert_close(weight.double(), expected[:6].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.double(), expected[6], atol=1e-5, rtol=1e-5)


def test_dm_recovers_an_exact_affine_relation():
    torch.manual_seed(1)
    true_w, true_b = torch.randn(3, 5), torch.randn(3)
    front = torch.randn(10, 5, 4, 4)
    end = torch.einsum("oc,nchw->nohw", true_w, front) + true_b.view(1, 3, 1, 1)
    weight, bias = dm_solution(as_rows(front, CONV), as_rows(end, CONV))
    torch.testing.assert_close(weight, true_w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias, true_b, atol=1e-4, rtol=1e-4)


def test_stitch_is_a_1x1_conv_after_bilinear_resizing():
    torch.manual_seed(2)
    stitch = Stitch(5, 3, out_size=(4, 4))
    a = torch.randn(2, 5, 8, 8)
    resized = F.interpolate(a, size=(4, 4), mode="bilinear", align_corners=False)
    expected = torch.einsum("oc,nchw->nohw", stitch.conv.weight[:, :, 0, 0], resized)
    expected = expected + stitch.conv.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(stitch(a), expected)
    assert stitch(torch.randn(2, 5, 4, 4)).shape == (2, 3, 4, 4)
    assert Stitch(5, 3, out_size=(16, 16))(torch.randn(1, 5, 4, 4)).shape == (1, 3, 16, 16)


def test_an_upsampling_stitch_is_still_the_map_of_the_resized_front():
    """Upsampling applies the map first (cheaper); the stitch is still conv(resize(a)) — for the
    affine and low-rank kinds, a rank projection in front, and ViT patch grids with a class token."""
    from stitching.models.layout import Layout
    from stitching.stitch_layers import RankProjection, TokenStitch

    torch.manual_seed(6)
    a = torch.randn(3, 8, 2, 2)
    for stitch in (Stitch(8, 3, out_size=(7, 5)), Stitch(8, 3, out_size=(7, 5), kind="low_rank", rank=2)):
        with torch.no_grad():
            stitch.conv.bias.normal_()
        assert stitch._maps_before_resizing(a)
        resized = F.interpolate(a.double(), size=(7, 5), mode="bilinear", align_corners=False)
        weight = stitch.weight[:, :, 0, 0].double()
        expected = torch.einsum("oc,nchw->nohw", weight, resized) + stitch.conv.bias.double().view(1, 3, 1, 1)
        torch.testing.assert_close(stitch(a).double(), expected, atol=1e-5, rtol=1e-5)
    projected = Stitch(8, 3, out_size=(4, 4))
    basis = torch.linalg.qr(torch.randn(8, 2)).Q
    projected.projection = RankProjection(torch.randn(8), basis, CONV)
    torch.testing.assert_close(projected(a), projected.conv(projected.prepare(a)), atol=1e-5, rtol=1e-5)
    mlp = Stitch(8, 3, out_size=(4, 4), kind="mlp")
    assert not mlp._maps_before_resizing(a)  # a ReLU branch does not commute with resizing
    front, end = Layout("tokens", 1, (2, 2)), Layout("tokens", 1, (3, 3))
    tokens = torch.randn(2, 5, 6)
    vit = TokenStitch(6, 4, front, end, separate_class_token=True)
    out = vit(tokens)
    body = F.interpolate(tokens[:, 1:].transpose(1, 2).reshape(2, 6, 2, 2), size=(3, 3), mode="bilinear",
                         align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, :1], vit.class_linear(tokens[:, :1]))
    torch.testing.assert_close(out[:, 1:], vit.linear(body), atol=1e-5, rtol=1e-5)


def test_fit_dm_maps_a_network_onto_itself_as_identity():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh())
    stitch = Stitch(6, 6, out_size=(8, 8))
    fit_dm(stitch, _Head(net), _Head(net), torch.rand(30, 3, 8, 8))
    torch.testing.assert_close(stitch.conv.weight[:, :, 0, 0], torch.eye(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(stitch.conv.bias, torch.zeros(6), atol=1e-4, rtol=0)


def test_a_stitch_starts_from_identity_random_or_dm():
    """``stitch.init``: the identity map (rectangular when widths differ) with zero bias, PyTorch's
    random initialisation, or DM; the run uses it for the trained objectives."""
    from stitching.api import prepare_stitch
    from stitching.errors import StitchingError
    from stitching.models import build_model

    torch.manual_seed(0)
    front, end = build_model("resnet18", num_classes=10, width=4), build_model("resnet18", num_classes=10, width=8)
    images = torch.rand(24, 3, 16, 16)
    weights = {}
    for init in ("dm", "identity", "random"):
        torch.manual_seed(1)
        stitch = prepare_stitch(front, end, 3, 3, images, "hint", init=init).network.stitch
        weights[init] = stitch.weight.detach().reshape(stitch.weight.shape[:2]).clone()
        if init == "identity":
            assert torch.equal(weights[init], torch.eye(*weights[init].shape)) and not stitch.affine.bias.any()
    assert weights["identity"].shape[0] != weights["identity"].shape[1]  # 4·k → 8·k channels
    assert not torch.allclose(weights["random"], weights["dm"]) and not torch.allclose(weights["random"],
                                                                                       weights["identity"])
    try:
        prepare_stitch(front, end, 3, 3, images, "dm", init="random")
    except StitchingError as err:
        assert "objective dm is the DM solution itself" in str(err)
    else:
        raise AssertionError("DM started from a random map was accepted")


def test_an_underdetermined_dm_fit_is_refused_in_one_line_and_a_determined_one_records_its_rows():
    """Fewer least-squares rows (samples × real positions) than unknowns per output channel
    (channels + bias) leave the minimum-norm solution one of many: refused, naming the
    ``dm_samples`` that would do (ceil(17 unknowns / 4 positions) = 5)."""
    import pytest

    from stitching.errors import StitchingError
    from stitching.models.layout import Layout
    from stitching.stitch_layers import TokenStitch

    torch.manual_seed(0)
    stitch = Stitch(16, 8)
    with pytest.raises(StitchingError, match=r"12 rows \(3 samples × 4 positions\) for 17 unknowns .* at least 5"):
        stitch.fit(torch.randn(3, 16, 2, 2), torch.randn(3, 8, 2, 2))
    stitch.fit(torch.randn(5, 16, 2, 2), torch.randn(5, 8, 2, 2))
    assert stitch.dm_rows == 20
    tokens = Layout("tokens", 1)
    vit = TokenStitch(6, 4, tokens, tokens, separate_class_token=True)  # the class map: one row per sample
    with pytest.raises(StitchingError, match="class token's own map is underdetermined: 5 rows"):
        vit.fit(torch.randn(5, 9, 6), torch.randn(5, 9, 4))
    vit.fit(torch.randn(7, 9, 6), torch.randn(7, 9, 4))
    assert vit.dm_rows == 56
