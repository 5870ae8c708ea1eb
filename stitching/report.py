"""``python -m stitching.report SWEEP_DIR`` — a sweep's records → tidy table → figures.

Reads every ``results.json`` under SWEEP_DIR (failed or unreadable runs are listed, not
fatal) and writes ``results.csv`` (one row per run, with the conditions that define it).
Then, for whatever the sweep varied besides objective and layer (α, robustness,
shortcut, class subset, FuLA weights, stitch capacity…), one panel per condition. Seed pairs
are replicates, not conditions: runs that differ only in ``front.seed``/``end.seed`` are
averaged, and the figures and tables show their spread (mean ± std, shaded bands); a model
stitched to itself (``pairing=self``) stays apart from two different models (``two models``).

* corresponding layers → ``stitching_plot.png`` (metric vs layer, base models as end
  points; one row per metric: clean, robust, shortcut accuracy) and ``table.md``;
* front ≠ end layers → ``heatmap.png`` (annotated 9×9 grids) and ``self_accuracy.json``
  (how often a row's best cell is on the diagonal, directional and non-directional);
* class subsets → ``subsets.png`` (accuracy vs number of stitching classes);
* models in groups (``groups.members``) → ``groups.md`` and ``groups.png`` (pairs of models
  within a group vs between groups, layer by layer, for every objective and index).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from stitching.errors import StitchingError, exit_on_user_error
from stitching.files import writable_folder
from stitching.results.records import missing_cells, read_runs
from stitching.results.tables import (
    depth_table, differ_in_depth, facets, group_pairs, group_table, layer_grid, layer_table, objectives_present,
    penalty_table,
    RELATIONS, sanity_checks, sanity_table, seed_pairs, self_accuracy, spread_table, varying_conditions,
)
from stitching.results.figures import depth_plot, group_plot, heatmaps, penalty_plot, stitching_plot, subsets_plot
from stitching.results.paper import table_1


FORMATS = ("csv", "parquet")


def report(sweep_dir: str | Path, out_dir: str | Path | None = None, table_format: str = "csv") -> dict:
    """Write the tidy table of every run (:func:`stitching.load_runs`: failed ones with their
    status and error) as ``results.csv`` or ``results.parquet``, and the figures the sweep's
    successful runs call for; return what was made."""
    if table_format not in FORMATS:
        raise StitchingError(f"--format {table_format}: choose {' or '.join(FORMATS)}")
    every, frame, failed = read_runs(sweep_dir)
    out = writable_folder(out_dir or sweep_dir, "--out")
    if frame.empty:
        first = f"; {failed[0]['run']}: {failed[0]['error']}" if failed else ""
        raise StitchingError(f"no successful run under {sweep_dir} ({len(failed)} failed{first})")
    table = out / f"results.{table_format}"
    if table_format == "parquet":
        try:
            every.astype({c: str for c in every.columns if every[c].dtype == object}).to_parquet(table, index=False)
        except ImportError as err:
            raise StitchingError(f"--format parquet needs pyarrow ({err}); pip install pyarrow, or use --format csv") from None
    else:
        every.to_csv(table, index=False)
    made = {"results": table, "failed": failed, "frame": frame, "runs": every, "missing": missing_cells(sweep_dir)}
    if "test_penalty" in frame and (frame.test_penalty.notna() & (frame.front_layer == frame.end_layer)).any() \
            and not (frame.test_penalty.notna() & (frame.front_layer != frame.end_layer)).any():
        # language models at corresponding layers (a front × end grid is drawn as a heatmap instead)
        made["penalty_table"] = penalty_table(frame)
        (out / "penalty.md").write_text(made["penalty_table"].to_string())
        made["penalty"] = penalty_plot(frame, out / "penalty.png")
    if set(group_pairs(frame).get("relation", [])) == set(RELATIONS):  # groups.members: within vs between
        made["group_table"] = group_table(frame)
        (out / "groups.md").write_text(made["group_table"].to_string(index=False, na_rep="—"))
        made["groups"] = group_plot(frame, out / "groups.png")
    if differ_in_depth(frame):  # models of different depths: similarity by relative depth
        made["depth_table"] = depth_table(frame)
        (out / "depth.md").write_text(made["depth_table"].round(3).to_string(na_rep="—"))
        made["depth"] = depth_plot(frame, out / "depth.png")
    compared = table_1(frame)
    if not compared.empty:  # the paper's own base models: their accuracies beside Table 1's
        made["table_1"] = compared
        (out / "table1.md").write_text(compared.round(4).to_string(index=False, na_rep="—"))
    runs = frame[frame.test_acc.notna()] if "test_acc" in frame else frame.iloc[:0]  # stitching runs only
    if not runs.empty and "classes_train" in varying_conditions(runs):
        made["subsets"] = subsets_plot(runs, out / "subsets.png")
    elif (runs.front_layer == runs.end_layer).any():
        made["table"] = layer_table(runs)
        (out / "table.md").write_text(spread_table(runs).to_string())
        made["plots"] = stitching_plot(runs, out / "stitching_plot.png")
        made["plot"] = made["plots"][0]
    if (frame.front_layer != frame.end_layer).any():
        made["heatmap"], made["self_accuracy"] = heatmaps(frame, out / "heatmap.png", metric="score")
        (out / "self_accuracy.json").write_text(json.dumps(made["self_accuracy"], indent=2))
        panels = facets(frame)
        for label, rows in panels:  # one file per grid: conditions are never averaged together
            suffix = "" if len(panels) == 1 else "_" + re.sub(r"[^\w.-]+", "-", "_".join(
                part.replace("=", "") for part in label.split(", ")))  # a model's path or hub name stays one file name
            for objective in objectives_present(rows):
                layer_grid(rows, objective, "score").to_csv(out / f"grid_{objective}{suffix}.csv")
                if seed_pairs(rows[rows.objective == objective]) > 1:
                    layer_grid(rows, objective, "score", aggfunc="std").to_csv(out / f"grid_{objective}{suffix}_std.csv")
        if "ood_auroc" in frame and frame.ood_auroc.notna().any():  # stitched vs native over the grid
            made["ood_heatmap"], _ = heatmaps(frame[frame.ood_auroc.notna()], out / "heatmap_ood_auroc.png",
                                              metric="ood_auroc", diagonal=False)
        made["sanity"] = sanity_checks(frame)
        if made["sanity"]:
            (out / "sanity.json").write_text(json.dumps(made["sanity"], indent=2))
            made["sanity_table"] = sanity_table(made["sanity"])
            (out / "sanity.md").write_text(made["sanity_table"].round(2).to_string(na_rep="—"))
    return made


def log_to_wandb(made: dict, sweep_dir: Path, project: str = "stitching", group: str | None = None) -> Path:
    """Log the tidy table, self-accuracies and every figure to one W&B run of the sweep's group."""
    import wandb

    from stitching.runtime import wandb_offline

    sweep_dir = Path(sweep_dir)
    run = wandb.init(project=project, group=group or sweep_dir.name, job_type="report", name=f"report-{sweep_dir.name}",
                     dir=str(sweep_dir), mode="offline" if wandb_offline() else "online", reinit="finish_previous")
    payload = {"results": wandb.Table(dataframe=made["frame"])}
    for key in ("plots",):
        for path in made.get(key, []):
            payload[f"figures/{Path(path).stem}"] = wandb.Image(str(path))
    for key in ("heatmap", "ood_heatmap", "subsets", "penalty", "depth"):
        if key in made:
            payload[f"figures/{key}"] = wandb.Image(str(made[key]))
    for condition, scores in made.get("self_accuracy", {}).items():
        for objective, score in scores.items():
            for name, value in score.items():
                payload[f"{name}/{condition}/{objective}"] = value
    run.log(payload)
    run.finish()
    return Path(run.dir)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stitching.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep directory (hydra.sweep.dir) or any folder of runs")
    parser.add_argument("--out", default=None, help="where to write the table and figures (default: SWEEP_DIR)")
    parser.add_argument("--format", default="csv", choices=FORMATS,
                        help="the table of every run: results.csv (default) or results.parquet")
    parser.add_argument("--wandb", action="store_true", help="also log table and figures to W&B (offline without a key)")
    parser.add_argument("--wandb-project", default="stitching")
    args = parser.parse_args(argv)
    made = report(args.sweep_dir, args.out, args.format)
    if args.wandb:
        print(f"W&B: {log_to_wandb(made, Path(args.out or args.sweep_dir), args.wandb_project)}")
    frame = made["frame"]
    print(f"{len(frame)} runs", end="")
    print(f", {len(made['failed'])} failed:" if made["failed"] else "")
    for failure in made["failed"]:
        print(f"  FAILED {failure['run']}: {failure['error']}")
    if made["missing"]:
        print(f"{len(made['missing'])} planned cell(s) never finished (rerun the sweep into {args.sweep_dir} "
              f"with hydra.sweep.dir to run only these):")
        for cell in made["missing"]:
            print(f"  MISSING {cell}")
    varying = varying_conditions(frame)
    if varying:
        print(f"conditions varied: {', '.join(varying)}")
    if "table" in made:
        first = frame.iloc[0]
        print(f"\nstitched test accuracy (%), {first.front_model} → {first.end_model}"
              + (" (averaged over conditions)" if varying else ""))
        print(f"base models: front {frame.front_acc.mean() * 100:.2f}%, end {frame.end_acc.mean() * 100:.2f}%\n")
        print(spread_table(frame[frame.test_acc.notna()]).to_string())
        print("\nfigures: " + ", ".join(str(p) for p in made["plots"]))
    if "penalty" in made:
        print("\nstitching penalty (nats/token), mean ± std over seed pairs (runs): adjusted = stitched − "
              "self-stitched loss [raw = stitched − end model's loss, self = self-stitched − end model's loss]")
        print(made["penalty_table"].to_string())
        print(f"figure: {made['penalty']}")
    if "subsets" in made:
        print(f"figure: {made['subsets']}")
    if "table_1" in made:
        print("\nbase models beside the FuLA paper's Table 1 (accuracy; AutoAttack-rand robust accuracy where measured)")
        print(made["table_1"].round(4).to_string(index=False, na_rep="—"))
    if "depth" in made:
        print("\nsimilarity at corresponding relative depths (mean over front layers; rows: front model)")
        print(made["depth_table"].round(3).to_string(na_rep="—"))
        print(f"figure: {made['depth']}")
    if "heatmap" in made:
        print("\nself-accuracy: rows whose diagonal is the unique best (directional / non-directional); "
              "a tie is not a hit")
        for condition, scores in made["self_accuracy"].items():
            for objective, score in scores.items():
                print(f"  {condition:<24} {objective:<6} {score['self_accuracy']:.2f} / "
                      f"{score['self_accuracy_nondirectional']:.2f}   ties {score['ties']} / "
                      f"{score['ties_nondirectional']}")
        print(f"heatmaps: {made['heatmap']}")
    if made.get("sanity"):
        print("\nsanity checks (share of front layers whose unique best end layer is the same index; ties beside)")
        print(made["sanity_table"].round(2).to_string(na_rep="—"))
    print(f"table:  {made['results']} (every run, with its status)")
    print(f"results in {Path(args.out or args.sweep_dir).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
