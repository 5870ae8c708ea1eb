"""The Python API: two models in, a trained stitch and its metrics out, no Hydra."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import stitching
from stitching.errors import StitchingError

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np, torch, timm
    from sklearn.datasets import load_digits
    import stitching

    digits = load_digits()
    images = torch.tensor(digits.images[:, None] / 16, dtype=torch.float32)  # [N, 1, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    front = timm.create_model("test_resnet", num_classes=10)
    end = timm.create_model("test_convnext", num_classes=10)
    print("cut points:", [p.name for p in stitching.cut_points(front)][:3])
    started = time.perf_counter()
    result = stitching.stitch(front, end, "layer2.0", "stages.1.blocks.0", objective="fula",
                              train=(images[:256], labels[:256]), test=(images[256:384], labels[256:384]),
                              epochs=1, batch_size=64, progress=False)
    print("metrics", sorted(result.metrics), round(time.perf_counter() - started, 1))
    print("stitch", type(result.stitch).__name__, tuple(result.stitch.weight.shape))
    print("hydra imported:", any(m == "hydra" or m.startswith("hydra.") for m in sys.modules))
""")


def test_the_api_stitches_two_timm_models_from_a_plain_script(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "cut points: ['maxpool', 'layer1.0', 'layer2.0']" in out
    assert "'test/acc'" in out and "'train/loss'" in out and "'test/loss'" in out
    assert "stitch Stitch" in out and "hydra imported: False" in out


def test_the_api_leaves_the_given_models_untouched_and_trains_the_stitch():
    torch.manual_seed(1)
    front = timm.create_model("test_resnet", num_classes=4).eval()
    end = timm.create_model("test_resnet", num_classes=4)  # in train mode, as timm makes it
    modes = {m: m.training for m in [*front.modules(), *end.modules()]}
    before = {k: v.clone() for k, v in {**front.state_dict(), **{f"end.{k}": v for k, v in end.state_dict().items()}}.items()}
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 4, (64,))
    dm = stitching.stitch(front, end, 2, 2, objective="dm", train=(x, y), epochs=1, progress=False)
    trained = stitching.stitch(front, end, 2, 2, objective="tlm", train=(x, y), epochs=2, batch_size=16,
                               progress=False)
    after = {**front.state_dict(), **{f"end.{k}": v for k, v in end.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training == mode for m, mode in modes.items())  # not even a module's mode moves
    assert not torch.equal(dm.stitch.weight, trained.stitch.weight)  # TLM moved away from its DM start
    assert {"test/acc", "test/loss"} <= set(dm.metrics) and "train/loss" in trained.metrics
    assert trained.front.name == "layer1.0" and trained.end.layout.kind == "conv"


def test_api_bad_input_is_one_clear_error():
    front = timm.create_model("test_resnet", num_classes=4)
    vit = timm.create_model("test_vit", num_classes=4)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,))
    with pytest.raises(StitchingError, match="unknown layer 'layer9.9'; this model's cut points are 1=maxpool"):
        stitching.stitch(front, front, "layer9.9", 1, train=(x, y))
    with pytest.raises(StitchingError, match="both be convolutional or both be transformers"):
        stitching.stitch(front, vit, 1, 1, train=(x, y))
    with pytest.raises(StitchingError, match="8 inputs but 7 labels"):
        stitching.stitch(front, front, 1, 1, train=(x, y[:7]))
