"""Similarity grids in one pass, their CLI, and the two sanity checks in the report."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stitching.models import build_model, cut_point_activations
from stitching.report import report
from stitching.results.records import NOT_READ
from stitching.results.tables import sanity_checks
from stitching.similarity import SimilarityError, linear_cka, rbf_cka, unbiased_cka
from stitching.similarity.__main__ import main as similarity_main
from stitching.similarity.grid import pair_matrices, parse_indices, similarity_grids
from tests.conftest import TINY


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _model(seed, arch="resnet18"):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, width=4, **({"depth": 3, "image_size": 16} if arch == "vit_tiny" else {}))
    counter = _Counting()
    model.blocks[0] = torch.nn.Sequential(counter, model.blocks[0])
    return model.eval(), counter


def test_one_pass_per_batch_and_a_layer_is_most_similar_to_itself():
    model, counter = _model(0)
    images = torch.rand(60, 3, 16, 16)
    grids, problems = similarity_grids(model, model, images, ["cka", "minibatch_cka", "procrustes"],
                                       batch_size=20, progress=False)
    assert counter.calls == 2 * 3  # each model once per batch, whatever the number of indices
    assert not problems
    for name in ("cka", "minibatch_cka", "procrustes"):
        assert grids[name].shape == (9, 9)
        np.testing.assert_allclose(np.diag(grids[name]), 1.0, atol=1e-9)
        assert (grids[name] <= 1.0 + 1e-9).all()


def test_grid_cells_equal_the_pure_functions_on_the_same_activations():
    front, _ = _model(1)
    end, _ = _model(2)
    images = torch.rand(40, 3, 16, 16)
    grids, _ = similarity_grids(front, end, images, ["cka", "unbiased_cka"], flatten="pool", progress=False)
    with torch.no_grad():
        fa, eb = cut_point_activations(front, images)[1][3], cut_point_activations(end, images)[1][6]
    x, y = pair_matrices(fa, eb, "pool")
    assert grids["cka"][3, 6] == pytest.approx(linear_cka(x, y), rel=1e-9)
    assert grids["unbiased_cka"][3, 6] == pytest.approx(unbiased_cka(x, y), rel=1e-6, abs=1e-9)
    for sigma in (0.4, 0.8):  # the bandwidth flag reaches every cell
        grid, _ = similarity_grids(front, end, images, ["rbf_cka"], flatten="pool", progress=False, rbf_sigma=sigma)
        assert grid["rbf_cka"][3, 6] == pytest.approx(rbf_cka(x, y, sigma=sigma), rel=1e-9)
    assert rbf_cka(x, y, sigma=0.4) != pytest.approx(rbf_cka(x, y, sigma=0.8), rel=1e-3)


@pytest.mark.parametrize("flatten", ["pool", "sample"])
def test_the_neighbourhood_rsa_and_predictivity_cells_equal_their_pure_functions(flatten):
    """Wide layers (``sample``: more features than images) go through the grid's reduced form;
    the cells still equal the measures on the raw activations."""
    from stitching.similarity import cknna, linear_predictivity, mutual_knn, rsa

    front, _ = _model(1)
    end, _ = _model(2)
    images = torch.rand(40, 3, 16, 16)
    names = ["mutual_knn", "cknna", "rsa", "ridge_r2"]
    grids, problems = similarity_grids(front, end, images, names, flatten=flatten, progress=False)
    assert not problems
    with torch.no_grad():
        fa, eb = cut_point_activations(front, images)[1][2], cut_point_activations(end, images)[1][5]
    x, y = pair_matrices(fa, eb, flatten)
    for name, measure in zip(names, (mutual_knn, cknna, rsa, linear_predictivity)):
        assert grids[name][2, 5] == pytest.approx(measure(x, y), abs=1e-6), name


def test_vit_grids_and_positions_mode():
    front, _ = _model(3, "vit_tiny")
    end, _ = _model(4, "vit_tiny")
    grids, problems = similarity_grids(front, end, torch.rand(30, 3, 16, 16), ["cka", "cca"], flatten="positions",
                                       progress=False)
    assert grids["cka"].shape == (3, 3) and np.isfinite(grids["cka"]).all() and not problems


def test_bad_index_and_flatten_requests_are_refused_clearly():
    with pytest.raises(SimilarityError, match="choose from"):
        parse_indices("cka,bogus")
    model, _ = _model(0)
    with pytest.raises(SimilarityError, match="flatten=sample or flatten=pool"):
        similarity_grids(model, model, torch.rand(8, 3, 16, 16), ["minibatch_cka"], flatten="positions", progress=False)


def test_degenerate_cells_are_listed_not_fatal():
    model, _ = _model(0)
    grids, problems = similarity_grids(model, model, torch.rand(12, 3, 16, 16), ["cca", "cka"], progress=False)
    assert np.isnan(grids["cca"]).all() and np.isfinite(grids["cka"]).all()
    assert len(problems) == 81 and "degenerate" in problems[0]


def _grid_rows(method, grid, front_model, end_model, front_arch="resnet18"):
    return [{"objective": method, "front_layer": i + 1, "end_layer": j + 1, "score": v, "front_model": front_model,
             "end_model": end_model, "front_arch": front_arch, "end_arch": "resnet18", "front_dataset": "d", "end_dataset": "d"}
            for (i, j), v in np.ndenumerate(np.asarray(grid, dtype=float))]


def test_sanity_checks_name_the_check_by_the_pair_of_models():
    self_grid = [[1.0, 0.5, 0.2], [0.5, 1.0, 0.6], [0.2, 0.6, 1.0]]
    shifted = [[0.4, 0.9, 0.1], [0.3, 0.8, 0.2], [0.1, 0.2, 0.7]]  # row 1 misses, rows 2 and 3 hit
    frame = pd.DataFrame(_grid_rows("cka", self_grid, "m0", "m0") + _grid_rows("tlm", shifted, "m0", "m1")
                         + _grid_rows("dm", self_grid, "vit", "m1", front_arch="vit_tiny"))
    results = {(r["method"], r["check"]): r["score"] for r in sanity_checks(frame)}
    assert results == {("cka", "a layer is most similar to itself"): 1.0,
                       ("tlm", "corresponding layers"): pytest.approx(2 / 3, abs=1e-4)}  # a cross-arch pair has none
    tied = [[0.9, 0.9, 0.1], [0.2, 0.8, 0.2], [0.1, 0.2, 0.7]]  # row 1 ties: neither a hit nor a miss hidden
    (row,) = sanity_checks(pd.DataFrame(_grid_rows("tlm", tied, "m0", "m1")))
    assert row["score"] == pytest.approx(2 / 3, abs=1e-4) and row["ties"] == 1


def test_similarity_cli_writes_the_report_format_and_the_report_joins_it(tmp_path, zoo_dir, capsys):
    overrides = [*TINY, f"paths.zoo_dir={zoo_dir}", "end.seed=0"]
    similarity_main(["--index", "cka,cca", "--images", "60", "--flatten", "pool", "--no-progress",
                     "--out", str(tmp_path / "sim"), *overrides])
    printed = capsys.readouterr().out
    assert "a layer is most similar to itself" in printed
    record = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    assert set(record["grids"]) == {"cka", "cca"} and len(record["grids"]["cka"]) == 9
    assert record["front"] == record["end"] and record["images"] == 60 and record["flatten"] == "pool"
    assert record["sanity"][0]["score"] == 1.0  # CKA(X, X) = 1 on the diagonal
    assert (tmp_path / "sim" / "heatmap.png").is_file()
    # a structural index reads the models' settings, none of the stitch's: those conditions read n/a, so the
    # report draws the index beside every stitching condition instead of under the config's defaults
    rows = pd.read_csv(tmp_path / "sim" / "similarity.csv", keep_default_na=False)
    assert {column: set(rows[column].astype(str)) for column in ("init", "epochs", "alpha", "stitch_kind", "dm_samples",
                                                                 "update_bn", "weights")} == \
        {column: {NOT_READ} for column in ("init", "epochs", "alpha", "stitch_kind", "dm_samples", "update_bn", "weights")}
    assert set(rows.front_arch) == {"resnet18"} and set(rows.end_seed.astype(int)) == {0}
    made = report(tmp_path)
    assert {"cka", "cca"} <= set(made["frame"].objective)
    assert made["heatmap"].is_file() and (tmp_path / "sanity.md").is_file()
    with pytest.raises(SystemExit):
        similarity_main(["--index", "nope", *overrides])
    assert "unknown index" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        similarity_main(["--index", "rbf_cka", "--rbf-sigma", "0", *overrides])
    assert "--rbf-sigma" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a stitch's layer does not apply: every layer pair is compared
        similarity_main(["--index", "cka", *overrides, "stitch.front_layer=3"])
    assert "stitch.front_layer=3: a similarity grid compares every layer pair" in capsys.readouterr().err


def test_a_similarity_sweep_is_one_pair_per_combination_in_one_process_and_resumes(tmp_path, zoo_dir, capsys):
    """``-m``: every combination of the swept keys is one pair of models, each grid the same as its
    single run; a pair already computed is kept; a layer axis and a bad combination are refused
    before anything is computed."""
    overrides = [*TINY, f"paths.zoo_dir={zoo_dir}"]
    flags = ["--index", "cka", "--images", "40", "--flatten", "pool", "--no-progress"]
    similarity_main([*flags, "-m", "--out", str(tmp_path / "sweep"), *overrides, "end.seed=0,1"])
    folders = sorted(f for f in (tmp_path / "sweep").iterdir() if f.is_dir())
    assert [f.name for f in folders] == ["0_end.seed=0", "1_end.seed=1"]
    similarity_main([*flags, "--out", str(tmp_path / "alone"), *overrides, "end.seed=1"])
    alone = json.loads((tmp_path / "alone" / "similarity.json").read_text())
    swept = [json.loads((f / "similarity.json").read_text()) for f in folders]
    assert swept[1]["grids"] == alone["grids"] and swept[1]["end"] == alone["end"] != swept[0]["end"]
    capsys.readouterr()
    before = (folders[0] / "similarity.json").stat().st_mtime_ns
    (folders[1] / "similarity.json").unlink()  # a sweep stopped before its second pair
    similarity_main([*flags, "-m", "--out", str(tmp_path / "sweep"), *overrides, "end.seed=0,1"])
    assert "0_end.seed=0: already computed, kept" in capsys.readouterr().out
    assert (folders[0] / "similarity.json").stat().st_mtime_ns == before
    one = [*flags, "--resume", "--out", str(folders[0]), *overrides, "end.seed=0"]  # one pair, as make's loops run it
    similarity_main(one)
    assert "already computed, kept" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        similarity_main([*one, "similarity.batch_size=7"])
    assert "other settings (--batch-size)" in capsys.readouterr().err
    assert (folders[0] / "similarity.json").stat().st_mtime_ns == before
    assert json.loads((folders[1] / "similarity.json").read_text())["grids"] == alone["grids"]
    for other, says in ((["--index", "cca"], "(--index)"), (["--images", "30"], "(--images)"),
                        (["--front-rank", "1"], "(the overrides)")):
        with pytest.raises(SystemExit):  # a resumed sweep never keeps grids that other settings asked for
            similarity_main([*flags, *other, "-m", "--out", str(tmp_path / "sweep"), *overrides, "end.seed=0,1"])
        assert f"holds similarity grids asked for with other settings {says}" in capsys.readouterr().err
    assert (folders[0] / "similarity.json").stat().st_mtime_ns == before
    for bad, says in ((["stitch.layer=1,2"], "--layers"),
                      (["end.seed=0,1", "similarity.batch_size=8,0"], "--batch-size 0"),
                      (["end.seed=0,1", "--index", "nope"], "unknown index")):
        with pytest.raises(SystemExit):
            similarity_main([*flags, "-m", "--out", str(tmp_path / "refused"), *overrides, *bad])
        assert says in capsys.readouterr().err
        assert not (tmp_path / "refused").exists() or not any(f.is_dir() for f in (tmp_path / "refused").iterdir())


def test_match_flattening_is_positions_for_one_shape_and_pooled_otherwise():
    """The TLM-vs-DM authors' PWCCA/Procrustes input, computed here by hand from the raw maps."""
    from stitching.similarity import procrustes_distance, pwcca

    front, _ = _model(1)
    end, _ = _model(2)
    images = torch.rand(80, 3, 16, 16)
    grids, _ = similarity_grids(front, end, images, ["pwcca", "procrustes"], flatten="match", progress=False)
    with torch.no_grad():
        fronts, ends = cut_point_activations(front, images)[1], cut_point_activations(end, images)[1]
    same, other = (2, 2), (2, 8)  # one stage (equal shapes), and a later stage (other channels and size)
    assert fronts[same[0]].shape == ends[same[1]].shape and fronts[other[0]].shape != ends[other[1]].shape
    rows = lambda a: a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double()  # noqa: E731  every position a sample
    pool = lambda a: a.mean(dim=(2, 3)).double()  # noqa: E731  one vector per image
    a, b = fronts[same[0]], ends[same[1]]
    assert grids["pwcca"][same] == pytest.approx(pwcca(rows(a), rows(b)), rel=1e-6)
    assert grids["procrustes"][same] == pytest.approx(1 - procrustes_distance(rows(a), rows(b)) / 2, rel=1e-6)
    a, b = fronts[other[0]], ends[other[1]]
    assert grids["pwcca"][other] == pytest.approx(pwcca(pool(a), pool(b)), rel=1e-6)
    with pytest.raises(SimilarityError, match="flatten=match"):
        similarity_grids(front, end, images, ["minibatch_cka"], flatten="match", progress=False)


def test_a_condition_a_method_lacks_keeps_its_rows_in_the_sanity_table_and_every_facet():
    """A similarity index has no ``dm_bn_pass``: its rows stay in the sanity table (the condition
    reads n/a) and are drawn in every facet of that condition, beside the runs that read it."""
    from stitching.results.tables import facets, sanity_table

    common = {"ties": 0, "layers": 5, "arch": "resnet18", "front": "a", "end": "a", "pairing": "self",
              "check": "a layer is most similar to itself", "score": 1.0}
    table = sanity_table([{**common, "method": "dm", "dm_bn_pass": True},
                          {**common, "method": "dm", "dm_bn_pass": False},
                          {**common, "method": "cka", "dm_bn_pass": float("nan")}])
    assert sorted(table.index.get_level_values("method")) == ["cka", "dm", "dm"]
    frame = pd.DataFrame({"objective": ["dm", "dm", "cka"], "dm_bn_pass": [True, False, np.nan], "score": [1, 2, 3]})
    drawn = facets(frame)
    assert [label for label, _ in drawn] == ["dm_bn_pass=False", "dm_bn_pass=True"]
    assert all("cka" in set(rows.objective) for _, rows in drawn)


def test_a_structural_index_is_drawn_beside_the_authors_tlm_start_and_its_dm_start_ablation():
    """`make sanity`'s layout: DM and TLM started at DM for one epoch, TLM from a random map for ten
    (it reads no ``dm_bn_pass``), and CKA, which reads none of the stitch's settings: CKA is drawn
    beside both TLM starts, and whole-number settings read as set (``epochs=10``, not ``10.0``)."""
    from stitching.results.tables import facets, sanity_table

    from stitching.results.records import NOT_READ

    nan = np.nan  # as the records read: a stitch's unread setting is n/a, a similarity row's missing
    frame = pd.DataFrame({"objective": ["dm", "tlm", "tlm", "cka"], "init": ["dm", "dm", "random", nan],
                          "dm_bn_pass": [False, NOT_READ, NOT_READ, nan], "epochs": [1, 1, 10, nan], "score": [1, 2, 3, 4]})
    drawn = {label: sorted(rows.objective) for label, rows in facets(frame)}
    assert drawn == {"init=dm, dm_bn_pass=False, epochs=1": ["cka", "dm", "tlm"],
                     "init=random, epochs=10": ["cka", "tlm"]}
    common = {"ties": 0, "layers": 5, "arch": "resnet18", "front": "a", "end": "a", "pairing": "self",
              "check": "a layer is most similar to itself", "score": 1.0}
    table = sanity_table([{**common, "method": "tlm", "init": "random", "epochs": 10.0},
                          {**common, "method": "cka", "init": nan, "epochs": nan}])
    assert sorted(table.index.get_level_values("epochs")) == ["10", "n/a"]
