"""What a finished run's ``results.json`` must hold before anything reads it as a result.

A record is checked where it is read (the report, a resumed sweep): the fields a table row
is made of have their types and ranges, the record's config still hashes to its
``config_hash``, and the folder it sits in is the cell it says it is (a grid cell's
``f<i>-e<j>`` folder, a sweep cell's ``.hydra/config.yaml``). A record that fails is a named
failure, never a table entry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

#: a metric whose name says it is a share: accuracy, agreement, AUROC, CKA
SHARE = re.compile(r"(^|[/_])(acc|accuracy|agreement|auroc|cka)($|[/_])")
CELL_FOLDER = re.compile(r"f(\d+)-e(\d+)")
OBJECTIVES = ("dm", "hint", "fula", "slm", "tlm")


#: config groups that never change a stitching run's result: how it is logged, and the settings
#: of the other tools (a fused grid's cell hashes as its single run)
NOT_HASHED = ("logger", "grid", "probe", "grounding", "similarity", "claims", "groups")


#: settings added after records were made, each with the value that does what runs did before
#: it existed: at that value a setting is left out of the hash, so those records still resume
#: (``datasets``: no dataset but the run's own is given settings)
ADDED_LATER = {"datasets": {}, "evaluation.ood.detector": "tail", "evaluation.ood.pretrain_epochs": None,
               "evaluation.ood.width": None, "stitch.dm_bn_pass": False,
               "dataset.base_images": None, "dataset.test_subset": None}


def _drop_added_later(config: dict) -> dict:
    for dotted, before in ADDED_LATER.items():
        *parents, key = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == before:
            node.pop(key)
    return config


#: groups of :data:`NOT_HASHED` that records made before they joined it still hashed (``groups``
#: only tells the report how to read runs): such a record's hash is checked with them kept
HASHED_BEFORE = ("groups",)


def config_hash(config: DictConfig | dict, hashed: tuple[str, ...] = ()) -> str:
    """What decides a run's result: its resolved config, less how it is logged (and less
    ``stitch.layer``, which only gives the two cut points their default, and the
    :data:`ADDED_LATER` settings at their earlier behaviour). ``hashed``: groups of
    :data:`NOT_HASHED` to keep (the hash of an older record, :data:`HASHED_BEFORE`)."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    config = _drop_added_later(copy.deepcopy({k: v for k, v in config.items()
                                              if k not in NOT_HASHED or k in hashed}))
    if isinstance(config.get("stitch"), dict):  # stitch.layer only defaults front_layer and end_layer, both hashed
        config["stitch"] = {k: v for k, v in config["stitch"].items() if k != "layer"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _layer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def metric_problem(name: str, value) -> str | None:
    """Why ``value`` cannot be metric ``name`` (``None`` when it can)."""
    if not _number(value):
        return f"metric {name} = {value!r} is not a finite number"
    if SHARE.search(name) and not -1e-6 <= value <= 1 + 1e-6:
        return f"metric {name} = {value} is a share outside [0, 1]"
    return None


def problems(record: dict, folder: Path | None = None) -> list[str]:
    """Everything wrong with an ``ok`` record (empty: it can be read as a result)."""
    found = []
    if record.get("objective") not in OBJECTIVES:
        found.append(f"objective {record.get('objective')!r} is not one of {', '.join(OBJECTIVES)}")
    for key in ("front_layer", "end_layer"):
        if not _layer(record.get(key)):
            found.append(f"{key} = {record.get(key)!r} is not a cut point (an integer ≥ 1)")
    metrics = record.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        found.append("no metrics")
    else:
        found += [line for name, value in metrics.items() if (line := metric_problem(name, value))]
    base = record.get("base")
    for side in ("front", "end"):
        model = base.get(side) if isinstance(base, dict) else None
        if not isinstance(model, dict) or not isinstance(model.get("key"), str):
            found.append(f"base.{side} names no model")
            continue
        for name, value in model.items():
            if name != "key" and (name.endswith("acc") or "robust_acc" in name) and value is not None:
                if (line := metric_problem(f"base.{side}.{name}", value)):
                    found.append(line)
    timings = record.get("timings")
    if not isinstance(timings, dict) or not _number(timings.get("total_s")) or timings["total_s"] < 0:
        found.append("timings.total_s is not a duration")
    config = record.get("config")
    if not isinstance(config, dict):
        found.append("no config")
    elif record.get("config_hash") is not None:
        try:
            if record["config_hash"] not in (config_hash(config), config_hash(config, HASHED_BEFORE)):
                found.append("its config does not hash to its config_hash (the record was edited)")
        except Exception as err:  # noqa: BLE001 - a config that does not even hash is a problem to name
            found.append(f"its config cannot be hashed ({type(err).__name__})")
    if folder is not None and not found:
        found += folder_problems(record, Path(folder))
    return found


def folder_problems(record: dict, folder: Path) -> list[str]:
    """Whether the record sits in its own cell's folder."""
    found = []
    cell = CELL_FOLDER.fullmatch(folder.name)
    if cell and (int(cell[1]), int(cell[2])) != (record["front_layer"], record["end_layer"]):
        found.append(f"it records layers f{record['front_layer']}-e{record['end_layer']} in the folder of cell "
                     f"{folder.name} (copied from another cell?)")
    if cell and folder.parent.name in OBJECTIVES and folder.parent.name != record["objective"]:
        found.append(f"it records objective {record['objective']} in the {folder.parent.name} grid's folder")
    hydra = folder / ".hydra" / "config.yaml"
    if hydra.is_file():
        found += _config_problems(record["config"], hydra)
    return found


def _config_problems(config: dict, path: Path) -> list[str]:
    """Settings of the folder's own Hydra config (those without interpolations) that the
    record's config contradicts."""
    try:
        folder_config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - an unreadable .hydra file says nothing about the record
        return []
    differing = []

    def walk(mine, theirs, prefix):
        if isinstance(mine, dict):
            if not isinstance(theirs, dict):
                return
            for key, value in mine.items():
                if key in theirs:
                    walk(value, theirs[key], f"{prefix}{key}.")
        elif not (isinstance(mine, str) and "${" in mine) and mine != theirs:
            differing.append(f"{prefix[:-1]}: {theirs!r} recorded, {mine!r} in {path.parent.parent.name}'s config")

    walk({k: v for k, v in folder_config.items() if k != "hydra"}, config, "")
    return [f"its config is not its folder's ({'; '.join(differing[:2])}"
            + (f"; +{len(differing) - 2} more" if len(differing) > 2 else "") + ")"] if differing else []
