"""Do similarity measures track function? The sensitivity and
specificity tests of Ding, Denain & Steinhardt (NeurIPS 2021), as used by Balogh & Jelasity (2025),
for stitching objectives and structural indices alike.

Every *item* compares a representation ``A`` (a cut point of some model, possibly truncated to
its top-r principal directions, as ``stitch.front_rank`` does) with a reference ``B`` (a cut
point of the run's end model). Its *functional difference* is ``|probe(A) − probe(B)|``, the gap
in linear-probe test accuracy (:mod:`stitching.probe`); each measure's *dissimilarity* is
``1 − similarity``: one minus the stitched test accuracy of ``A → B`` for an objective, one minus
the index between the two (test images, ``grounding.flatten``) for a structural index. A measure
passes a test to the degree its dissimilarity rises with the functional difference. As Ding et
al. score it, that is the Spearman rank correlation over the items of one reference layer,
averaged over the reference layers (``rho``; the interval resamples items within each reference
layer); ``rho_pooled`` is one correlation over all items at once, kept beside it.

``grounding.flatten=authors`` feeds each index as the TLM-vs-DM authors' similarity function
does: CKA on every feature of an image, the CCA family and the Procrustes distance by ``match``
(positions as samples where the two maps have one shape, else one pooled vector per image).
``sample``, ``pool``, ``match`` or ``positions`` feed every index the same way.

* **sensitivity** — ``A`` is the reference layer itself truncated to each of ``grounding.ranks``
  (ranks at or above the layer's channels are skipped), for every ``grounding.layers``;
* **specificity** — ``A`` is every ``grounding.compare_layers`` cut point of the models of
  ``grounding.seeds`` (``front.seed``; the end model's own seed gives other layers of itself),
  against every reference layer.

:func:`run_tests` writes to its folder: ``grounding.md`` / ``.csv`` (measure × test: ρ, interval, items),
``grounding.png`` (the same with whiskers), ``items.csv`` (every item's functional difference and
dissimilarities), ``grounding.json`` (all of it, settings, timings) and ``stitching/``, one
ordinary run folder per stitch (the stitches of one front model and rank train as the cells of
one grid, in one engine, each recorded as its single run; a stopped test resumes without redoing
them; probes are cached beside the zoo); a failed stitching run is a gap in the table, named in the record.

The command line is ``python -m stitching.grounding`` (:mod:`stitching.grounding`); the claims
check runs the same tests through :func:`run_tests`.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from stitching.errors import StitchingError
from stitching.models import cut
from stitching.models.layout import channels
from stitching.runtime import Stopwatch, versions, write_json_atomic
from stitching.similarity.cka import SimilarityError
from stitching.similarity.grid import AUTHORS_FLATTEN, FLATTEN, INDICES, pair_matrices, parse_indices
from stitching.similarity.uncertainty import bootstrap_interval
from stitching.stitch_layers import head_activations

TESTS = ("sensitivity", "specificity")
STITCHING_OBJECTIVES = ("dm", "hint", "fula", "slm", "tlm")
GROUNDING_FLATTEN = ("authors", *FLATTEN)


@dataclass(frozen=True)
class Item:
    """``A`` = cut point ``front_layer`` of the seed-``front_seed`` model (top-``rank`` directions
    only, ``None``: all) against ``B`` = cut point ``end_layer`` of the end model."""

    test: str
    front_seed: int
    front_layer: int
    end_layer: int
    rank: int | None = None

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}" if self.rank is not None else ""
        return f"s{self.front_seed}-f{self.front_layer}{rank}_e{self.end_layer}"


def sensitivity_items(layers: list[int], ranks: list[int], channels: dict[int, int], seed: int) -> list[Item]:
    """Each reference layer truncated to each rank below its channel count."""
    return [Item("sensitivity", seed, layer, layer, rank) for layer in layers
            for rank in sorted(set(ranks), reverse=True) if rank < channels[layer]]


def specificity_items(layers: list[int], seeds: list[int], compare_layers: list[int]) -> list[Item]:
    """Every compared cut point of every seed's model against each reference layer."""
    return [Item("specificity", seed, other, layer) for layer in layers for seed in seeds for other in compare_layers]


def spearman(a, b) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks (ties share their mean rank)."""
    if len(a) < 3:
        raise SimilarityError("a rank correlation needs at least three items and values that vary")
    ranks_a = pd.Series(np.asarray(a, dtype=float)).rank(method="average").to_numpy()
    ranks_b = pd.Series(np.asarray(b, dtype=float)).rank(method="average").to_numpy()
    ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    scale = np.sqrt((ranks_a ** 2).sum() * (ranks_b ** 2).sum())
    if scale == 0:
        raise SimilarityError("a rank correlation needs at least three items and values that vary")
    return float((ranks_a * ranks_b).sum() / scale)


def layer_correlation(dissimilarity, functional, layers, draws: int = 1000, seed: int = 0) -> dict:
    """Ding et al.'s score: ρ between dissimilarity and functional difference within each
    reference layer's items, averaged over the layers where it is defined (``layers``: each
    item's reference layer); its 95 % percentile bootstrap interval resamples the items within
    each layer. ``rho_pooled``: one ρ over every item, beside it."""
    d, f, g = (np.asarray(v, dtype=float) for v in (dissimilarity, functional, layers))
    keep = np.isfinite(d) & np.isfinite(f)
    d, f, g = d[keep], f[keep], g[keep]
    groups = [np.flatnonzero(g == layer) for layer in np.unique(g)]

    def mean_rho(pick):
        values = []
        for rows in pick:
            try:
                values.append(spearman(d[rows], f[rows]))
            except SimilarityError:  # a layer whose items do not vary: no correlation there
                continue
        return (float(np.mean(values)) if values else float("nan")), len(values)

    rho, scored = mean_rho(groups)
    out = {"rho": rho, "low": float("nan"), "high": float("nan"), "items": int(keep.sum()), "layers": scored,
           "rho_pooled": rank_correlation(d, f, draws=0)["rho"]}
    if draws and np.isfinite(rho):
        generator = np.random.default_rng(seed)
        draws_ = [mean_rho([rows[generator.integers(len(rows), size=len(rows))] for rows in groups])[0]
                  for _ in range(draws)]
        draws_ = np.asarray([v for v in draws_ if np.isfinite(v)])
        if len(draws_) >= max(2, draws // 2):
            out["low"], out["high"] = (float(v) for v in np.percentile(draws_, [2.5, 97.5]))
    return out


def rank_correlation(dissimilarity, functional, draws: int = 1000, seed: int = 0) -> dict:
    """ρ between a measure's dissimilarity and the functional difference over the items where
    both are defined, and its 95 % percentile bootstrap interval over items."""
    d, f = np.asarray(dissimilarity, dtype=float), np.asarray(functional, dtype=float)
    keep = np.isfinite(d) & np.isfinite(f)
    out = {"rho": float("nan"), "low": float("nan"), "high": float("nan"), "items": int(keep.sum())}
    try:
        out["rho"] = spearman(d[keep], f[keep])
        if draws:
            x, y = torch.tensor(d[keep])[:, None], torch.tensor(f[keep])[:, None]
            out["low"], out["high"] = bootstrap_interval(lambda a, b: spearman(a[:, 0], b[:, 0]), x, y, draws, seed=seed)
    except SimilarityError:
        pass
    return out


# -- the run -------------------------------------------------------------------------------
def _settings(settings) -> dict:
    """The ``grounding.*`` settings of a run's :class:`~stitching.build.Settings`, checked."""
    g = copy.deepcopy(settings.config["grounding"])
    tests = list(TESTS) if g["test"] == "both" else [g["test"]]
    if any(test not in TESTS for test in tests):
        raise StitchingError(f"grounding.test={g['test']}: choose sensitivity, specificity or both")
    unknown = [o for o in g["objectives"] if o not in STITCHING_OBJECTIVES]
    if unknown:
        raise StitchingError(f"grounding.objectives: unknown objective {unknown[0]}; choose from "
                             f"{', '.join(STITCHING_OBJECTIVES)}")
    if g["flatten"] not in GROUNDING_FLATTEN:
        raise StitchingError(f"grounding.flatten={g['flatten']}: choose {', '.join(GROUNDING_FLATTEN)}")
    indices = g["indices"] if not isinstance(g["indices"], list) else ",".join(g["indices"])
    indices = parse_indices(indices) if indices else []
    streaming = [name for name in indices if INDICES[name].streaming]
    if streaming:
        raise StitchingError(f"grounding.indices: {streaming[0]} is a streaming estimator; use cka or unbiased_cka")
    for key in ("layers", "ranks", "seeds", "compare_layers"):
        values = g[key]
        if values is not None and (not isinstance(values, list) or not values or
                                   any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)):
            raise StitchingError(f"grounding.{key}={values}: give a non-empty list of non-negative integers")
    if any(rank < 1 for rank in g["ranks"]):
        raise StitchingError("grounding.ranks: ranks start at 1")
    return {**g, "tests": tests, "indices": indices}


class Grounding:
    """Models, probes, test features and stitching runs of one grounding test set-up."""

    def __init__(self, settings, overrides: list[str], out: Path, progress: bool = True):
        from stitching.build import as_settings, build_zoo
        from stitching.probes import build_prober

        self.overrides, self.out, self.progress = list(overrides), out, progress
        self.settings = as_settings(settings)
        self.g = _settings(self.settings)
        front, end = self.settings.front, self.settings.end
        if front.checkpoint or end.checkpoint:
            raise StitchingError("the grounding tests compare zoo models of one family by seed; leave front/end.checkpoint "
                                 "unset")
        if dataclasses.replace(front.spec, seed=0) != dataclasses.replace(end.spec, seed=0):
            raise StitchingError("the grounding tests compare models of one family (front and end differ only in seed); "
                                 "set front and end to the same architecture, width and dataset")
        self.device = self.settings.device
        self.zoo = build_zoo(self.settings)
        self.end_seed = end.spec.seed
        self.models: dict[int, tuple] = {}
        self.prober = build_prober(self.settings)
        self.test_images = self.prober.test_x[: int(self.g["images"])]
        self._features: dict[tuple, torch.Tensor] = {}
        self.failed: list[str] = []

    def model(self, seed: int):
        """``(model, record)`` of the family's seed-``seed`` model (trained into the zoo if missing)."""
        if seed not in self.models:
            self.models[seed] = self.zoo.get(dataclasses.replace(self.settings.end.spec, seed=seed))
        return self.models[seed]

    def cut_points(self) -> int:
        return len(self.model(self.end_seed)[0].cut_points)

    def channels(self, layer: int) -> int:
        c = cut(self.model(self.end_seed)[0], layer)
        return channels(head_activations(c.head, self.test_images[:2], self.device)[0], c.layout)

    def probe(self, seed: int, layer: int, rank: int | None) -> float:
        model, record = self.model(seed)
        return self.prober.accuracy(model, record["key"], layer, rank)["test_acc"]

    def activation(self, seed: int, layer: int, rank: int | None) -> tuple[torch.Tensor, object]:
        """The test images' whole activation at a cut point (projected to ``rank`` directions) and
        its layout; a reference layer's is kept, an item's own is made when it is scored."""
        key = (seed, layer, rank)
        if key in self._features:
            return self._features[key]
        model = self.model(seed)[0].eval().to(self.device)
        c = cut(model, layer)
        projection = self.prober.projection(model, layer, rank)
        a = head_activations(c.head, self.test_images, self.device, 250, transform=projection)[0].cpu()
        if seed == self.end_seed and rank is None:
            self._features[key] = a, c.layout
        return a, c.layout

    def flatten(self, name: str) -> str:
        return AUTHORS_FLATTEN[name] if self.g["flatten"] == "authors" else self.g["flatten"]

    def indices(self, item: Item) -> dict[str, float]:
        """Every structural index of ``A`` and ``B`` (NaN where one cannot be computed)."""
        if not self.g["indices"]:  # stitching alone: no activation is needed
            return {}
        (a, layout_a), (b, layout_b) = (self.activation(item.front_seed, item.front_layer, item.rank),
                                        self.activation(self.end_seed, item.end_layer, None))
        out = {}
        for name in self.g["indices"]:
            try:
                x, y = pair_matrices(a, b, self.flatten(name), layout_a, layout_b)
                out[name] = float(INDICES[name].pair(x.double(), y.double()))
            except SimilarityError:
                out[name] = float("nan")
        return out

    def run_dir(self, objective: str, item: Item) -> Path:
        return self.out / "stitching" / item.test / objective / item.name

    def stitched_accuracies(self, objective: str, items: list[Item], done=None) -> list[float]:
        """Test accuracy of each item's ``A → B`` stitched under ``objective``. The items of one
        front model and rank are the cells of one grid, trained in one engine (a cell's record is
        its own single run's), each in its own run folder; a finished one is read back.
        ``done(count)`` is told as each grid finishes."""
        from stitching.build import compose_config, read_settings
        from stitching.grids import pairs_override, run_grid
        from stitching.runs import ResultExists, config_hash, failure_record, finished_record

        accuracy: dict[Item, float] = {}
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            groups.setdefault((item.front_seed, item.rank), []).append(item)
        for (seed, rank), group in groups.items():
            given = [*self.overrides, f"objective={objective}", f"front.seed={seed}",
                     f"stitch.front_rank={'null' if rank is None else rank}"]
            base = read_settings(compose_config(given))
            folder = {item: self.run_dir(objective, item) for item in group}
            digest = {item: config_hash(base.for_cell(item.front_layer, item.end_layer).config) for item in group}
            todo: dict[tuple[int, int], Item] = {}
            for item in group:
                try:
                    record = finished_record(folder[item], digest[item])
                except ResultExists as err:  # another config's finished result: left as it is, never overwritten
                    self.failed.append(f"{folder[item]}: {err}")
                    record = {"metrics": {"test/acc": float("nan")}}
                if record is None:
                    todo[(item.front_layer, item.end_layer)] = item
                else:
                    accuracy[item] = float(record["metrics"]["test/acc"])
            if todo:
                try:
                    settings = read_settings(compose_config([*given, f"grid.pairs={pairs_override(list(todo))}"]))
                    summary = run_grid(settings, self.out / "stitching" / group[0].test, self.progress,
                                       folders={cell: folder[item] for cell, item in todo.items()})
                    self.failed += [f"{folder[todo[cell]]}: {error}" for cell, error in summary["failed"]]
                except Exception as err:  # a grid that could not run: each of its cells is a gap, named at the end
                    for cell, item in todo.items():
                        failure_record(base.for_cell(*cell), folder[item], err)
                        self.failed.append(f"{folder[item]}: {type(err).__name__}: "
                                           f"{str(err).splitlines()[0] if str(err) else ''}")
                    if not isinstance(err, (StitchingError, RuntimeError, ValueError)):
                        traceback.print_exc()
            for item in todo.values():  # what the grid finished; a failed cell is a gap in the table
                record = finished_record(folder[item], digest[item])
                accuracy[item] = float(record["metrics"]["test/acc"]) if record else float("nan")
            if done is not None:
                done(len(group))
        return [accuracy[item] for item in items]

    def items(self, test: str) -> list[Item]:
        count = self.cut_points()
        layers = self.g["layers"] or list(range(1, count + 1))
        bad = [layer for layer in [*layers, *(self.g["compare_layers"] or [])] if not 1 <= layer <= count]
        if bad:
            raise StitchingError(f"grounding: cut point {bad[0]} is out of range: this model has cut points 1..{count}")
        if test == "sensitivity":
            channels = {layer: self.channels(layer) for layer in layers}
            items = sensitivity_items(layers, self.g["ranks"], channels, self.end_seed)
            advice = (f"give at least three grounding.ranks below each reference layer's channels "
                      f"({', '.join(f'layer {k}: {v}' for k, v in channels.items())})")
        else:
            items = specificity_items(layers, self.g["seeds"], self.g["compare_layers"] or list(range(1, count + 1)))
            advice = "give more grounding.seeds or grounding.compare_layers"
        short = {layer: n for layer in layers if (n := sum(i.end_layer == layer for i in items)) < 3}
        if short:  # ρ is taken per reference layer, and a rank correlation of fewer items is none
            layer, n = next(iter(short.items()))
            raise StitchingError(f"grounding: the {test} test has {n} item(s) for reference layer {layer} and a rank "
                                 f"correlation needs at least three per reference layer; {advice}")
        return items


def run_tests(settings, overrides: list[str], out: Path, progress: bool = True) -> dict:
    """Both tests (or the one asked for); writes every output and returns the record
    (``settings``: the run's :class:`~stitching.build.Settings`, or its config)."""
    watch = Stopwatch()
    grounding = Grounding(settings, overrides, out, progress)
    g = grounding.g
    plan = {test: grounding.items(test) for test in g["tests"]}
    runs = sum(len(items) for items in plan.values()) * len(g["objectives"])
    print(f"grounding: {', '.join(f'{test} {len(items)} items' for test, items in plan.items())}; "
          f"{runs} stitching runs ({', '.join(g['objectives'])}), indices {', '.join(g['indices']) or 'none'}")
    rows = []
    for test, items in plan.items():
        with watch.section("probes_s"):
            reference = {layer: grounding.probe(grounding.end_seed, layer, None) for layer in {i.end_layer for i in items}}
            probes = [grounding.probe(i.front_seed, i.front_layer, i.rank)
                      for i in tqdm(items, desc=f"{test}: probes", disable=not progress, leave=False)]
        with watch.section("indices_s"):
            values = [grounding.indices(i) for i in tqdm(items, desc=f"{test}: indices", disable=not progress,
                                                          leave=False)]
            scores = {name: [v[name] for v in values] for name in g["indices"]}
        with watch.section("stitching_s"):
            bar = tqdm(total=len(items) * len(g["objectives"]), desc=f"{test}: stitching", disable=not progress)
            for objective in g["objectives"]:
                scores[objective] = grounding.stitched_accuracies(objective, items, bar.update)
            bar.close()
        for k, item in enumerate(items):
            rows.append({**dataclasses.asdict(item), "probe": probes[k], "reference_probe": reference[item.end_layer],
                         "functional": abs(probes[k] - reference[item.end_layer]),
                         **{name: 1.0 - values[k] for name, values in scores.items()}})
    frame = pd.DataFrame(rows)
    measures = [*g["objectives"], *g["indices"]]
    table = pd.DataFrame([{"test": test, "measure": measure, **layer_correlation(
        part[measure], part["functional"], part["end_layer"], int(g["bootstrap"]), grounding.settings.seed)}
        for test, part in frame.groupby("test", sort=False) for measure in measures])
    record = _write(out, frame, table, measures, grounding, watch)
    return record


def measure_label(name: str) -> str:
    return name.upper() if name in STITCHING_OBJECTIVES else INDICES[name].label


def _write(out: Path, frame: pd.DataFrame, table: pd.DataFrame, measures: list[str], grounding: Grounding,
           watch: Stopwatch) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "items.csv", index=False)
    table.to_csv(out / "grounding.csv", index=False)
    lines = ["# Grounding similarity in function", "",
             f"Reference: {grounding.model(grounding.end_seed)[1]['key']}; functional difference = |Δ linear-probe test "
             f"accuracy|; ρ = Spearman correlation of each measure's dissimilarity with it over the items of one "
             f"reference layer, averaged over the reference layers (Ding et al.; 95 % bootstrap interval, items "
             f"resampled within each layer, {grounding.g['bootstrap']} resamples); pooled ρ: one correlation over "
             f"all items. Indices on {grounding.g['images']} test images, flatten={grounding.g['flatten']}"
             f"{' (CKA per image, the CCA family and Procrustes by match)' if grounding.g['flatten'] == 'authors' else ''}. "
             f"Higher is better.", ""]
    for test, part in table.groupby("test", sort=False):
        lines += [f"## {test} ({int(part['items'].max())} items)", "",
                  "| measure | ρ | 95 % interval | reference layers | pooled ρ | items |", "|---|---|---|---|---|---|"]
        lines += [f"| {measure_label(r.measure)} | {_fmt(r.rho)} | [{_fmt(r.low)}, {_fmt(r.high)}] | {r.layers} | "
                  f"{_fmt(r.rho_pooled)} | {r.items} |" for r in part.itertuples()]
        lines.append("")
    if grounding.failed:
        lines += ["## failed stitching runs", "", *[f"* {line}" for line in grounding.failed], ""]
    (out / "grounding.md").write_text("\n".join(lines))
    _plot(table, measures, out / "grounding.png")
    record = {"settings": {k: v for k, v in grounding.g.items()}, "reference": grounding.model(grounding.end_seed)[1]["key"],
              "models": {seed: record["key"] for seed, (_, record) in grounding.models.items()},
              "correlations": table.to_dict(orient="records"), "items": frame.to_dict(orient="records"),
              "failed": grounding.failed, "timings": watch.report(), "versions": versions(),
              "config": grounding.settings.config}
    write_json_atomic(out / "grounding.json", record)
    return record


def _fmt(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:+.2f}"


def _plot(table: pd.DataFrame, measures: list[str], path: Path) -> None:
    from stitching.results.figures import pyplot, save_figure

    plt = pyplot()
    tests = list(dict.fromkeys(table["test"]))
    fig, axes = plt.subplots(1, len(tests), figsize=(4.6 * len(tests), 0.45 * len(measures) + 1.4), squeeze=False,
                             sharey=True)
    for ax, test in zip(axes[0], tests):
        part = table[table["test"] == test].set_index("measure").reindex(measures)
        y = np.arange(len(measures))[::-1]
        low = (part["rho"] - part["low"]).clip(lower=0).fillna(0)
        high = (part["high"] - part["rho"]).clip(lower=0).fillna(0)
        colours = ["tab:blue" if m in STITCHING_OBJECTIVES else "tab:orange" for m in measures]
        ax.errorbar(part["rho"], y, xerr=[low, high], fmt="none", ecolor="grey", capsize=3)
        ax.scatter(part["rho"], y, c=colours, zorder=3)
        ax.axvline(0, color="black", lw=0.6)
        ax.set(xlim=(-1.05, 1.05), xlabel="Spearman ρ per reference layer, mean:\ndissimilarity vs Δ probe accuracy",
               title=test)
        ax.set_yticks(y, [measure_label(m) for m in measures])
    save_figure(plt, fig, path)
