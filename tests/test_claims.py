"""The claims check: verdicts from seed-pair effects, effects from run records, the whole pipeline."""

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from stitching.build import compose_config
from stitching.claims import (CLAIMS, FAILS, HOLDS, TRAINED, UNSURE, chosen, experiment_pairs, main as claims_main,
                             measure, needs, plan, schedule, seed_pairs, verdict)
from stitching.errors import StitchingError
from tests.conftest import TINY


def test_verdict_is_a_one_sided_t_test_over_enough_pairs():
    assert verdict([0.10, 0.12, 0.08])["verdict"] == HOLDS  # mean 0.10, std 0.02: t = 8.7, p = 0.007
    assert verdict([0.10, -0.05, 0.01])["verdict"] == UNSURE  # mean 0.02, std 0.075: p = 0.35
    weak = verdict([0.10, 0.02, 0.05])  # mean 0.057 above one std 0.040 (once a hit), but t = 2.4, p = 0.068
    assert weak["mean"] > weak["std"] and weak["verdict"] == UNSURE and weak["ci95"][0] < 0 < weak["ci95"][1]
    assert verdict([-0.10, -0.12, -0.08])["verdict"] == FAILS
    assert verdict([0.0, 0.0, 0.0])["verdict"] == FAILS  # no effect at all is not an effect
    same = verdict([0.2, 0.2, 0.2])  # no spread: the replicates are not independent, there is nothing to test
    assert same["verdict"] == UNSURE and "not independent" in same["why"] and "(+0.200)" in same["why"]
    assert verdict([0.3, 0.3])["verdict"] == UNSURE and "2 seed pair(s)" in verdict([0.3, 0.3])["why"]
    assert verdict([0.3, None, np.nan, 0.2, 0.25])["pairs"] == 3  # unmeasured pairs do not count
    result = verdict([0.1, 0.2, 0.6])
    assert result["mean"] == pytest.approx(0.3) and result["std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert verdict([0.2, 0.3, 0.25, 0.3], min_pairs=5)["verdict"] == UNSURE
    assert verdict([0.10, 0.02, 0.05], alpha=0.1)["verdict"] == HOLDS  # the level is the preset's


@pytest.mark.parametrize("effects", [[0.1, 0.2, 0.6], [0.3, -0.1, 0.05, 0.2], [-0.02, -0.05, 0.01], [1.0, 1.5]])
def test_verdict_p_value_and_interval_match_scipy(effects):
    from scipy import stats

    result = verdict(effects, min_pairs=2)
    assert result["p_value"] == pytest.approx(stats.ttest_1samp(effects, 0.0, alternative="greater").pvalue)
    low, high = stats.t.interval(0.95, len(effects) - 1, loc=np.mean(effects), scale=stats.sem(effects))
    assert result["ci95"] == pytest.approx([low, high])
    # the one-sided bound that decides the verdict: scipy's one-sided interval, on the mean's side of zero
    side = "greater" if np.mean(effects) >= 0 else "less"
    interval = stats.ttest_1samp(effects, 0.0, alternative=side).confidence_interval(0.95)
    assert result["bound"] == pytest.approx(interval.low if side == "greater" else interval.high)
    assert (result["verdict"] == HOLDS) == (side == "greater" and result["bound"] > 0)
    assert (result["verdict"] == FAILS) == (side == "less" and result["bound"] < 0)  # no margin given: the reverse test


@pytest.mark.parametrize("pairs", [3, 5, 10])
def test_the_detectable_effect_is_found_with_the_stated_power(pairs):
    """The smallest detectable effect, checked against the noncentral t distribution: a true mean
    of that size is found by the one-sided test with probability 0.8 (at the observed spread)."""
    from scipy import stats

    from stitching.claims import POWER

    effects = np.random.default_rng(pairs).normal(0.01, 0.02, pairs)
    result = verdict(list(effects))
    error = effects.std(ddof=1) / np.sqrt(pairs)
    power = stats.nct.sf(stats.t.ppf(0.95, pairs - 1), pairs - 1, result["detectable"] / error)
    assert power == pytest.approx(POWER, abs=0.02) and f"detectable: {result['detectable']:.3f}" in result["why"]


def test_an_interval_within_the_equivalence_margin_does_not_hold():
    small = [0.002, -0.003, 0.001]  # 95 % CI ±0.0066 around 0
    assert verdict(small)["verdict"] == UNSURE
    assert verdict(small, margin=0.01)["verdict"] == FAILS and "equivalence margin" in verdict(small, margin=0.01)["why"]
    assert verdict(small, margin=0.005)["verdict"] == UNSURE  # the interval reaches past ±0.005
    assert verdict([0.10, 0.12, 0.08], margin=1.0)["verdict"] == HOLDS  # a significant effect holds whatever the margin


def test_seed_pairs_are_independent_replicates():
    assert seed_pairs(3, "self") == [(0, 0), (1, 1), (2, 2)]
    assert seed_pairs(3, "two") == [(0, 1), (2, 3), (4, 5)]  # no model in two pairs
    assert seed_pairs(1, "two") == [(0, 1)]
    models = [seed for pair in seed_pairs(5, "two") for seed in pair]
    assert len(models) == len(set(models))
    # a confirmatory replicate's models: seeds no other pairing of the same count uses
    assert seed_pairs(3, "fresh") == [(6, 6), (7, 7), (8, 8)]
    for count in (1, 3, 5):
        used = {seed for pairing in ("self", "two") for pair in seed_pairs(count, pairing) for seed in pair}
        assert not used & {seed for pair in seed_pairs(count, "fresh") for seed in pair}


def _settings(**extra):
    claims = compose_config(["logger=none"]).claims
    OmegaConf.set_struct(claims, False)
    return OmegaConf.merge(claims, extra)


def _rows(pair, objective, acc, layers=(1, 3, 5), end_acc=0.95, **extra):
    a, b = pair
    return [{"run": f"runs/diagonal/seeds{a}-{b}/{objective}/{objective}/f{k}-e{k}", "objective": objective,
             "front_layer": k, "end_layer": k, "test_acc": acc(k), "end_acc": end_acc, **extra} for k in layers]


def test_ordering_claim_from_hand_made_records():
    """DM below every trained objective at early layers on all three pairs: holds; on one pair
    reversed: the spread decides."""
    settings = _settings(early_layers=[1, 3])
    rows = []
    for n, pair in enumerate(seed_pairs(3, "two")):
        rows += _rows(pair, "dm", lambda k: 0.5 + 0.05 * k)
        for objective, bonus in zip(("hint", "fula", "slm", "tlm"), (0.2, 0.25, 0.3, 0.3)):
            rows += _rows(pair, objective, lambda k, b=bonus: 0.5 + 0.05 * k + b - 0.01 * n)
    result = measure(CLAIMS["same_task_ordering"], pd.DataFrame(rows), settings)
    assert result["verdict"] == HOLDS and result["pairs"] == 3
    # the trained objectives' mean bonus (0.2 + 0.25 + 0.3 + 0.3) / 4 = 0.2625 over DM, less 0.01 per pair
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.2625, 0.2525, 0.2425])
    flipped = pd.DataFrame(rows)
    flipped.loc[flipped.run.str.contains("seeds4-5") & (flipped.objective == "dm"), "test_acc"] += 0.6
    result = measure(CLAIMS["same_task_ordering"], flipped, settings)
    assert result["verdict"] == UNSURE and result["per_pair"][2]["effect"] == pytest.approx(0.2425 - 0.6)


def test_the_running_statistics_claim_compares_the_same_dm_with_and_without_the_pass():
    rows = []
    for n, pair in enumerate(seed_pairs(3, "two")):
        rows += _rows(pair, "dm", lambda k: 0.6, dm_bn_pass=False)
        rows += _rows(pair, "dm", lambda k, n=n: 0.6 + 0.1 + 0.02 * n + 0.01 * k, dm_bn_pass=True)
    for row in rows:
        row["run"] = row["run"].replace("runs/diagonal/", "runs/dm_stats/")
    result = measure(CLAIMS["dm_running_stats"], pd.DataFrame(rows), _settings())
    # layers 1, 3, 5: a mean extra of 0.03, so 0.13, 0.15, 0.17
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.13, 0.15, 0.17])
    assert result["verdict"] == HOLDS and result["source"] == "FuLA Fig. 3"


def test_every_experiment_has_a_short_label_for_the_summary():
    from stitching.claims import EXPERIMENT_LABELS, EXPERIMENTS

    assert set(EXPERIMENT_LABELS) == set(EXPERIMENTS)


def test_a_claim_reading_several_experiments_reads_the_same_two_models_in_each():
    # a row that joins the k-th pair of several experiments compares the same models, never two other pairs
    from stitching.claims import EXPERIMENTS

    for claim in CLAIMS.values():
        assert set(claim.experiments) <= set(EXPERIMENTS), claim.name
        pairings = [seed_pairs(5, EXPERIMENTS[e][0]) for e in claim.experiments]
        for pairs in zip(*pairings):
            assert len({frozenset(p) for p in pairs}) == 1, (claim.name, pairs)


def test_no_claim_is_a_minimum_of_several_effects():
    # a claim with several parts is several rows: no effect takes the min or max of several terms
    import inspect
    import re

    for claim in CLAIMS.values():
        assert not re.search(r"(?<![.\w])(min|max)\(", inspect.getsource(claim.effect)), claim.name


def test_a_claim_without_runs_is_inconclusive_and_says_why():
    result = measure(CLAIMS["ood_detectability"], pd.DataFrame(), _settings())
    assert result["verdict"] == UNSURE and result["pairs"] == 0 and "no finished runs" in result["why"]


def test_plan_runs_each_experiment_once_per_seed_pair():
    jobs = plan(_settings(seed_pairs=3), ["same_task_ordering", "dm_self_stitch", "self_stitch_diagonal_hint"])
    assert {(j.experiment, j.pair) for j in jobs if j.tag == "dm"} == {("diagonal", p) for p in seed_pairs(3, "two")} \
        | {(e, p) for p in seed_pairs(3, "self") for e in ("dm_self", "self_grids")}
    self_grid = next(j for j in jobs if j.experiment == "self_grids")
    assert "front.seed=0" in self_grid.overrides and "end.seed=0" in self_grid.overrides
    assert "grid.pairs=[[1,1],[1,3],[1,5],[1,7],[1,9],[3,1]" in next(o for o in self_grid.overrides
                                                                     if o.startswith("grid.pairs"))
    random = next(j for j in plan(_settings(random_start_epochs=7), ["dm_vs_tlm_self_directional"])
                  if j.tag == "tlm_random")
    assert {"objective=tlm", "stitch.init=random", "trainer.max_epochs=7"} <= set(random.overrides)
    assert not any(o.startswith("trainer.") for o in next(j for j in jobs if j.tag == "tlm").overrides)
    extra = plan(_settings(extra={"self_grids": ["dataset.train_subset=500"]}), ["self_stitch_diagonal_fula",
                                                                               "same_task_ordering"])
    assert all(("dataset.train_subset=500" in j.overrides) == (j.experiment == "self_grids") for j in extra)
    with pytest.raises(StitchingError, match="claims.extra names unknown experiment 'nope'"):
        plan(_settings(extra={"nope": []}), ["dm_self_stitch"])


def test_the_confirmatory_self_grid_runs_fresh_models_on_its_own_layers():
    jobs = plan(_settings(seed_pairs=3, grid_layers=[1, 5, 9], confirm_layers=[4, 6], random_start_epochs=7),
                ["dm_vs_tlm_self_directional_fresh", "dm_self_directional_fresh", "dm_vs_tlm_self_directional"])
    fresh = [j for j in jobs if j.experiment == "self_grids_fresh"]
    assert {j.pair for j in fresh} == {(6, 6), (7, 7), (8, 8)} and {j.tag for j in fresh} == {"dm", "tlm_random"}
    assert all("grid.pairs=[[4,4],[4,6],[6,4],[6,6]]" in j.overrides for j in fresh)
    assert all("front.seed=6" in j.overrides and "end.seed=6" in j.overrides for j in fresh if j.pair == (6, 6))
    assert {"stitch.init=random", "trainer.max_epochs=7"} <= set(next(j for j in fresh if j.tag == "tlm_random").overrides)
    assert all("grid.pairs=[[1,1],[1,5],[1,9],[5,1]" in next(o for o in j.overrides if o.startswith("grid.pairs"))
               for j in jobs if j.experiment == "self_grids")
    # null: the square grids' layers
    unset = plan(_settings(seed_pairs=1, grid_layers=[2, 8]), ["dm_self_directional_fresh"])
    assert {o for j in unset for o in j.overrides if o.startswith("grid.pairs")} == {"grid.pairs=[[2,2],[2,8],[8,2],[8,8]]"}
    # claims.confirm_pairs fresh models from claims.confirm_seed: planned and read, none shared with another claim
    settings = _settings(seed_pairs=3, confirm_pairs=5, confirm_seed=11)
    more = [j for j in plan(settings, list(CLAIMS)) if j.experiment == "self_grids_fresh"]
    assert sorted({j.pair for j in more}) == [(s, s) for s in range(11, 16)]
    others = {seed for j in plan(settings, list(CLAIMS)) if j.experiment != "self_grids_fresh" for seed in j.pair}
    assert others and not others & set(range(11, 16))
    assert [a for a, _ in experiment_pairs(_settings(seed_pairs=2, confirm_pairs=4), "fresh")] == [4, 5, 6, 7]
    assert experiment_pairs(settings, "two") == seed_pairs(3, "two")  # the others keep claims.seed_pairs


def _self_grid_rows(grids: dict, layers=(1, 5, 9), experiment="self_grids", pairing="self") -> pd.DataFrame:
    """``{(objective, init): 3×3 accuracies}`` per model, each pair 0.01 higher than the last."""
    return pd.DataFrame([{"run": f"runs/{experiment}/seeds{a}-{b}/{o}{'_random' if init == 'random' else ''}",
                          "objective": o, "init": init, "front_layer": layers[i], "end_layer": layers[j],
                          "test_acc": grid[i][j] + 0.01 * n}
                         for n, (a, b) in enumerate(seed_pairs(3, pairing)) for (o, init), grid in grids.items()
                         for i in range(3) for j in range(3)])


def test_the_distant_layer_claim_contrasts_dm_and_random_start_tlm_gaps():
    grids = {("dm", "dm"): [[0.9, 0.5, 0.4], [0.6, 0.9, 0.5], [0.5, 0.6, 0.9]],
             ("tlm", "random"): [[0.8, 0.8, 0.4], [0.9, 0.7, 0.5], [0.8, 0.9, 0.6]],
             ("tlm", "dm"): [[0.0, 0.0, 0.0]] * 3}  # TLM from DM is not this claim's: it must not be read
    frame = _self_grid_rows(grids)
    # layers 1, 5, 9 at distance ≥ 4: every off-diagonal cell. DM: 0.9 − 3.1/6; TLM: 2.1/3 − 4.3/6
    result = measure(CLAIMS["tlm_distant_layers"], frame, _settings(distant_layers=4))
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([(0.9 - 3.1 / 6) - (0.7 - 4.3 / 6)] * 3)
    # ≥ 8 apart: cells (1, 9) and (9, 1) alone. DM: 0.9 − 0.45; TLM: 0.7 − 0.6
    result = measure(CLAIMS["tlm_distant_layers"], frame, _settings(distant_layers=8))
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.45 - 0.1] * 3)
    none = measure(CLAIMS["tlm_distant_layers"], frame, _settings(distant_layers=9))
    assert none["pairs"] == 0 and "cut points apart" in none["per_pair"][0]["measured"]


def test_the_averaging_claim_compares_hints_averaged_and_directional_shares():
    # Hint's row 2 prefers layer 1 one way (0.95 > 0.9); averaged with the other way (0.5) the
    # diagonal wins it back: 3 of 3 rows averaged, 2 of 3 directional
    grids = {("hint", "dm"): [[0.9, 0.5, 0.4], [0.95, 0.9, 0.5], [0.5, 0.6, 0.9]],
             ("fula", "dm"): [[0.1, 0.9, 0.9]] * 3}  # another objective is not read
    result = measure(CLAIMS["averaging_directions"], _self_grid_rows(grids), _settings())
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([1 / 3] * 3)
    assert "averaged 1.00, one direction 0.67" in result["per_pair"][0]["measured"]


def test_the_ding_claims_contrast_dm_with_random_start_tlm_in_each_test(tmp_path):
    """Each grounding job's ``grounding.csv`` is read back per pair; the effect is ρ DM − ρ TLM."""
    from stitching.claims import _with_grounding

    rho = {"sensitivity": {"dm": [0.9, 0.8, 0.7], "tlm": [0.5, 0.9, 0.1]},
           "specificity": {"dm": [0.6, 0.4, 0.75], "tlm": [0.2, 0.1, 0.7]}}
    for n, (a, b) in enumerate(seed_pairs(3, "two")):
        for tag, measure_ in (("dm", "dm"), ("tlm_random", "tlm")):
            folder = tmp_path / "runs" / "grounding" / f"seeds{a}-{b}" / tag
            folder.mkdir(parents=True)
            pd.DataFrame([{"test": test, "measure": measure_, "rho": rho[test][measure_][n], "low": np.nan,
                           "high": np.nan, "items": 15, "layers": 3, "rho_pooled": 0.5} for test in rho]
                         ).to_csv(folder / "grounding.csv", index=False)
    runs = pd.DataFrame([{"run": "runs/diagonal/seeds0-1/dm/dm/f1-e1", "objective": "dm", "test_acc": 0.5}])
    frame = _with_grounding(runs, tmp_path)
    assert len(frame) == 1 + 3 * 2 * 2 and frame.run.iloc[0] == runs.run.iloc[0]
    for test, values in rho.items():
        result = measure(CLAIMS[f"ding_{test}"], frame, _settings())
        assert [p["effect"] for p in result["per_pair"]] == pytest.approx(
            [dm - tlm for dm, tlm in zip(values["dm"], values["tlm"])])
        assert result["unit"] == "rank correlation" and "TLM from a random map" in result["per_pair"][0]["measured"]
    jobs = plan(_settings(random_start_epochs=7, grounding={"layers": [3, 5], "ranks": [1, 2, 4]}),
                ["ding_sensitivity", "ding_specificity"])  # both rows read the same two jobs per pair
    assert sorted((j.tag, j.pair) for j in jobs) == sorted((t, p) for t in ("dm", "tlm_random")
                                                           for p in seed_pairs(3, "two"))
    assert {j.kind for j in jobs} == {"grounding"}
    tlm, dm = (next(j for j in jobs if j.tag == tag) for tag in ("tlm_random", "dm"))
    assert {"grounding.objectives=[tlm]", "stitch.init=random", "trainer.max_epochs=7", "stitch.update_bn=false",
            "grounding.layers=[3,5]", "grounding.ranks=[1,2,4]", "grounding.compare_layers=null",
            "grounding.indices=null"} <= set(tlm.overrides)
    assert "grounding.objectives=[dm]" in dm.overrides
    assert not any(o.startswith(("stitch.init", "trainer.")) for o in dm.overrides)


def test_the_in_distribution_claim_reads_dm_auroc_distance_from_chance():
    aurocs = {1: [0.55, 0.45, 0.70], 5: [0.50, 0.52, 0.46]}  # per pair: end layers 1 and 5
    rows = [{"run": f"runs/ood/seeds{a}-{b}/{o}/{o}/f{k}-e{k}", "objective": o, "front_layer": k, "end_layer": k,
             "ood_auroc": aurocs[k][n] if o == "dm" else 0.99}
            for n, (a, b) in enumerate(seed_pairs(3, "two")) for o in ("dm", "tlm") for k in (1, 5)]
    result = measure(CLAIMS["dm_in_distribution"], pd.DataFrame(rows), _settings(chance_auroc=0.1))
    # mean |AUROC − ½| per pair: (0.05 + 0)/2, (0.05 + 0.02)/2, (0.2 + 0.04)/2
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.1 - 0.025, 0.1 - 0.035, 0.1 - 0.12])
    assert "1: 0.550, 5: 0.500" in result["per_pair"][0]["measured"]


def test_grid_layers_shape_only_the_square_grids():
    jobs = plan(_settings(seed_pairs=3, grid_layers=[2, 8]), ["self_stitch_diagonal_tlm", "deeper_hints",
                                                             "same_task_ordering"])
    cells = {j.experiment: next(o for o in j.overrides if o.startswith("grid.pairs")) for j in jobs}
    assert cells["self_grids"] == cells["deeper_hints"] == "grid.pairs=[[2,2],[2,8],[8,2],[8,8]]"
    assert cells["diagonal"] == "grid.pairs=[[1,1],[3,3],[5,5],[7,7],[9,9]]"
    assert "layers 2, 8 × the same" in CLAIMS["deeper_hints"].setting(_settings(grid_layers=[2, 8]))


#: the language claim's runs, shrunk: toy GeLU/SoLU models trained on 20 000 tokens
TINY_LM = ["experiment=lm_solu_gelu_small", "model.width=32", "zoo.recipe.language.tokens=20000",
           "dataset.train_sequences=64", "dataset.test_sequences=16", "dataset.batch_size=16"]


@pytest.mark.slow
def test_the_shrunken_pipeline_writes_every_claims_row_from_real_runs(tmp_path, zoo_dir):
    """Every claim measured from runs on digits and tiny language models, whatever the verdicts."""
    lm = TINY_LM
    overrides = [*TINY, f"paths.zoo_dir={zoo_dir}", "dataset.train_subset=200", "attack.steps=2",
                 "attack.eval_images=50", "evaluation.ood.epochs=1", "claims.seed_pairs=1", "claims.layers=[1,5,9]",
                 "claims.early_layers=[1]", "claims.deep_layers=[9]", "claims.similarity_images=100",
                 "claims.cross_front=mnist5k", "claims.grounding.layers=[5]", "claims.grounding.ranks=[1,2,4]",
                 "claims.grounding.compare_layers=[1,5,9]", "+claims.extra.subset_cross=['+datasets.mnist5k.source.image_size=16']",
                 "+claims.extra.shortcut_cross={hint_cross:['+datasets.mnist5k.source.image_size=16'],"
                 "fula_cross:['+datasets.mnist5k.source.image_size=16']}",
                 f"claims.language=[{','.join(repr(o) for o in lm)}]"]
    out = tmp_path / "claims"
    try:
        claims_main(["--out", str(out), "--no-progress", *overrides])
    except SystemExit as stop:  # a failed run: the table is still written, and names it
        assert stop.code == 1
    record = json.loads((out / "claims.json").read_text())
    assert [r["name"] for r in record["claims"]] == list(CLAIMS)
    for result in record["claims"]:
        assert result["verdict"] == UNSURE  # one seed pair is never enough
        assert result["per_pair"][0]["effect"] is not None, (result["name"], result["per_pair"])
    table = (out / "claims.md").read_text()
    assert table.count("| **inconclusive**") == len(CLAIMS)
    assert (out / "effects.png").is_file() and "data:image/png;base64" in (out / "claims.html").read_text()
    papers = [c for c in CLAIMS.values() if not c.instrument]
    summary = (out / "summary.md").read_text().splitlines()
    assert len(summary) == 2 + len(papers) and all(line.endswith("| **inconclusive** |") for line in summary[2:])
    written = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    try:  # a second call finds every cell finished: nothing is trained or written again
        claims_main(["--out", str(out), "--no-progress", *overrides])
    except SystemExit:
        pass
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == written
    assert json.loads((out / "claims.json").read_text())["claims"] == record["claims"]


def test_jobs_at_once_run_the_same_jobs_with_the_same_effects(tmp_path, capsys):
    """``claims.jobs=2``: the base models train first, side by side, then the jobs run in two
    worker processes and give the serial run's records."""
    zoo = tmp_path / "zoo"  # empty: the two models train in the first phase, not inside a job
    overrides = [*TINY, f"paths.zoo_dir={zoo}", "claims.seed_pairs=2", "claims.min_pairs=2", "claims.layers=[1,9]",
                 "claims.early_layers=[1]", "claims.deep_layers=[9]"]
    base = [*overrides, "claims.only='dm_self_stitch'"]
    jobs = plan(compose_config(base).claims, ["dm_self_stitch"])
    wanted = {name for job in jobs for name in needs(job, base).models}
    assert len(wanted) == 2 and all(name.endswith(".pt") for name in wanted)
    records, runs = {}, {}
    for workers in (2, 1):
        out = tmp_path / f"jobs{workers}"
        claims_main(["--only", "dm_self_stitch", "--out", str(out), "--no-progress", *overrides,
                     f"claims.jobs={workers}"])
        records[workers] = json.loads((out / "claims.json").read_text())["claims"][0]
        runs[workers] = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("results.json"))
        if workers == 2:
            printed = capsys.readouterr().out
            assert "[claims] 2 base models to train, then 2 jobs, 2 at once" in printed
            assert {line.rsplit(": ", 1)[1] for line in printed.splitlines()
                    if line.startswith("[claims] base model ")} == wanted  # each trained by the first phase
            assert {p.name for p in zoo.glob("*.pt")} == wanted  # what the first phase named is what was trained
            assert not any(needs(job, base).models for job in jobs)  # and nothing is left for the jobs to train
    assert runs[2] == runs[1] and len(runs[1]) == 2 * 2  # two models against themselves, layers 1 and 9
    effects = {jobs: [p["effect"] for p in record["per_pair"]] for jobs, record in records.items()}
    assert len(effects[1]) == 2 and effects[2] == pytest.approx(effects[1], abs=1e-6)


def test_jobs_are_sized_from_their_settings_for_the_longest_first_order(tmp_path):
    """The order of ``claims.jobs`` > 1 reads each job's size from its own settings: more cells,
    epochs, images or attack passes is a larger job, and a job names no model the zoo holds."""
    base = [*TINY, f"paths.zoo_dir={tmp_path / 'zoo'}", "claims.seed_pairs=1", "claims.layers=[1,9]",
            "claims.early_layers=[1]", "claims.deep_layers=[9]"]
    c = compose_config(base).claims
    jobs = {(j.experiment, j.tag): j for j in plan(c, ["fabricated_robustness_slm", "unseen_classes_same_tlm",
                                                       "same_task_ordering", "ding_specificity"])}
    size = {key: needs(job, base).cost for key, job in jobs.items()}
    assert size["diagonal", "slm"] == 2 * size["subset", "slm"]  # two cells against one, each trained and tested
    assert size["robustness", "slm"] > 5 * size["subset", "slm"]  # the same one cell; PGD-10 adds 10 passes a step
    assert size["grounding", "tlm_random"] > size["grounding", "dm"] > size["diagonal", "dm"]  # DM: no epochs
    listed = list(jobs.values())
    models, order = schedule(listed, [needs(job, base) for job in listed])
    assert (order[0].experiment, order[0].tag) == ("grounding", "tlm_random") and order[-1].tag == "dm"
    assert sorted(order, key=lambda j: -size[j.experiment, j.tag]) == order and len(order) == len(listed)
    assert len(models) == 2  # the pair's two models, named once for all the jobs that need them
    models = needs(jobs["grounding", "dm"], base).models
    assert len(models) == 2  # the pair's two models (the end is the second of them), both missing
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name in models:  # a model the zoo holds is not named again
        (zoo / name).touch()
    assert not needs(jobs["grounding", "dm"], base).models


def test_bad_claims_settings_are_one_line(capsys):
    with pytest.raises(SystemExit):
        claims_main(["--only", "nope", "logger=none"])
    assert "unknown claim 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # several claims, comma-separated, are one value (not a Hydra sweep)
        claims_main(["--only", "dm_self_stitch,nope", "logger=none"])
    assert "unknown claim 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the list form of the override, read the same way
        claims_main(["claims.only=[dm_self_stitch,nope]", "logger=none"])
    assert "unknown claim 'nope'" in capsys.readouterr().err
    assert chosen(_settings(only=["dm_self_stitch", "deeper_hints"])) == ["dm_self_stitch", "deeper_hints"]
    with pytest.raises(SystemExit):
        claims_main(["claims.tolerance=2", "logger=none"])
    assert "claims.tolerance=2 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        claims_main(["claims.grid_layers=[0,5]", "logger=none"])
    assert "claims.grid_layers=[0, 5] is out of range: give a non-empty list of cut points" in capsys.readouterr().err
    for models in ("[lm_gelu]", "[lm_gelu,lm_gelu]"):
        with pytest.raises(SystemExit):
            claims_main([f"claims.language_models={models}", "logger=none"])
        assert "must name two different language models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        claims_main(["claims.early_layers=[2]", "logger=none"])
    assert "claims.early_layers=[2] must be among claims.layers=[1, 3, 5, 7, 9]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        claims_main(["claims.deep_layers=[8]", "logger=none"])
    assert "claims.deep_layers=[8] must be among claims.layers=[1, 3, 5, 7, 9]" in capsys.readouterr().err
    for decay in ("[5,6]", "[7,9]"):  # Fig. 6's claim compares layers before and after the 6th
        with pytest.raises(SystemExit):
            claims_main([f"claims.decay_layers={decay}", "logger=none"])
        assert "must hold cut points before and after layer 6" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no null: the Fig. 6 row always has layers to stitch
        claims_main(["claims.decay_layers=null", "logger=none"])
    assert "claims.decay_layers=null is out of range: give a non-empty list of cut points" in capsys.readouterr().err
    for key, value in (("claims.penultimate_layer", 0), ("claims.chance_accuracy", 0.7)):
        with pytest.raises(SystemExit):
            claims_main([f"{key}={value}", "logger=none"])
        assert f"{key}={value} is out of range" in capsys.readouterr().err


def test_a_cut_point_the_models_lack_is_one_line_before_any_run(tmp_path, zoo_dir, capsys):
    out = tmp_path / "claims"
    with pytest.raises(SystemExit):
        claims_main(["--out", str(out), "--no-progress", *TINY, f"paths.zoo_dir={zoo_dir}", "claims.grid_layers=[1,12]"])
    assert "claims name cut point(s) [12], but the models have cut points 1..9" in capsys.readouterr().err
    assert not (out / "runs").exists()
    language = ["--only", "solu_gelu_asymmetry", "claims.seed_pairs=1", f"paths.zoo_dir={zoo_dir}",
                "claims.grid_layers=[1,12]", "dataset=cifar10", "dataset.source.download=false",  # neither is read
                f"claims.language=[{','.join(repr(o) for o in TINY_LM)}]"]
    claims_main(["--out", str(tmp_path / "lm"), "--no-progress", *language])
    assert "claims name cut point" not in capsys.readouterr().err


def test_the_language_claim_contrasts_fronts_into_the_same_end():
    """[P(S→G) − P(G→G) + P(S→S) − P(G→S)] / 2 from hand-made records: here S→G exceeds G→S by 0.10,
    yet a SoLU front costs only 0.06 more than a GeLU front into the same end."""
    settings = _settings()
    penalty = {("lm_solu", "lm_gelu"): 0.30, ("lm_gelu", "lm_gelu"): 0.10, ("lm_solu", "lm_solu"): 0.12,
               ("lm_gelu", "lm_solu"): 0.20}
    rows = [{"run": f"runs/language/seeds{a}-{b}/{f}_{e}/tlm/f{k}-e{k}", "objective": "tlm", "front_arch": f,
             "end_arch": e, "front_layer": k, "end_layer": k, "test_adjusted_penalty": value + 0.01 * n + 0.001 * k}
            for n, (a, b) in enumerate(seed_pairs(3, "two")) for (f, e), value in penalty.items() for k in (1, 2, 3)]
    result = measure(CLAIMS["solu_gelu_asymmetry"], pd.DataFrame(rows), settings)
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.06] * 3)
    assert result["pairs"] == 3 and result["verdict"] == UNSURE  # identical replicates: nothing to test
    jobs = [job for job in plan(settings, ["solu_gelu_asymmetry"]) if job.pair == (0, 1)]
    assert sorted(job.tag for job in jobs) == ["lm_gelu_lm_gelu", "lm_gelu_lm_solu", "lm_solu_lm_gelu",
                                               "lm_solu_lm_solu"]
    assert all({"front.seed=0", "end.seed=1"} <= set(job.overrides) for job in jobs)


def test_instrument_checks_are_reported_apart_from_paper_claims(tmp_path):
    from stitching.claims import write_report

    results = [measure(CLAIMS[name], pd.DataFrame(), _settings()) for name in ("dm_self_stitch", "ood_detectability")]
    assert [r["instrument"] for r in results] == [True, False]
    write_report(results, pd.DataFrame(), tmp_path, _settings(), {"base": [], "epochs": 1, "base_accuracy": "—"})
    text = (tmp_path / "claims.md").read_text()
    papers, checks = text.split("## Instrument checks")
    assert "1 paper claims" in papers and "energy-detector" in papers and "DM stitch of a model" not in papers
    assert "DM stitch of a model" in checks.split("## Settings")[0]
    assert "confirmatory" not in text  # no confirmatory row among these: their models are not named
    fresh = [measure(CLAIMS["dm_self_directional_fresh"], pd.DataFrame(), _settings(confirm_pairs=2, confirm_seed=7))]
    write_report(fresh, pd.DataFrame(), tmp_path, _settings(confirm_pairs=2, confirm_seed=7),
                 {"base": [], "epochs": 1, "base_accuracy": "—"})
    assert "the confirmatory self grids: 2 fresh models, seeds 7, 8" in (tmp_path / "claims.md").read_text()


def test_the_robustness_claims_score_robust_accuracy_by_the_papers_attack_at_paper_size():
    from stitching.build import read_settings

    for preset, attack, metric in (("claims", "autoattack", "test_robust_acc_autoattack"),
                                   ("claims_small", "pgd", "test_robust_acc_pgd")):
        claims = compose_config([f"experiment={preset}"]).claims
        jobs = [job for job in plan(claims, ["fabricated_robustness_tlm"]) if job.experiment == "robustness"]
        assert jobs and all(f"attack={attack}" in job.overrides for job in jobs)
        rows = [{"run": f"runs/robustness/seeds{a}-{b}/{o}", "objective": o, "alpha": 1, metric: v}
                for a, b in seed_pairs(3, "two") for o, v in (("hint", 0.1), ("fula", 0.2), ("slm", 0.5), ("tlm", 0.6))]
        result = measure(CLAIMS["fabricated_robustness_tlm"], pd.DataFrame(rows), claims)
        assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.45] * 3)  # 0.6 − (0.1 + 0.2) / 2
        assert ("AutoAttack-rand" if attack == "autoattack" else "PGD-10") in result["setting"]
    with pytest.raises(StitchingError, match="claims.robust_attack=fgsm is out of range: it must be pgd or autoattack"):
        read_settings(compose_config(["logger=none", "claims.robust_attack=fgsm"]))


def test_fula_above_hint_reads_the_clean_accuracy_of_the_adversarial_same_task_runs():
    claims = _settings()
    rows = [{"run": f"runs/robustness/seeds{a}-{b}/{o}/{o}/f5-e5", "objective": o, "alpha": 1, "test_acc": v + 0.01 * n}
            for n, (a, b) in enumerate(seed_pairs(3, "two"))
            for o, v in (("hint", 0.70), ("fula", 0.73 + 0.01 * n), ("slm", 0.9), ("tlm", 0.9))]
    # another experiment's FuLA runs are not read
    rows += [{"run": f"runs/robust_end/seeds{a}-{b}/fula_alpha1/fula/f9-e9", "objective": "fula", "test_acc": 0.0}
             for a, b in seed_pairs(3, "two")]
    result = measure(CLAIMS["fula_above_hint"], pd.DataFrame(rows), claims)
    assert [p["effect"] for p in result["per_pair"]] == pytest.approx([0.03, 0.04, 0.05])
    assert result["verdict"] == HOLDS and "layer 5" in result["setting"]


def test_the_robust_front_claims_stitch_the_odd_seeds_robust_model_into_the_even_seeds_plain_one():
    from stitching.validation import check_config

    for preset in ("claims", "claims_cpu", "claims_small"):  # every job composes to valid settings at every size
        for job in plan(compose_config([f"experiment={preset}"]).claims, ["robust_front_robust_tlm"]):
            check_config(compose_config([f"experiment={preset}", *job.overrides]))
    claims = compose_config(["experiment=claims_small"]).claims
    jobs = plan(claims, ["robust_front_costs_clean"])
    assert [j.pair for j in jobs] == [(1, 0)] * 9 + [(3, 2)] * 9 + [(5, 4)] * 9  # the same disjoint models, reversed
    for job in jobs:
        a, b = job.pair
        alpha0 = job.tag.endswith("_alpha0")  # α = 0 at the corresponding layers on 1 000 images; α = 1 at layer 5 on 500
        layers = "[[1,1],[3,3],[5,5],[7,7],[9,9]]" if alpha0 else "[[5,5],[9,9]]" if job.tag == "fula_last" else "[[5,5]]"
        assert {"front.robust=true", "attack=pgd", f"attack.alpha={0 if alpha0 else 1}", f"front.seed={a}",
                f"end.seed={b}", f"grid.pairs={layers}"} <= set(job.overrides)
        assert "end.robust=true" not in job.overrides and ("dataset.train_subset=500" in job.overrides) != alpha0
    sizes = needs(jobs[0], ["experiment=claims_small", "paths.zoo_dir=/nonexistent"])
    assert sorted(name.split("-e8-")[0] for name in sizes.models) == ["resnet18-w8-fmnist5000-s0",
                                                                      "resnet18-w8-fmnist5000-s1-robust0.1"]
    # the effects against hand computation: SLM/TLM robust accuracy above Hint/FuLA's, their clean accuracy below
    rows = [{"run": f"runs/robust_front/seeds{a}-{b}/{o}/{o}/f5-e5", "objective": o, "alpha": 1, "test_acc": acc,
             "test_robust_acc_pgd": robust + 0.01 * n}
            for n, (a, b) in enumerate(seed_pairs(3, "reversed"))
            for o, acc, robust in (("hint", 0.8, 0.1), ("fula", 0.82, 0.12), ("slm", 0.6, 0.4), ("tlm", 0.7, 0.3))]
    # α = 0 runs of the same experiment, between the models (clean 0.77 front, 0.83 end) but far below the α = 1
    # runs' robust accuracy: the α = 1 rows never read them, the interpolation rows read nothing else
    base = {"front_acc": 0.77, "end_acc": 0.83, "front_robust_acc_pgd": 0.66, "end_robust_acc_pgd": 0.0}
    rows += [{"run": f"runs/robust_front/seeds{a}-{b}/{o}_alpha0/{o}/f{k}-e{k}", "objective": o, "alpha": 0,
              "front_layer": k, "test_acc": 0.8 if k > 1 else 0.75 - 0.01 * n, "test_robust_acc_pgd": 0.0, **base}
             for n, (a, b) in enumerate(seed_pairs(3, "reversed")) for o in TRAINED for k in (1, 5, 9)]
    frame = pd.DataFrame(rows)
    effect = {name: [p["effect"] for p in measure(CLAIMS[name], frame, claims)["per_pair"]]
              for name in ("robust_front_robust_slm", "robust_front_robust_tlm", "robust_front_costs_clean",
                           "robust_front_interpolation_clean", "robust_front_interpolation_robust")}
    # four of the twelve α = 0 stitches (layer 1) fall 0.02 + 0.01 n below the front's clean accuracy
    assert effect["robust_front_interpolation_clean"] == pytest.approx([0.02 - (0.02 + 0.01 * n) / 3 for n in range(3)])
    assert effect["robust_front_interpolation_robust"] == pytest.approx([0.02] * 3)
    assert effect["robust_front_robust_slm"] == pytest.approx([0.4 - 0.11] * 3)
    assert effect["robust_front_robust_tlm"] == pytest.approx([0.3 - 0.11] * 3)
    assert effect["robust_front_costs_clean"] == pytest.approx([0.81 - 0.65] * 3)
    # the plain pairs' folders (seeds0-1, …) are another experiment's: not read
    assert measure(CLAIMS["robust_front_costs_clean"], frame.assign(run=frame.run.str.replace("seeds1-0", "seeds0-1")),
                   claims)["per_pair"][0]["effect"] is None


def test_the_directional_claims_read_the_self_grid_one_direction_at_a_time():
    # a 3×3 self grid per objective: DM's diagonal best in every row; TLM from a random map (the
    # TLM-vs-DM paper's start) in none (row 1 ties), TLM from DM (the FuLA paper's) in two of three
    grids = {("dm", "dm"): [[0.9, 0.5, 0.4], [0.6, 0.9, 0.5], [0.5, 0.6, 0.9]],
             ("tlm", "random"): [[0.8, 0.8, 0.4], [0.9, 0.7, 0.5], [0.8, 0.9, 0.6]],
             ("tlm", "dm"): [[0.9, 0.8, 0.4], [0.9, 0.7, 0.5], [0.5, 0.6, 0.9]],
             ("fula", "dm"): [[0.9, 0.5, 0.4], [0.7, 0.9, 0.5], [0.6, 0.8, 0.9]],
             ("hint", "dm"): [[0.9, 0.5, 0.4], [0.6, 0.9, 0.5], [0.5, 0.6, 0.9]]}
    frame = _self_grid_rows(grids)
    dm_vs_tlm = measure(CLAIMS["dm_vs_tlm_self_directional"], frame, _settings())
    assert [p["effect"] for p in dm_vs_tlm["per_pair"]] == pytest.approx([1.0] * 3)
    assert "TLM from a random map 0.00" in dm_vs_tlm["per_pair"][0]["measured"]
    # the FuLA paper's rows read the DM-start TLM grid: Hint/FuLA 1.00 each, TLM 2 of 3 rows
    fula_rows = measure(CLAIMS["self_stitch_diagonal_tlm"], frame, _settings())
    assert [p["effect"] for p in fula_rows["per_pair"]] == pytest.approx([1 / 3] * 3)
    without = measure(CLAIMS["dm_vs_tlm_self_directional"], frame[frame.init != "random"], _settings())
    assert without["verdict"] == UNSURE and "no random-start TLM self-stitching grid" in without["why"]
    # the confirmatory grids on fresh models read the same way, from their own experiment
    fresh = _self_grid_rows({k: v for k, v in grids.items() if k in (("dm", "dm"), ("tlm", "random"))},
                            experiment="self_grids_fresh", pairing="fresh")
    confirmed = measure(CLAIMS["dm_vs_tlm_self_directional_fresh"], fresh, _settings())
    assert [p["effect"] for p in confirmed["per_pair"]] == pytest.approx([1.0] * 3)
    assert "TLM from DM" not in confirmed["per_pair"][0]["measured"]
    assert measure(CLAIMS["dm_vs_tlm_self_directional_fresh"], frame, _settings())["pairs"] == 0  # not its runs
    # with more confirmatory models, every one of them is a pair of the row, read from its own folder
    more = pd.concat([fresh, fresh[fresh.run.str.contains("seeds6-6")].assign(
        run=lambda f: f.run.str.replace("seeds6-6", "seeds9-9"), test_acc=lambda f: f.test_acc * 0)])
    four = measure(CLAIMS["dm_vs_tlm_self_directional_fresh"], more, _settings(confirm_pairs=4))
    assert [p["pair"] for p in four["per_pair"]] == [[6, 6], [7, 7], [8, 8], [9, 9]] and four["pairs"] == 4
    assert four["per_pair"][3]["read"] == ["runs/self_grids_fresh/seeds9-9/"] and four["per_pair"][3]["effect"] == 0
    fula = measure(CLAIMS["fula_directional"], frame, _settings())
    # pairs (5→1, 1→5), (9→1, 1→9), (9→5, 5→9): 0.7 − 0.5, 0.6 − 0.4, 0.8 − 0.5
    assert [p["effect"] for p in fula["per_pair"]] == pytest.approx([(0.2 + 0.2 + 0.3) / 3] * 3)


def test_the_cka_claim_feeds_each_index_as_the_authors_do_and_scores_it_against_pwcca_and_opd(tmp_path, zoo_dir):
    """CKA from every feature of an image, PWCCA and OPD by matching positions (the authors'
    ``compute_metrics``), read back as two single-contrast claims."""
    from stitching.claims import Job, run_job
    from stitching.results.records import collect
    from stitching.similarity.grid import AUTHORS_FLATTEN

    base = [*TINY, f"paths.zoo_dir={zoo_dir}", "claims.layers=[1,9]", "claims.early_layers=[1]", "claims.deep_layers=[9]",
            "claims.similarity_images=64",
            "front.seed=0", "end.seed=1"]
    job = Job("similarity", (0, 1), "cka_pwcca_opd", (), "similarity")
    assert run_job(job, base, tmp_path, progress=False) == []
    written = {p.parent.name: set(pd.read_csv(p).objective) for p in job.folder(tmp_path).rglob("similarity.csv")}
    assert written == {"sample": {"cka"}, "match": {"pwcca", "procrustes"}}
    assert all(AUTHORS_FLATTEN[index] == flatten for flatten, names in written.items() for index in names)
    records = {p: p.stat().st_mtime_ns for p in job.folder(tmp_path).rglob("similarity.json")}
    assert run_job(job, base, tmp_path, progress=False) == []  # a stopped check resumes: nothing computed again
    assert len(records) == 2 and all(p.stat().st_mtime_ns == t for p, t in records.items())
    with pytest.raises(StitchingError, match=r"other settings \(--images\)"):  # never kept as another size's grids
        run_job(job, [*base, "claims.similarity_images=32"], tmp_path, progress=False)
    frame = collect(tmp_path)[0]
    for other in ("pwcca", "procrustes"):
        effect, what = CLAIMS[f"cka_finds_layers_{other}"].effect(frame, _settings())
        assert -1 <= effect <= 1 and what.startswith("rows found CKA") and ("OPD" if other == "procrustes" else "PWCCA") in what


def test_the_cross_task_shortcut_claim_contrasts_marker_reliance_across_and_within_a_task():
    """Hand-made records: cross-task Hint/FuLA gain 0.10 and 0.06 from the markers, same-task
    0.01 and −0.01: the effect is their mean difference, 0.08 − 0.00."""
    rows = []
    for objective, cross, same in (("hint", 0.10, 0.01), ("fula", 0.06, -0.01)):
        for front, gain in (("mnist5k", cross), ("fmnist", same)):
            for layer in (7, 9):
                rows.append({"objective": objective, "front_dataset": front, "end_dataset": "fmnist",
                             "front_layer": layer, "test_acc": 0.7, "test_acc_shortcut": 0.7 + gain})
    rows.append({"objective": "tlm", "front_dataset": "mnist5k", "end_dataset": "fmnist", "front_layer": 9,
                 "test_acc": 0.5, "test_acc_shortcut": 1.0})  # another objective is not read
    effect, what = CLAIMS["shortcut_location_cross"].effect(pd.DataFrame(rows), _settings())
    assert effect == pytest.approx(0.08) and "cross-task +0.080, same-task +0.000" in what
    with pytest.raises(LookupError, match="missing"):
        CLAIMS["shortcut_location_cross"].effect(pd.DataFrame([r for r in rows if r["front_dataset"] == "fmnist"]),
                                                 _settings())
    jobs = plan(_settings(seed_pairs=1, extra={"shortcut_cross": {"hint_cross": ["+x=1"]}}), ["shortcut_location_cross"])
    assert [j.tag for j in jobs if "+x=1" in j.overrides] == ["hint_cross"]  # an extra for one job only
    with pytest.raises(StitchingError, match=r"claims.extra.robustness=dataset.train_subset=500: give a list"):
        plan(_settings(extra={"robustness": "dataset.train_subset=500"}), ["robustness_costs_clean"])  # not one char each
    with pytest.raises(StitchingError, match="claims.extra.shortcut_cross names unknown job 'nope'; its jobs are"):
        plan(_settings(extra={"shortcut_cross": {"nope": []}}), ["shortcut_location_cross"])
    assert sorted(j.tag for j in jobs) == ["fula_cross", "fula_same", "hint_cross", "hint_same"]
    for job in jobs:
        assert "shortcut.placement=location" in job.overrides and "grid.pairs=[[7,7],[9,9]]" in job.overrides
        assert ("front.dataset=ls_imagenet10" in job.overrides) == job.tag.endswith("cross")


def test_the_loss_figure_keeps_runs_of_other_budgets_apart(tmp_path, monkeypatch):
    # a TLM grid from a random start trains 10 epochs beside the others' 4: one line per budget
    from matplotlib.axes import Axes

    from stitching.claims import loss_curves

    frame = pd.DataFrame({"objective": ["tlm", "tlm", "hint"],
                          "train_curve": [[2.0, 1.0, 0.8, 0.7], [4.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.9, 0.8, 0.8, 0.8],
                                          [1.0, 0.5, 0.4, 0.4]]})
    shown, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *args, **kwargs: shown.append(kwargs.get("label"))
                        or plot(self, *args, **kwargs))
    assert loss_curves(frame, tmp_path / "curves.png").is_file()
    assert sorted(shown) == ["HINT", "TLM (10 epochs)", "TLM (4 epochs)"]


def _robust_end_rows(pair, n):
    """One pair's robust_end runs: α = 0 at layers 1, 5, 9 (clean between the models' 0.70 and 0.80,
    robust between 0.0 and 0.5, except where noted), α = 1 Hint/FuLA at layers 7 and 9."""
    a, b = pair
    base = {"front_acc": 0.80, "end_acc": 0.70, "front_robust_acc_pgd": 0.0, "end_robust_acc_pgd": 0.5,
            "num_classes": 10}
    rows = [{"run": f"runs/robust_end/seeds{a}-{b}/{o}_alpha0/{o}/f{k}-e{k}", "objective": o, "alpha": 0,
             "front_layer": k, "end_layer": k, "test_acc": 0.75, "test_robust_acc_pgd": 0.2, **base}
            for o in TRAINED for k in (1, 5, 9)]
    rows[0]["test_acc"] = 0.70 - 0.12 - 0.03 * n  # hint at layer 1 falls below both models by 0.12 + 0.03 n
    rows[1]["test_robust_acc_pgd"] = 0.6  # above both models' robust accuracy by 0.1
    rows += [{"run": f"runs/robust_end/seeds{a}-{b}/{o}_alpha1/{o}/f{k}-e{k}", "objective": o, "alpha": 1,
              "front_layer": k, "end_layer": k, "test_acc": acc, **base}
             for o, k, acc in (("hint", 7, 0.6), ("hint", 9, 0.11 + 0.01 * n), ("fula", 7, 0.5), ("fula", 9, 0.3))]
    # last-hint FuLA: into the robust end 0.7 at layers 1 and 5, 0.2 at 9; into the plain end 0.8 throughout,
    # less 0.05 n at layer 9
    # and the CKA of their DM starts: into the robust end 0.8, 0.7, 0.3 + 0.01 n; into the plain end 0.9, 0.85, 0.6
    rows += [{"run": f"runs/robust_end/seeds{a}-{b}/fula_last_{end}/fula/f{k}-e{k}", "objective": "fula", "alpha": 1,
              "front_layer": k, "end_layer": k, "test_acc": acc, "init_penultimate_cka": cka, **base}
             for end, k, acc, cka in (("robust", 1, 0.7, 0.8), ("robust", 5, 0.7, 0.7), ("robust", 9, 0.2, 0.3 + 0.01 * n),
                                      ("plain", 1, 0.8, 0.9), ("plain", 5, 0.8, 0.85), ("plain", 9, 0.8 - 0.05 * n, 0.6))]
    # and from the robust model of seed a into the robust end: 0.6, 0.6, 0.5 − 0.02 n; the robust model of seed b
    # into the plain model of seed a (the robust_front experiment's pair (b, a)): 0.75, 0.65, 0.6 − 0.03 n
    rows += [{"run": f"runs/robust_end/seeds{a}-{b}/fula_last_both/fula/f{k}-e{k}", "objective": "fula", "alpha": 1,
              "front_layer": k, "end_layer": k, "test_acc": acc, **base}
             for k, acc in ((1, 0.6), (5, 0.6), (9, 0.5 - 0.02 * n))]
    rows += [{"run": f"runs/robust_front/seeds{b}-{a}/fula_last/fula/f{k}-e{k}", "objective": "fula", "alpha": 1,
              "front_layer": k, "end_layer": k, "test_acc": acc, **base}
             for k, acc in ((1, 0.75), (5, 0.65), (9, 0.6 - 0.03 * n))]
    return rows


def test_the_robust_end_claims_read_alpha_0_ranges_and_alpha_1_deep_layers():
    """Against hand computation: the α = 0 rows average each stitch's distance outside its models'
    range; the α = 1 rows read layer 9 against chance and Hint − FuLA at the deep layers."""
    settings = _settings(tolerance=0.02, chance_accuracy=0.05, penultimate_layer=9, deep_layers=[7, 9],
                         decay_layers=[1, 5, 9], robust_attack="pgd")
    frame = pd.DataFrame([row for n, pair in enumerate(seed_pairs(3, "two")) for row in _robust_end_rows(pair, n)])
    effects = {name: [p["effect"] for p in measure(CLAIMS[name], frame, settings)["per_pair"]]
               for name in CLAIMS if name.startswith("robust_")}
    # twelve α = 0 stitches per pair, one outside the clean range by 0.12 + 0.03 n, one outside the robust by 0.1
    assert effects["robust_interpolation_clean"] == pytest.approx([0.02 - (0.12 + 0.03 * n) / 12 for n in range(3)])
    assert effects["robust_interpolation_robust"] == pytest.approx([0.02 - 0.1 / 12] * 3)
    # Hint 0.11 + 0.01 n and FuLA 0.3 at layer 9: their mean is 0.105 + 0.005 n above chance
    assert effects["robust_penultimate_chance"] == pytest.approx([0.05 - 0.105 - 0.005 * n for n in range(3)])
    assert effects["robust_hint_deep"] == pytest.approx([(0.6 + 0.11 + 0.01 * n - 0.5 - 0.3) / 2 for n in range(3)])
    # a run at another layer (here 5) is read by neither the chance row nor the deep-layer row
    extra = pd.DataFrame([{**row, "front_layer": 5, "end_layer": 5, "test_acc": 0.0,
                           "run": row["run"].replace("f9-e9", "f5-e5")} for row in frame.to_dict("records")
                          if "_alpha1/" in row["run"] and row["front_layer"] == 9])
    again = pd.concat([frame, extra], ignore_index=True)
    for name in ("robust_hint_deep", "robust_penultimate_chance"):
        assert [p["effect"] for p in measure(CLAIMS[name], again, settings)["per_pair"]] == pytest.approx(effects[name])
    assert effects["robust_decay"] == pytest.approx([0.5 - 0.05 * n for n in range(3)])  # 0.7 − 0.2, less the plain drop
    # the robust front's drops: 0.6 − (0.5 − 0.02 n) into the robust end; (0.75 + 0.65) / 2 − (0.6 − 0.03 n) into the
    # plain model, read from the robust_front experiment's k-th pair (b, a): the same two models the other way
    assert effects["robust_decay_both"] == pytest.approx([0.5 - 0.1 - 0.02 * n for n in range(3)])
    assert effects["robust_decay_reverse"] == pytest.approx([0.5 - 0.1 - 0.03 * n for n in range(3)])
    assert measure(CLAIMS["robust_decay_reverse"], frame, settings)["verdict"] == HOLDS
    # each pair's record names the run folders it read: here the same two models in both experiments
    assert [p["read"] for p in measure(CLAIMS["robust_decay_reverse"], frame, settings)["per_pair"]] == [
        [f"runs/robust_end/seeds{a}-{b}/", f"runs/robust_front/seeds{b}-{a}/"] for a, b in seed_pairs(3, "two")]
    # a pair whose reverse runs are missing is not measured: never the robust end's drop against nothing
    partial = frame[~frame.run.str.startswith("runs/robust_front/seeds3-2/")]
    assert [p["effect"] is None for p in measure(CLAIMS["robust_decay_reverse"], partial, settings)["per_pair"]] == [
        False, True, False]
    # the robust → plain runs are read from robust_front alone: the same job name in robust_end is not them
    moved = frame.assign(run=frame.run.str.replace(r"runs/robust_front/seeds(\d)-(\d)/", r"runs/robust_end/seeds\2-\1/",
                                                   regex=True))
    assert all(p["effect"] is None for p in measure(CLAIMS["robust_decay_reverse"], moved, settings)["per_pair"])
    # CKA into the robust end at layer 9 (0.3 + 0.01 n) lies below the next lowest cell (the plain end's 0.6)
    assert effects["robust_cka_least"] == pytest.approx([0.3 - 0.01 * n for n in range(3)])
    assert measure(CLAIMS["robust_cka_least"], frame, settings)["verdict"] == HOLDS
    # the decay reads claims.decay_layers alone, though its jobs also run the penultimate layer; the CKA row reads
    # every cell: with the robust end's layer 5 lowest, layer 9 is no longer the least similar
    assert [p["effect"] for p in measure(CLAIMS["robust_decay"], frame, _settings(**{**settings, "decay_layers": [1, 5]}))[
        "per_pair"]] == [None] * 3  # no layer after the 6th: not measured, never a value from the other layers
    lower = frame.assign(init_penultimate_cka=np.where(frame.run.str.contains("fula_last_robust/fula/f5"), 0.1,
                                                       frame.init_penultimate_cka))
    assert [p["effect"] for p in measure(CLAIMS["robust_cka_least"], lower, settings)["per_pair"]] == pytest.approx(
        [0.1 - 0.3 - 0.01 * n for n in range(3)])
    assert measure(CLAIMS["robust_cka_least"], lower, settings)["verdict"] == FAILS
    assert measure(CLAIMS["robust_penultimate_chance"], frame, settings)["verdict"] == FAILS
    near = 0.1 + 0.01 * frame.run.str.contains("seeds2-3").astype(float)  # chance, and 0.01 above it in one pair
    at_chance = frame.assign(test_acc=np.where(frame.front_layer == 9, near, frame.test_acc))
    assert measure(CLAIMS["robust_penultimate_chance"], at_chance, settings)["verdict"] == HOLDS


def test_the_robust_end_jobs_stitch_a_non_robust_front_into_a_robust_end():
    from stitching.validation import check_config

    for preset in ("claims", "claims_cpu", "claims_small"):  # every job composes to valid settings at every size
        for job in plan(compose_config([f"experiment={preset}"]).claims, ["robust_decay"]):
            check_config(compose_config([f"experiment={preset}", *job.overrides]))
    claims = compose_config(["experiment=claims_small"]).claims
    jobs = plan(claims, ["robust_interpolation_clean", "robust_hint_deep"])
    assert {j.tag for j in jobs} == {"hint_alpha0", "fula_alpha0", "slm_alpha0", "tlm_alpha0", "hint_alpha1",
                                     "fula_alpha1", "fula_last_robust", "fula_last_plain", "fula_last_both"}
    for job in jobs:
        alpha = "1" if job.tag.startswith("fula_last") else job.tag[-1]
        assert {f"end.robust={str(job.tag != 'fula_last_plain').lower()}", "attack=pgd",
                f"attack.alpha={alpha}"} <= set(job.overrides)
        assert ("objective.weights=last" in job.overrides) == job.tag.startswith("fula_last")
        assert ("grid.pairs=[[5,5],[9,9]]" in job.overrides) == job.tag.startswith("fula_last")
        assert ("evaluation.penultimate_cka=true" in job.overrides) == job.tag.startswith("fula_last")
        assert ("front.robust=true" in job.overrides) == (job.tag == "fula_last_both")
        assert f"front.seed={job.pair[0]}" in job.overrides and f"end.seed={job.pair[1]}" in job.overrides
        assert ("dataset.train_subset=500" in job.overrides) == (alpha == "1")
    # the reverse decay row runs both experiments: robust_front's Fig. 6 job is robust 2s + 1 → plain 2s
    reverse = plan(claims, ["robust_decay_reverse"])
    assert {j.experiment for j in reverse} == {"robust_end", "robust_front"}
    for job in (j for j in reverse if j.experiment == "robust_front" and j.tag == "fula_last"):
        a, b = job.pair
        assert a == b + 1 and {"front.robust=true", "end.robust=false", "objective.weights=last", "attack.alpha=1",
                               "dataset.train_subset=500", f"front.seed={a}", f"end.seed={b}"} <= set(job.overrides)
    # the α = 1 jobs run the penultimate layer even where it is not among the deep layers
    other = plan(_settings(deep_layers=[7], penultimate_layer=9), ["robust_penultimate_chance"])
    assert all("grid.pairs=[[7,7],[9,9]]" in j.overrides for j in other if j.tag.endswith("alpha1"))
    # and the Fig. 6 jobs run it beside claims.decay_layers, for the CKA row
    other = plan(_settings(decay_layers=[5, 8], penultimate_layer=9), ["robust_cka_least"])
    assert all("grid.pairs=[[5,5],[8,8],[9,9]]" in j.overrides for j in other if j.tag.startswith("fula_last"))
    # the robust ends are named apart from the plain ones, with their recipe in the zoo's identity
    sizes = needs(next(j for j in jobs if j.tag == "hint_alpha1"),
                  ["experiment=claims_small", "paths.zoo_dir=/nonexistent"])
    assert any("-robust0.1-" in name for name in sizes.models)


@pytest.mark.parametrize("preset", ["claims", "claims_cpu", "claims_small"])
def test_adversarial_images_reach_every_adversarial_job_and_no_other(preset):
    """``claims.adversarial_images`` is stated once and reaches exactly the jobs that stitch on
    adversarial examples (``attack.alpha=1``), in every experiment; null leaves them alone, and an
    explicit ``claims.extra`` for one job still has the last word."""
    claims = compose_config([f"experiment={preset}", "logger=none"]).claims
    OmegaConf.set_struct(claims, False)
    for images in (None, 123):
        settings = OmegaConf.merge(claims, {"adversarial_images": images, "extra": {}})
        jobs = plan(settings, list(CLAIMS))
        adversarial = [j for j in jobs if "attack.alpha=1" in j.overrides]
        assert {j.experiment for j in adversarial} >= {"robustness", "robust_end", "robust_front"}
        for job in jobs:
            assert ("dataset.train_subset=123" in job.overrides) == (images == 123 and job in adversarial), job
    settings = OmegaConf.merge(claims, {"adversarial_images": 123,
                                        "extra": {"robust_end": {"fula_alpha1": ["dataset.train_subset=77"]}}})
    job = next(j for j in plan(settings, ["robust_penultimate_chance"]) if j.tag == "fula_alpha1")
    subsets = [o for o in job.overrides if o.startswith("dataset.train_subset=")]
    assert subsets[-1] == "dataset.train_subset=77"  # Hydra keeps the last of two overrides of one key
    # α read as a value, the last override winning, however written
    from stitching.claims import _adversarial_subset
    assert _adversarial_subset(["attack.alpha=1.0"], 9) == _adversarial_subset(["+attack.alpha=0.5"], 9) == [
        "dataset.train_subset=9"]
    assert _adversarial_subset(["attack.alpha=1", "attack.alpha=0.0"], 9) == _adversarial_subset(["attack=pgd"], 9) == []


def test_claims_small_is_claims_cpu_on_smaller_models_and_fewer_test_images():
    # the 90-minute design (fixed 2026-12-06): every claim, replicate, layer, budget and test of claims_cpu;
    # only the models' width, their training images and the stitches' test images differ
    cpu = OmegaConf.to_container(compose_config(["experiment=claims_cpu"]), resolve=True)
    small = OmegaConf.to_container(compose_config(["experiment=claims_small"]), resolve=True)

    def leaves(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, value in tree.items() for k, v in leaves(value, f"{prefix}{key}.").items()}

    cpu, small = leaves(cpu), leaves(small)
    differ = {key: (cpu.get(key), small.get(key)) for key in {*cpu, *small} if cpu.get(key) != small.get(key)}
    assert differ == {"model.width": (16, 8), "front.width": (16, 8), "end.width": (16, 8),
                      "dataset.base_images": (10000, 5000), "dataset.test_subset": (None, 2000)}
    # its jobs are claims_cpu's jobs, the same overrides in the same order
    claims = compose_config(["experiment=claims_small"]).claims
    assert [(j.experiment, j.pair, j.tag, j.overrides) for j in plan(claims, list(CLAIMS))] == \
        [(j.experiment, j.pair, j.tag, j.overrides) for j in plan(compose_config(["experiment=claims_cpu"]).claims,
                                                                     list(CLAIMS))]
