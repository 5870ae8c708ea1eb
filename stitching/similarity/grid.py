"""Similarity grids: an index for every (front layer, end layer) pair, in one pass.

Each batch of images runs through each model once; every cut point's activation is
kept (or streamed, for the minibatch estimator) and the indices are computed per pair.
How a layer becomes an ``[n, d]`` matrix is ``flatten``:

* ``sample`` — one row per image, ``c·h·w`` (or ``tokens·width``) columns (default);
* ``positions`` — every spatial position (token) of every image is a row, channels are
  columns; maps of different sizes are average-pooled to the smaller one;
* ``pool`` — one row per image: the spatial mean of a map, a ViT's class token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from stitching.models.cutting import cut_point_activations
from stitching.stitch_layers import batches, to_device
from stitching.models.layout import CONV, Layout, as_rows, masked, per_sample, pooled
from stitching.similarity.alignment import cknna, linear_predictivity, mutual_knn, rsa
from stitching.similarity.cca import mean_cca, procrustes_distance, pwcca, svcca
from stitching.similarity.cka import (
    MinibatchCKA,
    SimilarityError,
    is_constant,
    kernel_cka,
    linear_cka,
    linear_gram,
    rbf_cka,
    rbf_gram,
    unbiased_cka,
)

FLATTEN = ("sample", "positions", "pool", "match")
#: ``match``: positions as samples where the two activations have one shape, else one pooled
#: vector per input: how the TLM-vs-DM authors feed PWCCA and the Procrustes distance
#: (``resize_for_cca2`` in szegedai/stitching-ood); image models only
_PAIRWISE = ("positions", "match")

#: transformations of one representation's features (columns) an index may be invariant to:
#: ``x ↦ xQ`` with Q orthogonal, ``x ↦ cx`` (c > 0), a reordering of the columns, ``x ↦ xA``
#: with A invertible, ``x ↦ x + b`` (the same vector added to every row)
TRANSFORMS = ("orthogonal", "isotropic_scaling", "permutation", "invertible_linear", "translation")
_ROTATIONS = frozenset({"orthogonal", "isotropic_scaling", "permutation", "translation"})


@dataclass(frozen=True)
class Index:
    label: str
    pair: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # on [n, d] matrices
    gram: Callable[[torch.Tensor], torch.Tensor] | None = None  # per-layer kernel, reused across pairs
    unbiased: bool = False
    streaming: bool = False
    #: the :data:`TRANSFORMS` of either side that leave the value unchanged (tested numerically)
    invariant_to: frozenset[str] = _ROTATIONS

    @property
    def rotation_invariant(self) -> bool:
        """Unchanged by an orthonormal change of feature basis (so it may be computed on ``US``)."""
        return "orthogonal" in self.invariant_to


def _procrustes_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return 1.0 - procrustes_distance(x, y) / 2


#: every index a grid can hold; all read "higher = more similar" (in [0, 1], except RSA's
#: rank correlation and ridge R², which can fall below 0)
INDICES: dict[str, Index] = {
    "cka": Index("linear CKA", linear_cka, gram=linear_gram),
    "unbiased_cka": Index("unbiased linear CKA", unbiased_cka, gram=linear_gram, unbiased=True),
    "rbf_cka": Index("RBF CKA (σ = 0.8 × median distance)", rbf_cka, gram=rbf_gram),
    "minibatch_cka": Index("minibatch linear CKA (mean per-batch unbiased HSIC)", streaming=True),
    "cca": Index("mean squared CCA", mean_cca, invariant_to=_ROTATIONS | {"invertible_linear"}),
    "svcca": Index("SVCCA (99 % variance)", svcca),
    "pwcca": Index("PWCCA", pwcca, invariant_to=frozenset({"isotropic_scaling", "permutation", "translation"})),
    "procrustes": Index("Procrustes similarity 1 − d/2", _procrustes_similarity),
    "mutual_knn": Index("mutual k-NN alignment (k = 10, cosine)", mutual_knn,
                        invariant_to=frozenset({"orthogonal", "isotropic_scaling", "permutation"})),
    "cknna": Index("CKNNA (k = 10)", cknna, invariant_to=frozenset({"orthogonal", "isotropic_scaling", "permutation"})),
    "rsa": Index("RSA (Spearman ρ of correlation-distance RDMs)", rsa,
                 invariant_to=frozenset({"isotropic_scaling", "permutation"})),
    "ridge_r2": Index("linear predictivity (5-fold ridge R², front → end)", linear_predictivity,
                      invariant_to=frozenset({"orthogonal", "permutation", "translation"})),
}


#: how the TLM-vs-DM authors feed each index (``compute_metrics`` in szegedai/stitching-ood: CKA
#: on ``flatten(a, 1)``, PWCCA and Procrustes through ``resize_for_cca2``); the kernel and
#: neighbourhood indices follow CKA, the CCA family PWCCA. Read by ``grounding.flatten=authors``
#: and the CKA claim.
AUTHORS_FLATTEN = {"cka": "sample", "unbiased_cka": "sample", "rbf_cka": "sample", "mutual_knn": "sample",
                   "cknna": "sample", "rsa": "sample", "ridge_r2": "sample",
                   "cca": "match", "svcca": "match", "pwcca": "match", "procrustes": "match"}


def index_of(name: str, rbf_sigma: float = 0.8) -> Index:
    """``INDICES[name]``, RBF CKA with bandwidth ``rbf_sigma`` × the median distance."""
    index = INDICES[name]
    if name != "rbf_cka" or rbf_sigma == 0.8:
        return index
    return replace(index, label=f"RBF CKA (σ = {rbf_sigma:g} × median distance)",
                   pair=partial(rbf_cka, sigma=rbf_sigma), gram=partial(rbf_gram, sigma=rbf_sigma))


def parse_indices(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in INDICES]
    if unknown or not names:
        raise SimilarityError(f"unknown index '{', '.join(unknown) or spec}'; choose from {', '.join(INDICES)}")
    return names


def _flat(a: torch.Tensor, layout: Layout, flatten: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One row per input (``pool``, ``sample``), or for token sequences one row per real token
    (``positions``); padded tokens never count."""
    if flatten == "pool":
        return pooled(a, layout, mask)
    if flatten == "positions":
        return as_rows(a, layout, mask)
    return per_sample(masked(a, layout, mask), layout)


def pair_matrices(a: torch.Tensor, b: torch.Tensor, flatten: str, layout_a: Layout = CONV,
                  layout_b: Layout = CONV) -> tuple[torch.Tensor, torch.Tensor]:
    """Two layers' activations for the same images → two ``[rows, d]`` matrices."""
    if a.dim() == b.dim() == 2:  # already rows (token positions, padding left out)
        if len(a) != len(b):
            raise SimilarityError("flatten=positions needs two conv maps or two token sequences of one length")
        return a, b
    if flatten == "match":
        flatten = "positions" if layout_a.kind == layout_b.kind and a.shape[1:] == b.shape[1:] else "pool"
    if flatten != "positions":
        return _flat(a, layout_a, flatten), _flat(b, layout_b, flatten)
    if layout_a.kind == layout_b.kind == "conv" and a.shape[-2:] != b.shape[-2:]:
        size = tuple(min(s, t) for s, t in zip(a.shape[-2:], b.shape[-2:]))
        a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
    if layout_a.kind != layout_b.kind or (layout_a.kind == "tokens" and a.shape[1] != b.shape[1]):
        raise SimilarityError("flatten=positions needs two conv maps or two token sequences of one length")
    return as_rows(a, layout_a), as_rows(b, layout_b)


@torch.no_grad()
def similarity_grids(front: torch.nn.Module, end: torch.nn.Module, images: torch.Tensor, indices: list[str],
                     flatten: str = "sample", batch_size: int = 250, device: torch.device | str = "cpu",
                     progress: bool = True, front_layers: list[int] | None = None,
                     end_layers: list[int] | None = None, skip_positions: int = 0,
                     uncertainty: dict | None = None,
                     front_projections: list | None = None,
                     rbf_sigma: float = 0.8) -> tuple[dict[str, np.ndarray], list[str]]:
    """``{index: [front layers, end layers] grid}`` and the reasons of any undefined cells.

    ``front_layers``/``end_layers``: 1-based cut points to compare (default: all).

    ``images`` (or a batch of token sequences: a dict with ``input_ids`` and
    ``attention_mask``) pass through each model once, in batches; cells an index cannot define
    (constant activations, a degenerate CCA…) are NaN with their reason listed.

    ``skip_positions``: token sequences only, leave each sequence's first positions out of the
    indices (the models still read them). A decoder's first token is often an attention sink
    whose residual norm is orders of magnitude above the others', and linear indices over
    positions then measure that one row.

    ``uncertainty``: ``{"bootstrap": B, "permutations": P, "seed": s}`` adds, for every index
    but the streaming one, a bootstrap interval over inputs and a permutation null per cell;
    the dict is filled with ``{index: {"low", "high", "null_mean", "null_q95", "p_value": grid}}``.

    ``front_projections``: one module (or ``None``) per front layer applied to its activation
    first — the rank truncation of ``stitch.front_rank``, so indices see what the stitch sees.

    ``rbf_sigma``: RBF CKA's bandwidth as a multiple of the median distance (Kornblith et al.'s
    ``threshold``; their tables use 0.2, 0.4 and 0.8).
    """
    if flatten not in FLATTEN:
        raise SimilarityError(f"unknown flatten '{flatten}'; choose one of {', '.join(FLATTEN)}")
    streaming = [name for name in indices if INDICES[name].streaming]
    if flatten == "match" and (streaming or isinstance(images, dict)):
        raise SimilarityError("flatten=match pairs whole activations of image models (positions where two have one "
                              "shape, else pooled); for minibatch_cka or token sequences use sample, positions or pool")
    full = [name for name in indices if not INDICES[name].streaming]
    front_layouts = [front.cut_points[i - 1].layout for i in (front_layers or range(1, len(front.cut_points) + 1))]
    end_layouts = [end.cut_points[j - 1].layout for j in (end_layers or range(1, len(end.cut_points) + 1))]
    if streaming and flatten == "positions" and any(la.kind != "tokens" for la in front_layouts + end_layouts):
        raise SimilarityError("minibatch_cka over positions needs token sequences on both sides (a batch's real "
                              "tokens are its samples); for image models use flatten=sample or flatten=pool")
    front, end = front.eval().to(device), end.eval().to(device)
    stream = MinibatchCKA() if streaming else None
    kept_front, kept_end = [], []
    for batch in tqdm(batches(images, batch_size), desc="activations", disable=not progress, leave=False):
        batch = to_device(batch, device)
        mask = front.context(batch).attention_mask  # token batches: the real positions
        if skip_positions and mask is not None:  # scored positions only; the forward pass is unchanged
            mask = mask.clone()
            mask[:, :skip_positions] = 0
        _, fronts = cut_point_activations(front, batch)
        _, ends = cut_point_activations(end, batch)
        if front_layers:
            fronts = [fronts[i - 1] for i in front_layers]
        if front_projections:
            fronts = [a if project is None else project(a) for a, project in zip(fronts, front_projections)]
        if end_layers:
            ends = [ends[j - 1] for j in end_layers]
        if stream is not None:
            stream.update([_flat(a, la, flatten, mask) for a, la in zip(fronts, front_layouts)],
                          [_flat(a, la, flatten, mask) for a, la in zip(ends, end_layouts)])
        if full:
            def keep(a, layout):  # conv maps keep their positions: pairs of other sizes are pooled later
                raw = (flatten == "positions" and layout.kind == "conv") or flatten == "match"
                return (a if raw else _flat(a, layout, flatten, mask)).float().cpu()
            kept_front.append([keep(a, la) for a, la in zip(fronts, front_layouts)])
            kept_end.append([keep(a, la) for a, la in zip(ends, end_layouts)])
    grids: dict[str, np.ndarray] = {}
    problems: list[str] = []
    if stream is not None:
        try:
            grids["minibatch_cka"] = stream.compute().numpy()
        except SimilarityError as err:
            grids["minibatch_cka"] = np.full((len(fronts), len(ends)), np.nan)
            problems.append(f"minibatch_cka: {err}")
    if full:
        layers_front = [torch.cat(parts) for parts in zip(*kept_front)]
        layers_end = [torch.cat(parts) for parts in zip(*kept_end)]
        labels = (front_layers or list(range(1, len(layers_front) + 1)), end_layers or list(range(1, len(layers_end) + 1)))
        for name in tqdm(full, desc="indices", disable=not progress, leave=False):
            grids[name] = _full_grid(index_of(name, rbf_sigma), layers_front, layers_end, flatten, name, problems, labels,
                                     (front_layouts, end_layouts))
        if uncertainty is not None and (uncertainty.get("bootstrap") or uncertainty.get("permutations")):
            settings = {k: uncertainty.pop(k, 0) for k in ("bootstrap", "permutations", "seed")}
            for name in tqdm(full, desc="intervals", disable=not progress, leave=False):
                uncertainty[name] = _uncertainty_grid(index_of(name, rbf_sigma), grids[name], layers_front, layers_end, flatten,
                                                      (front_layouts, end_layouts), **settings)
    return grids, problems


def _uncertainty_grid(index: Index, grid: np.ndarray, fronts: list[torch.Tensor], ends: list[torch.Tensor],
                      flatten: str, layouts: tuple[list[Layout], list[Layout]], bootstrap: int, permutations: int,
                      seed: int) -> dict[str, np.ndarray]:
    """Per defined cell: the bootstrap interval over inputs and the permutation null (NaN elsewhere)."""
    from stitching.similarity.uncertainty import bootstrap_interval, permutation_null

    keys = ("low", "high", "null_mean", "null_q95", "p_value")
    out = {key: np.full(grid.shape, np.nan) for key in keys}
    for i, a in enumerate(fronts):
        for j, b in enumerate(ends):
            if not np.isfinite(grid[i, j]):
                continue
            x, y = pair_matrices(a, b, flatten, layouts[0][i], layouts[1][j])
            if index.rotation_invariant:  # the same values from the ≤ n-column form, far cheaper when wide
                x, y = _reduced(x)[0], _reduced(y)[0]
            try:
                if bootstrap:
                    out["low"][i, j], out["high"][i, j] = bootstrap_interval(index.pair, x, y, bootstrap, seed=seed)
                if permutations:
                    null = permutation_null(index.pair, x, y, float(grid[i, j]), permutations, seed=seed)
                    out["null_mean"][i, j], out["null_q95"][i, j], out["p_value"][i, j] = null.mean, null.q95, \
                        null.p_value
            except SimilarityError:
                continue  # too few scorable resamples: the cell keeps its score without an interval
    return out


def _full_grid(index: Index, fronts: list[torch.Tensor], ends: list[torch.Tensor], flatten: str, name: str,
               problems: list[str], labels: tuple[list[int], list[int]],
               layouts: tuple[list[Layout], list[Layout]]) -> np.ndarray:
    """One index over every pair; ``labels`` are the cut points of the rows and columns (for messages)."""
    def cell(compute, i, j):
        return _cell(compute, f"{name} front {labels[0][i]} × end {labels[1][j]}", problems)

    grid = np.full((len(fronts), len(ends)), np.nan)
    if index.gram is not None and flatten not in _PAIRWISE:
        # kernel indices: one Gram matrix per layer, shared by every pair it is in
        grams_f = [_gram_or_reason(index, a, f"front layer {i}", problems, name) for i, a in zip(labels[0], fronts)]
        grams_e = [_gram_or_reason(index, a, f"end layer {j}", problems, name) for j, a in zip(labels[1], ends)]
        for (i, k), (j, l) in ((p, q) for p in enumerate(grams_f) for q in enumerate(grams_e)):
            if k is not None and l is not None:
                grid[i, j] = cell(lambda: kernel_cka(k, l, unbiased=index.unbiased), i, j)
        return grid
    if flatten in _PAIRWISE:  # each pair is flattened by the two shapes it meets
        for i, a in enumerate(fronts):
            for j, b in enumerate(ends):
                grid[i, j] = cell(lambda: index.pair(*pair_matrices(a, b, flatten, layouts[0][i], layouts[1][j])), i, j)
        return grid
    # one SVD per layer: rotation-invariant indices then see the ≤ n-column form US of
    # X = USVᵀ (the same value, far cheaper for wide layers); PWCCA keeps the neurons
    reduced_f, reduced_e = [_reduced(a) for a in fronts], [_reduced(b) for b in ends]
    n = len(fronts[0])
    for i, (a, (xa, ra)) in enumerate(zip(fronts, reduced_f)):
        for j, (b, (xb, rb)) in enumerate(zip(ends, reduced_e)):
            if index.rotation_invariant:
                grid[i, j] = cell(lambda: index.pair(xa, xb), i, j)
            elif ra + rb > n - 1 and index.label.endswith("CCA"):
                problems.append(f"{name} front {labels[0][i]} × end {labels[1][j]}: {index.label} is degenerate here: {ra} + {rb} "
                                f"directions cannot be separated by {n} inputs; use more inputs or flatten=pool")
            else:
                grid[i, j] = cell(lambda: index.pair(a, b), i, j)
    return grid


def _reduced(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``US`` of the thin SVD of the (uncentred) rows of ``a``, and its numerical rank after centring."""
    x = a.double()
    centred = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    rank = int((centred > 1e-10 * centred[0]).sum()) if len(centred) and centred[0] > 0 else 0
    if x.shape[1] <= len(x):
        return x, rank
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u * s, rank


def _gram_or_reason(index: Index, a: torch.Tensor, where: str, problems: list[str], name: str):
    if is_constant(a):
        problems.append(f"{name}: {where} is the same for every input (constant activations)")
        return None
    return index.gram(a.double())


def _cell(compute, where: str, problems: list[str]) -> float:
    try:
        return float(compute())
    except SimilarityError as err:
        problems.append(f"{where}: {err}")
        return float("nan")
