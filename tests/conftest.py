"""Shared fixtures: the real Hydra config, shrunk to tiny CPU runs on embedded data."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs one worker per core: each worker (and every process it starts) gets its share of the
    # cores, since two torch processes with a thread per core each run over twice as slow
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    os.environ["MKL_NUM_THREADS"] = str(_threads)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from stitching.build import CONF_DIR  # noqa: E402

TINY = [
    "dataset=digits",
    "model=resnet18_narrow",
    "model.width=8",
    "zoo.recipe.epochs=4",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


def compose_config(*overrides: str):
    """The project's own config with ``overrides`` applied (no Hydra run directory)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """One base-model cache for the whole session: tiny models are trained once."""
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture()
def tiny_config(zoo_dir, tmp_path):
    """``tiny_config(*overrides)`` → a composed tiny config writing under ``tmp_path``."""

    def make(*overrides: str):
        return compose_config(*TINY, f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}",
                              f"paths.data_dir={tmp_path / 'data'}", *overrides)

    return make


def train_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``python -m stitching.train ARGV`` in this process (Hydra's basic launcher runs a
    sweep's cells here too): (exit code, stderr + stdout)."""
    from stitching import train
    from stitching.files import release_all

    monkeypatch.setattr(train, "_REFUSED", [])
    monkeypatch.setattr(sys, "argv", ["stitching.train", *train.with_default_layer_sweep(argv)])
    try:
        train.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        release_all()  # what the end of a `python -m` process does
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.fixture(scope="module")
def pair():
    """Two untrained timm ``test_resnet`` classifiers and 96 of scikit-learn's digits in [0, 1]."""
    import timm
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images[:96, None] / 16, dtype=torch.float32)
    y = torch.tensor(digits.target[:96])
    return timm.create_model("test_resnet", num_classes=10), timm.create_model("test_resnet", num_classes=10), x, y
