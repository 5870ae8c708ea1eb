"""Figures from the tidy frame of run records (heatmaps, stitching plots, penalty, depth and
subset plots), and the plotting helpers every tool shares (:func:`pyplot`, :func:`save_figure`,
:func:`panel_grid`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stitching.results.records import METRIC_LABELS, cost_label, penalty_metric
from stitching.results.tables import (
    RELATIONS, corresponding_depth, differ_in_depth, directions, facets, group_pairs, layer_grid,
    objectives_present, plotted_metrics, seed_pairs, diagonal_wins, spread_note,
)
from stitching.similarity.grid import INDICES


def save_figure(plt, fig, path: Path) -> Path:
    """Write a finished figure and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(plt, panels: int, width: float, height: float, columns: int = 4):
    ncols = min(columns, panels)
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.axis("off")
    return fig, flat


def heatmaps(frame: pd.DataFrame, path: Path, metric: str = "test_acc", diagonal: bool = True) -> tuple[Path, dict]:
    """Annotated grids (rows: conditions, columns: objectives), titled with self-accuracy
    (``diagonal=False``: a metric where the diagonal is not expected to win, e.g. OOD AUROC)."""
    plt = pyplot()
    cells = [(label, rows, objective) for label, rows in facets(frame) for objective in objectives_present(frame)]
    columns = len(objectives_present(frame)) if len(objectives_present(frame)) > 1 else 4
    fig, axes = panel_grid(plt, len(cells), 4.3, 4.9, columns=columns)
    scores: dict = {}
    for ax, (label, rows, objective) in zip(axes, cells):
        grid = layer_grid(rows, objective, metric)
        cost = cost_label(rows[rows.objective == objective]) if metric == "score" else None
        if not np.isfinite(grid.to_numpy(dtype=float)).any():
            ax.axis("off")
            continue
        directional, averaged = diagonal_wins(grid), diagonal_wins(grid, directional=False)
        if diagonal:
            scores.setdefault(label or "all", {})[objective] = {
                "self_accuracy": directional["share"], "self_accuracy_nondirectional": averaged["share"],
                "ties": directional["ties"], "ties_nondirectional": averaged["ties"]}
        # accuracy in percent (higher is better), or a language model's cost as it is (lower is better)
        values, text, dark = (-grid.to_numpy(dtype=float), "{:.2f}", np.greater) if cost else \
            (grid.to_numpy(dtype=float) * 100, "{:.0f}", np.less)
        ax.imshow(values, cmap="viridis_r" if cost else "viridis", vmin=np.nanmin(values), vmax=np.nanmax(values))
        chance = layer_grid(rows, objective, "p_value").to_numpy(dtype=float) >= 0.05 \
            if "p_value" in rows else np.zeros(values.shape, dtype=bool)  # not above a permutation null
        mine = rows[rows.objective == objective]
        spread = layer_grid(mine, objective, metric, aggfunc="std").to_numpy(dtype=float) * (1 if cost else 100) \
            if seed_pairs(mine) > 1 else None
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):
                shown = f"({text.format(v)})" if chance[r, c] else text.format(v)
                if spread is not None and np.isfinite(spread[r, c]):
                    shown += "\n±" + text.format(spread[r, c])
                ax.text(c, r, shown, ha="center", va="center",
                        fontsize=(6.5 if len(values) < 12 else 4) - (1.5 if spread is not None else 0),
                        color="white" if dark(v, np.nanmean(values)) else "black")
        cells = rows[rows.objective == objective]
        if differ_in_depth(cells):  # models of different depths: each tick also gives its relative depth
            ends, fronts = dict(zip(cells.end_layer, cells.end_depth)), dict(zip(cells.front_layer, cells.front_depth))
            ticks = {"x": [f"{c}\n{ends[c]:.2f}" if c in ends else str(c) for c in grid.columns],
                     "y": [f"{r} ({fronts[r]:.2f})" if r in fronts else str(r) for r in grid.index]}
        else:
            ticks = {"x": list(grid.columns), "y": list(grid.index)}
        ax.set_xticks(range(len(grid.columns)), ticks["x"], fontsize=6 if len(grid.columns) > 12 else None)
        ax.set_yticks(range(len(grid.index)), ticks["y"], fontsize=6 if len(grid.index) > 12 else None)
        ax.set_xlabel("end layer" + (" (relative depth)" if ticks["x"] != list(grid.columns) else ""))
        ax.set_ylabel("front layer" + (" (relative depth)" if ticks["y"] != list(grid.index) else ""))
        if chance.any():
            ax.text(0.5, -0.24, "(value): not above chance (permutation p ≥ 0.05)", transform=ax.transAxes,
                    ha="center", fontsize=6)
        note = spread_note(mine)
        tied = f", {directional['ties']} tied" if directional["ties"] else ""
        ranked = f"  self-acc {directional['share']:.2f}{tied} ({averaged['share']:.2f})" if diagonal else \
            f"  {METRIC_LABELS.get(metric, metric)}"
        ax.set_title(f"{objective.upper()}{f' {cost}' if cost else ''}{ranked}"
                     + (f"\n{label}" if label else "") + (f"\n{note}" if note else ""), fontsize=9)
    return save_figure(plt, fig, path), scores


def stitching_plot(frame: pd.DataFrame, path: Path, title: str | None = None) -> list[Path]:
    """Metric vs front depth, one panel per condition; x = 0 is the end model alone,
    x = K + 1 the front model alone. One file per metric: ``path`` for clean accuracy,
    ``<stem>_<metric>.png`` for the others."""
    plt = pyplot()
    same = frame[frame.front_layer == frame.end_layer]
    panels = facets(same)
    last = int(same.front_layer.max())
    written = []
    for metric in plotted_metrics(same):
        fig, axes = panel_grid(plt, len(panels), 6.2, 3.9)
        for ax, (label, rows) in zip(axes, panels):
            for objective in objectives_present(rows):
                mine = rows[rows.objective == objective]
                runs = mine.groupby("front_layer")[metric].agg(["mean", "std"])
                line, = ax.plot(runs.index, runs["mean"] * 100, marker="o", label=objective.upper())
                if seed_pairs(mine) > 1:  # the spread over seed pairs
                    ax.fill_between(runs.index, (runs["mean"] - runs["std"].fillna(0)) * 100,
                                    (runs["mean"] + runs["std"].fillna(0)) * 100, color=line.get_color(), alpha=0.2)
            base_metric = "acc" if metric in ("test_acc", "test_acc_shortcut") else metric.removeprefix("test_")
            if metric.startswith(("init_", "ood_")):
                base_metric = "none"  # base models have no stitch to initialise or detect
            ends = [rows.get(f"{side}_{base_metric}") for side in ("end", "front")]
            if all(e is not None and e.notna().any() for e in ends):
                end_value, front_value = (e.mean() * 100 for e in ends)
                label_ends = "base models (clean)" if metric == "test_acc_shortcut" else "base models"
                ax.scatter([0, last + 1], [end_value, front_value], color="black", marker="s", zorder=5,
                           label=label_ends)
                ax.annotate("end", (0, end_value), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
                ax.annotate("front", (last + 1, front_value), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=8)
            ax.set_xticks(range(0, last + 2))
            ax.set_xlim(-0.5, last + 1.5)
            ax.set_xlabel("front layer (stitching point)")
            ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
            ax.grid(alpha=0.3)
            heading = title or f"{rows.front_model.iloc[0]} → {rows.end_model.iloc[0]}"
            note = spread_note(rows)
            ax.set_title(heading + (f"\n{label}" if label else "") + (f"\n{note}, shaded" if note else ""), fontsize=8)
            ax.legend(fontsize=7, loc="best")
        written.append(save_figure(plt, fig, path if metric == "test_acc" else path.with_name(
            f"{path.stem}_{metric.removeprefix('test_').removeprefix('init_')}.png")))
    return written


def penalty_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Stitching penalty by layer, one line per direction (mean over seed pairs, ± std), one
    panel per objective (the representation-dissimilarity paper's Fig. 1): the adjusted penalty
    (solid), the raw one (dotted, same colour) beside it."""
    plt = pyplot()
    runs = frame[frame.test_penalty.notna() & (frame.front_layer == frame.end_layer)]
    runs = runs.assign(direction=directions(runs))
    metric, label = penalty_metric(runs)
    objectives = objectives_present(runs)
    fig, axes = panel_grid(plt, len(objectives), 5.5, 3.8)
    for ax, objective in zip(axes, objectives):
        rows = runs[runs.objective == objective]
        for direction, group in rows.groupby("direction"):
            stats = group.groupby("front_layer")[metric].agg(["mean", "std"])
            line = ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                               label=direction)
            if metric != "test_penalty":
                raw = group.groupby("front_layer").test_penalty.mean()
                ax.plot(raw.index, raw.values, ls=":", marker=".", color=line[0].get_color(), alpha=0.7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(sorted(int(v) for v in rows.front_layer.unique()))
        ax.set_xlabel("layer (cut point: 1 = embeddings)")
        ax.set_ylabel(label)
        ax.set_title(f"{objective.upper()}: stitched loss − "
                     + ("self-stitched loss (dotted: − end model's loss)" if metric != "test_penalty"
                        else "end model's loss"), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def group_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Model pairs within one group and between groups (``groups.members``), layer by layer:
    one panel per method (stitching objective or index), mean ± std over the pairs (the
    representation-dissimilarity paper, Sec. 4)."""
    plt = pyplot()
    rows = group_pairs(frame)
    methods = list(dict.fromkeys(rows.objective))
    fig, axes = panel_grid(plt, len(methods), 5.0, 3.6)
    for ax, method in zip(axes, methods):
        own = rows[rows.objective == method]
        for relation in RELATIONS:
            stats = own[own.relation == relation].groupby("layer").score.agg(["mean", "std", "count"])
            if not stats.empty:
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                            label=f"{relation} groups ({int(stats['count'].max())} pairs)")
        ax.set_xticks(sorted(own.layer.unique()))
        ax.set_xlabel("layer (cut point)")
        label = INDICES[method].label if method in INDICES else f"{method.upper()} stitching score"
        ax.set_ylabel("score (higher = more similar)", fontsize=8)
        ax.set_title(f"{label}: {', '.join(sorted(set(own.front_group) | set(own.end_group)))}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def depth_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Similarity per relative depth, one line per model pair, one panel per index (the
    representation-dissimilarity paper's comparison of Pythia sizes)."""
    plt = pyplot()
    cells = corresponding_depth(frame)
    indices = list(dict.fromkeys(cells["index"]))
    fig, axes = panel_grid(plt, len(indices), 5.5, 3.8)
    for ax, index in zip(axes, indices):
        for (front, end), line in cells[cells["index"] == index].groupby(["front_model", "end_model"], sort=False):
            ax.plot(line.depth, line.score, marker="o", ms=3, label=f"{front} × {end}")
        ax.set_xlabel("relative depth of the front layer (0 = embeddings, 1 = last block)")
        ax.set_ylabel(f"{index} at the nearest end depth")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return save_figure(plt, fig, path)


def subsets_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Accuracy on all classes vs the number of stitching classes, per objective."""
    plt = pyplot()
    panels = facets(frame, exclude=("classes_train",))
    fig, axes = panel_grid(plt, len(panels), 6.0, 4.0)
    for ax, (label, rows) in zip(axes, panels):
        k = rows.classes_train.fillna(rows.num_classes).astype(int)  # no subset: every class
        for objective in objectives_present(rows):
            mine = rows[rows.objective == objective]
            curve = mine.groupby(k[mine.index])["test_acc"].mean()
            ax.plot(curve.index, curve.values * 100, marker="o", label=objective.upper())
        ax.set_xlabel("classes seen while stitching (k)")
        ax.set_ylabel("accuracy on all classes (%)")
        ax.grid(alpha=0.3)
        ax.set_title(label or "class subsets", fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)
