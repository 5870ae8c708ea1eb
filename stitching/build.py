"""The composition root: config → typed settings (read once) → data, models, cut, module.

:func:`read_settings` is the only reader of the Hydra config: it checks every setting (ranges,
applicability, names) and returns :class:`Settings`. Every builder here, the runs, the grids and
the tools (``train``, ``grid``, ``similarity``, ``probe``, ``grounding``, ``claims``, ``bench``,
``pretrain``) take those settings; a builder given a config reads it through the same door
(:func:`as_settings`). A record's config is ``Settings.config``, the resolved config as a dict.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from stitching.api import Prepared
from stitching.data import ImageDataModule
from stitching.data.text import PairDataModule, TextDataModule
from stitching import CONF_DIR
from stitching.errors import StitchingError, config_error
from stitching.models import LANGUAGE_ARCHITECTURES, LIBRARIES, CuttableModel, cuttable
from stitching.models.cutting import cut
from stitching.models.layout import compatible
from stitching.models.language import LANGUAGE_LIBRARIES, TextInputs
from stitching.stitch_layers import batches
from stitching.models.adapters import check_name
from stitching.engine import StitchEngine
from stitching.objectives import OBJECTIVES, make_objective
from stitching.objectives.tasks import NextToken, task_of
from stitching.runtime import Stopwatch
from stitching.settings import StitchSettings, check_bn_pass, check_capacity, check_class_token, check_init
from stitching.similarity.ood import OUTLIER_KINDS
from stitching.validation import check_config, dataset_names
from stitching.zoo import ModelSpec, ModelZoo


def compose_config(overrides: list[str]) -> DictConfig:
    """The project's config with ``overrides``, outside a Hydra run (for the other CLIs)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as err:  # Hydra's own first line names the bad override
        raise config_error(err) from None


# -- typed settings ------------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    """One base model: which one, and where its weights come from."""

    spec: ModelSpec
    checkpoint: str | None
    inputs: dict | None = None  # a given library model's input convention (``front.input.*`` set)


@dataclass(frozen=True)
class EvaluationSettings:
    """What is measured beside the stitched test metrics (``evaluation.*``)."""

    self_baseline: bool | str  # "auto", True or False
    penultimate_cka: bool
    ood: dict  # the OOD detector's settings; ``ood["enabled"]``


@dataclass(frozen=True)
class ZooSettings:
    """Where base models live, whether a missing one is trained, and how (``zoo.*``)."""

    dir: str
    train_missing: bool
    recipe: dict


@dataclass(frozen=True)
class PathSettings:
    output_dir: str
    data_dir: str
    zoo_dir: str
    baselines_dir: str


@dataclass(frozen=True)
class GridSettings:
    pairs: Any  # "all", "diagonal" or [[i, j], …]
    tail_samples: Any  # "auto", None or a count


@dataclass(frozen=True)
class Settings:
    """What one stitching run is, read once from the config: nothing past :func:`read_settings`
    reads the config itself. ``config`` is the resolved config as a plain dict, what a record
    keeps and what its ``config_hash`` is taken of; ``datasets`` holds every dataset preset
    resolved (the run's own with ``dataset.*``, the others with ``datasets.<name>.*``)."""

    seed: int
    objective: str
    fula_weights: Any
    stitch: StitchSettings
    front: Side
    end: Side
    attack: dict
    shortcut: dict
    trainer: dict
    dataset: str
    datasets: dict
    evaluation: EvaluationSettings
    zoo: ZooSettings
    paths: PathSettings
    grid: GridSettings
    logger: dict
    config: dict

    @property
    def device(self) -> torch.device:
        wants_gpu = self.trainer.get("accelerator") in ("gpu", "cuda", "auto")
        return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")

    def data(self, name: str | None = None) -> dict:
        """The resolved settings of dataset ``name`` (default: the run's own), a copy."""
        name = name or self.dataset
        if name not in self.datasets:
            raise StitchingError(f"unknown dataset '{name}'; choose one of {', '.join(sorted(self.datasets))}")
        return copy.deepcopy(self.datasets[name])

    def for_cell(self, i: int, j: int) -> "Settings":
        """These settings as the single run of cell ``(i, j)`` has them."""
        config = copy.deepcopy(self.config)
        config["stitch"].update(front_layer=i, end_layer=j)
        return replace(self, stitch=replace(self.stitch, front_layer=i, end_layer=j), config=config)

    def self_stitch(self) -> "Settings":
        """The self-stitch baseline of this run: the end model as its own front, cut at the end
        layer (same objective, stitch, data, budget and seed)."""
        config = copy.deepcopy(self.config)
        config["front"] = copy.deepcopy(config["end"])
        j = self.stitch.end_layer
        return replace(self, front=self.end, config=config).for_cell(j, j)


def as_settings(given: "Settings | DictConfig") -> Settings:
    """A config read into settings (settings as they are): the one door of every builder."""
    return given if isinstance(given, Settings) else read_settings(given)


def layer_value(value) -> int | str:
    return int(value) if isinstance(value, int) or str(value).lstrip("-").isdigit() else str(value)


def side_spec(side: DictConfig) -> ModelSpec:
    depth, width = side.depth, side.width
    return ModelSpec(arch=side.arch, width=int(width) if width is not None else None, dataset=side.dataset,
                     seed=int(side.seed), robust=bool(side.robust), depth=int(depth) if depth is not None else None,
                     name=side.name, pretrained=bool(side.pretrained))


def side_inputs(side: DictConfig) -> dict | None:
    """The input-convention settings given for one side (``None`` when none are)."""
    given = {k: v for k, v in (OmegaConf.to_container(side.input, resolve=True)).items() if v is not None}
    return given or None


def read_settings(cfg: DictConfig) -> Settings:
    """Typed settings of a run; a bad choice or a value out of range is one line here,
    before any work."""
    check_config(cfg)
    check_outliers(cfg)
    objective = cfg.objective.name
    if objective not in OBJECTIVES:
        raise StitchingError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    stitch = cfg.stitch
    class_token = stitch.class_token
    check_class_token(class_token)
    check_init(str(stitch.init), objective)
    check_bn_pass(bool(stitch.dm_bn_pass), objective, bool(stitch.update_bn))
    check_capacity(str(stitch.kind), stitch.rank, stitch.front_rank)
    weights = cfg.objective.get("weights", "uniform")
    check_self_baseline(cfg)
    for side in ("front", "end"):  # a misspelt model name is one line before any base model is trained
        arch, name = cfg[side].arch, cfg[side].name
        text = dataset_config(cfg, cfg[side].dataset).get("kind") == "text"
        if (arch in LANGUAGE_ARCHITECTURES or arch in LANGUAGE_LIBRARIES) != text:
            what, data = ("a language model", "images") if not text else ("an image model", "text")
            raise StitchingError(f"the {side} model is {what} ({side}.arch={arch}) but {cfg[side].dataset} is {data}; "
                                 f"stitch language models on a text dataset (dataset=pydoc) and vision models on images")
        if arch in LIBRARIES:
            check_name(arch, name)
        elif arch in LANGUAGE_LIBRARIES:
            if not name:
                raise StitchingError(f"{side}.name is required for {arch} models (a folder or a hub name)")
        elif cfg[side].pretrained:
            raise StitchingError(f"{side}.pretrained=true applies to timm and torchvision models, not '{arch}'")
    evaluation = OmegaConf.to_container(cfg.evaluation, resolve=True)
    grid = OmegaConf.to_container(cfg.grid, resolve=True)
    return Settings(
        seed=int(cfg.seed), objective=objective,
        fula_weights=OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights,
        stitch=StitchSettings(layer_value(stitch.front_layer), layer_value(stitch.end_layer), int(stitch.dm_samples),
                              bool(stitch.update_bn), class_token,
                              None if stitch.lr is None else float(stitch.lr), float(stitch.weight_decay),
                              str(stitch.init), str(stitch.kind), stitch.rank, stitch.hidden, stitch.front_rank,
                              bool(stitch.dm_bn_pass)),
        front=Side(side_spec(cfg.front), cfg.front.checkpoint, side_inputs(cfg.front)),
        end=Side(side_spec(cfg.end), cfg.end.checkpoint, side_inputs(cfg.end)),
        attack=OmegaConf.to_container(cfg.attack, resolve=True),
        shortcut=OmegaConf.to_container(cfg.shortcut, resolve=True),
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True), dataset=cfg.dataset.name,
        datasets={name: dataset_config(cfg, name) for name in {*dataset_names(), cfg.dataset.name}},
        evaluation=EvaluationSettings(evaluation["self_baseline"], bool(evaluation["penultimate_cka"]),
                                      evaluation["ood"]),
        zoo=ZooSettings(str(cfg.zoo.dir), bool(cfg.zoo.train_missing),
                        OmegaConf.to_container(cfg.zoo.recipe, resolve=True)),
        paths=PathSettings(**{key: str(cfg.paths[key]) for key in ("output_dir", "data_dir", "zoo_dir",
                                                                   "baselines_dir")}),
        grid=GridSettings(grid["pairs"], grid["tail_samples"]),
        logger=OmegaConf.to_container(cfg.logger, resolve=True), config=OmegaConf.to_container(cfg, resolve=True),
    )


def check_self_baseline(cfg: DictConfig) -> None:
    """``evaluation.self_baseline`` applies to a next-token penalty, and trains its baselines in
    one process."""
    wanted = cfg.evaluation.self_baseline
    data = dataset_config(cfg, cfg.dataset.name)
    next_token = data.get("kind") == "text" and not data.get("pairs")
    if wanted is True and not next_token:
        raise StitchingError(f"evaluation.self_baseline=true applies to language models scored by their next-token "
                             f"penalty, not to {cfg.dataset.name}; leave it auto")
    trainer = cfg.trainer
    if wanted is not False and next_token and several_processes(OmegaConf.to_container(trainer, resolve=True)):
        raise StitchingError(f"evaluation.self_baseline trains the self-stitch baselines in one process, not on "
                             f"trainer.devices={trainer.get('devices')} / strategy={trainer.get('strategy')}: set "
                             f"evaluation.self_baseline=false (records keep the raw penalty only) or use one device")


def check_outliers(cfg: DictConfig) -> None:
    """The OOD detector's outlier families name a kind made from the images or a dataset, checked
    before any training (the detector itself is fitted after the stitch)."""
    datasets = dataset_names()
    for key in ("evaluation.ood.outliers", "evaluation.ood.heldout"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in OUTLIER_KINDS and value not in datasets:
            raise StitchingError(f"{key}={value!r} is neither an outlier kind ({', '.join(OUTLIER_KINDS)}) nor a "
                                 f"dataset ({', '.join(datasets)})")


def several_processes(trainer: dict) -> bool:
    """Whether these Lightning Trainer settings may run more than one process (DDP)."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    many = (isinstance(devices, list) and len(devices) > 1) or (isinstance(devices, int) and devices not in (0, 1)) \
        or (devices == "auto" and trainer.get("accelerator") != "cpu")
    return many or str(trainer.get("strategy", "auto")).startswith("ddp") or int(trainer.get("num_nodes") or 1) > 1


# -- builders ------------------------------------------------------------------------------
def dataset_config(cfg: DictConfig, name: str) -> dict:
    """The resolved ``dataset`` group for ``name``: the run's own one (``dataset.*``) when it
    matches, else its preset with ``datasets.<name>.*`` over it (a side's or the outliers' data)."""
    if name == cfg.dataset.name:
        return OmegaConf.to_container(cfg.dataset, resolve=True)
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(dataset_names())
        raise StitchingError(f"unknown dataset '{name}'; choose one of {known}")
    given = OmegaConf.select(cfg, f"datasets.{name}", default=None) or {}  # checked by validation.check_datasets
    merged = OmegaConf.merge({"paths": cfg.paths}, {"dataset": OmegaConf.load(path)}, {"dataset": given})
    return OmegaConf.to_container(merged.dataset, resolve=True)


def build_datamodule(settings: Settings | DictConfig, name: str | None = None,
                     with_testbeds: bool = True) -> ImageDataModule | TextDataModule:
    """The stitching data (``with_testbeds``: shortcuts, class subsets as configured), or a
    dataset's full clean training split (``with_testbeds=False``: what base models see)."""
    settings = as_settings(settings)
    options = settings.data(name)
    if options.get("kind") == "text":  # a corpus of token streams, or labelled sentence pairs
        if not with_testbeds:  # a base model reads the whole corpus, never a run's subset of it
            options = {**options, "train_sequences": None, "test_sequences": None}
        return PairDataModule(**options) if options.get("pairs") else TextDataModule(**options)
    options.pop("kind", None)
    options.pop("attack_eps", None)  # read by the attack group and the zoo, not the data
    options.pop("base_images", None)  # read by the zoo when it trains a base model
    if not with_testbeds:
        return ImageDataModule(**{**options, "num_classes_train": None, "train_subset": None, "test_subset": None})
    return ImageDataModule(**options, shortcut=copy.deepcopy(settings.shortcut))


def build_zoo(settings: Settings | DictConfig) -> ModelZoo:
    settings = as_settings(settings)
    trainer = {k: v for k, v in settings.trainer.items()
               if k not in ("max_epochs", "limit_train_batches", "limit_test_batches")}
    return ModelZoo(settings.zoo.dir, copy.deepcopy(settings.zoo.recipe),
                    lambda name: build_datamodule(settings, name, with_testbeds=False),
                    trainer_options=trainer, train_missing=settings.zoo.train_missing,
                    attack_eps=lambda name: settings.data(name).get("attack_eps"),
                    data_settings=settings.data)


def load_models(settings: Settings | DictConfig, layers: tuple[list, list] | None = None,
                stitched: bool = True, datamodule=None,
                known: dict | None = None) -> tuple[CuttableModel, dict, CuttableModel, dict]:
    """Front and end from the zoo (trained on first use), a file or the hub, with their records
    (``known``: models already loaded, by :func:`model_identity`; what is loaded here is added).

    Before a missing base model is trained, the pair is checked on what the architectures
    declare: every layer in ``layers`` (front, end; default: the stitch's) must exist, when
    ``stitched`` the two cut points' layouts must be joinable, and both must read
    ``datamodule`` (tokenizer, context, image channels) when one is given.
    """
    settings = as_settings(settings)
    zoo = build_zoo(settings)
    sides = {"front": settings.front, "end": settings.end}
    front_layers, end_layers = layers or ([settings.stitch.front_layer], [settings.stitch.end_layer])
    wanted = {"front": front_layers, "end": end_layers}

    def fetch(name: str, side: Side) -> tuple[CuttableModel, dict]:
        model, record = zoo.get(side.spec, side.checkpoint)
        # cut where the layers say (a named module, an attention/MLP sub-layer), read by the convention given
        model = cuttable(model, wanted[name], side.inputs, name, f"{name}.input")
        if side.inputs:
            record = {**record, "inputs": model.input_spec.record()}
        return model, record

    known = {} if known is None else known
    identity = {name: model_identity(name, side, wanted[name]) for name, side in sides.items()}
    got = {name: known[identity[name]] for name in sides if identity[name] in known}
    got.update({name: fetch(name, side) for name, side in sides.items()
                if name not in got and not zoo.needs_training(side.spec, side.checkpoint)})
    declared = {name: got[name][0] if name in got else cuttable(zoo.untrained(side.spec), wanted[name], side=name)
                for name, side in sides.items()}
    check_pair(declared["front"], declared["end"], front_layers, end_layers, stitched)
    if datamodule is not None:
        reconcile_inputs(declared["front"], declared["end"], datamodule)
    for name, side in sides.items():
        if name not in got:
            got[name] = fetch(name, side)
        known[identity[name]] = got[name]
    (front, front_record), (end, end_record) = got["front"], got["end"]
    return front, front_record, end, end_record


def model_identity(name: str, side: Side, layers) -> str:
    """What makes a loaded base model the same object for another setup: its side (it is cut as a
    front or an end), its zoo spec, checkpoint and input convention, and the cut points it is read at."""
    return json.dumps([name, repr(side.spec), str(side.checkpoint), repr(side.inputs), [str(v) for v in layers]])


def check_pair(front: CuttableModel, end: CuttableModel, front_layers: list, end_layers: list,
               stitched: bool = True) -> None:
    """One line if a layer does not exist or (``stitched``) the cut points cannot be joined."""
    cuts = [cut(front, layer) for layer in front_layers], [cut(end, layer) for layer in end_layers]
    if stitched:
        for a, b in zip(*cuts):
            problem = compatible(a.layout, b.layout)
            if problem:
                raise StitchingError(problem)


def is_text(datamodule) -> bool:
    return getattr(datamodule, "kind", "image") == "text"


def reconcile_inputs(front: CuttableModel, end: CuttableModel, datamodule: ImageDataModule | TextDataModule) -> dict:
    """How the stitching data reach each model (resizing, channels, normalisation; for text,
    the tokenizer and sequence length), or one line saying why they cannot."""
    text = is_text(datamodule)
    for side, model in (("front", front), ("end", end)):
        if isinstance(model.input_spec, TextInputs) != text:
            what = "a language model" if not text else "an image model"
            data = "text" if text else "images"
            raise StitchingError(f"the {side} model is {what} but {datamodule.name} is {data}; "
                                 f"stitch language models on a text dataset (dataset=pydoc) and vision models on images")
    if text:
        return {side: reconcile_text(model.input_spec, datamodule, side) for side, model in (("front", front), ("end", end))}
    size = (datamodule.image_size, datamodule.image_size)
    return {side: model.input_spec.reconcile(datamodule.in_channels, size, side)
            for side, model in (("front", front), ("end", end))}


def describe_inputs(inputs: dict) -> list[str]:
    """One line per image model whose input differs from the data as loaded: what is resized,
    repeated and renormalised, and where that convention comes from."""
    lines = []
    for side, how in inputs.items():
        if "model" not in how or (not how["resized"] and not how["grey_repeated"] and how["from"] == "training data"):
            continue
        data, model = "×".join(map(str, how["data"])), "×".join(map(str, how["model"]))
        changes = [f"{data} → {model}" if data != model else f"{data}"]
        changes += ["resized"] if how["resized"] else []
        changes += ["grey repeated"] if how["grey_repeated"] else []
        lines.append(f"[inputs] {side}: {', '.join(changes)}; normalised by mean "
                     f"{[round(v, 4) for v in how['mean']]} std {[round(v, 4) for v in how['std']]} ({how['from']})")
    return lines


def reconcile_text(spec: TextInputs, datamodule: TextDataModule, side: str) -> dict:
    """A language model reads the data only with the tokenizer they were cut with, within its context."""
    tokenizer = datamodule.tokenizer
    if spec.tokenizer is not None and spec.tokenizer != tokenizer.name:
        raise StitchingError(f"the {side} model reads tokens of '{spec.tokenizer}' but {datamodule.name} is tokenised "
                             f"with '{tokenizer.name}'; front, end and data must share one tokenizer (dataset.tokenizer)")
    if tokenizer.vocab_size > spec.vocab_size:
        raise StitchingError(f"the {side} model has {spec.vocab_size} token ids but the tokenizer has "
                             f"{tokenizer.vocab_size}; front, end and data must share one tokenizer")
    spec.check_length(datamodule.context, side)
    return {"tokenizer": tokenizer.name, "context": datamodule.context}


def check_compatible(front: CuttableModel, end: CuttableModel, datamodule: ImageDataModule, probe: torch.Tensor) -> None:
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


def check_sizes(datamodule, settings: Settings | None = None) -> None:
    """Sizes against the data actually loaded: no empty split, and (with ``settings``) at least
    one batch per epoch after ``trainer.limit_*_batches``; DM samples or a subset above what
    there is are said in one line (all there is is used)."""
    arrays = datamodule.arrays
    sizes = {"training": len(arrays.train_y if hasattr(arrays, "train_y") else arrays.train),
             "test": len(arrays.test_y if hasattr(arrays, "test_y") else arrays.test)}
    for split, size in sizes.items():
        if size == 0:
            raise StitchingError(f"the {split} split of {datamodule.name} is empty; check the dataset's settings")
    for key, split in (("train_subset", "training"), ("test_subset", "test")):
        subset = (getattr(datamodule, "subsets", None) or {}).get(key)
        asked = getattr(datamodule, key, None)
        if subset and asked and asked > subset["of"]:
            print(f"[data] dataset.{key}={asked} but the {split} split has {subset['of']} examples: all are used",
                  file=sys.stderr)
    if settings is None:
        return
    if settings.stitch.dm_samples > sizes["training"]:
        print(f"[data] stitch.dm_samples={settings.stitch.dm_samples} but the training split has {sizes['training']} "
              f"examples: DM is fitted on all of them", file=sys.stderr)
    trainer = settings.trainer
    for split, limit_key, size in (("training", "limit_train_batches", sizes["training"]),
                                   ("test", "limit_test_batches", sizes["test"])):
        limit = trainer.get(limit_key)
        if split == "training" and not trainer.get("max_epochs", 1):
            continue  # no training: the DM start is tested as it is
        batches = -(-size // int(datamodule.batch_size))
        kept = batches if limit is None else min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if kept < 1:
            raise StitchingError(f"trainer.{limit_key}={limit} leaves none of the {batches} {split} batches; give at "
                                 f"least {1 / batches:.3g} or a number of batches")


@dataclass
class Setup:
    """What every stitching run of a config shares before any stitch exists: settings, data
    (and the DM samples), the base models with their records, and how the data reach them."""

    settings: Settings
    datamodule: ImageDataModule | TextDataModule
    front: CuttableModel
    end: CuttableModel
    front_record: dict
    end_record: dict
    inputs: dict
    samples: Any
    #: base models loaded so far by the setups that share this one's data (:func:`setup`'s ``like``),
    #: by side, zoo identity and cut points: a model two grids name is one object
    models: dict = field(default_factory=dict, repr=False)


@dataclass
class Run:
    """Everything one stitching run (or one cell of a grid) needs before training."""

    settings: Settings
    datamodule: ImageDataModule
    front: CuttableModel
    end: CuttableModel
    front_record: dict
    end_record: dict
    inputs: dict
    prepared: Prepared

    @property
    def engine(self) -> StitchEngine:
        return self.prepared.engine

    @property
    def network(self):
        return self.prepared.network

    @property
    def front_layer(self) -> int:
        return self.prepared.cell[0]

    @property
    def end_layer(self) -> int:
        return self.prepared.cell[1]


def setup(settings: Settings | DictConfig, watch: Stopwatch | None = None, layers: tuple[list, list] | None = None,
          stitched: bool = True, like: Setup | None = None) -> Setup:
    """Settings, data, DM samples and base models (checked against ``layers``, default the
    stitch's own cut points, before a missing base model is trained). ``like``: the setup of
    settings that differ from these in their models alone, whose data are reused, and whose
    models (and those of every setup sharing them) are reused where these name the same."""
    watch = watch or Stopwatch()
    settings = as_settings(settings)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    if like is not None and beside_models(settings) != beside_models(like.settings):
        raise StitchingError("a setup is shared only by settings that differ in their models alone")
    with watch.section("data_s"):
        if like is not None:
            datamodule, samples = like.datamodule, like.samples
        else:
            datamodule = build_datamodule(settings)
            datamodule.setup()
            datamodule.stream_seed, datamodule.device = settings.seed, settings.device  # batches made on the device
            check_sizes(datamodule, settings)
            sample = datamodule.sample_train_inputs if is_text(datamodule) else datamodule.sample_train_images
            samples = sample(settings.stitch.dm_samples, seed=settings.seed)
    with watch.section("zoo_s"):
        models = {} if like is None else like.models
        front, front_record, end, end_record = load_models(settings, layers, stitched=stitched, datamodule=datamodule,
                                                           known=models)
    inputs = reconcile_inputs(front, end, datamodule)
    for line in describe_inputs(inputs):
        print(line, flush=True)
    check_compatible(front, end, datamodule, batches(samples, 2)[0])
    if settings.evaluation.self_baseline is True and not isinstance(task_of(end), NextToken):
        raise StitchingError(f"evaluation.self_baseline=true applies to language models scored by their next-token "
                             f"penalty; the end model is scored by its {task_of(end).name} loss: leave it auto")
    return Setup(settings, datamodule, front, end, front_record, end_record, inputs, samples, models)


def beside_front(settings: Settings) -> str:
    """Everything of a run's settings but its front model and cut points (the data, end model,
    objective, stitch and budget), as one string."""
    return _beside(settings, ("front",))


def beside_models(settings: Settings) -> str:
    """Everything of a run's settings but its models and cut points (the data, objective, stitch
    and budget), as one string: runs with the same can share a setup and, where their ends keep no
    running statistics, an engine."""
    return _beside(settings, ("front", "end"))


def _beside(settings: Settings, left_out: tuple[str, ...]) -> str:
    config = {key: value for key, value in settings.config.items() if key not in left_out}
    config["stitch"] = {key: value for key, value in config["stitch"].items()
                        if key not in ("layer", "front_layer", "end_layer")}
    config["grid"] = {key: value for key, value in config.get("grid", {}).items() if key != "pairs"}
    return json.dumps(config, sort_keys=True, default=str)


def make_engine(done: Setup, cells: list[tuple], watch: Stopwatch | None = None, tail_chunk: int | None = None,
                fronts: dict[str, CuttableModel] | None = None,
                ends: dict[str, CuttableModel] | None = None) -> StitchEngine:
    """The engine that trains ``cells`` (DM solutions, or the configured start, included);
    ``fronts``: several grids' fronts, ``cells`` then ``(grid name, i, j)``, into ``done``'s end
    or, ``ends``, each into its own."""
    watch = watch or Stopwatch()
    settings = done.settings
    with watch.section("dm_init_s"):
        return StitchEngine(fronts or done.front, ends or done.end, cells,
                            make_objective(settings.objective, settings.fula_weights),
                            settings.stitch, done.samples, num_classes=done.datamodule.num_classes,
                            adversarial=settings.attack, seed=settings.seed, tail_chunk=tail_chunk,
                            device=settings.device)


def cell_run(done: Setup, engine: StitchEngine, cell: tuple[int, int], front_name: str = "") -> Run:
    """Cell ``cell`` (of front ``front_name`` in an engine of several) of ``engine`` as one
    stitching run (its record's settings name its layers)."""
    settings = replace(done.settings, stitch=replace(done.settings.stitch, front_layer=cell[0], end_layer=cell[1]))
    return Run(settings, done.datamodule, done.front, done.end, done.front_record, done.end_record, done.inputs,
               Prepared(engine, cell, front_name))


def prepare(settings: Settings | DictConfig, watch: Stopwatch | None = None) -> Run:
    """A single run: settings, data, base models, cut, and its one-cell engine at its start."""
    watch = watch or Stopwatch()
    done = setup(settings, watch)
    s = done.settings.stitch
    cell = (cut(done.front, s.front_layer).index, cut(done.end, s.end_layer).index)
    return cell_run(done, make_engine(done, [cell], watch), cell)


def outlier_arrays(settings: Settings, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test images in [0, 1] of the dataset ``name`` (an OOD detector's outliers)."""
    datamodule = build_datamodule(settings, name, with_testbeds=False)
    datamodule.setup()
    return datamodule.arrays.train_x.float().div(255), datamodule.arrays.test_x.float().div(255)
