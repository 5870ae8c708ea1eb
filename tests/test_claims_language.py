"""The language-model paper's pretrained-model claims: generalising vs heuristic BERT groups (Sec. 4)
and Pythia sizes (Sec. 5), from hand-made records and from runs on tiny models built here."""

from __future__ import annotations

import json
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
