"""Tables and scores computed from the tidy frame of run records: layer tables, spreads over
replicates, self-accuracy, the sanity checks, LM penalties and relative depths."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from stitching.errors import StitchingError
from stitching.results.records import CONDITIONS, METRIC_LABELS, NOT_READ, OBJECTIVE_ORDER, REPLICATES, penalty_metric


def objectives_present(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["objective"]))
    return [o for o in OBJECTIVE_ORDER if o in present] + [o for o in present if o not in OBJECTIVE_ORDER]


def condition_text(values: pd.Series | pd.DataFrame) -> pd.Series | pd.DataFrame:
    """Conditions as text; a condition a row lacks (a similarity index has no ``dm_bn_pass``)
    reads :data:`~stitching.results.records.NOT_READ`, so no grouping drops that row. Whole numbers
    that a missing value turned into floats read as whole numbers (``epochs=1``, not ``1.0``)."""
    if isinstance(values, pd.DataFrame):
        return pd.DataFrame({column: condition_text(values[column]) for column in values.columns}, index=values.index)
    if values.dtype.kind == "f" and values.dropna().map(float.is_integer).all():
        values = values.astype("Int64")
    return values.astype(object).where(values.notna(), NOT_READ).astype(str)


def varying_conditions(frame: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """Condition columns that take more than one value in this sweep (seeds are replicates:
    ``pairing`` tells a model stitched to itself from two models)."""
    columns = [c for c in [*CONDITIONS, "shortcut", "pairing"] if c in frame and c not in (*exclude, *REPLICATES)]
    return [c for c in columns if frame[c].dropna().astype(str).nunique() > 1]  # a missing value is no value


def seed_pairs(frame: pd.DataFrame) -> int:
    """How many (front seed, end seed) pairs the rows hold: the replicates a mean is over."""
    present = [c for c in REPLICATES if c in frame]
    return len(frame[present].astype(str).drop_duplicates()) if present else 1


def spread_note(frame: pd.DataFrame) -> str:
    pairs = seed_pairs(frame)
    return f"mean ± std over {pairs} seed pairs" if pairs > 1 else ""


def facets(frame: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[tuple[str, pd.DataFrame]]:
    """``(label, rows)`` per combination of the varying conditions (one facet if none vary). A
    run that does not read a condition's setting (its value is missing: Hint has no
    ``dm_bn_pass``: :data:`~stitching.results.records.NOT_READ`) is drawn in every facet of that
    condition, beside the runs that do."""
    varying = varying_conditions(frame, exclude)
    if not varying:
        return [("", frame)]
    text = pd.DataFrame({c: condition_text(frame[c]) for c in varying}, index=frame.index)
    groups, placed = [], pd.Series(False, index=frame.index)
    for key, rows in text.groupby(varying, sort=True):  # every combination some run realises
        key = key if isinstance(key, tuple) else (key,)
        if NOT_READ in key:
            continue
        keep = pd.concat([(text[c] == v) | (text[c] == NOT_READ) for c, v in zip(varying, key)], axis=1).all(axis=1)
        placed |= keep
        groups.append((", ".join(f"{c}={v}" for c, v in zip(varying, key)), frame[keep]))
    for key, rows in text[~placed].groupby(varying, sort=True):  # runs no realised combination takes in,
        key = key if isinstance(key, tuple) else (key,)         # beside every run that reads none of their values
        keep = pd.concat([(text[c] == v) | (text[c] == NOT_READ) | (v == NOT_READ) for c, v in zip(varying, key)],
                         axis=1).all(axis=1)
        groups.append((", ".join(f"{c}={v}" for c, v in zip(varying, key) if v != NOT_READ), frame[keep | text.index.isin(rows.index)]))
    return groups


def plotted_metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in METRIC_LABELS if m in frame and frame[m].notna().any()]


def layer_table(frame: pd.DataFrame, metric: str = "test_acc", aggfunc: str = "mean") -> pd.DataFrame:
    """Corresponding-layer runs as a layer × objective table of ``metric`` in percent (the mean
    over seed pairs; ``aggfunc="std"``: their spread). Conditions are never averaged together:
    where they vary, each objective has one column per condition it reads (``dm (dm_samples=100)``)."""
    same = frame[frame.front_layer == frame.end_layer]
    columns = {}
    for label, rows in facets(same):
        for objective in objectives_present(rows):
            own = rows[rows.objective == objective]
            read = [part for part in label.split(", ") if part and own[part.split("=", 1)[0]].astype(str).ne(NOT_READ).all()]
            name = f"{objective} ({', '.join(read)})" if read else objective
            if name not in columns:
                columns[name] = own.groupby("front_layer")[metric].agg(aggfunc) * 100
    table = pd.DataFrame(columns)
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


def diagonal_wins(grid, directional: bool = True, atol: float = 1e-9) -> dict:
    """How often a layer is most similar to itself, with ties kept apart.

    Returns ``rows`` (rows with any value), ``hits`` (rows whose diagonal cell is the
    row's *unique* best), ``ties`` (rows whose diagonal shares the best value, within
    ``atol``, with another cell) and ``share = hits / rows``. A tie is not a hit: in a
    saturated row (every layer at the ceiling) the diagonal is not found, it is merely
    not beaten. Non-directional mode first averages both stitching directions,
    ``(G + Gᵀ) / 2``, as the FuLA paper does.
    """
    g = np.asarray(grid, dtype=float)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise StitchingError(f"self-accuracy needs a square grid, got shape {g.shape}")
    if not directional:
        with warnings.catch_warnings():  # a cell undefined both ways stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            g = np.nanmean(np.stack([g, g.T]), axis=0)
    hits = ties = rows = 0
    for i, row in enumerate(g):
        if np.isnan(row).all():
            continue
        rows += 1
        if np.isnan(row[i]) or row[i] < np.nanmax(row) - atol:
            continue
        others = np.delete(row, i)
        if (others[~np.isnan(others)] >= row[i] - atol).any():
            ties += 1
        else:
            hits += 1
    return {"rows": rows, "hits": hits, "ties": ties, "share": hits / rows if rows else float("nan")}


def self_accuracy(grid, directional: bool = True) -> float:
    """The share of rows whose diagonal cell is the row's unique best (a tie is not a hit;
    :func:`diagonal_wins` counts the ties)."""
    return diagonal_wins(grid, directional)["share"]


SANITY_CHECKS = {"self": "a layer is most similar to itself", "corresponding": "corresponding layers"}


def sanity_checks(frame: pd.DataFrame, metric: str = "score") -> list[dict]:
    """The two sanity checks of Balogh & Jelasity (2025) for every grid in ``frame``.

    A grid compares model A's layers (rows) with model B's (columns). With A = B it checks
    that *a layer is most similar to itself*; with two models of one architecture and task
    (e.g. two seeds) that *corresponding layers* are found. Either way the score is the
    share of rows whose unique best cell is the diagonal; rows where the diagonal only ties
    for the best are not found and are counted in ``ties``. Grids of other pairs, or with
    only the diagonal, have no sanity check.
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
        wins = diagonal_wins(grid.to_numpy())
        if np.isnan(wins["share"]):
            continue
        results.append({"method": key["objective"], "check": SANITY_CHECKS[check], "score": round(wins["share"], 4),
                        "ties": wins["ties"], "layers": len(grid), "arch": rows.front_arch.iloc[0],
                        "front": key["front_model"], "end": key["end_model"],
                        **{k: v for k, v in key.items() if k not in ("objective", "front_model", "end_model")}})
    return results


def sanity_table(results: list[dict]) -> pd.DataFrame:
    """Method (and architecture) × the two checks, each share followed by its tie count."""
    if not results:
        return pd.DataFrame()
    frame = pd.DataFrame(results)
    conditions = [c for c in frame.columns
                  if c not in ("method", "check", "score", "ties", "layers", "arch", "front", "end")]
    frame[conditions] = condition_text(frame[conditions])  # a condition a method lacks reads n/a, not dropped
    index = ["arch", *conditions, "method"]
    table = frame.pivot_table(index=index, columns="check", values="score", aggfunc="mean")
    ties = frame.pivot_table(index=index, columns="check", values="ties", aggfunc="sum")
    for check in list(table.columns):  # a tie is not a hit: the count sits beside each share
        table.insert(table.columns.get_loc(check) + 1, f"{check}: ties", ties[check])
    table.columns.name = None
    order = {name: i for i, name in enumerate(OBJECTIVE_ORDER)}
    return table.sort_index(key=lambda c: c.map(lambda v: order.get(v, len(order))) if c.name == "method" else c)


def layer_grid(frame: pd.DataFrame, objective: str, metric: str = "test_acc", aggfunc: str = "mean") -> pd.DataFrame:
    """Front layer (rows) × end layer (columns) for one objective (mean over seed pairs;
    ``aggfunc="std"``: their spread)."""
    runs = frame[frame.objective == objective]
    grid = runs.pivot_table(index="front_layer", columns="end_layer", values=metric, aggfunc=aggfunc)
    layers = sorted(set(grid.index) | set(grid.columns))
    return grid.reindex(index=layers, columns=layers)


def directions(runs: pd.DataFrame) -> pd.Series:
    """``front → end`` of each run: the architectures, or the given models' names when those vary."""
    named = "front_name" in runs and (runs.front_name.nunique() > 1 or runs.end_name.nunique() > 1)
    front, end = ("front_name", "end_name") if named else ("front_arch", "end_arch")
    return runs[front].astype(str).str.split("/").str[-1] + " → " + runs[end].astype(str).str.split("/").str[-1]


def penalty_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Language-model stitching: mean ± std (count) over seed pairs of the adjusted penalty
    (nats/token; :func:`~stitching.results.records.penalty_metric`), with the mean raw penalty
    and the self-stitch baseline's own penalty beside it (raw = adjusted + self), by layer (rows)
    and direction ``front → end`` (columns), per objective."""
    runs = frame[frame.test_penalty.notna() & (frame.front_layer == frame.end_layer)]
    metric, _ = penalty_metric(runs)
    runs = runs.assign(direction=directions(runs), layer=runs.front_layer.astype(int), shown=runs[metric])
    if metric == "test_penalty":
        return runs.groupby(["objective", "layer", "direction"]).shown.agg(["mean", "std", "count"]).apply(
            lambda r: f"raw {r['mean']:+.3f} ± {_std(r['std']):.3f} ({int(r['count'])})", axis=1).unstack("direction")
    runs = runs.assign(own=runs.test_baseline_loss - runs.test_end_loss)
    stats = runs.groupby(["objective", "layer", "direction"]).agg(
        mean=("shown", "mean"), std=("shown", "std"), count=("shown", "count"), raw=("test_penalty", "mean"),
        own=("own", "mean"))
    cells = stats.apply(lambda r: f"{r['mean']:+.3f} ± {_std(r['std']):.3f} ({int(r['count'])}) "
                                  f"[raw {r['raw']:+.3f}, self {r['own']:+.3f}]", axis=1)
    return cells.unstack("direction")


def _std(value) -> float:
    return 0.0 if pd.isna(value) else float(value)


def differ_in_depth(frame: pd.DataFrame) -> bool:
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


#: how a pair of different models relates under ``groups.members``
RELATIONS = ("within", "between")


def group_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """Corresponding-layer rows of two *different* models whose groups are both known, with
    ``relation`` (within one group, or between two) and ``layer``."""
    if "front_group" not in frame or "end_group" not in frame:
        return frame.iloc[:0]
    rows = frame[frame.front_group.notna() & frame.end_group.notna() & (frame.front_layer == frame.end_layer)
                 & (frame.front_model != frame.end_model) & frame.score.notna()]
    return rows.assign(relation=np.where(rows.front_group == rows.end_group, *RELATIONS),
                       layer=rows.front_layer.astype(int))


def group_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method (objective or index) and layer: the score (higher = more similar: accuracy,
    − penalty, the index) of model pairs within a group and between groups, mean ± std (pairs),
    and the gap within − between (> 0: a group's models are more alike than models across groups)."""
    rows = group_pairs(frame)
    table = []
    for (method, layer), cell in rows.groupby(["objective", "layer"], sort=True):
        parts = {relation: cell[cell.relation == relation].score for relation in RELATIONS}
        gap = parts["within"].mean() - parts["between"].mean()
        table.append({"method": method, "layer": layer,
                      **{relation: f"{s.mean():+.4f} ± {_std(s.std()):.4f} ({len(s)})" if len(s) else "—"
                         for relation, s in parts.items()},
                      "within − between": round(float(gap), 4) if pd.notna(gap) else None})
    return pd.DataFrame(table)
