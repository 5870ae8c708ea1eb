"""``python -m stitching.train`` — stitch two base models at one pair of layers.

Reads top to bottom: data → base models from the zoo → cut → DM initialisation → train
the stitch under the objective → test → ``results.json`` in the run directory.
"""

from __future__ import annotations

import copy
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stitching.data import ImageDataModule, save_examples
from stitching.evaluate import (
    cached_robust_metrics,
    evaluation_settings,
    ood_metrics,
    penultimate_cka,
    robust_metrics,
    testbed_metrics,
)
from stitching.errors import StitchingError
from stitching.models import cut_point_names, resolve_layer, split
from stitching.objectives import OBJECTIVES, StitchedNetwork, StitchingModule
from stitching.runtime import Stopwatch, build_logger, build_trainer, release_memory, versions, write_json_atomic
from stitching.stitch import fit_dm, make_stitch
from stitching.zoo import ModelSpec, ModelZoo

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The project's config with ``overrides``, outside a Hydra run (for the other CLIs)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as err:  # Hydra's own first line names the bad override
        raise StitchingError(str(err).splitlines()[0]) from None


def dataset_config(cfg: DictConfig, name: str) -> dict:
    """The resolved ``dataset`` group for ``name`` (the run's own one when it matches)."""
    if name == cfg.dataset.name:
        return OmegaConf.to_container(cfg.dataset, resolve=True)
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")))
        raise StitchingError(f"unknown dataset '{name}'; choose one of {known}")
    merged = OmegaConf.merge({"paths": cfg.paths}, {"dataset": OmegaConf.load(path)})
    return OmegaConf.to_container(merged.dataset, resolve=True)


def build_zoo(cfg: DictConfig) -> ModelZoo:
    def datamodule_for(name: str) -> ImageDataModule:
        # base models always see their full training split
        options = {**dataset_config(cfg, name), "num_classes_train": None, "train_subset": None}
        return ImageDataModule(**options)

    trainer = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
               if k not in ("max_epochs", "limit_train_batches", "limit_test_batches")}
    return ModelZoo(cfg.zoo.dir, OmegaConf.to_container(cfg.zoo.recipe, resolve=True), datamodule_for,
                    trainer_options=trainer, train_missing=cfg.zoo.train_missing)


def model_spec(side: DictConfig) -> ModelSpec:
    depth = side.get("depth")
    return ModelSpec(arch=side.arch, width=int(side.width), dataset=side.dataset, seed=int(side.seed),
                     robust=bool(side.robust), depth=int(depth) if depth is not None else None)


def check_compatible(front, end, datamodule: ImageDataModule, probe: torch.Tensor) -> None:
    """Fail early, in one line, on pairs that cannot be stitched on these data."""
    for side, model in (("front", front), ("end", end)):
        try:
            with torch.no_grad():
                model.eval()(probe)
        except RuntimeError as err:
            raise StitchingError(
                f"the {side} model cannot read {datamodule.name} images of shape {tuple(probe.shape[1:])} "
                f"({str(err).splitlines()[0][:100]}); pick base models trained on compatible inputs"
            ) from None
    classes = getattr(end, "num_classes", None)
    if classes is not None and classes != datamodule.num_classes:
        raise StitchingError(
            f"the end model predicts {classes} classes but {datamodule.name} has {datamodule.num_classes}; "
            f"the stitching data must be the end model's task"
        )


def build_stitched(front, end, front_layer: int, end_layer: int, probe: torch.Tensor, update_bn: bool,
                   class_token: str = "shared"):
    """Deep-copied front head and end tail joined by a fresh stitch."""
    front_head, _ = split(copy.deepcopy(front), front_layer)
    _, end_tail = split(copy.deepcopy(end), end_layer)
    reference_head, _ = split(end, end_layer)
    with torch.no_grad():
        a_front = front_head.eval()(probe)
        a_end = reference_head.eval()(probe)
    try:
        if class_token not in ("shared", "separate"):
            raise ValueError(f"unknown stitch.class_token '{class_token}'; choose shared or separate")
        stitch = make_stitch(a_front, a_end, separate_class_token=class_token == "separate")
    except ValueError as err:
        raise StitchingError(str(err)) from None
    return StitchedNetwork(front_head, stitch, end_tail, update_bn=update_bn), reference_head


@dataclass
class Prepared:
    """Everything a stitching run needs before training."""

    datamodule: ImageDataModule
    front: torch.nn.Module
    end: torch.nn.Module
    front_record: dict
    end_record: dict
    front_layer: int
    end_layer: int
    module: StitchingModule


def prepare(cfg: DictConfig, watch: Stopwatch | None = None) -> Prepared:
    """Data, base models, cut, DM initialisation and the objective's LightningModule."""
    watch = watch or Stopwatch()
    objective = cfg.objective.name
    if objective not in OBJECTIVES:
        raise StitchingError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with watch.section("data_s"):
        datamodule = ImageDataModule(**dataset_config(cfg, cfg.dataset.name),
                                     shortcut=OmegaConf.to_container(cfg.shortcut, resolve=True))
        datamodule.setup()
        samples = datamodule.sample_train_images(cfg.stitch.dm_samples, seed=cfg.seed)
    with watch.section("zoo_s"):
        zoo = build_zoo(cfg)
        front, front_record = zoo.get(model_spec(cfg.front), cfg.front.checkpoint)
        end, end_record = zoo.get(model_spec(cfg.end), cfg.end.checkpoint)
    check_compatible(front, end, datamodule, samples[:2])
    # training a missing base model consumes random numbers: reseed so that a run does not
    # depend on whether its base models were cached
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    i = resolve_layer(front, cfg.stitch.front_layer)
    j = resolve_layer(end, cfg.stitch.end_layer)
    with watch.section("dm_init_s"):
        network, reference_head = build_stitched(front, end, i, j, samples[:2], cfg.stitch.update_bn,
                                                 cfg.stitch.get("class_token", "shared"))
        fit_dm(network.stitch, network.front, reference_head, samples)
    options = {}
    if objective == "fula":
        weights = cfg.objective.get("weights", "uniform")
        options["weights"] = OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights
    module = OBJECTIVES[objective](network, end, j, datamodule.num_classes, lr=cfg.stitch.lr,
                                   weight_decay=cfg.stitch.weight_decay,
                                   adversarial=OmegaConf.to_container(cfg.attack, resolve=True), **options)
    return Prepared(datamodule, front, end, front_record, end_record, i, j, module)


def run(cfg: DictConfig, run_dir: Path, sweep_name: str | None = None) -> dict:
    """One stitching run; returns the record also written to ``run_dir/results.json``."""
    watch = Stopwatch()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg, watch)
    datamodule, front, end, module = prep.datamodule, prep.front, prep.end, prep.module
    i, j = prep.front_layer, prep.end_layer
    network, objective = module.network, cfg.objective.name
    config = OmegaConf.to_container(cfg, resolve=True)
    logger_options = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_options.get("group") is None and sweep_name:
        logger_options["group"] = sweep_name  # the runs of one sweep share a W&B group
    logger = build_logger(logger_options, run_dir, run_name=f"{objective}_f{i}_e{j}", config=config)
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    init_metrics = {}
    if cfg.evaluation.penultimate_cka:
        with watch.section("init_eval_s"):
            attack = OmegaConf.to_container(cfg.attack, resolve=True)
            init_metrics["init/penultimate_cka"] = penultimate_cka(network, copy.deepcopy(end), datamodule, attack,
                                                                   _eval_device(cfg))
    train_metrics = {}
    with watch.section("fit_s"):
        if module.trainable and trainer_options.get("max_epochs", 0) != 0:
            fitter = build_trainer(trainer_options, run_dir, logger=logger)
            fitter.fit(module, datamodule=datamodule)
            train_metrics = {k.removesuffix("_epoch"): float(v) for k, v in fitter.callback_metrics.items()
                             if k.startswith("train/") and not k.endswith("_step")}
    with watch.section("test_s"):
        tester = build_trainer(trainer_options, run_dir, logger=logger, enable_progress_bar=False)
        test_metrics = tester.test(module, datamodule=datamodule, verbose=False)[0]
    torch.save(network.stitch.state_dict(), run_dir / "stitch.pt")

    with watch.section("eval_s"):
        extra, base, evaluation = evaluate_testbeds(cfg, prep)

    metrics = {**{k: float(v) for k, v in test_metrics.items()}, **train_metrics, **extra, **init_metrics}
    record = {
        "status": "ok",
        "objective": objective,
        "front_layer": i, "end_layer": j,
        "front_layer_name": cut_point_names(front)[i - 1], "end_layer_name": cut_point_names(end)[j - 1],
        "metrics": metrics,
        "base": base,
        "evaluation": evaluation,
        "stitch": {"parameters": sum(p.numel() for p in network.stitch.parameters()),
                   "in_channels": network.stitch.channels[0],
                   "out_channels": network.stitch.channels[1],
                   "out_size": list(network.stitch.out_size)},
        "timings": watch.report(),
        "versions": versions(),
        "config": config,
    }
    write_json_atomic(run_dir / "results.json", record)
    if logger:
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        if hasattr(logger, "experiment") and cfg.logger.kind == "wandb":
            logger.experiment.finish()
    return record


def evaluate_testbeds(cfg: DictConfig, prep: Prepared) -> tuple[dict, dict, dict]:
    """Testbed metrics of the stitched network, the base models' own, and what was evaluated."""
    attack = OmegaConf.to_container(cfg.attack, resolve=True)
    device = _eval_device(cfg)
    datamodule, network = prep.datamodule, prep.module.network
    metrics = testbed_metrics(network, datamodule, device)
    metrics.update({f"test/{k}": v for k, v in robust_metrics(network, datamodule, attack, device, cfg.seed).items()})
    base = {}
    for side, model, record in (("front", prep.front, prep.front_record), ("end", prep.end, prep.end_record)):
        base[side] = {"key": record["key"], "test_acc": record["test_acc"], "dataset": cfg[side].dataset}
        if cfg[side].dataset == cfg.dataset.name and (attack["eval_pgd"] or attack["eval_autoattack"]):
            # base models are attacked on their own task only, once per attack setting
            base[side].update(cached_robust_metrics(model, record["path"], datamodule, attack, device, cfg.seed))
    if cfg.evaluation.ood.enabled:
        options = OmegaConf.to_container(cfg.evaluation.ood, resolve=True)
        metrics.update(ood_metrics(network, prep.end, prep.end_layer, prep.end_record["path"], datamodule, options,
                                   device, cfg.seed, outlier_dataset=lambda name: _outlier_arrays(cfg, name)))
    evaluation = evaluation_settings(attack, cfg.shortcut, datamodule)
    if cfg.evaluation.ood.enabled:
        evaluation["ood"] = {**OmegaConf.to_container(cfg.evaluation.ood, resolve=True), "end_layer": prep.end_layer}
    if datamodule.shortcut is not None:
        example = Path(cfg.paths.output_dir) / "shortcut_examples" / (
            f"{datamodule.name}-{cfg.shortcut.kind}-{cfg.shortcut.placement}-s{cfg.shortcut.seed}.png")
        if not example.is_file():
            save_examples(datamodule.shortcut, datamodule.arrays.train_x, datamodule.arrays.train_y, example)
        evaluation["shortcut_examples"] = str(example)
    return metrics, base, evaluation


def _outlier_arrays(cfg: DictConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test images in [0, 1] of the dataset ``name`` (an OOD detector's outliers)."""
    datamodule = ImageDataModule(**{**dataset_config(cfg, name), "num_classes_train": None, "train_subset": None})
    datamodule.setup()
    return datamodule.arrays.train_x.float().div(255), datamodule.arrays.test_x.float().div(255)


def _eval_device(cfg: DictConfig) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def summary(record: dict, run_dir: Path) -> str:
    base = record["base"]
    m = record["metrics"]
    lines = [
        f"stitching  {record['objective'].upper()}  front layer {record['front_layer']} ({record['front_layer_name']})"
        f" → end layer {record['end_layer']} ({record['end_layer_name']})",
        f"  front {base['front']['key']:<40} test acc {base['front']['test_acc']:.4f}",
        f"  end   {base['end']['key']:<40} test acc {base['end']['test_acc']:.4f}",
        f"  stitched test acc {m['test/acc']:.4f}   test loss {m['test/loss']:.4f}"
        + (f"   train loss {m['train/loss']:.4f}" if "train/loss" in m else ""),
    ]
    extra = {k: v for k, v in m.items() if k.startswith("test/") and k not in ("test/acc", "test/loss")}
    if extra:
        lines.append("  " + "   ".join(f"{k.removeprefix('test/')} {v:.4f}" for k, v in extra.items()))
    for side in ("front", "end"):
        robust = {k: v for k, v in base[side].items() if k.startswith("robust_acc")}
        if robust:
            lines.append(f"  {side} " + "   ".join(f"{k} {v:.4f}" for k, v in robust.items()))
    lines += [f"  time {record['timings']['total_s']:.1f}s   record {run_dir / 'results.json'}"]
    return "\n".join(lines)


def _failure_record(cfg: DictConfig, run_dir: Path, err: BaseException) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "results.json", {
        "status": "failed", "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(), "objective": cfg.objective.name,
        "config": OmegaConf.to_container(cfg, resolve=False),
    })


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        record = run(cfg, run_dir, sweep_name=Path(hydra_cfg.sweep.dir).name if sweeping else None)
    except Exception as err:
        release_memory()
        _failure_record(cfg, run_dir, err)
        if sweeping:  # one bad cell must not end the sweep
            print(f"[sweep] run {run_dir} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        if isinstance(err, StitchingError):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    print(summary(record, run_dir))
    release_memory()  # a sweep's runs share this process under the basic launcher
    return record["metrics"]["test/acc"]


if __name__ == "__main__":
    main()
