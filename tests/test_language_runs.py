"""Language-model stitching as a user runs it: models trained here on the embedded corpus,
every objective, the penalty in the record, and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config, train_cli

pytest.importorskip("transformer_lens")

LM_TINY = ["dataset=pydoc", "model=lm_gelu", "model.width=32", "model.depth=2", "zoo.recipe.language.tokens=20000",
           "dataset.train_sequences=64", "dataset.test_sequences=16", "dataset.batch_size=16", "trainer=cpu",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none"]


@pytest.fixture(scope="module")
def lm_config(tmp_path_factory):
    """``lm_config(*overrides)``: a tiny language-model config sharing one zoo for the module."""
    zoo = tmp_path_factory.mktemp("lm-zoo")

    def make(tmp_path, *overrides):
        return compose_config(*LM_TINY, f"paths.zoo_dir={zoo}", f"paths.output_dir={tmp_path}", *overrides)

    make.zoo = zoo
    return make


def test_the_embedded_corpus_is_split_and_cut_into_real_tokens():
    from stitching.data.text import ByteTokenizer, embedded_documents, sequences

    train, test = embedded_documents("pydoc")
    assert len(train) == len(test) == 79 and all(a.endswith("\n") or not b for a, b in zip(train, test))
    ids = sequences(test, ByteTokenizer(), 64)
    text = "".join(test)
    assert ids.shape[1] == 64 and len(text.encode()) + len(test) - 64 < ids.numel() <= len(text.encode()) + len(test)
    assert ByteTokenizer().decode(ids[0]) == text.encode()[:64].decode("utf-8", errors="replace")


def test_a_runs_training_order_is_its_seed_alone():
    """Whatever was drawn before (models loaded, other runs), a run's batches come in the order
    its seed gives; another seed, another order; a base model's training keeps the global generator."""
    import torch

    from stitching.data.text import TextDataModule

    def first_batch(stream_seed, drawn_before):
        data = TextDataModule(batch_size=8, train_sequences=64)
        data.stream_seed = stream_seed
        torch.manual_seed(drawn_before)
        return next(iter(data.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(3, 0), first_batch(3, 1))
    assert not torch.equal(first_batch(3, 0), first_batch(4, 0))
    assert not torch.equal(first_batch(None, 0), first_batch(None, 1))


@pytest.mark.parametrize("objective", ["dm", "hint", "fula", "slm", "tlm"])
def test_each_objective_runs_between_gelu_and_solu_models_trained_here(objective, lm_config, tmp_path):
    from stitching.runs import run

    record = run(lm_config(tmp_path, f"objective={objective}", "end.arch=lm_solu", "stitch.front_layer=2",
                           "stitch.end_layer=3"), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["end_layer_name"] == "blocks.1"
    m = saved["metrics"]
    assert m["test/penalty"] == pytest.approx(m["test/loss"] - m["test/end_loss"], abs=1e-4)
    assert 0 < m["test/end_loss"] < 6  # nats per byte, better than uniform over 257 ids (5.55) after training
    assert saved["base"]["end"]["source"]["kind"] == "trained here" and saved["base"]["end"]["test_loss"] > 0
    assert saved["inputs"]["front"] == {"tokenizer": "bytes", "context": 64}
    assert record["evaluation"]["kind"] == "text"
    assert record["evaluation"]["subsets"]["train_sequences"]["kept"] == 64  # the run's sample of the corpus …
    zoo_record = json.loads((lm_config.zoo / f"{saved['base']['end']['key']}.json").read_text())
    assert zoo_record["data"]["train_sequences"] == record["evaluation"]["subsets"]["train_sequences"]["of"] > 64  # … never the base model's


def _tokenizer_folder(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[MASK]", *sorted({w for w in "the a of to and in is for on with as by".split()})]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[UNK]",
                            mask_token="[MASK]").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides, expected", [
    (["dataset.tokenizer=@tokenizer"], "front, end and data must share one tokenizer"),
    (["dataset.tokenizer=/nonexistent/tokenizer"], "no tokenizer can be read from /nonexistent/tokenizer"),
    (["stitch.layer=5"], "layer 5 is out of range: this model has cut points 1..3"),
    (["dataset.context=128", "front.checkpoint=@front64"],  # a model trained here at 128 is another model
     "sequences of 128 tokens are longer than the front model's context of 64"),
    (["dataset.corpus=NeelNanda/pile-10k"], "corpus 'NeelNanda/pile-10k' cannot be loaded"),
    (["front.arch=resnet18", "front.width=8", "front.depth=null"], "the front model is an image model (front.arch=resnet18) but pydoc is text"),
    (["objective=tlm", "attack.alpha=0.5"], "adversarial stitching (attack.alpha > 0) applies to image classifiers only"),
    (["objective=tlm", "trainer.strategy=ddp"], "evaluation.self_baseline trains the self-stitch baselines in one process"),
], ids=["tokenizer-mismatch", "tokenizer-missing", "layer-beyond-depth", "longer-than-context", "corpus-offline",
        "image-model-on-text", "adversarial-text", "baseline-under-ddp"])
def test_language_model_bad_input_is_one_line(overrides, expected, lm_config, tmp_path, monkeypatch, capsys):
    from stitching.runs import run

    run(lm_config(tmp_path, "objective=dm", "stitch.layer=2"), tmp_path / "warm")  # models trained at context 64
    folder = str(_tokenizer_folder(tmp_path / "tokenizer"))
    front64 = str(next(Path(lm_config.zoo).glob("lm_gelu-w32-d2-pydoc-s0-t*.pt")))
    overrides = [o.replace("@tokenizer", folder).replace("@front64", front64) for o in overrides]
    if not any(o.startswith("stitch.layer") for o in overrides):
        overrides.append("stitch.layer=2")
    code, output = train_cli([*LM_TINY, f"paths.zoo_dir={lm_config.zoo}", f"paths.output_dir={tmp_path}",
                              f"hydra.run.dir={tmp_path / 'bad'}", *overrides], monkeypatch, capsys)
    assert code != 0 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], output[-2000:]
    assert not (tmp_path / "bad" / "results.json").exists() or \
        json.loads((tmp_path / "bad" / "results.json").read_text())["status"] != "ok"


def _records(folder: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(folder.rglob("results.json"))}


def test_a_grid_shares_one_self_stitch_baseline_per_end_layer(lm_config, tmp_path, monkeypatch):
    """GeLU → SoLU: every cell's adjusted penalty is its loss minus the SoLU model's own
    self-stitch (read back from the baseline's record), one baseline per end layer, kept for
    the next grid and read back with no set-up; a baseline made on other weights is refused,
    never subtracted."""
    import stitching.runs
    from stitching.grids import run_grid

    cells = "grid.pairs=[[1,2],[2,2],[3,2],[2,3]]"
    cfg = lm_config(tmp_path, "objective=tlm", "end.arch=lm_solu", cells)
    summary = run_grid(cfg, tmp_path / "grid", progress=False)
    assert not summary["failed"] and len(summary["done"]) == 4
    store = tmp_path / "baselines"
    baselines = _records(store)
    assert sorted(baselines) == ["f2-e2", "f3-e3"]  # one per end layer, not one per cell
    for record in baselines.values():
        assert record["status"] == "ok" and record["base"]["front"]["key"] == record["base"]["end"]["key"]
    for name, record in _records(tmp_path / "grid").items():
        m, own = record["metrics"], baselines[f"f{record['end_layer']}-e{record['end_layer']}"]["metrics"]
        assert record["base"]["front"]["key"] != record["base"]["end"]["key"]
        assert m["test/baseline_loss"] == pytest.approx(own["test/loss"], abs=1e-7)
        assert m["test/adjusted_penalty"] == pytest.approx(m["test/loss"] - own["test/loss"], abs=1e-6)
        assert m["test/penalty"] == pytest.approx(m["test/adjusted_penalty"] + own["test/loss"] - own["test/end_loss"],
                                                  abs=1e-4)
        assert record["baseline"]["from"] == "baseline store", name
    made = {path: path.stat().st_mtime_ns for path in store.rglob("results.json")}

    def no_setup(*args, **kwargs):
        raise AssertionError("a stored baseline was set up again")

    monkeypatch.setattr(stitching.runs, "setup", no_setup)  # the store's records are read, no data or model loaded
    again = run_grid(lm_config(tmp_path, "objective=tlm", "end.arch=lm_solu", cells), tmp_path / "again",
                     progress=False)
    assert len(again["done"]) == 4 and made == {path: path.stat().st_mtime_ns for path in store.rglob("results.json")}
    tampered = next(iter(made))  # the same config, other weights or data: its end loss disagrees
    record = json.loads(tampered.read_text())
    record["metrics"]["test/end_loss"] += 0.1
    tampered.write_text(json.dumps(record))
    third = run_grid(lm_config(tmp_path, "objective=tlm", "end.arch=lm_solu", cells), tmp_path / "third",
                     progress=False)
    assert third["failed"] and all("measured the end model's own loss" in error for _, error in third["failed"])
    status = {name: record["status"] for name, record in _records(tmp_path / "third").items()}
    assert status == {name: "failed" if name.endswith(tampered.parent.name[-3:]) else "ok" for name in status}


def test_grids_that_differ_in_their_front_alone_share_one_engine(lm_config, tmp_path):
    """A GeLU and a SoLU front into one SoLU end: the two grids train in one engine (data and end
    set up once, the tails taking both fronts' stitches at once), and every cell's record is the
    one its own grid writes alone, in its own folder."""
    from stitching.grids import run_grid, run_grids

    common = ["objective=tlm", "end.arch=lm_solu", "end.seed=1", "evaluation.self_baseline=false"]
    cells = {"lm_gelu": "grid.pairs=[[1,2],[2,2],[3,3]]", "lm_solu": "grid.pairs=[[2,2],[3,1]]"}
    configs = [(lm_config(tmp_path, *common, f"front.arch={arch}", pairs), tmp_path / "together" / arch)
               for arch, pairs in cells.items()]
    told = []
    summaries = run_grids(configs, progress=False, report=lambda k, summary: told.append(k))
    assert sorted(told) == [0, 1] and [len(summary["done"]) for summary in summaries] == [3, 2]
    for (cfg, folder), arch in zip(configs, cells):
        alone = tmp_path / "alone" / arch
        assert not run_grid(cfg, alone, progress=False)["failed"]
        shared, own = _records(folder), _records(alone)
        assert sorted(shared) == sorted(own)
        for name, record in shared.items():
            assert record["timings"]["fused_cells"] == 5 and own[name]["timings"]["fused_cells"] == len(own)
            assert record["config_hash"] == own[name]["config_hash"]
            assert record["base"] == own[name]["base"]
            assert record["metrics"] == pytest.approx(own[name]["metrics"], rel=1e-5, abs=1e-6), name
    again = run_grids(configs, progress=False)  # a rerun keeps both grids as they are
    assert [len(summary["skipped"]) for summary in again] == [3, 2]


def test_grids_that_differ_in_their_models_share_one_engine(lm_config, tmp_path):
    """Two fronts × two ends (the GeLU/SoLU preset's layout): the four grids train in one engine,
    each front model loaded and run once however many ends read it, and every cell's record is the
    one its own grid writes alone."""
    from stitching.grids import run_grid, run_grids

    cells = "grid.pairs=[[1,2],[3,3]]"
    combos = [(arch, seed) for arch in ("lm_gelu", "lm_solu") for seed in (1, 2)]
    configs = [(lm_config(tmp_path, "objective=tlm", "end.arch=lm_solu", f"end.seed={seed}", f"front.arch={arch}",
                          "evaluation.self_baseline=false", cells), tmp_path / "together" / f"{arch}_{seed}")
               for arch, seed in combos]
    summaries = run_grids(configs, progress=False)
    assert [len(summary["done"]) for summary in summaries] == [2] * 4
    for cfg, folder in configs:
        alone = folder.parent.parent / "alone" / folder.name
        assert not run_grid(cfg, alone, progress=False)["failed"]
        shared, own = _records(folder), _records(alone)
        assert sorted(shared) == sorted(own)
        for name, record in shared.items():
            assert record["timings"]["fused_cells"] == 8
            assert record["config_hash"] == own[name]["config_hash"] and record["base"] == own[name]["base"]
            assert record["metrics"] == pytest.approx(own[name]["metrics"], rel=1e-5, abs=1e-6), name
    end_losses = {folder.name: _records(folder)["f3-e3"]["metrics"]["test/end_loss"] for _, folder in configs}
    assert end_losses["lm_gelu_1"] == end_losses["lm_solu_1"] != end_losses["lm_gelu_2"] == end_losses["lm_solu_2"]



def test_grids_into_ends_of_another_task_train_apart(lm_config, tmp_path, monkeypatch):
    """An end that would score its cells otherwise (another task or label set) never shares the
    engine of the sweep's first end: its grids train one engine each."""
    import stitching.grids
    from stitching.grids import run_grids

    real, seen = stitching.grids.task_of, []

    def task(end):  # every end but the first taken for a model of another task
        seen.append(end) if not seen else None
        return real(end) if end is seen[0] else object()

    monkeypatch.setattr(stitching.grids, "task_of", task)
    configs = [(lm_config(tmp_path, "objective=tlm", "end.arch=lm_solu", f"end.seed={seed}", f"front.arch={arch}",
                          "evaluation.self_baseline=false", "grid.pairs=[[3,3]]"), tmp_path / f"{arch}_{seed}")
               for arch in ("lm_gelu", "lm_solu") for seed in (1, 2)]
    assert all(len(summary["done"]) == 1 for summary in run_grids(configs, progress=False))
    assert {folder.name: _records(folder)["f3-e3"]["timings"]["fused_cells"] for _, folder in configs} == \
        {"lm_gelu_1": 2, "lm_gelu_2": 1, "lm_solu_1": 2, "lm_solu_2": 1}


def test_a_self_stitching_grid_is_its_own_baseline(lm_config, tmp_path):
    """Front = end: the diagonal cells are their own baselines (adjusted 0), an off-diagonal
    cell subtracts its end layer's diagonal cell; nothing goes to the store."""
    from stitching.grids import run_grid

    cfg = lm_config(tmp_path, "objective=hint", "front.seed=1", "grid.pairs=all")
    assert not run_grid(cfg, tmp_path / "grid", progress=False)["failed"]
    records = _records(tmp_path / "grid")
    assert len(records) == 9 and not (tmp_path / "baselines").exists()
    for name, record in records.items():
        i, j, m = record["front_layer"], record["end_layer"], record["metrics"]
        diagonal = records[f"f{j}-e{j}"]["metrics"]["test/loss"]
        assert m["test/adjusted_penalty"] == pytest.approx(m["test/loss"] - diagonal, abs=1e-6), name
        assert record["baseline"]["from"] == ("this run" if i == j else "this grid")


def test_a_front_identical_to_the_end_has_no_adjusted_penalty(lm_config, tmp_path):
    """The end model's own weights given as the front (another config, so the baseline is
    trained apart): the raw TLM penalty is what training on the corpus gains; adjusted, 0."""
    from stitching.runs import run

    first = run(lm_config(tmp_path, "objective=tlm", "stitch.layer=2"), tmp_path / "first")
    weights = first["base"]["end"]["source"]["path"]
    record = run(lm_config(tmp_path, "objective=tlm", "stitch.layer=2", f"front.checkpoint={weights}", "front.seed=1"),
                 tmp_path / "same")
    m = record["metrics"]
    assert record["baseline"]["from"] == "baseline store"
    assert m["test/penalty"] < -1e-3  # the stitch adapted the end model to this corpus
    assert m["test/adjusted_penalty"] == pytest.approx(0, abs=1e-5)


def test_a_gelu_solu_sweep_reports_the_penalty_by_direction(lm_config, tmp_path, monkeypatch, capsys):
    """Four directions × two layers, DM: one report with a penalty table and figure."""
    import pandas as pd

    from stitching.report import report

    sweep = tmp_path / "sweep"
    code, output = train_cli(["-m", *LM_TINY, f"paths.zoo_dir={lm_config.zoo}", "objective=dm",
                              "front.arch=lm_gelu,lm_solu", "end.arch=lm_gelu,lm_solu", "end.seed=1", "stitch.layer=2,3",
                              f"hydra.sweep.dir={sweep}"], monkeypatch, capsys)
    assert code == 0, output[-2000:]
    made = report(sweep)
    table = made["penalty_table"]
    assert list(table.columns) == ["lm_gelu → lm_gelu", "lm_gelu → lm_solu", "lm_solu → lm_gelu", "lm_solu → lm_solu"]
    assert all("[raw " in cell and "self " in cell for cell in table.to_numpy().ravel())
    assert list(table.index.get_level_values("layer")) == [2, 3]
    assert made["penalty"].is_file() and (sweep / "penalty.md").is_file()
    frame = pd.read_csv(made["results"])
    assert len(frame) == 8 and frame.test_penalty.notna().all() and (frame.status == "ok").all()


def _hf_folder(folder):
    """A tiny Llama saved as a Hugging Face folder with its own (word-level) tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _tokenizer_folder(folder)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder)
    return folder


def test_a_hugging_face_folder_stitches_into_itself_from_the_command_line(tmp_path, monkeypatch, capsys):
    folder = str(_hf_folder(tmp_path / "tiny-llama"))
    common = [*LM_TINY, f"paths.zoo_dir={tmp_path / 'zoo'}", f"paths.output_dir={tmp_path}", "objective=dm",
              f"dataset.tokenizer={folder}", "model.arch=hf", f"model.name={folder}", "stitch.layer=model.layers.0"]
    code, output = train_cli([*common, f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 0, output[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert abs(record["metrics"]["test/penalty"]) < 0.01  # DM of a model into itself keeps its loss
    source = record["base"]["front"]["source"]
    assert source["kind"] == "file" and len(source["sha256"]) == 64 and source["path"].endswith("model.safetensors")
    assert record["inputs"]["front"]["tokenizer"].startswith("vocab-")
    code, output = train_cli([*common, "end.arch=lm_gelu", "stitch.end_layer=2", f"hydra.run.dir={tmp_path / 'mixed'}"],
                             monkeypatch, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "must share one tokenizer" in errors[0], output[-2000:]
    assert not list((tmp_path / "zoo").glob("lm_gelu*.pt"))  # refused before the GeLU model was trained


def test_a_hub_language_model_offline_is_one_line(tmp_path, monkeypatch, capsys):
    code, output = train_cli([*LM_TINY, f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}", "model.arch=hf",
                              "model.name=EleutherAI/pythia-70m", "stitch.layer=2", f"hydra.run.dir={tmp_path / 'r'}"],
                             monkeypatch, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in output and len(errors) == 1, output[-2000:]
    assert "hf model 'EleutherAI/pythia-70m' cannot be loaded from the hub (offline?)" in errors[0]


def test_the_similarity_tool_compares_language_models_over_token_positions(lm_config, tmp_path, capsys):
    """Over the sequences a stitching run tests on (``dataset.test_sequences``, spread across the
    split), at most ``--images`` of them: the grid equals one computed by hand on that run's data."""
    from stitching.build import build_datamodule, load_models, read_settings
    from stitching.similarity.__main__ import main
    from stitching.similarity.grid import similarity_grids

    overrides = [*LM_TINY, f"paths.zoo_dir={lm_config.zoo}", "end.arch=lm_solu", "end.seed=1"]
    for images, sequences in (("8", 8), ("100", 16)):  # LM_TINY's dataset.test_sequences=16
        main(["--index", "cka", "--flatten", "positions", "--images", images, "--no-progress",
              "--out", str(tmp_path / images), *overrides])
        record = json.loads((tmp_path / images / "similarity.json").read_text())
        assert record["images"] == sequences and record["flatten"] == "positions"
    assert list(record["front_layers"].values()) == ["embed", "blocks.0", "blocks.1"]
    printed = capsys.readouterr().out
    assert "linear CKA" in printed and "16 pydoc test sequences" in printed and record["inputs"] == "sequences"
    settings = read_settings(lm_config(tmp_path, "end.arch=lm_solu", "end.seed=1"))
    run_data = build_datamodule(settings)  # what a stitching run with these settings tests on
    front, _, end, _ = load_models(settings, ([], []), stitched=False)
    grids, _ = similarity_grids(front, end, run_data.test_inputs(), ["cka"], "positions", 250, "cpu", False)
    assert np.allclose(np.array(record["grids"]["cka"], dtype=float), grids["cka"], atol=1e-9)


def test_a_bare_encoder_folder_stitches_by_dm_and_reports_its_output_error(tmp_path, monkeypatch, capsys):
    """A sentence encoder (BERT with no head): DM between its layers, scored by the relative
    error of the stitched output against the encoder's own."""
    folder = _bert_folder(tmp_path / "tiny-bert", "BertModel")
    code, output = train_cli([*LM_TINY, f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}", "objective=dm",
                              f"dataset.tokenizer={folder}", "model.arch=hf", f"model.name={folder}",
                              "stitch.front_layer=2", "stitch.end_layer=3", f"hydra.run.dir={tmp_path / 'run'}"],
                             monkeypatch, capsys)
    assert code == 0, output[-3000:]
    assert "stitched output's relative error to the end model's own" in output
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 < record["metrics"]["test/loss"] < 1 and "test/penalty" not in record["metrics"]
    assert "baseline" not in record  # no penalty, no self-stitch baseline; asking for one is one line
    code, output = train_cli([*LM_TINY, f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}", "objective=dm",
                              f"dataset.tokenizer={folder}", "model.arch=hf", f"model.name={folder}",
                              "stitch.layer=2", "evaluation.self_baseline=true", f"hydra.run.dir={tmp_path / 'asked'}"],
                             monkeypatch, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "self_baseline=true applies to language models" in errors[0], output[-2000:]


def _bert_folder(folder, head, **config):
    """A tiny random BERT (``head``: BertForMaskedLM, BertModel, …) with a word-level tokenizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig

    _tokenizer_folder(folder)
    vocab = len(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    torch.manual_seed(0)
    getattr(transformers, head)(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=128, **config)
                               ).save_pretrained(folder)
    return str(folder)


def test_the_masked_token_task_masks_real_tokens_and_scores_only_them():
    import torch

    from stitching.objectives.tasks import IGNORE, MaskedToken

    task = MaskedToken(mask_id=1)
    ids = torch.randint(2, 50, (8, 40))
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0  # padding is never masked, never scored
    batch = {"input_ids": ids, "attention_mask": mask}
    x, labels = task.split(batch)
    chosen = labels != IGNORE
    assert not chosen[:, 30:].any() and 0.08 < chosen[:, :30].float().mean() < 0.25
    assert torch.equal(x["input_ids"][chosen], torch.ones(int(chosen.sum()), dtype=torch.long))
    assert torch.equal(x["input_ids"][~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(task.split(batch)[1], labels)  # test masks: the same every time
    assert not torch.equal(task.split(batch, train=True)[1], task.split(batch, train=True)[1])  # training: fresh
    logits = torch.randn(8, 40, 50)
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[n, t], ids[n, t])
                            for n, t in chosen.nonzero().tolist()]).mean()
    assert torch.allclose(task.loss(logits, labels), expected, atol=1e-6)


def test_a_masked_language_model_stitches_by_its_masked_token_loss(tmp_path, monkeypatch, capsys):
    """BERT with its MLM head: TLM is the masked-token cross-entropy; DM into itself keeps it."""
    folder = _bert_folder(tmp_path / "tiny-mlm", "BertForMaskedLM")
    common = [*LM_TINY, f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}", f"dataset.tokenizer={folder}",
              "model.arch=hf", f"model.name={folder}", "stitch.layer=2"]
    for objective in ("dm", "tlm"):
        code, output = train_cli([*common, f"objective={objective}", f"hydra.run.dir={tmp_path / objective}"],
                                 monkeypatch, capsys)
        assert code == 0, output[-3000:]
        metrics = json.loads((tmp_path / objective / "results.json").read_text())["metrics"]
        assert metrics["test/end_loss"] > 0 and {"test/loss", "test/penalty"} <= set(metrics)
    dm = json.loads((tmp_path / "dm" / "results.json").read_text())["metrics"]
    assert abs(dm["test/penalty"]) < 0.01


def _neox_folder(folder, depth, tokenizer):
    """A tiny random GPT-NeoX (Pythia's architecture) of ``depth`` blocks, sharing ``tokenizer``."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    shutil.copytree(tokenizer, folder)
    torch.manual_seed(depth)
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(str(tokenizer)).get_vocab()), hidden_size=32,
        num_hidden_layers=depth, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
    )).save_pretrained(folder)
    return str(folder)


def test_models_of_different_depths_are_compared_per_relative_depth(tmp_path, capsys):
    """The Pythia preset offline: CKA grids between GPT-NeoX models of 2, 4 and 4 blocks; the
    report pairs each front layer with the end layer of the nearest relative depth."""
    import pandas as pd

    from stitching.report import report
    from stitching.results.tables import corresponding_depth
    from stitching.similarity.__main__ import main

    tokenizer = _tokenizer_folder(tmp_path / "tokenizer")
    short, deep = _neox_folder(tmp_path / "neox-2", 2, tokenizer), _neox_folder(tmp_path / "neox-4", 4, tokenizer)
    sweep = tmp_path / "pythia"
    for end in (deep, short):
        main(["--index", "minibatch_cka,cka", "--images", "8", "--batch-size", "4", "--no-progress",
              "--out", str(sweep / Path(end).name), "experiment=lm_pythia", f"front.name={short}", f"end.name={end}",
              "dataset.corpus=pydoc", f"dataset.tokenizer={short}", "dataset.context=32", "logger=none",
              f"paths.zoo_dir={tmp_path / 'zoo'}"])
    record = json.loads((sweep / "neox-4" / "similarity.json").read_text())
    assert record["front_depths"] == {"1": 0.0, "2": 0.5, "3": 1.0}
    assert record["end_depths"] == {"1": 0.0, "2": 0.25, "3": 0.5, "4": 0.75, "5": 1.0}
    made = report(sweep)
    cells = corresponding_depth(made["frame"])
    pair = cells[(cells["index"] == "cka") & cells.end_model.str.endswith("neox-4")]
    assert list(pair.end_layer) == [1, 3, 5]  # depths 0, 0.5, 1 on both sides
    grid = record["grids"]["cka"]
    assert list(pair.score) == pytest.approx([grid[0][0], grid[1][2], grid[2][4]])
    assert made["depth"].is_file() and (sweep / "depth.md").is_file()
    table = pd.read_fwf(sweep / "depth.md")  # one row per index × front model
    assert len(table) >= 2


def _pairs_folder(folder, splits, heuristic=False):
    """Sentence pairs as ``<split>.jsonl``, with labels a tiny classifier can be scored on."""
    import random

    words = "the a of to and in is for on with as by".split()
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for split, count in splits.items():
        rows = [{"premise": " ".join(rng.choices(words, k=rng.randint(3, 12))),
                 "hypothesis": " ".join(rng.choices(words, k=rng.randint(2, 8))), "label": rng.randrange(3 - heuristic),
                 **({"heuristic": rng.choice(["lexical_overlap", "subsequence"])} if heuristic else {})}
                for _ in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_a_sentence_pair_classifier_stitches_on_mnli_shaped_pairs_and_scores_the_challenge_set(
        tmp_path, monkeypatch, capsys):
    """The BERT/HANS preset offline: a tiny random 3-class BERT on local MNLI-shaped pairs (padded
    per batch) and a HANS-shaped challenge set filtered to lexical overlap."""
    from stitching.data.text import PairDataset, pair_rows
    from stitching.models.language import load_language_model

    folder = _bert_folder(tmp_path / "tiny-nli", "BertForSequenceClassification", num_labels=3)
    mnli = _pairs_folder(tmp_path / "mnli", {"train": 64, "validation_matched": 24})
    hans = _pairs_folder(tmp_path / "hans", {"validation": 40}, heuristic=True)
    common = [*LM_TINY, "dataset=mnli", f"dataset.corpus={mnli}", f"dataset.challenge.corpus={hans}",
              "dataset.context=24", f"dataset.tokenizer={folder}", "model.arch=hf", f"model.name={folder}",
              f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}", "stitch.dm_samples=32"]
    for objective in ("dm", "tlm"):
        code, output = train_cli([*common, f"objective={objective}", "stitch.layer=2",
                                  f"hydra.run.dir={tmp_path / objective}"], monkeypatch, capsys)
        assert code == 0, output[-3000:]
    dm, tlm = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("dm", "tlm"))
    end = dm["base"]["end"]
    assert 0 <= end["test_acc"] <= 1 and 0 <= end["hans_acc"] <= 1
    # DM of a model into itself at one layer predicts what the model predicts
    assert dm["metrics"]["test/acc"] == pytest.approx(end["test_acc"], abs=1e-6)
    assert dm["metrics"]["test/hans_acc"] == pytest.approx(end["hans_acc"], abs=1e-6)
    assert {"test/acc", "test/loss", "test/hans_acc"} <= set(tlm["metrics"])
    assert tlm["evaluation"]["challenge"]["where"] == {"heuristic": "lexical_overlap"}
    # the challenge set holds only its lexical-overlap rows, padded per batch with padding masked
    wrapped, _ = load_language_model("hf", folder)
    from stitching.data.text import FolderTokenizer

    rows = [r for r in pair_rows(hans, "validation") if r["heuristic"] == "lexical_overlap"]
    data = PairDataset(rows, FolderTokenizer(folder), ("premise", "hypothesis"), "label", 24)
    batch = data.collate([data[i] for i in range(8)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() == batch["input_ids"].shape[1]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == data.pad_id).all()
    assert wrapped.num_classes == 3


def test_sentence_pairs_that_cannot_be_found_are_one_line(tmp_path, monkeypatch, capsys):
    folder = _bert_folder(tmp_path / "tiny-nli", "BertForSequenceClassification", num_labels=3)
    code, output = train_cli([*LM_TINY, "dataset=mnli", f"dataset.tokenizer={folder}", "model.arch=hf",
                              f"model.name={folder}", f"paths.zoo_dir={tmp_path}", f"paths.output_dir={tmp_path}",
                              "stitch.layer=2", "objective=dm", f"hydra.run.dir={tmp_path / 'r'}"], monkeypatch, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output[-2000:]
    assert "sentence pairs 'nyu-mll/glue' (mnli) split 'train' cannot be loaded" in errors[0]


def test_the_command_line_cuts_between_attention_and_mlp(lm_config, tmp_path):
    from stitching.runs import run

    run(lm_config(tmp_path, "objective=dm", "end.seed=0", "stitch.front_layer=blocks.1.attn",
                  "stitch.end_layer=blocks.1.hook_resid_mid"), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["front_layer_name"] == saved["end_layer_name"] == "blocks.1.attn"
    assert saved["front_layer"] == 4  # embed, blocks.0.attn, blocks.0, blocks.1.attn: numbered anew
    assert abs(saved["metrics"]["test/penalty"]) < 0.01  # DM of a stream into itself keeps the loss
