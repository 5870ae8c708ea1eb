"""``stitching.compare``: structural similarity as one DataFrame, the same numbers as the CLI, and
every index's declared invariances checked numerically (and the undeclared ones shown to matter)."""

import json

import numpy as np
import pytest
import torch

import stitching
from stitching.errors import StitchingError
from stitching.similarity import linear_cka, pwcca
from stitching.similarity.__main__ import main as similarity_main
from stitching.similarity.cka import MinibatchCKA
from stitching.similarity.frame import COLUMNS, invariances
from stitching.similarity.grid import INDICES, TRANSFORMS
from tests.conftest import TINY


def _representations(n: int = 80, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related, non-linearly linked representations of the same n inputs (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d, d, generator=g, dtype=torch.float64)
                   + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return x, y


def _transform(kind: str, a: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = a.shape[1]
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=a.dtype))
        return a @ q
    if kind == "isotropic_scaling":
        return 0.2 * a
    if kind == "permutation":
        return a[:, torch.randperm(d, generator=g)]
    if kind == "invertible_linear":  # well conditioned, far from orthogonal
        return a @ (torch.randn(d, d, generator=g, dtype=a.dtype) + 2 * torch.eye(d, dtype=a.dtype))
    assert kind == "translation"
    return a + 5 * torch.randn(d, generator=g, dtype=a.dtype)


def _value(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
    index = INDICES[name]
    if index.streaming:  # two minibatches of 40
        stream = MinibatchCKA()
        for start in (0, 40):
            stream.update([x[start:start + 40]], [y[start:start + 40]])
        return float(stream.compute()[0, 0])
    return index.pair(x, y)


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("name", list(INDICES))
def test_every_declared_invariance_holds_and_every_other_transformation_changes_the_value(name, kind):
    x, y = _representations()
    base = _value(name, x, y)
    if kind in invariances(name):
        for seed in (1, 2):
            for moved in ((_transform(kind, x, seed), y), (x, _transform(kind, y, seed + 10)),
                          (_transform(kind, x, seed), _transform(kind, y, seed + 10))):
                assert _value(name, *moved) == pytest.approx(base, abs=1e-9), (name, kind)
    else:  # one side alone may not matter (PWCCA weighs x's neurons only): both sides move
        moved = _value(name, _transform(kind, x, 1), _transform(kind, y, 11))
        assert abs(moved - base) > 1e-3, f"{name} is unchanged by {kind}: declare it or find out why"


def test_the_declarations_are_the_known_ones():
    """A few textbook facts, independent of the numerical test above."""
    assert "invertible_linear" in invariances("cca")  # CCA: any invertible map (Raghu et al.)
    assert {"orthogonal", "isotropic_scaling", "translation"} <= invariances("cka")  # Kornblith et al.
    assert "invertible_linear" not in invariances("cka")
    assert "orthogonal" not in invariances("pwcca")  # weighs the neurons themselves
    assert "translation" not in invariances("mutual_knn")  # cosine neighbours are not centred
    with pytest.raises(StitchingError, match="unknown index"):
        invariances("cosine")


def test_two_activation_tensors_give_the_pure_functions_values_with_intervals():
    x, y = _representations(n=60)
    frame = stitching.compare(x, y, indices=["cka", "pwcca"], bootstrap=20, permutations=20)
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 2
    row = frame.set_index("index").loc["cka"]
    assert row.value == pytest.approx(linear_cka(x.float().double(), y.float().double()), abs=1e-6)
    assert frame.set_index("index").loc["pwcca"].value == pytest.approx(pwcca(x, y), abs=1e-5)
    assert row.low <= row.value <= row.high and 0 <= row.p_value <= 1 and row.null_mean < row.value
    assert row.undefined is None and row.label == "linear CKA"
    maps = stitching.compare(torch.rand(30, 4, 5, 5), torch.rand(30, 3, 5, 5), indices="cka", flatten="pool")
    assert maps.value.notna().all() and np.isnan(maps.low).all()


def test_an_undefined_cell_says_why():
    x, _ = _representations(n=40)
    frame = stitching.compare(x, torch.ones(40, 3, dtype=torch.float64), indices=["cka", "cca", "minibatch_cka"])
    assert frame.value.isna().all() and len(frame) == 3
    assert all("is the same for every input (constant activations)" in line for line in frame.undefined)
    assert frame.undefined.str.split(":").str[0].str.split().str[0].tolist() == ["cka", "cca", "minibatch_cka"]


def test_two_models_by_layer_name_in_one_frame(pair):
    front, end, images, _ = pair
    frame = stitching.compare(front, end, images[:48], indices=["cka", "procrustes"],
                              front_layers=["layer1.0", 3], end_layers="layer2.0", flatten="pool")
    assert len(frame) == 4
    assert frame.front_name.tolist() == ["layer1.0", stitching.cut_points(front)[2].name] * 2
    assert set(frame.end_name) == {"layer2.0"}
    grid = frame[frame["index"] == "cka"].pivot(index="front_name", columns="end_name", values="value")
    assert grid.shape == (2, 1) and ((grid.to_numpy() > 0) & (grid.to_numpy() <= 1 + 1e-9)).all()
    itself = stitching.compare(front, front, images[:48], indices="cka", front_layers=[2], end_layers=[2])
    assert itself.value.iloc[0] == pytest.approx(1.0, abs=1e-6)


def test_compare_gives_the_numbers_of_the_command_line(tmp_path, zoo_dir):
    from stitching.build import build_datamodule, compose_config, load_models, read_settings

    overrides = [*TINY, f"paths.zoo_dir={zoo_dir}", "end.seed=1"]
    similarity_main(["--index", "cka,cca", "--images", "60", "--flatten", "pool", "--no-progress",
                     "--out", str(tmp_path / "sim"), *overrides])
    record = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    cfg = compose_config(overrides)
    datamodule = build_datamodule(cfg, with_testbeds=False)
    datamodule.setup()
    images = datamodule.test_tensors(60)[0]
    front, _, end, _ = load_models(read_settings(cfg), ([], []), stitched=False)
    frame = stitching.compare(front, end, images, indices=["cka", "cca"], flatten="pool")
    for name in ("cka", "cca"):
        grid = frame[frame["index"] == name].pivot(index="front_layer", columns="end_layer", values="value")
        np.testing.assert_allclose(grid.to_numpy(), np.array(record["grids"][name], dtype=float), rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize(("call", "message"), [
    (lambda f, e, x: stitching.compare(f, e, x, indices="cosine"), "unknown index cosine"),
    (lambda f, e, x: stitching.compare(f, e, x, indices=[]), "unknown index none given"),
    (lambda f, e, x: stitching.compare(f, e, None), "needs inputs"),
    (lambda f, e, x: stitching.compare(f, e, x * 255), r"\[0, 1\]"),
    (lambda f, e, x: stitching.compare(f, e, x, bootstrap=-1), "bootstrap=-1 is out of range"),
    (lambda f, e, x: stitching.compare(f, e, x, flatten="mean"), "flatten='mean'"),
    (lambda f, e, x: stitching.compare(f, e, x, front_layers=["layer9.9"]), "layer9.9"),
    (lambda f, e, x: stitching.compare(f, e, x[:1]), "at least 2"),
    (lambda f, e, x: stitching.compare(f, e, x, skip_positions=2), "token sequences"),
    (lambda f, e, x: stitching.compare(torch.rand(8, 3), e, x), "two activation tensors"),
    (lambda f, e, x: stitching.compare(torch.rand(8, 3), torch.rand(8, 3), x), "inputs applies to two models"),
    (lambda f, e, x: stitching.compare(torch.rand(8, 3), torch.rand(9, 3)), "same inputs"),
    (lambda f, e, x: stitching.compare(torch.rand(8, 3), torch.full((8, 3), float("nan"))), "NaN"),
])
def test_bad_requests_are_one_line(pair, call, message):
    front, end, images, _ = pair
    with pytest.raises(StitchingError, match=message):
        call(front, end, images[:16])
