"""Layouts: what the stitch, DM, pooling and the losses do with token sequences, padding included."""

import pytest
import torch
from torch.nn import functional as F

from stitching.models.layout import CONV, Layout, as_rows, compatible, pooled, resize
from stitching.objectives import fula_loss, relative_error
from stitching.stitch_layers import TokenStitch, make_stitch

TEXT = Layout("tokens")  # a sequence with an attention mask, no prefix, no grid


def _padded(n=6, t=7, d=5, seed=0):
    """Token activations whose padded positions hold garbage, and the mask of real ones."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d, generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return a.masked_fill(~mask.bool()[..., None], 1e3), mask


def test_padding_never_enters_dm():
    front, mask = _padded(seed=1)
    w, b = torch.randn(3, 5), torch.randn(3)
    end = front @ w.T + b
    end = end.masked_fill(~mask.bool()[..., None], -7.0)  # the end's padding holds something else entirely
    stitch = make_stitch(front, TEXT, end, TEXT)
    stitch.fit(front, end, mask)
    torch.testing.assert_close(stitch.linear.weight.detach(), w, atol=1e-4, rtol=0)
    torch.testing.assert_close(stitch.linear.bias.detach(), b, atol=1e-4, rtol=0)
    unmasked = make_stitch(front, TEXT, end, TEXT)
    unmasked.fit(front, end)
    assert (unmasked.linear.weight - w).abs().max() > 1e-2  # with padding the fit is wrong


def test_padding_does_not_change_the_dm_solution():
    front, mask = _padded(n=4, seed=2)
    end = torch.randn(4, 7, 3)
    stitch, longer = make_stitch(front, TEXT, end, TEXT), make_stitch(front, TEXT, end, TEXT)
    stitch.fit(front, end, mask)
    pad = torch.randn(4, 5, 5) * 50  # five more padded positions per sequence
    longer.fit(torch.cat([front, pad], 1), torch.cat([end, pad[..., :3]], 1),
               torch.cat([mask, torch.zeros(4, 5, dtype=mask.dtype)], 1))
    torch.testing.assert_close(stitch.linear.weight, longer.linear.weight, atol=1e-5, rtol=0)


def test_masked_relative_error_equals_the_error_over_real_tokens():
    pred, mask = _padded(seed=3)
    target, _ = _padded(seed=4)
    expected = torch.stack([
        (pred[n][mask[n].bool()] - target[n][mask[n].bool()]).norm() / target[n][mask[n].bool()].norm()
        for n in range(len(pred))]).mean()
    torch.testing.assert_close(relative_error(pred, target, mask), expected)
    weights = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(fula_loss([pred, pred], [target, target], weights, mask), expected)


def test_pooling_follows_the_layout():
    a, mask = _padded(seed=5)
    mean = torch.stack([a[n][mask[n].bool()].mean(0) for n in range(len(a))])
    last = torch.stack([a[n][mask[n].bool()][-1] for n in range(len(a))])
    torch.testing.assert_close(pooled(a, TEXT, mask), mean)
    torch.testing.assert_close(pooled(a, Layout("tokens", pool="last"), mask), last)
    vit = Layout("tokens", prefix_tokens=1, grid=(2, 3), pool="first")
    tokens = torch.randn(2, 7, 4)
    torch.testing.assert_close(pooled(tokens, vit), tokens[:, 0])
    torch.testing.assert_close(pooled(tokens, Layout("tokens", prefix_tokens=1, grid=(2, 3))), tokens[:, 1:].mean(1))
    conv = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pooled(conv, CONV), conv.mean((2, 3)))
    torch.testing.assert_close(as_rows(conv, CONV)[5], conv[0, :, 1, 1])


def test_patch_grids_are_resized_bilinearly_and_prefix_tokens_kept():
    front, end = Layout("tokens", 2, (4, 4)), Layout("tokens", 2, (2, 2))
    a = torch.randn(3, 2 + 16, 6)
    out = resize(a, front, end, end.grid)
    grid = a[:, 2:].transpose(1, 2).reshape(3, 6, 4, 4)
    expected = F.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, :2], a[:, :2])
    torch.testing.assert_close(out[:, 2:], expected)
    stitch = make_stitch(a, front, torch.randn(3, 6, 6), end)
    assert isinstance(stitch, TokenStitch) and stitch(a).shape == (3, 6, 6)


def test_layouts_that_cannot_be_joined_say_why():
    assert "both be convolutional or both be transformers" in compatible(CONV, TEXT)
    assert "1 prefix" in compatible(Layout("tokens", 1, (2, 2)), Layout("tokens", 5, (2, 2)))
    assert "text sequence" in compatible(Layout("tokens", 0, (2, 2)), TEXT)
    assert compatible(TEXT, TEXT) is None
    with pytest.raises(ValueError, match="unknown layout kind"):
        Layout("graph")
