"""Run records → one tidy table: every ``results.json`` under a folder, with the conditions
that define each run (read from its resolved config)."""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd

from stitching.errors import StitchingError
from stitching.results.schema import problems
from stitching.validation import applies


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
    "stitch_lr": ("stitch", "lr"), "dm_samples": ("stitch", "dm_samples"), "update_bn": ("stitch", "update_bn"),
    "dm_bn_pass": ("stitch", "dm_bn_pass"),
    "epochs": ("trainer", "max_epochs"),
}


#: replicate axes: averaged over, their spread shown (never a panel of their own)
REPLICATES = ("front_seed", "end_seed")


#: the metrics a figure can show, and their axis labels
METRIC_LABELS = {"test_acc": "clean accuracy", "test_robust_acc_pgd": "robust accuracy (PGD)",
                 "test_robust_acc_autoattack": "robust accuracy (AutoAttack)",
                 "test_acc_shortcut": "accuracy with shortcut",
                 "init_penultimate_cka": "penultimate CKA at DM init",
                 "ood_auroc": "OOD AUROC, stitched vs native",
                 "ood_auroc_heldout": "OOD detector AUROC on a held-out family",
                 "test_hans_acc": "HANS lexical-overlap accuracy"}


#: the value of a condition whose setting a run does not read (``stitch.dm_bn_pass`` of a trained
#: objective): it separates no panel (see :func:`~stitching.results.tables.facets`)
NOT_READ = "n/a"


#: settings of how a stitch is made and trained: a structural index (``python -m stitching.similarity``)
#: reads none of them, except a truncated front's rank and the samples its projection is fitted on
STITCH_GROUPS = ("attack", "objective", "stitch", "trainer")
INDEX_READS = ("stitch.front_rank",)


def index_reads(setting: str, config: dict) -> bool:
    """Whether a structural index computed under ``config`` reads ``setting`` (``group.key``)."""
    if setting == "stitch.dm_samples":  # the front's truncation is fitted on the DM samples
        return (config.get("stitch") or {}).get("front_rank") is not None
    return setting in INDEX_READS or not (setting.split(".")[0] in STITCH_GROUPS or setting == "dataset.num_classes_train")


def condition_values(config: dict, stitched: bool = True) -> dict:
    """A run's condition columns from its resolved config; a setting the run does not read reads
    :data:`NOT_READ` (``stitched=False``: a structural index's row, which reads the models' settings
    and none of the stitch's)."""
    values = {}
    for column, (group, key) in CONDITIONS.items():
        read = applies(f"{group}.{key}", config) and (stitched or index_reads(f"{group}.{key}", config))
        value = (config.get(group) or {}).get(key) if read else NOT_READ
        values[column] = json.dumps(value) if isinstance(value, list) else value
    shortcut = config.get("shortcut") or {}
    values["shortcut"] = f"{shortcut['kind']}/{shortcut['placement']}" if shortcut.get("kind") else "none"
    values.update({f"{side}_group": group_of(config, side) for side in ("front", "end")})
    return values


def group_of(config: dict, side: str) -> str | None:
    """The group (``groups.members``) of a side's model, named by its ``groups.by`` setting."""
    groups = config.get("groups") or {}
    name = (config.get(side) or {}).get(groups.get("by") or "name")
    return next((group for group, models in (groups.get("members") or {}).items() if name in models), None)


def load_runs(folder: str | Path) -> pd.DataFrame:
    """Every run record under ``folder`` (a run, sweep, grid, claims or grounding folder) as one
    tidy DataFrame, one row per run or grid cell.

    Columns: ``run`` (its folder, relative), ``status`` (``ok``, ``failed``, or ``invalid`` for a
    record the schema refuses) and ``error``; the objective, both layers and their names; the
    conditions read from the run's config (models, seeds, datasets, stitch settings); every
    metric (``test_acc``, ``test_penalty``…); the base models' keys, accuracies and where they
    came from (``front_source``: trained here, file or hub); ``score`` (higher is more similar);
    ``time_<section>_s`` and ``seconds``; ``config_hash``. Rows of ``similarity.csv`` files
    (``python -m stitching.similarity``) join with their index as the objective.
    """
    return _frame(_rows(folder))


def _rows(folder: str | Path) -> list[dict]:
    """The rows of :func:`load_runs`, as dicts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StitchingError(f"{folder} is not a folder; pass the folder a run, sweep or grid wrote")
    rows = []
    for path in sorted(folder.rglob("results.json")):
        run = str(path.parent.relative_to(folder))
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            rows.append({"run": run, "status": "invalid", "error": f"unreadable results.json ({err})"})
            continue
        if not isinstance(record, dict):
            rows.append({"run": run, "status": "invalid",
                         "error": f"malformed results.json (a {type(record).__name__}, not a record)"})
            continue
        if record.get("status") != "ok":
            rows.append({"run": run, "status": "failed", "error": str(record.get("error", "unknown failure")),
                         **{k: record.get(k) for k in ("objective", "front_layer", "end_layer") if k in record}})
            continue
        wrong = problems(record, path.parent)
        if wrong:  # never a table entry, never averaged into a figure
            rows.append({"run": run, "status": "invalid", "error": f"invalid results.json: {'; '.join(wrong[:3])}"
                                                                     + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")})
            continue
        rows.append({**record_row(run, record), "status": "ok", "error": None})
    ok = [row for row in rows if row["status"] == "ok"]
    adjusted = all(row.get("test_adjusted_penalty") is not None for row in ok if row.get("test_penalty") is not None)
    for row in ok:
        row["score"] = stitching_score(row, adjusted)
    for path in sorted(folder.rglob("similarity.csv")):
        run = str(path.parent.relative_to(folder))
        try:
            rows += pd.read_csv(path).assign(run=run, status="ok", error=None).to_dict("records")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            rows.append({"run": run, "status": "invalid", "error": f"unreadable similarity.csv ({err})"})
    for row in rows:
        if row.get("front_model") is not None:
            row["pairing"] = "self" if row["front_model"] == row.get("end_model") else "two models"
    return rows


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Rows in reading order: successful runs first, by objective (the papers' order) and layers."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {name: i for i, name in enumerate(OBJECTIVE_ORDER)}
    statuses = {"ok": 0, "failed": 1, "invalid": 2}
    keys = [c for c in ("status", "objective", "front_layer", "end_layer") if c in frame]
    frame = frame.sort_values(keys, na_position="last", kind="stable", key=lambda c: (
        c.map(order) if c.name == "objective" else c.map(statuses) if c.name == "status" else c))
    return frame.reset_index(drop=True)


def collect(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """The successful rows of :func:`load_runs` (what tables and figures show) and a list of
    ``{run, error}`` for the others."""
    return read_runs(sweep_dir)[1:]


def read_runs(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """One reading of ``folder``'s records: :func:`load_runs`'s frame, the successful rows alone
    (their columns and types as if nothing had failed) and the ``{run, error}`` of the others."""
    rows = _rows(folder)
    failed = [{"run": row["run"], "error": row["error"]} for row in rows if row["status"] != "ok"]
    ok = [{k: v for k, v in row.items() if k not in ("status", "error")} for row in rows if row["status"] == "ok"]
    return _frame(rows), _frame(ok), failed


def stitching_score(row: dict, adjusted: bool = True) -> float | None:
    """Higher is more similar: accuracy; for a language model minus its penalty (nats/token),
    the adjusted one (over the self-stitch baseline) when ``adjusted``; for a bare encoder
    minus the output's relative error."""
    if row.get("test_acc") is not None:
        return row["test_acc"]
    if row.get("test_penalty") is not None:
        return -row["test_adjusted_penalty" if adjusted else "test_penalty"]
    return None if row.get("test_loss") is None else -row["test_loss"]


def penalty_metric(rows: pd.DataFrame) -> tuple[str, str]:
    """The language-model penalty a table or figure of ``rows`` shows, and its label: the
    adjusted penalty (stitched − self-stitched loss) when every penalty has its baseline, else
    the raw one (stitched − end model's loss), said so."""
    penalties = rows[rows.test_penalty.notna()] if "test_penalty" in rows else rows.iloc[:0]
    if "test_adjusted_penalty" in penalties and penalties.test_adjusted_penalty.notna().all():
        return "test_adjusted_penalty", "adjusted penalty (nats/token)"
    return "test_penalty", "raw penalty (nats/token, no self-stitch baseline)"


def cost_label(rows: pd.DataFrame) -> str | None:
    """What a grid of stitching runs without accuracy shows instead (lower is better)."""
    if "test_acc" in rows and rows.test_acc.notna().any():
        return None
    if "test_penalty" in rows and rows.test_penalty.notna().any():
        return penalty_metric(rows)[1]
    if "test_loss" in rows and rows.test_loss.notna().any():
        return "output relative error"
    return None


def record_row(run: str, record: dict) -> dict:
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
        **{f"{side}_source": (base[side].get("source") or {}).get("kind") for side in ("front", "end")},
        "front_layer_name": record.get("front_layer_name"),
        "end_layer_name": record.get("end_layer_name"),
        "stitch_parameters": (record.get("stitch") or {}).get("parameters"),
        **({"stitch_lr": record["stitch"]["lr"]} if (record.get("stitch") or {}).get("lr") is not None else {}),
        **{f"time_{k}": v for k, v in record["timings"].items() if k != "total_s"},
        "seconds": record["timings"]["total_s"],
        "config_hash": record.get("config_hash"),
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
