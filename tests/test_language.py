"""Language models on the model contract: exact cuts at the residual stream, padding that
never counts, DM between language models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from stitching.models import split
from stitching.models.cutting import cut_point_activations
from stitching.models.language import LanguageModel
from stitching.stitch_layers import dm_solution

transformers = pytest.importorskip("transformers")
VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of each supported family (built here, no hub)."""
    torch.manual_seed(seed)
    t = transformers
    made = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL, num_key_value_heads=2)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**SMALL)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0)),
        "bert_mlm": lambda: t.BertForMaskedLM(t.BertConfig(**SMALL)),
        "bert_classifier": lambda: t.BertForSequenceClassification(t.BertConfig(**SMALL, num_labels=3)),
        "bert": lambda: t.BertModel(t.BertConfig(**SMALL)),
        "lens_gelu": lambda: _lens("gelu", seed),
        "lens_solu": lambda: _lens("solu_ln", seed),
    }[kind]()
    return made.eval()


KINDS = ["llama", "gpt_neox", "gpt2", "bert_mlm", "bert_classifier", "bert", "lens_gelu", "lens_solu"]


def _lens(act_fn: str, seed: int):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=64, d_vocab=VOCAB, act_fn=act_fn,
        normalization_type="LN", seed=seed))


def _padded_batch(seed: int = 0, lengths=(10, 6, 3)) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _output(model, **inputs) -> torch.Tensor:
    if hasattr(model, "cfg"):  # TransformerLens
        return model(inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_tail_of_head_is_the_library_forward_at_every_cut_point(kind):
    model = tiny(kind)
    wrapped = LanguageModel(model)
    assert len(wrapped.cut_points) == 4 and wrapped.cut_points[0].name == "embed"
    for batch in (_padded_batch(lengths=(10, 10, 10)), _padded_batch()):
        with torch.no_grad():
            expected = _output(model, **batch)
            for point in wrapped.cut_points:
                head, tail = split(wrapped, point.index)
                # a TransformerLens model runs its fused forward on the unpadded batch: equal up to float rounding
                torch.testing.assert_close(tail(*head(batch)), expected, rtol=1e-5, atol=1e-5 if "lens" in kind else 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_changes_a_real_token(kind):
    """Each sequence alone and the same sequence right-padded in a batch: equal at its real tokens."""
    model = LanguageModel(tiny(kind))
    batch = _padded_batch()
    with torch.no_grad():
        _, together = cut_point_activations(model, batch)
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            _, alone = cut_point_activations(model, batch["input_ids"][row:row + 1, :length])
            for a, b in zip(together, alone):
                torch.testing.assert_close(a[row, :length], b[0], rtol=1e-5, atol=1e-5)


def test_hugging_face_models_are_cut_by_the_generic_entry_points():
    from stitching import cut_points

    names = [p.name for p in cut_points(tiny("gpt_neox"))]
    assert names == ["embed", "gpt_neox.layers.0", "gpt_neox.layers.1", "gpt_neox.layers.2"]


def _next_token_loss(logits: torch.Tensor, batch: dict) -> float:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = (mask[:, 1:] * mask[:, :-1]).bool()
    return float(F.cross_entropy(logits[:, :-1][real], ids[:, 1:][real]).detach())


@pytest.mark.parametrize("layer", [1, 2, 4])
def test_dm_self_stitch_keeps_the_language_model_loss(layer):
    from stitching.api import prepare_stitch

    model = tiny("llama")
    batch = _padded_batch(seed=1, lengths=(40,) * 6 + (25, 12))
    prepared = prepare_stitch(model, copy.deepcopy(model), layer, layer, batch, objective="dm", num_classes=VOCAB)
    with torch.no_grad():
        stitched = prepared.network.eval()(batch)
        own = _output(model, **batch)
    assert abs(_next_token_loss(stitched, batch) - _next_token_loss(own, batch)) < 0.01


def test_padding_added_to_a_batch_does_not_change_the_dm_solution():
    """DM on a padded batch equals least squares over the real tokens, each sequence run alone."""
    from stitching.api import prepare_stitch

    front, end = tiny("gpt_neox", seed=0), tiny("gpt_neox", seed=1)
    batch = _padded_batch(seed=2, lengths=(30, 17, 9, 30, 4, 22, 30, 11))
    prepared = prepare_stitch(front, end, 2, 3, batch, objective="dm", num_classes=VOCAB)
    rows_front, rows_end = [], []
    with torch.no_grad():
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            ids = batch["input_ids"][row:row + 1, :length]
            # cut point k is the library's hidden state k - 1 (its last one is after the final norm)
            rows_front.append(front(input_ids=ids, output_hidden_states=True).hidden_states[1][0])
            rows_end.append(end(input_ids=ids, output_hidden_states=True).hidden_states[2][0])
    weight, bias = dm_solution(torch.cat(rows_front), torch.cat(rows_end))
    linear = prepared.network.stitch.linear
    torch.testing.assert_close(linear.weight.detach(), weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear.bias.detach(), bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["dm", "hint", "fula", "slm", "tlm"])
def test_each_objective_stitches_two_language_models_with_a_penalty(objective, tmp_path):
    from stitching.api import TokenBatch, prepare_stitch, train_stitch

    front, end = tiny("llama", seed=0), tiny("llama", seed=1)
    before = {(side, name): p.clone() for side, model in enumerate((front, end)) for name, p in model.named_parameters()}
    data = _padded_batch(seed=3, lengths=(24,) * 12 + (15, 7, 19, 3))
    loader = torch.utils.data.DataLoader(TokenBatch(data), batch_size=4)  # right-padded dicts, as a text module yields
    prepared = prepare_stitch(front, end, 2, 2, data, objective=objective, lr=1e-2, num_classes=VOCAB)
    stitch_before = {k: v.clone() for k, v in prepared.network.stitch.state_dict().items()}
    frozen = {n: p.clone() for n, p in prepared.network.named_parameters() if "stitch" not in n}
    metrics = train_stitch(prepared, loader, loader, {"max_epochs": 2, "accelerator": "cpu",
                                                      "enable_progress_bar": False}, run_dir=tmp_path)
    assert {"test/loss", "test/end_loss", "test/penalty"} <= set(metrics)
    assert metrics["test/penalty"] == pytest.approx(metrics["test/loss"] - metrics["test/end_loss"], abs=1e-5)
    expected_end = _next_token_loss(_output(end, **data), data)
    assert metrics["test/end_loss"] == pytest.approx(expected_end, rel=1e-4)  # token-weighted, as computed here
    for n, p in prepared.network.named_parameters():  # frozen means frozen
        if "stitch" not in n:
            assert torch.equal(p, frozen[n]), n
    for side, model in enumerate((front, end)):  # and the caller's models were never touched
        for name, p in model.named_parameters():
            assert torch.equal(p, before[side, name])
    changed = any(not torch.equal(v, stitch_before[k]) for k, v in prepared.network.stitch.state_dict().items())
    assert changed == (objective != "dm")


def test_the_one_call_api_stitches_language_models_on_token_data():
    """``stitching.stitch`` on token ids or a padded dict: DM of a model into itself costs
    nothing; TLM between two models trains and reports the penalty."""
    from stitching.api import stitch

    model = tiny("gpt_neox", seed=0)
    data = _padded_batch(seed=6, lengths=(16,) * 10 + (11, 5))
    same = stitch(model, model, 3, 3, objective="dm", train=data, batch_size=4, progress=False,
                  trainer={"accelerator": "cpu"})
    assert abs(same.metrics["test/penalty"]) < 1e-3
    other = stitch(model, tiny("gpt_neox", seed=1), 2, 2, objective="tlm", train=data["input_ids"][:10], epochs=1,
                   batch_size=4, progress=False, trainer={"accelerator": "cpu"})
    assert {"test/loss", "test/end_loss", "test/penalty", "train/loss"} <= set(other.metrics)


def test_tlm_and_slm_refuse_an_end_model_without_a_task_head():
    from stitching.api import prepare_stitch
    from stitching.errors import StitchingError

    front, end = tiny("bert", seed=0), tiny("bert", seed=1)
    data = _padded_batch(lengths=(24,) * 4)  # 96 DM rows for 33 unknowns
    with pytest.raises(StitchingError, match="bare encoder: use dm, hint or fula"):
        prepare_stitch(front, end, 2, 2, data, objective="tlm")
    prepare_stitch(front, end, 2, 2, data, objective="hint")  # fine


def test_cka_over_token_positions_leaves_padding_out():
    """The grid's CKA on a padded batch equals linear CKA on real-token rows computed per sequence."""
    from stitching.similarity.cka import linear_cka
    from stitching.similarity.grid import similarity_grids

    front, end = LanguageModel(tiny("gpt2", seed=0)), LanguageModel(tiny("llama", seed=1))
    batch = _padded_batch(seed=4, lengths=(20, 13, 5, 20, 9))
    grids, problems = similarity_grids(front, end, batch, ["cka", "procrustes"], flatten="positions", batch_size=2,
                                       progress=False)
    assert not problems and grids["cka"].shape == (4, 4)
    rows_f, rows_e = [[] for _ in range(4)], [[] for _ in range(4)]
    with torch.no_grad():
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone = batch["input_ids"][row:row + 1, :length]
            for store, model in ((rows_f, front), (rows_e, end)):
                for k, a in enumerate(cut_point_activations(model, alone)[1]):
                    store[k].append(a[0])
    for i in range(4):
        for j in range(4):
            expected = linear_cka(torch.cat(rows_f[i]).double(), torch.cat(rows_e[j]).double())
            assert grids["cka"][i, j] == pytest.approx(float(expected), abs=1e-5)


def test_minibatch_cka_streams_token_positions_batch_by_batch():
    """Streaming over a corpus: each batch's real tokens are one minibatch; the grid equals the
    ratio of summed per-batch unbiased HSICs (Song et al.'s estimator written out here)."""
    from stitching.similarity.grid import similarity_grids

    def hsic1(k, l):  # the unbiased estimator, from its definition
        n = len(k)
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
        ones = torch.ones(n, dtype=k.dtype)
        return (torch.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3))

    front, end = LanguageModel(tiny("gpt_neox", seed=0)), LanguageModel(tiny("gpt2", seed=1))
    batch = _padded_batch(seed=5, lengths=(12, 7, 12, 4, 9, 12))
    grids, problems = similarity_grids(front, end, batch, ["minibatch_cka"], flatten="positions", batch_size=2,
                                       progress=False)
    assert not problems
    sums = {}
    with torch.no_grad():
        for start in range(0, 6, 2):
            part = {k: v[start:start + 2] for k, v in batch.items()}
            keep = part["attention_mask"].bool()
            grams = [[(a[keep].double() @ a[keep].double().T) for a in cut_point_activations(m, part)[1]]
                     for m in (front, end)]
            for i, k in enumerate(grams[0]):
                for j, l in enumerate(grams[1]):
                    sums[i, j] = sums.get((i, j), 0) + hsic1(k, l)
                sums["x", i] = sums.get(("x", i), 0) + hsic1(k, k)
            for j, l in enumerate(grams[1]):
                sums["y", j] = sums.get(("y", j), 0) + hsic1(l, l)
    for i in range(4):
        for j in range(4):
            expected = sums[i, j] / (sums["x", i] * sums["y", j]).sqrt()
            assert grids["minibatch_cka"][i, j] == pytest.approx(float(expected), abs=1e-6)


def test_a_given_model_is_found_in_a_folder_a_gguf_file_or_an_installed_package(tmp_path, monkeypatch):
    from stitching.errors import StitchingError
    from stitching.models.language import locate

    package = tmp_path / "site" / "fake_models"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "config.json").write_text("{}")
    (package / "tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert locate("pkg:fake_models/model") == (package / "model", {})
    assert locate("pkg:fake_models") == (package, {"gguf_file": "tiny.Q4_1.gguf"})  # one GGUF, no config.json
    assert locate(str(package / "tiny.Q4_1.gguf")) == (package, {"gguf_file": "tiny.Q4_1.gguf"})
    assert locate("EleutherAI/pythia-70m") == (None, {})  # a hub name
    (package / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(StitchingError, match="holds 2 .gguf files; name one"):
        locate("pkg:fake_models")
    with pytest.raises(StitchingError, match="no installed package 'not_installed_anywhere'"):
        locate("pkg:not_installed_anywhere")
    with pytest.raises(StitchingError, match="names no folder"):
        locate("pkg:fake_models/missing")


def test_skipped_positions_leave_the_indices_but_not_the_forward_pass():
    """``skip_positions=1``: the grid equals CKA over every real token but each sequence's first,
    with activations from the whole sequence (an attention sink is read, never scored)."""
    from stitching.similarity.cka import linear_cka
    from stitching.similarity.grid import similarity_grids

    front, end = LanguageModel(tiny("llama", seed=0)), LanguageModel(tiny("gpt2", seed=1))
    batch = _padded_batch(seed=7, lengths=(16, 16, 9, 12))
    grids, _ = similarity_grids(front, end, batch, ["cka"], flatten="positions", progress=False, skip_positions=1)
    keep = batch["attention_mask"].bool().clone()
    keep[:, 0] = False
    with torch.no_grad():
        fronts, ends = cut_point_activations(front, batch)[1], cut_point_activations(end, batch)[1]
    for i, a in enumerate(fronts):
        for j, b in enumerate(ends):
            expected = linear_cka(a[keep].double(), b[keep].double())
            assert grids["cka"][i, j] == pytest.approx(float(expected), abs=1e-5)
    whole, _ = similarity_grids(front, end, batch, ["cka"], flatten="positions", progress=False)
    assert not torch.allclose(torch.tensor(whole["cka"]), torch.tensor(grids["cka"]))


@pytest.mark.parametrize("objective", ["hint", "fula", "tlm"])
def test_a_language_model_grid_cell_equals_its_own_run(objective, tmp_path):
    """The front and the reference run once per batch; each cell's stitched sequence goes
    through the (shared, statistics-free) end tail with the batch's own mask."""
    from stitching.api import TokenBatch
    from stitching.engine import StitchEngine, fit_engine
    from stitching.models import as_cuttable
    from stitching.objectives import make_objective
    from stitching.settings import StitchSettings

    front, end = as_cuttable(tiny("llama", seed=0)), as_cuttable(tiny("llama", seed=1))
    data = _padded_batch(seed=3, lengths=(24,) * 12 + (15, 7, 19, 3))
    loader = torch.utils.data.DataLoader(TokenBatch(data), batch_size=4)
    settings = StitchSettings(lr=1e-2)
    options = {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False}
    cells = [(1, 2), (2, 2), (3, 1)]
    fused = StitchEngine(front, end, cells, make_objective(objective), settings, data, num_classes=VOCAB)
    assert len({id(tail.model) for tail in fused.tails.values()}) == 1  # no running statistics: one tail copy
    results = fit_engine(fused, loader, loader, options, run_dir=tmp_path)
    for i, j in cells:
        single = StitchEngine(front, end, [(i, j)], make_objective(objective), settings, data, num_classes=VOCAB)
        alone = fit_engine(single, loader, loader, options, run_dir=tmp_path)[f"f{i}-e{j}"]
        assert results[f"f{i}-e{j}"]["metrics"] == pytest.approx(alone["metrics"], rel=1e-5, abs=1e-6)
        for (name, want), got in zip(single.stitches[f"f{i}-e{j}"].state_dict().items(),
                                     fused.stitches[f"f{i}-e{j}"].state_dict().values()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        assert {"test/penalty", "test/end_loss", "train/loss"} <= set(alone["metrics"])


def test_several_fronts_into_one_end_train_as_their_own_engines(tmp_path):
    """Two fronts (a Llama and a GPT-NeoX) into one Llama end in one engine: the end layer's
    tail takes both fronts' stitched sequences at once, interleaved, with the padded batch's
    mask and positions repeated to match; every cell equals the cell of its own front's engine."""
    from stitching.api import TokenBatch
    from stitching.engine import StitchEngine, fit_engine
    from stitching.errors import StitchingError
    from stitching.models import as_cuttable
    from stitching.objectives import make_objective
    from stitching.settings import StitchSettings

    fronts = {"a": as_cuttable(tiny("llama", seed=0)), "b": as_cuttable(tiny("gpt_neox", seed=2))}
    end = as_cuttable(tiny("llama", seed=1))
    data = _padded_batch(seed=5, lengths=(24,) * 12 + (15, 7, 19, 3))
    loader = torch.utils.data.DataLoader(TokenBatch(data), batch_size=4)
    settings = StitchSettings(lr=1e-2)
    options = {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False}
    cells = {"a": [(1, 2), (3, 3)], "b": [(1, 2), (2, 2)]}
    fused = StitchEngine(fronts, end, [(f, i, j) for f, pairs in cells.items() for i, j in pairs],
                         make_objective("fula"), settings, data, num_classes=VOCAB)
    assert [chunk.fronts for chunk in fused.chunks if chunk.j == 2] == [(("a", 1), ("b", 1), ("b", 2))]
    results = fit_engine(fused, loader, loader, options, run_dir=tmp_path)
    _each_cell_as_in_its_own_engine(fused, results, {f: (fronts[f], end, pairs) for f, pairs in cells.items()}, "fula",
                                    settings, data, loader, options, tmp_path)
    for given, bad, message in ((fronts, [("a", 1)], "named by their front"), (fronts, [("c", 1, 2)], "unknown fronts"),
                                (fronts, [(1, 2)], "named by their front"), (fronts["a"], [("a", 1, 2)], "cells are"),
                                ({"a.b": end}, [("a.b", 1, 2)], "letters, digits")):
        with pytest.raises(StitchingError, match=message):
            StitchEngine(given, end, bad, make_objective("dm"), settings, data)


def test_grids_into_several_ends_train_in_one_engine_each_model_copied_and_run_once(tmp_path):
    """Three grids, two front models and two end models (a model given under two names is one
    copy, one pass per batch): every cell equals the cell of its own grid's engine, with its own
    end's loss and penalty."""
    from stitching.api import TokenBatch
    from stitching.engine import StitchEngine, fit_engine
    from stitching.errors import StitchingError
    from stitching.models import as_cuttable
    from stitching.objectives import make_objective
    from stitching.settings import StitchSettings

    llama, neox = as_cuttable(tiny("llama", seed=0)), as_cuttable(tiny("gpt_neox", seed=2))
    one, other = as_cuttable(tiny("llama", seed=1)), as_cuttable(tiny("llama", seed=3))
    fronts, ends = {"a": llama, "b": neox, "c": llama}, {"a": one, "b": one, "c": other}
    data = _padded_batch(seed=5, lengths=(24,) * 12 + (15, 7, 19, 3))
    loader = torch.utils.data.DataLoader(TokenBatch(data), batch_size=4)
    settings = StitchSettings(lr=1e-2)
    options = {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False}
    cells = {"a": [(1, 2), (3, 3)], "b": [(1, 2)], "c": [(2, 2), (1, 3)]}
    fused = StitchEngine(fronts, ends, [(f, i, j) for f, pairs in cells.items() for i, j in pairs],
                         make_objective("tlm"), settings, data, num_classes=VOCAB)
    assert len(fused.fronts) == 2 and len(fused.references) == 2
    assert sorted((chunk.end, chunk.j, chunk.fronts) for chunk in fused.chunks) == [
        ("a", 2, (("a", 1), ("b", 1))), ("a", 3, (("a", 3),)), ("c", 2, (("c", 2),)), ("c", 3, (("c", 1),))]
    results = fit_engine(fused, loader, loader, options, run_dir=tmp_path)
    _each_cell_as_in_its_own_engine(fused, results, {f: (fronts[f], ends[f], pairs) for f, pairs in cells.items()},
                                    "tlm", settings, data, loader, options, tmp_path)
    assert results["a/f3-e3"]["metrics"]["test/end_loss"] != results["c/f1-e3"]["metrics"]["test/end_loss"]
    with pytest.raises(StitchingError, match="one per front"):
        StitchEngine(fronts, {"a": one, "b": one}, [("a", 1, 2)], make_objective("tlm"), settings, data)
    classifier = as_cuttable(tiny("bert_classifier", seed=4))  # another task: its grid cannot share the engine
    with pytest.raises(StitchingError, match="one task and one label set"):
        StitchEngine(fronts, {**ends, "c": classifier}, [("a", 1, 2), ("c", 1, 2)], make_objective("dm"), settings,
                     data)


def _each_cell_as_in_its_own_engine(fused, results, grids, objective, settings, data, loader, options, tmp_path):
    """Every cell of an engine of several grids (``grids``: name → (front, end, cells)) has the
    metrics and stitch weights of the same cell in an engine of its own grid alone."""
    from stitching.engine import StitchEngine, fit_engine
    from stitching.objectives import make_objective

    for f, (front, end, pairs) in grids.items():
        own = StitchEngine(front, end, pairs, make_objective(objective), settings, data, num_classes=VOCAB)
        alone = fit_engine(own, loader, loader, options, run_dir=tmp_path)
        for i, j in pairs:
            assert results[f"{f}/f{i}-e{j}"]["metrics"] == pytest.approx(alone[f"f{i}-e{j}"]["metrics"], rel=1e-5,
                                                                         abs=1e-6)
            for (name, want), got in zip(own.stitches[f"f{i}-e{j}"].state_dict().items(),
                                         fused.stitches[f"{f}/f{i}-e{j}"].state_dict().values()):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _counting(rows: int, generator: torch.Generator, length: int = 24) -> torch.Tensor:
    """Token ids that count up from a random start: a corpus no random model has seen."""
    start = torch.randint(1, VOCAB, (rows, 1), generator=generator)
    return (start + torch.arange(length)) % (VOCAB - 1) + 1


def test_the_adjusted_penalty_takes_out_what_a_stitch_learns_of_the_corpus():
    """A TLM stitch of a model into a copy of itself, trained on a corpus out of its domain,
    "beats" the model (raw penalty below 0); over the self-stitch baseline it costs nothing.
    The baseline is the separately trained self-stitch, and one end model's baseline is the
    same whatever the front."""
    from stitching.api import stitch

    end = tiny("llama", seed=1)
    generator = torch.Generator().manual_seed(0)
    train, test = _counting(64, generator), _counting(16, generator)
    options = dict(objective="tlm", train=train, test=test, epochs=3, lr=1e-2, batch_size=8, progress=False,
                   trainer={"accelerator": "cpu"})
    same = stitch(copy.deepcopy(end), end, 2, 2, **options).metrics
    assert same["test/penalty"] < -0.05
    assert same["test/adjusted_penalty"] == pytest.approx(0, abs=1e-5)
    alone = stitch(end, end, 2, 2, self_baseline=False, **options).metrics
    assert "test/adjusted_penalty" not in alone
    other = stitch(tiny("llama", seed=0), end, 2, 2, **options).metrics
    for metrics in (same, other):
        assert metrics["test/baseline_loss"] == pytest.approx(alone["test/loss"], abs=1e-6)
        assert metrics["test/adjusted_penalty"] == pytest.approx(metrics["test/loss"] - alone["test/loss"], abs=1e-6)
    with pytest.raises(Exception, match="self_baseline=True applies to language models"):
        stitch(tiny("bert_classifier"), tiny("bert_classifier"), 2, 2, objective="dm", self_baseline=True,
               train={"input_ids": train, "labels": train[:, 0] % 3}, progress=False)


def test_the_learning_rate_default_depends_on_the_objective_and_the_models():
    """``lr=None``: the papers' 1e-3, but 1e-4 for Hint and FuLA between language models; a
    given rate is used as it is."""
    from stitching.api import prepare_stitch
    from stitching.models import build_model

    model = tiny("gpt_neox", seed=0)
    data = _padded_batch(lengths=(16,) * 8)
    chosen = {objective: prepare_stitch(model, model, 2, 2, data, objective=objective).engine.lr
              for objective in ("hint", "fula", "slm", "tlm")}
    assert chosen == {"hint": 1e-4, "fula": 1e-4, "slm": 1e-3, "tlm": 1e-3}
    assert prepare_stitch(model, model, 2, 2, data, objective="hint", lr=3e-3).engine.lr == 3e-3
    images = torch.rand(8, 3, 16, 16)
    resnet = build_model("resnet18", num_classes=10, width=4)
    assert prepare_stitch(resnet, resnet, 3, 3, images, objective="hint").engine.lr == 1e-3


def test_a_masked_language_model_stitches_through_the_api_given_its_tokenizer(tmp_path):
    """A BERT masked LM needs its tokenizer's [MASK] id: without it one line says how to give it;
    with ``tokenizer=`` (an object or a folder) it stitches under its own task."""
    from stitching.api import stitch
    from stitching.errors import StitchingError

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[chr(c) for c in range(97, 123)]]
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = tiny("bert_mlm", seed=0)
    ids = torch.randint(5, len(vocabulary), (12, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(StitchingError, match=r"stitch\(\.\.\., tokenizer=its tokenizer\)"):
        stitch(model, model, 2, 2, objective="dm", train=ids, progress=False)
    for given in (tokenizer, str(tmp_path / "tokenizer")):
        same = stitch(model, model, 2, 2, objective="dm", train=ids, batch_size=4, progress=False, tokenizer=given)
        assert abs(same.metrics["test/penalty"]) < 1e-3  # DM of a model into itself: nothing lost
    with pytest.raises(StitchingError, match="tokenizer applies to language models"):
        stitch(build_resnet(), build_resnet(), 2, 2, train=(torch.rand(4, 3, 8, 8), torch.zeros(4).long()),
               tokenizer=tokenizer)
    big = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    big.add_tokens([f"extra{i}" for i in range(100)])
    with pytest.raises(StitchingError, match="the tokenizer has 131 tokens but the front model's vocabulary 97"):
        stitch(model, model, 2, 2, objective="dm", train=ids, tokenizer=big)


def build_resnet():
    from stitching.models import build_model

    return build_model("resnet18", num_classes=2, width=4)


# -- between the attention and the MLP of a block ---------------------------------------------
def _sequential_neox():
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL, use_parallel_residual=False)).eval()


def _stream_between(model, kind: str, batch: dict, i: int) -> torch.Tensor:
    """The library's own stream between attention and MLP of block ``i``, read by a hook (or the
    TransformerLens cache): what the sub-layer cut point must hold."""
    if kind.startswith("lens"):
        _, cache = model.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
        return cache[f"blocks.{i}.hook_resid_mid"]
    seen = []
    if kind.startswith("bert"):
        layer = (model.bert if hasattr(model, "bert") else model).encoder.layer[i]
        handle = layer.attention.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    else:  # pre-norm decoders: the input of the norm before the MLP is the stream after attention
        norm = {"llama": lambda: model.model.layers[i].post_attention_layernorm,
                "gpt2": lambda: model.transformer.h[i].ln_2,
                "neox": lambda: model.gpt_neox.layers[i].post_attention_layernorm}[kind]()
        handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        _output(model, **batch)
    finally:
        handle.remove()
    return seen[0]


SUBLAYER_KINDS = ["llama", "gpt2", "neox", "bert_mlm", "bert", "lens_gelu", "lens_solu"]


@pytest.mark.parametrize("kind", SUBLAYER_KINDS)
def test_a_cut_between_attention_and_mlp_is_exact_and_holds_the_library_stream(kind):
    model = _sequential_neox() if kind == "neox" else tiny(kind)
    wrapped = LanguageModel(model).with_sublayers()
    assert len(wrapped.cut_points) == 7  # embed, then (after attention, after the block) × 3
    batch = _padded_batch()
    with torch.no_grad():
        expected = _output(model, **batch)
        for point in wrapped.cut_points:
            head, tail = split(wrapped, point.index)
            activation, context = head(batch)
            torch.testing.assert_close(tail(activation, context), expected, rtol=0, atol=1e-6)
            if point.index % 2 == 0:  # the stream between the sub-layers of block (index - 2) / 2
                torch.testing.assert_close(activation, _stream_between(model, kind, batch, (point.index - 2) // 2),
                                           rtol=0, atol=1e-6)
    attention, block = wrapped.cut_points[3].name, wrapped.cut_points[4].name
    assert attention.endswith((".self_attn", ".attn", ".attention")) and attention.startswith(block)
    mlp = {"bert_mlm": "output", "bert": "output"}.get(kind, "mlp")
    assert split(wrapped, f"{block}.{mlp}")[1].point.name == block  # the MLP's name is the block's own cut point


def _cached_stream(cache, index: int) -> torch.Tensor:
    """The library's residual stream at sub-layer cut point ``index`` (embed, then attention and block of each)."""
    if index == 1:
        return cache["blocks.0.hook_resid_pre"]
    block, attention = (index - 2) // 2, index % 2 == 0
    return cache[f"blocks.{block}.hook_resid_{'mid' if attention else 'post'}"]


@pytest.mark.parametrize("kind", ["lens_gelu", "lens_solu"])
def test_a_transformer_lens_model_runs_fused_and_equals_the_library(kind):
    """Unpadded batches of a plain pre-LN TransformerLens model take the fused forward (one QKV
    product, PyTorch's attention, F.layer_norm): every cut point's stream, the output and the
    gradient that reaches a stitch equal the library's own forward and backward."""
    from stitching.models.language import _lens_plain

    model = tiny(kind)
    wrapped = LanguageModel(model).with_sublayers()
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(4))
    assert _lens_plain(model)
    library = copy.deepcopy(model)
    library.__dict__["_stitching_fused"] = False  # the same model forced through the library's forward
    slow = LanguageModel(library).with_sublayers()
    with torch.no_grad():
        expected, cache = model.run_with_cache(ids)
    for point in wrapped.cut_points:
        head, tail = split(wrapped, point.index)
        with torch.no_grad():
            activation, context = head(ids)
        assert context.extras["unpadded"]
        torch.testing.assert_close(activation, _cached_stream(cache, point.index), rtol=1e-5, atol=1e-5)
        grads = []
        for net in (wrapped, slow):
            start = activation.clone().requires_grad_(True)
            out = split(net, point.index)[1](start, net.context(ids))
            torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
            F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            grads.append(start.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change", [{"attn_only": True}, {"parallel_attn_mlp": True}, {"normalization_type": "LNPre"},
                                    {"positional_embedding_type": "rotary", "rotary_dim": 8}])
def test_a_transformer_lens_model_the_fused_forward_does_not_know_runs_the_library(change):
    """Any other TransformerLens configuration, and any padded batch, runs the library's own forward."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from stitching.models.language import _lens_plain

    settings = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=64, d_vocab=VOCAB, act_fn="gelu",
                    normalization_type="LN", seed=0)
    model = HookedTransformer(HookedTransformerConfig(**{**settings, **change})).eval()
    wrapped = LanguageModel(model)
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(4))
    assert not _lens_plain(model)
    with torch.no_grad():
        expected = model(ids)
        for point in wrapped.cut_points:
            head, tail = split(wrapped, point.index)
            torch.testing.assert_close(tail(*head(ids)), expected, rtol=0, atol=1e-6)
    padded = _padded_batch()
    plain = LanguageModel(tiny("lens_gelu"))
    assert not plain.context(padded).extras["unpadded"]


def test_a_parallel_residual_block_has_no_stream_between_its_sublayers():
    from stitching.errors import StitchingError

    with pytest.raises(StitchingError, match="parallel residual"):
        LanguageModel(tiny("gpt_neox")).with_sublayers()


def test_the_api_cuts_at_an_attention_module_by_name_and_saves_the_network(tmp_path):
    import stitching
    from stitching.errors import StitchingError

    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (24, 16), generator=torch.Generator().manual_seed(3))
    result = stitching.stitch(model, copy.deepcopy(model), "model.layers.1.self_attn", "model.layers.1.self_attn",
                              objective="dm", train=ids, epochs=0, dm_samples=24, progress=False)
    assert result.network.front.point.name == "model.layers.1.self_attn"
    assert abs(result.metrics["test/penalty"]) < 1e-3  # DM of a stream into itself keeps the loss
    path = result.save(tmp_path / "net.pt")
    loaded = stitching.load(path, model, copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:4]), result.network.eval()(ids[:4]))
    with pytest.raises(StitchingError, match="give every layer by name"):
        stitching.compare(model, model, ids[:4], indices="cka", front_layers=[2, "model.layers.1.self_attn"])
