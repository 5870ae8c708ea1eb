"""Structural similarity as data: two models (or two activation tensors) → one tidy DataFrame.

    import stitching
    frame = stitching.compare(front, end, images, indices=["cka", "pwcca"], front_layers=["layer2.0"])
    frame.pivot(index="front_name", columns="end_name", values="value")   # a grid per index

The numbers are those of ``python -m stitching.similarity`` (the same one-pass grid code);
this is its Python entry point, with no config and no zoo.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from stitching.errors import StitchingError
from stitching.models.layout import CONV, Layout
from stitching.similarity.cka import MinibatchCKA, SimilarityError
from stitching.similarity.grid import (
    FLATTEN,
    INDICES,
    _flat,
    _full_grid,
    _uncertainty_grid,
    index_of,
    similarity_grids,
)

#: the frame's columns, in order: one row per (index, front layer, end layer)
COLUMNS = ("front_layer", "front_name", "end_layer", "end_name", "index", "label", "value", "low", "high",
           "null_mean", "null_q95", "p_value", "undefined")
_INTERVALS = ("low", "high", "null_mean", "null_q95", "p_value")
_TOKENS = Layout("tokens")


def compare(front, end, inputs=None, *, indices="cka", front_layers=None, end_layers=None,
            flatten: str = "sample", bootstrap: int = 0, permutations: int = 0, seed: int = 0,
            batch_size: int = 250, device: str | torch.device = "cpu", progress: bool = False,
            rbf_sigma: float = 0.8, skip_positions: int = 0, front_inputs=None, end_inputs=None) -> pd.DataFrame:
    """Every chosen similarity index for every (front layer, end layer) pair, as one DataFrame.

    Args:
        front: a model (any model :func:`stitching.stitch` takes), or an activation tensor of
            ``n`` inputs (``[n, d]`` rows, ``[n, C, H, W]`` maps or ``[n, T, D]`` token
            sequences), ``inputs`` then left out.
        end: a model, or an activation tensor of the same ``n`` inputs, as ``front``.
        inputs: images ``[N, C, H, W]`` in [0, 1]; ``(images, labels)``, a ``Dataset`` or a
            ``DataLoader`` (labels are not used); for language models token ids ``[N, T]`` or a
            dict of ``input_ids`` and ``attention_mask``.
        indices: a name or a list of names from :data:`stitching.similarity.grid.INDICES`
            (``cka``, ``unbiased_cka``, ``rbf_cka``, ``minibatch_cka``, ``cca``, ``svcca``,
            ``pwcca``, ``procrustes``, ``mutual_knn``, ``cknna``, ``rsa``, ``ridge_r2``).
        front_layers: the front's cut points (1-based indices or names, see
            :func:`stitching.cut_points`); default every cut point.
        end_layers: the end's, as ``front_layers``.
        flatten: ``sample`` (one row per input), ``positions`` (every spatial position or real
            token a row, channels as columns) or ``pool`` (one vector per input).
        bootstrap: resamples of the inputs for a 95 % interval per cell (``low``, ``high``).
        permutations: shuffles of the end rows for a chance level and one-sided p-value per cell
            (``null_mean``, ``null_q95``, ``p_value``).
        seed: the resampling's seed.
        batch_size: inputs per forward pass (and minibatch CKA's batches).
        device: where the models run.
        progress: show progress bars.
        rbf_sigma: RBF CKA's bandwidth as a multiple of the median distance.
        skip_positions: token sequences only: leave each sequence's first positions out.
        front_inputs: a timm / torchvision front's input convention, as in :func:`stitching.stitch`.
        end_inputs: the same for the end model.

    Returns:
        One row per (index, front layer, end layer) with the columns of :data:`COLUMNS`: the
        cut points and their names, the index and its label, ``value`` (NaN where undefined,
        with the reason in ``undefined``) and the interval and null columns (NaN unless asked for).
    """
    names = _indices(indices)
    if flatten not in FLATTEN:
        raise StitchingError(f"flatten={flatten!r}: choose one of {', '.join(FLATTEN)}")
    from stitching.validation import SIMILARITY_SETTINGS, check_arguments

    check_arguments(SIMILARITY_SETTINGS, bootstrap=bootstrap, permutations=permutations, seed=seed, batch_size=batch_size,
                    rbf_sigma=rbf_sigma, skip_positions=skip_positions)
    if isinstance(front, torch.Tensor) or isinstance(end, torch.Tensor):
        if not (isinstance(front, torch.Tensor) and isinstance(end, torch.Tensor)):
            raise StitchingError("compare() takes two models and their inputs, or two activation tensors: "
                                 f"got a {type(front).__name__} and a {type(end).__name__}")
        given = {"inputs": inputs, "front_layers": front_layers, "end_layers": end_layers,
                 "front_inputs": front_inputs, "end_inputs": end_inputs}
        extra = [key for key, value in given.items() if value is not None]
        if extra or skip_positions:
            raise StitchingError(f"{', '.join(extra) or 'skip_positions'} applies to two models, not to two activation "
                                 "tensors; leave it out")
        return _tensors(front, end, names, flatten, bootstrap, permutations, seed, batch_size, rbf_sigma)
    return _models(front, end, inputs, names, front_layers, end_layers, flatten, bootstrap, permutations, seed,
                   batch_size, device, progress, rbf_sigma, skip_positions, front_inputs, end_inputs)


def _indices(indices) -> list[str]:
    names = [indices] if isinstance(indices, str) else list(indices) if indices is not None else []
    unknown = [str(name) for name in names if name not in INDICES]
    if unknown or not names:
        raise StitchingError(f"unknown index {', '.join(unknown) or 'none given'}; choose from {', '.join(INDICES)}")
    return list(dict.fromkeys(names))


def _models(front, end, inputs, names, front_layers, end_layers, flatten, bootstrap, permutations, seed, batch_size,
            device, progress, rbf_sigma, skip_positions, front_inputs, end_inputs) -> pd.DataFrame:
    from stitching.api import check_weights
    from stitching.models import cut_point_names, cuttable, resolve_layer

    check_weights(front=front, end=end)
    if inputs is None:
        raise StitchingError("compare() of two models needs inputs: images [N, C, H, W] in [0, 1], token ids or a "
                             "dict of input_ids")
    front = cuttable(front, _layers(front_layers) if front_layers is not None else [], front_inputs, "front")
    end = cuttable(end, _layers(end_layers) if end_layers is not None else [], end_inputs, "end")
    x = _inputs(inputs)
    rows = [resolve_layer(front, v) for v in _layers(front_layers)] if front_layers is not None else None
    cols = [resolve_layer(end, v) for v in _layers(end_layers)] if end_layers is not None else None
    front_names, end_names = cut_point_names(front), cut_point_names(end)
    rows = rows or list(range(1, len(front_names) + 1))
    cols = cols or list(range(1, len(end_names) + 1))
    tokens = isinstance(x, dict)
    if skip_positions and not tokens:
        raise StitchingError("skip_positions applies to token sequences; leave it 0 for images")
    uncertainty = {"bootstrap": bootstrap, "permutations": permutations, "seed": seed}
    grids, problems = similarity_grids(front, end, x, names, flatten, batch_size, device, progress,
                                       front_layers=rows, end_layers=cols, skip_positions=skip_positions,
                                       uncertainty=uncertainty, rbf_sigma=rbf_sigma)
    return _frame(grids, uncertainty, problems, rows, [front_names[i - 1] for i in rows], cols,
                  [end_names[j - 1] for j in cols], rbf_sigma)


def _layers(values) -> list:
    return [values] if isinstance(values, (int, str)) else list(values)


def _inputs(inputs):
    """Images or token batches from what :func:`stitching.stitch` takes as data (labels dropped),
    checked against the input contract."""
    from torch.utils.data import DataLoader, Dataset

    from stitching.api import as_loader, first_inputs
    from stitching.data.contract import check_batch

    if isinstance(inputs, (DataLoader, Dataset)):
        loader = as_loader(inputs, 256, shuffle=False, name="given")
        inputs = first_inputs(loader, sum(1 for _ in loader.dataset) if isinstance(inputs, Dataset) else 2**62)
    elif isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        inputs = inputs[0]
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and inputs.dim() == 2:
        inputs = {"input_ids": inputs}
    if isinstance(inputs, dict) and "attention_mask" not in inputs and "input_ids" in inputs:
        inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
    check_batch(inputs, where="the inputs")
    count = len(inputs["input_ids"]) if isinstance(inputs, dict) else len(inputs)
    if count < 2:
        raise StitchingError(f"a similarity index compares inputs with each other: give at least 2, got {count}")
    return inputs


def _tensors(x: torch.Tensor, y: torch.Tensor, names, flatten, bootstrap, permutations, seed, batch_size,
             rbf_sigma) -> pd.DataFrame:
    """The same cells for two given activations (one front and one end 'layer')."""
    for a, side in ((x, "front"), (y, "end")):
        if a.dim() not in (2, 3, 4):
            raise StitchingError(f"the {side} activations are {a.dim()}-D; give [n, d] rows, [n, C, H, W] maps or "
                                 "[n, T, D] token sequences")
        if not torch.isfinite(a).all():
            raise StitchingError(f"the {side} activations hold NaN or infinite values")
    if len(x) != len(y):
        raise StitchingError(f"{len(x)} front rows but {len(y)} end rows: the two activations must be of the same inputs")
    layouts = [CONV if a.dim() == 4 else _TOKENS for a in (x, y)]
    problems: list[str] = []
    grids: dict[str, np.ndarray] = {}
    uncertainty: dict = {}
    kept = []
    for a, layout in zip((x, y), layouts):
        raw = a.dim() == 2 or (flatten == "positions" and layout.kind == "conv") or flatten == "match"
        kept.append((a if raw else _flat(a, layout, flatten)).detach().float().cpu())
    for name in names:
        index = index_of(name, rbf_sigma)
        if index.streaming:
            grids[name] = _streamed(kept[0], kept[1], batch_size, name, problems)
            continue
        grids[name] = _full_grid(index, [kept[0]], [kept[1]], flatten, name, problems, ([1], [1]),
                                 ([layouts[0]], [layouts[1]]))
        if bootstrap or permutations:
            uncertainty[name] = _uncertainty_grid(index, grids[name], [kept[0]], [kept[1]], flatten,
                                                  ([layouts[0]], [layouts[1]]), bootstrap, permutations, seed)
    return _frame(grids, uncertainty, problems, [1], ["front"], [1], ["end"], rbf_sigma)


def _streamed(x: torch.Tensor, y: torch.Tensor, batch_size: int, name: str, problems: list[str]) -> np.ndarray:
    if x.dim() != 2 or y.dim() != 2:
        problems.append(f"{name}: streams rows; give [n, d] rows or flatten=sample/pool")
        return np.full((1, 1), np.nan)
    stream = MinibatchCKA()
    for start in range(0, len(x), batch_size):
        stream.update([x[start:start + batch_size]], [y[start:start + batch_size]])
    try:
        return stream.compute().numpy()
    except SimilarityError as err:
        problems.append(f"{name}: {err}")
        return np.full((1, 1), np.nan)


def _reason(problems: list[str], name: str, i: int, j: int) -> str:
    """The line of ``problems`` that left cell (front ``i``, end ``j``) of ``name`` undefined."""
    for prefix in (f"{name} front {i} × end {j}:", f"{name}: front layer {i} ", f"{name}: end layer {j} "):
        for line in problems:
            if line.startswith(prefix):
                return line
    return next((line for line in problems if line.startswith(f"{name}:")), f"{name}: undefined")


def _frame(grids, uncertainty, problems, rows, row_names, cols, col_names, rbf_sigma) -> pd.DataFrame:
    records = []
    for name, grid in grids.items():
        parts = uncertainty.get(name, {}) if isinstance(uncertainty.get(name), dict) else {}
        label = index_of(name, rbf_sigma).label
        for a, (i, front_name) in enumerate(zip(rows, row_names)):
            for b, (j, end_name) in enumerate(zip(cols, col_names)):
                value = float(grid[a, b])
                records.append({"front_layer": i, "front_name": front_name, "end_layer": j, "end_name": end_name,
                                "index": name, "label": label, "value": value,
                                **{key: float(parts[key][a, b]) if key in parts else math.nan for key in _INTERVALS},
                                "undefined": None if math.isfinite(value) else _reason(problems, name, i, j)})
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


def invariances(name: str) -> frozenset[str]:
    """The transformations of either representation that leave index ``name`` unchanged (see
    :data:`stitching.similarity.grid.TRANSFORMS`)."""
    if name not in INDICES:
        raise StitchingError(f"unknown index {name}; choose from {', '.join(INDICES)}")
    return INDICES[name].invariant_to


__all__ = ["COLUMNS", "compare", "invariances"]
