"""``python -m stitching.claims`` — the papers' qualitative claims, each checked by one experiment.

Every claim is measured once per seed pair (``claims.seed_pairs`` replicates: a model against
itself, ``(s, s)``, or two models, ``(2s, 2s + 1)`` (``(2s + 1, 2s)`` where the odd seed's model is
the front): disjoint pairs, every model trained from its own seed, so the replicates are
independent) as a signed *effect*, positive in the claim's direction. Its verdict
(:func:`verdict`) is a one-sided one-sample t-test of the mean effect at level ``claims.alpha``
(0.05), with the two-sided 95 % confidence interval beside it:

* **holds** — at least ``claims.min_pairs`` pairs and the mean effect is above zero (p < alpha);
* **does not hold** — at least that many pairs and the mean effect is below zero (the reverse
  test, p < alpha), or no pair shows any effect at all (every effect ≤ 0 and all equal);
* **inconclusive** — otherwise: the interval holds zero, too few pairs were measured, or every
  pair gave the same positive effect (no spread: a measure at its bound in every pair, as a share
  of rows of 1.00; a t-test needs a spread, and an exact sign test of n pairs cannot go below
  0.5ⁿ, which three pairs leave at 0.125);
* **one set of models: descriptive only** — a claim on pretrained models that exist once (Pythia,
  one model per size; TransformerLens' own GeLU/SoLU models): run once, its effect described,
  never tested;
* **not run** — its pretrained hub models are not named (the offline presets), said with the reason.

Claims about the instrument itself (a DM stitch of a model into itself keeps its accuracy) are
checked the same way but reported apart, as instrument checks, never counted as paper claims.

Each claim's setting is fixed before any outcome is seen and written next to it
(``claims.md``); a claim whose runs failed or are missing is inconclusive with the reason.

Writes to ``--out``: ``claims.md`` and ``claims.html`` (the table, the settings, the training-loss
curves, one figure per claim inline), ``claims.json`` (every effect per seed pair, settings,
timings) and one ordinary run folder per experiment under ``runs/`` (``stitching.report`` reads
them; a stopped check resumes without redoing a finished cell). Exits non-zero after writing
everything if a run failed.

Example: ``python -m stitching.claims experiment=claims_small`` (``make claims-small``).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from stitching.errors import StitchingError, exit_on_user_error, on_interrupt
from stitching.files import hold_folder
from stitching.runtime import Stopwatch, versions, write_json_atomic
from stitching.similarity.grid import AUTHORS_FLATTEN, INDICES
from stitching.validation import DECAY_ONSET

#: the CKA claim's structural indices (the TLM-vs-DM paper's sanity checks: CKA, PWCCA, OPD)
SIMILARITY_INDICES = ("cka", "pwcca", "procrustes")
SIMILARITY_NAMES = {"cka": "CKA", "pwcca": "PWCCA", "procrustes": "OPD"}

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
#: a claim measured on one set of pretrained models (no replicate to test over), and one whose models are not named
DESCRIBED, NOT_RUN = "one set of models: descriptive only", "not run"
TRAINED = ("hint", "fula", "slm", "tlm")
_NAMES = {"dm": "DM", "hint": "Hint", "fula": "FuLA", "slm": "SLM", "tlm": "TLM"}


# -- the verdict ---------------------------------------------------------------------------
#: the level of the claims' one-sided test (``claims.alpha``)
ALPHA = 0.05


#: the power at which :func:`verdict` states the smallest effect the design could detect
POWER = 0.8


def verdict(effects: list[float], min_pairs: int = 3, alpha: float = ALPHA, margin: float | None = None) -> dict:
    """``{"verdict", "mean", "std", "pairs", "p_value", "ci95", "bound", "detectable", "why"}`` of one
    claim's effects (one per seed pair, positive in the claim's direction): a one-sided
    one-sample t-test of mean > 0 (``p_value``), the two-sided 95 % t interval of the mean
    (``ci95``), and ``bound``, the one-sided (1 − alpha) bound that decides the verdict: the lower
    bound when the mean is at or above zero (the claim holds exactly when it is above zero), else
    the upper one (the reverse test rejects exactly when it is below zero). ``std`` is the sample
    standard deviation over pairs. It does not hold when the
    reverse test rejects, or when the whole interval lies within ``±margin`` (an effect too small
    to matter); ``detectable`` is the smallest mean effect this test finds with probability
    :data:`POWER` at the observed spread, (t₁₋α + t_power) · std / √n."""
    from scipy import stats

    values = np.asarray([e for e in effects if e is not None and np.isfinite(e)], dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    out = {"mean": mean, "std": std, "pairs": n, "p_value": float("nan"), "ci95": [float("nan"), float("nan")],
           "bound": float("nan"), "detectable": float("nan"), "margin": margin}
    if n < min_pairs:
        return {**out, "verdict": UNSURE, "why": f"{n} seed pair(s) measured, {min_pairs} needed"}
    if np.ptp(values) <= 1e-9 * max(1.0, abs(mean)):  # every replicate the same (to rounding): nothing to test
        if mean <= 0:
            return {**out, "verdict": FAILS, "why": "no pair shows the effect"}
        return {**out, "verdict": UNSURE, "why": f"every pair gave the same effect ({mean:+.3f}): no spread to test "
                                                 "against (the replicates are not independent, the same models, or the "
                                                 "measure sits at its bound in every pair, a share of 1.00)"}
    error = std / np.sqrt(n)
    t = mean / error
    half = float(stats.t.ppf(0.975, n - 1) * error)
    detectable = float((stats.t.ppf(1 - alpha, n - 1) + stats.t.ppf(POWER, n - 1)) * error)
    one_sided = float(stats.t.ppf(1 - alpha, n - 1) * error)
    bound = mean - one_sided if mean >= 0 else mean + one_sided
    out.update(p_value=float(stats.t.sf(t, n - 1)), ci95=[mean - half, mean + half], bound=bound,
               detectable=detectable)
    where = (f"one-sided t-test p = {out['p_value']:.3g}, one-sided {(1 - alpha) * 100:g} % bound {bound_text(out)}, "
             f"95 % CI [{mean - half:+.3f}, {mean + half:+.3f}]; detectable: {detectable:.3f}")
    if out["p_value"] < alpha:
        return {**out, "verdict": HOLDS, "why": f"mean effect above zero ({where})"}
    if float(stats.t.cdf(t, n - 1)) < alpha:
        return {**out, "verdict": FAILS, "why": f"mean effect below zero ({where})"}
    if margin is not None and -margin < mean - half and mean + half < margin:
        return {**out, "verdict": FAILS, "why": f"the interval lies within ±{margin:g}, the claim's equivalence margin: "
                                                f"no effect of a size that matters ({where})"}
    return {**out, "verdict": UNSURE, "why": f"the interval holds zero ({where})"}


def bound_text(result: dict) -> str:
    """The one-sided bound of :func:`verdict` as read: ``≥ lower`` or ``≤ upper`` (empty when untested)."""
    bound = result.get("bound", float("nan"))
    if bound is None or not np.isfinite(bound):
        return ""
    return f"≥ {bound:+.3f}" if result["mean"] >= 0 else f"≤ {bound:+.3f}"


# -- experiments ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One grid (``kind="grid"``) or similarity grid (``"similarity"``) of one seed pair."""

    experiment: str
    pair: tuple[int, int]
    tag: str
    overrides: tuple[str, ...]
    kind: str = "grid"

    def folder(self, root: Path) -> Path:
        return root / "runs" / self.experiment / f"seeds{self.pair[0]}-{self.pair[1]}" / self.tag


def seed_pairs(count: int, pairing: str, first: int | None = None) -> list[tuple[int, int]]:
    """``count`` independent replicate pairs: ``(s, s)`` for a model against itself, else
    ``(2s, 2s + 1)``: disjoint pairs, no model in two of them. ``fresh``: a model against itself,
    from seeds no other experiment uses (``first`` on, by default ``2·count``), for a confirmatory
    replicate on models whose results were never seen. ``reversed``: the same two models as
    ``(2s + 1, 2s)``, the front from the odd seed (whose robust model the robust-end claims train).
    ``one``: a single set of pretrained models, ``[(0, 0)]``: descriptive, never tested. ``trained``: as
    ``two`` here; :func:`experiment_pairs` makes it ``one`` where the models are pretrained ones named
    by their library (``claims.language_key=name``), which a seed does not change."""
    if pairing == "self":
        return [(s, s) for s in range(count)]
    if pairing == "one":  # one set of pretrained models: no replicate
        return [(0, 0)]
    if pairing == "trained":
        pairing = "two"
    if pairing == "fresh":
        start = 2 * count if first is None else first
        return [(start + s, start + s) for s in range(count)]
    if pairing == "reversed":
        return [(2 * s + 1, 2 * s) for s in range(count)]
    return [(2 * s, 2 * s + 1) for s in range(count)]


def experiment_pairs(settings: DictConfig, pairing: str) -> list[tuple[int, int]]:
    """The seed pairs of an experiment of this pairing: ``claims.seed_pairs`` of them, or for the
    confirmatory (``fresh``) ones ``claims.confirm_pairs`` models from seed ``claims.confirm_seed`` on
    (null: as many as the others, from the first seed they leave unused). A ``trained`` experiment on
    pretrained models named by their library (``claims.language_key=name``: the same models whatever
    the seed) is one set, ``[(0, 0)]``: no replicate, described and never tested."""
    count = int(settings.seed_pairs)
    if pairing == "trained" and settings.get("language_key") == "name":
        return seed_pairs(count, "one")
    if pairing != "fresh":
        return seed_pairs(count, pairing)
    confirm, first = settings.get("confirm_pairs"), settings.get("confirm_seed")
    return seed_pairs(count if confirm is None else int(confirm), pairing, 2 * count if first is None else int(first))


def _pairs(cells: list[tuple[int, int]]) -> str:
    return "grid.pairs=[" + ",".join(f"[{i},{j}]" for i, j in cells) + "]"


def _diagonal(c) -> str:
    return _pairs([(k, k) for k in c.layers])


def _grid_layers(c) -> list[int]:
    return list(c.grid_layers if c.get("grid_layers") is not None else c.layers)


def _random_epochs(c) -> list[str]:
    """A random start's stitching epochs (``claims.random_start_epochs``; null: the preset's)."""
    return [] if c.get("random_start_epochs") is None else [f"trainer.max_epochs={int(c.random_start_epochs)}"]


def _confirm_layers(c) -> list[int]:
    return list(c.confirm_layers if c.get("confirm_layers") is not None else _grid_layers(c))


def _square(c, layers: list[int] | None = None) -> str:
    layers = _grid_layers(c) if layers is None else layers
    return _pairs([(i, j) for i in layers for j in layers])


def _tlm_random(c, square: str) -> tuple[str, list[str], str]:
    """The job of TLM started from a random map (the TLM-vs-DM authors' start) on ``square``."""
    return "tlm_random", ["objective=tlm", "stitch.init=random", *_random_epochs(c), square], "grid"


def _alpha1_layers(c) -> list[int]:
    """The layers of the robust end's α = 1 Hint/FuLA jobs: the deep ones and the penultimate."""
    return sorted({*map(int, c.deep_layers), int(c.penultimate_layer)})


def _decay_jobs_layers(c) -> list[int]:
    """The layers of the Fig. 6 jobs (last-hint FuLA into the robust and the plain end): the decay's
    layers and the penultimate one, where the CKA row looks for the least similar cell."""
    return sorted({*map(int, c.decay_layers), int(c.penultimate_layer)})


def _last_hint(c, front_robust: bool, end_robust: bool) -> tuple[list[str], str]:
    """A Fig. 6 job: FuLA with the last hint alone, α = 1, at the decay's layers and the penultimate
    one, with the CKA of its DM start against the end on adversarial examples."""
    return (["objective=fula", "objective.weights=last", f"front.robust={str(front_robust).lower()}",
             f"end.robust={str(end_robust).lower()}", f"attack={c.robust_attack}", "attack.alpha=1",
             "evaluation.penultimate_cka=true", _pairs([(k, k) for k in _decay_jobs_layers(c)])], "grid")


def _single(c) -> str:
    return _pairs([(c.layer, c.layer)])


def _listed(values) -> str:
    return "null" if values is None else "[" + ",".join(str(v) for v in values) + "]"


def _grounding(c, pair) -> list[tuple[str, list[str], str]]:
    """The Ding et al. tests of one seed pair: DM, and TLM from a random map (the TLM-vs-DM
    authors' start), each a grounding job of its own (no structural index)."""
    g = c.grounding
    common = [*g.stitch, f"grounding.layers={_listed(g.layers)}", f"grounding.ranks={_listed(g.ranks)}",
              f"grounding.compare_layers={_listed(g.compare_layers)}", "grounding.test=both", "grounding.indices=null"]
    return [("dm", [*common, "grounding.objectives=[dm]"], "grounding"),
            ("tlm_random", [*common, "grounding.objectives=[tlm]", "stitch.init=random", *_random_epochs(c)],
             "grounding")]


def _bert_layers(c) -> list[int]:
    return sorted({*c.bert.early_layers, *c.bert.later_layers})


#: the four model pairs of one BERT replicate: (tag, front group, end group); the replicate's two models of
#: each group are members 2s (a front) and 2s + 1 (an end), so every front and every end is stitched once
#: within its group and once across (their own losses cancel in between − within)
BERT_PAIRS = (("within_generalising", "generalising", "generalising"), ("within_heuristic", "heuristic", "heuristic"),
              ("between_gh", "generalising", "heuristic"), ("between_hg", "heuristic", "generalising"))


def _bert(c, pair) -> list[tuple[str, list[str], str]]:
    """One replicate of the BERT-group claims: the four pairs of :data:`BERT_PAIRS` stitched at every
    chosen residual stream, and the minibatch CKA of each (token positions as samples)."""
    (a, b), groups = pair, c.bert
    jobs = []
    for tag, front, end in BERT_PAIRS:
        models = [*groups.preset, f"front.name={groups[front][a]}", f"end.name={groups[end][b]}",
                  f"dataset.tokenizer={groups.generalising[0]}"]  # one tokenizer: the groups are one architecture
        jobs.append((tag, [*models, _pairs([(k, k) for k in _bert_layers(c)])], "grid"))
        jobs.append((f"cka_{tag}", [*models, "similarity.index=minibatch_cka", "similarity.flatten=positions",
                                    f"similarity.layers={_listed(_bert_layers(c))}"], "lm_similarity"))
    return jobs


def _pythia_pairs(c) -> list[tuple[str, str]]:
    """The model pairs the Pythia claims read, each once: every two models up to 1B, every two of the
    outlier's neighbours, and the outlier with each neighbour."""
    p = c.pythia
    small, near = list(p.up_to_1b), list(p.neighbours)
    wanted = [*((x, y) for i, x in enumerate(small) for y in small[i + 1:]),
              *((x, y) for i, x in enumerate(near) for y in near[i + 1:]), *((x, p.outlier) for x in near)]
    return list(dict.fromkeys(wanted))


def _pythia_tag(front: str, end: str) -> str:
    return f"{front.rsplit('/', 1)[-1]}__{end.rsplit('/', 1)[-1]}"


#: experiment → (pairing, its jobs for one seed pair ``(a, b)``: ``[(tag, overrides, kind)]``)
EXPERIMENTS: dict[str, tuple[str, Callable[[DictConfig, tuple[int, int]], list[tuple[str, list[str], str]]]]] = {
    "dm_self": ("self", lambda c, _: [("dm", ["objective=dm", "trainer.max_epochs=0", _diagonal(c)], "grid")]),
    "diagonal": ("two", lambda c, _: [(o, [f"objective={o}", _diagonal(c)], "grid") for o in ("dm", *TRAINED)]),
    "dm_stats": ("two", lambda c, _: [(f"dm_pass_{p}", ["objective=dm", f"stitch.dm_bn_pass={p}", _diagonal(c)], "grid")
                                   for p in ("false", "true")]),
    "robustness": ("two", lambda c, _: [(o, [f"objective={o}", f"attack={c.robust_attack}", "attack.alpha=1", _single(c)],
                                      "grid")
                                     for o in TRAINED]),
    # FuLA Sec. 3.1: a non-robust front (seed 2s) into a robust end (seed 2s + 1, zoo.recipe.robust), robust accuracy
    # by claims.robust_attack; α = 0 (Fig. 4's first row) at the corresponding layers, α = 1 (Hint, FuLA) at the deep ones
    "robust_end": ("two", lambda c, _: [*((f"{o}_alpha0", [f"objective={o}", "end.robust=true", f"attack={c.robust_attack}",
                                                         "attack.alpha=0", _diagonal(c)], "grid") for o in TRAINED),
                                     *((f"{o}_alpha1", [f"objective={o}", "end.robust=true", f"attack={c.robust_attack}",
                                                        "attack.alpha=1", _pairs([(k, k) for k in _alpha1_layers(c)])],
                                        "grid") for o in ("hint", "fula")),
                                     # Fig. 6: FuLA with the last hint alone, α = 1, into the robust and the plain end,
                                     # and from the robust model of seed 2s into the robust end (both robust)
                                     *((tag, *_last_hint(c, front_robust, end_robust))
                                       for tag, front_robust, end_robust in (("fula_last_robust", False, True),
                                                                             ("fula_last_plain", False, False),
                                                                             ("fula_last_both", True, True)))]),
    # Sec. 3.1's reverse configuration: a robust front (seed 2s + 1, the robust-end claims' robust model) into a
    # non-robust end (seed 2s), every objective with adversarial data (α = 1) at claims.layer, and without it (α = 0)
    "robust_front": ("reversed", lambda c, _: [*((o, [f"objective={o}", "front.robust=true", f"attack={c.robust_attack}",
                                                   "attack.alpha=1", _single(c)], "grid") for o in TRAINED),
                                            # Fig. 4's first row in this configuration: α = 0 at the corresponding layers
                                            *((f"{o}_alpha0", [f"objective={o}", "front.robust=true",
                                                               f"attack={c.robust_attack}", "attack.alpha=0",
                                                               _diagonal(c)], "grid") for o in TRAINED),
                                            # Fig. 6 in this configuration: last-hint FuLA, robust → plain
                                            ("fula_last", *_last_hint(c, True, False))]),
    "shortcut": ("two", lambda c, _: [(o, [f"objective={o}", "shortcut=pixels", f"shortcut.placement={c.shortcut}",
                                        _single(c)], "grid") for o in TRAINED]),
    # Fig. 8's cross-task remark: location markers, Hint/FuLA at the deep layers, a front of another task against
    # one of the end's own task (the cross-task pair's end), both into the same end
    "shortcut_cross": ("two", lambda c, _: [(f"{o}_{task}", [f"objective={o}", "shortcut=pixels",
                                                          "shortcut.placement=location",
                                                          *([f"front.dataset={c.cross_front}"] if task == "cross" else []),
                                                          _pairs([(k, k) for k in c.deep_layers])], "grid")
                                         for o in ("hint", "fula") for task in ("cross", "same")]),
    "subset": ("two", lambda c, _: [(o, [f"objective={o}", f"dataset.num_classes_train={c.classes_train}", _single(c)],
                                  "grid") for o in TRAINED]),
    # Fig. 9 proper: cross-task, a front trained on another dataset (seed 2s) into the end (seed 2s + 1)
    "subset_cross": ("two", lambda c, _: [(o, [f"objective={o}", f"front.dataset={c.cross_front}",
                                            f"dataset.num_classes_train={c.classes_train}", _single(c)], "grid")
                                       for o in TRAINED]),
    # the FuLA paper's grids start every trained stitch at DM; the TLM-vs-DM paper's TLM starts from a random map
    "self_grids": ("self", lambda c, _: [*((o, [f"objective={o}", _square(c)], "grid") for o in ("dm", "hint", "fula", "tlm")),
                                      _tlm_random(c, _square(c))]),
    # the DM-vs-random-start-TLM self grid again, on fresh models and claims.confirm_layers, fixed before it ran
    "self_grids_fresh": ("fresh", lambda c, _: [("dm", ["objective=dm", _square(c, _confirm_layers(c))], "grid"),
                                             _tlm_random(c, _square(c, _confirm_layers(c)))]),
    "deeper_hints": ("two", lambda c, _: [(w.replace(":", ""), ["objective=fula", f"objective.weights={w}", _square(c)],
                                        "grid") for w in ("first", c.deeper_weights)]),
    "ood": ("two", lambda c, _: [(o, [f"objective={o}", "evaluation.ood.enabled=true", _diagonal(c)], "grid")
                              for o in ("dm", "tlm")]),
    "similarity": ("two", lambda c, _: [("cka_pwcca_opd", [], "similarity")]),
    # Ding et al.'s sensitivity and specificity tests: the end (seed 2s + 1) is the reference
    "grounding": ("two", _grounding),
    # all four directions, fronts of seed 2s into ends of seed 2s + 1: a SoLU and a GeLU front into the same end;
    # TransformerLens' own gelu-2l/solu-2l (paper size) are one set of models, whatever the seed
    "language": ("trained", lambda c, _: [(f"{a}_{b}", [*c.language, f"front.{c.language_key}={a}",
                                                 f"end.{c.language_key}={b}", "grid.pairs=diagonal"], "grid")
                                   for a in c.language_models for b in c.language_models]),
    # the LM paper's Sec. 4: generalising vs heuristic MNLI BERTs, replicate s = members 2s, 2s + 1 of each group
    "bert_groups": ("two", _bert),
    # its Sec. 5: CKA between Pythia sizes at corresponding relative depths; one model per size, one replicate
    "pythia": ("one", lambda c, _: [(_pythia_tag(x, y), [*c.pythia.preset, f"front.name={x}", f"end.name={y}"],
                                        "lm_similarity") for x, y in _pythia_pairs(c)]),
}

#: experiments run on their own language-model presets: of the claims' base overrides they take only where files
#: go and how to train
LANGUAGE = frozenset({"language", "bert_groups", "pythia"})


def rank_berts(c: DictConfig, base: list[str], out: Path, progress: bool = True) -> dict:
    """The BERT groups by the paper's rule, where ``claims.bert.candidates`` names the models to rank
    and the groups are not named: every candidate's accuracy on the challenge set (HANS lexical
    overlap) and the test split; the ``2 · claims.seed_pairs`` most accurate on the challenge set are
    the generalising group, as many least accurate the heuristic one (ties: the candidates' order),
    each group in the candidates' order. Kept in ``<out>/bert_ranking.json`` (its request beside it:
    other candidates or another preset rank again); returns ``{"scores", "generalising", "heuristic"}``."""
    from tqdm.auto import tqdm

    from stitching.build import build_datamodule, build_zoo, compose_config, read_settings
    from stitching.evaluate import pair_metrics

    names, count = [str(n) for n in c.bert.candidates], 2 * int(c.seed_pairs)
    if len(names) < 2 * count:
        raise StitchingError(f"claims.bert.candidates names {len(names)} models; {2 * count} are needed "
                             f"({count} per group, two per replicate of claims.seed_pairs={int(c.seed_pairs)})")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bert_ranking.json"
    request = {"preset": list(c.bert.preset), "tokenizer": names[0], "candidates": names, "per_group": count}
    held = json.loads(path.read_text()) if path.is_file() else {}
    # a candidate's scores hold for the same preset and tokenizer, whatever else was ranked beside it
    was = held.get("request") or {}
    same = all(was.get(k) == request[k] for k in ("preset", "tokenizer"))
    scores = dict(held.get("scores") or {}) if same else {}
    common = [*(o for o in base if o.startswith(("paths.", "trainer", "+trainer"))), *c.bert.preset,
              f"dataset.tokenizer={request['tokenizer']}"]
    datamodule = None
    for name in tqdm(names, desc="ranking the BERTs", disable=not progress):
        if name in scores:
            continue
        settings = read_settings(compose_config([*common, f"model.name={name}", f"front.name={name}",
                                                 f"end.name={name}"]))
        if datamodule is None:  # one tokenizer, one set of data for every candidate
            datamodule = build_datamodule(settings)
            datamodule.setup()
        if datamodule.challenge_set() is None:
            raise StitchingError(f"{' '.join(c.bert.preset)} has no challenge set to rank the BERTs by; set "
                                 "dataset.challenge")
        model, _ = build_zoo(settings).get(settings.front.spec, settings.front.checkpoint)
        _, base_metrics = pair_metrics(model, {"front": model}, datamodule, settings.device)
        if "front" not in base_metrics:
            raise StitchingError(f"{name} is not a classifier of the {datamodule.num_classes} labels of "
                                 f"{' '.join(c.bert.preset)}")
        challenge = f"{(datamodule.challenge or {}).get('name', 'challenge')}_acc"
        scores[name] = {"challenge_acc": base_metrics["front"][challenge], "test_acc": base_metrics["front"]["test_acc"]}
        write_json_atomic(path, {"request": request, "scores": scores})
    order = sorted(names, key=lambda n: -scores[n]["challenge_acc"])  # stable: ties keep the candidates' order
    top, bottom = set(order[:count]), set(order[len(order) - count:])
    ranking = {"request": request, "scores": scores, "generalising": [n for n in names if n in top],
               "heuristic": [n for n in names if n in bottom]}
    write_json_atomic(path, ranking)
    return ranking


def unavailable(experiment: str, c: DictConfig, ranked: bool = True) -> str | None:
    """Why ``experiment`` cannot run under these settings (its models are not named: pretrained hub
    models the offline presets leave out), or None; BERT candidates not yet ranked into groups count
    as named unless ``ranked`` (the groups themselves) is asked for."""
    if experiment == "bert_groups" and not (c.bert.generalising and c.bert.heuristic) and c.bert.get("candidates"):
        return "claims.bert.candidates are not ranked yet (python -m stitching.claims ranks them first)" if ranked \
            else None
    if experiment == "bert_groups" and not (c.bert.generalising and c.bert.heuristic):
        return ("claims.bert.generalising and claims.bert.heuristic name no models (MNLI BERTs from the hub; "
                "`make claims` names them)")
    if experiment == "pythia" and not (c.pythia.up_to_1b and c.pythia.outlier and c.pythia.neighbours):
        return "claims.pythia names no models (Pythia from the hub; `make claims` names them)"
    return None


def plan(settings: DictConfig, names: list[str]) -> list[Job]:
    """Every job the named claims need, each experiment once. ``claims.adversarial_images`` sets
    the stitching images of every job that stitches on adversarial examples (``attack.alpha`` > 0); ``claims.extra`` then adds overrides
    to one experiment's runs: a list for all its jobs, or ``{tag: list}`` for some."""
    experiments = [e for e in dict.fromkeys(e for name in names for e in CLAIMS[name].experiments)
                   if unavailable(e, settings) is None]
    unknown = sorted(set(settings.get("extra") or {}) - set(EXPERIMENTS))
    if unknown:
        raise StitchingError(f"claims.extra names unknown experiment '{', '.join(unknown)}'; choose from "
                             f"{', '.join(EXPERIMENTS)}")
    jobs, adversarial = [], settings.get("adversarial_images")
    for experiment in experiments:
        pairing, make = EXPERIMENTS[experiment]
        given = (settings.get("extra") or {}).get(experiment) or []
        pairs = experiment_pairs(settings, pairing)
        tags = [tag for tag, _, _ in make(settings, pairs[0])]
        per_job = OmegaConf.is_dict(given) or isinstance(given, dict)  # {tag: [overrides]}
        if not per_job and not (OmegaConf.is_list(given) or isinstance(given, (list, tuple))):
            raise StitchingError(f"claims.extra.{experiment}={given}: give a list of overrides "
                                 f"(+claims.extra.{experiment}=\"['key=value']\") or {{job: [overrides]}}")
        if per_job:
            unknown = sorted(set(given) - set(tags))
            if unknown:
                raise StitchingError(f"claims.extra.{experiment} names unknown job '{', '.join(unknown)}'; its jobs "
                                     f"are {', '.join(tags)}")
        for a, b in pairs:
            for tag, overrides, kind in make(settings, (a, b)):
                extra = [*_adversarial_subset(overrides, adversarial), *((given.get(tag) or []) if per_job else given)]
                jobs.append(Job(experiment, (a, b), tag, (*overrides, *extra, f"front.seed={a}", f"end.seed={b}"),
                                kind))
    return jobs


def _adversarial_subset(overrides, images: int | None) -> list[str]:
    """The stitching-set override of a job that stitches on adversarial examples: its last
    ``attack.alpha`` above 0, however written (``1``, ``1.0``, ``0.5``)."""
    alphas = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "attack.alpha"]
    return [f"dataset.train_subset={images}"] if images is not None and alphas and float(alphas[-1]) > 0 else []


def job_overrides(job: Job, base: list[str]) -> list[str]:
    """The whole command line of ``job``: the base overrides, then the job's own."""
    if job.experiment in LANGUAGE:  # its own preset: of the base only where files go and how to train
        base = [o for o in base if o.startswith(("paths.", "trainer", "logger", "+trainer"))]
    overrides = [*base, *job.overrides]
    if job.kind == "grounding":  # the pair's two models are the compared ones, the end the reference
        overrides.append(f"grounding.seeds={_listed(job.pair)}")
    return overrides


def run_job(job: Job, base: list[str], root: Path, progress: bool) -> list[str]:
    """Train (or read back) one job's cells; return what failed."""
    from stitching.build import compose_config
    from stitching.grids import run_grid

    folder, overrides = job.folder(root), job_overrides(job, base)
    if job.kind == "similarity":
        return _similarity_job(overrides, folder, progress)
    if job.kind == "lm_similarity":
        return _lm_similarity_job(overrides, folder, progress)
    if job.kind == "grounding":
        return _grounding_job(overrides, folder, progress)
    summary = run_grid(compose_config(overrides), folder, progress=progress)
    return [f"{job.experiment}/{job.tag} seeds {job.pair}: f{i}-e{j}: {error}" for (i, j), error in summary["failed"]]


TEST_IMAGES = 10_000  # a stitch's test set where the data does not say, in the sizes that order the jobs


@dataclass(frozen=True)
class Needs:
    """What a job reads before its first stitch: the base models the zoo would train for it
    (their file names and, per model, the overrides and side that name it) and its size in
    stitch-images (cells × epochs × training images × the attack's passes), for the order."""

    models: dict[str, tuple[tuple[str, ...], str, int | None]]
    cost: float


def needs(job: Job, base: list[str]) -> Needs:
    """The base models ``job`` would train and its estimated size (from its settings alone)."""
    from stitching.build import build_zoo, compose_config, read_settings

    overrides = job_overrides(job, base)
    settings = read_settings(compose_config(overrides))
    zoo = build_zoo(settings)
    wanted = [("front", None), ("end", None)]
    if job.kind == "grounding":  # both models of the pair are compared, each as a front
        wanted += [("front", seed) for seed in job.pair]
    models = {}
    for side, seed in wanted:
        spec = getattr(settings, side).spec
        spec = spec if seed is None else replace(spec, seed=seed)
        if zoo.needs_training(spec, getattr(settings, side).checkpoint):
            models.setdefault(zoo.path(spec).name, (tuple(overrides), side, seed))
    pairs = settings.grid.pairs
    cells = 81 if isinstance(pairs, str) else len(pairs)
    objectives = [settings.objective]
    if job.kind == "grounding":
        g = settings.config["grounding"]
        layers = len(g.get("layers") or [0])
        cells = layers * (len(g.get("ranks") or []) + len(job.pair) * len(g.get("compare_layers") or [0]))
        objectives = list(g.get("objectives") or objectives)
    elif job.kind in ("similarity", "lm_similarity"):
        cells = 1
    data = settings.data()  # images, or a language model's sequences
    images = data.get("train_subset") or data.get("train_sequences") or 50_000
    tests = data.get("test_sequences") or data.get("test_subset") or TEST_IMAGES
    passes = 1 + (int(settings.attack.get("steps") or 0) if float(settings.attack.get("alpha") or 0) > 0 else 0)
    epochs = sum(0 if objective == "dm" else int(settings.trainer.get("max_epochs") or 0)  # DM: a closed form
                 for objective in objectives)
    return Needs(models, float(cells * (epochs * images * passes + len(objectives) * tests / 3)))  # a test: forward


def schedule(jobs: list[Job], sizes: list[Needs]) -> tuple[dict, list[Job]]:
    """The base models to train first (each named once, however many jobs need it) and the jobs
    largest first (``sizes``: each job's :func:`needs`), so none is left to run alone at the end."""
    models = {name: how for need in sizes for name, how in need.models.items()}
    order = sorted(range(len(jobs)), key=lambda k: -sizes[k].cost)  # stable: equal sizes keep the plan's order
    return models, [jobs[k] for k in order]


def _train_model(overrides: tuple[str, ...], side: str, seed: int | None) -> None:
    """Train one base model into the zoo (in a worker)."""
    from stitching.build import build_zoo, compose_config, read_settings

    settings = read_settings(compose_config(list(overrides)))
    spec = getattr(settings, side).spec
    build_zoo(settings).get(spec if seed is None else replace(spec, seed=seed))


def _guarded(job: Job, base: list[str], root: Path, progress: bool) -> list[str]:
    """:func:`run_job`, with a crash recorded as a failure: one broken experiment must not stop
    the others (a user error still ends the check)."""
    try:
        return run_job(job, base, root, progress)
    except StitchingError:
        raise
    except Exception as err:
        traceback.print_exc()
        return [f"{job.experiment}/{job.tag} seeds {job.pair}: {type(err).__name__}: {err}"]


def _start_worker(jobs: int) -> None:
    from stitching.jobs import share_threads

    share_threads(jobs)


def run_jobs(jobs: list[Job], base: list[str], root: Path, workers: int) -> list[str]:
    """Every job, ``workers`` at once, each worker a process of its own with its share of the
    cores (``claims.jobs``); what failed. The base models the jobs need start first, side by side
    (so no job holds a worker waiting for another job to train its model), then the jobs, the
    longest first (so the last one does not run alone)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    failed: list[str] = []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or locks
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(workers,)) as pool:
        try:
            models, jobs = schedule(jobs, list(pool.map(needs, jobs, [base] * len(jobs), chunksize=8)))
            print(f"[claims] {len(models)} base models to train, then {len(jobs)} jobs, {workers} at once", flush=True)
            # every missing base model first, side by side, then the jobs (the pool starts them in this
            # order): a job no longer holds a worker while another job trains the model it needs
            models_left = {pool.submit(_train_model, *how): name for name, how in models.items()}
            running = {pool.submit(_guarded, job, base, root, False): job for job in jobs}
            trained = done = 0
            while models_left or running:
                finished, _ = wait([*models_left, *running], return_when=FIRST_COMPLETED)
                for future in finished:
                    if future in models_left:  # a model that failed fails its jobs, each with the reason
                        name, error = models_left.pop(future), future.exception()
                        if isinstance(error, StitchingError):
                            raise error
                        trained += 1
                        print(f"[claims] base model {trained}/{len(models)}: {name}"
                              + (f" failed: {type(error).__name__}: {error}" if error else ""), flush=True)
                        continue
                    job = running.pop(future)
                    failed += future.result()  # a user error is raised here and ends the check
                    done += 1
                    print(f"[claims] {done}/{len(jobs)} done: {job.experiment} seeds {job.pair} {job.tag}", flush=True)
        except BaseException:  # what is running finishes and keeps its records; nothing new starts
            pool.shutdown(cancel_futures=True)
            raise
    return failed


def _similarity_job(overrides: list[str], folder: Path, progress: bool) -> list[str]:
    from stitching.build import compose_config, read_settings
    from stitching.similarity.compare import config_grids, finished_grids, grids_request

    config = read_settings(compose_config(overrides)).config
    s = config["claims"]
    by_flatten: dict[str, list[str]] = {}
    for index in SIMILARITY_INDICES:  # each fed as the authors feed it: CKA per image, PWCCA and OPD by match
        by_flatten.setdefault(AUTHORS_FLATTEN[index], []).append(index)
    for flatten, indices in by_flatten.items():
        images, layers = int(s["similarity_images"]), list(s["layers"])
        if not finished_grids(folder / flatten, grids_request(config, indices, flatten, images, 250, layers)):
            config_grids(overrides, indices, images, flatten, 250, folder / flatten, layers=layers, progress=progress)
    return []


def _lm_similarity_job(overrides: list[str], folder: Path, progress: bool) -> list[str]:
    """One language-model pair's similarity grids, as its preset's ``similarity`` group asks (index,
    flattening, sequences, batch, layers); a finished folder of the same request is kept."""
    from stitching.build import compose_config, read_settings
    from stitching.similarity.compare import finished_grids, pair_plan, plan_grids

    plan = pair_plan(read_settings(compose_config(overrides)))
    if not finished_grids(folder, plan["request"]):
        plan_grids(overrides, plan, folder, progress)
    return []


def _grounding_job(overrides: list[str], folder: Path, progress: bool) -> list[str]:
    """One grounding run: a finished one without failures is read back when the same settings
    made it (its grounding settings included); otherwise the tests run again, their stitching
    runs resuming cell by cell."""
    from stitching.build import compose_config, read_settings
    from stitching.groundings import run_tests
    from stitching.results.schema import config_hash

    config = compose_config(overrides)
    done = folder / "grounding.json"
    if done.is_file():
        held = json.loads(done.read_text())
        same = config_hash(held.get("config") or {}, hashed=("grounding",)) == \
            config_hash(read_settings(config).config, hashed=("grounding",))
        if same and not held.get("failed"):
            return []
    record = run_tests(config, overrides, folder, progress)
    return [f"grounding: {line}" for line in record["failed"]]


# -- claims --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    source: str
    experiment: str
    setting: Callable[[DictConfig], str]
    effect: Callable[[pd.DataFrame, DictConfig], tuple[float, str]]  # one seed pair's runs → (effect, what)
    unit: str = "accuracy"
    instrument: bool = False  # a check of the instrument itself, not a paper's claim
    also: tuple[str, ...] = ()  # other experiments whose runs of the same pair (k-th of each) the effect reads

    @property
    def experiments(self) -> tuple[str, ...]:
        return (self.experiment, *self.also)


def _by(frame: pd.DataFrame, metric: str, *keys: str) -> pd.Series:
    if metric not in frame or frame[metric].isna().all():
        raise LookupError(f"no {metric.replace('_', '/')} in the runs")
    return frame.groupby(list(keys))[metric].mean()


def _dm_self(frame, c):
    runs = frame[frame.objective == "dm"]
    gap = float((runs.test_acc - runs.end_acc).abs().max())
    return c.tolerance - gap, f"largest |accuracy − model's| {gap:.4f}"


#: how the robustness claims' ``claims.robust_attack`` reads in a claim's setting
_ATTACKS = {"pgd": "PGD-10", "autoattack": "AutoAttack-rand (the FuLA paper's)"}


def _mean(values, names) -> float:
    return float(np.mean([values[name] for name in names]))


def _ordering(frame, c):
    early = frame[frame.front_layer.isin(list(c.early_layers))]
    acc = _by(early, "test_acc", "objective")
    trained = _mean(acc, TRAINED)
    return trained - acc["dm"], f"DM {acc['dm']:.3f}, trained mean {trained:.3f}"


def _dm_stats(frame, c):
    acc = _by(frame.assign(passed=frame.dm_bn_pass.astype(str)), "test_acc", "passed")
    return acc["True"] - acc["False"], f"DM with the pass {acc['True']:.3f}, without {acc['False']:.3f}"


def _adversarial(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs stitched with adversarial data alone (α = 1): an experiment may hold α = 0 runs too."""
    runs = frame[frame.alpha == 1] if "alpha" in frame else frame.iloc[:0]
    if runs.empty:
        raise LookupError("no finished runs with attack.alpha=1")
    return runs


def _robustness(task: str):
    def effect(frame, c):
        acc = _by(_adversarial(frame), f"test_robust_acc_{c.robust_attack}", "objective")
        matching = _mean(acc, ("hint", "fula"))
        return acc[task] - matching, f"{task.upper()} {acc[task]:.3f}, Hint/FuLA mean {matching:.3f}"
    return effect


def _robustness_cost(frame, c):
    acc = _by(_adversarial(frame), "test_acc", "objective")
    matching, task = _mean(acc, ("hint", "fula")), _mean(acc, ("slm", "tlm"))
    return matching - task, f"clean accuracy Hint/FuLA mean {matching:.3f}, SLM/TLM mean {task:.3f}"


def _fula_above_hint(frame, c):
    acc = _by(_adversarial(frame), "test_acc", "objective")
    return acc["fula"] - acc["hint"], f"FuLA {acc['fula']:.3f}, Hint {acc['hint']:.3f}"


def _job(frame: pd.DataFrame, tag: str, layers: list[int] | None = None, experiment: str | None = None) -> pd.DataFrame:
    """The runs of one job (``runs/<experiment>/<pair>/<tag>/…``; of ``experiment`` alone when the
    frame holds several), at ``layers`` (front layers; all by default)."""
    parts = frame.run.str.split("/")
    runs = frame[(parts.str[3] == tag) & ((parts.str[1] == experiment) if experiment else True)]
    if layers is not None:
        runs = runs[runs.front_layer.isin(list(layers))]
    if runs.empty:
        raise LookupError(f"no finished {tag} runs" + (f" at layers {list(layers)}" if layers is not None else ""))
    return runs


def _interpolation(metric: str):
    """How far the α = 0 stitches of a non-robust front into a robust end fall outside the range of
    their two models' own ``metric`` (clean or robust accuracy), on average, below the tolerance."""
    def effect(frame, c):
        column = "acc" if metric == "clean" else f"robust_acc_{c.robust_attack}"
        runs = pd.concat([_job(frame, f"{o}_alpha0") for o in TRAINED])
        stitched = f"test_{column}"
        for needed in (stitched, f"front_{column}", f"end_{column}"):
            if needed not in runs or runs[needed].isna().all():
                raise LookupError(f"no {needed.replace('_', '/')} in the α = 0 runs")
        low = np.minimum(runs[f"front_{column}"], runs[f"end_{column}"])
        high = np.maximum(runs[f"front_{column}"], runs[f"end_{column}"])
        outside = (low - runs[stitched]).clip(lower=0) + (runs[stitched] - high).clip(lower=0)
        return c.tolerance - float(outside.mean()), (
            f"mean distance outside the models' {metric} range {float(outside.mean()):.3f} "
            f"(front {float(runs[f'front_{column}'].mean()):.3f}, end {float(runs[f'end_{column}'].mean()):.3f}, "
            f"stitched {float(runs[stitched].min()):.3f}–{float(runs[stitched].max()):.3f})")
    return effect


def _robust_chance(frame, c):
    """Closeness to chance of the α = 1 Hint and FuLA stitches into the robust end at the penultimate
    layer (the last cut point, where FuLA's one hint is Hint's: the two are one objective there)."""
    runs = {o: _job(frame, f"{o}_alpha1", [c.penultimate_layer]) for o in ("hint", "fula")}
    acc = {o: float(r.test_acc.mean()) for o, r in runs.items()}
    chance, mean = 1 / float(runs["hint"].num_classes.iloc[0]), _mean(acc, ("hint", "fula"))
    return c.chance_accuracy - abs(mean - chance), (f"Hint {acc['hint']:.3f}, FuLA {acc['fula']:.3f}, chance "
                                                   f"{chance:.3f}")


def _hint_deep(frame, c):
    acc = {o: float(_job(frame, f"{o}_alpha1", c.deep_layers).test_acc.mean()) for o in ("hint", "fula")}
    return acc["hint"] - acc["fula"], f"Hint {acc['hint']:.3f}, FuLA {acc['fula']:.3f} at layers {list(c.deep_layers)}"


#: Fig. 6's configurations, front → end: the (experiment, job) of their last-hint FuLA runs
LAST_HINT = {"plain → robust": ("robust_end", "fula_last_robust"), "plain → plain": ("robust_end", "fula_last_plain"),
             "robust → robust": ("robust_end", "fula_last_both"), "robust → plain": ("robust_front", "fula_last")}


def _drop(frame: pd.DataFrame, c, configuration: str) -> float:
    """How far last-hint FuLA's clean accuracy falls past the 6th layer in ``configuration``: the mean
    over claims.decay_layers before it − the mean after it."""
    experiment, tag = LAST_HINT[configuration]
    acc = _job(frame, tag, c.decay_layers, experiment).groupby("front_layer").test_acc.mean()
    before, after = acc[acc.index < DECAY_ONSET], acc[acc.index > DECAY_ONSET]
    if before.empty or after.empty:
        raise LookupError(f"claims.decay_layers need layers before and after {DECAY_ONSET}")
    return float(before.mean() - after.mean())


def _decay_against(other: str):
    """How much more last-hint FuLA's accuracy falls past the 6th layer from a non-robust front into a
    robust end than in the ``other`` configuration: (before − after) − the same in ``other``."""
    def effect(frame, c):
        drops = {k: _drop(frame, c, k) for k in ("plain → robust", other)}
        return drops["plain → robust"] - drops[other], f"drop past layer {DECAY_ONSET}: " + ", ".join(
            f"{k} {v:+.3f}" for k, v in drops.items())
    return effect


def _cka_least(frame, c):
    """How far below every other Fig. 6 cell (end × layer) the CKA of the DM start into the robust
    end at the penultimate layer lies: the next-lowest cell's CKA − its own."""
    runs = pd.concat([_job(frame, f"fula_last_{end}").assign(end_kind=end) for end in ("robust", "plain")])
    cka = _by(runs, "init_penultimate_cka", "end_kind", "front_layer")
    target = ("robust", int(c.penultimate_layer))
    if target not in cka.index:
        raise LookupError(f"no finished fula_last_robust run at layer {c.penultimate_layer}")
    others = cka.drop(target)
    if others.empty:
        raise LookupError("no other Fig. 6 cell to compare with")
    (end, layer), lowest = others.idxmin(), float(others.min())
    return lowest - float(cka[target]), (f"CKA robust end, layer {target[1]}: {float(cka[target]):.3f}; next lowest "
                                         f"{lowest:.3f} ({end} end, layer {layer})")


def _shortcut(task: str):
    def effect(frame, c):
        marked, clean = _by(frame, "test_acc_shortcut", "objective"), _by(frame, "test_acc", "objective")
        return marked[task] - clean[task], f"{task.upper()} marked {marked[task]:.3f}, clean {clean[task]:.3f}"
    return effect


def _shortcut_clean(frame, c):
    clean = _by(frame, "test_acc", "objective")
    model, kept = float(frame.end_acc.mean()), _mean(clean, ("hint", "fula"))
    return kept - (model - c.tolerance), f"Hint/FuLA clean mean {kept:.3f} vs model {model:.3f}"


def _shortcut_cross(frame, c):
    runs = frame[frame.objective.isin(["hint", "fula"])]
    if "test_acc_shortcut" not in runs or runs.test_acc_shortcut.isna().all():
        raise LookupError("no test/acc_shortcut in the runs")
    reliance = (runs.test_acc_shortcut - runs.test_acc).groupby(runs.front_dataset != runs.end_dataset).mean()
    if set(reliance.index) != {True, False}:
        raise LookupError("the cross-task or the same-task runs are missing")
    return reliance[True] - reliance[False], (f"Hint/FuLA marked − clean: cross-task {reliance[True]:+.3f}, "
                                              f"same-task {reliance[False]:+.3f}")


def _subset_fula(frame, c):
    acc = _by(frame, "test_acc_unseen_classes", "objective")
    others = _mean(acc, ("hint", "slm", "tlm"))
    return acc["fula"] - others, f"FuLA {acc['fula']:.3f}, others mean {others:.3f}"


def _subset_task(frame, c):
    acc = _by(frame, "test_acc_unseen_classes", "objective")
    matching, task = _mean(acc, ("hint", "fula")), _mean(acc, ("slm", "tlm"))
    return matching - task, f"Hint/FuLA mean {matching:.3f}, SLM/TLM mean {task:.3f}"


def _subset_same_tlm(frame, c):
    acc = _by(frame, "test_acc_unseen_classes", "objective")
    others = _mean(acc, ("hint", "fula", "slm"))
    return others - acc["tlm"], f"Hint/FuLA/SLM mean {others:.3f}, TLM {acc['tlm']:.3f}"


def _self_shares(frame, directional: bool = False) -> dict:
    """Each objective's share of rows whose unique best cell is the diagonal: DM, and Hint, FuLA
    and TLM started at DM (the FuLA paper's grids), and ``tlm_random``, TLM started from a random
    map (the TLM-vs-DM paper's)."""
    from stitching.results.tables import layer_grid, self_accuracy

    random = _random_start(frame)
    grids = {o: frame[~random] for o in ("dm", "hint", "fula", "tlm")} | {"tlm_random": frame[random]}
    return {o: self_accuracy(layer_grid(rows, o.removesuffix("_random")).to_numpy(), directional=directional)
            for o, rows in grids.items() if (rows.objective == o.removesuffix("_random")).any()}


def _random_start(frame) -> pd.Series:
    """Which runs started their stitch at a random map (the record's ``init``)."""
    return frame.init.astype(str).eq("random") if "init" in frame else pd.Series(False, index=frame.index)


def _diagonal_mean(frame, objective: str, random: bool) -> float:
    rows = frame[(_random_start(frame) == random) & (frame.objective == objective)
                 & (frame.front_layer == frame.end_layer)]
    return float(rows.test_acc.mean())


def _dm_vs_tlm_directional(frame, c):
    share = _self_shares(frame, directional=True)
    missing = [name for name, key in (("DM", "dm"), ("random-start TLM", "tlm_random")) if key not in share]
    if missing:
        raise LookupError(f"no {' or '.join(missing)} self-stitching grid")
    from_dm = _diagonal_mean(frame, "tlm", False)
    return share["dm"] - share["tlm_random"], (
        f"directional: DM {share['dm']:.2f}, TLM from a random map {share['tlm_random']:.2f} of rows (its diagonal "
        f"accuracy {_diagonal_mean(frame, 'tlm', True):.3f}"
        + ("" if np.isnan(from_dm) else f", TLM from DM {from_dm:.3f}") + ")")


def _dm_directional(frame, c):
    share = _self_shares(frame, directional=True)
    if "dm" not in share:
        raise LookupError("no DM self-stitching grid")
    return share["dm"] - 0.5, f"directional: DM {share['dm']:.2f} of rows"


def _distant_gap(frame, c):
    """How much lower DM rates distant layers than corresponding ones, less the same for TLM from a
    random map: mean accuracy on the diagonal − mean accuracy of the cells at least
    ``claims.distant_layers`` cut points apart, each objective on its own self grid."""
    random = _random_start(frame)
    gaps = {}
    for name, objective, rows in (("DM", "dm", frame[~random]), ("TLM from a random map", "tlm", frame[random])):
        rows = rows[rows.objective == objective]
        far = (rows.front_layer - rows.end_layer).abs() >= int(c.distant_layers)
        if rows.empty or not far.any():
            raise LookupError(f"no {name} self-stitching grid with cells {c.distant_layers} cut points apart")
        gaps[name] = float(rows[rows.front_layer == rows.end_layer].test_acc.mean() - rows[far].test_acc.mean())
    return gaps["DM"] - gaps["TLM from a random map"], (
        f"diagonal − distant accuracy: DM {gaps['DM']:+.3f}, TLM from a random map {gaps['TLM from a random map']:+.3f}")


def _fula_directional(frame, c):
    from stitching.results.tables import layer_grid

    grid = layer_grid(frame, "fula")
    gaps = [grid.loc[i, j] - grid.loc[j, i] for i in grid.index for j in grid.columns if i > j]
    gap = float(np.nanmean(gaps))
    return gap, f"FuLA deep front → shallow end − the reverse, mean over {len(gaps)} pairs {gap:+.3f}"


def _self_diagonal(objective: str):
    def effect(frame, c):
        share = _self_shares(frame)[objective]
        return share - 0.5, f"{objective} {share:.2f} of rows"
    return effect


def _averaging_directions(frame, c):
    """Hint's share of rows found with both directions averaged − with each row one direction."""
    averaged, directional = _self_shares(frame)["hint"], _self_shares(frame, directional=True)["hint"]
    return averaged - directional, f"Hint: averaged {averaged:.2f}, one direction {directional:.2f} of rows"


def _self_vs_tlm(frame, c):
    share = _self_shares(frame)
    matching = (share["hint"] + share["fula"]) / 2
    return matching - share["tlm"], f"Hint/FuLA mean {matching:.2f}, TLM {share['tlm']:.2f} of rows"


def _deeper_gain(frame, c):
    acc = frame.assign(w=frame.weights.astype(str)).pivot_table(index=["front_layer", "end_layer"], columns="w",
                                                                  values="test_acc")
    return acc[str(c.deeper_weights)] - acc["first"]


def _deeper_hints(frame, c):
    gain = _deeper_gain(frame, c)
    deep_front = float(gain[[i > j for i, j in gain.index]].mean())
    return deep_front, f"mean gain where front > end {deep_front:+.3f}"


def _deeper_hints_where(frame, c):
    gain = _deeper_gain(frame, c)
    deep_front, rest = (float(gain[[(i > j) == side for i, j in gain.index]].mean()) for side in (True, False))
    return deep_front - rest, f"gain front>end {deep_front:+.3f}, elsewhere {rest:+.3f}"


def _ood(frame, c):
    auroc = _by(frame, "ood_auroc", "objective")
    return auroc["tlm"] - auroc["dm"], f"AUROC TLM {auroc['tlm']:.3f}, DM {auroc['dm']:.3f}"


def _dm_at_chance(frame, c):
    runs = frame[frame.objective == "dm"]
    if "ood_auroc" not in runs or runs.ood_auroc.isna().all():
        raise LookupError("no DM ood/auroc in the runs")
    auroc = runs.groupby("end_layer").ood_auroc.mean()
    off = float((auroc - 0.5).abs().mean())
    return float(c.chance_auroc) - off, (
        f"DM AUROC by end layer {', '.join(f'{k}: {v:.3f}' for k, v in auroc.items())}; mean |AUROC − ½| {off:.3f}")


def _cka_against(other: str):
    """CKA's share of rows whose unique best cell is the corresponding layer − ``other``'s."""
    def effect(frame, c):
        from stitching.results.tables import sanity_checks

        scores = {r["method"]: r["score"] for r in sanity_checks(frame) if r["check"] == "corresponding layers"}
        if not {"cka", other} <= set(scores):
            raise LookupError(f"no CKA and {INDICES[other].label} grids between two seeds")
        return (scores["cka"] - scores[other],
                f"rows found CKA {scores['cka']:.2f}, {SIMILARITY_NAMES[other]} {scores[other]:.2f}")
    return effect


def _ding(test: str):
    """ρ of DM − ρ of random-start TLM in one of Ding et al.'s tests (ρ within each reference
    layer, averaged over the layers)."""
    def effect(frame, c):
        if "grounding_test" not in frame:
            raise LookupError("no grounding correlations")
        rows = frame[frame.grounding_test == test]
        rho = dict(zip(rows.grounding_measure, rows.grounding_rho))
        pooled = dict(zip(rows.grounding_measure, rows.grounding_rho_pooled))
        if not {"dm", "tlm"} <= set(rho):
            raise LookupError(f"no {test} ρ of DM and of TLM")
        if not (np.isfinite(rho["dm"]) and np.isfinite(rho["tlm"])):
            raise ValueError(f"the {test} ρ is undefined (items that do not vary)")
        return rho["dm"] - rho["tlm"], (f"ρ DM {rho['dm']:+.3f}, TLM from a random map {rho['tlm']:+.3f} (pooled over "
                                        f"layers {pooled['dm']:+.3f}, {pooled['tlm']:+.3f})")
    return effect


def _ding_setting(test: str):
    def setting(c) -> str:
        g = c.grounding
        layers = "every cut point" if g.layers is None else f"cut points {_layers_of(g.layers)}"
        items = (f"each reference layer truncated to {_layers_of(g.ranks)} principal directions (those below its "
                 f"channels)" if test == "sensitivity" else
                 f"{'every cut point' if g.compare_layers is None else 'cut points ' + _layers_of(g.compare_layers)} "
                 f"of the seed-2s and seed-(2s + 1) models against each reference layer")
        return (f"Ding et al.'s {test} test: the end (seed 2s + 1) at {layers} the reference, items = {items}; "
                f"functional difference = |Δ linear-probe accuracy|; dissimilarity = 1 − stitched accuracy; DM, and TLM "
                f"from a random map ({_random_epochs_text(c)}), front and end in eval mode ({' '.join(g.stitch)}); ρ "
                f"within each reference layer, averaged; effect = ρ DM − ρ TLM")
    return setting


def _language(frame, c):
    """A SoLU front against a GeLU front into the same end, averaged over both ends:
    [P(S→G) − P(G→G) + P(S→S) − P(G→S)] / 2 (comparing S→G with G→S alone compares two end models
    whose own losses differ)."""
    gelu, solu = c.language_models
    penalty = _by(frame, "test_adjusted_penalty", f"front_{c.language_key}", f"end_{c.language_key}")
    p = {(a, b): penalty[(front, end)] for a, front in (("S", solu), ("G", gelu)) for b, end in (("S", solu), ("G", gelu))}
    effect = (p["S", "G"] - p["G", "G"] + p["S", "S"] - p["G", "S"]) / 2
    return effect, (f"into GeLU: SoLU {p['S', 'G']:.3f} vs GeLU {p['G', 'G']:.3f}; into SoLU: SoLU {p['S', 'S']:.3f} vs "
                    f"GeLU {p['G', 'S']:.3f} nats/token")


def _tagged(frame: pd.DataFrame, tag: str) -> pd.DataFrame:
    """The rows of one job of a seed pair (its folder ``…/<tag>/``)."""
    rows = frame[(frame.run.str.rstrip("/") + "/").str.contains(f"/{tag}/", regex=False)]
    if rows.empty:
        raise LookupError(f"no finished runs of {tag}")
    return rows


def _bert_gaps(frame: pd.DataFrame, measure: str) -> pd.Series:
    """Per residual stream, how much more the two groups differ across than within (positive: more
    across): the stitched classifiers' MNLI loss between − within (``measure="stitching"``), or the
    minibatch CKA within − between (``"cka"``), each the mean of the replicate's two pairs of a kind."""
    by_kind: dict[str, list[pd.Series]] = {"within": [], "between": []}
    for tag, front, end in BERT_PAIRS:
        if measure == "cka":
            rows = _tagged(frame, f"cka_{tag}")
            rows = rows[(rows.objective == "minibatch_cka") & (rows.front_layer == rows.end_layer)]
            values = rows.groupby("end_layer").score.mean()
        else:
            values = _by(_tagged(frame, tag), "test_loss", "end_layer")
        by_kind["within" if front == end else "between"].append(values)
    within, between = (sum(v) / len(v) for v in (by_kind["within"], by_kind["between"]))
    return (within - between) if measure == "cka" else (between - within)


def _bert_across(measure: str):
    def effect(frame, c):
        gaps = _bert_gaps(frame, measure)
        later = gaps.reindex(list(c.bert.later_layers))
        if later.isna().any():
            raise LookupError(f"no {measure} at streams {[k for k, v in later.items() if np.isnan(v)]}")
        return float(later.mean()), f"across − within by stream {', '.join(f'{k}: {v:+.3f}' for k, v in gaps.items())}"
    return effect


def _bert_later(measure: str):
    def effect(frame, c):
        gaps = _bert_gaps(frame, measure)
        early, later = (gaps.reindex(list(layers)) for layers in (c.bert.early_layers, c.bert.later_layers))
        if early.isna().any() or later.isna().any():
            raise LookupError(f"no {measure} at every early and later stream")
        return float(later.mean() - early.mean()), (f"across − within: later streams {later.mean():+.3f}, early "
                                                    f"{early.mean():+.3f}")
    return effect


def _pythia_cka(frame: pd.DataFrame, c, pairs: list[tuple[str, str]]) -> float:
    """Mean CKA at corresponding relative depths (each front cut point with the end's nearest) over the
    intermediate depths ``claims.pythia.intermediate`` of ``pairs``' grids."""
    from stitching.results.tables import corresponding_depth

    low, high = c.pythia.intermediate
    scores = []
    for front, end in pairs:
        cells = corresponding_depth(_tagged(frame, _pythia_tag(front, end)))
        cells = cells[cells["index"] == ("minibatch_cka" if (cells["index"] == "minibatch_cka").any() else "cka")]
        cells = cells[(cells.depth >= low) & (cells.depth <= high)]
        if cells.empty:
            raise LookupError(f"no CKA at relative depths {low}–{high} between {front} and {end}")
        scores.append(float(cells.score.mean()))
    return float(np.mean(scores))


def _pythia_up_to_1b(frame, c):
    small = list(c.pythia.up_to_1b)
    value = _pythia_cka(frame, c, [(x, y) for i, x in enumerate(small) for y in small[i + 1:]])
    return value, f"mean intermediate CKA between the {len(small)} models up to 1B: {value:.3f}"


def _pythia_outlier(frame, c):
    near = list(c.pythia.neighbours)
    among = _pythia_cka(frame, c, [(x, y) for i, x in enumerate(near) for y in near[i + 1:]])
    outlier = _pythia_cka(frame, c, [(x, c.pythia.outlier) for x in near])
    return among - outlier, (f"intermediate CKA among {', '.join(n.rsplit('/', 1)[-1] for n in near)} {among:.3f}; "
                             f"of {c.pythia.outlier.rsplit('/', 1)[-1]} with them {outlier:.3f}")


def _random_epochs_text(c) -> str:
    return ("the preset's stitching epochs" if c.get("random_start_epochs") is None
            else f"{int(c.random_start_epochs)} stitching epochs")


def _layers(c, grid: bool = False) -> str:
    return _layers_of(_grid_layers(c) if grid else c.layers)


def _interpolation_claims(prefix: str, experiment: str, configuration: str, models: str) -> list["Claim"]:
    """Fig. 4's first row in one configuration of ``experiment``: with α = 0 the stitches' clean and
    robust accuracy lie between the two models' (two rows, ``<prefix>_interpolation_<metric>``)."""
    return [Claim(f"{prefix}_interpolation_{metric}", f"Stitching {configuration} without adversarial data (α = 0), "
                  f"every objective's stitched model has {metric} accuracy between its two models'.",
                  "FuLA Fig. 4 (first row), Sec. 3.1", experiment,
                  lambda c, metric=metric: f"{models}, Hint/FuLA/SLM/TLM at layers {_layers(c)}, α = 0"
                  + (f", robust accuracy by {_ATTACKS[c.robust_attack]}" if metric == "robust" else "")
                  + f"; effect = {c.tolerance} − the mean distance of a stitch's {metric} accuracy outside the range "
                    f"of its two models'", _interpolation(metric))
            for metric in ("clean", "robust")]


def _layers_of(layers) -> str:
    return ", ".join(str(k) for k in layers)


CLAIMS: dict[str, Claim] = {claim.name: claim for claim in (
    Claim("dm_self_stitch", "A DM stitch of a model to itself at the same layer keeps the model's accuracy.",
          "the instrument (least squares of a layer onto itself is the identity)", "dm_self",
          lambda c: f"DM only (no training), a model against itself at layers {_layers(c)}; effect = "
                    f"{c.tolerance} − the largest |stitched − model accuracy|",
          _dm_self, instrument=True),
    Claim("same_task_ordering", "Between two models of one task DM is lowest at early layers; trained "
          "objectives lie above it.", "FuLA Figs. 4–5 (α = 0)", "diagonal",
          lambda c: f"two seeds, corresponding layers {_layers(c)}, early = {list(c.early_layers)}; effect = the "
                    f"trained objectives' mean early accuracy − DM's", _ordering),
    Claim("dm_running_stats", "DM underperforms for want of updated running batch statistics: the same DM stitch "
          "with them updated scores higher.", "FuLA Fig. 3", "dm_stats",
          lambda c: f"DM on the preset's stitch.dm_samples images, two seeds, corresponding layers "
                    f"{_layers(c)}; effect = accuracy with the running-statistics pass (stitch.dm_bn_pass) − "
                    f"without", _dm_stats),
    *(Claim(f"fabricated_robustness_{task}", f"Stitching two non-robust models with adversarial data (α = 1), "
            f"{task.upper()} shows robust accuracy that Hint/FuLA do not.", "FuLA Figs. 4–5", "robustness",
            lambda c, task=task: f"two non-robust seeds, layer {c.layer}, α = 1, robust accuracy by "
                                 f"{_ATTACKS[c.robust_attack]} at the dataset's standard budget (attack.eps, 0.3 on "
                                 f"digits as Madry et al.); effect = {task.upper()}'s robust accuracy − the mean of "
                                 f"Hint's and FuLA's", _robustness(task), "robust accuracy")
      for task in ("slm", "tlm")),
    Claim("robustness_costs_clean", "SLM/TLM's robust accuracy comes at the cost of clean accuracy.",
          "FuLA Figs. 4–5", "robustness",
          lambda c: f"the same runs; effect = mean clean accuracy of Hint/FuLA − of SLM/TLM", _robustness_cost),
    *(Claim(f"robust_front_robust_{task}", f"Stitching a robust front into a non-robust end with adversarial data "
            f"(α = 1), {task.upper()} reaches robust accuracy that Hint/FuLA do not (the irregular behaviour of the task "
            f"losses, \"similar ... when stitching robust to non-robust\").", "FuLA Figs. 4–5, Sec. 3.1", "robust_front",
            lambda c, task=task: f"a robust front (seed 2s + 1, zoo.recipe.robust) into a non-robust end (seed 2s), "
                                 f"layer {c.layer}, α = 1, robust accuracy by {_ATTACKS[c.robust_attack]}; effect = "
                                 f"{task.upper()}'s robust accuracy − the mean of Hint's and FuLA's", _robustness(task),
            "robust accuracy")
      for task in ("slm", "tlm")),
    Claim("robust_front_costs_clean", "Stitching a robust front into a non-robust end with adversarial data (α = 1), "
          "SLM/TLM's clean accuracy drops (\"clean accuracy drops in an attempt to achieve robust accuracy\").",
          "FuLA Figs. 4–5, Sec. 3.1", "robust_front",
          lambda c: "the same runs; effect = mean clean accuracy of Hint/FuLA − of SLM/TLM", _robustness_cost),
    *_interpolation_claims("robust_front", "robust_front", "a robust front into a non-robust end",
                           "the same pairs as the robust front's other rows"),
    Claim("fula_above_hint", "Stitching with adversarial data, FuLA tends to give better-performing stitched models "
          "than Hint (\"Overall, FuLA tends to produce better-performing stitched models\"), outside the "
          "non-robust → robust configuration, the paper's exception.", "FuLA Figs. 4–5, Sec. 3.1", "robustness",
          lambda c: f"the same runs (two non-robust seeds, layer {c.layer}, α = 1: Fig. 5's same-task adversarial "
                    f"stitching); effect = FuLA's clean accuracy − Hint's", _fula_above_hint),
    *_interpolation_claims("robust", "robust_end", "a non-robust front into a robust end",
                           "a non-robust front (seed 2s) into a robust end (seed 2s + 1, adversarially trained by "
                           "zoo.recipe.robust, as its zoo record says)"),
    Claim("robust_penultimate_chance", "Stitching a non-robust front into a robust end with adversarial data "
          "(α = 1), Hint and FuLA report chance at the penultimate layer.", "FuLA Figs. 4–5, Sec. 3.1", "robust_end",
          lambda c: f"the same pairs, Hint and FuLA at layer {c.penultimate_layer} (before the classifier; the last cut "
                    f"point, where FuLA's one hint is Hint's), α = 1; effect = {c.chance_accuracy} − |their mean clean "
                    f"accuracy − chance (1 / classes)|", _robust_chance),
    Claim("robust_hint_deep", "Stitching a non-robust front into a robust end with adversarial data (α = 1), Hint "
          "reports higher accuracy than FuLA at the deeper layers (the paper's recurring exception to FuLA ≥ Hint).",
          "FuLA Figs. 4–5, Sec. 3.1", "robust_end",
          lambda c: f"the same pairs, Hint and FuLA at layers {list(c.deep_layers)}, α = 1; effect = Hint's mean clean "
                    f"accuracy − FuLA's", _hint_deep),
    Claim("robust_decay", "Stitched by FuLA with the last hint alone (α = 1), a non-robust front's similarity to a "
          "robust end decays from the 6th layer on, where into a non-robust end it stays steady.",
          "FuLA Fig. 6, Sec. 3.1", "robust_end",
          lambda c: f"the same pairs, FuLA with objective.weights=last, α = 1, layers {list(c.decay_layers)}, into the "
                    f"robust end and into the same seed's plain end; effect = (mean clean accuracy before layer "
                    f"{DECAY_ONSET} − after it) into the robust end − the same into the plain end",
          _decay_against("plain → plain")),
    # "whereas the others remain relatively steady": Fig. 6's two configurations with a robust front
    Claim("robust_decay_both", "Stitched by FuLA with the last hint alone (α = 1), a non-robust front's similarity "
          "to a robust end decays from the 6th layer on more than a robust front's into the same robust end.",
          "FuLA Fig. 6, Sec. 3.1", "robust_end",
          lambda c: f"the same pairs and end, FuLA with objective.weights=last, α = 1, layers {list(c.decay_layers)}, "
                    f"from the plain and from the robust model of seed 2s; effect = (mean clean accuracy before layer "
                    f"{DECAY_ONSET} − after it) from the plain front − the same from the robust front",
          _decay_against("robust → robust")),
    Claim("robust_decay_reverse", "Stitched by FuLA with the last hint alone (α = 1), a non-robust front's "
          "similarity to a robust end decays from the 6th layer on more than the robust model's, stitched the "
          "other way, into the non-robust one.", "FuLA Fig. 6, Sec. 3.1", "robust_end",
          lambda c: f"the same two models each way, FuLA with objective.weights=last, α = 1, layers "
                    f"{list(c.decay_layers)}: plain 2s → robust 2s + 1 and robust 2s + 1 → plain 2s (the robust-front "
                    f"pairs); effect = (mean clean accuracy before layer {DECAY_ONSET} − after it) plain → robust − "
                    f"the same robust → plain", _decay_against("robust → plain"), also=("robust_front",)),
    Claim("robust_cka_least", "CKA, too, finds the penultimate layers of the robust end and of the non-robust "
          "front stitched into it at the 9th layer the least similar.",
          "FuLA Fig. 6, Sec. 3.1", "robust_end",
          lambda c: f"the same Fig. 6 runs at layers {_layers_of(_decay_jobs_layers(c))}, into the robust and the plain "
                    f"end: linear CKA of the DM-initialised stitched network's penultimate features against the end's "
                    f"(evaluation.penultimate_cka), on PGD examples (attack.steps, attack.eps) crafted against the "
                    f"stitched network, as the paper; effect = the next-lowest cell's CKA − that of the "
                    f"robust end at layer {c.penultimate_layer}", _cka_least, unit="CKA"),
    *(Claim(f"shortcut_reliance_{task}", f"With shortcut markers in the stitching data, {task.upper()} scores higher "
            f"on marked test images than on clean ones.", "FuLA Fig. 8", "shortcut",
            lambda c, task=task: f"pixel markers ({c.shortcut}) in the stitching data, two seeds, layer {c.layer}; "
                                 f"effect = {task.upper()}'s marked − clean test accuracy", _shortcut(task))
      for task in ("slm", "tlm")),
    Claim("shortcut_clean_kept", "With shortcut markers in the stitching data, Hint/FuLA keep the model's clean "
          "accuracy.", "FuLA Fig. 8", "shortcut",
          lambda c: f"the same runs; effect = Hint/FuLA's mean clean accuracy − (the model's − {c.tolerance})",
          _shortcut_clean),
    Claim("shortcut_location_cross", "Hint and FuLA exploit location shortcuts when stitching deeper layers of a "
          "model of another task into the end, but not between two models of the end's task.", "FuLA Fig. 8",
          "shortcut_cross",
          lambda c: f"location markers in the stitching data, Hint and FuLA at layers {_layers_of(c.deep_layers)}: a "
                    f"{c.cross_front} front (seed 2s) and a front of the end's task (seed 2s) into the end (seed "
                    f"2s + 1); effect = mean marked − clean test accuracy cross-task − the same same-task",
          _shortcut_cross),
    Claim("unseen_classes_fula", "Stitched cross-task on a subset of classes, FuLA generalises to the unseen "
          "classes better than the others.", "FuLA Fig. 9", "subset_cross",
          lambda c: f"cross-task: a {c.cross_front} front (seed 2s) into the end (seed 2s + 1), stitching data of "
                    f"classes 0–{c.classes_train - 1}, accuracy on the others, layer {c.layer}; effect = FuLA − the "
                    f"mean of Hint, SLM and TLM", _subset_fula),
    Claim("unseen_classes_task", "Stitched cross-task on a subset of classes, the task-loss objectives (SLM/TLM) "
          "generalise worst.", "FuLA Fig. 9", "subset_cross",
          lambda c: f"the same runs; effect = mean of Hint and FuLA − mean of SLM and TLM on the unseen classes",
          _subset_task),
    Claim("unseen_classes_same_tlm", "Stitched same-task on a subset of classes (beyond one class), SLM, Hint and "
          "FuLA are comparable and TLM generalises worst.", "FuLA Sec. 3.2 on Fig. 9", "subset",
          lambda c: f"same task, two seeds, stitching data of classes 0–{c.classes_train - 1}, accuracy on the "
                    f"others, layer {c.layer}; effect = mean of Hint, FuLA and SLM − TLM", _subset_same_tlm),
    *(Claim(f"self_stitch_diagonal_{o}", f"Self-stitching grids: {o.upper() if o != 'fula' else 'FuLA'} puts most "
            f"rows' best cell on the diagonal (both directions averaged).",
            "FuLA Fig. 10; TLM-vs-DM sanity checks", "self_grids",
            lambda c, o=o: f"a model against itself, layers {_layers(c, grid=True)} × the same; effect = the share of "
                           f"rows − ½", _self_diagonal(o), "share of rows") for o in ("hint", "fula")),
    Claim("self_stitch_diagonal_tlm", "Self-stitching grids: TLM finds the diagonal less often than Hint/FuLA.",
          "FuLA Fig. 10; TLM-vs-DM sanity checks", "self_grids",
          lambda c: f"the same grids; effect = mean share of Hint and FuLA − TLM's", _self_vs_tlm, "share of rows"),
    Claim("averaging_directions", "Averaging both stitching directions finds corresponding layers that Hint's "
          "directional grid misses.", "FuLA Sec. 4 (Fig. 10)", "self_grids",
          lambda c: f"the Hint self grid; effect = its share of rows whose unique best cell is the diagonal with "
                    f"both directions averaged − with each row one direction", _averaging_directions, "share of rows"),
    Claim("dm_vs_tlm_self_directional", "A layer is most similar to itself by DM, not by TLM: on the directional "
          "self-stitching grid DM's diagonal wins more rows than TLM's.", "TLM vs DM (sanity check 2)", "self_grids",
          lambda c: f"the same grids and one more for TLM started from a random map, as the paper's authors run it "
                    f"({_random_epochs_text(c)}); directional (each row on its own); effect = DM's share of rows − "
                    f"that TLM's", _dm_vs_tlm_directional, "share of rows"),
    Claim("dm_self_directional", "DM passes the second sanity check: on the directional self-stitching grid a "
          "layer is most similar to itself in most rows.", "TLM vs DM (sanity check 2)", "self_grids",
          lambda c: f"the same grids, directional (each row on its own); effect = DM's share of rows whose unique "
                    f"best cell is the diagonal − ½", _dm_directional, "share of rows"),
    Claim("dm_vs_tlm_self_directional_fresh", "A layer is most similar to itself by DM, not by TLM, confirmed on "
          "fresh models: on the directional self-stitching grid DM's diagonal wins more rows than random-start "
          "TLM's.", "TLM vs DM (sanity check 2)", "self_grids_fresh",
          lambda c: f"a confirmatory replicate: models from seeds no other claim uses, a model against itself, layers "
                    f"{_layers_of(_confirm_layers(c))} × the same, DM and TLM from a random map "
                    f"({_random_epochs_text(c)}), directional; effect = DM's share of rows − that TLM's",
          _dm_vs_tlm_directional, "share of rows"),
    Claim("dm_self_directional_fresh", "DM passes the second sanity check, confirmed on fresh models: on the "
          "directional self-stitching grid a layer is most similar to itself in most rows.",
          "TLM vs DM (sanity check 2)", "self_grids_fresh",
          lambda c: f"the same confirmatory grids; effect = DM's share of rows whose unique best cell is the "
                    f"diagonal − ½", _dm_directional, "share of rows"),
    Claim("tlm_distant_layers", "TLM rates distant layers nearly as similar as corresponding ones, where DM tells "
          "them apart.", "TLM vs DM", "self_grids",
          lambda c: f"the self grids of DM and of TLM from a random map ({_random_epochs_text(c)}), layers "
                    f"{_layers(c, grid=True)}; distant = at least {c.distant_layers} cut points apart; effect = "
                    f"(diagonal − distant accuracy) of DM − the same of TLM", _distant_gap),
    Claim("fula_directional", "Stitching stays directional under FuLA: a deep front into a shallow end scores "
          "higher than the reverse (Fig. 10, e.g. [5, 3] > [3, 5]).", "FuLA Fig. 10", "self_grids",
          lambda c: f"the same grids; effect = FuLA's accuracy of front i → end j − of j → i, mean over the pairs "
                    f"i > j", _fula_directional),
    Claim("deeper_hints", "Deeper FuLA hints raise the deep-front → shallow-end cells.", "FuLA Fig. 11",
          "deeper_hints",
          lambda c: f"FuLA with hints first vs {c.deeper_weights}, two seeds, layers {_layers(c, grid=True)} × the "
                    f"same; effect = mean gain where front > end", _deeper_hints),
    Claim("deeper_hints_where", "Deeper FuLA hints help the deep-front → shallow-end cells more than the others.",
          "FuLA Fig. 11", "deeper_hints",
          lambda c: f"the same grids; effect = mean gain where front > end − mean gain elsewhere", _deeper_hints_where),
    Claim("ood_detectability", "TLM-stitched activations are easier to tell from native ones (energy-detector "
          "AUROC) than DM's.", "TLM vs DM", "ood",
          lambda c: f"energy detector at the end layer, two seeds, corresponding layers {_layers(c)}; effect = "
                    f"AUROC TLM − DM", _ood, "AUROC"),
    Claim("dm_in_distribution", "DM-stitched activations are in-distribution: the energy detector tells them "
          "from native ones no better than chance.", "TLM vs DM", "ood",
          lambda c: f"the same runs; effect = {c.chance_auroc} − DM's mean |AUROC − ½| over the end layers (AUROC "
                    f"within ½ ± {c.chance_auroc} reads as chance)", _dm_at_chance, "AUROC"),
    *(Claim(f"cka_finds_layers_{other}", f"Of the structural indices, CKA finds corresponding layers between "
            f"seeds best; {SIMILARITY_NAMES[other]} less often.", "TLM vs DM", "similarity",
            lambda c, other=other: f"{c.similarity_images} test images, layers {_layers(c)}, each index fed as the "
                                   f"authors' code feeds it (CKA every feature of an image, "
                                   f"{SIMILARITY_NAMES[other]} positions as samples where the maps match); effect = "
                                   f"share of rows whose unique best cell is the diagonal, CKA − "
                                   f"{SIMILARITY_NAMES[other]}", _cka_against(other), "share of rows")
      for other in ("pwcca", "procrustes")),
    *(Claim(f"ding_{test}", f"DM's dissimilarity tracks the functional difference more closely than TLM's in "
            f"Ding et al.'s {test} test ({what}).", "TLM vs DM (Ding et al. tests)", "grounding", _ding_setting(test),
            _ding(test), "rank correlation")
      for test, what in (("sensitivity", "a layer against itself truncated to fewer principal directions"),
                         ("specificity", "other layers and models against a reference layer"))),
    Claim("solu_gelu_asymmetry", "Stitching from a SoLU model costs more than from a GeLU model into the same "
          "end (the paper: SoLU → GeLU above GeLU → SoLU).",
          "representation-dissimilarity paper", "language",
          lambda c: f"TLM between the GeLU and SoLU toy models of {' '.join(c.language)}, every layer, all four "
                    f"directions; effect = adjusted penalty (over each end model's self-stitch baseline) of a SoLU "
                    f"front − a GeLU front into the same end, averaged over both ends (nats/token)", _language,
          "nats/token"),
    *(Claim(f"bert_across_{measure}", f"Generalising and heuristic MNLI BERTs differ more across the two groups than "
            f"within each, by {what}, at the later layers.", "representation-dissimilarity paper, Sec. 4",
            "bert_groups", lambda c, measure=measure: _bert_setting(c, measure, "the mean over the later streams "
                                                                    f"{_layers_of(c.bert.later_layers)}"),
            _bert_across(measure), unit)
      for measure, what, unit in (("stitching", "stitching", "nats/example"), ("cka", "CKA", "CKA"))),
    *(Claim(f"bert_later_{measure}", f"The difference between generalising and heuristic BERTs lies in the later "
            f"layers: the across-minus-within {what} gap is larger there than in the early layers.",
            "representation-dissimilarity paper, Sec. 4", "bert_groups",
            lambda c, measure=measure: _bert_setting(c, measure, f"its mean over the later streams "
                                                    f"{_layers_of(c.bert.later_layers)} − over the early ones "
                                                    f"{_layers_of(c.bert.early_layers)}"),
            _bert_later(measure), unit)
      for measure, what, unit in (("stitching", "stitching", "nats/example"), ("cka", "CKA", "CKA"))),
    Claim("pythia_up_to_1b", "Pythia models up to 1B parameters have highly similar features (CKA).",
          "representation-dissimilarity paper, Sec. 5", "pythia",
          lambda c: f"minibatch CKA (unbiased HSIC per batch, token positions as samples) of {' '.join(c.pythia.preset)} "
                    f"between every two of {_names(c.pythia.up_to_1b)}, each front cut point with the end's nearest "
                    f"relative depth, depths {c.pythia.intermediate[0]}–{c.pythia.intermediate[1]}; effect = their mean "
                    f"CKA (one model per size: described, not tested)", _pythia_up_to_1b, "CKA"),
    Claim("pythia_outlier", "Pythia-2.8B is an outlier: its intermediate features are less similar to those of "
          "the sizes beside it than theirs are to each other.", "representation-dissimilarity paper, Sec. 5", "pythia",
          lambda c: f"the same CKA; effect = the mean among {_names(c.pythia.neighbours)} − the mean of "
                    f"{_names([c.pythia.outlier])} with each of them (one model per size: described, not tested)",
          _pythia_outlier, "CKA"),
)}


def _names(models) -> str:
    return ", ".join(str(m).rsplit("/", 1)[-1] for m in models or []) or "(none named)"


def _bert_setting(c, measure: str, effect: str) -> str:
    groups = (f"generalising {_names(c.bert.generalising)}, heuristic {_names(c.bert.heuristic)}"
              if c.bert.generalising and c.bert.heuristic else "the groups claims.bert names")
    how = ("TLM (the classifier's MNLI cross-entropy), stitched at residual streams "
           f"{_layers_of(_bert_layers(c))}; the stitched classifier's MNLI test loss" if measure == "stitching" else
           f"minibatch CKA (token positions as samples) at residual streams {_layers_of(_bert_layers(c))}")
    return (f"{' '.join(c.bert.preset)}, {groups}; replicate s: members 2s (front) and 2s + 1 (end) of each group, "
            f"four pairs (within each group, across both ways: every front and end once within and once across); "
            f"{how}; across − within per stream ({'within CKA − across CKA' if measure == 'cka' else 'loss across − within'}); "
            f"effect = {effect}")


def replicated(claim: Claim, settings: DictConfig) -> bool:
    """Whether ``claim`` has replicates to test over: not where an experiment it reads runs one set of
    pretrained models (Pythia; TransformerLens' own GeLU/SoLU models), whose effect is described."""
    return not any(EXPERIMENTS[e][0] in ("one", "trained") and experiment_pairs(settings, EXPERIMENTS[e][0]) == [(0, 0)]
                   for e in claim.experiments)


def measure(claim: Claim, frame: pd.DataFrame, settings: DictConfig) -> dict:
    """The claim's effect per seed pair and its verdict (``not run`` where its models are not named;
    described, never tested, where one set of pretrained models is all there is)."""
    head = {"name": claim.name, "claim": claim.statement, "source": claim.source, "experiment": claim.experiment,
            "setting": claim.setting(settings), "unit": claim.unit, "instrument": claim.instrument}
    missing = [why for why in (unavailable(e, settings) for e in claim.experiments) if why]
    if missing:
        return {**head, **verdict([]), "verdict": NOT_RUN, "why": missing[0], "per_pair": []}
    pairs = []
    # the k-th pair of each experiment the claim reads (the same models where their pairings agree)
    pairings = [experiment_pairs(settings, EXPERIMENTS[e][0]) for e in claim.experiments]
    for k, (a, b) in enumerate(pairings[0]):
        folders = tuple(f"runs/{e}/seeds{p[k][0]}-{p[k][1]}/" for e, p in zip(claim.experiments, pairings))
        runs = frame[frame.run.str.startswith(folders)] if not frame.empty else frame
        try:
            if runs.empty:
                raise LookupError("no finished runs")
            effect, what = claim.effect(runs, settings)
            pairs.append({"pair": [a, b], "effect": float(effect), "measured": what, "read": list(folders)})
        except (LookupError, KeyError, ValueError) as err:
            pairs.append({"pair": [a, b], "effect": None, "measured": f"not measured: {err}", "read": list(folders)})
    margins = settings.get("margins") or {}
    margin = margins.get(claim.unit)
    effects = [p["effect"] for p in pairs]
    missing = [p["measured"] for p in pairs if p["effect"] is None]
    if not replicated(claim, settings):  # one set of pretrained models: described, never a verdict
        result = verdict(effects, min_pairs=1)
        result = ({**result, "verdict": UNSURE, "why": missing[0]} if missing else
                  {**result, "verdict": DESCRIBED, "why": "one set of pretrained models, no replicate: the effect is "
                                                          "described, not tested"})
        return {**head, **result, "per_pair": pairs}
    result = verdict(effects, int(settings.min_pairs), float(settings.alpha), None if margin is None else float(margin))
    if missing and result["verdict"] == UNSURE and result["pairs"] < int(settings.min_pairs):
        result["why"] += f" ({missing[0]})"
    return {**head, **result, "per_pair": pairs}


# -- the report ----------------------------------------------------------------------------
def _number(v: float) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:+.3f}"


#: each experiment in a few words, for the summary table (the full setting is in ``claims.md``)
EXPERIMENT_LABELS = {
    "dm_self": "a model against itself, DM, no training", "diagonal": "two seeds, corresponding layers",
    "dm_stats": "two seeds, DM with and without the statistics pass", "robustness": "two seeds, adversarial stitching",
    "robust_end": "a non-robust front into a robust end", "robust_front": "a robust front into a non-robust end",
    "shortcut": "two seeds, marked stitching data",
    "shortcut_cross": "cross-task vs same-task front, location markers", "subset": "two seeds of one task, classes 0..k−1",
    "subset_cross": "cross-task front, classes 0..k−1", "self_grids": "a model against itself, square grids",
    "self_grids_fresh": "fresh models against themselves, confirmatory square grids",
    "deeper_hints": "two seeds, square grids, FuLA hints", "ood": "two seeds, energy detector",
    "similarity": "two seeds, structural indices", "grounding": "two seeds, Ding et al.'s tests",
    "language": "toy GeLU/SoLU models, four directions",
    "bert_groups": "MNLI BERTs, within vs across groups", "pythia": "Pythia sizes, CKA by relative depth",
}


def summary_table(results: list[dict]) -> str:
    """paper claim | setting | effect ± 95 % interval | verdict: one short line per claim."""
    lines = ["| paper claim | setting | effect, 95 % CI; one-sided bound | verdict |", "|---|---|---|---|"]
    for r in results:
        low, high = r.get("ci95") or [float("nan")] * 2
        interval = f" [{low:+.3f}, {high:+.3f}]; {bound_text(r)}" if np.isfinite(low) else ""
        label = EXPERIMENT_LABELS.get(r.get("experiment"), r.get("experiment") or "")
        lines.append(f"| {r['claim']} ({r['source']}) | {label} | {_number(r['mean'])}{interval} {r['unit']} | "
                     f"**{r['verdict']}** |")
    return "\n".join(lines)


def claims_table(results: list[dict]) -> str:
    lines = ["| claim | paper, figure | setting | effect (mean ± std over pairs) | verdict |", "|---|---|---|---|---|"]
    for r in results:
        spread = f"{_number(r['mean'])} ± {abs(r['std']):.3f}" if np.isfinite(r["std"]) else _number(r["mean"])
        low, high = r.get("ci95") or [float("nan")] * 2
        if np.isfinite(low):
            spread += f", 95 % CI [{low:+.3f}, {high:+.3f}], one-sided bound {bound_text(r)}"
        example = next((p["measured"] for p in r["per_pair"] if p["effect"] is not None), "")
        if np.isfinite(r.get("detectable", float("nan"))):
            spread += f"; detectable ≥ {r['detectable']:.3f}"
        lines.append(f"| {r['claim']} | {r['source']} | {r['setting']} | {spread} {r['unit']} ({r['pairs']} pairs; "
                     f"{example}) | **{r['verdict']}**: {r['why']} |")
    return "\n".join(lines)


def loss_curves(frame: pd.DataFrame, path: Path) -> Path | None:
    """Mean training loss per epoch (relative to epoch 1) by objective: has the stitch converged?"""
    if frame.empty or "train_curve" not in frame:
        return None
    curves = frame.dropna(subset=["train_curve"])
    curves = curves[curves.train_curve.map(len) > 1]
    if curves.empty:
        return None
    from stitching.results.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lengths = curves.train_curve.map(len)
    several = curves.assign(epochs=lengths).groupby("objective").epochs.nunique() > 1
    for (objective, length), rows in curves.groupby(["objective", lengths]):  # runs of other budgets apart
        relative = np.stack([np.asarray(c) / c[0] for c in rows.train_curve if c[0]])
        epochs = np.arange(1, relative.shape[1] + 1)
        label = objective.upper() + (f" ({length} epochs)" if several[objective] else "")
        ax.plot(epochs, relative.mean(0), marker="o", label=label)
        ax.fill_between(epochs, relative.min(0), relative.max(0), alpha=0.15)
    ax.set_xlabel("stitching epoch")
    ax.set_ylabel("training loss / epoch-1 loss")
    ax.set_title("does the stitch converge? (range over cells)")
    ax.legend()
    return save_figure(plt, fig, path)


def effects_figure(results: list[dict], path: Path) -> Path | None:
    """One panel per claim: each seed pair's effect (dots), mean ± std (bar), zero (the line a
    claim's effect must clear), coloured by verdict."""
    shown = [r for r in results if r["pairs"]]
    if not shown:
        return None
    from stitching.results.figures import panel_grid, pyplot, save_figure

    plt = pyplot()
    colour = {HOLDS: "tab:green", FAILS: "tab:red", UNSURE: "tab:grey", DESCRIBED: "tab:blue"}
    fig, axes = panel_grid(plt, len(shown), 2.6, 2.4, columns=5)
    for ax, r in zip(axes, shown):
        values = [p["effect"] for p in r["per_pair"] if p["effect"] is not None]
        ax.axhline(0, color="black", linewidth=0.8)
        ax.bar([0], [r["mean"]], yerr=[0 if not np.isfinite(r["std"]) else r["std"]], color=colour[r["verdict"]],
               alpha=0.5, width=0.5, capsize=4)
        ax.scatter(np.zeros(len(values)) + np.linspace(-0.1, 0.1, len(values)), values, color="black", s=12, zorder=3)
        ax.set_xticks([])
        ax.set_title(f"{r['name']}\n{r['verdict']}", fontsize=8)
        ax.set_ylabel(f"effect ({r['unit']})", fontsize=7)
        ax.tick_params(labelsize=7)
    return save_figure(plt, fig, path)


def _apart(results: list[dict]) -> str:
    """How many of ``results`` were not run here, and how many are described rather than tested."""
    counts = {v: sum(r["verdict"] == v for r in results) for v in (NOT_RUN, DESCRIBED)}
    parts = [f"{counts[NOT_RUN]} not run here, their pretrained models not named" if counts[NOT_RUN] else "",
             f"{counts[DESCRIBED]} on one set of pretrained models, described" if counts[DESCRIBED] else ""]
    return f" ({'; '.join(p for p in parts if p)})" if any(parts) else ""


def write_report(results: list[dict], frame: pd.DataFrame, out: Path, settings: DictConfig, meta: dict) -> None:
    curve = loss_curves(frame, out / "loss_curves.png")
    effects = effects_figure(results, out / "effects.png")
    papers = [r for r in results if not r.get("instrument")]
    checks = [r for r in results if r.get("instrument")]
    fresh = experiment_pairs(settings, "fresh")
    confirm = (f"; the confirmatory self grids: {len(fresh)} fresh models, seeds {', '.join(str(a) for a, _ in fresh)}"
               if any(EXPERIMENTS[r["experiment"]][0] == "fresh" for r in results) else "")
    text = ["# Claims of the three papers, checked", "",
            f"{len(papers)} paper claims{_apart(papers)}; {int(settings.seed_pairs)} independent seed pair(s) each "
            f"(no model in two "
            f"pairs{confirm}); a claim holds when a one-sided t-test of its mean effect > 0 over at least "
            f"{int(settings.min_pairs)} pairs gives p < {float(settings.alpha)} (exactly when the one-sided "
            f"{(1 - float(settings.alpha)) * 100:g} % lower bound of the mean is above zero; the two-sided 95 % "
            "interval beside it is descriptive), does not hold when the reverse test does (the upper bound below "
            "zero), when its 95 % interval lies within the unit's equivalence margin (claims.margins) or when no pair "
            "shows the effect, and is inconclusive otherwise; 'detectable' is the smallest mean effect the test finds "
            "with probability 0.8 at the observed spread. A claim on one set of pretrained models (one per size) "
            "is described, never tested; a claim whose models are not named here is listed as not run, with the "
            "command that runs it. Settings, effects, replicates and the test were fixed before the runs.", "",
            claims_table(papers), ""]
    if checks:
        text += ["## Instrument checks", "", "Checks of the instrument itself, tested the same way and not counted "
                 "as paper claims.", "", claims_table(checks), ""]
    text += ["## Settings", "",
            f"* base: `{' '.join(meta['base'])}`; stitching epochs {meta['epochs']}; base-model test accuracy "
            f"{meta['base_accuracy']}",
            "* per-pair effects, settings and timings: `claims.json`; the runs: `runs/` (`python -m stitching.report`)",
            ""]
    if effects is not None:
        text += ["## Effects per seed pair", "", f"![effects]({effects.name})", ""]
    if curve is not None:
        text += ["## Training loss", "", f"![loss curves]({curve.name})", ""]
    (out / "claims.md").write_text("\n".join(text))
    (out / "summary.md").write_text(summary_table(papers) + "\n")
    images = "".join(f'<h2>{title}</h2><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                     for title, p in (("Effects per seed pair", effects), ("Training loss", curve)) if p is not None)
    rows = "".join(f"<tr><td>{html.escape(r['claim'])}</td><td>{html.escape(r['source'])}</td>"
                   f"<td>{html.escape(r['setting'])}</td><td>{_number(r['mean'])} ± "
                   f"{abs(r['std']) if np.isfinite(r['std']) else float('nan'):.3f} {html.escape(r['unit'])}"
                   f" ({r['pairs']} pairs)</td><td><b>{r['verdict']}</b>: {html.escape(r['why'])}</td></tr>"
                   for r in results)
    (out / "claims.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>claims</title><h1>Claims of the three papers, checked</h1>"
        f"<table border=1 cellpadding=4><tr><th>claim</th><th>paper</th><th>setting</th><th>effect</th>"
        f"<th>verdict</th></tr>{rows}</table>{images}")


def chosen(settings: DictConfig) -> list[str]:
    """The claims ``claims.only`` names (all by default): comma-separated text or a list
    (``claims.only=[a,b]``, where ``claims.only=a,b`` would be a Hydra sweep); an unknown one is
    one error line."""
    only = settings.only
    listed = OmegaConf.is_list(only) or isinstance(only, (list, tuple))
    names = list(CLAIMS) if only is None else [str(n).strip() for n in (only if listed else str(only).split(","))]
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        raise StitchingError(f"unknown claim '{', '.join(unknown)}'; choose from {', '.join(CLAIMS)}")
    if only is not None:  # a claim asked for by name that cannot run here is said before any work
        for name in names:
            why = next(filter(None, (unavailable(e, settings, ranked=False) for e in CLAIMS[name].experiments)), None)
            if why:
                raise StitchingError(f"claim {name} cannot run here: {why}")
    return names


def check_cut_points(run) -> None:
    """Every cut point the claims name exists in both image models (``run``: the base config's
    :class:`~stitching.build.Settings`): one line before any run."""
    from stitching.build import build_zoo
    from stitching.models import cut_point_names

    zoo, c = build_zoo(run), OmegaConf.create(run.config["claims"])
    counts = []
    for side in (run.front, run.end):
        model = zoo.untrained(side.spec) if zoo.needs_training(side.spec, side.checkpoint) else \
            zoo.get(side.spec, side.checkpoint)[0]
        counts.append(len(cut_point_names(model)))
    named = {*map(int, c.layers), *_grid_layers(c), *_confirm_layers(c), int(c.layer), int(c.penultimate_layer),
             *c.decay_layers,
             *(c.grounding.layers or []), *(c.grounding.compare_layers or [])}
    bad = sorted(k for k in named if k > min(counts))
    if bad:
        raise StitchingError(f"claims name cut point(s) {bad}, but the models have cut points 1..{min(counts)}: "
                             f"change claims.layers, claims.grid_layers, claims.confirm_layers, claims.layer, "
                             f"claims.penultimate_layer, claims.decay_layers or claims.grounding")


def check_claims(run, base: list[str], out: Path, progress: bool = True) -> dict:
    """Run every job of the chosen claims (a finished cell is kept), measure, write the report
    (``run``: the base config's :class:`~stitching.build.Settings`)."""
    from stitching.results.records import collect

    settings = OmegaConf.create(run.config["claims"])
    names = chosen(settings)
    if any(CLAIMS[name].experiment not in LANGUAGE for name in names):  # the language runs name no image layers
        check_cut_points(run)
    watch = Stopwatch()
    if any(CLAIMS[name].experiment == "bert_groups" for name in names) and settings.bert.get("candidates") \
            and not settings.bert.generalising:
        with watch.section("bert_ranking_s"):  # the groups by the paper's rule, before any stitch
            ranking = rank_berts(settings, base, out, progress)
        settings.bert.generalising, settings.bert.heuristic = ranking["generalising"], ranking["heuristic"]
    jobs = plan(settings, names)
    failed: list[str] = []
    if int(settings.jobs) > 1:
        with watch.section("jobs_s"):
            failed = run_jobs(jobs, base, out, int(settings.jobs))
    else:
        for number, job in enumerate(jobs, 1):
            print(f"[claims] {number}/{len(jobs)} {job.experiment} seeds {job.pair} {job.tag}", flush=True)
            with watch.section(f"{job.experiment}_s"):
                failed += _guarded(job, base, out, progress)
    frame, _ = collect(out) if (out / "runs").is_dir() else (pd.DataFrame(), [])
    frame = _with_grounding(_with_curves(frame, out), out)
    results = [measure(CLAIMS[name], frame, settings) for name in names]
    models = {}
    for side in ("front", "end"):  # every base model of the runs, with its own test accuracy
        if not frame.empty and f"{side}_acc" in frame:
            models.update(frame.dropna(subset=[f"{side}_acc"]).groupby(f"{side}_model")[f"{side}_acc"].first())
    meta = {"base": base, "epochs": int(run.trainer["max_epochs"]),
            "base_accuracy": ", ".join(f"{k} {v:.3f}" for k, v in sorted(models.items())) or "—"}
    write_report(results, frame, out, settings, meta)
    record = {"claims": results, "failed": failed, "settings": OmegaConf.to_container(settings, resolve=True), **meta,
              "timings": watch.report(), "versions": versions()}
    write_json_atomic(out / "claims.json", record)
    return record


def _with_curves(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Each run's per-epoch training loss (``curve`` in its record), where it has one."""
    if frame.empty:
        return frame
    curves = []
    for run in frame.run:
        path = root / run / "results.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        curves.append((record.get("curve") or {}).get("train/loss"))
    return frame.assign(train_curve=curves)


def _with_grounding(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Each grounding job's correlations (its ``grounding.csv``) as rows of the frame: ``run`` its
    folder, ``grounding_test``, ``grounding_measure``, ``grounding_rho``, ``grounding_rho_pooled``."""
    rows = []
    for path in sorted((root / "runs").glob("*/seeds*/*/grounding.csv")):
        run = path.parent.relative_to(root).as_posix()
        rows += [{"run": f"{run}/", "grounding_test": r.test, "grounding_measure": r.measure, "grounding_rho": r.rho,
                  "grounding_rho_pooled": r.rho_pooled} for r in pd.read_csv(path).itertuples()]
    return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True) if rows else frame


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from stitching.build import compose_config, read_settings

    parser = argparse.ArgumentParser(prog="python -m stitching.claims", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated claims (default: all): {', '.join(CLAIMS)}")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/claims/<time>); an existing one "
                        "resumes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=claims_small)")
    args = parser.parse_args(argv)
    # quoted: a comma-separated list is one value, not a Hydra sweep
    base = [*(args.overrides or ["experiment=claims_small"]), *([f"claims.only='{args.only}'"] if args.only else [])]
    run = read_settings(compose_config(base))
    chosen(OmegaConf.create(run.config["claims"]))
    out = hold_folder(Path(args.out) if args.out else Path("outputs/claims") / time.strftime("%Y-%m-%d_%H-%M-%S"),
                      "--out")
    on_interrupt(f"every finished run keeps its results.json in {out}; rerun the same command with --out {out} "
                 f"to run only the rest")
    record = check_claims(run, base, out, progress=not args.no_progress)
    print((out / "claims.md").read_text())
    print(f"{record['timings']['total_s']:.0f}s; results in {out.resolve()}")
    if record["failed"]:
        print(f"error: {len(record['failed'])} run(s) failed, e.g. {record['failed'][0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
