"""A saved stitched network is rebuilt exactly from the same two given models."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from sklearn.datasets import load_digits

import stitching
from stitching.engine import StitchedNetwork
from stitching.errors import StitchingError
from stitching.models import as_cuttable, cut


def _digits(n: int = 192):
    digits = load_digits()
    images = torch.tensor(digits.images[:n, None] / 16, dtype=torch.float32)
    return images, torch.tensor(digits.target[:n])


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x) -> None:
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("update_bn", [True, False])
def test_a_conv_stitch_round_trips_with_its_batchnorm_statistics(update_bn, tmp_path):
    torch.manual_seed(0)
    front, end = timm.create_model("test_resnet", num_classes=10), timm.create_model("test_resnet", num_classes=10)
    given = {k: v.clone() for k, v in end.state_dict().items()}
    x, y = _digits()
    result = stitching.stitch(front, end, "layer1.0", "layer2.0", objective="fula", train=(x, y), epochs=1,
                              batch_size=64, update_bn=update_bn, progress=False, trainer={"accelerator": "cpu"})
    path = result.save(tmp_path / "stitched.pt")
    loaded = stitching.load(path, front, end)
    _same_outputs(result.network, loaded, x[:32])
    assert all(torch.equal(v, given[k]) for k, v in end.state_dict().items())  # the given model untouched
    # the stitch alone (what stitch.pt holds) rebuilds the network only when no statistics moved
    bare = StitchedNetwork(cut(as_cuttable(copy.deepcopy(front)), "layer1.0").head, copy.deepcopy(result.stitch),
                           cut(as_cuttable(copy.deepcopy(end)), "layer2.0").tail).eval()
    with torch.no_grad():
        assert torch.equal(bare(x[:32]), loaded(x[:32])) == (not update_bn)


def test_token_stitches_round_trip_for_a_vit_and_a_language_model(tmp_path):
    from tests.test_language import VOCAB, _counting, tiny

    torch.manual_seed(0)
    vit_front, vit_end = timm.create_model("test_vit", num_classes=10), timm.create_model("test_vit", num_classes=10)
    x, y = _digits(96)
    vit = stitching.stitch(vit_front, vit_end, 2, 3, objective="tlm", train=(x, y), epochs=1, batch_size=32,
                           progress=False, trainer={"accelerator": "cpu"})
    _same_outputs(vit.network, stitching.load(vit.save(tmp_path / "vit.pt"), vit_front, vit_end), x[:16])
    front, end = tiny("llama", seed=0), tiny("llama", seed=1)
    ids = _counting(48, torch.Generator().manual_seed(0))
    lm = stitching.stitch(front, end, 2, 3, objective="tlm", train=ids, epochs=1, batch_size=16, lr=1e-2,
                          progress=False, trainer={"accelerator": "cpu"})
    assert lm.stitch.weight.shape[0] == 32 and VOCAB == 97
    _same_outputs(lm.network, stitching.load(lm.save(tmp_path / "lm.pt"), front, end), ids[:8])


def test_loading_onto_other_models_or_a_wrong_file_is_one_line(tmp_path):
    torch.manual_seed(0)
    front, end = timm.create_model("test_resnet", num_classes=10), timm.create_model("test_resnet", num_classes=10)
    x, y = _digits(128)
    result = stitching.stitch(front, end, 2, 3, objective="dm", train=(x, y), progress=False,
                              trainer={"accelerator": "cpu"})
    path = result.save(tmp_path / "stitched.pt")
    other = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(StitchingError, match="the end model given is not the one .* was trained with"):
        stitching.load(path, front, other)
    torch.save(result.stitch.state_dict(), tmp_path / "stitch.pt")
    with pytest.raises(StitchingError, match="is not a saved stitched network"):
        stitching.load(tmp_path / "stitch.pt", front, end)
    with pytest.raises(StitchingError, match="no saved stitched network at"):
        stitching.load(tmp_path / "missing.pt", front, end)


def test_run_folders_hold_the_network_each_grid_cell_included(tiny_config, tmp_path):
    """A grid cell trained interleaved with others (grouped BatchNorm) reloads from its run
    folder and scores its recorded test accuracy exactly."""
    import json

    from stitching.build import setup
    from stitching.grids import run_grid

    cfg = tiny_config("objective=hint", "grid.pairs=[[2,3],[4,3],[3,5]]")
    assert not run_grid(cfg, tmp_path / "grid", progress=False)["failed"]
    done = setup(cfg)
    images, labels = done.datamodule.test_tensors()
    for folder in sorted((tmp_path / "grid" / "hint").iterdir()):
        record = json.loads((folder / "results.json").read_text())
        network = stitching.load(folder / "network.pt", done.front, done.end)
        with torch.no_grad():
            accuracy = (network(images).argmax(1) == labels).float().mean().item()
        assert accuracy == pytest.approx(record["metrics"]["test/acc"], abs=1e-6), folder.name
