"""``python -m stitching.similarity`` — structural similarity of every layer pair of two models.

Takes the same overrides as ``python -m stitching.train`` (front/end models from the zoo,
the dataset), runs the test images through both models once and writes, in ``--out``:

* ``similarity.json`` — every grid, layer names, models, settings, undefined cells, timings;
* ``similarity.csv`` — one row per (index, front layer, end layer), the stitching report's
  columns, so ``python -m stitching.report`` can draw it beside stitching grids;
* ``heatmap.png`` and ``sanity.json`` — the grids, and the two sanity checks.

Example: ``python -m stitching.similarity --index cka,cca experiment=demo end.seed=0``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from omegaconf import OmegaConf

from stitching.errors import StitchingError, exit_on_user_error
from stitching.models import cut_point_names, resolve_layer
from stitching.runtime import Stopwatch, versions, write_json_atomic
from stitching.similarity.grid import FLATTEN, INDICES, index_of, parse_indices, similarity_grids
from stitching.build import build_datamodule, compose_config, is_text, layer_value, load_models, read_settings
from stitching.validation import check_config


def main_grids(overrides: list[str], indices: list[str], images: int, flatten: str, batch_size: int,
               out: Path, layers: list[int] | None = None, progress: bool = True, skip_positions: int = 0,
               bootstrap: int = 0, permutations: int = 0, front_rank: int | None = None,
               rbf_sigma: float = 0.8) -> dict:
    """Compute and write the grids; return the record written to ``similarity.json``."""
    from stitching.report import condition_values, heatmaps, sanity_checks

    watch = Stopwatch()
    cfg = compose_config(overrides)
    with watch.section("data_s"):
        datamodule = build_datamodule(cfg, with_testbeds=False)
        datamodule.setup()
        # test images, or test token sequences for language models (padding never enters an index)
        x = datamodule.test_inputs(images) if is_text(datamodule) else datamodule.test_tensors(images)[0]
        count = len(x["input_ids"]) if isinstance(x, dict) else len(x)
        if is_text(datamodule) and skip_positions >= x["input_ids"].shape[1]:
            raise StitchingError(f"--skip-positions {skip_positions} leaves no position of a {x['input_ids'].shape[1]}-token "
                                 f"sequence; skip fewer than dataset.context")
    with watch.section("zoo_s"):
        settings = read_settings(cfg)
        front, front_record, end, end_record = load_models(cfg, settings, (layers or [], layers or []), stitched=False)
    device = settings.device
    front_names, end_names = cut_point_names(front), cut_point_names(end)
    chosen_front = [resolve_layer(front, v) for v in layers] if layers else list(range(1, len(front_names) + 1))
    chosen_end = [resolve_layer(end, v) for v in layers] if layers else list(range(1, len(end_names) + 1))
    intervals = {"bootstrap": bootstrap, "permutations": permutations, "seed": int(cfg.seed)}
    projections = None
    if front_rank is not None:  # truncated as stitch.front_rank truncates: fitted on the stitch's DM samples
        with watch.section("projections_s"):
            projections = front_projections(cfg, settings, front, chosen_front, front_rank)
    with watch.section("grids_s"):
        grids, problems = similarity_grids(front, end, x, indices, flatten, batch_size, device, progress,
                                           front_layers=chosen_front, end_layers=chosen_end,
                                           skip_positions=skip_positions if is_text(datamodule) else 0,
                                           uncertainty=intervals, front_projections=projections,
                                           rbf_sigma=rbf_sigma)
    conditions = condition_values(OmegaConf.to_container(cfg, resolve=True))
    depth_front, depth_end = relative_depths(len(front_names)), relative_depths(len(end_names))
    rows = [{"run": f"similarity/{name}", "objective": name, "front_layer": chosen_front[i], "end_layer": chosen_end[j],
             "front_depth": depth_front[chosen_front[i]], "end_depth": depth_end[chosen_end[j]],
             "score": None if pd.isna(v) else float(v), **conditions,
             **{key: _value(values[i, j]) for key, values in intervals.get(name, {}).items()},
             "front_model": front_record["key"], "end_model": end_record["key"],
             "front_acc": front_record["test_acc"], "end_acc": end_record["test_acc"]}
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
        "dataset": datamodule.name, "images": count, "flatten": flatten, "batch_size": batch_size,
        "skip_positions": skip_positions, "bootstrap": bootstrap, "permutations": permutations,
        "front_rank": front_rank,
        "intervals": {name: {key: [[_value(v) for v in row] for row in values] for key, values in parts.items()}
                      for name, parts in intervals.items() if isinstance(parts, dict)},
        "undefined": problems, "sanity": sanity, "heatmap": str(heatmap),
        "timings": watch.report(), "versions": versions(), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out / "similarity.json", record)
    return record


def front_projections(cfg, settings, front, layers: list[int], rank: int) -> list:
    """Per front layer, the top-``rank`` principal projection (``None`` where the layer has at most
    ``rank`` channels), fitted on the DM samples a stitch of this config fits its own on."""
    from stitching.models import cut
    from stitching.models.layout import channels
    from stitching.stitch_layers import batches, head_activations, head_projection

    datamodule = build_datamodule(cfg)
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stitching.similarity", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=None, help=f"comma-separated, from: {', '.join(INDICES)} "
                        "(default: similarity.index)")
    parser.add_argument("--images", type=int, default=None, help="test images to compare on (default: similarity.images)")
    parser.add_argument("--flatten", default=None, choices=FLATTEN,
                        help="sample: c·h·w per image; positions: positions as samples; pool: one vector per image")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass and minibatch-CKA batch")
    parser.add_argument("--skip-positions", type=int, default=None,
                        help="token sequences: leave each sequence's first N positions out of the indices "
                             "(an attention sink's huge activations otherwise dominate linear CKA)")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="resamples of the inputs for a 95 %% interval per cell (0: none)")
    parser.add_argument("--permutations", type=int, default=None,
                        help="row shuffles of the end activations for a chance level and p-value per cell (0: none)")
    parser.add_argument("--front-rank", type=int, default=None,
                        help="truncate every front layer to its top-r principal directions first, as stitch.front_rank "
                             "does (default: stitch.front_rank)")
    parser.add_argument("--rbf-sigma", type=float, default=None,
                        help="RBF CKA bandwidth as a multiple of the median distance, Kornblith et al.'s convention "
                             "(default: similarity.rbf_sigma = 0.8)")
    parser.add_argument("--layers", default=None, help="comma-separated cut points for both sides (default: all)")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/similarity/<time>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for stitching.train (default: experiment=demo)")
    args = parser.parse_args(argv)
    flags = {"images": args.images, "batch_size": args.batch_size, "skip_positions": args.skip_positions,
             "bootstrap": args.bootstrap, "permutations": args.permutations, "rbf_sigma": args.rbf_sigma}
    overrides = [*(args.overrides or ["experiment=demo"]),  # the flags are the similarity.* settings
                 *(f"similarity.{key}={value}" for key, value in flags.items() if value is not None),
                 *([f"stitch.front_rank={args.front_rank}"] if args.front_rank is not None else [])]
    cfg = compose_config(overrides)
    try:
        check_config(cfg)
    except StitchingError as err:  # name the flag the user typed
        for key in flags:
            err = StitchingError(str(err).replace(f"similarity.{key}=", f"--{key.replace('_', '-')} "))
        err = StitchingError(str(err).replace("stitch.front_rank=", "--front-rank "))
        raise err from None
    settings = cfg.similarity
    indices = parse_indices(args.index or settings.index)
    layers = args.layers or settings.layers
    if layers is not None:  # indices or names, as in stitch.layer
        layers = [layer_value(v) for v in (layers.split(",") if isinstance(layers, str) else layers)]
    out = Path(args.out) if args.out else Path("outputs/similarity") / time.strftime("%Y-%m-%d_%H-%M-%S")
    record = main_grids(overrides, indices, int(settings.images), args.flatten or settings.flatten,
                        int(settings.batch_size), out, layers=layers, progress=not args.no_progress,
                        skip_positions=int(settings.skip_positions), bootstrap=int(settings.bootstrap),
                        permutations=int(settings.permutations), front_rank=cfg.stitch.front_rank,
                        rbf_sigma=float(settings.rbf_sigma))
    print(f"{record['front']} → {record['end']}: {record['images']} {record['dataset']} test images, "
          f"flatten={record['flatten']}, {record['timings']['total_s']:.1f}s")
    for name, grid in record["grids"].items():
        print(f"\n{record['indices'][name]} (rows: front layer, columns: end layer)")
        print(pd.DataFrame(grid, index=list(record["front_layers"]), columns=list(record["end_layers"]), dtype=float).round(3)
              .to_string(na_rep="—"))
    for name, parts in record["intervals"].items():
        if parts.get("p_value"):
            p_values = [v for row in parts["p_value"] for v in row if v is not None]
            print(f"{record['indices'][name]}: {sum(v < 0.05 for v in p_values)} of {len(p_values)} cells above chance "
                  f"(permutation p < 0.05, {record['permutations']} shuffles)")
        if parts.get("low"):
            widths = [h - lo for lrow, hrow in zip(parts["low"], parts["high"]) for lo, h in zip(lrow, hrow)
                      if lo is not None and h is not None]
            if widths:
                print(f"{record['indices'][name]}: 95 % bootstrap intervals {min(widths):.3f}–{max(widths):.3f} wide "
                      f"({record['bootstrap']} resamples; columns low, high in similarity.csv)")
    by_index: dict[str, list[str]] = {}
    for line in record["undefined"]:
        by_index.setdefault(line.split(":")[0].split()[0], []).append(line)
    for name, lines in by_index.items():
        print(f"undefined {name}: {len(lines)} cell(s), e.g. {lines[0]}")
    print("\nsanity checks (share of front layers whose most similar end layer is the same index)")
    for row in record["sanity"]:
        print(f"  {row['method']:<14} {row['check']:<28} {row['score']:.2f}")
    print(f"results in {out.resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
