"""``python -m stitching.report SWEEP_DIR`` — a sweep's records → tidy table → figure.

Reads every ``results.json`` under SWEEP_DIR (failed or unreadable runs are listed, not
fatal), writes ``results.csv`` and ``table.md``, and draws the stitching plot
(accuracy vs layer, one line per objective, base models as end points).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stitching.errors import StitchingError, exit_on_user_error

OBJECTIVE_ORDER = ["dm", "hint", "fula", "slm", "tlm"]


def collect(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Return one row per successful run and a list of ``{run, error}`` for the others."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise StitchingError(f"{sweep_dir} is not a folder; pass the sweep directory printed by the run")
    rows, failed = [], []
    for path in sorted(sweep_dir.rglob("results.json")):
        run = str(path.parent.relative_to(sweep_dir))
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            failed.append({"run": run, "error": f"unreadable results.json ({err})"})
            continue
        if record.get("status") != "ok":
            failed.append({"run": run, "error": record.get("error", "unknown failure")})
            continue
        rows.append({
            "run": run,
            "objective": record["objective"],
            "front_layer": record["front_layer"],
            "end_layer": record["end_layer"],
            **{k.replace("/", "_"): v for k, v in record["metrics"].items()},
            "front_acc": record["base"]["front"]["test_acc"],
            "end_acc": record["base"]["end"]["test_acc"],
            "front_model": record["base"]["front"]["key"],
            "end_model": record["base"]["end"]["key"],
            "seconds": record["timings"]["total_s"],
        })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        order = {name: i for i, name in enumerate(OBJECTIVE_ORDER)}
        frame = frame.sort_values(["objective", "front_layer", "end_layer"],
                                  key=lambda c: c.map(order) if c.name == "objective" else c)
    return frame.reset_index(drop=True), failed


def _objectives(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["objective"]))
    return [o for o in OBJECTIVE_ORDER if o in present] + [o for o in present if o not in OBJECTIVE_ORDER]


def layer_table(frame: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Corresponding-layer runs as a layer × objective table of ``metric`` in percent."""
    same = frame[frame.front_layer == frame.end_layer]
    table = same.pivot_table(index="front_layer", columns="objective", values=metric, aggfunc="mean") * 100
    table = table[[o for o in _objectives(same)]]
    table.index.name = "layer"
    return table.round(2)


def self_accuracy(grid, directional: bool = True) -> float:
    """How often a layer is most similar to itself: the share of rows whose diagonal cell
    is (one of) the row's best.

    Non-directional mode first averages both stitching directions, ``(G + Gᵀ) / 2``, as
    the FuLA paper does. Rows without any value are skipped.
    """
    g = np.asarray(grid, dtype=float)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise StitchingError(f"self-accuracy needs a square grid, got shape {g.shape}")
    if not directional:
        g = np.nanmean(np.stack([g, g.T]), axis=0)
    hits = rows = 0
    for i, row in enumerate(g):
        if np.isnan(row).all():
            continue
        rows += 1
        hits += bool(not np.isnan(row[i]) and row[i] >= np.nanmax(row))
    return hits / rows if rows else float("nan")


def layer_grid(frame: pd.DataFrame, objective: str, metric: str = "test_acc") -> pd.DataFrame:
    """Front layer (rows) × end layer (columns) for one objective."""
    runs = frame[frame.objective == objective]
    grid = runs.pivot_table(index="front_layer", columns="end_layer", values=metric, aggfunc="mean")
    layers = sorted(set(grid.index) | set(grid.columns))
    return grid.reindex(index=layers, columns=layers)


def heatmaps(frame: pd.DataFrame, path: Path, metric: str = "test_acc") -> tuple[Path, dict]:
    """One annotated heatmap per objective, titled with directional (non-directional) self-accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = _objectives(frame)
    fig, axes = plt.subplots(1, len(objectives), figsize=(4.3 * len(objectives), 4.4), squeeze=False)
    scores = {}
    for ax, objective in zip(axes[0], objectives):
        grid = layer_grid(frame, objective, metric)
        values = grid.to_numpy() * 100
        directional, averaged = self_accuracy(values), self_accuracy(values, directional=False)
        scores[objective] = {"self_accuracy": directional, "self_accuracy_nondirectional": averaged}
        ax.imshow(values, cmap="viridis", vmin=np.nanmin(values), vmax=np.nanmax(values))
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6.5,
                        color="white" if v < np.nanmean(values) else "black")
        ax.set_xticks(range(len(grid.columns)), grid.columns)
        ax.set_yticks(range(len(grid.index)), grid.index)
        ax.set_xlabel("end layer")
        ax.set_ylabel("front layer")
        ax.set_title(f"{objective.upper()}  self-acc {directional:.2f} ({averaged:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path, scores


def stitching_plot(frame: pd.DataFrame, path: Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Metric vs front depth; x = 0 is the end model alone, x = K + 1 the front model alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    same = frame[frame.front_layer == frame.end_layer]
    last = int(same.front_layer.max())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for objective in _objectives(same):
        runs = same[same.objective == objective].groupby("front_layer")[metric].mean()
        ax.plot(runs.index, runs.values * 100, marker="o", label=objective.upper())
    end_acc, front_acc = same.end_acc.mean() * 100, same.front_acc.mean() * 100
    ax.scatter([0, last + 1], [end_acc, front_acc], color="black", marker="s", zorder=5, label="base models")
    ax.annotate("end", (0, end_acc), textcoords="offset points", xytext=(0, 8), ha="center")
    ax.annotate("front", (last + 1, front_acc), textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xticks(range(0, last + 2))
    ax.set_xlabel("front layer (stitching point)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    values = [*(same[metric] * 100), end_acc, front_acc]
    low = max(0.0, min(values) - 0.15 * max(5.0, max(values) - min(values)))  # differences stay visible
    ax.set_ylim(low, min(101.0, max(values) + 2.0))
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{same.front_model.iloc[0]} → {same.end_model.iloc[0]}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write ``results.csv``, ``table.md`` and ``stitching_plot.png``; return what was made."""
    frame, failed = collect(sweep_dir)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    if frame.empty:
        raise StitchingError(f"no successful run under {sweep_dir} ({len(failed)} failed)")
    frame.to_csv(out / "results.csv", index=False)
    made = {"csv": out / "results.csv", "failed": failed, "frame": frame}
    if (frame.front_layer == frame.end_layer).any():
        table = layer_table(frame)
        (out / "table.md").write_text(table.to_markdown() if _has_tabulate() else table.to_string())
        made["table"] = table
        made["plot"] = stitching_plot(frame, out / "stitching_plot.png")
    if (frame.front_layer != frame.end_layer).any():
        made["heatmap"], made["self_accuracy"] = heatmaps(frame, out / "heatmap.png")
        (out / "self_accuracy.json").write_text(json.dumps(made["self_accuracy"], indent=2))
        for objective in _objectives(frame):
            layer_grid(frame, objective).to_csv(out / f"grid_{objective}.csv")
    return made


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stitching.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep directory (hydra.sweep.dir) or any folder of runs")
    parser.add_argument("--out", default=None, help="where to write the table and figures (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    made = report(args.sweep_dir, args.out)
    frame = made["frame"]
    print(f"{len(frame)} runs", end="")
    print(f", {len(made['failed'])} failed:" if made["failed"] else "")
    for failure in made["failed"]:
        print(f"  FAILED {failure['run']}: {failure['error']}")
    if "table" in made:
        first = frame.iloc[0]
        print(f"\nstitched test accuracy (%), {first.front_model} → {first.end_model}")
        print(f"base models: front {first.front_acc * 100:.2f}%, end {first.end_acc * 100:.2f}%\n")
        print(made["table"].to_string())
        print(f"\nfigure: {made['plot']}")
    if "heatmap" in made:
        print("\nself-accuracy (directional / non-directional)")
        for objective, score in made["self_accuracy"].items():
            print(f"  {objective:<6} {score['self_accuracy']:.2f} / {score['self_accuracy_nondirectional']:.2f}")
        print(f"heatmaps: {made['heatmap']}")
    print(f"table:  {made['csv']}")
    print(f"results in {Path(args.out or args.sweep_dir).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
