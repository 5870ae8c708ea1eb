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
* class subsets → ``subsets.png`` (accuracy vs number of stitching classes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd

from stitching.errors import StitchingError, exit_on_user_error

OBJECTIVE_ORDER = ["dm", "hint", "fula", "slm", "tlm"]
#: condition columns, read from each run's resolved config
CONDITIONS = {
    "front_dataset": ("front", "dataset"), "end_dataset": ("end", "dataset"),
    "front_arch": ("front", "arch"), "end_arch": ("end", "arch"),
    "front_name": ("front", "name"), "end_name": ("end", "name"),  # given models (a folder, a hub name)
    "front_seed": ("front", "seed"), "end_seed": ("end", "seed"),
    "front_robust": ("front", "robust"), "end_robust": ("end", "robust"),
    "alpha": ("attack", "alpha"), "classes_train": ("dataset", "num_classes_train"),
    "weights": ("objective", "weights"), "class_token": ("stitch", "class_token"),
    "init": ("stitch", "init"), "stitch_kind": ("stitch", "kind"), "stitch_rank": ("stitch", "rank"),
    "front_rank": ("stitch", "front_rank"),
}
#: replicate axes: averaged over, their spread shown (never a panel of their own)
REPLICATES = ("front_seed", "end_seed")
METRIC_LABELS = {"test_acc": "clean accuracy", "test_robust_acc_pgd": "robust accuracy (PGD)",
                 "test_robust_acc_autoattack": "robust accuracy (AutoAttack)",
                 "test_acc_shortcut": "accuracy with shortcut",
                 "init_penultimate_cka": "penultimate CKA at DM init",
                 "ood_auroc": "OOD AUROC, stitched vs native",
                 "test_hans_acc": "HANS lexical-overlap accuracy"}


def condition_values(config: dict) -> dict:
    values = {}
    for column, (group, key) in CONDITIONS.items():
        value = (config.get(group) or {}).get(key)
        values[column] = json.dumps(value) if isinstance(value, list) else value
    shortcut = config.get("shortcut") or {}
    values["shortcut"] = f"{shortcut['kind']}/{shortcut['placement']}" if shortcut.get("kind") else "none"
    return values


def collect(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Return one row per successful run and a list of ``{run, error}`` for the others.

    Every ``similarity.csv`` below the folder (from ``python -m stitching.similarity``)
    joins as rows whose ``objective`` is the index; ``score`` is the test accuracy of a
    stitching run and the value of a similarity index.
    """
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
        if not isinstance(record, dict):
            failed.append({"run": run, "error": f"malformed results.json (a {type(record).__name__}, not a record)"})
            continue
        if record.get("status") != "ok":
            failed.append({"run": run, "error": record.get("error", "unknown failure")})
            continue
        try:
            row = _row(run, record)
        except (KeyError, TypeError, AttributeError) as err:
            failed.append({"run": run, "error": f"malformed results.json (missing or wrong {err})"})
            continue
        bad = [k for k, v in record["metrics"].items() if not (isinstance(v, (int, float)) and np.isfinite(v))]
        if bad:  # never averaged into a figure
            failed.append({"run": run, "error": f"non-finite metric(s) {', '.join(bad)}"})
            continue
        rows.append(row)
    for row in rows:
        row["score"] = _stitching_score(row)
    for path in sorted(sweep_dir.rglob("similarity.csv")):
        try:
            rows += pd.read_csv(path).assign(run=str(path.parent.relative_to(sweep_dir))).to_dict("records")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            failed.append({"run": str(path.parent.relative_to(sweep_dir)), "error": f"unreadable similarity.csv ({err})"})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["pairing"] = np.where(frame.front_model == frame.end_model, "self", "two models")
        order = {name: i for i, name in enumerate(OBJECTIVE_ORDER)}
        frame = frame.sort_values(["objective", "front_layer", "end_layer"],
                                  key=lambda c: c.map(order) if c.name == "objective" else c)
    return frame.reset_index(drop=True), failed


def _stitching_score(row: dict) -> float | None:
    """Higher is more similar: accuracy; for a language model minus its penalty (nats/token);
    for a bare encoder minus the output's relative error."""
    if row.get("test_acc") is not None:
        return row["test_acc"]
    if row.get("test_penalty") is not None:
        return -row["test_penalty"]
    return None if row.get("test_loss") is None else -row["test_loss"]


def _cost_label(rows: pd.DataFrame) -> str | None:
    """What a grid of stitching runs without accuracy shows instead (lower is better)."""
    if "test_acc" in rows and rows.test_acc.notna().any():
        return None
    if "test_penalty" in rows and rows.test_penalty.notna().any():
        return "penalty (nats/token)"
    if "test_loss" in rows and rows.test_loss.notna().any():
        return "output relative error"
    return None


def _row(run: str, record: dict) -> dict:
    """One table row of an ``ok`` record."""
    base = record["base"]
    return {
        "run": run,
        "objective": record["objective"],
        "front_layer": record["front_layer"],
        "end_layer": record["end_layer"],
        **condition_values(record.get("config", {})),
        "num_classes": (record.get("config", {}).get("dataset") or {}).get("num_classes"),
        **{k.replace("/", "_"): v for k, v in record["metrics"].items()},
        "front_acc": base["front"]["test_acc"],
        "end_acc": base["end"]["test_acc"],
        **{f"{side}_{k.replace('/', '_')}": v for side in ("front", "end") for k, v in base[side].items()
           if k.startswith("robust") or (k.endswith("_acc") and k != "test_acc")},  # robust, challenge-set accuracy
        "front_model": base["front"]["key"],
        "end_model": base["end"]["key"],
        "seconds": record["timings"]["total_s"],
    }


def sweep_plan(sweep_dir: str | Path) -> list[tuple[str, ...]] | None:
    """The cells a Hydra sweep was asked for (each a sorted tuple of its overrides), read
    from its ``multirun.yaml``; ``None`` for a folder that is not a sweep's."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    try:
        hydra = OmegaConf.to_container(OmegaConf.load(path), resolve=False)["hydra"]
        params = [f"{key}={value}" for key, value in ((hydra.get("sweeper") or {}).get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *hydra["overrides"]["task"]])
        return [tuple(sorted(cell)) for cell in BasicSweeper.split_arguments(overrides, None)[0]]
    except Exception:  # no plan to compare with: the report shows what it found
        return None


def missing_cells(sweep_dir: str | Path) -> list[str]:
    """The planned cells of a sweep that left no ``results.json`` (crashed, killed, not yet run),
    each shown by the overrides that vary across the sweep."""
    plan = sweep_plan(sweep_dir)
    if not plan:
        return []
    from omegaconf import OmegaConf

    done = set()
    for path in Path(sweep_dir).rglob(".hydra/overrides.yaml"):
        if (path.parent.parent / "results.json").is_file():
            with suppress(Exception):
                done.add(tuple(sorted(OmegaConf.to_container(OmegaConf.load(path)))))
    keys = {}
    for cell in plan:
        for item in cell:
            keys.setdefault(item.split("=", 1)[0], set()).add(item)
    varying = {key for key, values in keys.items() if len(values) > 1}
    return [" ".join(item for item in cell if item.split("=", 1)[0] in varying) or " ".join(cell)
            for cell in plan if cell not in done]


def _objectives(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["objective"]))
    return [o for o in OBJECTIVE_ORDER if o in present] + [o for o in present if o not in OBJECTIVE_ORDER]


def varying_conditions(frame: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """Condition columns that take more than one value in this sweep (seeds are replicates:
    ``pairing`` tells a model stitched to itself from two models)."""
    columns = [c for c in [*CONDITIONS, "shortcut", "pairing"] if c in frame and c not in (*exclude, *REPLICATES)]
    return [c for c in columns if frame[c].astype(str).nunique() > 1]


def seed_pairs(frame: pd.DataFrame) -> int:
    """How many (front seed, end seed) pairs the rows hold: the replicates a mean is over."""
    present = [c for c in REPLICATES if c in frame]
    return len(frame[present].astype(str).drop_duplicates()) if present else 1


def _spread_note(frame: pd.DataFrame) -> str:
    pairs = seed_pairs(frame)
    return f"mean ± std over {pairs} seed pairs" if pairs > 1 else ""


def facets(frame: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[tuple[str, pd.DataFrame]]:
    """``(label, rows)`` per combination of the varying conditions (one facet if none vary)."""
    varying = varying_conditions(frame, exclude)
    if not varying:
        return [("", frame)]
    groups = frame.groupby([frame[c].astype(str) for c in varying], sort=True)
    return [(", ".join(f"{c}={v}" for c, v in zip(varying, key if isinstance(key, tuple) else (key,))), rows)
            for key, rows in groups]


def plotted_metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in METRIC_LABELS if m in frame and frame[m].notna().any()]


def layer_table(frame: pd.DataFrame, metric: str = "test_acc", aggfunc: str = "mean") -> pd.DataFrame:
    """Corresponding-layer runs as a layer × objective table of ``metric`` in percent (the mean
    over seed pairs and conditions; ``aggfunc="std"``: their spread)."""
    same = frame[frame.front_layer == frame.end_layer]
    table = same.pivot_table(index="front_layer", columns="objective", values=metric, aggfunc=aggfunc) * 100
    table = table[[o for o in _objectives(same)]]
    table.index.name = "layer"
    return table.round(2)


def spread_table(frame: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """:func:`layer_table` as ``mean ± std`` text when the runs hold several seed pairs."""
    mean = layer_table(frame, metric)
    if seed_pairs(frame[frame.front_layer == frame.end_layer]) < 2:
        return mean
    std = layer_table(frame, metric, aggfunc="std").reindex_like(mean)
    return pd.DataFrame({c: [f"{a:.2f} ± {0 if pd.isna(b) else b:.2f}" if pd.notna(a) else "—"
                             for a, b in zip(mean[c], std[c])] for c in mean.columns}, index=mean.index)


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
        with warnings.catch_warnings():  # a cell undefined both ways stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            g = np.nanmean(np.stack([g, g.T]), axis=0)
    hits = rows = 0
    for i, row in enumerate(g):
        if np.isnan(row).all():
            continue
        rows += 1
        hits += bool(not np.isnan(row[i]) and row[i] >= np.nanmax(row))
    return hits / rows if rows else float("nan")


SANITY_CHECKS = {"self": "a layer is most similar to itself", "corresponding": "corresponding layers"}


def sanity_checks(frame: pd.DataFrame, metric: str = "score") -> list[dict]:
    """The two sanity checks of Balogh & Jelasity (2025) for every grid in ``frame``.

    A grid compares model A's layers (rows) with model B's (columns). With A = B it checks
    that *a layer is most similar to itself*; with two models of one architecture and task
    (e.g. two seeds) that *corresponding layers* are found. Either way the score is the
    share of rows whose best cell is the diagonal (ties count as found). Grids of other
    pairs, or with only the diagonal, have no sanity check.
    """
    results = []
    keys = ["objective", "front_model", "end_model",
            *[c for c in varying_conditions(frame) if not c.startswith(("front_", "end_"))]]
    for key, rows in frame.groupby(keys, sort=False, dropna=False):
        key = dict(zip(keys, key))
        if key["front_model"] == key["end_model"]:
            check = "self"
        elif (rows.front_arch.iloc[0] == rows.end_arch.iloc[0]
              and rows.front_dataset.iloc[0] == rows.end_dataset.iloc[0]):
            check = "corresponding"
        else:
            continue
        if not (rows.front_layer != rows.end_layer).any():
            continue
        grid = layer_grid(rows, key["objective"], metric)
        score = self_accuracy(grid.to_numpy())
        if np.isnan(score):
            continue
        results.append({"method": key["objective"], "check": SANITY_CHECKS[check], "score": round(score, 4),
                        "layers": len(grid), "arch": rows.front_arch.iloc[0],
                        "front": key["front_model"], "end": key["end_model"],
                        **{k: v for k, v in key.items() if k not in ("objective", "front_model", "end_model")}})
    return results


def sanity_table(results: list[dict]) -> pd.DataFrame:
    """Method (and architecture) × the two checks."""
    if not results:
        return pd.DataFrame()
    frame = pd.DataFrame(results)
    conditions = [c for c in frame.columns if c not in ("method", "check", "score", "layers", "arch", "front", "end")]
    frame[conditions] = frame[conditions].astype(str)  # a condition a method lacks reads "nan", not dropped
    table = frame.pivot_table(index=["arch", *conditions, "method"], columns="check", values="score", aggfunc="mean")
    order = {name: i for i, name in enumerate(OBJECTIVE_ORDER)}
    return table.sort_index(key=lambda c: c.map(lambda v: order.get(v, len(order))) if c.name == "method" else c)


def layer_grid(frame: pd.DataFrame, objective: str, metric: str = "test_acc", aggfunc: str = "mean") -> pd.DataFrame:
    """Front layer (rows) × end layer (columns) for one objective (mean over seed pairs;
    ``aggfunc="std"``: their spread)."""
    runs = frame[frame.objective == objective]
    grid = runs.pivot_table(index="front_layer", columns="end_layer", values=metric, aggfunc=aggfunc)
    layers = sorted(set(grid.index) | set(grid.columns))
    return grid.reindex(index=layers, columns=layers)


def _save(plt, fig, path: Path) -> Path:
    """Write a finished figure and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmaps(frame: pd.DataFrame, path: Path, metric: str = "test_acc") -> tuple[Path, dict]:
    """Annotated grids (rows: conditions, columns: objectives), titled with self-accuracy."""
    plt = _pyplot()
    cells = [(label, rows, objective) for label, rows in facets(frame) for objective in _objectives(frame)]
    columns = len(_objectives(frame)) if len(_objectives(frame)) > 1 else 4
    fig, axes = _grid(plt, len(cells), 4.3, 4.9, columns=columns)
    scores: dict = {}
    for ax, (label, rows, objective) in zip(axes, cells):
        grid = layer_grid(rows, objective, metric)
        cost = _cost_label(rows[rows.objective == objective]) if metric == "score" else None
        if not np.isfinite(grid.to_numpy(dtype=float)).any():
            ax.axis("off")
            continue
        directional, averaged = self_accuracy(grid), self_accuracy(grid, directional=False)
        scores.setdefault(label or "all", {})[objective] = {
            "self_accuracy": directional, "self_accuracy_nondirectional": averaged}
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
        if _differ_in_depth(cells):  # models of different depths: each tick also gives its relative depth
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
        note = _spread_note(mine)
        ax.set_title(f"{objective.upper()}{f' {cost}' if cost else ''}  self-acc {directional:.2f} ({averaged:.2f})"
                     + (f"\n{label}" if label else "") + (f"\n{note}" if note else ""), fontsize=9)
    return _save(plt, fig, path), scores


def _grid(plt, panels: int, width: float, height: float, columns: int = 4):
    ncols = min(columns, panels)
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.axis("off")
    return fig, flat


def stitching_plot(frame: pd.DataFrame, path: Path, title: str | None = None) -> list[Path]:
    """Metric vs front depth, one panel per condition; x = 0 is the end model alone,
    x = K + 1 the front model alone. One file per metric: ``path`` for clean accuracy,
    ``<stem>_<metric>.png`` for the others."""
    plt = _pyplot()
    same = frame[frame.front_layer == frame.end_layer]
    panels = facets(same)
    last = int(same.front_layer.max())
    written = []
    for metric in plotted_metrics(same):
        fig, axes = _grid(plt, len(panels), 6.2, 3.9)
        for ax, (label, rows) in zip(axes, panels):
            for objective in _objectives(rows):
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
            note = _spread_note(rows)
            ax.set_title(heading + (f"\n{label}" if label else "") + (f"\n{note}, shaded" if note else ""), fontsize=8)
            ax.legend(fontsize=7, loc="best")
        written.append(_save(plt, fig, path if metric == "test_acc" else path.with_name(
            f"{path.stem}_{metric.removeprefix('test_').removeprefix('init_')}.png")))
    return written


def _directions(runs: pd.DataFrame) -> pd.Series:
    """``front → end`` of each run: the architectures, or the given models' names when those vary."""
    named = "front_name" in runs and (runs.front_name.nunique() > 1 or runs.end_name.nunique() > 1)
    front, end = ("front_name", "end_name") if named else ("front_arch", "end_arch")
    return runs[front].astype(str).str.split("/").str[-1] + " → " + runs[end].astype(str).str.split("/").str[-1]


def penalty_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Language-model stitching: mean ± std of the penalty (nats/token) over seed pairs, by
    layer (rows) and direction ``front arch → end arch`` (columns), per objective."""
    runs = frame[frame.test_penalty.notna() & (frame.front_layer == frame.end_layer)]
    runs = runs.assign(direction=_directions(runs), layer=runs.front_layer.astype(int))
    stats = runs.groupby(["objective", "layer", "direction"]).test_penalty.agg(["mean", "std", "count"])
    cells = stats.apply(lambda r: f"{r['mean']:+.3f} ± {0 if pd.isna(r['std']) else r['std']:.3f} ({int(r['count'])})",
                        axis=1)
    return cells.unstack("direction")


def penalty_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Stitching penalty by layer, one line per direction (mean over seed pairs, ± std), one
    panel per objective (the representation-dissimilarity paper's Fig. 1)."""
    plt = _pyplot()
    runs = frame[frame.test_penalty.notna() & (frame.front_layer == frame.end_layer)]
    runs = runs.assign(direction=_directions(runs))
    objectives = _objectives(runs)
    fig, axes = _grid(plt, len(objectives), 5.5, 3.8)
    for ax, objective in zip(axes, objectives):
        rows = runs[runs.objective == objective]
        for direction, group in rows.groupby("direction"):
            stats = group.groupby("front_layer").test_penalty.agg(["mean", "std"])
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=direction)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(sorted(int(v) for v in rows.front_layer.unique()))
        ax.set_xlabel("layer (cut point: 1 = embeddings)")
        ax.set_ylabel("stitching penalty (nats/token)")
        ax.set_title(f"{objective.upper()}: stitched loss − end model's loss", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _differ_in_depth(frame: pd.DataFrame) -> bool:
    """Similarity grids between models of different depths (their cut points meet by relative depth)."""
    if "front_depth" not in frame:
        return False
    grids = frame[frame.front_depth.notna()]
    return any(group.front_layer.nunique() != group.end_layer.nunique()
               for _, group in grids.groupby(["objective", "front_model", "end_model"]))


def corresponding_depth(frame: pd.DataFrame) -> pd.DataFrame:
    """For every similarity grid and front layer, the cell at the end layer of the nearest
    relative depth: columns index, front/end model, front_layer, end_layer, depth, score."""
    rows = []
    grids = frame[frame.front_depth.notna()]
    for (index, front, end), group in grids.groupby(["objective", "front_model", "end_model"], sort=False):
        ends = group.drop_duplicates("end_layer").set_index("end_layer").end_depth
        for layer, cells in group.groupby("front_layer"):
            depth = float(cells.front_depth.iloc[0])
            nearest = (ends - depth).abs().idxmin()
            rows.append({"index": index, "front_model": front, "end_model": end, "front_layer": layer,
                         "end_layer": nearest, "depth": depth,
                         "score": float(cells.set_index("end_layer").score.get(nearest, np.nan))})
    return pd.DataFrame(rows)


def depth_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean similarity at corresponding relative depths: front model (rows) × end model (columns), per index."""
    cells = corresponding_depth(frame)
    return cells.pivot_table(index=["index", "front_model"], columns="end_model", values="score", aggfunc="mean",
                             sort=False)


def depth_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Similarity per relative depth, one line per model pair, one panel per index (the
    representation-dissimilarity paper's comparison of Pythia sizes)."""
    plt = _pyplot()
    cells = corresponding_depth(frame)
    indices = list(dict.fromkeys(cells["index"]))
    fig, axes = _grid(plt, len(indices), 5.5, 3.8)
    for ax, index in zip(axes, indices):
        for (front, end), line in cells[cells["index"] == index].groupby(["front_model", "end_model"], sort=False):
            ax.plot(line.depth, line.score, marker="o", ms=3, label=f"{front} × {end}")
        ax.set_xlabel("relative depth of the front layer (0 = embeddings, 1 = last block)")
        ax.set_ylabel(f"{index} at the nearest end depth")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def subsets_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Accuracy on all classes vs the number of stitching classes, per objective."""
    plt = _pyplot()
    panels = facets(frame, exclude=("classes_train",))
    fig, axes = _grid(plt, len(panels), 6.0, 4.0)
    for ax, (label, rows) in zip(axes, panels):
        k = rows.classes_train.fillna(rows.num_classes).astype(int)  # no subset: every class
        for objective in _objectives(rows):
            mine = rows[rows.objective == objective]
            curve = mine.groupby(k[mine.index])["test_acc"].mean()
            ax.plot(curve.index, curve.values * 100, marker="o", label=objective.upper())
        ax.set_xlabel("classes seen while stitching (k)")
        ax.set_ylabel("accuracy on all classes (%)")
        ax.grid(alpha=0.3)
        ax.set_title(label or "class subsets", fontsize=8)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write the tidy table and the figures the sweep calls for; return what was made."""
    frame, failed = collect(sweep_dir)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    if frame.empty:
        first = f"; {failed[0]['run']}: {failed[0]['error']}" if failed else ""
        raise StitchingError(f"no successful run under {sweep_dir} ({len(failed)} failed{first})")
    frame.to_csv(out / "results.csv", index=False)
    made = {"csv": out / "results.csv", "failed": failed, "frame": frame, "missing": missing_cells(sweep_dir)}
    if "test_penalty" in frame and (frame.test_penalty.notna() & (frame.front_layer == frame.end_layer)).any() \
            and not (frame.test_penalty.notna() & (frame.front_layer != frame.end_layer)).any():
        # language models at corresponding layers (a front × end grid is drawn as a heatmap instead)
        made["penalty_table"] = penalty_table(frame)
        (out / "penalty.md").write_text(made["penalty_table"].to_string())
        made["penalty"] = penalty_plot(frame, out / "penalty.png")
    if _differ_in_depth(frame):  # models of different depths: similarity by relative depth
        made["depth_table"] = depth_table(frame)
        (out / "depth.md").write_text(made["depth_table"].round(3).to_string(na_rep="—"))
        made["depth"] = depth_plot(frame, out / "depth.png")
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
            for objective in _objectives(rows):
                layer_grid(rows, objective, "score").to_csv(out / f"grid_{objective}{suffix}.csv")
                if seed_pairs(rows[rows.objective == objective]) > 1:
                    layer_grid(rows, objective, "score", aggfunc="std").to_csv(out / f"grid_{objective}{suffix}_std.csv")
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
    for key in ("heatmap", "subsets", "penalty", "depth"):
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
    parser.add_argument("--wandb", action="store_true", help="also log table and figures to W&B (offline without a key)")
    parser.add_argument("--wandb-project", default="stitching")
    args = parser.parse_args(argv)
    made = report(args.sweep_dir, args.out)
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
        print("\nstitching penalty (nats/token), mean ± std over seed pairs (runs)")
        print(made["penalty_table"].to_string())
        print(f"figure: {made['penalty']}")
    if "subsets" in made:
        print(f"figure: {made['subsets']}")
    if "depth" in made:
        print("\nsimilarity at corresponding relative depths (mean over front layers; rows: front model)")
        print(made["depth_table"].round(3).to_string(na_rep="—"))
        print(f"figure: {made['depth']}")
    if "heatmap" in made:
        print("\nself-accuracy (directional / non-directional)")
        for condition, scores in made["self_accuracy"].items():
            for objective, score in scores.items():
                print(f"  {condition:<24} {objective:<6} {score['self_accuracy']:.2f} / "
                      f"{score['self_accuracy_nondirectional']:.2f}")
        print(f"heatmaps: {made['heatmap']}")
    if made.get("sanity"):
        print("\nsanity checks (share of front layers whose best end layer is the same index)")
        print(made["sanity_table"].round(2).to_string(na_rep="—"))
    print(f"table:  {made['csv']}")
    print(f"results in {Path(args.out or args.sweep_dir).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
