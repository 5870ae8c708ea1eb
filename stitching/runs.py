"""One stitching run and its record: the library behind ``python -m stitching.train``,
the fused grid's cells, grounding and the bench.

:func:`run` reads top to bottom: data → base models from the zoo → cut → DM initialisation →
train the stitch under the objective → test → ``results.json`` in the run directory
(:func:`finish_run`, which a fused grid calls for each of its cells). A failed run leaves
:func:`failure_record`; :func:`config_hash` and :func:`finished_record` let a rerun keep what
it finished.
"""

from __future__ import annotations

import copy
import hashlib
import json
import traceback
from contextlib import suppress
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from stitching.build import Run, is_text, outlier_arrays, prepare
from stitching.data import save_examples
from stitching.data.text import PairDataModule
from stitching.evaluate import (
    base_accuracy,
    cached_robust_metrics,
    evaluation_settings,
    ood_metrics,
    pair_metrics,
    penultimate_cka,
    robust_metrics,
    testbed_metrics,
)
from stitching.engine import cell_key, fit_engine
from stitching.errors import NonFiniteError, StitchingError
from stitching.models import cut_point_names
from stitching.runtime import Stopwatch, build_logger, cache_warning, versions, write_json_atomic


def run(cfg: DictConfig, run_dir: Path, sweep_name: str | None = None) -> dict | None:
    """One stitching run (an engine of one cell); returns the record also written to
    ``run_dir/results.json`` (``None`` in a DDP run's other processes, which write nothing). A
    stitch that diverged raises :class:`NonFiniteError`."""
    watch = Stopwatch()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg, watch)
    settings = prep.settings
    i, j, objective = prep.front_layer, prep.end_layer, settings.objective
    config = OmegaConf.to_container(cfg, resolve=True)
    logger_options = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_options.get("group") is None and sweep_name:
        logger_options["group"] = sweep_name  # the runs of one sweep share a W&B group
    logger = build_logger(logger_options, run_dir, run_name=f"{objective}_f{i}_e{j}", config=config)
    try:
        init_metrics = initial_metrics(cfg, prep, watch)
        results = fit_engine(prep.engine, prep.datamodule.train_dataloader(), prep.datamodule.test_dataloader(),
                             settings.trainer, logger=logger, run_dir=run_dir, watch=watch)
        if not prep.engine.primary:  # another process of a DDP run: the first one writes the record
            return None
        cell = results[cell_key(i, j)]
        if cell["error"] is not None:
            raise cell["error"]
        record = finish_run(cfg, prep, {**cell["metrics"], **init_metrics}, watch, run_dir,
                            curve={"train/loss": cell["curve"]} if cell["curve"] else None)
        if logger:
            logger.log_metrics({f"final/{k}": v for k, v in record["metrics"].items()})
    finally:  # a W&B run is closed whether the stitching run finished or failed
        if logger and hasattr(logger, "experiment") and cfg.logger.kind == "wandb":
            logger.experiment.finish()
    return record


def initial_metrics(cfg: DictConfig, prep: Run, watch: Stopwatch) -> dict:
    """What is measured on the stitched network at its start, before training
    (``evaluation.penultimate_cka``: the DM-initialised network against the end model, Fig. 6)."""
    if not cfg.evaluation.penultimate_cka:
        return {}
    with watch.section("init_eval_s"):
        network = prep.engine.network(*prep.prepared.cell)  # its start; the run's own view is read after training
        return {"init/penultimate_cka": penultimate_cka(network, copy.deepcopy(prep.end), prep.datamodule,
                                                        prep.settings.attack, prep.settings.device, prep.settings.seed)}


def finish_run(cfg: DictConfig, prep: Run, metrics: dict, watch: Stopwatch, run_dir: Path,
               timings: dict | None = None, curve: dict | None = None) -> dict:
    """Save the trained stitch, evaluate the testbeds and write ``results.json`` (the single
    run's and each cell of a fused grid's); return the record. ``curve``: per-epoch values
    (``{"train/loss": [...]}``), recorded as they are."""
    settings, network = prep.settings, prep.network
    i, j = prep.front_layer, prep.end_layer
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save(network.stitch.state_dict(), run_dir / "stitch.pt")
    with watch.section("eval_s"):
        extra, base, evaluation = evaluate_testbeds(cfg, prep)
    record = {
        "status": "ok",
        "objective": settings.objective,
        "front_layer": i, "end_layer": j,
        "front_layer_name": cut_point_names(prep.front)[i - 1], "end_layer_name": cut_point_names(prep.end)[j - 1],
        "metrics": {**metrics, **extra},
        **({"curve": curve} if curve else {}),
        "base": base,
        "evaluation": evaluation,
        "inputs": prep.inputs,
        "stitch": {"parameters": sum(p.numel() for p in network.stitch.parameters()),
                   "kind": network.stitch.kind,
                   "front_rank": network.stitch.projection.rank if network.stitch.projection is not None else None,
                   "in_channels": network.stitch.channels[0],
                   "out_channels": network.stitch.channels[1],
                   "out_size": list(network.stitch.out_size) if network.stitch.out_size else None,
                   "layouts": {"front": prep.prepared.front.layout.describe(),
                               "end": prep.prepared.end.layout.describe()}},
        "timings": {**watch.report(), **(timings or {})},
        "versions": versions(),
        "config": config,
        "config_hash": config_hash(config),
    }
    write_json_atomic(run_dir / "results.json", record)
    return record


def evaluate_testbeds(cfg: DictConfig, prep: Run) -> tuple[dict, dict, dict]:
    """Testbed metrics of the stitched network, the base models' own, and what was evaluated."""
    attack, device = prep.settings.attack, prep.settings.device
    datamodule, network = prep.datamodule, prep.network
    if is_text(datamodule):  # language models: the test pass measured the losses and the penalty
        base = {side: {"key": record["key"], "test_acc": record.get("test_acc"), "test_loss": record.get("test_loss"),
                       "dataset": cfg[side].dataset, "source": _provenance(record)}
                for side, record in (("front", prep.front_record), ("end", prep.end_record))}
        evaluation = {"kind": "text", "corpus": datamodule.corpus, "tokenizer": datamodule.tokenizer_spec,
                      "context": datamodule.context, "test_sequences": len(datamodule.arrays.test)}
        if not isinstance(datamodule, PairDataModule):
            return {}, base, evaluation
        # sentence pairs: the classifiers' accuracy on the test split and the challenge set (HANS)
        metrics, scores = pair_metrics(network, {"front": prep.front, "end": prep.end}, datamodule, device)
        for side, values in scores.items():
            base[side].update({k: v for k, v in values.items() if base[side].get(k) is None})
        evaluation["challenge"] = datamodule.challenge
        return metrics, base, evaluation
    metrics = testbed_metrics(network, datamodule, device)
    metrics.update({f"test/{k}": v for k, v in robust_metrics(network, datamodule, attack, device, cfg.seed).items()})
    base = {}
    for side, model, record in (("front", prep.front, prep.front_record), ("end", prep.end, prep.end_record)):
        base[side] = {"key": record["key"], "test_acc": record.get("test_acc"), "dataset": cfg[side].dataset,
                      "source": _provenance(record)}
        if base[side]["test_acc"] is None and getattr(model, "num_classes", None) == datamodule.num_classes:
            base[side]["test_acc"] = base_accuracy(model, datamodule, device)  # a given model, on these data
        if cfg[side].dataset == cfg.dataset.name and (attack["eval_pgd"] or attack["eval_autoattack"]):
            # base models are attacked on their own task only, once per attack setting
            base[side].update(cached_robust_metrics(model, record["path"], datamodule, attack, device, cfg.seed))
    if cfg.evaluation.ood.enabled:
        options = OmegaConf.to_container(cfg.evaluation.ood, resolve=True)
        metrics.update(ood_metrics(network, prep.end, prep.end_layer, prep.end_record["path"], datamodule, options,
                                   device, cfg.seed, outlier_dataset=lambda name: outlier_arrays(cfg, name)))
    evaluation = evaluation_settings(attack, cfg.shortcut, datamodule)
    if cfg.evaluation.ood.enabled:
        evaluation["ood"] = {**OmegaConf.to_container(cfg.evaluation.ood, resolve=True), "end_layer": prep.end_layer}
    if datamodule.shortcut is not None:
        example = Path(cfg.paths.output_dir) / "shortcut_examples" / (
            f"{datamodule.name}-{cfg.shortcut.kind}-{cfg.shortcut.placement}-s{cfg.shortcut.seed}.png")
        try:
            if not example.is_file():
                save_examples(datamodule.shortcut, datamodule.arrays.train_x, datamodule.arrays.train_y, example)
            evaluation["shortcut_examples"] = str(example)
        except OSError as err:  # a picture for people, never worth the run's metrics
            cache_warning(example, err)
    return metrics, base, evaluation


def _provenance(record: dict) -> dict:
    """Where a base model came from: trained here (recipe, seed, epochs) or given (file/hub, SHA-256)."""
    if record.get("source", "trained here") == "trained here":
        return {"kind": "trained here", "path": record.get("path"), "seed": record.get("seed", record.get("spec", {}).get("seed")),
                "epochs": record.get("epochs", record.get("recipe", {}).get("epochs")), "recipe": record.get("recipe"),
                **({"sha256": record["sha256"]} if record.get("sha256") else {})}
    return {"kind": record["source"], **{k: record.get(k) for k in ("path", "hub", "sha256", "library", "name")}}


def summary(record: dict, run_dir: Path) -> str:
    base = record["base"]
    m = record["metrics"]
    lines = [
        f"stitching  {record['objective'].upper()}  front layer {record['front_layer']} ({record['front_layer_name']})"
        f" → end layer {record['end_layer']} ({record['end_layer_name']})",
        f"  front {base['front']['key']:<40} {_base_score(base['front'])}",
        f"  end   {base['end']['key']:<40} {_base_score(base['end'])}",
        _stitched_score(m)
        + (f"   train loss {m['train/loss']:.4f}" if "train/loss" in m else ""),
    ]
    extra = {k: v for k, v in m.items() if k.startswith("test/")
             and k not in ("test/acc", "test/loss", "test/end_loss", "test/penalty")}
    if extra:
        lines.append("  " + "   ".join(f"{k.removeprefix('test/')} {v:.4f}" for k, v in extra.items()))
    for side in ("front", "end"):
        robust = {k: v for k, v in base[side].items() if k.startswith("robust_acc")}
        if robust:
            lines.append(f"  {side} " + "   ".join(f"{k} {v:.4f}" for k, v in robust.items()))
    lines += [f"  time {record['timings']['total_s']:.1f}s   record {run_dir / 'results.json'}"]
    return "\n".join(lines)


def _stitched_score(m: dict) -> str:
    if "test/penalty" in m:  # a language model
        return (f"  stitched test loss {m['test/loss']:.4f}   end model's own {m['test/end_loss']:.4f}   "
                f"penalty {m['test/penalty']:+.4f} nats/token")
    if "test/acc" in m:
        return f"  stitched test acc {m['test/acc']:.4f}   test loss {m['test/loss']:.4f}"
    return f"  stitched output's relative error to the end model's own {m['test/loss']:.4f}"  # a bare encoder


def _base_score(base: dict) -> str:
    if base.get("test_acc") is None and base.get("test_loss") is not None:
        return f"test loss {base['test_loss']:.4f} nats/token"
    return f"test acc {'—' if base.get('test_acc') is None else format(base['test_acc'], '.4f')}"


def failure_record(cfg: DictConfig, run_dir: Path, err: BaseException) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "status": "failed", "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(), "objective": cfg.objective.name,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    with suppress(Exception):  # a config that does not resolve has no hash
        record["config_hash"] = config_hash(cfg)
    if isinstance(err, NonFiniteError):
        record["diverged"] = {"what": err.what, "value": str(err.value), "step": err.step}
    write_json_atomic(run_dir / "results.json", record)


#: config groups that never change a stitching run's result: how it is logged, and the settings
#: of the other tools (a fused grid's cell hashes as its single run)
NOT_HASHED = ("logger", "grid", "probe", "grounding", "similarity", "claims")


def config_hash(config: DictConfig | dict) -> str:
    """What decides a run's result: its resolved config, less how it is logged."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    config = {k: v for k, v in config.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultExists(StitchingError):
    """The run folder holds a finished result of another config; it is left as it is."""


def finished_record(run_dir: Path, digest: str) -> dict | None:
    """The ``ok`` record already in ``run_dir`` for this config (a resumed sweep skips the cell),
    ``None`` when the cell is to run (no record, or a failed or unreadable one)."""
    path = run_dir / "results.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok" or "metrics" not in record:
        return None
    if config_hash(record.get("config") or {}) != digest:
        raise ResultExists(f"{path} holds a finished result of a different config; it is left untouched: "
                           f"use another hydra.sweep.dir (or hydra.run.dir), or delete that folder to redo it")
    return record




def score(record: dict) -> float | None:
    """What a cell returns to Hydra's sweeper: accuracy, or a language model's penalty."""
    return record["metrics"].get("test/acc", record["metrics"].get("test/penalty"))
