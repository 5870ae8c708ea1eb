"""The language-model paper's pretrained-model claims: generalising vs heuristic BERT groups (Sec. 4)
and Pythia sizes (Sec. 5), from hand-made records and from runs on tiny models built here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from stitching import claims as C
from tests.conftest import compose_config

GROUPS = ["claims.bert.generalising=[g0,g1,g2,g3,g4,g5]", "claims.bert.heuristic=[h0,h1,h2,h3,h4,h5]"]
PYTHIA = ["claims.pythia.up_to_1b=[p70m,p160m,p1b]", "claims.pythia.outlier=p2.8b",
          "claims.pythia.neighbours=[p1b,p1.4b,p6.9b]"]


def _settings(*overrides):
    from stitching.build import read_settings

    return OmegaConf.create(read_settings(compose_config("experiment=claims_small", *overrides)).config["claims"])


def test_each_bert_replicate_stitches_its_own_four_models_each_front_and_end_once_within_and_once_across():
    s = _settings(*GROUPS)
    jobs = [j for j in C.plan(s, ["bert_across_stitching"]) if j.kind == "grid"]
    names = lambda j: {o.split("=", 1)[0]: o.split("=", 1)[1] for o in j.overrides if "=" in o}  # noqa: E731
    by_pair: dict = {}
    for job in jobs:
        by_pair.setdefault(job.pair, []).append((job.tag, names(job)["front.name"], names(job)["end.name"]))
    assert sorted(by_pair) == [(0, 1), (2, 3), (4, 5)]
    models = [{m for _, f, e in cells for m in (f, e)} for cells in by_pair.values()]
    assert all(len(m) == 4 for m in models) and not set.intersection(*models)  # disjoint replicates
    assert dict((t, (f, e)) for t, f, e in by_pair[(2, 3)]) == {
        "within_generalising": ("g2", "g3"), "within_heuristic": ("h2", "h3"),
        "between_gh": ("g2", "h3"), "between_hg": ("h2", "g3")}
    for cells in by_pair.values():  # every front and every end once within its group and once across
        for side in (1, 2):
            kinds = {}
            for tag, *models_ in cells:
                kinds.setdefault(models_[side - 1], []).append(tag.split("_")[0])
            assert all(sorted(k) == ["between", "within"] for k in kinds.values())
    assert all(names(j)["dataset.tokenizer"] == "g0" for j in jobs)


def _bert_frame(loss: dict, cka: dict, pair="seeds0-1") -> pd.DataFrame:
    """Rows of one replicate: ``loss[tag][layer]`` (stitching), ``cka[tag][layer]`` (diagonal CKA)."""
    rows = [{"run": f"runs/bert_groups/{pair}/{tag}/f{k}-e{k}/", "objective": "tlm", "front_layer": k, "end_layer": k,
             "test_loss": v} for tag, by_layer in loss.items() for k, v in by_layer.items()]
    rows += [{"run": f"runs/bert_groups/{pair}/cka_{tag}/", "objective": index, "front_layer": k, "end_layer": j,
              "score": v if j == k else -5.0} for tag, by_layer in cka.items() for k, v in by_layer.items()
             for j in by_layer for index in ("minibatch_cka",)]
    return pd.DataFrame(rows)


def test_the_bert_claims_read_across_minus_within_at_the_later_streams_and_its_rise_from_the_early_ones():
    s = _settings(*GROUPS, "claims.bert.early_layers=[1]", "claims.bert.later_layers=[2,3]")
    loss = {"within_generalising": {1: 1.0, 2: 1.0, 3: 1.2}, "within_heuristic": {1: 1.1, 2: 1.2, 3: 1.0},
            "between_gh": {1: 1.1, 2: 1.6, 3: 1.9}, "between_hg": {1: 1.0, 2: 1.4, 3: 1.5}}
    cka = {"within_generalising": {1: 0.9, 2: 0.8, 3: 0.7}, "within_heuristic": {1: 0.9, 2: 0.8, 3: 0.9},
           "between_gh": {1: 0.8, 2: 0.5, 3: 0.4}, "between_hg": {1: 0.9, 2: 0.6, 3: 0.5}}
    frame = _bert_frame(loss, cka)
    # by hand: across − within per stream
    loss_gap = {1: (1.1 + 1.0) / 2 - (1.0 + 1.1) / 2, 2: (1.6 + 1.4) / 2 - (1.0 + 1.2) / 2,
                3: (1.9 + 1.5) / 2 - (1.2 + 1.0) / 2}
    cka_gap = {1: (0.9 + 0.9) / 2 - (0.8 + 0.9) / 2, 2: (0.8 + 0.8) / 2 - (0.5 + 0.6) / 2,
               3: (0.7 + 0.9) / 2 - (0.4 + 0.5) / 2}
    for measure, gap in (("stitching", loss_gap), ("cka", cka_gap)):
        across, _ = C.CLAIMS[f"bert_across_{measure}"].effect(frame, s)
        later, _ = C.CLAIMS[f"bert_later_{measure}"].effect(frame, s)
        assert across == pytest.approx((gap[2] + gap[3]) / 2)
        assert later == pytest.approx((gap[2] + gap[3]) / 2 - gap[1])
    # an off-diagonal CKA cell (set to −5 above) never enters: the corresponding layers only
    assert C.CLAIMS["bert_across_cka"].effect(frame, s)[0] < 1
    with pytest.raises(LookupError, match="between_hg"):
        C.CLAIMS["bert_across_stitching"].effect(frame[~frame.run.str.contains("/between_hg/")], s)


def _depth_frame(grids: dict) -> pd.DataFrame:
    """Similarity rows of ``grids[(front, end)] = (front depths, end depths, CKA matrix)``."""
    rows = []
    for (front, end), (fd, ed, matrix) in grids.items():
        for i, a in enumerate(fd):
            for j, b in enumerate(ed):
                rows.append({"run": f"runs/pythia/seeds0-0/{C._pythia_tag(front, end)}/", "objective": "minibatch_cka",
                             "front_model": front, "end_model": end, "front_layer": i + 1, "end_layer": j + 1,
                             "front_depth": a, "end_depth": b, "score": matrix[i][j]})
    return pd.DataFrame(rows)


def test_the_pythia_claims_are_described_on_intermediate_depths_never_tested():
    s = _settings(*PYTHIA, "claims.pythia.intermediate=[0.25,0.75]")
    three, five = [0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0]
    rng = np.random.default_rng(0)
    grids = {pair: (three, five, rng.uniform(0, 1, (3, 5))) for pair in C._pythia_pairs(s)}
    frame = _depth_frame(grids)

    def by_hand(pairs):  # front depth 0.5 (the one intermediate front cut point) meets the end's 0.5
        return np.mean([grids[p][2][1][2] for p in pairs])

    up, _ = C.CLAIMS["pythia_up_to_1b"].effect(frame, s)
    assert up == pytest.approx(by_hand([("p70m", "p160m"), ("p70m", "p1b"), ("p160m", "p1b")]))
    outlier, _ = C.CLAIMS["pythia_outlier"].effect(frame, s)
    assert outlier == pytest.approx(by_hand([("p1b", "p1.4b"), ("p1b", "p6.9b"), ("p1.4b", "p6.9b")])
                                    - by_hand([("p1b", "p2.8b"), ("p1.4b", "p2.8b"), ("p6.9b", "p2.8b")]))
    for name in ("pythia_up_to_1b", "pythia_outlier"):  # one model per size: however large, never "holds"
        result = C.measure(C.CLAIMS[name], frame, s)
        assert result["verdict"] == C.DESCRIBED and result["pairs"] == 1 and np.isnan(result["p_value"])
    missing = C.measure(C.CLAIMS["pythia_outlier"], frame[~frame.run.str.contains("p2.8b")], s)
    assert missing["verdict"] == C.UNSURE and "p2.8b" in missing["why"]


def test_the_offline_presets_list_the_hub_claims_as_not_run_and_plan_no_job_for_them():
    s = _settings()
    hub = [n for n in C.chosen(s) if C.CLAIMS[n].experiment in ("bert_groups", "pythia")]
    assert len(hub) == 6 and not [j for j in C.plan(s, C.chosen(s)) if j.experiment in ("bert_groups", "pythia")]
    for name in ("bert_across_stitching", "bert_later_cka", "pythia_outlier"):
        result = C.measure(C.CLAIMS[name], pd.DataFrame(), s)
        assert result["verdict"] == C.NOT_RUN and "make claims" in result["why"]
    paper = _settings("experiment=claims")
    assert {j.experiment for j in C.plan(paper, ["pythia_outlier"])} == {"pythia"}
    assert len(paper.bert.candidates) >= 4 * paper.seed_pairs


@pytest.mark.parametrize("overrides, expected", [
    (["claims.bert.generalising=[a,b,c,d,e,f]"], "name both groups, or neither"),
    ([*GROUPS[:1], "claims.bert.heuristic=[g0,h1,h2,h3,h4,h5]"], "in both groups"),
    (["claims.bert.generalising=[a,b]", "claims.bert.heuristic=[c,d]"], "at least 6 different model names"),
    ([*GROUPS, "claims.bert.candidates=[a,b,c,d,e,f,g,h,i,j,k,l]"], "the candidates or the groups, not both"),
    (["claims.pythia.outlier=x"], "name all three, or none"),
    ([*PYTHIA[:2], "claims.pythia.neighbours=[p1b,p2.8b]"], "among its neighbours"),
    (["claims.pythia.intermediate=[0.5]"], "0 ≤ low < high ≤ 1"),
    (["claims.bert.later_layers=[0]"], "claims.bert.later_layers=[0] is out of range"),
])
def test_bad_pretrained_claims_settings_are_one_line(overrides, expected):
    from stitching.build import read_settings
    from stitching.errors import StitchingError

    with pytest.raises(StitchingError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        read_settings(compose_config("experiment=claims_small", *overrides))


def _classifier(folder: Path, seed: int, tokenizer: Path) -> str:
    """A tiny random 3-class BERT of its own seed, on ``tokenizer``."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    shutil.copytree(tokenizer, folder)
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(str(tokenizer)).get_vocab()), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, num_labels=3)).save_pretrained(folder)
    return str(folder)


def _listed(values) -> str:
    return "[" + ",".join(f"'{v}'" for v in values) + "]"


def test_the_bert_claims_rank_their_candidates_then_stitch_and_compare_the_groups_end_to_end(tmp_path, capsys,
                                                                                            monkeypatch):
    """Ten tiny BERTs: ranked by challenge-set accuracy (checked against each model scored alone), the best four
    and the worst four stitched and compared by CKA in two replicates, every claim measured on both."""
    pytest.importorskip("transformer_lens")
    from stitching.build import build_datamodule, build_zoo, read_settings
    from stitching.evaluate import pair_accuracy
    from tests.test_language_runs import _pairs_folder, _tokenizer_folder

    tokenizer = _tokenizer_folder(tmp_path / "tokenizer")
    berts = [_classifier(tmp_path / f"bert{i}", i, tokenizer) for i in range(10)]
    mnli = _pairs_folder(tmp_path / "mnli", {"train": 48, "validation_matched": 24})
    hans = _pairs_folder(tmp_path / "hans", {"validation": 60}, heuristic=True)
    preset = ["experiment=lm_bert_hans", f"dataset.corpus={mnli}", f"dataset.challenge.corpus={hans}",
              "dataset.context=24", "dataset.train_sequences=48", "dataset.test_sequences=24", "dataset.batch_size=16",
              "stitch.dm_samples=32", "similarity.images=24", "similarity.batch_size=12"]
    base = ["experiment=claims_small", "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "logger=none", f"paths.zoo_dir={tmp_path / 'zoo'}", "claims.seed_pairs=2", "claims.min_pairs=2",
            f"claims.bert.preset={_listed(preset)}", f"claims.bert.candidates={_listed(berts)}",
            "claims.bert.early_layers=[1]", "claims.bert.later_layers=[2,3]",
            "claims.only=[bert_across_stitching,bert_across_cka,bert_later_stitching,bert_later_cka]"]
    run = read_settings(compose_config(*base))
    record = C.check_claims(run, base, tmp_path / "out", progress=False)
    assert not record["failed"], record["failed"]
    ranking = json.loads((tmp_path / "out" / "bert_ranking.json").read_text())
    # each candidate scored alone on the HANS-shaped lexical-overlap rows, as a stitching run scores a base model
    one = read_settings(compose_config(*preset, f"model.name={berts[0]}", f"front.name={berts[0]}",
                                       f"end.name={berts[0]}", f"dataset.tokenizer={berts[0]}", "trainer=cpu",
                                       f"paths.zoo_dir={tmp_path / 'zoo'}"))
    data = build_datamodule(one)
    data.setup()
    alone = {}
    for name in berts:
        model, _ = build_zoo(one).get(one.front.spec.__class__(**{**one.front.spec.__dict__, "name": name}))
        alone[name] = pair_accuracy(model, data, data.challenge_set(), "cpu", {0: 0, 1: 1, 2: 1})
    assert {n: s["challenge_acc"] for n, s in ranking["scores"].items()} == pytest.approx(alone)
    order = sorted(berts, key=lambda n: -alone[n])
    assert set(ranking["generalising"]) == set(order[:4]) and set(ranking["heuristic"]) == set(order[-4:])
    assert ranking["generalising"] == [n for n in berts if n in ranking["generalising"]]  # the candidates' order
    for result in record["claims"]:
        assert result["pairs"] == 2 and result["verdict"] in (C.HOLDS, C.FAILS, C.UNSURE), result["per_pair"]
    # the runs read are the groups': replicate 1's across pair (heuristic 3rd → generalising 4th member)
    replicate = tmp_path / "out" / "runs" / "bert_groups" / "seeds2-3"
    runs = {p.relative_to(replicate).parts[0] for p in replicate.glob("*/tlm/*/results.json")}
    assert runs == {"within_generalising", "within_heuristic", "between_gh", "between_hg"}
    held = json.loads(next((replicate / "between_hg").glob("tlm/*/results.json")).read_text())
    assert held["config"]["front"]["name"] == ranking["heuristic"][2]
    assert held["config"]["end"]["name"] == ranking["generalising"][3]
    # a resumed check reads the candidates' scores back; another preset scores them again
    import stitching.evaluate

    def unscored(*args, **kwargs):
        raise AssertionError("a candidate was scored again")

    monkeypatch.setattr(stitching.evaluate, "pair_metrics", unscored)
    settings = OmegaConf.create(run.config["claims"])
    assert C.rank_berts(settings, base, tmp_path / "out", progress=False) == ranking
    settings.bert.preset = [*preset, "dataset.test_sequences=12"]
    with pytest.raises(AssertionError, match="scored again"):
        C.rank_berts(settings, base, tmp_path / "out", progress=False)


def test_the_pythia_claims_run_their_pairs_and_read_the_grids_at_corresponding_depths_end_to_end(tmp_path, capsys):
    """Five tiny GPT-NeoX models of 2 and 4 blocks in the Pythia roles: every pair the claims read is
    computed once, and each effect equals the grids' intermediate cells at the nearest relative depth."""
    from stitching.build import read_settings
    from tests.test_language_runs import _neox_folder, _tokenizer_folder

    tokenizer = _tokenizer_folder(tmp_path / "tokenizer")
    depth = {"a": 2, "b": 4, "c": 2, "d": 4, "e": 4}
    models = {k: _neox_folder(tmp_path / f"neox-{k}", v, tokenizer) for k, v in depth.items()}
    preset = ["experiment=lm_pythia", "dataset.corpus=pydoc", f"dataset.tokenizer={models['a']}",
              "dataset.context=32", "similarity.images=8", "similarity.batch_size=4"]
    base = ["experiment=claims_small", "trainer=cpu", "logger=none", f"paths.zoo_dir={tmp_path / 'zoo'}",
            f"claims.pythia.preset={_listed(preset)}", f"claims.pythia.up_to_1b={_listed([models['a'], models['b']])}",
            f"claims.pythia.neighbours={_listed([models['b'], models['c'], models['d']])}",
            f"claims.pythia.outlier={models['e']}", "claims.only=[pythia_up_to_1b,pythia_outlier]"]
    record = C.check_claims(read_settings(compose_config(*base)), base, tmp_path / "out", progress=False)
    assert not record["failed"]
    folders = sorted(p.name for p in (tmp_path / "out" / "runs" / "pythia" / "seeds0-0").iterdir())
    assert len(folders) == 1 + 3 + 3  # a–b; b–c, b–d, c–d; b–e, c–e, d–e

    def intermediate(front, end):  # by hand from the record: front cut points at depth ¼…¾, the end's nearest
        held = json.loads((tmp_path / "out" / "runs" / "pythia" / "seeds0-0" /
                           C._pythia_tag(models[front], models[end]) / "similarity.json").read_text())
        grid, fd, ed = held["grids"]["minibatch_cka"], held["front_depths"], held["end_depths"]
        cells = []
        for i, a in fd.items():
            if 0.25 <= a <= 0.75:
                j = min(ed, key=lambda k: (abs(ed[k] - a), int(k)))
                cells.append(grid[int(i) - 1][int(j) - 1])
        return np.mean(cells)

    results = {r["name"]: r for r in record["claims"]}
    assert results["pythia_up_to_1b"]["mean"] == pytest.approx(intermediate("a", "b"))
    among = np.mean([intermediate(x, y) for x, y in (("b", "c"), ("b", "d"), ("c", "d"))])
    outlier = np.mean([intermediate(x, "e") for x in "bcd"])
    assert results["pythia_outlier"]["mean"] == pytest.approx(among - outlier)
    assert {r["verdict"] for r in results.values()} == {C.DESCRIBED}
    report = (tmp_path / "out" / "claims.md").read_text()
    assert "descriptive only" in report and "2 paper claims (2 on one set of pretrained models, described)" in report


def test_a_hub_claim_asked_for_by_name_offline_is_one_line_before_any_work(tmp_path, capsys):
    from stitching.claims import main

    with pytest.raises(SystemExit) as stop:
        main(["--only", "bert_later_cka", "--out", str(tmp_path / "out"), "experiment=claims_small"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stop.value.code != 0 and len(errors) == 1 and "claims.bert.generalising" in errors[0]
    assert not (tmp_path / "out").exists()


def test_the_solu_gelu_claim_on_the_librarys_own_models_is_one_set_described_and_on_models_trained_here_tested():
    """gelu-2l/solu-2l (paper size) are the same models whatever the seed: one set of jobs, a described
    effect; the toy models trained here from their seeds are three disjoint replicates, tested."""
    frame = pd.DataFrame([{"run": "runs/language/seeds0-0/x/", "front_name": f, "end_name": e,
                           "test_adjusted_penalty": p} for f, e, p in
                          (("solu-2l", "gelu-2l", 0.30), ("gelu-2l", "gelu-2l", 0.10), ("solu-2l", "solu-2l", 0.20),
                           ("gelu-2l", "solu-2l", 0.15))])
    paper = _settings("experiment=claims")
    assert {j.pair for j in C.plan(paper, ["solu_gelu_asymmetry"])} == {(0, 0)}
    result = C.measure(C.CLAIMS["solu_gelu_asymmetry"], frame, paper)
    assert result["verdict"] == C.DESCRIBED and result["mean"] == pytest.approx((0.30 - 0.10 + 0.20 - 0.15) / 2)
    small = _settings()
    assert {j.pair for j in C.plan(small, ["solu_gelu_asymmetry"])} == {(0, 1), (2, 3), (4, 5)}
    assert C.replicated(C.CLAIMS["solu_gelu_asymmetry"], small)
    assert not C.replicated(C.CLAIMS["pythia_outlier"], small)
