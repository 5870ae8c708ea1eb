"""The documentation cannot drift from the code: every Python block of the README and the docs
runs (a page's blocks in order, in one fresh interpreter), the tutorial notebook executes with
its outputs checked, and every relative link of the README points at a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a page carrying this line runs its examples in the slow set (``make test-full``)
SLOW = "<!-- examples: slow -->"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def _environment(tmp_path: Path) -> dict[str, str]:
    """A clean, offline place to run examples: caches and outputs under ``tmp_path``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "MPLBACKEND": "Agg",
            "STITCHING_ZOO": str(tmp_path / "zoo"), "STITCHING_DATA": str(tmp_path / "data"),
            "STITCHING_OUTPUTS": str(tmp_path / "outputs"), "PYTHONPATH": str(ROOT)}


def _example_pages():
    for page in PAGES:
        if _blocks(page):
            marks = [pytest.mark.slow] if SLOW in page.read_text() else []
            yield pytest.param(page, id=str(page.relative_to(ROOT)), marks=marks)


def test_the_pages_hold_examples():
    """The collector finds the README's and the API pages' examples (a broken pattern would
    otherwise test nothing)."""
    pages = {page.name for page in PAGES if _blocks(page)}
    assert {"README.md", "python-api.md", "own-models.md"} <= pages


@pytest.mark.parametrize("page", list(_example_pages()))
def test_every_python_block_of_the_page_runs(page: Path, tmp_path):
    code = "\n\n".join(_blocks(page))
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_environment(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{page.name}: an example failed\n{done.stderr[-3000:]}"


def test_the_tutorial_notebook_runs_and_shows_its_results(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the tutorial without outputs: CI executes it"
    env = {key: value for key, value in _environment(tmp_path).items() if key != "MPLBACKEND"}  # inline figures
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, errors
    text = "\n".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    rich = [output.get("data", {}) for output in outputs if output.output_type in ("execute_result", "display_data")]
    assert any("image/png" in data for data in rich), "the heatmaps are missing"
    assert any("layer2.0" in data.get("text/html", "") for data in rich), "the cut-point table is missing"
    accuracy = re.search(r"stitched accuracy (\d\.\d+)", text)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0
    assert re.search(r"DM into itself: penalty [+-]0\.000\d nats/token", text)
    assert re.search(r"TLM a → b: loss \d+\.\d+, end model \d+\.\d+, penalty [+-]\d+\.\d+", text)


def test_every_relative_link_of_the_readme_points_at_a_file():
    readme = (ROOT / "README.md").read_text()
    links = [target for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
             if not re.match(r"[a-z]+://", target)]
    assert links, "the README links into the docs"
    missing = [target for target in links if not (ROOT / target).exists()]
    assert not missing, f"README links to missing files: {missing}"
