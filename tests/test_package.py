"""The package installs from a wheel (conf/ inside it) and runs from any folder."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_environment_stitches_from_a_temporary_folder(tmp_path):
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT),
         "-w", str(wheels))
    (wheel,) = wheels.glob("stitching_similarity-*.whl")
    env_dir = tmp_path / "env"
    _run(sys.executable, "-m", "venv", str(env_dir))
    python = env_dir / "bin" / "python"
    # the dependencies (torch, Lightning …) come from this environment's site-packages; stitching
    # itself only from the wheel
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "STITCHING_ZOO": str(tmp_path / "zoo"), "STITCHING_OUTPUTS": str(work / "out")}
    where = _run(str(python), "-c", "import stitching.train as t; print(t.__file__)", cwd=work, env=env).stdout
    assert where.startswith(str(site)), where
    _run(str(python), "-m", "stitching.train", "dataset=digits", "model=resnet18_narrow", "model.width=4",
         "zoo.recipe.epochs=1", "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none", "objective=dm",
         "stitch.layer=3", f"hydra.run.dir={work / 'run'}", cwd=work, env=env)
    record = json.loads((work / "run" / "results.json").read_text())
    assert record["status"] == "ok" and record["front_layer_name"] == "layer1.1"
