"""Base models: trained here once with the paper's recipe, or given; always recorded.

A model trained here is identified by everything that determined its weights: the
architecture and seed, the data as the model saw it (dataset, split seed, test fraction,
image size, channels, normalisation, augmentation; for text the corpus, tokenizer and
context), the recipe it trained with and the numeric precision. The zoo's file name is a
readable prefix (``resnet18-w16-mnist5k-s0-e8``) and a hash of that identity; the file
records the identity itself and is checked against it when read, so a model trained on
other data, or a file copied over another model's name, is never used in its place.
Models are cached atomically and reused. A *given* model comes from a local weights file (a zoo
checkpoint, or a timm/torchvision state dict, ``.pt``/``.pth``/``.safetensors``) or from
the hub by name. Every model's record says where it came from (``source``: ``trained
here`` with recipe, seed and epochs; ``file`` or ``hub`` with the SHA-256 of the weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import lightning as L
import torch
import torchmetrics
from filelock import FileLock, Timeout
from torch import nn
from torch.nn import functional as F

from stitching.attacks import pgd, pgd_settings
from stitching.attacks.pgd import DEFAULT_EPS
from stitching.data import ImageDataModule
from stitching.files import sha256, writable_folder
from stitching.errors import StitchingError
from stitching.models import LANGUAGE_ARCHITECTURES, LIBRARIES, CuttableModel, build_model, is_transformer
from stitching.objectives.tasks import IGNORE, NextToken
from stitching.models.adapters import create, library_model
from stitching.models.language import LANGUAGE_LIBRARIES, load_language_model
from stitching.runtime import build_trainer, versions, write_json_atomic
from stitching.validation import PRECISIONS


@dataclass(frozen=True)
class ModelSpec:
    """Which base model: a built-in architecture, or a library's model by ``name``."""

    arch: str
    width: int | None
    dataset: str
    seed: int
    robust: bool = False
    depth: int | None = None  # the built-in ViT only
    name: str | None = None  # timm / torchvision model name
    pretrained: bool = False  # the library's pretrained weights (hub)

    def key(self, budget: int, unit: str = "e", robust_eps: float | None = None) -> str:
        """The zoo's file name: architecture, data, seed and training budget (``e``: epochs, ``t``: tokens);
        a robust model trained at an attack budget other than 8/255 carries it (``robust0.3``)."""
        robust = (f"-robust{robust_eps:g}" if robust_eps is not None else "-robust") if self.robust else ""
        if self.arch in LIBRARIES:
            return f"{self.arch}-{self.name}-{self.dataset}-s{self.seed}{robust}-{unit}{budget}"
        depth = f"-d{self.depth}" if self.depth is not None else ""
        return f"{self.arch}-w{self.width}{depth}-{self.dataset}-s{self.seed}{robust}-{unit}{budget}"


@contextmanager
def preserved_rng():
    """Run a block with its own seeding without touching the caller's random streams."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class ClassifierModule(L.LightningModule):
    """Supervised training of a base model: SGD with momentum, lr ×0.1 at each third (the
    papers' ResNet recipe), or AdamW with a cosine schedule (``optimizer="adamw"``, ViTs).

    With ``adversarial`` (``alpha``, ``eps``, ``step_size``, ``steps``) the loss is the
    FuLA paper's Eq. (4): ``(1 − α)·CE(x) + α·CE(PGD(x))``.
    """

    def __init__(self, model: nn.Module, num_classes: int, epochs: int, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, adversarial: dict | None = None,
                 optimizer: str = "sgd"):
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise StitchingError(f"unknown base-model optimizer '{optimizer}'; choose sgd or adamw")
        self.optimizer = optimizer
        self.model = model
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.adversarial = dict(adversarial) if adversarial else None
        metric = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
        self.train_acc, self.test_acc = metric(), metric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if self.adversarial:
            attack = {k: v for k, v in self.adversarial.items() if k != "alpha"}
            alpha = float(self.adversarial["alpha"])
            x_adv = pgd(self.model, x, y, **attack)
            loss = (1 - alpha) * loss + alpha * F.cross_entropy(self.model(x_adv), y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.model(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        thirds = sorted({max(1, self.epochs // 3), max(1, 2 * self.epochs // 3)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=thirds, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ModelZoo:
    """A folder of base-model checkpoints, filled on demand.

    Args:
        root: the cache folder.
        recipe: ``epochs, lr, momentum, weight_decay, batch_size``.
        datamodule_for: dataset name → :class:`ImageDataModule` (full training split).
        trainer_options: the ``trainer`` config group (device, precision…).
        train_missing: train a missing model (``True``) or fail with a clear error.
        attack_eps: dataset name → its standard attack budget (``dataset.attack_eps``), the
            robust recipe's ``eps`` where that is null.
    """

    def __init__(self, root: str | Path, recipe: dict, datamodule_for: Callable[[str], ImageDataModule],
                 trainer_options: dict | None = None, train_missing: bool = True,
                 attack_eps: Callable[[str], float | None] | None = None,
                 data_settings: Callable[[str], dict] | None = None):
        self.root = Path(root)
        self.recipe = dict(recipe)
        self.datamodule_for = datamodule_for
        self.trainer_options = dict(trainer_options or {})
        self.train_missing = train_missing
        self.attack_eps = attack_eps or (lambda name: None)
        self.data_settings = data_settings or (lambda name: {"name": name})
        self._transformer: dict[ModelSpec, bool] = {}

    # -- identity -------------------------------------------------------------------------
    def recipe_for(self, spec: ModelSpec) -> dict:
        """The training settings ``spec`` is trained with, exactly those and nothing else."""
        if spec.arch in LANGUAGE_ARCHITECTURES:  # AdamW, cosine schedule, a budget of tokens
            flat = {**{k: v for k, v in self.recipe.items() if not isinstance(v, dict)}, **self.recipe["language"]}
            return {k: flat[k] for k in ("tokens", "batch_size", "lr", "weight_decay")}
        recipe = {k: v for k, v in self.recipe.items() if not isinstance(v, dict)}
        recipe.setdefault("batch_size", self.data_settings(spec.dataset).get("batch_size"))
        if spec.robust:
            if "robust" not in self.recipe:
                raise StitchingError("robust=true needs zoo.recipe.robust (alpha, eps, step_size, steps)")
            recipe["robust"] = self.robust_recipe(spec)
        if self._trains_as_transformer(spec):  # ViTs do not train with the ResNet recipe's SGD
            recipe.update(self.recipe.get("transformer") or {})
        return recipe

    def _trains_as_transformer(self, spec: ModelSpec) -> bool:
        if spec.arch not in LIBRARIES:
            return spec.arch.startswith("vit")
        if spec not in self._transformer:  # a library model declares it: build it once, untrained
            self._transformer[spec] = is_transformer(self.untrained(spec))
        return self._transformer[spec]

    def identity(self, spec: ModelSpec) -> dict:
        """Everything that determines the weights of ``spec`` trained here."""
        return canonical({"spec": asdict(spec), "data": base_data(self.data_settings(spec.dataset)),
                          "recipe": self.recipe_for(spec),
                          "precision": PRECISIONS.get(str(self.trainer_options.get("precision") or 32), "32-true")})

    def path(self, spec: ModelSpec) -> Path:
        """``<readable key>-<identity hash>.pt`` in the zoo."""
        return self.root / f"{self._readable_key(spec)}-{identity_hash(self.identity(spec))}.pt"

    def _readable_key(self, spec: ModelSpec) -> str:
        if spec.arch in LANGUAGE_ARCHITECTURES:  # a language model's budget is tokens, not epochs
            return spec.key(int(self.recipe_for(spec)["tokens"]), "t")
        budget = int(self.recipe["epochs"])
        eps = self.recipe_for(spec)["robust"]["eps"] if spec.robust else DEFAULT_EPS
        images = self.data_settings(spec.dataset).get("base_images")
        if images is not None:  # trained on part of the split: the name says how much (fmnist10000)
            spec = ModelSpec(**{**asdict(spec), "dataset": f"{spec.dataset}{int(images)}"})
        # a robust budget other than 8/255 is part of the name
        return spec.key(budget, robust_eps=None if math.isclose(eps, DEFAULT_EPS) else eps)

    def _check_identity(self, spec: ModelSpec, path: Path, record: dict) -> None:
        """A zoo file must be the model its name says: its recorded identity is the one wanted."""
        wanted = self.identity(spec)
        recorded = record.get("identity")
        if recorded == wanted:
            return
        if recorded is None:
            raise StitchingError(f"zoo file {path} records no identity, so it cannot show it is the model its name "
                                 f"says; delete it (it is retrained on the next run)")
        changed = differences(recorded, wanted)
        raise StitchingError(f"zoo file {path} holds another model than its name says ({'; '.join(changed[:3])}"
                             f"{f' (+{len(changed) - 3} more)' if len(changed) > 3 else ''}); "
                             f"delete it (it is retrained on the next run)")

    def robust_recipe(self, spec: ModelSpec) -> dict:
        """The adversarial-training settings of a robust ``spec``, the dataset's budget filled in."""
        robust = dict(self.recipe["robust"])
        return {**robust, **pgd_settings(robust, self.attack_eps(spec.dataset))}

    def get(self, spec: ModelSpec, checkpoint: str | None = None) -> tuple[CuttableModel, dict]:
        """The model for ``spec`` and its record: from ``checkpoint`` (a file), the hub
        (``spec.pretrained``), or the zoo (trained here on first use)."""
        if spec.arch in LANGUAGE_LIBRARIES:  # a given language model: its folder or hub name
            model, record = load_language_model(spec.arch, spec.name)
            self._remember(record)
            return model, record
        if checkpoint:
            model, record = load_given(spec, Path(checkpoint).expanduser())
            self._remember(record)
            return model, record
        if spec.pretrained:
            model, record = load_pretrained(spec)
            self._remember(record)
            return model, record
        path = self.path(spec)
        if path.is_file():
            return self._load(spec, path)
        legacy = self.root / f"{self._readable_key(spec)}.pt"
        why = (f" ({legacy.name} was saved before zoo files recorded the data and recipe they were trained with, "
               f"so it cannot show it matches)") if legacy.is_file() else ""
        if not self.train_missing:
            raise StitchingError(
                f"no base model {path.name} in {self.root}{why}; train it with "
                f"`python -m stitching.pretrain` or set zoo.train_missing=true"
            )
        if why:
            print(f"[zoo] training {path.name}{why}", flush=True)
        writable_folder(self.root, "zoo.dir (paths.zoo_dir)")  # before any epoch is spent
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"[zoo] waiting for another run to finish training {path.name}", flush=True)
            lock.acquire()
        try:
            if not path.is_file():  # someone else may have finished while we waited
                self._train(spec, path)
        finally:
            lock.release()
        return self._load(spec, path)

    def _load(self, spec: ModelSpec, path: Path) -> tuple[CuttableModel, dict]:
        model, record = load_checkpoint(path)
        self._check_identity(spec, path, record)
        return model, record

    def needs_training(self, spec: ModelSpec, checkpoint: str | None = None) -> bool:
        """Whether :meth:`get` would train ``spec`` here first."""
        return (not checkpoint and not spec.pretrained and spec.arch not in LANGUAGE_LIBRARIES
                and not self.path(spec).is_file())

    def untrained(self, spec: ModelSpec) -> CuttableModel:
        """The architecture :meth:`get` would train for ``spec``, with its initial weights: what
        it declares (cut points, layouts) is known before any epoch is spent on it."""
        with preserved_rng():
            return build_model(**self._model_kwargs(spec, self.datamodule_for(spec.dataset)))

    @staticmethod
    def _model_kwargs(spec: ModelSpec, datamodule) -> dict:
        if spec.arch in LANGUAGE_ARCHITECTURES:
            return dict(arch=spec.arch, width=spec.width, depth=spec.depth, vocab_size=datamodule.vocab_size,
                        context=datamodule.context, seed=spec.seed)
        mean, std = datamodule.normalization()
        kwargs = dict(arch=spec.arch, num_classes=datamodule.num_classes, width=spec.width,
                      in_channels=datamodule.in_channels, mean=mean, std=std)
        if spec.depth is not None:
            kwargs["depth"] = spec.depth
        if spec.name is not None:
            kwargs["name"] = spec.name
        if spec.arch.startswith("vit") or spec.arch in LIBRARIES:
            kwargs["image_size"] = datamodule.image_size
        return kwargs

    def _remember(self, record: dict) -> None:
        """Note a given model in ``given.json`` so ``pretrain --list`` shows it (best effort)."""
        path = self.root / "given.json"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock", timeout=10):
                known = json.loads(path.read_text()) if path.is_file() else {}
                entry = {k: record.get(k) for k in ("key", "source", "path", "hub", "sha256", "library", "name")}
                if known.get(record["key"]) != entry:
                    known[record["key"]] = entry
                    write_json_atomic(path, known)
        except (OSError, Timeout, json.JSONDecodeError) as err:
            print(f"[zoo] warning: could not note {record['key']} in {path} ({type(err).__name__})", file=sys.stderr)

    def _train(self, spec: ModelSpec, path: Path) -> None:
        with preserved_rng():  # training here must not change the caller's random streams
            self._train_seeded(spec, path)

    def _train_seeded(self, spec: ModelSpec, path: Path) -> None:
        if spec.arch in LANGUAGE_ARCHITECTURES:
            return self._train_language_model(spec, path)
        recipe = self.recipe_for(spec)
        adversarial = recipe.get("robust")
        datamodule = self.datamodule_for(spec.dataset)
        datamodule.batch_size = int(recipe["batch_size"])
        images = self.data_settings(spec.dataset).get("base_images")
        if images is not None:
            self._subset(datamodule, int(images))
        model_kwargs = self._model_kwargs(spec, datamodule)
        L.seed_everything(spec.seed, workers=True, verbose=False)
        model = build_model(**model_kwargs)
        epochs = int(recipe["epochs"])
        module = ClassifierModule(model, datamodule.num_classes, epochs, lr=recipe["lr"],
                                  momentum=recipe.get("momentum", 0.9), weight_decay=recipe["weight_decay"],
                                  adversarial=adversarial, optimizer=recipe.get("optimizer", "sgd"))
        print(f"[zoo] training base model {path.stem} ({epochs} epochs)", flush=True)
        started = time.perf_counter()
        trainer = build_trainer(self.trainer_options, self.root, max_epochs=epochs)
        trainer.fit(module, datamodule=datamodule)
        train_time = time.perf_counter() - started
        test = build_trainer(self.trainer_options, self.root, enable_progress_bar=False)
        test_acc = test.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
        record = {
            "key": path.stem, "source": "trained here", "spec": asdict(spec), "seed": spec.seed, "epochs": epochs,
            "recipe": recipe, "identity": self.identity(spec), "model_kwargs": model_kwargs,
            "train_images": len(datamodule.arrays.train_y), "test_acc": float(test_acc), "train_time_s": round(train_time, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
        }
        self._save(model, record, path)
        print(f"[zoo] saved {path} (test acc {test_acc:.4f}, {train_time:.0f}s)", flush=True)

    @staticmethod
    def _subset(datamodule: ImageDataModule, images: int) -> None:
        """Train on ``images`` of the training split, every class in proportion (seeded)."""
        datamodule.setup()
        available = len(datamodule.arrays.train_y)
        if images >= available:
            raise StitchingError(f"base_images={images} for {datamodule.name}, but its training split has {available} "
                                 f"images; set it below {available}, or null to train base models on all of them")
        datamodule.arrays, datamodule.train_subset = None, images
        datamodule.setup()

    def _train_language_model(self, spec: ModelSpec, path: Path) -> None:
        """A TransformerLens LM on its corpus: AdamW, cosine schedule, a budget of training tokens."""
        datamodule = self.datamodule_for(spec.dataset)
        recipe = self.recipe_for(spec)
        datamodule.batch_size = int(recipe["batch_size"])
        model_kwargs = self._model_kwargs(spec, datamodule)
        L.seed_everything(spec.seed, workers=True, verbose=False)
        model = build_model(**model_kwargs)
        steps = max(1, -(-int(recipe["tokens"]) // (datamodule.batch_size * datamodule.context)))
        module = LanguageModelTraining(model, steps, lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]))
        print(f"[zoo] training language model {path.stem} ({steps} steps, {recipe['tokens']} tokens)", flush=True)
        started = time.perf_counter()
        build_trainer(self.trainer_options, self.root, max_steps=steps, max_epochs=-1).fit(module, datamodule=datamodule)
        train_time = time.perf_counter() - started
        tester = build_trainer(self.trainer_options, self.root, enable_progress_bar=False)
        test_loss = tester.test(module, datamodule=datamodule, verbose=False)[0]["test/loss"]
        record = {
            "key": path.stem, "source": "trained here", "spec": asdict(spec), "seed": spec.seed, "steps": steps,
            "recipe": recipe, "identity": self.identity(spec), "model_kwargs": model_kwargs, "test_acc": None, "test_loss": float(test_loss),
            "data": {"corpus": datamodule.corpus, "tokenizer": datamodule.tokenizer_spec, "context": datamodule.context,
                     "train_sequences": len(datamodule.arrays.train), "test_sequences": len(datamodule.arrays.test)},
            "train_time_s": round(train_time, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
        }
        self._save(model, record, path)
        print(f"[zoo] saved {path} (test loss {test_loss:.4f} nats/token, {train_time:.0f}s)", flush=True)

    def _save(self, model: nn.Module, record: dict, path: Path) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"record": record, "state_dict": state}, tmp)
            os.replace(tmp, path)
        except BaseException:  # a full disk or an interrupt leaves no half-written model behind
            tmp.unlink(missing_ok=True)
            raise
        write_json_atomic(path.with_suffix(".json"), {**record, "sha256": sha256(path)})

    def list(self) -> list[dict]:
        """Every model trained here (with its recipe) and every given model seen so far."""
        records = []
        for path in sorted(self.root.glob("*.pt")):
            try:
                records.append({**load_checkpoint(path)[1], "path": str(path)})
            except StitchingError as err:
                records.append({"key": path.stem, "source": "trained here", "path": str(path), "error": str(err)})
        given = self.root / "given.json"
        if given.is_file():
            try:
                records.extend(json.loads(given.read_text()).values())
            except json.JSONDecodeError:
                records.append({"key": "given.json", "path": str(given), "error": "unreadable; delete it"})
        return records


# Dataset settings that do not change what a base model learns: where and how the data are
# read, and what a stitching run selects from them (a base model always sees the whole
# training split, clean).
NOT_IDENTITY = frozenset({"num_workers", "batch_size", "data_dir", "download", "installed", "kind", "attack_eps",
                          "num_classes_train", "train_subset", "test_subset", "train_sequences", "test_sequences", "challenge"})


def base_data(settings: dict) -> dict:
    """The dataset settings that determine a base model's weights: all but ``NOT_IDENTITY``
    (and ``base_images`` at null, the whole split: models trained before it existed keep their names)."""
    if isinstance(settings, dict):
        return {k: base_data(v) for k, v in settings.items()
                if k not in NOT_IDENTITY and not (k == "base_images" and v is None)}
    return settings


def canonical(value):
    """One spelling per value: sorted dicts, lists for tuples, 1.0 as 1 (``lr=1`` and ``lr=1.0``
    train the same model)."""
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def identity_hash(identity: dict) -> str:
    """A short, stable hash of an identity (JSON with sorted keys)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """``field: recorded → wanted`` for every leaf where two identities differ."""
    lines = []
    for key in sorted(set(recorded) | set(wanted), key=str):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} here, {b!r} wanted")
    return lines


class LanguageModelTraining(L.LightningModule):
    """Next-token training of a language model: AdamW with a cosine schedule over ``steps``."""

    def __init__(self, model: nn.Module, steps: int, lr: float = 1e-3, weight_decay: float = 0.05):
        super().__init__()
        self.model, self.steps, self.lr, self.weight_decay = model, steps, lr, weight_decay
        self.task = NextToken()

    def _loss(self, batch) -> tuple[torch.Tensor, int]:
        x, labels = self.task.split(batch, train=True)
        return self.task.loss(self.model(x), labels), int((labels != IGNORE).sum())

    def training_step(self, batch, batch_idx):
        loss, tokens = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=tokens)
        return loss

    def test_step(self, batch, batch_idx):
        loss, tokens = self._loss(batch)
        self.log("test/loss", loss, batch_size=tokens)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_checkpoint(path: Path, owned: bool = True) -> tuple[CuttableModel, dict]:
    """Rebuild a base model and its record from a zoo checkpoint.

    ``owned``: the file is the zoo's own (a broken one is deleted and retrained); a file the
    user named is never offered for deletion.
    """
    advice = "delete it to retrain" if owned else "check the file or drop the checkpoint setting"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise StitchingError(f"checkpoint {path} cannot be read ({type(err).__name__}); {advice}") from None
    if not isinstance(payload, dict) or not {"record", "state_dict"} <= set(payload):
        raise StitchingError(f"checkpoint {path} is not a zoo checkpoint (no record/state_dict); {advice}")
    record = payload["record"]
    with preserved_rng():  # the random initialisation is overwritten; the caller's streams stay put
        model = build_model(**record["model_kwargs"])
    _load_state(model, payload["state_dict"], path, f"its recorded architecture ({record.get('key')}); {advice}")
    return model.eval(), {"source": "trained here", **record, "path": str(path)}


def _load_state(model: nn.Module, state: dict, path: Path, what: str) -> None:
    """``load_state_dict`` that names the first missing/unexpected/mis-shaped keys in one line."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise StitchingError(f"checkpoint {path} does not fit {what}: "
                             f"{sizes[0] if sizes else str(err).splitlines()[0]}"
                             + (f" (+{len(sizes) - 1} more)" if len(sizes) > 1 else "")) from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:3])}"
                         + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
        raise StitchingError(f"checkpoint {path} does not fit {what}: {'; '.join(parts)}")


# -- given models ------------------------------------------------------------------------
def read_weights(path: Path):
    """The object saved in a ``.safetensors`` or PyTorch file, or a one-line error."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise StitchingError(f"checkpoint {path} cannot be read as a PyTorch or safetensors file "
                             f"({type(err).__name__}); check the file") from None


def state_dict_of(payload, path: Path) -> dict:
    """The state dict in a saved object: unwraps ``state_dict``/``model`` entries and DDP's ``module.``."""
    if not isinstance(payload, dict):
        raise StitchingError(f"checkpoint {path} holds a {type(payload).__name__}, not a state dict")
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
            break
    if payload and all(k.startswith("module.") for k in payload):
        payload = {k.removeprefix("module."): v for k, v in payload.items()}
    return payload


def _classifier_key(library: str, model: nn.Module) -> str | None:
    if library == "timm":
        name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        return f"{name}.weight" if name else None
    return "fc.weight" if hasattr(model, "fc") else "heads.head.weight" if hasattr(model, "heads") else None


def load_given(spec: ModelSpec, path: Path) -> tuple[CuttableModel, dict]:
    """A model from a file the user named: a zoo checkpoint, or a timm/torchvision state dict."""
    if not path.is_file():
        raise StitchingError(f"checkpoint {path} does not exist; fix the path or drop it to use the zoo")
    digest = sha256(path)
    payload = read_weights(path)
    if isinstance(payload, dict) and "record" in payload:  # one of our own checkpoints
        model, record = load_checkpoint(path, owned=False)
        return model, {**record, "source": "file", "sha256": digest, "path": str(path)}
    if spec.arch not in LIBRARIES:
        raise StitchingError(f"{path} is not a zoo checkpoint; a plain state dict needs its library: set "
                             f"arch=timm or arch=torchvision and the model's name for that side")
    state = state_dict_of(payload, path)
    with preserved_rng():
        model = _given_architecture(spec, state)
    _load_state(model, state, path, f"{spec.arch} model '{spec.name}'")
    adapted = library_model(model.eval(), name=spec.name).eval()
    record = {"key": f"{spec.arch}-{spec.name}-file-{digest[:12]}", "source": "file", "path": str(path),
              "sha256": digest, "library": spec.arch, "name": spec.name, "test_acc": None,
              "inputs": adapted.input_spec.record()}
    return adapted, record


def _given_architecture(spec: ModelSpec, state: dict) -> nn.Module:
    """The library's architecture sized like ``state``: its classes and input channels."""
    model = create(spec.arch, spec.name)
    key = _classifier_key(spec.arch, model)
    classes = int(state[key].shape[0]) if key and key in state and state[key].dim() == 2 else None
    first = next((v for k, v in state.items() if k.endswith("weight") and v.dim() == 4), None)
    channels = int(first.shape[1]) if first is not None else None
    if (classes is not None and classes != _num_classes(model)) or (channels not in (None, 3)):
        model = create(spec.arch, spec.name, num_classes=classes, in_channels=channels)
    return model


def _num_classes(model: nn.Module) -> int | None:
    from stitching.models.adapters import _classes

    try:
        return _classes(model)
    except StitchingError:
        return None


def load_pretrained(spec: ModelSpec) -> tuple[CuttableModel, dict]:
    """A library's pretrained model from the hub (or its local cache)."""
    if spec.arch not in LIBRARIES:
        raise StitchingError(f"pretrained=true applies to timm and torchvision models, not '{spec.arch}'")
    model = create(spec.arch, spec.name, pretrained=True)
    adapted = library_model(model.eval(), name=spec.name).eval()
    hub, cached = _hub_file(spec.arch, spec.name, model)
    record = {"key": f"{spec.arch}-{spec.name}-pretrained", "source": "hub", "hub": hub, "library": spec.arch,
              "name": spec.name, "path": str(cached) if cached else None,
              "sha256": sha256(cached) if cached else None, "test_acc": None, "inputs": adapted.input_spec.record()}
    return adapted, record


def _hub_file(library: str, name: str, model: nn.Module) -> tuple[str, Path | None]:
    """The hub address of pretrained weights and the cached file they were read from, if found."""
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        hub = cfg.get("hf_hub_id") or cfg.get("url") or name
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(cfg["hf_hub_id"], cfg.get("hf_hub_filename") or "model.safetensors")
            return hub, Path(found) if isinstance(found, str) else None
        except Exception:
            return hub, None
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return url, cached if cached.is_file() else None
