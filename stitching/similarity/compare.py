"""Structural similarity of every layer pair of two models, from a config: the models from the
zoo, the test images through both once, every index's grid (the library behind
``python -m stitching.similarity`` and the claims' CKA/CCA grids).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stitching import LAYER_KEYS
from stitching.build import build_datamodule, compose_config, is_text, layer_value, load_models, read_settings
from stitching.errors import StitchingError
from stitching.evaluate import subset_accuracy
from stitching.grids import sweep_combos
from stitching.models import cut_point_names, resolve_layer
from stitching.results.figures import heatmaps
from stitching.results.records import condition_values
from stitching.results.schema import config_hash
from stitching.results.tables import sanity_checks
from stitching.runtime import Stopwatch, versions, write_json_atomic
from stitching.similarity.grid import index_of, parse_indices, similarity_grids


#: the preset sweep axes a similarity sweep takes: which models, on which data
MODEL_AND_DATA = ("front.", "end.", "model.", "dataset.")


def refuse_layer_keys(overrides: list[str]) -> None:
    """A stitch's layer keys do not apply to a similarity grid, which compares every layer pair."""
    given = [arg for arg in overrides if "=" in arg and arg.split("=", 1)[0].lstrip("+~") in LAYER_KEYS]
    if given:
        raise StitchingError(f"{given[0]}: a similarity grid compares every layer pair; pick its layers with --layers")


def sweep_pairs(overrides: list[str]) -> list[list[str]]:
    """A similarity sweep's pairs of models: every combination of the command line's
    comma-separated values and of the preset's sweep axes over models and data (its objective and
    layer axes are its stitching sweep's); a layer key given here is refused."""
    refuse_layer_keys(overrides)
    return sweep_combos(overrides, preset_axes=lambda key: key.startswith(MODEL_AND_DATA))


def grids_request(config: dict, indices: list[str], flatten: str, images: int, batch_size: int,
                  layers: list | None) -> dict:
    """What asks for a folder's grids: the resolved config (its ``similarity`` group included),
    the indices, flattening, input count, batch size and layers, as JSON holds them."""
    return json.loads(json.dumps({"config_hash": config_hash(config, hashed=("similarity",)), "indices": list(indices),
                                  "flatten": flatten, "images": images, "batch_size": batch_size, "layers": layers}))


def finished_grids(folder: Path, request: dict) -> bool:
    """Whether ``folder`` holds the grids ``request`` asks for (a stopped sweep resumes); grids that
    other settings asked for, or whose request was not recorded, are refused in one line, never
    kept as this request's."""
    path = folder / "similarity.json"
    if not path.is_file():
        return False
    try:
        held = json.loads(path.read_text()).get("request")
    except (OSError, ValueError, AttributeError):
        held = None
    if held != request:
        names = {"config_hash": "the overrides", "indices": "--index", "flatten": "--flatten", "images": "--images",
                 "batch_size": "--batch-size", "layers": "--layers"}
        differ = [names[key] for key in request if isinstance(held, dict) and held.get(key) != request[key]]
        differ = [name for name in differ if name != names["config_hash"]] or differ  # the setting, where one is named
        raise StitchingError(f"{folder} holds similarity grids asked for with other settings "
                             f"({', '.join(differ) or 'not recorded'}); give another output folder, or remove "
                             f"that one to compute it again")
    return True


def pair_plan(run, index: str | None = None, flatten: str | None = None, layers=None) -> dict:
    """One pair's request from its settings (``run``: :class:`~stitching.build.Settings`): the
    ``similarity`` group, with ``index``, ``flatten`` and ``layers`` (indices or names, as in
    ``stitch.layer``) given over it where not None."""
    settings = run.config["similarity"]
    layers = layers or settings["layers"]
    if layers is not None:
        layers = [layer_value(v) for v in (layers.split(",") if isinstance(layers, str) else layers)]
    indices, flatten = parse_indices(index or settings["index"]), flatten or settings["flatten"]
    request = grids_request(run.config, indices, flatten, int(settings["images"]), int(settings["batch_size"]), layers)
    return {"settings": settings, "front_rank": run.stitch.front_rank, "layers": layers, "indices": indices,
            "flatten": flatten, "request": request}


def plan_grids(overrides: list[str], plan: dict, out: Path, progress: bool = True) -> dict:
    """:func:`config_grids` as :func:`pair_plan` asks: the record written to ``out``."""
    settings = plan["settings"]
    return config_grids(overrides, plan["indices"], int(settings["images"]), plan["flatten"],
                        int(settings["batch_size"]), out, layers=plan["layers"], progress=progress,
                        skip_positions=int(settings["skip_positions"]), bootstrap=int(settings["bootstrap"]),
                        permutations=int(settings["permutations"]), front_rank=plan["front_rank"],
                        rbf_sigma=float(settings["rbf_sigma"]))


def config_grids(overrides: list[str], indices: list[str], images: int, flatten: str, batch_size: int,
                 out: Path, layers: list[int] | None = None, progress: bool = True, skip_positions: int = 0,
                 bootstrap: int = 0, permutations: int = 0, front_rank: int | None = None,
                 rbf_sigma: float = 0.8) -> dict:
    """Compute and write the grids; return the record written to ``similarity.json`` (with what
    asked for them, :func:`grids_request`, so a resumed sweep can tell its own grids)."""
    watch = Stopwatch()
    settings = read_settings(compose_config(overrides))
    with watch.section("data_s"):
        # a stitching run's test data: its test sequences (dataset.test_sequences, spread across the
        # split), or its test images (dataset.test_subset), clean: test_tensors leaves shortcuts off
        datamodule = build_datamodule(settings)
        datamodule.setup()
        # test images, or test token sequences for language models (padding never enters an index)
        x = datamodule.test_inputs(images) if is_text(datamodule) else datamodule.test_tensors(images)[0]
        count = len(x["input_ids"]) if isinstance(x, dict) else len(x)
        if is_text(datamodule) and skip_positions >= x["input_ids"].shape[1]:
            raise StitchingError(f"--skip-positions {skip_positions} leaves no position of a {x['input_ids'].shape[1]}-token "
                                 f"sequence; skip fewer than dataset.context")
    with watch.section("zoo_s"):
        front, front_record, end, end_record = load_models(settings, (layers or [], layers or []), stitched=False)
    device = settings.device
    front_names, end_names = cut_point_names(front), cut_point_names(end)
    chosen_front = [resolve_layer(front, v) for v in layers] if layers else list(range(1, len(front_names) + 1))
    chosen_end = [resolve_layer(end, v) for v in layers] if layers else list(range(1, len(end_names) + 1))
    intervals = {"bootstrap": bootstrap, "permutations": permutations, "seed": settings.seed}
    projections = None
    if front_rank is not None:  # truncated as stitch.front_rank truncates: fitted on the stitch's DM samples
        with watch.section("projections_s"):
            projections = front_projections(settings, front, chosen_front, front_rank)
    with watch.section("grids_s"):
        grids, problems = similarity_grids(front, end, x, indices, flatten, batch_size, device, progress,
                                           front_layers=chosen_front, end_layers=chosen_end,
                                           skip_positions=skip_positions if is_text(datamodule) else 0,
                                           uncertainty=intervals, front_projections=projections,
                                           rbf_sigma=rbf_sigma)
    conditions = condition_values(settings.config, stitched=False)
    accuracy = {}  # the models' accuracy on the test images the indices read, as a stitching run reports it
    for side, model, record in (("front", front, front_record), ("end", end, end_record)):
        on_subset = None if is_text(datamodule) else subset_accuracy(
            model, record, datamodule, device, getattr(settings, side).spec.dataset == settings.dataset)
        accuracy[side] = (on_subset or record)["test_acc"]
    depth_front, depth_end = relative_depths(len(front_names)), relative_depths(len(end_names))
    rows = [{"run": f"similarity/{name}", "objective": name, "front_layer": chosen_front[i], "end_layer": chosen_end[j],
             "front_depth": depth_front[chosen_front[i]], "end_depth": depth_end[chosen_end[j]],
             "score": None if pd.isna(v) else float(v), **conditions,
             **{key: _value(values[i, j]) for key, values in intervals.get(name, {}).items()},
             "front_model": front_record["key"], "end_model": end_record["key"],
             "front_acc": accuracy["front"], "end_acc": accuracy["end"]}
            for name, grid in grids.items() for (i, j), v in _cells(grid)]
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "similarity.csv", index=False)
    heatmap, _ = heatmaps(frame, out / "heatmap.png", metric="score")
    sanity = sanity_checks(frame)
    write_json_atomic(out / "sanity.json", sanity)
    record = {
        "indices": {name: index_of(name, rbf_sigma).label for name in indices}, "rbf_sigma": rbf_sigma,
        "grids": {name: [[None if pd.isna(v) else float(v) for v in row] for row in grid] for name, grid in grids.items()},
        "front_layers": {i: front_names[i - 1] for i in chosen_front},
        "end_layers": {j: end_names[j - 1] for j in chosen_end},
        "front_depths": {i: depth_front[i] for i in chosen_front}, "end_depths": {j: depth_end[j] for j in chosen_end},
        "front": front_record["key"], "end": end_record["key"],
        "dataset": datamodule.name, "images": count, "inputs": "sequences" if is_text(datamodule) else "images",
        "flatten": flatten, "batch_size": batch_size,
        "skip_positions": skip_positions, "bootstrap": bootstrap, "permutations": permutations,
        "front_rank": front_rank,
        "intervals": {name: {key: [[_value(v) for v in row] for row in values] for key, values in parts.items()}
                      for name, parts in intervals.items() if isinstance(parts, dict)},
        "undefined": problems, "sanity": sanity, "heatmap": str(heatmap),
        "timings": watch.report(), "versions": versions(), "config": settings.config,
        "request": grids_request(settings.config, indices, flatten, images, batch_size, layers),
    }
    write_json_atomic(out / "similarity.json", record)
    return record


def front_projections(settings, front, layers: list[int], rank: int) -> list:
    """Per front layer, the top-``rank`` principal projection (``None`` where the layer has at most
    ``rank`` channels), fitted on the DM samples a stitch of this config fits its own on."""
    from stitching.models import cut
    from stitching.models.layout import channels
    from stitching.stitch_layers import batches, head_activations, head_projection

    datamodule = build_datamodule(settings)
    datamodule.setup()
    sample = datamodule.sample_train_inputs if is_text(datamodule) else datamodule.sample_train_images
    inputs = sample(settings.stitch.dm_samples, seed=settings.seed)
    projections = []
    for layer in layers:
        c = cut(front, layer)
        width = channels(head_activations(c.head, batches(inputs, 2)[0], settings.device)[0], c.layout)
        if rank >= width:
            projections.append(None)
            continue
        try:
            projections.append(head_projection(c.head, c.layout, inputs, rank, settings.device))
        except ValueError as err:
            raise StitchingError(f"--front-rank {rank} at front layer {layer}: {err}; use more stitch.dm_samples") from None
    return projections


def _value(v) -> float | None:
    return None if pd.isna(v) else float(v)


def relative_depths(count: int) -> dict[int, float]:
    """Cut point k of ``count`` → its relative depth (k − 1) / (count − 1): 0 is the first cut
    (a language model's embeddings), 1 the last; models of different depths meet on this axis."""
    return {k: round((k - 1) / max(count - 1, 1), 4) for k in range(1, count + 1)}


def _cells(grid):
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            yield (i, j), v
