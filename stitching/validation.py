"""Ranges of every numeric and boolean setting, checked once when a config is read.

A value outside its range is one line naming the key, the value and what is allowed,
before any data is loaded or any model trained: ``stitch.dm_samples=0`` must never become
a DM fit on nothing, nor ``attack.eps=-1`` a blacked-out test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stitching.errors import StitchingError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What one setting may be: ``kind`` int, float, bool or fraction (an int count or a
    float share in (0, 1]), within ``[low, high]`` (``low_open``: strictly above ``low``)."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    nullable: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "fraction":
            text = "a count ≥ 1 or a share in (0, 1]"
        else:
            noun = "an integer" if self.kind == "int" else "a finite number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{noun} in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text = f"{noun} {'>' if self.low_open else '≥'} {_num(self.low)}"
            else:
                text = noun
        return text + (" (or null)" if self.nullable else "")

    def allows(self, value) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "fraction":
            return (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Rule("int", 1)  # at least one
INDEX = Rule("int", 0)  # workers, padding, positions
SEED = Rule("int", 0, 2 ** 32 - 1)  # what numpy and every generator accept
POSITIVE = Rule("float", 0, low_open=True)
NON_NEGATIVE = Rule("float", 0)
SHARE = Rule("float", 0, 1)
FLAG = Rule("bool")
ANY_NUMBER = Rule("float")

RULES: dict[str, Rule] = {
    "seed": SEED,
    **{f"{side}.{key}": rule for side in ("front", "end") for key, rule in (
        ("seed", SEED), ("width", Rule("int", 1, nullable=True)), ("depth", Rule("int", 1, nullable=True)),
        ("robust", FLAG), ("pretrained", FLAG))},
    "stitch.dm_samples": COUNT,
    "stitch.update_bn": FLAG,
    "stitch.dm_bn_pass": FLAG,
    "stitch.lr": Rule("float", 0, 10, low_open=True, nullable=True),  # Adam: no useful step is larger; null: default_lr
    "stitch.weight_decay": NON_NEGATIVE,
    "stitch.rank": Rule("int", 1, nullable=True),
    "stitch.hidden": Rule("int", 1, nullable=True),
    "stitch.front_rank": Rule("int", 1, nullable=True),
    "dataset.batch_size": COUNT,
    "dataset.num_workers": INDEX,
    "dataset.num_classes": Rule("int", 1, nullable=True),  # null: next-token prediction
    "dataset.context": Rule("int", 2),
    "dataset.train_sequences": Rule("int", 1, nullable=True),
    "dataset.test_sequences": Rule("int", 1, nullable=True),
    "dataset.num_classes_train": Rule("int", 1, nullable=True),
    "dataset.train_subset": Rule("int", 1, nullable=True),
    "dataset.test_subset": Rule("int", 1, nullable=True),
    "dataset.base_images": Rule("int", 1, nullable=True),
    "dataset.augment.crop_padding": INDEX,
    "dataset.source.split_seed": SEED,
    "dataset.source.class_seed": SEED,
    "dataset.source.test_fraction": Rule("float", 0, 1, low_open=True, high_open=True),  # both splits non-empty
    "dataset.source.image_size": Rule("int", 4),
    "dataset.source.channels": Rule("int", 1, 4),
    "dataset.augment.hflip": FLAG,
    "attack.alpha": SHARE,
    "attack.eps": SHARE,
    "attack.step_size": Rule("float", 0, 1, nullable=True),
    "attack.steps": COUNT,
    "attack.random_start": FLAG,
    "attack.eval_pgd": FLAG,
    "attack.eval_autoattack": FLAG,
    "attack.eval_images": COUNT,
    "shortcut.size": COUNT,
    "shortcut.seed": SEED,
    "trainer.max_epochs": Rule("int", 0),  # 0: the DM initialisation is tested as it is
    "trainer.log_every_n_steps": COUNT,
    "trainer.deterministic": FLAG,
    "trainer.channels_last": FLAG,
    "trainer.compile": FLAG,
    "trainer.enable_progress_bar": FLAG,
    "trainer.limit_train_batches": Rule("fraction", nullable=True),
    "trainer.limit_test_batches": Rule("fraction", nullable=True),
    "trainer.max_steps": Rule("int", -1, nullable=True),  # -1: no limit
    "trainer.gradient_clip_val": Rule("float", 0, low_open=True, nullable=True),  # each cell's gradient, on its own
    "trainer.accumulate_grad_batches": Rule("int", 1, nullable=True),
    "zoo.train_missing": FLAG,
    "zoo.recipe.epochs": COUNT,
    "zoo.recipe.lr": POSITIVE,
    "zoo.recipe.momentum": Rule("float", 0, 1),
    "zoo.recipe.weight_decay": NON_NEGATIVE,
    "zoo.recipe.batch_size": COUNT,
    "zoo.recipe.robust.alpha": SHARE,
    "zoo.recipe.robust.eps": Rule("float", 0, 1, nullable=True),
    "zoo.recipe.robust.step_size": Rule("float", 0, 1, nullable=True),
    "zoo.recipe.robust.steps": COUNT,
    "zoo.recipe.language.tokens": COUNT,
    "zoo.recipe.language.batch_size": COUNT,
    "zoo.recipe.language.lr": POSITIVE,
    "zoo.recipe.language.weight_decay": NON_NEGATIVE,
    "zoo.recipe.transformer.lr": POSITIVE,
    "zoo.recipe.transformer.weight_decay": NON_NEGATIVE,
    "evaluation.penultimate_cka": FLAG,
    "evaluation.ood.enabled": FLAG,
    "evaluation.ood.epochs": INDEX,
    "evaluation.ood.pretrain_epochs": Rule("int", 0, nullable=True),
    "evaluation.ood.width": Rule("int", 1, nullable=True),
    "evaluation.ood.lr": POSITIVE,
    "evaluation.ood.batch_size": COUNT,
    "evaluation.ood.m_in": ANY_NUMBER,
    "evaluation.ood.m_out": ANY_NUMBER,
    "evaluation.ood.weight": NON_NEGATIVE,
    "evaluation.ood.train_images": Rule("int", 1, nullable=True),
    "evaluation.ood.eval_images": COUNT,
    "probe.rank": Rule("int", 1, nullable=True),
    "probe.pool": FLAG,
    "probe.epochs": COUNT,
    "probe.lr": POSITIVE,
    "probe.batch_size": COUNT,
    "grounding.images": Rule("int", 4),
    "grounding.bootstrap": INDEX,
    "similarity.images": Rule("int", 4),
    "similarity.batch_size": COUNT,
    "similarity.skip_positions": INDEX,
    "similarity.bootstrap": INDEX,
    "similarity.permutations": INDEX,
    "similarity.rbf_sigma": POSITIVE,
    "claims.seed_pairs": COUNT,
    "claims.confirm_pairs": Rule("int", 1, nullable=True),
    "claims.confirm_seed": Rule("int", 0, nullable=True),
    "claims.jobs": COUNT,
    "claims.min_pairs": Rule("int", 2),
    "claims.alpha": Rule("float", 0, 0.5, low_open=True),
    "claims.layer": COUNT,
    "claims.tolerance": Rule("float", 0, 1),
    "claims.classes_train": COUNT,
    "claims.random_start_epochs": Rule("int", 1, nullable=True),
    "claims.distant_layers": COUNT,
    "claims.chance_auroc": Rule("float", 0, 0.5, low_open=True),
    "claims.penultimate_layer": COUNT,
    "claims.chance_accuracy": Rule("float", 0, 0.5, low_open=True),
    "claims.similarity_images": Rule("int", 4),
    "claims.adversarial_images": Rule("int", 1, nullable=True),
}


def _text(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "dataset.kind", default="image") == "text"


@dataclass(frozen=True)
class Applies:
    """When a setting means something: ``given(value)`` says it was set away from its
    do-nothing default, ``applies(cfg)`` whether this run reads it (else one line saying so)."""

    key: str
    given: object
    applies: object
    only: str
    example: str  # how a user sets it (the generated tests set it where it does not apply)


#: the OOD detector kinds (:mod:`stitching.similarity.ood`)
DETECTORS = ("separate", "tail")

#: settings that only some runs read; set anywhere else they are refused, never ignored
APPLIES: tuple[Applies, ...] = (
    Applies("stitch.rank", lambda v: v is not None,
            lambda c: OmegaConf.select(c, "stitch.kind") == "low_rank", "stitch.kind=low_rank", "stitch.rank=4"),
    Applies("stitch.hidden", lambda v: v is not None,
            lambda c: OmegaConf.select(c, "stitch.kind") == "mlp", "stitch.kind=mlp", "stitch.hidden=8"),
    Applies("stitch.dm_bn_pass", lambda v: v is True, lambda c: OmegaConf.select(c, "objective.name") == "dm",
            "objective=dm", "stitch.dm_bn_pass=true"),
    Applies("shortcut.kind", lambda v: v is not None, lambda c: not _text(c), "image datasets", "shortcut=pixels"),
    *(Applies(key, lambda v: v is True, lambda c: not _text(c), "image classifiers", f"{key}=true")
      for key in ("attack.eval_pgd", "attack.eval_autoattack", "evaluation.ood.enabled", "evaluation.penultimate_cka")),
    *(Applies(f"evaluation.ood.{key}", lambda v: v is not None,
              lambda c: OmegaConf.select(c, "evaluation.ood.detector") == "separate",
              "evaluation.ood.detector=separate", f"evaluation.ood.{key}={example}")
      for key, example in (("pretrain_epochs", "5"), ("width", "16"))),
    Applies("dataset.num_classes", lambda v: v is not None,
            lambda c: not _text(c) or OmegaConf.select(c, "dataset.pairs", default=None) is not None,
            "classifiers (image datasets and sentence pairs)",
            "dataset.num_classes=10"),
    Applies("similarity.skip_positions", lambda v: v not in (None, 0), _text,
            "token sequences of language models", "similarity.skip_positions=2"),
    *(Applies(f"{side}.input.{key}", lambda v: v is not None,
              lambda c, side=side: _given_library_model(c, side),
              f"given timm and torchvision models ({side}.checkpoint or {side}.pretrained)",
              f"{side}.input.{key}={example}")
      for side in ("front", "end") for key, example in (("size", "32"), ("channels", "3"), ("mean", "0.5"),
                                                         ("std", "0.25"))),
)


def applies(key: str, cfg: DictConfig | dict) -> bool:
    """Whether this run reads ``key`` (a setting with no :data:`APPLIES` rule always applies)."""
    rules = [rule for rule in APPLIES if rule.key == key]
    if not rules:
        return True
    cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    return all(rule.applies(cfg) for rule in rules)


def _given_library_model(cfg: DictConfig, side: str) -> bool:
    """Whether ``side`` is a library model whose weights come from a file or the hub (a model
    trained here reads its training data's convention)."""
    return (OmegaConf.select(cfg, f"{side}.arch") in ("timm", "torchvision")
            and bool(OmegaConf.select(cfg, f"{side}.checkpoint") or OmegaConf.select(cfg, f"{side}.pretrained")))

#: the numeric precisions the stitching engine runs (Lightning's spellings of each)
PRECISIONS = {"32-true": "32-true", "32": "32-true", "16-mixed": "16-mixed", "16": "16-mixed",
              "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed"}


def check_applies(cfg: DictConfig) -> None:
    """Raise one line for the first setting given where this run does not read it."""
    for rule in APPLIES:
        value = OmegaConf.select(cfg, rule.key, default=None)
        if rule.given(value) and not rule.applies(cfg):
            raise StitchingError(f"{rule.key}={_shown(value)} applies to {rule.only} only; this run would ignore it: "
                                 f"remove it")


#: the Python API's arguments and the setting of the command line each one is: one contract
API_SETTINGS = {"lr": "stitch.lr", "weight_decay": "stitch.weight_decay", "dm_samples": "stitch.dm_samples",
                "update_bn": "stitch.update_bn", "rank": "stitch.rank", "hidden": "stitch.hidden",
                "front_rank": "stitch.front_rank", "dm_bn_pass": "stitch.dm_bn_pass", "seed": "seed",
                "epochs": "trainer.max_epochs",
                "batch_size": "dataset.batch_size"}
#: ``stitching.compare()``'s arguments and the ``similarity.*`` settings they are
SIMILARITY_SETTINGS = {"bootstrap": "similarity.bootstrap", "permutations": "similarity.permutations", "seed": "seed",
                       "batch_size": "similarity.batch_size", "rbf_sigma": "similarity.rbf_sigma",
                       "skip_positions": "similarity.skip_positions"}


def check_arguments(settings: dict[str, str] | None = None, **values) -> None:
    """Raise one line for the first Python API argument outside its setting's range (``settings``:
    which setting each argument is, :data:`API_SETTINGS` unless given)."""
    for name, value in values.items():
        key = (settings or API_SETTINGS)[name]
        if not RULES[key].allows(value):
            raise StitchingError(f"{name}={_shown(value)} is out of range: it must be {RULES[key].describe()} "
                                 f"(the command line's {key})")


def check_config(cfg: DictConfig) -> None:
    """Raise one :class:`StitchingError` line for the first setting outside its range."""
    for key, rule in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except Exception as err:  # an interpolation that cannot be resolved, a ??? value
            raise StitchingError(f"{key} cannot be read: {str(err).splitlines()[0]}") from None
        if value is _ABSENT:
            continue
        if not rule.allows(value):
            raise StitchingError(f"{key}={_shown(value)} is out of range: it must be {rule.describe()}")
    tail = OmegaConf.select(cfg, "grid.tail_samples", default="auto")
    if tail not in (None, "auto") and not (isinstance(tail, int) and not isinstance(tail, bool) and tail >= 1):
        raise StitchingError(f"grid.tail_samples={_shown(tail)} is out of range: it must be auto, null or an "
                             "integer ≥ 1")
    baseline = OmegaConf.select(cfg, "evaluation.self_baseline", default="auto")
    if baseline not in ("auto", True, False):
        raise StitchingError(f"evaluation.self_baseline={_shown(baseline)} is out of range: it must be auto, true or false")
    _check_precision(OmegaConf.select(cfg, "trainer.precision", default=None))
    models = OmegaConf.select(cfg, "claims.language_models", default=None)
    if models is not None:
        values = list(models) if OmegaConf.is_list(models) else models
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, str) and v for v in values)
                and values[0] != values[1]):
            raise StitchingError(f"claims.language_models={_shown(values)} must name two different language models: "
                                 f"the GeLU one, then the SoLU one")
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_algorithm", default=None)
    if clip not in (None, "norm", "value"):
        raise StitchingError(f"trainer.gradient_clip_algorithm={_shown(clip)} is out of range: it must be norm or value")
    attack = OmegaConf.select(cfg, "claims.robust_attack", default=None)
    if attack not in ("pgd", "autoattack"):
        raise StitchingError(f"claims.robust_attack={_shown(attack)} is out of range: it must be pgd or autoattack")
    _check_claims_pretrained(cfg)
    for key in ("claims.language", "claims.grounding.stitch", "claims.bert.preset", "claims.pythia.preset"):
        # overrides the claims pass on to some of their runs
        value = OmegaConf.select(cfg, key, default=None)
        values = list(value) if OmegaConf.is_list(value) else value
        if not (isinstance(values, list) and all(isinstance(v, str) and "=" in v for v in values)):
            raise StitchingError(f"{key}={_shown(values)} is out of range: give a list of overrides, "
                                 f"e.g. {key}=[stitch.update_bn=false]")
    _check_claims_layers(cfg)
    first, pairs = OmegaConf.select(cfg, "claims.confirm_seed", default=None), OmegaConf.select(cfg, "claims.seed_pairs")
    if first is not None and first < 2 * pairs:
        raise StitchingError(f"claims.confirm_seed={first} is a seed the other claims use (0 to {2 * pairs - 1} with "
                             f"claims.seed_pairs={pairs}): the confirmatory models must be fresh, from {2 * pairs} on")
    _check_groups(cfg)
    for unit, margin in (OmegaConf.select(cfg, "claims.margins", default=None) or {}).items():
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
            raise StitchingError(f"claims.margins.{unit}={_shown(margin)} is out of range: it must be a finite number "
                                 f"≥ 0 (the effect size below which a claim does not hold)")
    cross = OmegaConf.select(cfg, "claims.cross_front", default=None)
    if cross not in dataset_names():
        raise StitchingError(f"claims.cross_front={_shown(cross)} is not a dataset preset: choose from "
                             f"{', '.join(dataset_names())}")
    detector = OmegaConf.select(cfg, "evaluation.ood.detector", default=None)
    if detector not in DETECTORS:
        raise StitchingError(f"evaluation.ood.detector={_shown(detector)} is out of range: it must be "
                             f"{' or '.join(DETECTORS)}")
    if detector == "separate" and OmegaConf.select(cfg, "evaluation.ood.enabled", default=False):
        missing = [key for key in ("pretrain_epochs", "width")
                   if OmegaConf.select(cfg, f"evaluation.ood.{key}", default=None) is None]
        if missing:
            raise StitchingError(f"evaluation.ood.detector=separate trains a new network: set "
                                 f"{' and '.join(f'evaluation.ood.{k}' for k in missing)} (the authors': 100 epochs, "
                                 f"width 64)")
    heldout = OmegaConf.select(cfg, "evaluation.ood.heldout", default=None)
    if heldout is not None and heldout == OmegaConf.select(cfg, "evaluation.ood.outliers", default=None):
        raise StitchingError(f"evaluation.ood.heldout={heldout} is the family the detector is fitted against "
                             f"(evaluation.ood.outliers); a held-out check needs another one (noise, patch_shuffle or "
                             f"a dataset name)")
    check_applies(cfg)
    check_datasets(cfg)
    weights = OmegaConf.select(cfg, "objective.weights", default=None)
    if OmegaConf.is_list(weights):
        values = list(weights)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values) or sum(values) <= 0:
            raise StitchingError(f"objective.weights={_shown(values)} is out of range: give finite, non-negative "
                                 f"numbers with a positive sum (or uniform, first, first:N, last)")


def _check_precision(precision) -> None:
    if precision is not None and str(precision) not in PRECISIONS:
        raise StitchingError(f"trainer.precision={_shown(precision)} is not supported: it must be 32-true, 16-mixed or "
                             f"bf16-mixed (frozen models and stitch stay in float32; mixed precision autocasts)")


def check_trainer(options: dict) -> None:
    """The Python API's ``trainer`` settings, by the command line's ``trainer.*`` rules."""
    for key, value in options.items():
        rule = RULES.get(f"trainer.{key}")
        if rule is not None and not rule.allows(value):
            raise StitchingError(f"trainer={{'{key}': {value!r}}} is out of range: it must be {rule.describe()} "
                                 f"(the command line's trainer.{key})")
    _check_precision(options.get("precision"))


#: a dataset's settings that choose the stitching data from it (and its batches); a base model
#: and an OOD detector's outlier set always read the whole clean training split, with the zoo's
#: own batch size, so these never reach a dataset that only a base model or the outliers read
STITCHING_ONLY = frozenset({"train_subset", "test_subset", "num_classes_train", "train_sequences", "test_sequences", "challenge",
                            "batch_size"})


#: the dataset presets (``stitching.CONF_DIR / "dataset"``; the package imports this module)
DATASET_PRESETS = Path(__file__).resolve().parent / "conf" / "dataset"


def dataset_names() -> list[str]:
    return sorted(path.stem for path in DATASET_PRESETS.glob("*.yaml"))


def check_datasets(cfg: DictConfig) -> None:
    """``datasets.<name>.<key>``: a setting of a dataset other than the run's own (a side's
    dataset in cross-task stitching, an outlier dataset), checked like ``dataset.<key>``: the
    dataset is one this run reads, the key is one of its settings, the value is in range, and
    it is a setting the base models (or outliers) read, so none is silently ignored."""
    given = OmegaConf.select(cfg, "datasets", default=None)
    if not given:
        return
    own = OmegaConf.select(cfg, "dataset.name")
    used = {OmegaConf.select(cfg, f"{side}.dataset") for side in ("front", "end")}
    used |= {OmegaConf.select(cfg, key, default=None) for key in ("evaluation.ood.outliers", "evaluation.ood.heldout")}
    known = dataset_names()
    for name, options in given.items():
        if name not in known:
            raise StitchingError(f"datasets.{name}: unknown dataset '{name}'; choose one of {', '.join(known)}")
        if name == own:
            raise StitchingError(f"datasets.{name} names the run's own dataset: set its settings as dataset.<key>=…")
        if name not in used:
            raise StitchingError(f"datasets.{name} applies to no dataset this run reads (front.dataset="
                                 f"{OmegaConf.select(cfg, 'front.dataset')}, end.dataset="
                                 f"{OmegaConf.select(cfg, 'end.dataset')}, the OOD outliers): remove it")
        if not OmegaConf.is_dict(options):
            raise StitchingError(f"datasets.{name}={_shown(options)}: give settings by key, e.g. "
                                 f"+datasets.{name}.source.download=false")
        _check_dataset_keys(name, OmegaConf.load(DATASET_PRESETS / f"{name}.yaml"), options, "")


def _check_dataset_keys(name: str, defaults, options, prefix: str) -> None:
    for key, value in options.items():
        path = f"{prefix}{key}"
        if key not in defaults or path == "name":
            settable = ", ".join(k for k in defaults if prefix or k != "name")
            raise StitchingError(f"datasets.{name}.{path} is not a setting of dataset {name}; its settings: {settable}")
        if not prefix and key in STITCHING_ONLY:
            raise StitchingError(f"datasets.{name}.{key} chooses the stitching data, and {name} is not the run's "
                                 f"stitching data: a base model reads its whole training split (batch size: "
                                 f"zoo.recipe.batch_size); remove it")
        if OmegaConf.is_dict(defaults[key]):
            if not OmegaConf.is_dict(value):
                raise StitchingError(f"datasets.{name}.{path}={_shown(value)}: give its settings by key "
                                     f"({', '.join(defaults[key])})")
            _check_dataset_keys(name, defaults[key], value, f"{path}.")
            continue
        rule = RULES.get(f"dataset.{path}")
        if rule is not None and not rule.allows(value):
            raise StitchingError(f"datasets.{name}.{path}={_shown(value)} is out of range: it must be "
                                 f"{rule.describe()}")


def _check_groups(cfg: DictConfig) -> None:
    """``groups``: ``by`` a side setting that names a model, and at least two groups of distinct,
    non-empty model lists, no model in two groups (or no groups at all)."""
    by = OmegaConf.select(cfg, "groups.by", default="name")
    if by not in GROUP_KEYS:
        raise StitchingError(f"groups.by={_shown(by)} is out of range: it must be {' or '.join(GROUP_KEYS)}")
    members = OmegaConf.select(cfg, "groups.members", default=None) or {}
    if not OmegaConf.is_dict(members) and not isinstance(members, dict):
        raise StitchingError(f"groups.members={_shown(members)} must map each group to a list of models "
                             f"(+groups.members.a=[m1,m2])")
    if not members:
        return
    lists = {name: list(models) if OmegaConf.is_list(models) else models for name, models in members.items()}
    bad = [name for name, models in lists.items() if not isinstance(models, list) or not models]
    if bad or len(lists) < 2:
        raise StitchingError(f"groups.members needs at least two groups, each a non-empty list of models "
                             f"(got {', '.join(f'{k}={_shown(v)}' for k, v in lists.items()) or 'none'})")
    seen: dict = {}
    for name, models in lists.items():
        for model in models:
            if model in seen:
                raise StitchingError(f"groups.members: {model} is in both {seen[model]} and {name}; a model "
                                     f"belongs to one group")
            seen[model] = name


#: the side settings that can name a model in ``groups.members``
GROUP_KEYS = ("name", "arch")


#: the FuLA paper's Fig. 6: last-hint similarity into a robust end decays from the 6th layer on
DECAY_ONSET = 6


def _check_claims_layers(cfg: DictConfig) -> None:
    """``claims.layers``, ``grid_layers`` and ``confirm_layers`` (or null), ``early_layers``, ``deep_layers`` and
    ``decay_layers`` (before and after :data:`DECAY_ONSET`),
    ``grounding.layers`` and ``grounding.compare_layers`` (or null): non-empty lists of cut points, the early and
    deep ones among ``claims.layers``; ``claims.grounding.ranks``: a non-empty list of ranks (integers ≥ 1)."""
    lists = {}
    for key in ("claims.layers", "claims.grid_layers", "claims.confirm_layers", "claims.early_layers",
                "claims.deep_layers", "claims.decay_layers", "claims.bert.early_layers", "claims.bert.later_layers",
                "claims.grounding.layers",
                "claims.grounding.compare_layers", "claims.grounding.ranks"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key not in ("claims.grounding.ranks", "claims.decay_layers"):
            continue
        values = list(value) if OmegaConf.is_list(value) else value
        if not (isinstance(values, list) and values
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)):
            raise StitchingError(f"{key}={_shown(values)} is out of range: give a non-empty list of "
                                 f"{'ranks' if key.endswith('ranks') else 'cut points'} (integers ≥ 1)")
        lists[key] = values
    layers = lists.get("claims.layers")
    for key in ("claims.early_layers", "claims.deep_layers"):
        chosen = lists.get(key)
        if chosen and layers and not set(chosen) <= set(layers):
            raise StitchingError(f"{key}={chosen} must be among claims.layers={layers}")
    decay = lists.get("claims.decay_layers")
    if decay and not (min(decay) < DECAY_ONSET < max(decay)):
        raise StitchingError(f"claims.decay_layers={decay} must hold cut points before and after layer {DECAY_ONSET}, "
                             f"where Fig. 6's decay starts (e.g. [5, 9])")


def _names(cfg: DictConfig, key: str, fewest: int) -> list[str] | None:
    """``key``: null, or a list of at least ``fewest`` different model names."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return None
    values = list(value) if OmegaConf.is_list(value) else value
    if not (isinstance(values, list) and len(values) >= fewest and all(isinstance(v, str) and v for v in values)
            and len(set(values)) == len(values)):
        raise StitchingError(f"{key}={_shown(values)} is out of range: give null or a list of at least {fewest} "
                             f"different model names")
    return values


def _check_claims_pretrained(cfg: DictConfig) -> None:
    """The LM paper's pretrained-model claims: the BERT groups both named (two models per replicate
    each, no model in both) or both null; the Pythia models all named or all null, the outlier apart
    from its neighbours; the intermediate depths an interval within [0, 1]."""
    if OmegaConf.select(cfg, "claims.bert", default=None) is None:
        return
    pairs = OmegaConf.select(cfg, "claims.seed_pairs", default=3)
    fewest = 2 * pairs if isinstance(pairs, int) and pairs >= 1 else 2
    groups = [_names(cfg, f"claims.bert.{g}", fewest) for g in ("generalising", "heuristic")]
    if (groups[0] is None) != (groups[1] is None):
        raise StitchingError("claims.bert.generalising and claims.bert.heuristic go together: name both groups, "
                             "or neither")
    candidates = _names(cfg, "claims.bert.candidates", 2 * fewest)
    if candidates is not None and groups[0] is not None:
        raise StitchingError("claims.bert.candidates ranks models into groups that claims.bert.generalising and "
                             "claims.bert.heuristic already name: give the candidates or the groups, not both")
    if groups[0] is not None and set(groups[0]) & set(groups[1]):
        raise StitchingError(f"claims.bert: {sorted(set(groups[0]) & set(groups[1]))} in both groups; a model is "
                             f"generalising or heuristic, not both")
    small, near = _names(cfg, "claims.pythia.up_to_1b", 2), _names(cfg, "claims.pythia.neighbours", 2)
    outlier = OmegaConf.select(cfg, "claims.pythia.outlier", default=None)
    if outlier is not None and not (isinstance(outlier, str) and outlier):
        raise StitchingError(f"claims.pythia.outlier={_shown(outlier)} is out of range: give one model name or null")
    if len({small is None, near is None, outlier is None}) > 1:
        raise StitchingError("claims.pythia.up_to_1b, claims.pythia.outlier and claims.pythia.neighbours go together: "
                             "name all three, or none")
    if near is not None and outlier in near:
        raise StitchingError(f"claims.pythia.outlier={outlier} is among its neighbours; the claim compares it with them")
    depths = OmegaConf.select(cfg, "claims.pythia.intermediate", default=None)
    values = list(depths) if OmegaConf.is_list(depths) else depths
    if not (isinstance(values, list) and len(values) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            and 0 <= values[0] < values[1] <= 1):
        raise StitchingError(f"claims.pythia.intermediate={_shown(values)} is out of range: give two relative depths "
                             f"[low, high] with 0 ≤ low < high ≤ 1")


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
