"""The sensitivity and specificity tests: the rank correlation against SciPy, its bootstrap
interval, the items, and a shrunken end-to-end run on digits that writes every output, trains each
front model's items as one grid whose cells equal their single runs, and resumes; a failed stitch
or grid is a named gap."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stitching.build import compose_config, read_settings
from stitching.errors import StitchingError
from stitching.groundings import layer_correlation, rank_correlation, run_tests, sensitivity_items, spearman, specificity_items
from stitching.runs import run


def test_spearman_equals_scipy_with_and_without_ties():
    generator = np.random.default_rng(0)
    for trial in range(5):
        a = generator.normal(size=40)
        b = a + generator.normal(size=40) * (trial + 1) * 0.3
        if trial % 2:  # ties on both sides
            a, b = np.round(a, 0), np.round(b, 0)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_the_bootstrap_interval_of_rho_covers_the_full_data_value():
    generator = np.random.default_rng(1)
    for trial in range(4):
        functional = generator.uniform(size=30)
        dissimilarity = functional + generator.normal(size=30) * 0.3
        dissimilarity[trial] = np.nan  # an undefined item is left out, not counted
        result = rank_correlation(dissimilarity, functional, draws=300, seed=trial)
        assert result["items"] == 29
        assert result["low"] <= result["rho"] <= result["high"] and result["high"] - result["low"] < 0.8
    constant = rank_correlation(np.ones(10), np.arange(10.0), draws=50)
    assert np.isnan(constant["rho"]) and constant["items"] == 10


def test_items_skip_ranks_a_layer_does_not_have():
    items = sensitivity_items([1, 4], [1, 8, 16, 32], {1: 16, 4: 32}, seed=1)
    assert [(i.front_layer, i.rank) for i in items] == [(1, 8), (1, 1), (4, 16), (4, 8), (4, 1)]
    assert all(i.front_seed == 1 and i.end_layer == i.front_layer for i in items)
    pairs = specificity_items([3], [0, 1], [1, 2])
    assert [(i.front_seed, i.front_layer, i.end_layer) for i in pairs] == [(0, 1, 3), (0, 2, 3), (1, 1, 3), (1, 2, 3)]


def _shrunken(zoo_dir, tmp_path, *grounding: str) -> list[str]:
    """The overrides of a shrunken grounding run on digits, as its command line gives them
    (``tiny_config`` takes them from the ninth on: its own preset sets the model and trainer)."""
    return ["dataset=digits", "model=resnet18_narrow", "model.width=8", "zoo.recipe.epochs=4", "trainer=cpu",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
            f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
            "grounding.objectives=[dm,hint]", "grounding.layers=[3]", "grounding.ranks=[1,2,4]",
            "grounding.seeds=[0]", *grounding]


def test_a_shrunken_grounding_run_writes_every_output_and_resumes(tiny_config, tmp_path, zoo_dir):
    overrides = _shrunken(zoo_dir, tmp_path, "grounding.compare_layers=[1,3,5,7]", "grounding.indices=[cka,cca]",
                          "grounding.bootstrap=50", "probe.epochs=3")
    cfg = tiny_config(*overrides[8:])
    out = tmp_path / "grounding"
    record = run_tests(cfg, overrides, out, progress=False)
    assert not record["failed"]
    items = pd.read_csv(out / "items.csv")
    assert sorted(items["test"].value_counts().to_dict().items()) == [("sensitivity", 3), ("specificity", 4)]
    for measure in ("dm", "hint", "cka", "cca"):
        assert items[measure].notna().all()
    # the functional difference is the gap in probe accuracy, the full reference's own probe cached
    assert (items["functional"] - (items["probe"] - items["reference_probe"]).abs()).abs().max() < 1e-12
    table = pd.read_csv(out / "grounding.csv")
    assert set(table["measure"]) == {"dm", "hint", "cka", "cca"} and set(table["test"]) == {"sensitivity", "specificity"}
    assert (out / "grounding.png").is_file() and "## sensitivity (3 items)" in (out / "grounding.md").read_text()
    runs = sorted((out / "stitching").rglob("results.json"))
    assert len(runs) == 2 * 7
    truncated = json.loads((out / "stitching/sensitivity/dm/s1-f3-r2_e3/results.json").read_text())
    assert truncated["stitch"]["front_rank"] == 2 and truncated["config"]["front"]["seed"] == 1
    # the items of one front model and rank train as one grid, and each cell is its own single run
    for test, name, cells, extra in (("sensitivity", "s1-f3-r2_e3", 1, ["front.seed=1", "stitch.front_rank=2",
                                                                      "stitch.front_layer=3", "stitch.end_layer=3"]),
                                     ("specificity", "s0-f5_e3", 4, ["front.seed=0", "stitch.front_layer=5",
                                                                    "stitch.end_layer=3"])):
        fused = json.loads((out / f"stitching/{test}/hint/{name}/results.json").read_text())
        single = run(read_settings(compose_config([*overrides, "objective=hint", *extra])), tmp_path / "single" / name)
        assert fused["timings"]["fused_cells"] == cells and fused["config_hash"] == single["config_hash"]
        for metric in ("test/acc", "test/loss"):
            assert fused["metrics"][metric] == pytest.approx(single["metrics"][metric], abs=1e-5)
    # a finished run is read back, not redone
    stamps = {path: path.stat().st_mtime_ns for path in runs}
    again = run_tests(cfg, overrides, out, progress=False)
    assert {path: path.stat().st_mtime_ns for path in runs} == stamps
    assert again["correlations"] == record["correlations"]
    # the claims' grounding job reads a finished record back only when the same settings made it
    from stitching.claims import _grounding_job

    stamp = (out / "grounding.json").stat().st_mtime_ns
    assert _grounding_job(overrides, out, False) == [] and (out / "grounding.json").stat().st_mtime_ns == stamp
    assert _grounding_job([*overrides, "grounding.bootstrap=20"], out, False) == []
    assert json.loads((out / "grounding.json").read_text())["settings"]["bootstrap"] == 20
    assert {path: path.stat().st_mtime_ns for path in runs} == stamps  # its stitching runs were read back
    # a folder holding another config's finished runs is left untouched: those items are gaps, named
    other = run_tests(tiny_config(*overrides[8:], "stitch.lr=0.002"), [*overrides, "stitch.lr=0.002"], out,
                      progress=False)
    assert len(other["failed"]) == 14 and "different config" in other["failed"][0]
    assert {path: path.stat().st_mtime_ns for path in runs} == stamps


def test_grounding_settings_are_checked_before_any_work(tiny_config, tmp_path):
    for override, message in (("grounding.test=both_ways", "choose sensitivity, specificity or both"),
                              ("grounding.objectives=[dm,cka]", "unknown objective cka"),
                              ("grounding.ranks=[0,2]", "ranks start at 1"),
                              ("grounding.ranks=[4096]", "the sensitivity test has 0 item.s. for reference layer 1 and "
                                                         "a rank correlation needs at least three per reference layer; "
                                                         "give at least three grounding.ranks below"),
                              ("grounding.flatten=rows", "choose authors, sample, positions, pool, match"),
                              ("grounding.indices=minibatch_cka", "streaming estimator"),
                              ("front.width=16", "models of one family")):
        with pytest.raises(StitchingError, match=message):
            run_tests(tiny_config(override), [], tmp_path / "g", progress=False)


def test_the_layer_score_is_the_mean_of_scipys_rho_within_each_reference_layer():
    generator = np.random.default_rng(2)
    layers = np.repeat([3, 5, 7], [6, 8, 5])
    functional = generator.uniform(size=len(layers))
    dissimilarity = functional * np.where(layers == 5, -1, 1) + generator.normal(size=len(layers)) * 0.2
    dissimilarity[0] = np.nan
    result = layer_correlation(dissimilarity, functional, layers, draws=200, seed=0)
    keep = np.isfinite(dissimilarity)
    expected = np.mean([stats.spearmanr(dissimilarity[keep & (layers == k)], functional[keep & (layers == k)]).statistic
                        for k in (3, 5, 7)])
    assert result["rho"] == pytest.approx(expected, abs=1e-12) and result["layers"] == 3 and result["items"] == 18
    assert result["rho_pooled"] == pytest.approx(stats.spearmanr(dissimilarity[keep], functional[keep]).statistic,
                                                 abs=1e-12)
    assert result["low"] <= result["rho"] <= result["high"]
    # a layer whose dissimilarities do not vary has no correlation and is left out of the mean
    flat = np.where(layers == 7, 0.5, dissimilarity)
    assert layer_correlation(flat, functional, layers, draws=0)["layers"] == 2


def test_every_index_has_the_authors_input():
    from stitching.similarity.grid import AUTHORS_FLATTEN
    from stitching.similarity.grid import FLATTEN, INDICES

    assert set(AUTHORS_FLATTEN) == {name for name, index in INDICES.items() if not index.streaming} and set(AUTHORS_FLATTEN.values()) <= set(FLATTEN)
    assert AUTHORS_FLATTEN["cka"] == "sample" and AUTHORS_FLATTEN["pwcca"] == AUTHORS_FLATTEN["procrustes"] == "match"


def test_a_stitch_that_fails_is_a_named_gap_and_so_is_a_grid_that_cannot_start(tiny_config, tmp_path, zoo_dir,
                                                                              monkeypatch):
    import stitching.grids
    from stitching.objectives import losses

    overrides = _shrunken(zoo_dir, tmp_path, "grounding.compare_layers=[1,3,5]", "grounding.indices=[]",
                          "grounding.bootstrap=20", "probe.epochs=2")
    cfg = tiny_config(*overrides[8:])
    real = losses.hint_loss
    monkeypatch.setattr(losses, "hint_loss", lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    record = run_tests(cfg, overrides, tmp_path / "nan", progress=False)
    items = pd.read_csv(tmp_path / "nan" / "items.csv")
    assert items["hint"].isna().all() and items["dm"].notna().all()  # every Hint stitch diverged, every DM one ran
    assert len(record["failed"]) == 6 and all("/hint/" in line and "nan" in line for line in record["failed"])
    failed = json.loads((tmp_path / "nan/stitching/specificity/hint/s0-f5_e3/results.json").read_text())
    assert failed["status"] == "failed"  # recorded as a failure, never as a result

    def cannot_start(*args, **kwargs):
        raise RuntimeError("out of memory while setting up the grid")

    monkeypatch.setattr(losses, "hint_loss", real)
    monkeypatch.setattr(stitching.grids, "run_grid", cannot_start)
    record = run_tests(cfg, overrides, tmp_path / "start", progress=False)
    assert len(record["failed"]) == 12 and all("out of memory" in line for line in record["failed"])
    statuses = {json.loads(path.read_text())["status"] for path in (tmp_path / "start").rglob("results.json")}
    assert statuses == {"failed"} and len(list((tmp_path / "start").rglob("results.json"))) == 12
