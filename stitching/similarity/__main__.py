"""``python -m stitching.similarity`` — structural similarity of every layer pair of two models.

Takes the same overrides as ``python -m stitching.train`` (front/end models from the zoo,
the dataset), runs the test images through both models once and writes, in ``--out``:

* ``similarity.json`` — every grid, layer names, models, settings, undefined cells, timings;
* ``similarity.csv`` — one row per (index, front layer, end layer), the stitching report's
  columns, so ``python -m stitching.report`` can draw it beside stitching grids;
* ``heatmap.png`` and ``sanity.json`` — the grids, and the two sanity checks.

With ``-m``, every combination of a sweep is one pair of models, computed in one process into
``<out>/<k>_<the swept values>/``: the command line's comma-separated values, and the preset's
``hydra.sweeper.params`` over models and data (``front.*``, ``end.*``, ``model.*``, ``dataset.*``;
its other axes, such as the objective and the layers, are its stitching sweep's). A layer axis on
the command line is refused (in one pair too): ``--layers`` picks these grids' layers. Every pair's settings are
checked before any is computed; a pair whose ``similarity.json`` is there is kept, so a stopped
sweep resumes (grids there that other settings asked for are refused in one line, never kept);
a pair that fails is reported and the others still run (exit status 1).

Examples: ``python -m stitching.similarity --index cka,cca experiment=demo end.seed=0``;
``python -m stitching.similarity -m --index minibatch_cka --flatten positions experiment=lm_solu_gelu_small``
(the preset's 16 front × end models).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from stitching.build import compose_config, layer_value, read_settings
from stitching.errors import StitchingError, exit_on_user_error
from stitching.files import hold_folder
from stitching.grids import sweep_folders
from stitching.similarity.compare import finished_grids, pair_plan, plan_grids, refuse_layer_keys, sweep_pairs
from stitching.similarity.grid import FLATTEN, INDICES, parse_indices


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stitching.similarity", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=None, help=f"comma-separated, from: {', '.join(INDICES)} "
                        "(default: similarity.index)")
    parser.add_argument("--images", type=int, default=None, help="test images to compare on (default: similarity.images)")
    parser.add_argument("--flatten", default=None, choices=FLATTEN,
                        help="sample: c·h·w per image; positions: positions as samples; pool: one vector per image; "
                             "match: positions where two layers' maps have one shape, else pooled (the TLM-vs-DM "
                             "authors' PWCCA and Procrustes)")
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
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="a sweep: one pair of models per combination of the swept keys (the preset's too), "
                             "each into its own folder under --out, in one process")
    parser.add_argument("--resume", action="store_true",
                        help="one pair: keep the grids already in --out when the same settings asked for them "
                             "(other settings' grids are refused); a sweep always resumes")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for stitching.train (default: experiment=demo)")
    args = parser.parse_args(argv)
    flags = {"images": args.images, "batch_size": args.batch_size, "skip_positions": args.skip_positions,
             "bootstrap": args.bootstrap, "permutations": args.permutations, "rbf_sigma": args.rbf_sigma}
    given = [*(args.overrides or ["experiment=demo"]),  # the flags are the similarity.* settings
             *(f"similarity.{key}={value}" for key, value in flags.items() if value is not None),
             *([f"stitch.front_rank={args.front_rank}"] if args.front_rank is not None else [])]
    out = Path(args.out) if args.out else Path("outputs/similarity") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if not args.multirun:
        refuse_layer_keys(given)
        plan = _plan(args, given, flags)
        if args.resume and finished_grids(out, plan["request"]):
            return print(f"{out}: already computed, kept")
        return _pair(args, given, plan, hold_folder(out, "--out"), verbose=True)
    combos = sweep_pairs(given)
    plans = [_plan(args, combo, flags) for combo in combos]  # every pair's settings checked before any is computed
    folders = sweep_folders(out, combos)
    done = [finished_grids(folder, plan["request"]) for folder, plan in zip(folders, plans)]
    hold_folder(out, "--out")
    failed = []
    for combo, plan, folder, kept in zip(combos, plans, folders, done):
        if kept:
            print(f"{folder.name}: already computed, kept")
            continue
        try:
            _pair(args, combo, plan, folder, verbose=False)
        except StitchingError as err:
            print(f"{folder.name}: failed: {str(err).splitlines()[0]}", file=sys.stderr)
            failed.append(folder.name)
    if failed:
        print(f"[similarity] {len(failed)} of {len(combos)} pair(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _plan(args: argparse.Namespace, overrides: list[str], flags: dict) -> dict:
    """One pair's settings, read and checked: the ``similarity`` group, the indices and the layers."""
    try:
        run = read_settings(compose_config(overrides))
    except StitchingError as err:  # name the flag the user typed
        for key in flags:
            err = StitchingError(str(err).replace(f"similarity.{key}=", f"--{key.replace('_', '-')} "))
        err = StitchingError(str(err).replace("stitch.front_rank=", "--front-rank "))
        raise err from None
    return pair_plan(run, args.index, args.flatten, args.layers)


def _pair(args: argparse.Namespace, overrides: list[str], plan: dict, out: Path, verbose: bool) -> None:
    """One pair of models' grids into ``out``; ``verbose`` prints every grid and check."""
    record = plan_grids(overrides, plan, out, progress=not args.no_progress)
    print(f"{record['front']} → {record['end']}: {record['images']} {record['dataset']} test {record['inputs']}, "
          f"flatten={record['flatten']}, {record['timings']['total_s']:.1f}s" + ("" if verbose else f"; in {out}"))
    if not verbose:
        return
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
    print("\nsanity checks (share of front layers whose most similar end layer is the same index, "
          "alone; a tie is not a hit)")
    for row in record["sanity"]:
        print(f"  {row['method']:<14} {row['check']:<34} {row['score']:.2f}   ties {row['ties']}")
    print(f"results in {out.resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
