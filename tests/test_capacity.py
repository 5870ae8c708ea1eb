"""Stitch capacity (``stitch.kind``), rank truncation of the front (``stitch.front_rank``) and
where a stitch starts (``stitch.init``), against closed forms and the models themselves."""

import math

import numpy as np
import pytest
import torch

from stitching.api import prepare_stitch
from stitching.errors import StitchingError
from stitching.models import build_model
from stitching.models.layout import CONV, as_rows
from stitching.stitch_layers import Stitch, dm_solution, principal_projection, reduced_rank_solution


def _data(seed=0, n=300, c_in=8, c_out=6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, generator=generator, dtype=torch.double) * torch.linspace(0.2, 3, c_in).double()
    w = torch.randn(c_out, c_in, generator=generator, dtype=torch.double)
    y = x @ w.T + 0.5 + 0.3 * torch.randn(n, c_out, generator=generator, dtype=torch.double)
    return x, y


def _rss(x, y, weight, bias):
    return float(((x @ weight.T + bias - y) ** 2).sum())


def test_reduced_rank_regression_meets_its_closed_form_optimum():
    """RSS of the rank-r solution = RSS of the full least squares + the squared singular values of
    the centred fitted values beyond r (Pythagoras), and no other rank-r map of the same data beats it."""
    x, y = _data()
    w_full, b_full = dm_solution(x, y)
    fitted = x @ w_full.T + b_full
    singular = np.linalg.svd((fitted - fitted.mean(0)).numpy(), compute_uv=False)
    for rank in (1, 3, 6):
        down, up, bias = reduced_rank_solution(x, y, rank)
        weight = up @ down
        assert np.linalg.matrix_rank(weight.numpy()) == rank
        expected = _rss(x, y, w_full, b_full) + float((singular[rank:] ** 2).sum())
        assert _rss(x, y, weight, bias) == pytest.approx(expected, rel=1e-9)
        # truncating the full map's own SVD is a rank-r map too, and never better
        u, s, vh = torch.linalg.svd(w_full)
        truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
        refit_bias = (y - x @ truncated.T).mean(0)
        assert _rss(x, y, truncated, refit_bias) >= _rss(x, y, weight, bias) - 1e-9


def test_a_low_rank_stitch_fits_by_reduced_rank_regression_and_an_mlp_starts_at_dm():
    torch.manual_seed(0)
    front, end = torch.randn(40, 8, 3, 3), torch.randn(40, 6, 3, 3)
    rows_x, rows_y = as_rows(front, CONV), as_rows(end, CONV)
    low = Stitch(8, 6, out_size=(3, 3), kind="low_rank", rank=2)
    low.fit(front, end)
    down, up, bias = reduced_rank_solution(rows_x, rows_y, 2)
    torch.testing.assert_close(low.weight[:, :, 0, 0], up @ down, atol=1e-5, rtol=1e-5)
    assert low.channels == (8, 6) and low.kind == "low_rank"
    assert sum(p.numel() for p in low.parameters()) == 2 * 8 + 6 * 2 + 6
    affine, mlp = Stitch(8, 6, out_size=(3, 3)), Stitch(8, 6, out_size=(3, 3), kind="mlp", hidden=5)
    affine.fit(front, end)
    mlp.fit(front, end)
    torch.testing.assert_close(mlp(front), affine(front))  # the branch starts at zero output
    assert mlp.branch[0].out_channels == 5
    with pytest.raises(ValueError, match="needs stitch.rank in"):
        Stitch(8, 6, kind="low_rank", rank=7)


def test_rank_projection_is_exact_at_full_rank_and_drops_the_smallest_eigenvalues():
    x, _ = _data(seed=2, n=200, c_in=8)
    full = principal_projection(x, 8, CONV)
    a = x.float().reshape(50, 4, 8).permute(0, 2, 1)[..., None]  # as a conv map [N, C, 4, 1]
    rows = as_rows(a, CONV)
    torch.testing.assert_close(as_rows(full(a), CONV), rows, atol=1e-5, rtol=1e-5)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(rows.double().numpy(), rowvar=False)))[::-1]
    for rank in (1, 3, 5):
        projected = as_rows(principal_projection(rows, rank, CONV)(a), CONV).double()
        centred = projected - projected.mean(0)
        assert np.linalg.matrix_rank(centred.numpy(), tol=1e-4) == rank
        error = float(((projected - rows.double()) ** 2).sum())
        assert error == pytest.approx((len(rows) - 1) * eigenvalues[rank:].sum(), rel=1e-4)


def _pair():
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10, width=4).eval(), torch.rand(32, 3, 16, 16)


def test_identity_init_between_a_model_and_itself_reproduces_the_model():
    model, images = _pair()
    for layer in (2, 5):
        prepared = prepare_stitch(model, model, layer, layer, images, "hint", init="identity", update_bn=False)
        network = prepared.network.eval()
        with torch.no_grad():
            assert torch.equal(network(images), model(images))


def test_front_rank_truncates_the_front_in_dm_training_and_evaluation():
    model, images = _pair()
    prepared = prepare_stitch(model, model, 3, 3, images, "dm", front_rank=2)
    stitch = prepared.network.stitch
    with torch.no_grad():
        seen = as_rows(stitch.prepare(prepared.front.head(images)[0]), CONV).double()
    assert np.linalg.matrix_rank((seen - seen.mean(0)).numpy(), tol=1e-4) == 2
    full = prepare_stitch(model, model, 3, 3, images, "dm", front_rank=stitch.channels[0]).network
    with torch.no_grad():  # every direction kept: the self-stitch reproduces the model
        torch.testing.assert_close(full.eval()(images), model(images), atol=1e-4, rtol=1e-4)
    with pytest.raises(StitchingError, match="stitch.front_rank=99 exceeds the front's"):
        prepare_stitch(model, model, 3, 3, images, "dm", front_rank=99)
    with pytest.raises(StitchingError, match="stitch.rank=99 exceeds"):
        prepare_stitch(model, model, 3, 3, images, "hint", kind="low_rank", rank=99)
    with pytest.raises(StitchingError, match="needs stitch.rank"):
        prepare_stitch(model, model, 3, 3, images, "hint", kind="low_rank")


@pytest.mark.parametrize("kind", ["low_rank", "mlp"])
@pytest.mark.parametrize("objective", ["hint", "fula", "slm", "tlm"])
def test_low_rank_and_mlp_stitches_train_under_every_objective(kind, objective):
    model, images = _pair()
    other = build_model("resnet18", num_classes=10, width=4)
    labels = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(0))
    prepared = prepare_stitch(model, other, 4, 4, images, objective, kind=kind, rank=2, hidden=3, lr=1e-2)
    network = prepared.network
    before = {k: v.clone() for k, v in network.stitch.state_dict().items()}
    frozen = {k: v.detach().clone() for k, v in network.front.named_parameters()}
    from torch.utils.data import DataLoader, TensorDataset

    from stitching.engine import fit_engine

    loader = DataLoader(TensorDataset(images, labels), batch_size=max(1, len(images) // 3))
    result = fit_engine(prepared.engine, loader, loader, {"accelerator": "cpu", "max_epochs": 1,
                                                          "enable_progress_bar": False})
    assert all(math.isfinite(v) for v in result["f4-e4"]["metrics"].values())
    after = network.stitch.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, f"{kind} stitch did not move under {objective}"
    if kind == "mlp":
        assert any(k.startswith("branch") for k in moved)
    assert all(torch.equal(v, dict(network.front.named_parameters())[k]) for k, v in frozen.items())


def test_structural_indices_see_the_front_truncated_as_the_stitch_does(tmp_path, zoo_dir, tiny_config):
    """``--front-rank`` truncates each front layer with the projection a stitch of the same config
    fits (same DM samples); the CKA cell equals CKA of the projected activations, written out."""
    import json

    from tests.conftest import TINY

    from stitching.api import prepare_stitch
    from stitching.build import build_datamodule, build_zoo, read_settings
    from stitching.similarity import linear_cka
    from stitching.similarity.__main__ import main

    main(["--index", "cka", "--images", "40", "--layers", "3,9", "--front-rank", "2", "--flatten", "pool",
          "--no-progress", "--out", str(tmp_path / "sim"), *TINY, f"paths.zoo_dir={zoo_dir}", f"paths.output_dir={tmp_path}"])
    record = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    assert record["front_rank"] == 2
    cfg = tiny_config()
    settings = read_settings(cfg)
    zoo = build_zoo(cfg)
    front, end = zoo.get(settings.front.spec)[0], zoo.get(settings.end.spec)[0]
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    samples = datamodule.sample_train_images(settings.stitch.dm_samples, seed=settings.seed)
    images = datamodule.test_tensors(40)[0]
    stitch = prepare_stitch(front, end, 9, 9, samples, "dm", front_rank=2).network
    with torch.no_grad():
        x = stitch.stitch.projection(stitch.front(images)[0]).mean((2, 3))
        from stitching.models import cut
        y = cut(end.eval(), 9).head(images)[0].mean((2, 3))
    assert record["grids"]["cka"][1][1] == pytest.approx(linear_cka(x.double(), y.double()), abs=1e-5)
    untruncated = prepare_stitch(front, end, 9, 9, samples, "dm").network
    with torch.no_grad():
        full = untruncated.front(images)[0].mean((2, 3))
    assert abs(record["grids"]["cka"][1][1] - linear_cka(full.double(), y.double())) > 1e-3
