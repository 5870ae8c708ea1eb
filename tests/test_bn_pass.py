"""DM's running-statistics pass (``stitch.dm_bn_pass``, the FuLA paper's Fig. 3): after the
closed-form fit, one epoch of the training data through the stitched network, no gradient —
checked against the same pass written out by hand."""

import copy

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import stitching
from stitching.errors import StitchingError


def _models():
    torch.manual_seed(3)
    front = timm.create_model("test_resnet", num_classes=4).eval()
    end = timm.create_model("test_resnet", num_classes=4).eval()
    return front, end


def _bn_buffers(network):
    return {k: v.clone() for k, v in network.state_dict().items() if "running_" in k or "num_batches" in k}


def test_the_pass_updates_the_running_statistics_as_one_epoch_of_forward_passes_by_hand():
    front, end = _models()
    x, y = torch.rand(96, 3, 32, 32), torch.randint(0, 4, (96,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)  # one order for both ways
    common = dict(objective="dm", train=loader, test=(x[:32], y[:32]), progress=False, dm_samples=32)
    plain = stitching.stitch(front, end, 2, 2, **common)
    passed = stitching.stitch(front, end, 2, 2, dm_bn_pass=True, **common)
    assert torch.equal(plain.stitch.weight, passed.stitch.weight)  # the pass trains nothing
    # by hand: the DM network, BatchNorm in train mode, every training batch forward once
    by_hand = copy.deepcopy(plain.network).train()
    with torch.no_grad():
        for batch, _ in loader:
            by_hand(batch)
    expected, got, before = _bn_buffers(by_hand), _bn_buffers(passed.network), _bn_buffers(plain.network)
    assert expected.keys() == got.keys() and len(got) > 4
    for key in expected:
        assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-5), key
    moved = [k for k in got if "running_mean" in k and not torch.allclose(got[k], before[k])]
    assert moved, "the pass left every running mean where DM alone leaves it"
    # the given models are never changed
    fresh_front, fresh_end = _models()
    assert all(torch.equal(a, b) for a, b in zip(front.state_dict().values(), fresh_front.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(end.state_dict().values(), fresh_end.state_dict().values()))


def test_the_pass_is_refused_where_it_cannot_apply():
    front, end = _models()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 4, (32,))
    with pytest.raises(StitchingError, match="stitch.dm_bn_pass=true applies to objective dm only"):
        stitching.stitch(front, end, 2, 2, objective="hint", train=(x, y), dm_bn_pass=True, progress=False)
    with pytest.raises(StitchingError, match="stitch.update_bn=false keeps them; choose one"):
        stitching.stitch(front, end, 2, 2, objective="dm", train=(x, y), dm_bn_pass=True, update_bn=False,
                         progress=False)


def test_the_command_line_refuses_the_pass_with_frozen_statistics(tiny_config):
    from stitching.build import read_settings

    with pytest.raises(StitchingError, match="choose one"):
        read_settings(tiny_config("objective=dm", "stitch.dm_bn_pass=true", "stitch.update_bn=false"))
    assert read_settings(tiny_config("objective=dm", "stitch.dm_bn_pass=true")).stitch.dm_bn_pass is True
